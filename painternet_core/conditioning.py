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


def normalize_mask(mask: torch.Tensor, height: int, width: int, batch: int, *,
                   check_values: bool = True) -> torch.Tensor:
    """Bring a MASK-like tensor to (B,1,H,W) binary float at pixel size.

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
    return (mask > MASK_THRESHOLD).float()


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
