"""Branch-condition preparation (DESIGN §2), the one function training and the Apply node share.

Keeping it single is what makes a checkpoint trained here behave the same in ComfyUI: the same fill value, the same
mask binarisation and resize rule, the same polarity handling, and the latent scaled the same way.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .config import PainterNetConfig

# Soft masks (feathered, resized) are binarised here: the branch was trained on binary holes.
MASK_THRESHOLD = 0.5


# What Apply puts in its LATENT's noise_mask: the user's mask with its soft values (what Differential Diffusion and the
# sampler's blend read) or the binary hole the branch sees.
NOISE_MASK_MODES: tuple[str, ...] = ("soft", "binary")


def resize_mask(mask: torch.Tensor, height: int, width: int, batch: int, *,
                check_values: bool = True) -> torch.Tensor:
    """Bring a MASK-like tensor to (B,1,H,W) float at pixel size, soft values kept and clamped to [0, 1].

    Accepts (H,W), (B,H,W) or (B,1,H,W). A mask of another size is resized (nearest, the usual ComfyUI behaviour for
    masks drawn on a resized preview) only when its aspect ratio matches; otherwise the caller gets an error naming
    both sizes. A batch of 1 broadcasts; any other batch mismatch is an error. `check_values` refuses NaN/inf values
    (see `prepare_condition`).
    """
    if mask.ndim == 2:
        mask = mask[None, None]
    elif mask.ndim == 3:
        mask = mask[:, None]
    elif mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask has shape {tuple(mask.shape)}; expected (H,W), (B,H,W) or (B,1,H,W)")
    mask = mask.float()
    if mask.numel() == 0:
        raise ValueError(f"mask has shape {tuple(mask.shape)} (no pixels); connect a mask drawn on the image")
    if check_values and not torch.isfinite(mask).all():
        raise ValueError("mask contains NaN or infinite values; fix the node that produced it")
    mh, mw = mask.shape[-2:]
    if (mh, mw) != (height, width):
        if abs(mh * width - mw * height) > max(mh, mw, height, width):
            raise ValueError(f"mask is {mw}x{mh} but the image is {width}x{height} (different aspect ratio); "
                             "resize or crop the mask to the image first")
        mask = F.interpolate(mask, size=(height, width), mode="nearest")
    if mask.shape[0] != batch:
        if mask.shape[0] != 1:
            raise ValueError(f"mask batch {mask.shape[0]} does not match image batch {batch}; "
                             "give one mask or one per image")
        mask = mask.expand(batch, -1, -1, -1)
    return mask.clamp(0.0, 1.0)


def normalize_mask(mask: torch.Tensor, height: int, width: int, batch: int, *,
                   check_values: bool = True) -> torch.Tensor:
    """`resize_mask` binarised at 0.5: the hole the branch and its condition use, (B,1,H,W) in {0, 1}."""
    return (resize_mask(mask, height, width, batch, check_values=check_values) > MASK_THRESHOLD).float()


def inpaint_inputs(image: torch.Tensor, mask: torch.Tensor, multiple: int,
                   noise_mask: str = "soft") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply's three pixel-space inputs from a ComfyUI IMAGE (B,H,W,C) and MASK: the RGB pixels (B,3,H,W) cropped
    to a multiple of `multiple`, the binary hole (B,1,H,W) for the branch condition, and the sampler's noise mask.

    The branch was trained on binary holes, so its condition always gets the binarised mask; the sampler's noise
    mask keeps what the user drew (`soft`: values clamped to [0, 1], resized and cropped the same way), which is what
    Differential Diffusion needs for a graded edge. `binary` gives the sampler the hole too (the behaviour before soft
    masks were kept)."""
    if noise_mask not in NOISE_MASK_MODES:
        raise ValueError(f"noise_mask {str(noise_mask)[:200]!r} is not one of {', '.join(NOISE_MASK_MODES)}")
    batch, height, width, _ = check_image(image)
    pixels = image[..., :3].movedim(-1, 1)
    soft = resize_mask(mask.to(pixels.device), height, width, batch)
    pixels, soft = crop_to_multiple(pixels, soft, multiple)
    hole = (soft > MASK_THRESHOLD).float()
    return pixels, hole, (soft if noise_mask == "soft" else hole)


