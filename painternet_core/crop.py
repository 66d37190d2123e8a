"""Crop & stitch around the hole: inpaint a context crop at the branch's training size, put it back seamlessly.

A real photo is far larger than the 512² / 1024² PainterNet was trained at, and encoding it whole gives the hole a few
latent pixels, makes the sampler work on the full frame and lets the VAE round trip change every kept pixel. Here the
(grown) hole plus some surrounding context is cut out and resized so its area is about resolution² (aspect kept,
sides multiples of 8); after sampling, the decoded crop is resized back and blended into the *original* pixels only
inside the grown hole and a feather band around it, so every other pixel stays bit-identical.

Pure numpy / OpenCV / torch. Images are ComfyUI-style (B, H, W, C) float32 in [0, 1]; masks (B, H, W) with
1 = region to generate. Per item work is done in numpy with OpenCV; the batch functions take and return torch tensors.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np
import torch

from .conditioning import MASK_THRESHOLD, check_image

logger = logging.getLogger("painternet")

# The square side each family was trained at (the trainer's and the evaluator's defaults).
FAMILY_RESOLUTION: dict[str, int] = {"sd15": 512, "sdxl": 1024}
BLEND_MODES: tuple[str, ...] = ("feather", "laplacian", "poisson")
COLOR_MATCH_MODES: tuple[str, ...] = ("none", "mean_std")
# SD UNets degrade quickly beyond ~4:1; a thinner box is widened with more context (or reflect padding).
MAX_ASPECT = 4.0
# Colour statistics are taken at least this many pixels around the hole, and skipped below this many ring pixels.
RING_MIN_WIDTH = 8
RING_MIN_PIXELS = 16
# The std ratio of the colour transfer is clamped: a flat ring (sky, wall) must not blow the hole's contrast up.
STD_RATIO_RANGE = (0.5, 2.0)
MAX_LAPLACIAN_LEVELS = 6
# OpenCV's seamlessClone keeps about a dozen float32 RGB planes of the hole's bounding box (gradients, Laplacians,
# the per-channel solve) beside the 8-bit copies: the stitch's peak rise measured ~200 bytes per pixel of the hole's
# box (a 2000² hole covering its image: 764 MB, 16.7 image copies). The poisson blend is refused above this budget
# rather than left to fail inside OpenCV (a raw cv2.error, or the OOM killer).
POISSON_BYTES_PER_PIXEL = 200
# In a soft mask's crop, the pixels `grow` added to the hole get this value: just above the threshold, so Apply's
# branch regenerates them (its hole is the grown hole, as for a binary mask) while Differential Diffusion treats
# them as the middle of the edge; the mask's own values are kept everywhere else.
GROWN_SOFT_LEVEL = MASK_THRESHOLD + 1.0 / 255.0
# A soft mask value that shows in an 8-bit mask: a Gaussian blur's far tail (1e-7) is not an edge worth a warning.
SOFT_VISIBLE = 1.0 / 255.0
POISSON_MAX_BYTES = 4 << 30
POISSON_MAX_PIXELS = POISSON_MAX_BYTES // POISSON_BYTES_PER_PIXEL


@dataclass(frozen=True)
class Box:
    """Half-open pixel box [x0, x1) × [y0, y1) in image coordinates; it extends past the image only where the image
    is smaller than the box (that part is reflect-padded)."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    def contains(self, other: "Box") -> bool:
        return self.x0 <= other.x0 and self.y0 <= other.y0 and self.x1 >= other.x1 and self.y1 >= other.y1


@dataclass(frozen=True)
class StitchInfo:
    """What `stitch_batch` needs to put crops back (the PAINTERNET_STITCH value): plain tensors and ints.

    `image` is the original batch (a reference, not a copy); `boxes[i]` the crop box of item i; `holes[i]` its grown
    hole (bool, box-sized, False in the padded part); `crop_size` the (width, height) every crop was resized to;
    `soft[i]` the user's mask over the box (float32, 0 in the padded part) when any mask had values strictly between
    0 and 1, else empty (a binary mask adds nothing to the hole)."""

    image: torch.Tensor
    boxes: tuple[Box, ...]
    holes: tuple[torch.Tensor, ...]
    crop_size: tuple[int, int]
    feather: int
    soft: tuple[torch.Tensor, ...] = ()


