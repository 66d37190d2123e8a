"""Loader memory: peak RSS of PainterNetLoader's path (`load_painternet`, streamed from the file into the final dtype)
against the file size, next to the in-memory path (read the whole file, then build: `load_branch` + `build_branch`),
and the resident bytes of fp16 / fp8 storage. Each load runs in a fresh interpreter (``harness.memory.load_peak``):
"extra" is the peak RSS during the load minus the RSS just before it (after the imports; the peak is reset there).

The branch is random, of the real SD1.5 topology (`--width 320`, ~3.6 GB fp32) or narrower (`--width 64`: same
depth, heads and layout at a fifth of the channels, ~150 MB), written once to `--dir`.

Usage: python bench/loader_memory.py [--width 64] [--dir .cache/loader_memory]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_branch(path: str, width: int) -> None:
    import torch

    sys.path.insert(0, REPO)
    from painternet_core.checkpoint import reference_shapes, save_branch
    from painternet_core.config import SD15_UNET, PainterNetConfig

    unet = dict(SD15_UNET, block_out_channels=[width, 2 * width, 4 * width, 4 * width]) if width != 320 else SD15_UNET
    config = PainterNetConfig(family="sd15", unet=unet)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=g) * 0.02 for k, shape in sorted(reference_shapes(config).items())}
    save_branch(path, state, config)


def main() -> None:
    sys.path.insert(0, REPO)
    from harness.memory import load_peak

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=64, help="model_channels of the SD1.5-shaped branch (320 = real)")
    parser.add_argument("--dir", default=os.path.join(REPO, ".cache", "loader_memory"))
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    path = os.path.join(args.dir, f"sd15-w{args.width}.safetensors")
    if not os.path.exists(path):
        write_branch(path, args.width)
    size = os.path.getsize(path)
    print(f"loader memory: {path}, {size / 2**20:.0f} MiB fp32 file; CPU, fresh interpreter per load; "
          f"load average at start {' '.join(format(x, '.2f') for x in os.getloadavg())}")
    print(f"{'path':<28} {'dtype':<11} {'extra peak MiB':>14} {'x file':>7} {'resident MiB':>12} {'x fp16':>7} "
          f"{'s':>6}")
    fp16 = None
    for how, dtype in (("stream", "fp32"), ("stream", "fp16"), ("stream", "fp8_e4m3fn"), ("stream", "fp8_e5m2"),
                       ("read whole file, build", "fp32"), ("read whole file, build", "fp16")):
        t0 = time.perf_counter()
        got = load_peak(path, dtype, "stream" if how == "stream" else "whole")
        extra = got["peak"] - got["before"]
        if how == "stream" and dtype == "fp16":
            fp16 = got["resident"]
        ratio = f"{got['resident'] / fp16:.2f}" if fp16 else "-"
        print(f"{how:<28} {dtype:<11} {extra / 2**20:>14.0f} {extra / size:>7.2f} {got['resident'] / 2**20:>12.0f} "
              f"{ratio:>7} {time.perf_counter() - t0:>6.0f}")
    print(f"load average at end {' '.join(format(x, '.2f') for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
