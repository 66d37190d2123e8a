"""Quality vs branch reuse across steps (issue 23), on the learning task's trained branch.

One branch is trained once (``bench/learning_task.py``'s task, ACP + ATAL, the learning check's budget), then the
same held-out scenes are inpainted with the diffusers sampler (``training.inference.inpaint`` through
``evaluate_branch``: DDIM, CFG 5) under each reuse rule of ``painternet_core.reuse`` — the node's presets off /
every_2 / every_3 / adaptive and, to calibrate the adaptive rule, a sweep of its threshold. Printed per rule: the
fraction of sampling steps that ran the branch, colour accuracy, prompt-colour fraction, shape accuracy and
preservation MSE, with their ratios to reuse off, all from this one run.

Calibration data (printed first): with reuse off, per DDIM step, the relative L2 change of the branch input (the
scaled noisy latent, what the adaptive rule measures) and of the branch's residuals (what a skipped step reuses)
since the previous step, averaged over the prompt groups.

The attention mass of the prompt tokens in the hole is a property of the branch (its maps at fixed noise levels,
``attention_mass``); reuse does not change the branch, so it is printed once.

Usage: python bench/reuse_quality.py [--samples 96] [--steps 300] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.learning_task import (SETTINGS, PretrainSettings, evaluate_branch, held_out_samples,  # noqa: E402
                                 prepare_base, prepare_task, train_setting)
from bench.machine import device_name  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def step_changes(base: object, branch: torch.nn.Module, samples: list, *, seed: int,
                 num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(input change, residual change) per step since the previous step, reuse off, mean over prompt groups."""
    from painternet_core.reuse import relative_change
    from training.inference import inpaint

    groups: dict[str, list[int]] = {}
    for index, sample in enumerate(samples):
        groups.setdefault(sample.prompt, []).append(index)
    inputs, residuals = [], []
    forward = branch.forward
    for prompt, indices in groups.items():
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []

        def record(sample: torch.Tensor, *args: object, **kwargs: object) -> object:
            out = forward(sample, *args, **kwargs)
            flat = torch.cat([r.reshape(-1) for r in (*out.down, out.mid, *out.up, *out.attention)])
            seen.append((sample.detach().clone(), flat))
            return out

        branch.forward = record
        try:
            image = torch.stack([torch.from_numpy(samples[i].image).permute(2, 0, 1).float() / 255.0
                                 for i in indices])
            mask = torch.stack([torch.from_numpy(samples[i].mask)[None] for i in indices])
            inpaint(base, branch, image, mask, prompt, config=branch.config, seed=seed,
                    num_inference_steps=num_inference_steps, guidance_scale=5.0, paste_back=False)
        finally:
            del branch.forward
        inputs.append([relative_change(a[0], b[0]) for a, b in zip(seen[1:], seen)])
        residuals.append([relative_change(a[1], b[1]) for a, b in zip(seen[1:], seen)])
    return np.mean(inputs, axis=0), np.mean(residuals, axis=0)


def calibrate(args: argparse.Namespace) -> None:
    """Per-step input change only (no training): the untrained branch (a copy of the base) on the cached base, for
    each DDIM step count in ``--calibrate``; the adaptive rule compares exactly this change with its threshold."""
    from painternet_core.branch import PainterNetBranch
    from training.inference import load_base_model

    torch.set_num_threads(args.threads)
    base = load_base_model(prepare_base(PretrainSettings(seed=args.base_seed), Path(args.cache)))
    branch = PainterNetBranch.from_unet(base.unet, attention_control=True).eval()
    samples = held_out_samples(args.samples, args.base_seed)
    print(f"# reuse calibration, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {device_name()}, "
          f"{os.cpu_count()} CPUs, {args.threads} thread(s); untrained (base-copy) branch, learning-task base, "
          f"{args.samples} held-out scenes, CFG 5")
    for steps in args.calibrate:
        change, _ = step_changes(base, branch, samples, seed=args.seed, num_inference_steps=steps)
        print(f"DDIM {steps}: relative L2 change of the branch input per step (mean over prompt groups): "
              + " ".join(f"{v:.3f}" for v in change))
    load = os.getloadavg()
    print(f"load average at the end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")


