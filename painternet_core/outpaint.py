"""Outpainting canvas: pad the image per side, mask the padding plus a band inside the original's edges.

PowerPaint v2's outpainting demo fills the new canvas with grey 127 and also regenerates a 10 px band just inside the
original's edge on every expanded side, so the new content grows out of the picture instead of meeting it at a hard
seam. The result is a crop-and-stitch pair whose "crop" is the whole padded canvas: PainterNetStitch pastes the
decoded canvas back over it, so every pixel outside the masked area (and its feather band) is the original's, bit for
bit, and the output has the padded size.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .conditioning import MASK_THRESHOLD
from .crop import Box, StitchInfo, _check_finite, _image_array, _masks

FILL = 127.0 / 255.0  # the reference demo's grey
BAND = 10  # px regenerated inside the original's edge on each expanded side (the demo's `blurry_gap`)
MULTIPLE = 8  # VAE downscale: the canvas is grown to a multiple of it so nothing is cropped before sampling
MAX_PAD = 8192


def canvas_padding(width: int, height: int, left: int, top: int, right: int,
                   bottom: int) -> tuple[int, int, int, int]:
    """Per-side padding with the canvas rounded up to a multiple of 8 px; the extra goes to the right and bottom."""
    for name, value in (("left", left), ("top", top), ("right", right), ("bottom", bottom)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PAD:
            raise ValueError(f"{name} padding must be an integer in 0..{MAX_PAD} px, got {value!r:.200}")
    right += -(width + left + right) % MULTIPLE
    bottom += -(height + top + bottom) % MULTIPLE
    return left, top, right, bottom


def outpaint_mask(width: int, height: int, padding: tuple[int, int, int, int], band: int) -> np.ndarray:
    """(H', W') bool mask of the padded canvas: True on the padding and on a `band` px strip inside the original's
    edge on each side that was padded; the original's kept pixels are False."""
    left, top, right, bottom = padding
    mask = np.ones((height + top + bottom, width + left + right), bool)
    x0 = left + (band if left else 0)
    x1 = left + width - (band if right else 0)
    y0 = top + (band if top else 0)
    y1 = top + height - (band if bottom else 0)
    if x1 > x0 and y1 > y0:
        mask[y0:y1, x0:x1] = False
    return mask


def pad_batch(image: torch.Tensor, left: int, top: int, right: int, bottom: int, band: int = BAND,
              feather: int = 0, mask: torch.Tensor | None = None,
              check: Callable[[], None] | None = None) -> tuple[torch.Tensor, torch.Tensor, StitchInfo]:
    """Pad every image onto a grey canvas. Returns the canvas (B, H', W', 3), its mask (B, H', W'; 1 = generate) and
    the StitchInfo that puts the decoded canvas back. An optional input `mask` (holes inside the original) is kept:
    those pixels are regenerated too."""
    pixels = _image_array(image)
    batch, height, width = pixels.shape[:3]
    _check_finite(pixels, "image")
    if isinstance(band, bool) or not isinstance(band, int) or band < 0:
        raise ValueError(f"band must be a non-negative integer (px), got {band!r:.200}")
    padding = canvas_padding(width, height, left, top, right, bottom)
    if not any(padding[:4]) and mask is None:
        raise ValueError("all paddings are 0: nothing to outpaint; set at least one side's padding")
    left, top, right, bottom = padding
    new_h, new_w = height + top + bottom, width + left + right
    canvas = np.full((batch, new_h, new_w, 3), FILL, np.float32)
    holes = np.empty((batch, new_h, new_w), bool)
    base = outpaint_mask(width, height, padding, band)
    inner = _masks(mask, batch, height, width) > MASK_THRESHOLD if mask is not None else None
    for i in range(batch):
        if check is not None:
            check()
        canvas[i, top:top + height, left:left + width] = pixels[i, ..., :3]
        holes[i] = base
        if inner is not None:
            holes[i, top:top + height, left:left + width] |= inner[i if inner.shape[0] > 1 else 0]
    full = Box(0, 0, new_w, new_h)
    canvas_t = torch.from_numpy(canvas)
    info = StitchInfo(image=canvas_t, boxes=(full,) * batch,
                      holes=tuple(torch.from_numpy(h.copy()) for h in holes), crop_size=(new_w, new_h),
                      feather=int(feather))
    return canvas_t.clone(), torch.from_numpy(holes.astype(np.float32)), info
