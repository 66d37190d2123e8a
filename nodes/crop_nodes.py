"""PainterNetCrop and PainterNetStitch: inpaint a context crop at the branch's training size and put it back.

Thin adapters over `painternet_core.crop`. ComfyUI range-checks widget values only when they are typed in, not when
they arrive through a link, so both nodes check their inputs against their schema (`limits.check_inputs`); errors
name the node, quote at most ~200 characters of the bad value and say what to do. Both poll ComfyUI's interrupt flag
between batch items.
"""
from __future__ import annotations

from typing import Any

from comfy_api.v0_0_2 import io

from painternet_core import crop

from .limits import check_inputs, interrupt_poll, widget_check
from .painternet_nodes import CATEGORY, PainterNet, PainterNetStitchInfo

MAX_SIDE = 8192
MAX_PX = 4096
MAX_CONTEXT = 16.0


class PainterNetCrop(io.ComfyNode):
    """Cuts the grown hole plus context out of each image and resizes it to about resolution² pixels."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PainterNetCrop", display_name="PainterNet Crop", category=CATEGORY,
            description=("Inpaint a large photo at the branch's training size: cuts the (grown) hole plus "
                         "surrounding context out of each image and resizes it to about 512² (SD1.5) or 1024² "
                         "(SDXL). Sample the crop, decode it and give it to PainterNet Stitch, which changes nothing "
                         "outside the hole and its feather band."),
            inputs=[
                io.Image.Input("image", tooltip="The full-size image(s) to inpaint."),
                io.Mask.Input("mask", tooltip=(
                    "White (1) = region to generate, at the image's size; one mask for all images or one per image. "
                    "The hole is where it is above 0.5; a soft edge is kept for the sampler and widens Stitch's "
                    "feather band (never past grow + feather).")),
                io.Int.Input("resolution", default=0, min=0, max=MAX_SIDE, step=8, tooltip=(
                    "Side of the square whose area the crop is resized to. 0 = the branch's training size (512 "
                    "SD1.5, 1024 SDXL; needs painternet).")),
                io.Float.Input("context", default=0.5, min=0.0, max=MAX_CONTEXT, step=0.05, tooltip=(
                    "Surrounding image added on each side, as a fraction of the grown hole's width (left/right) or "
                    "height (top/bottom); at least context_min px.")),
                io.Int.Input("grow", default=8, min=0, max=MAX_PX, step=1, tooltip=(
                    "Pixels the hole is dilated by before cropping (a disc of this radius), so its edge lies on "
                    "background rather than on the object's outline.")),
                io.Int.Input("feather", default=16, min=0, max=MAX_PX, step=1, tooltip=(
                    "Width in px of the blend band PainterNet Stitch uses: outside the hole for feather, inside its "
                    "rim for laplacian. Pixels farther from the hole are never changed.")),
                PainterNet.Input("painternet", optional=True, tooltip=(
                    "The branch: with resolution 0 its family picks the training size (512 SD1.5, 1024 SDXL).")),
                io.Int.Input("context_min", default=64, min=0, max=MAX_SIDE, step=1, optional=True, tooltip=(
                    "Minimum context in px on each side of the hole (clipped to the image), so a tiny hole still "
                    "sees its surroundings.")),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip=(
                    "The crops, resized so their area is about resolution² (aspect kept, sides multiples of 8): feed "
                    "them to Apply PainterNet.")),
                io.Mask.Output(display_name="mask", tooltip=(
                    "The grown hole in each crop (1 = generate). A soft (feathered) mask keeps its soft values (the "
                    "ring grow adds is set just above 0.5, so above 0.5 it is the grown hole), for Apply "
                    "PainterNet's noise_mask and Differential Diffusion.")),
                PainterNetStitchInfo.Output(display_name="stitch", tooltip=(
                    "What PainterNet Stitch needs to put the inpainted crops back into the original images.")),
            ],
        )

    @classmethod
    def execute(cls, image: Any, mask: Any, resolution: int, context: float, grow: int, feather: int,
                painternet: Any = None, context_min: int = 64) -> io.NodeOutput:
        """Crop, resize and record the boxes; every limit is checked here because linked inputs skip ComfyUI's."""
        check_inputs(cls, locals())
        node = "PainterNetCrop"
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
            return io.NodeOutput(*crop.crop_batch(image, mask, resolution, float(context), context_min, grow,
                                                  feather, check=interrupt_poll()))
        except ValueError as err:
            raise ValueError(f"{node}: {err}") from err


class PainterNetStitch(io.ComfyNode):
    """Puts inpainted crops back into the full-size originals, changing only the grown hole and its band."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PainterNetStitch", display_name="PainterNet Stitch", category=CATEGORY,
            description=("Puts the decoded inpainted crops back into the original images. blend: feather (linear "
                         "band outside the hole), laplacian (multi-band blend inside the hole's rim) or poisson (the "
                         "hole's colours solved to meet its surroundings). color_match mean_std first matches the "
                         "crop's colours to the original's in a ring around the hole (YCbCr mean and std)."),
            inputs=[
                PainterNetStitchInfo.Input("stitch", tooltip="From the PainterNetCrop whose image was inpainted."),
                io.Image.Input("image", tooltip="The decoded inpainted crops (VAE Decode), batch aligned with the "
                                                "crop's."),
                io.Combo.Input("blend", options=list(crop.BLEND_MODES), default="feather", tooltip=(
                    "feather: linear blend across the band outside the hole (hides the VAE's drift of kept pixels). "
                    "laplacian: multi-band blend over the hole's inner rim (fades a colour step of the new "
                    "content). poisson: OpenCV seamlessClone of the hole (removes a colour step, keeps the new "
                    "content's detail).")),
                io.Combo.Input("color_match", options=list(crop.COLOR_MATCH_MODES), default="none", tooltip=(
                    "mean_std: shift and scale the crop's YCbCr channels so a ring just outside the hole has the "
                    "original's mean and std (Reinhard colour transfer). none: as decoded.")),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip=(
                "The full-size images: the original pixels everywhere outside the grown hole and its feather band, "
                "bit for bit."))],
        )

    @classmethod
    def validate_inputs(cls, blend: str, color_match: str) -> bool | str:
        return widget_check(cls, locals())

    @classmethod
    def execute(cls, stitch: Any, image: Any, blend: str, color_match: str) -> io.NodeOutput:
        """Validate the choices and the pairing, then stitch every item back."""
        check_inputs(cls, locals())
        node = "PainterNetStitch"
        if not isinstance(stitch, crop.StitchInfo):
            raise ValueError(f"{node}: stitch must come from a PainterNetCrop node, got {type(stitch).__name__}")
        try:
            return io.NodeOutput(crop.stitch_batch(stitch, image, blend, color_match, check=interrupt_poll()))
        except ValueError as err:
            raise ValueError(f"{node}: {err}") from err


NODES: list[type[io.ComfyNode]] = [PainterNetCrop, PainterNetStitch]
