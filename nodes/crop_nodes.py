"""PainterNetCrop and PainterNetStitch: inpaint a context crop at the branch's training size and put it back.

Thin adapters over `painternet_core.crop`. ComfyUI range-checks widget values only when they are typed in, not when
they arrive through a link, so each node checks its own limits; errors name the node, quote at most ~200 characters
of the bad value and say what to do. Both poll ComfyUI's interrupt flag between batch items.
"""
from __future__ import annotations

import math
from typing import Any

from painternet_core import crop
from painternet_core.errors import quote

from .limits import interrupt_poll

CATEGORY = "inpaint/PainterNet"
MAX_SIDE = 8192
MAX_PX = 4096
MAX_CONTEXT = 16.0
def _int_in(node: str, name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{node}: {name} must be an integer in {low}..{high}, got {quote(value)}")
    return value


class PainterNetCrop:
    """Cuts the grown hole plus context out of each image and resizes it to about resolution² pixels."""

    CATEGORY = CATEGORY
    FUNCTION = "crop"
    RETURN_TYPES = ("IMAGE", "MASK", "PAINTERNET_STITCH")
    RETURN_NAMES = ("image", "mask", "stitch")
    OUTPUT_TOOLTIPS = (
        "The crops, resized so their area is about resolution² (aspect kept, sides multiples of 8): feed them to "
        "Apply PainterNet.",
        "The grown hole in each crop (1 = generate). A soft (feathered) mask keeps its soft values (the ring grow "
        "adds is set just above 0.5, so above 0.5 it is the grown hole), for Apply PainterNet's noise_mask and "
        "Differential Diffusion.",
        "What PainterNet Stitch needs to put the inpainted crops back into the original images.")
    DESCRIPTION = ("Inpaint a large photo at the branch's training size: cuts the (grown) hole plus surrounding "
                   "context out of each image and resizes it to about 512² (SD1.5) or 1024² (SDXL). Sample the crop, "
                   "decode it and give it to PainterNet Stitch, which changes nothing outside the hole and its "
                   "feather band.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict[str, Any]]:
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The full-size image(s) to inpaint."}),
                "mask": ("MASK", {"tooltip": "White (1) = region to generate, at the image's size; one mask for all "
                                             "images or one per image. The hole is where it is above 0.5; a soft "
                                             "edge is kept for the sampler and widens Stitch's feather band (never "
                                             "past grow + feather)."}),
                "resolution": ("INT", {"default": 0, "min": 0, "max": MAX_SIDE, "step": 8,
                                       "tooltip": "Side of the square whose area the crop is resized to. 0 = the "
                                                  "branch's training size (512 SD1.5, 1024 SDXL; needs painternet)."}),
                "context": ("FLOAT", {"default": 0.5, "min": 0.0, "max": MAX_CONTEXT, "step": 0.05,
                                      "tooltip": "Surrounding image added on each side, as a fraction of the grown "
                                                 "hole's width (left/right) or height (top/bottom); at least "
                                                 "context_min px."}),
                "grow": ("INT", {"default": 8, "min": 0, "max": MAX_PX, "step": 1,
                                 "tooltip": "Pixels the hole is dilated by before cropping (a disc of this radius), so "
                                            "its edge lies on background rather than on the object's outline."}),
                "feather": ("INT", {"default": 16, "min": 0, "max": MAX_PX, "step": 1,
                                    "tooltip": "Width in px of the blend band PainterNet Stitch uses: outside the "
                                               "hole for feather, inside its rim for laplacian. Pixels farther "
                                               "from the hole are never changed."}),
            },
            "optional": {
                "painternet": ("PAINTERNET", {"tooltip": "The branch: with resolution 0 its family picks the "
                                                         "training size (512 SD1.5, 1024 SDXL)."}),
                "context_min": ("INT", {"default": 64, "min": 0, "max": MAX_SIDE, "step": 1,
                                        "tooltip": "Minimum context in px on each side of the hole (clipped to the "
                                                   "image), so a tiny hole still sees its surroundings."}),
            },
        }

    def crop(self, image: Any, mask: Any, resolution: int, context: float, grow: int, feather: int,
             painternet: Any = None, context_min: int = 64) -> tuple[Any, Any, crop.StitchInfo]:
        """Crop, resize and record the boxes; every limit is checked here because linked inputs skip ComfyUI's."""
        node = "PainterNetCrop"
        resolution = _int_in(node, "resolution", resolution, 0, MAX_SIDE)
        grow = _int_in(node, "grow", grow, 0, MAX_PX)
        feather = _int_in(node, "feather", feather, 0, MAX_PX)
        context_min = _int_in(node, "context_min", context_min, 0, MAX_SIDE)
        if isinstance(context, bool) or not isinstance(context, (int, float)) or not (
                math.isfinite(context) and 0.0 <= context <= MAX_CONTEXT):
            raise ValueError(f"{node}: context must be a number in 0..{MAX_CONTEXT}, got {quote(context)}")
        if resolution == 0:
            config = getattr(painternet, "config", None)
            family = getattr(config, "family", None)
            if family not in crop.FAMILY_RESOLUTION:
                raise ValueError(f"{node}: resolution is 0 (from the branch) but no PainterNet branch is connected; "
                                 "connect Load PainterNet's output to painternet or set resolution (e.g. 512)")
            resolution = crop.FAMILY_RESOLUTION[family]
        elif resolution < 64:
            raise ValueError(f"{node}: resolution {resolution} is too small for a diffusion model; use 0 (the "
                             "branch's size) or at least 64")
        try:
            return crop.crop_batch(image, mask, resolution, float(context), context_min, grow, feather,
                                   check=interrupt_poll())
        except ValueError as err:
            raise ValueError(f"{node}: {err}") from err