def check_image(image: torch.Tensor, channels: tuple[int, ...] = (3, 4)) -> tuple[int, int, int, int]:
    """(B, H, W, C) of a ComfyUI IMAGE, refusing (ValueError naming the shape and the fix) anything a node would
    otherwise fail on deep inside with an IndexError or a library's TypeError: not a tensor, not 4-D, an empty batch
    or side, or a channel count other than `channels` (RGB, RGBA; alpha is ignored)."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        found = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be an IMAGE tensor (B, H, W, C), got {found}; connect an image output "
                         "(e.g. Load Image)")
    batch, height, width, count = (int(v) for v in image.shape)
    if batch == 0 or height == 0 or width == 0:
        raise ValueError(f"image batch is empty (shape {(batch, height, width, count)}): nothing to work on; "
                         "check the node that produced it (e.g. a batch split or a filter that kept no image)")
    if count not in channels:
        names = " or ".join([", ".join(str(c) for c in channels[:-1]), str(channels[-1])] if len(channels) > 1
                            else [str(channels[0])])
        raise ValueError(f"image has {count} channel{'' if count == 1 else 's'} (shape {(batch, height, width, count)}); "
                         f"expected {names} "
                         "(RGB / RGBA); convert it first (e.g. split off the extra channels)")
    return batch, height, width, count


def crop_to_multiple(image: torch.Tensor, mask: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre-crop image (B,C,H,W) and mask (B,1,H,W) to a multiple of the VAE's downscale, as ComfyUI's
    VAEEncodeForInpaint does, so the latent covers the same pixels the mask describes."""
    h, w = image.shape[-2:]
    ch, cw = (h // multiple) * multiple, (w // multiple) * multiple
    if ch == 0 or cw == 0:
        raise ValueError(f"image is {w}x{h} px; PainterNet needs at least {multiple}x{multiple} px")
    top, left = (h % multiple) // 2, (w % multiple) // 2
    return image[..., top:top + ch, left:left + cw], mask[..., top:top + ch, left:left + cw]


def masked_image(image: torch.Tensor, mask: torch.Tensor, fill: float) -> torch.Tensor:
    """image (B,3,H,W) in [0,1], mask (B,1,H,W) binary, 1 = hole: hole pixels replaced by `fill`."""
    return image * (1.0 - mask) + fill * mask


def latent_mask(mask: torch.Tensor, size: tuple[int, int], config: PainterNetConfig) -> torch.Tensor:
    """The mask channel at latent size, by the rule the checkpoint was trained with, in its polarity."""
    if config.mask_resize == "area":
        m = F.interpolate(mask, size=size, mode="area")
    else:
        m = F.interpolate(mask, size=size, mode="nearest")
    return 1.0 - m if config.mask_polarity == "known" else m


def prepare_condition(
    image: torch.Tensor,
    mask: torch.Tensor,
    encode: Callable[[torch.Tensor], torch.Tensor],
    config: PainterNetConfig,
    *,
    check_values: bool = True,
) -> torch.Tensor:
    """Build `cat([z_masked, m_latent])` (B,5,h,w); the sampler's z_t is prepended per step.

    `image` is (B,3,H,W) in [0,1]; `mask` is MASK-like with 1 = region to generate; `encode` maps a (B,3,H,W) [0,1]
    image to a *scaled* latent (ComfyUI: VAE encode + latent_format.process_in; diffusers: encode × scaling_factor).

    `check_values` refuses NaN/inf pixels or mask values and an empty hole, the checks for untrusted input at the node
    boundary (the Apply node, the inference CLI). Each reads a value back from the device, so the trainer, whose
    batches its data pipeline has already checked, passes False and pays no device sync per step.
    """
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image has shape {tuple(image.shape)}; expected (B,3,H,W)")
    if check_values and not torch.isfinite(image).all():
        raise ValueError("image contains NaN or infinite values; fix the node that produced it")
    b, _, h, w = image.shape
    m = normalize_mask(mask.to(image.device), h, w, b, check_values=check_values)
    if check_values and float(m.max()) == 0.0:
        raise ValueError("mask is empty: nothing to inpaint. Paint the region to generate in white (mask = 1)")
    z = encode(masked_image(image, m, config.masked_fill))
    return torch.cat([z, latent_mask(m, tuple(z.shape[-2:]), config).to(z.dtype)], dim=1)
