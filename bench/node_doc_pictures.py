"""The small pictures of the node-help pages (web/docs/*.png), drawn with the pack's own code on synthetic scenes
(not model output), so the pages show what the nodes really do.

- mask_kinds.png: a segmentation and what PainterNet Mask Generator makes of it (box, irregular) for two seeds;
- box_mask_shapes.png: a box and a stroke as the Box / Scribble Mask editor stores them, and the MASK they give;
- crop_box.png: PainterNet Crop on a 960x640 scene: the hole, the grown hole, the outer edge of the feather band,
  the crop box, and the crop at the branch's size;
- stitch_blends.png: PainterNet Stitch's blend modes on the seam of a crop with a colour drift, without and with
  mean_std colour match.

Usage: python bench/node_doc_pictures.py [--out web/docs]
"""
from __future__ import annotations

import argparse
import os
import sys

import cv2
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from crop_stitch import (CONTEXT, CONTEXT_MIN, FEATHER, GROW, RESOLUTION, ellipse_hole, fake_inpaint,  # noqa: E402
                         label, scene, seam_views)
from painternet_core import crop as C  # noqa: E402
from painternet_core import masks, shapes  # noqa: E402


def _gray(mask: np.ndarray) -> np.ndarray:
    return np.repeat(mask[..., None].astype(np.float32), 3, axis=-1)


def _save(path: str, sheet: np.ndarray) -> None:
    cv2.imwrite(path, cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"wrote {path} ({sheet.shape[1]}x{sheet.shape[0]})")


def mask_kinds(path: str) -> None:
    seg = np.zeros((192, 192), np.uint8)
    cv2.ellipse(seg, (92, 110), (38, 52), 20, 0, 360, 1, -1)
    cv2.circle(seg, (118, 62), 22, 1, -1)
    tiles = [label(_gray(seg), "segmentation")]
    for seed in (0, 1):
        for mode in ("box", "irregular"):
            drawn = masks.generate_mask(seg.astype(np.float32), mode, np.random.default_rng(seed))
            shown = _gray(drawn)
            shown[seg > 0] = (0.55, 0.55, 0.55)  # the object, so the growth around it shows
            tiles.append(label(shown, f"{mode}, seed {seed}"))
    _save(path, np.concatenate(tiles, axis=1))


def box_mask_shapes(path: str) -> None:
    height, width = 160, 240
    image = scene(height, width, seed=5)
    text = shapes.shapes_to_json([shapes.Box(0.1, 0.2, 0.35, 0.5),
                                  shapes.Stroke(((0.55, 0.7), (0.7, 0.3), (0.9, 0.55)), 0.05)])
    mask = shapes.render_mask(text, height, width)
    drawn = image.copy()
    drawn[mask > 0] = 0.5 * drawn[mask > 0] + 0.5 * np.float32([1.0, 0.2, 0.2])
    _save(path, np.concatenate([label(drawn, "drawn on the image"), label(_gray(mask), "MASK"),
                                label(_gray(shapes.render_mask(text, height, width, invert=True)), "MASK, invert")],
                               axis=1))


def crop_box(path: str) -> None:
    height, width = 640, 960
    image = scene(height, width, seed=3)
    hole = ellipse_hole(height, width, 560, 330, 70, 48)
    crops, crop_masks, info = C.crop_batch(torch.from_numpy(image)[None], torch.from_numpy(hole)[None], RESOLUTION,
                                           CONTEXT, CONTEXT_MIN, GROW, FEATHER)
    grown = C.grow_hole(hole > 0, GROW)
    band = C.grow_hole(grown, FEATHER)
    overview = image.copy()
    for region, colour in ((band, (0.0, 1.0, 1.0)), (grown, (1.0, 0.5, 0.0)), (hole > 0, (1.0, 0.0, 0.0))):
        contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(overview, contours, -1, colour, 2)
    box = info.boxes[0]
    cv2.rectangle(overview, (box.x0, box.y0), (box.x1 - 1, box.y1 - 1), (1.0, 1.0, 0.0), 3)
    over = cv2.resize(overview, (480, 320), interpolation=cv2.INTER_AREA)
    crop_view = crops[0].numpy().copy()
    contours, _ = cv2.findContours((crop_masks[0].numpy() > 0).astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(crop_view, contours, -1, (1.0, 0.5, 0.0), 2)
    side = cv2.resize(crop_view, (320 * crop_view.shape[1] // crop_view.shape[0], 320), interpolation=cv2.INTER_AREA)
    _save(path, np.concatenate([
        label(over, "hole (red), grown (orange), band (cyan), box (yellow)"),
        label(side, f"crop, {info.crop_size[0]}x{info.crop_size[1]}")], axis=1))


def stitch_blends(path: str) -> None:
    height, width = 640, 960
    image = scene(height, width, seed=3)
    hole = ellipse_hole(height, width, 560, 330, 70, 48)
    views = seam_views(image, hole, (330 - 70, 330 + 70, 560 - 105, 560 + 105))
    rows = [np.concatenate([label(v, name) for name, v in views[i::2]], axis=1) for i in range(2)]
    _save(path, np.concatenate(rows, axis=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                      "web", "docs"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    cv2.setNumThreads(1)
    mask_kinds(os.path.join(args.out, "mask_kinds.png"))
    box_mask_shapes(os.path.join(args.out, "box_mask_shapes.png"))
    crop_box(os.path.join(args.out, "crop_box.png"))
    stitch_blends(os.path.join(args.out, "stitch_blends.png"))


if __name__ == "__main__":
    main()
