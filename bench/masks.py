"""Masks per second per core for each mode of `painternet_core.masks`, at 512² and 1024².

The trainer builds one mask per sample in its data workers, so the generator must stay far below the GPU's time per
sample (the goal is >= 1000 irregular masks/s/core at 512²). Inputs are realistic segmentations: random filled
ellipses and polygons whose coverage ratios span all the dilation bands (about 0.1 % to 80 % of the image), cycled in
a fixed order so every mode sees the same inputs. OpenCV runs single-threaded (`cv2.setNumThreads(1)`), so the
figures are per core.

Usage: python bench/masks.py [--count N] [--seed S] [--sizes 512 1024]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from machine import device_name  # noqa: E402
from painternet_core import masks  # noqa: E402


def realistic_segmentations(size: int, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`count` float32 {0,1} masks of size²: one or two ellipses or polygons with log-uniform target coverage."""
    out = []
    for _ in range(count):
        seg = np.zeros((size, size), dtype=np.uint8)
        target = float(np.exp(rng.uniform(np.log(0.001), np.log(0.8))))
        radius = np.sqrt(target * size * size / np.pi)
        for _ in range(int(rng.integers(1, 3))):
            cx, cy = (int(v) for v in rng.integers(int(radius / 2), max(int(radius / 2) + 1, size - int(radius / 2)),
                                                   size=2))
            if rng.random() < 0.5:
                axes = (max(1, int(radius * rng.uniform(0.6, 1.6))), max(1, int(radius * rng.uniform(0.6, 1.6))))
                cv2.ellipse(seg, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
            else:
                n = int(rng.integers(5, 12))
                angles = np.sort(rng.uniform(0, 2 * np.pi, n))
                radii = radius * rng.uniform(0.5, 1.5, n)
                pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
                cv2.fillPoly(seg, [np.round(pts).astype(np.int32)], 1)
        out.append(seg.astype(np.float32))
    return out


def rate(mode: str, inputs: list[np.ndarray], count: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    for seg in inputs[:8]:  # warm-up: first-call costs of cv2 and numpy
        masks.generate_mask(seg, mode, rng)
    start = time.perf_counter()
    for i in range(count):
        masks.generate_mask(inputs[i % len(inputs)], mode, rng)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="masks timed per (mode, size); default 2000")
    parser.add_argument("--seed", type=int, default=0, help="seed for inputs and masks; default 0")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="square sizes; default 512 1024")
    args = parser.parse_args()

    cv2.setNumThreads(1)
    print(f"# painternet masks bench: cpu={device_name()!r} python={platform.python_version()} "
          f"numpy={np.__version__} opencv={cv2.__version__} threads=1 count={args.count}")
    for size in args.sizes:
        inputs = realistic_segmentations(size, 64, np.random.default_rng(args.seed))
        ratios = np.array([seg.mean() for seg in inputs])
        print(f"size {size}x{size}: {len(inputs)} inputs, coverage ratio min {ratios.min():.4f} "
              f"median {np.median(ratios):.4f} max {ratios.max():.4f}")
        for mode in masks.MASK_MODES:
            print(f"  {mode:<13s} {rate(mode, inputs, args.count, args.seed):9.0f} masks/s/core")


if __name__ == "__main__":
    main()
