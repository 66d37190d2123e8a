"""PainterNet under `TorchCompileModel`: the patched/base step ratio with and without torch.compile, same run.

Four settings sample through ComfyUI's real sampler: the base, the base + PainterNet (full range), and both again
behind ComfyUI's own `TorchCompileModel` node (default backend inductor). Each setting gets one untimed warm-up run
(for the compiled ones that is the compilation), then the settings are timed interleaved (base, patched, base
compiled, patched compiled, ...) so machine noise hits all of them; the figure is the median wall time of a
`sample` call divided by its steps. The script also reports what dynamo did inside each compiled setting (graphs,
graph breaks, recompiles, from `torch._dynamo.utils.counters`): the pack is compile-friendly when the patched model
compiles to as many graphs as the base with no graph break and no recompile of its own.

Attention: ComfyUI picks its sub-quadratic attention on CPU, which queries free memory through psutil and so breaks
every compiled graph (base alone included). The script selects PyTorch SDPA attention, as ComfyUI's
`--use-pytorch-cross-attention` does (and as it does by default on CUDA), so the graphs measured are the model's.

Topology: `tiny` (the tests' SD1.5-shaped tiny UNet, 32-64 channels; inductor needs ~7 min of compilation per
setting on a 2-vCPU VM) or `small` (the 320-channel SD1.5 real-signature UNet of tests/models.py).

Usage: python bench/compile_overhead.py [--topology tiny|small] [--steps N] [--size 64] [--repeats R]
       [--backend inductor|eager]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

from machine import device_name  # bench/ is on sys.path when run as a script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topology", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=4, help="sampling steps per run (default 4)")
    parser.add_argument("--size", type=int, default=64, help="image side in px; the latent is size/8 (default 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per setting, interleaved (default 5)")
    parser.add_argument("--cfg", type=float, default=5.0, help="CFG scale, > 1 so cond and uncond run (default 5)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend TorchCompileModel gets")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.size % 8:
        parser.error("--size must be a multiple of 8")
    return args


def setup_comfy() -> None:
    sys.path.insert(0, REPO)
    from harness import use_comfyui

    use_comfyui(cpu=True)
    import comfy.cli_args

    comfy.cli_args.args.use_pytorch_cross_attention = True
    import comfy.ldm.modules.attention as attention

    if attention.optimized_attention is not attention.attention_pytorch:
        raise SystemExit("could not select PyTorch attention (model_management was imported too early)")


def build(args: argparse.Namespace) -> dict[str, Any]:
    import comfy.supported_models as sm
    import torch

    from harness.comfy_helpers import comfy_model_config, pack_module
    from harness.models import SD15_SMALL_UNET, branch_file, fill_
    from painternet_core.branch import PainterNetBranch
    from painternet_core.config import TINY_SD15_UNET, PainterNetConfig

    import comfy.model_management as mm
    import comfy.model_patcher

    nodes_branch = pack_module("nodes.branch")
    if args.topology == "tiny":
        branch = fill_(PainterNetBranch(PainterNetConfig(family="sd15", unet=TINY_SD15_UNET)), 5, gain=0.3)
        painternet = nodes_branch.build_branch(branch.state_dict(), branch.config, dtype="fp32", name="tiny")
        model_config = comfy_model_config("sd15", nodes_branch.comfy_unet_config(TINY_SD15_UNET, in_channels=4))
    else:
        painternet = nodes_branch.load_painternet(branch_file("sd15", "tiny-sd15-320-branch.safetensors"), "fp32")
        model_config = sm.SD15(dict(SD15_SMALL_UNET))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    fill_(model.diffusion_model, 4)
    base = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())
    nodes_branch.check_base(base, painternet.config)
    gen = torch.Generator().manual_seed(args.seed)
    lat = args.size // 8
    condition = torch.randn(1, 5, lat, lat, generator=gen)
    condition[:, 4] = 0.0
    condition[:, 4, lat // 4: 3 * lat // 4, lat // 4: 3 * lat // 4] = 1.0
    patched = pack_module("nodes.injection").apply_painternet(base, painternet, condition, 1.0, 0.0, 1.0)
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    def compiled(m: Any) -> Any:
        return TorchCompileModel.execute(m, args.backend).result[0]

    ctx = model_config.unet_config["context_dim"]
    return {
        "models": {"base": base, "patched": patched, "base+compile": compiled(base),
                   "patched+compile": compiled(patched)},
        "positive": [[torch.randn(1, 77, ctx, generator=gen), {}]],
        "negative": [[torch.randn(1, 77, ctx, generator=gen), {}]],
        "latent": torch.zeros(1, 4, lat, lat),
        "params": (sum(p.numel() for p in model.diffusion_model.parameters()),
                   sum(p.numel() for p in painternet.patcher.model.parameters())),
    }


def sample_once(model: Any, parts: dict[str, Any], args: argparse.Namespace) -> tuple[float, Any]:
    import comfy.sample
    import torch

    noise = comfy.sample.prepare_noise(parts["latent"], args.seed)
    start = time.perf_counter()
    out = comfy.sample.sample(model, noise, args.steps, args.cfg, "euler", "normal", parts["positive"],
                              parts["negative"], parts["latent"], denoise=1.0, disable_pbar=True, seed=args.seed)
    elapsed = time.perf_counter() - start
    if not torch.isfinite(out).all():
        raise RuntimeError("sampling produced non-finite latents")
    return elapsed, out


def dynamo_stats() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "recompiles": sum(v for k, v in counters["recompiles"].items()) if "recompiles" in counters else 0}


def main() -> None:
    args = parse_args()
    setup_comfy()
    import comfy.sample
    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters

    started = time.time()
    parts = build(args)
    models = parts["models"]
    print(f"machine: {device_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; topology {args.topology} (UNet {parts['params'][0] / 1e6:.1f} M, "
          f"branch {parts['params'][1] / 1e6:.1f} M params); {args.size}x{args.size} px, {args.steps} euler steps, "
          f"cfg {args.cfg}, backend {args.backend}, PyTorch SDPA attention", flush=True)
    outputs, stats = {}, {}
    for name, model in models.items():
        counters.clear()
        seconds, outputs[name] = sample_once(model, parts, args)
        seconds2, again = sample_once(model, parts, args)
        stats[name] = dict(dynamo_stats(), warmup_s=round(seconds, 1), second_run_s=round(seconds2, 2))
        print(f"warm-up {name}: {stats[name]}", flush=True)
    # Compiled vs eager of the same model: the same numbers up to the backend's kernel differences.
    for name in ("base", "patched"):
        diff = (outputs[name + "+compile"] - outputs[name]).abs().max().item()
        print(f"max |compiled - eager| {name}: {diff:.2e} (max |eager| {outputs[name].abs().max().item():.3g})")
    # What the model and the branch contribute, so the equalities above compare real outputs: the sampled latent
    # minus the starting noise (the model's whole effect), and patched minus base (the branch's).
    noise = comfy.sample.prepare_noise(parts["latent"], args.seed)
    print(f"max |eager - initial noise| base: {(outputs['base'] - noise).abs().max().item():.3g}; "
          f"max |patched - base| eager: {(outputs['patched'] - outputs['base']).abs().max().item():.3g}")
    # The timed runs below must not compile anything new: checked by the counters after them.
    counters.clear()
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            times[name].append(sample_once(model, parts, args)[0] / args.steps)
    after = dynamo_stats()
    medians = {name: statistics.median(v) for name, v in times.items()}
    print()
    print("| setting | s/step (median) | min-max | x base (same mode) |")
    print("|---|---|---|---|")
    for name, v in times.items():
        ref = medians["base+compile" if "compile" in name else "base"]
        print(f"| {name} | {medians[name]:.3f} | {min(v):.3f}-{max(v):.3f} | {medians[name] / ref:.2f} |")
    print()
    print(f"patched/base eager {medians['patched'] / medians['base']:.2f}, compiled "
          f"{medians['patched+compile'] / medians['base+compile']:.2f}; compiled/eager base "
          f"{medians['base+compile'] / medians['base']:.2f}, patched {medians['patched+compile'] / medians['patched']:.2f}")
    print(f"recompiles or new graphs during the timed runs: {after}")
    print(f"total {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
