"""PainterNet with Kohya Deep Shrink (`PatchModelAddDownscale`): what the branch costs when the base is shrunk.

Deep Shrink downscales the base's hidden state after an input block; the branch still runs at full size (its
residuals are resized to the shrunk state, see docs/compatibility.md), so the patched/base ratio grows where Deep
Shrink makes the base cheaper. Four settings through ComfyUI's real sampler, timed interleaved after one untimed
warm-up each: base, base + PainterNet, and both behind Deep Shrink (block 3, factor 2, over the whole sampling range,
ComfyUI's defaults otherwise). Figure: median wall seconds of a `sample` call per step.

Usage: python bench/deep_shrink_overhead.py [--topology tiny|small] [--size 256] [--steps 3] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compile_overhead import build, sample_once, setup_comfy  # noqa: E402
from machine import device_name  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topology", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--factor", type=float, default=2.0)
    args = parser.parse_args()
    args.backend = "eager"
    setup_comfy()
    import torch
    from comfy_extras.nodes_model_downscale import PatchModelAddDownscale

    parts = build(args)
    base, patched = parts["models"]["base"], parts["models"]["patched"]

    def shrink(m):
        return PatchModelAddDownscale.execute(m, 3, args.factor, 0.0, 1.0, True, "bicubic", "bicubic").result[0]

    models = {"base": base, "patched": patched, "base+deep shrink": shrink(base),
              "patched+deep shrink": shrink(patched)}
    print(f"machine: {device_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"topology {args.topology}; {args.size}x{args.size} px, {args.steps} euler steps, cfg {args.cfg}, "
          f"Deep Shrink block 3 x{args.factor} on every step", flush=True)
    for model in models.values():
        sample_once(model, parts, args)
    times = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            times[name].append(sample_once(model, parts, args)[0] / args.steps)
    med = {name: statistics.median(v) for name, v in times.items()}
    print("| setting | s/step (median) | min-max |")
    print("|---|---|---|")
    for name, v in times.items():
        print(f"| {name} | {med[name]:.3f} | {min(v):.3f}-{max(v):.3f} |")
    print(f"patched/base {med['patched'] / med['base']:.2f} without Deep Shrink, "
          f"{med['patched+deep shrink'] / med['base+deep shrink']:.2f} with it; Deep Shrink saves "
          f"{1 - med['base+deep shrink'] / med['base']:.0%} of a base step and "
          f"{1 - med['patched+deep shrink'] / med['patched']:.0%} of a patched one")


if __name__ == "__main__":
    main()