class PainterNetStitch:
    """Puts inpainted crops back into the full-size originals, changing only the grown hole and its band."""

    CATEGORY = CATEGORY
    FUNCTION = "stitch"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The full-size images: the original pixels everywhere outside the grown hole and its "
                       "feather band, bit for bit.",)
    DESCRIPTION = ("Puts the decoded inpainted crops back into the original images. blend: feather (linear band "
                   "outside the hole), laplacian (multi-band blend inside the hole's rim) or poisson (the hole's "
                   "colours solved to meet its surroundings). color_match mean_std first matches the crop's colours "
                   "to the original's in a ring around the hole (YCbCr mean and std).")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict[str, Any]]:
        return {
            "required": {
                "stitch": ("PAINTERNET_STITCH", {"tooltip": "From the PainterNetCrop whose image was inpainted."}),
                "image": ("IMAGE", {"tooltip": "The decoded inpainted crops (VAE Decode), batch aligned with the "
                                               "crop's."}),
                "blend": (list(crop.BLEND_MODES), {
                    "default": "feather",
                    "tooltip": "feather: linear blend across the band outside the hole (hides the VAE's drift of "
                               "kept pixels). laplacian: multi-band blend over the hole's inner rim (fades a "
                               "colour step of the new content). poisson: OpenCV seamlessClone of the hole (removes "
                               "a colour step, keeps the new content's detail)."}),
                "color_match": (list(crop.COLOR_MATCH_MODES), {
                    "default": "none",
                    "tooltip": "mean_std: shift and scale the crop's YCbCr channels so a ring just outside the "
                               "hole has the original's mean and std (Reinhard colour transfer). none: as decoded."}),
            },
        }

    def stitch(self, stitch: Any, image: Any, blend: str, color_match: str) -> tuple[Any]:
        """Validate the choices and the pairing, then stitch every item back."""
        node = "PainterNetStitch"
        if not isinstance(stitch, crop.StitchInfo):
            raise ValueError(f"{node}: stitch must come from a PainterNetCrop node, got {type(stitch).__name__}")
        if blend not in crop.BLEND_MODES:
            raise ValueError(f"{node}: unknown blend {quote(blend)}; use one of {', '.join(crop.BLEND_MODES)}")
        if color_match not in crop.COLOR_MATCH_MODES:
            raise ValueError(f"{node}: unknown color_match {quote(color_match)}; use one of "
                             f"{', '.join(crop.COLOR_MATCH_MODES)}")
        try:
            return (crop.stitch_batch(stitch, image, blend, color_match, check=interrupt_poll()),)
        except ValueError as err:
            raise ValueError(f"{node}: {err}") from err


NODE_CLASS_MAPPINGS = {"PainterNetCrop": PainterNetCrop, "PainterNetStitch": PainterNetStitch}
NODE_DISPLAY_NAME_MAPPINGS = {"PainterNetCrop": "PainterNet Crop", "PainterNetStitch": "PainterNet Stitch"}
