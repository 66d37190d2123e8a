"""Learning check (issue 7): does the real trainer teach the branch the local prompt, and what do ACP and ATAL add?

On the synthetic task of ``bench/learning_task.py`` (64×64 flat-colour scenes, the prompt names the colour and the
shape of the object under the hole), for every seed: the tiny base is prepared (cached), then the branch is trained
with ``training/trainer/train.py``'s ``main`` in the four settings of ``learning_task.SETTINGS`` — no branch (the
zero-initialised branch, i.e. the base with the known region pasted back), branch without ACP and ATAL, branch + ACP,
branch + ACP + ATAL — and each is scored on the same held-out scenes (``evaluate_branch``: DDIM 20 steps, CFG 5):
colour accuracy in the hole, the fraction of hole pixels in the prompt's colour, shape accuracy, preservation MSE of
the raw decode outside the hole, and the branch's attention mass of the prompt tokens inside the hole. Prints the
table (mean over seeds, then per seed), the budget and the wall time; ``--grid`` writes held-out inpaintings of the
last seed (rows: samples; columns: masked input, the four settings, the original).

Usage: python bench/learning_check.py [--seeds 0 1 2] [--steps 300] [--grid docs/learning_check_grid.png]
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

from bench.learning_task import (SETTINGS, PretrainSettings, evaluate_branch, prepare_task,  # noqa: E402
                                 train_setting)
from bench.machine import device_name  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run(args: argparse.Namespace) -> None:
    from painternet_core.branch import PainterNetBranch
    from training.inference import load_base_model

    torch.set_num_threads(args.threads)
    started = time.time()
    settings = PretrainSettings(seed=args.base_seed)
    base_path, data_dir, samples = prepare_task(settings, args.cache, args.samples)
    prepared = time.time() - started
    results: dict[str, dict[int, object]] = {name: {} for name in SETTINGS}
    images: dict[str, list[np.ndarray]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for seed in args.seeds:
            for name, flags in SETTINGS.items():
                if flags is None:
                    base = load_base_model(base_path)
                    branch = PainterNetBranch.from_unet(base.unet, attention_control=True).eval()
                else:
                    branch = train_setting(flags, base_path=base_path, data_dir=data_dir,
                                           output_dir=Path(scratch) / f"{seed}-{len(results[name])}-{name[:6]}",
                                           steps=args.steps, learning_rate=args.lr, beta=args.beta,
                                           batch_size=args.batch_size, seed=seed)
                    base = load_base_model(base_path)
                result = evaluate_branch(base, branch, samples, seed=seed)
                results[name][seed] = result
                images[name] = result.images
    wall = time.time() - started

    print(f"# learning check, {time.strftime('%Y-%m-%d')}: {device_name()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {args.threads} thread(s)")
    print(f"base: tiny SD1.5-shaped UNet pretrained {settings.unet_steps} steps text-to-image (seed {settings.seed}), "
          f"constructed patch-mean VAE; {settings.images} training scenes, {args.samples} held-out scenes")
    print(f"budget: {args.steps} steps x batch {args.batch_size}, lr {args.lr}, beta {args.beta}, seeds "
          f"{' '.join(map(str, args.seeds))}; eval DDIM 20 steps, CFG 5")
    print(f"wall time: {wall:.0f} s (base preparation {prepared:.0f} s)")
    print()
    header = f"{'setting':<28} " + " ".join(f"{name:>19}" for name in (
        "colour acc", "colour frac", "shape acc", "preserv. MSE", "attn mass in hole"))
    print("mean over seeds (min-max)")
    print(header)
    for name, per_seed in results.items():
        cells = []
        for field, fmt in (("colour_accuracy", "{:.2f}"), ("colour_fraction", "{:.2f}"),
                           ("shape_accuracy", "{:.2f}"), ("preservation_mse", "{:.3f}"), ("attention_mass", "{:.3f}")):
            values = [getattr(r, field) for r in per_seed.values()]
            cells.append(f"{fmt.format(np.mean(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})")
        print(f"{name:<28} " + " ".join(f"{cell:>19}" for cell in cells))
    print()
    print("per seed: colour acc / attention mass")
    print(f"{'setting':<28} " + " ".join(f"{'seed ' + str(s):>14}" for s in args.seeds))
    for name, per_seed in results.items():
        print(f"{name:<28} " + " ".join(f"{r.colour_accuracy:>6.2f} / {r.attention_mass:.3f}"
                                        for r in per_seed.values()))
    if args.grid:
        write_grid(Path(args.grid), samples[:args.grid_rows], images)
        print(f"\ngrid of held-out inpaintings (seed {args.seeds[-1]}): {args.grid}")


def write_grid(path: Path, samples: list, images: dict[str, list[np.ndarray]]) -> None:
    """Rows: samples; columns: masked input (hole in magenta), the settings' inpaintings, the original; 2× nearest."""
    from PIL import Image, ImageDraw

    rows = []
    for index, sample in enumerate(samples):
        original = sample.image.astype(np.float32) / 255.0
        masked = np.where(sample.mask[:, :, None] > 0.5, np.array([1.0, 0.0, 1.0], np.float32), original)
        cells = [masked] + [images[name][index] for name in images] + [original]
        rows.append(np.concatenate([np.pad(c, ((1, 1), (1, 1), (0, 0)), constant_values=1.0) for c in cells], 1))
    grid = (np.concatenate(rows, 0) * 255).round().clip(0, 255).astype(np.uint8)
    picture = Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST)
    labels = ["input", "no branch", "branch", "+ACP", "+ACP+ATAL", "original"]
    header = Image.new("RGB", (picture.width, 16), "white")
    draw = ImageDraw.Draw(header)
    for column, label in enumerate(labels):
        draw.text((column * 132 + 4, 2), label, fill="black")
    canvas = Image.new("RGB", (picture.width, picture.height + 32), "white")
    canvas.paste(header, (0, 0))
    canvas.paste(picture, (0, 16))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, picture.height + 18), "prompts: " + ", ".join(s.prompt for s in samples), fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="Branch training/eval seeds.")
    parser.add_argument("--steps", type=int, default=300, help="Branch training steps per setting.")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=1e-2, help="ATAL weight (see learning_task's docstring).")
    parser.add_argument("--samples", type=int, default=24, help="Held-out scenes.")
    parser.add_argument("--base_seed", type=int, default=0, help="Seed of the scenes and of the base pretraining.")
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "learning_task"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--grid", default=None, help="Write a PNG grid of held-out inpaintings here.")
    parser.add_argument("--grid_rows", type=int, default=8)
    from training.cli import parse_args

    run(parse_args(parser, None))


if __name__ == "__main__":
    main()