def run(args: argparse.Namespace) -> None:
    from painternet_core.reuse import PRESETS, BranchReuse
    from training.inference import load_base_model

    if args.calibrate:
        calibrate(args)
        return

    torch.set_num_threads(args.threads)
    started = time.time()
    settings = PretrainSettings(seed=args.base_seed)
    base_path, data_dir, samples = prepare_task(settings, args.cache, args.samples)
    prepared = time.time() - started
    with tempfile.TemporaryDirectory() as scratch:
        branch = train_setting(SETTINGS["branch + ACP + ATAL"], base_path=base_path, data_dir=data_dir,
                               output_dir=Path(scratch) / "branch", steps=args.steps, learning_rate=args.lr,
                               beta=args.beta, batch_size=args.batch_size, seed=args.seed)
    trained = time.time() - started - prepared
    base = load_base_model(base_path)
    rules: dict[str, BranchReuse | None] = dict(PRESETS)
    for threshold in args.sweep:
        rules[f"every<=3, change>{threshold:g}"] = BranchReuse(3, max_change=threshold)
    results = {}
    for name, rule in rules.items():
        results[name] = evaluate_branch(base, branch, samples, seed=args.seed, num_inference_steps=args.ddim,
                                        reuse=rule)
    input_change, residual_change = step_changes(base, branch, samples, seed=args.seed,
                                                 num_inference_steps=args.ddim)
    wall = time.time() - started

    load = os.getloadavg()
    print(f"# reuse quality, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {device_name()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} thread(s); load average at the end "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"task: bench/learning_task.py, base seed {settings.seed} ({settings.unet_steps} pretraining steps); branch "
          f"ACP + ATAL trained once: {args.steps} steps x batch {args.batch_size}, lr {args.lr}, beta {args.beta}, "
          f"seed {args.seed}")
    print(f"eval: {args.samples} held-out scenes, DDIM {args.ddim} steps, CFG 5, sampler training.inference.inpaint")
    print(f"wall time: {wall:.0f} s (base {prepared:.0f} s, training {trained:.0f} s)")
    print()
    print(f"calibration, reuse off: relative L2 change since the previous step (mean over "
          f"{len({s.prompt for s in samples})} prompt groups)")
    print("step     " + " ".join(f"{i:>5}" for i in range(1, args.ddim)))
    print("input    " + " ".join(f"{v:>5.3f}" for v in input_change))
    print("residuals" + " ".join(f"{v:>5.3f}" for v in residual_change))
    print()
    off = results["off"]
    print(f"in-hole attention mass of the prompt tokens (the branch's, unchanged by reuse): {off.attention_mass:.3f}")
    print()
    header = ("rule", "branch runs", "colour acc", "/off", "colour frac", "/off", "shape acc", "/off", "preserv MSE")
    print(f"{header[0]:<26}" + "".join(f"{h:>12}" for h in header[1:]))
    for name, r in results.items():
        print(f"{name:<26}{r.branch_runs / r.steps:>12.3f}{r.colour_accuracy:>12.3f}"
              f"{r.colour_accuracy / max(off.colour_accuracy, 1e-12):>12.3f}{r.colour_fraction:>12.3f}"
              f"{r.colour_fraction / max(off.colour_fraction, 1e-12):>12.3f}{r.shape_accuracy:>12.3f}"
              f"{r.shape_accuracy / max(off.shape_accuracy, 1e-12):>12.3f}{r.preservation_mse:>12.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="Branch training and sampling seed.")
    parser.add_argument("--steps", type=int, default=300, help="Branch training steps.")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=1e-2)
    parser.add_argument("--samples", type=int, default=96, help="Held-out scenes (accuracy moves in 1/samples).")
    parser.add_argument("--ddim", type=int, default=20, help="DDIM sampling steps.")
    parser.add_argument("--sweep", type=float, nargs="*", default=[0.1, 0.2],
                        help="Extra adaptive thresholds (max_change, every <= 3) to evaluate.")
    parser.add_argument("--calibrate", type=int, nargs="*", default=[],
                        help="Only print the per-step input change for these DDIM step counts (no training).")
    parser.add_argument("--base_seed", type=int, default=0)
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "learning_task"))
    parser.add_argument("--threads", type=int, default=2)
    from training.cli import parse_args

    run(parse_args(parser, None))


if __name__ == "__main__":
    main()
