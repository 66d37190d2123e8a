"""The docs picture of soft masks through crop and stitch (docs/soft-masks.md), from the pack's own core functions.

A box hole blurred with a Gaussian (sigma 4 px) is cropped and stitched twice, once binarised and once as drawn
(grow 2, feather 16). The picture shows the mask, the crop's mask for each, the stitch weight for each (measured by
stitching a white crop into a black image, so the weight is the output itself) and where the two weights differ.
Also prints how many crop-mask pixels are soft and the largest weight difference, so the picture's claim can be
checked from the log.

Usage: python bench/soft_masks.py [--picture docs/soft_masks.png]
"""
from __future__ import annotations

import argparse
import os
import sys

import cv2
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from painternet_core import crop as C  # noqa: E402

HEIGHT, WIDTH, GROW, FEATHER, SIGMA, TILE = 160, 200, 2, 12, 8.0, 200


def _weight(info: C.StitchInfo, crops: torch.Tensor) -> np.ndarray:
    """The stitch weight per pixel: a white crop stitched into a black image is the weight itself."""
    black = C.StitchInfo(image=torch.zeros_like(info.image), boxes=info.boxes, holes=info.holes,
                         crop_size=info.crop_size, feather=info.feather, soft=info.soft)
    return C.stitch_batch(black, torch.ones_like(crops), "feather", "none")[0, ..., 0].numpy()


def _tile(values: np.ndarray, label: str) -> np.ndarray:
    grey = cv2.resize(np.clip(values, 0, 1).astype(np.float32), (TILE, TILE * HEIGHT // WIDTH),
                      interpolation=cv2.INTER_NEAREST)
    rgb = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=2)
    cv2.rectangle(rgb, (0, 0), (TILE - 1, 15), (40, 40, 40), -1)
    cv2.putText(rgb, label, (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (255, 255, 255), 1, cv2.LINE_AA)
    return rgb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--picture", default="", help="write the picture to this PNG path")
    args = parser.parse_args()
    hole = np.zeros((HEIGHT, WIDTH), np.float32)
    hole[50:110, 60:140] = 1.0
    soft = cv2.GaussianBlur(hole, (0, 0), SIGMA)
    image = torch.full((1, HEIGHT, WIDTH, 3), 0.5)
    results = {}
    for name, mask in (("binary", (soft > 0.5).astype(np.float32)), ("soft", soft)):
        crops, crop_mask, info = C.crop_batch(image, torch.from_numpy(mask)[None], 128, 0.5, 16, GROW, FEATHER)
        results[name] = (crop_mask[0].numpy(), _weight(info, crops))
    soft_pixels = int(((results["soft"][0] > 0) & (results["soft"][0] < 1)).sum())
    diff = results["soft"][1] - results["binary"][1]
    print(f"crop mask soft pixels: binary {int(((results['binary'][0] > 0) & (results['binary'][0] < 1)).sum())}, "
          f"soft {soft_pixels}; stitch weight soft - binary: min {diff.min():.3f}, max {diff.max():.3f}")
    if args.picture:
        top = np.concatenate([_tile(soft, f"mask as drawn (blur {SIGMA:g} px)"),
                              _tile(results["binary"][0], "crop mask, binarised"),
                              _tile(results["soft"][0], "crop mask, soft")], axis=1)
        bottom = np.concatenate([_tile(results["binary"][1], "stitch weight, binary"),
                                 _tile(results["soft"][1], "stitch weight, soft"),
                                 _tile(np.clip(diff * 4, 0, 1), "soft - binary (x4)")], axis=1)
        h = min(top.shape[0], bottom.shape[0])
        cv2.imwrite(args.picture, cv2.cvtColor(np.concatenate([top[:h], bottom[:h]], axis=0), cv2.COLOR_RGB2BGR))
        print(f"wrote {args.picture}")


if __name__ == "__main__":
    main()
