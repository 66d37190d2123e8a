"""PainterNetLoader and PainterNetApply: thin V3 nodes over `branch.py`, `injection.py` and the core."""
from __future__ import annotations

import logging
from typing import Any

from comfy_api.v0_0_2 import io

from painternet_core.conditioning import NOISE_MASK_MODES

from .limits import check_inputs, widget_check

CATEGORY = "inpaint/PainterNet"
# The socket types the pack adds: the loaded branch, and what Crop hands to Stitch.
PainterNet = io.Custom("PAINTERNET")
PainterNetStitchInfo = io.Custom("PAINTERNET_STITCH")
logger = logging.getLogger("painternet")
# Where branches are listed from: the pack's folder, then models/inpaint, where ComfyUI-BrushNet users keep BrushNet and
# PowerPaint files (registered in the pack's __init__.py), so a migrating user moves nothing.
BRANCH_FOLDERS = ("painternet", "inpaint")
BRANCH_REUSE = ("off", "every_2", "every_3", "adaptive")


def branch_reuse_rule(name: str) -> Any:
    """The BranchReuse behind each `branch_reuse` choice (None: the branch runs on every step)."""
    from painternet_core.reuse import reuse_preset

    return reuse_preset(name)


def branch_files() -> list[str]:
    """Files of models/painternet, then those of models/inpaint not already listed."""
    import folder_paths

    names: list[str] = []
    for folder in BRANCH_FOLDERS:
        if folder in folder_paths.folder_names_and_paths:
            names += [n for n in folder_paths.get_filename_list(folder) if n not in names]
    return names


def branch_path(name: str) -> str | None:
    import folder_paths

    for folder in BRANCH_FOLDERS:
        if folder in folder_paths.folder_names_and_paths:
            path = folder_paths.get_full_path(folder, name)
            if path is not None:
                return path
    return None


class PainterNetLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PainterNetLoader", display_name="Load PainterNet", category=CATEGORY,
            description="Loads a PainterNet branch for SD1.5 or SDXL.",
            inputs=[
                io.Combo.Input("painternet_name", options=branch_files(), tooltip=(
                    "PainterNet (or diffusers BrushNet / PowerPaint-CA) branch from models/painternet or "
                    "models/inpaint (where ComfyUI-BrushNet keeps them). "
                    "Only .safetensors files load; pickle files are refused with a conversion command.")),
                io.Combo.Input("dtype", options=["auto", "fp16", "bf16", "fp32", "fp8_e4m3fn", "fp8_e5m2"],
                               default="auto", tooltip=(
                    "Weight dtype of the branch. auto follows ComfyUI's choice for the device (fp32 on CPU). "
                    "fp8_e4m3fn / fp8_e5m2 store the weights in 8 bits (half of fp16) and compute in the dtype "
                    "ComfyUI picks for the device, as UNETLoader's weight_dtype does; less exact.")),
            ],
            outputs=[PainterNet.Output(display_name="painternet",
                                       tooltip="The loaded branch, to plug into PainterNetApply.")],
        )

    @classmethod
    def validate_inputs(cls, painternet_name: str, dtype: str) -> bool | str:
        return widget_check(cls, locals())

    @classmethod
    def execute(cls, painternet_name: str, dtype: str) -> io.NodeOutput:
        check_inputs(cls, locals())
        from .branch import load_painternet

        path = branch_path(painternet_name)
        if path is None:
            raise FileNotFoundError(f"PainterNet file {painternet_name[:200]!r} not found in models/painternet or "
                                    "models/inpaint; refresh the node list or copy the file there")
        return io.NodeOutput(load_painternet(path, dtype=dtype))


class PainterNetApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PainterNetApply", display_name="Apply PainterNet", category=CATEGORY,
            description="Patches a PainterNet branch into the model's UNet and prepares the inpainting latent.",
            inputs=[
                io.Model.Input("model", tooltip="Any SD1.5 or SDXL checkpoint's model (fine-tunes included) of the "
                                                "branch's family."),
                io.Vae.Input("vae", tooltip="The VAE that encodes the image and the masked image."),
                io.Image.Input("image", tooltip="The image to inpaint. Cropped to a multiple of 8 pixels if needed."),
                io.Mask.Input("mask", tooltip=(
                    "White (1) = region to generate. Resized to the image if the aspect ratio matches. The branch "
                    "sees it binarised at 0.5 (the hole it was trained on); the latent's noise_mask keeps its soft "
                    "values (see noise_mask).")),
                PainterNet.Input("painternet", tooltip="Branch from PainterNetLoader."),
                io.Conditioning.Input("positive", tooltip="Passed through; describe the masked region (local "
                                                          "prompt)."),
                io.Conditioning.Input("negative", tooltip="Passed through."),
                io.Float.Input("scale", default=1.0, min=0.0, max=10.0, step=0.01, tooltip=(
                    "Preservation scale w: multiplies every layer and attention residual. 0 disables the branch "
                    "(it is then not run at all).")),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress at which the branch starts acting."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress after which the branch stops (and is not run)."),
                io.Combo.Input("noise_mask", options=list(NOISE_MASK_MODES), default="soft", optional=True, tooltip=(
                    "The mask put in the output latent's noise_mask (what the sampler and Differential Diffusion "
                    "read). soft: the mask as drawn, values in [0, 1] kept, so a feathered mask gives Differential "
                    "Diffusion a graded edge. binary: the hole the branch sees (0.5 threshold). The branch always "
                    "gets the binary hole.")),
                io.Combo.Input("branch_reuse", options=list(BRANCH_REUSE), default="off", optional=True, tooltip=(
                    "Run the branch on some steps only and reuse its last residuals on the others (faster; off = "
                    "every step, exact). every_2 / every_3: every 2nd / 3rd step of the window. adaptive: every 3rd "
                    "step, and sooner when the noisy latent moved more than 5% since the branch last ran.")),
            ],
            outputs=[
                io.Model.Output(display_name="model",
                                tooltip="The model with the branch attached (the input model is left untouched)."),
                io.Conditioning.Output(display_name="positive", tooltip="Positive conditioning, unchanged."),
                io.Conditioning.Output(display_name="negative", tooltip="Negative conditioning, unchanged."),
                io.Latent.Output(display_name="latent", tooltip=(
                    "The encoded image with noise_mask (the mask as drawn, or the binary hole: see noise_mask): "
                    "sample it with denoise 1.0 to keep the unmasked area.")),
            ],
        )

    @classmethod
    def validate_inputs(cls, noise_mask: str | None = None, branch_reuse: str | None = None) -> bool | str:
        return widget_check(cls, locals())

    @classmethod
    def execute(cls, model: Any, vae: Any, image: Any, mask: Any, painternet: Any, positive: Any, negative: Any,
                scale: float, start_percent: float, end_percent: float, noise_mask: str = "soft",
                branch_reuse: str = "off") -> io.NodeOutput:
        check_inputs(cls, locals())
        from .injection import apply_painternet
        from .powerpaint import is_powerpaint

        if is_powerpaint(painternet):
            # A warning, not an error: saved workflows that drive PowerPaint this way keep running as before.
            logger.warning("PainterNetApply: %s is a PowerPaint v2 branch, trained on task tokens, never on prompts; "
                           "this node feeds it your prompt. Use Apply PowerPaint (with Load PowerPaint Task Encoder) "
                           "for PowerPaint's object removal, outpainting, shape-guided and context-aware fill",
                           painternet.name)
        condition, latent = prepare_inpaint(model, vae, image, mask, painternet, noise_mask, "PainterNetApply")
        patched = apply_painternet(model, painternet, condition, scale, start_percent, end_percent,
                                   reuse=branch_reuse_rule(branch_reuse))
        return io.NodeOutput(patched, positive, negative, latent)


def prepare_inpaint(model: Any, vae: Any, image: Any, mask: Any, painternet: Any, noise_mask: str,
                    node: str) -> tuple[Any, dict[str, Any]]:
    """What every Apply node does before attaching a branch: check the base, crop image and mask to the VAE's
    multiple, encode the branch condition (kept on the CPU) and the LATENT with its noise_mask."""
    from painternet_core.conditioning import inpaint_inputs, prepare_condition

    from .branch import check_base

    check_base(model, painternet.config)
    try:
        pixels, m, sampler_mask = inpaint_inputs(image, mask, vae.downscale_ratio, noise_mask)
    except ValueError as err:
        raise ValueError(f"{node}: {err}") from err
    latent_format = model.get_model_object("latent_format")

    def encode(px: Any) -> Any:
        return latent_format.process_in(vae.encode(px.movedim(1, -1)))

    condition = prepare_condition(pixels, m, encode, painternet.config)
    return condition.cpu(), {"samples": vae.encode(pixels.movedim(1, -1)), "noise_mask": sampler_mask}


NODES: list[type[io.ComfyNode]] = [PainterNetLoader, PainterNetApply]