def hole_box(hole: np.ndarray) -> Box | None:
    """Bounding box of the True pixels of a (H, W) bool mask; None when it has none."""
    rows = np.flatnonzero(hole.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(hole.any(axis=0))
    return Box(int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


def grow_hole(hole: np.ndarray, grow: int) -> np.ndarray:
    """Dilate a (H, W) bool hole by a disc of radius `grow` px: every pixel within `grow` px (exact Euclidean
    distance, OpenCV's distance transform) of a hole pixel joins it. A distance transform costs the same for any
    radius, where a morphological dilation grows with the kernel; and it runs only on the hole's box plus the margin,
    so a small hole in a 12-megapixel photo costs a small region."""
    if grow <= 0:
        return hole.copy()
    box = hole_box(hole)
    if box is None:
        return hole.copy()
    height, width = hole.shape
    y0, y1 = max(box.y0 - grow, 0), min(box.y1 + grow, height)
    x0, x1 = max(box.x0 - grow, 0), min(box.x1 + grow, width)
    distance = cv2.distanceTransform((~hole[y0:y1, x0:x1]).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    out = np.zeros_like(hole)
    out[y0:y1, x0:x1] = distance <= grow
    return out


def _clamped_aspect(width: int, height: int) -> float:
    return min(max(width / height, 1.0 / MAX_ASPECT), MAX_ASPECT)


def _place(start: int, hole_len: int, size: int, limit: int) -> int:
    """Start of a box side of `size` centred on the hole, shifted to stay inside [0, limit) when it fits, else the
    image centred in it."""
    if size > limit:
        return -((size - limit) // 2)
    return min(max(start - (size - hole_len) // 2, 0), limit - size)


def context_box(hole: Box, image_size: tuple[int, int], context: float, context_min: int, feather: int,
                aspect: float | None = None) -> Box:
    """The crop box around a (grown) hole box in an image of `image_size` = (height, width).

    Each side gets a margin of `context` × the hole's extent on that axis, at least `context_min` px and at least
    `feather` + 1 px (so the blend band lies inside the crop); the box is clipped to the image's extent, then its
    short side is widened to `aspect` (width / height; default: its own, clamped to 1/4 … 4). It is shifted to stay
    inside the image; only a side longer than the image leaves it (that part is reflect-padded).
    """
    height, width = image_size
    margin_x = max(math.ceil(context * hole.width), context_min, feather + 1)
    margin_y = max(math.ceil(context * hole.height), context_min, feather + 1)
    w = min(hole.width + 2 * margin_x, width)
    h = min(hole.height + 2 * margin_y, height)
    target = _clamped_aspect(w, h) if aspect is None else aspect
    if w < h * target:
        w = math.ceil(h * target)
    elif w > h * target:
        h = math.ceil(w / target)
    x0 = _place(hole.x0, hole.width, w, width)
    y0 = _place(hole.y0, hole.height, h, height)
    return Box(x0, y0, x0 + w, y0 + h)


def crop_size(aspect: float, resolution: int) -> tuple[int, int]:
    """(width, height) with width / height ≈ `aspect`, area ≈ resolution², each a multiple of 8 (at least 8)."""
    root = math.sqrt(aspect)
    width = max(8, int(round(resolution * root / 8.0)) * 8)
    height = max(8, int(round(resolution / root / 8.0)) * 8)
    return width, height


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to (width, height): area averaging when shrinking (no aliasing), Lanczos-4 when enlarging (sharpest of
    OpenCV's interpolators), clipped back to [0, 1] because Lanczos overshoots at edges."""
    h, w = image.shape[:2]
    if (w, h) == tuple(size):
        return image.copy()
    if size[0] * size[1] <= w * h:
        return cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return np.clip(cv2.resize(image, size, interpolation=cv2.INTER_LANCZOS4), 0.0, 1.0)


def _resize_hole(hole: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a bool hole so every output pixel that touches a hole pixel is in the hole: area coverage > 0 when
    shrinking (a 1-px hole never vanishes), nearest when enlarging."""
    h, w = hole.shape
    if (w, h) == tuple(size):
        return hole.copy()
    src = hole.astype(np.float32)
    if size[0] * size[1] <= w * h:
        return cv2.resize(src, size, interpolation=cv2.INTER_AREA) > 0.0
    return cv2.resize(src, size, interpolation=cv2.INTER_NEAREST) > 0.5


def _inside(box: Box, height: int, width: int) -> tuple[slice, slice, slice, slice]:
    """(image rows, image cols, box rows, box cols) of the part of `box` inside the image."""
    iy0, iy1, ix0, ix1 = max(box.y0, 0), min(box.y1, height), max(box.x0, 0), min(box.x1, width)
    return (slice(iy0, iy1), slice(ix0, ix1), slice(iy0 - box.y0, iy1 - box.y0), slice(ix0 - box.x0, ix1 - box.x0))


def extract(image: np.ndarray, box: Box) -> np.ndarray:
    """The box's pixels of an (H, W, C) image; the part outside the image is reflect-padded."""
    height, width = image.shape[:2]
    rows, cols, _, _ = _inside(box, height, width)
    region = np.ascontiguousarray(image[rows, cols])
    pads = (rows.start - box.y0, box.y1 - rows.stop, cols.start - box.x0, box.x1 - cols.stop)
    if not any(pads):
        return region
    return cv2.copyMakeBorder(region, *pads, cv2.BORDER_REFLECT_101).reshape(box.height, box.width, -1)


def _all_finite(values: np.ndarray) -> bool:
    """Whether every value is finite, in one float64 sum instead of a per-element mask (a 12-megapixel photo is 36 M
    values): the sum of finite float32 values cannot overflow float64, and any NaN or infinity makes it non-finite."""
    return bool(np.isfinite(np.sum(values, dtype=np.float64)))


def _masks(mask: torch.Tensor, batch: int, height: int, width: int) -> np.ndarray:
    """The MASK as float32 (N, H, W), N = 1 or batch, values clamped to [0, 1]; shape and values checked."""
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise ValueError(f"mask has shape {tuple(mask.shape)}; expected a MASK (B, H, W) or (H, W)")
    if tuple(mask.shape[1:]) != (height, width):
        raise ValueError(f"mask is {mask.shape[2]}x{mask.shape[1]} but the image is {width}x{height}; use a mask "
                         "drawn on this image (or resize it to the image first)")
    if mask.shape[0] not in (1, batch):
        raise ValueError(f"mask batch {mask.shape[0]} does not match image batch {batch}; give one mask for all "
                         "images or one per image")
    m = mask.detach().to("cpu", torch.float32).numpy()
    if not _all_finite(m):
        raise ValueError("mask contains NaN or infinite values; fix the node that produced it")
    return np.clip(m, 0.0, 1.0)


def _image_array(image: torch.Tensor) -> np.ndarray:
    """The IMAGE as a float32 numpy view (no copy when it already is one); values are checked where they are used."""
    check_image(image)
    return image.detach().to("cpu", torch.float32).numpy()


def _check_finite(pixels: np.ndarray, what: str) -> None:
    if not _all_finite(pixels):
        raise ValueError(f"{what} contains NaN or infinite values; fix the node that produced it")


def crop_batch(image: torch.Tensor, mask: torch.Tensor, resolution: int, context: float, context_min: int,
               grow: int, feather: int,
               check: Callable[[], None] | None = None) -> tuple[torch.Tensor, torch.Tensor, StitchInfo]:
    """Crop every item around its grown hole and resize the crops to one common size.

    `mask` is one MASK for all images or one per image; the hole is where it is above 0.5. Items whose boxes differ
    get their own boxes, all widened to the aspect of the largest one so one crop size keeps every aspect. Returns
    the crops (B, h, w, 3), their masks (B, h, w) and the StitchInfo. A binary mask's crop mask is its grown hole
    (1). A soft mask's crop mask is the mask as drawn, resized like the crop, with the ring `grow` added raised to
    GROWN_SOFT_LEVEL: above 0.5 is the same grown hole as for the binary mask (what Apply's branch gets), and
    Apply's noise mask and Differential Diffusion see the edge the user drew. `check` is called between items
    (ComfyUI's interrupt poll).
    """
    if resolution < 8:
        raise ValueError(f"resolution {resolution} is below 8 px; use the branch's training size (512 SD1.5, "
                         "1024 SDXL)")
    if context < 0 or context_min < 0 or grow < 0 or feather < 0:
        raise ValueError(f"context {context}, context_min {context_min}, grow {grow} and feather {feather} must "
                         "not be negative")
    pixels = _image_array(image)
    batch, height, width = pixels.shape[:3]
    masks = _masks(mask, batch, height, width)
    holes = masks > MASK_THRESHOLD
    is_soft = bool(((masks > 0.0) & (masks < 1.0)).any())
    grown, hole_boxes = [], []
    for i, hole in enumerate(holes):
        if check is not None:
            check()
        g = grow_hole(hole, grow)
        box = hole_box(g)
        if box is None:
            which = "the mask" if holes.shape[0] == 1 else f"mask {i} of the batch"
            raise ValueError(f"{which} is empty: nothing to inpaint. Paint the region to generate in white "
                             "(mask = 1)")
        grown.append(g)
        hole_boxes.append(box)
    if len(grown) == 1 and batch > 1:
        grown, hole_boxes = grown * batch, hole_boxes * batch
    boxes = [context_box(b, (height, width), context, context_min, feather) for b in hole_boxes]
    if len(set(boxes)) > 1:
        largest = max(boxes, key=lambda b: b.width * b.height)
        aspect = largest.width / largest.height
        boxes = [context_box(b, (height, width), context, context_min, feather, aspect) for b in hole_boxes]
        aspect = sum(b.width / b.height for b in boxes) / len(boxes)
    else:
        aspect = boxes[0].width / boxes[0].height
    size = crop_size(aspect, resolution)
    crops = np.empty((batch, size[1], size[0], 3), np.float32)
    crop_holes = np.empty((batch, size[1], size[0]), np.float32)
    box_holes, box_soft = [], []
    for i in range(batch):
        if check is not None:
            check()
        box = boxes[i]
        region = extract(pixels[i, ..., :3], box)
        _check_finite(region, "image" if batch == 1 else f"image {i} of the batch")
        crops[i] = _resize(region, size)
        local = np.zeros((box.height, box.width), bool)
        rows, cols, brows, bcols = _inside(box, height, width)
        local[brows, bcols] = grown[i][rows, cols]
        crop_holes[i] = _resize_hole(local, size)
        box_holes.append(torch.from_numpy(local))
        if is_soft:
            soft = np.zeros((box.height, box.width), np.float32)
            soft[brows, bcols] = masks[i if masks.shape[0] > 1 else 0][rows, cols]
            crop_holes[i] = np.maximum(np.clip(_resize(soft, size), 0.0, 1.0), crop_holes[i] * GROWN_SOFT_LEVEL)
            box_soft.append(torch.from_numpy(soft))
    logger.debug("PainterNetCrop: %d item(s), boxes %s -> %dx%d", batch, boxes, *size)
    info = StitchInfo(image=image, boxes=tuple(boxes), holes=tuple(box_holes), crop_size=size, feather=int(feather),
                      soft=tuple(box_soft))
    return torch.from_numpy(crops), torch.from_numpy(crop_holes), info


def blend_weights(hole: np.ndarray, feather: int, inward: bool = False) -> np.ndarray:
    """Blend weight of the inpainted crop per pixel (exact Euclidean distances, OpenCV).

    Default: 1 inside the hole, falling linearly to 0 at `feather` + 1 px outside it: the band smooths the VAE's
    drift of the kept pixels around the hole. `inward`: 0 at the hole's edge, rising to 1 at `feather` + 1 px inside
    it: a colour step of the generated content sits right at the hole's edge (the sampler's mask reaches a little
    past it), so a multi-band blend can only fade it out where the inpainted image itself is smooth, inside.
    """
    outside = (~hole).astype(np.uint8)
    if not outside.any():
        return np.ones(hole.shape, np.float32)
    span = float(feather + 1)
    if not inward:
        d_out = cv2.distanceTransform(outside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        return np.clip(1.0 - d_out / span, 0.0, 1.0).astype(np.float32)
    d_in = cv2.distanceTransform(hole.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return np.clip(d_in / span, 0.0, 1.0).astype(np.float32)


def match_color(inpainted: np.ndarray, original: np.ndarray, hole: np.ndarray, feather: int) -> np.ndarray:
    """Match the inpainted region's per-channel mean and std to the original's (Reinhard et al. 2001's colour
    transfer), both measured in the same ring just outside the hole, where the two should agree: what differs there
    is the VAE's and the sampler's colour drift, which is then removed from the whole crop.

    The space is YCbCr (BT.601 luma/chroma) rather than Lab: it separates luminance from colour as Lab does (what
    makes per-channel statistics meaningful for natural images), but it is affine in RGB, so a uniform RGB drift is
    removed exactly; Lab's gamma leaves a colour-dependent residual (on the test scene 91 % of a shift removed in
    Lab, > 99 % in YCbCr). The std ratio is clamped to 0.5 … 2 so a flat ring cannot blow the hole's contrast up. A
    ring too small to measure (hole covering the image) leaves the crop unchanged."""
    outside = (~hole).astype(np.uint8)
    if not outside.any():
        return inpainted
    distance = cv2.distanceTransform(outside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    ring = (distance > 0) & (distance <= max(feather, RING_MIN_WIDTH))
    if int(ring.sum()) < RING_MIN_PIXELS:
        return inpainted
    src = cv2.cvtColor(np.ascontiguousarray(inpainted), cv2.COLOR_RGB2YCrCb)
    ref = cv2.cvtColor(np.ascontiguousarray(original), cv2.COLOR_RGB2YCrCb)
    mean_src, std_src = src[ring].mean(axis=0), src[ring].std(axis=0)
    mean_ref, std_ref = ref[ring].mean(axis=0), ref[ring].std(axis=0)
    ratio = np.where(std_src > 1e-3, std_ref / np.maximum(std_src, 1e-3), 1.0)
    ratio = np.clip(ratio, *STD_RATIO_RANGE).astype(np.float32)
    out = (src - mean_src) * ratio + mean_ref
    return np.clip(cv2.cvtColor(out.astype(np.float32), cv2.COLOR_YCrCb2RGB), 0.0, 1.0)


def _laplacian_levels(height: int, width: int, feather: int) -> int:
    by_size = int(math.floor(math.log2(max(min(height, width), 1)))) - 2
    by_band = int(math.floor(math.log2(feather + 1))) - 1
    return max(0, min(by_size, by_band, MAX_LAPLACIAN_LEVELS))


def laplacian_blend(inpainted: np.ndarray, original: np.ndarray, weights: np.ndarray, levels: int) -> np.ndarray:
    """Burt & Adelson multi-band blend (OpenCV pyramids): each frequency band of the two images is mixed with the
    weights blurred to that band's scale, so colour offsets fade out over wide distances while detail switches over
    within a few pixels."""
    if levels <= 0:
        return original + weights[..., None] * (inpainted - original)
    gauss_w = [weights]
    a, b = [inpainted], [original]
    for _ in range(levels):
        gauss_w.append(cv2.pyrDown(gauss_w[-1]))
        a.append(cv2.pyrDown(a[-1]))
        b.append(cv2.pyrDown(b[-1]))
    out = b[-1] + gauss_w[-1][..., None] * (a[-1] - b[-1])
    for level in range(levels - 1, -1, -1):
        size = (a[level].shape[1], a[level].shape[0])
        lap_a = a[level] - cv2.pyrUp(a[level + 1], dstsize=size)
        lap_b = b[level] - cv2.pyrUp(b[level + 1], dstsize=size)
        out = cv2.pyrUp(out, dstsize=size) + lap_b + gauss_w[level][..., None] * (lap_a - lap_b)
    return out


def _to_u8(image: np.ndarray) -> np.ndarray:
    return np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _clone_mask(hole: np.ndarray) -> np.ndarray:
    """The hole seamlessClone is given: grown by 1 px when it is thinner than 3 px (OpenCV's solve needs an inside)."""
    box = hole_box(hole)
    if box is not None and min(box.width, box.height) < 3:
        return grow_hole(hole, 1)
    return hole


def check_poisson_size(hole: np.ndarray, what: str = "the hole") -> None:
    """Refuse a poisson blend whose hole's bounding box would need more than POISSON_MAX_BYTES (ValueError naming
    the size, the budget and the alternatives), before any of that memory is spent."""
    box = hole_box(_clone_mask(hole))
    if box is not None and box.width * box.height > POISSON_MAX_PIXELS:
        need = box.width * box.height * POISSON_BYTES_PER_PIXEL / 2**30
        raise ValueError(f"blend poisson on {what} ({box.width}x{box.height} px box) would need about {need:.1f} GiB "
                         f"(limit {POISSON_MAX_BYTES / 2**30:.0f} GiB, {POISSON_MAX_PIXELS} px); use blend feather "
                         "or laplacian for a hole this large, or crop the image closer to the hole")


def poisson_correction(inpainted: np.ndarray, target: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """The smooth (harmonic) correction that OpenCV's `seamlessClone` (Pérez et al. 2003, normal clone) adds to the
    inpainted pixels so the hole meets `target` at its boundary while keeping its own gradients; returned as a float
    image so it can be added to the full-precision crop. At the image border (hole touching it) the boundary value
    is the inpainted pixel itself, so nothing is pulled towards pixels that do not exist.

    OpenCV solves only over the clone mask's bounding box, so only that box is copied (not the whole crop box, which
    holds the context as well); the result is 0 outside it."""
    pad = 2
    clone_mask = _clone_mask(hole)
    out = np.zeros(inpainted.shape, np.float32)
    box = hole_box(clone_mask)
    if box is None:
        return out
    rows, cols = slice(box.y0, box.y1), slice(box.x0, box.x1)
    inpainted, target, clone_mask = inpainted[rows, cols], target[rows, cols], clone_mask[rows, cols]
    src = cv2.copyMakeBorder(_to_u8(inpainted), pad, pad, pad, pad, cv2.BORDER_REFLECT_101)
    dst = src.copy()
    dst[pad:-pad, pad:-pad] = _to_u8(target)
    mask = np.zeros(src.shape[:2], np.uint8)
    mask[pad:-pad, pad:-pad] = clone_mask.astype(np.uint8) * 255
    x, y, w, h = cv2.boundingRect(mask)
    cloned = cv2.seamlessClone(src, dst, mask, (x + w // 2, y + h // 2), cv2.NORMAL_CLONE)
    del dst, mask
    correction = out[rows, cols]
    np.subtract(cloned[pad:-pad, pad:-pad], src[pad:-pad, pad:-pad], out=correction, dtype=np.float32)
    correction /= 255.0
    return out


def soft_weights(weights: np.ndarray, soft: np.ndarray) -> np.ndarray:
    """The feather band raised to a soft mask's edge: max(linear ramp, mask) wherever the ramp is above 0, so the
    crop is mixed in as far as the sampler (Differential Diffusion) changed it; 0 beyond grow + feather whatever the
    mask says (the exactness rule), with a warning when the mask's soft edge reaches past that."""
    band = weights > 0.0
    if bool((soft[~band] >= SOFT_VISIBLE).any()):
        logger.warning("PainterNetStitch: the mask's soft edge reaches past grow + feather; it is cut there (pixels "
                       "outside the band are never changed). Raise feather to cover the mask's feathering")
    return np.where(band, np.maximum(weights, soft), np.float32(0.0)).astype(np.float32)


def stitch_into(original: np.ndarray, crop: np.ndarray, box: Box, hole: np.ndarray, feather: int, blend: str,
                color_match: str, soft: np.ndarray | None = None) -> None:
    """Put one inpainted crop back into its (H, W, C) original, in place.

    Only pixels inside the grown hole or its feather band are written; every other pixel is the original's, bit for
    bit. feather: the crop resized back, mixed with the original across the band outside the hole (hard paste at
    feather 0); inside the hole it is the crop exactly. laplacian: a multi-band blend whose weights rise from 0 at
    the hole's edge to 1 at `feather` + 1 px inside (nothing outside the hole changes). poisson: the hole cloned
    into the original by a Poisson solve (OpenCV seamlessClone): its gradients kept, its colours pulled to meet the
    original at the hole's edge (nothing outside the hole changes; the band is not needed).

    `soft` (box-sized, the user's soft mask) raises the feather band to the mask's edge where that is higher
    (`soft_weights`); laplacian and poisson change only the hole, which a soft edge outside it does not affect."""
    if blend not in BLEND_MODES:
        raise ValueError(f"unknown blend {blend[:200]!r}; use one of {', '.join(BLEND_MODES)}")
    if color_match not in COLOR_MATCH_MODES:
        raise ValueError(f"unknown color_match {color_match[:200]!r}; use one of {', '.join(COLOR_MATCH_MODES)}")
    height, width = original.shape[:2]
    rows, cols, brows, bcols = _inside(box, height, width)
    inpainted = _resize(np.ascontiguousarray(crop[..., :3], np.float32), (box.width, box.height))[brows, bcols]
    region = np.ascontiguousarray(original[rows, cols, :3], np.float32)
    hole = hole[brows, bcols]
    if color_match == "mean_std":
        inpainted = match_color(inpainted, region, hole, feather)
    target = original[rows, cols, :3]
    if blend == "poisson":
        correction = poisson_correction(inpainted, region, hole)
        target[hole] = np.clip(inpainted[hole] + correction[hole], 0.0, 1.0)
        return
    weights = blend_weights(hole, feather, inward=blend == "laplacian")
    if soft is not None and blend == "feather":
        weights = soft_weights(weights, soft[brows, bcols])
    support = weights > 0.0
    if blend == "laplacian":
        result = laplacian_blend(inpainted, region, weights, _laplacian_levels(*hole.shape, feather))
    else:
        result = region + weights[..., None] * (inpainted - region)
    target[support] = np.clip(result[support], 0.0, 1.0)


def stitch_batch(info: StitchInfo, image: torch.Tensor, blend: str, color_match: str,
                 check: Callable[[], None] | None = None) -> torch.Tensor:
    """Stitch a batch of inpainted crops (B, h, w, C) back into `info.image`; `check` is called between items."""
    crops = _image_array(image)
    _check_finite(crops, "image")
    batch = len(info.boxes)
    if crops.shape[0] != batch:
        raise ValueError(f"image batch {crops.shape[0]} does not match the {batch} crop(s) in stitch; connect the "
                         "decoded image of the sampling that started from this PainterNetCrop's image")
    size = (crops.shape[2], crops.shape[1])
    if size != tuple(info.crop_size):
        raise ValueError(f"image is {size[0]}x{size[1]} but this stitch's crops are {info.crop_size[0]}x"
                         f"{info.crop_size[1]}; connect the stitch output of the PainterNetCrop whose image was "
                         "inpainted")
    if blend == "poisson":
        for i, hole in enumerate(info.holes):
            check_poisson_size(hole.numpy(), "the hole" if batch == 1 else f"the hole of item {i}")
    out = info.image.detach().to("cpu", torch.float32, copy=True).contiguous()
    pixels = out.numpy()
    for i in range(batch):
        if check is not None:
            check()
        soft = info.soft[i].numpy() if info.soft else None
        stitch_into(pixels[i], crops[i], info.boxes[i], info.holes[i].numpy(), info.feather, blend, color_match, soft)
    return out

