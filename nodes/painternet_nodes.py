"""PainterNetLoader and PainterNetApply: thin V1 nodes over `branch.py`, `injection.py` and the core."""
from __future__ import annotations

from typing import Any

from painternet_core.conditioning import NOISE_MASK_MODES

CATEGORY = "inpaint/PainterNet"


class PainterNetLoader:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        import folder_paths

        return {"required": {
            "painternet_name": (folder_paths.get_filename_list("painternet"), {
                "tooltip": "PainterNet (or diffusers BrushNet / PowerPaint-CA) branch from models/painternet. "
                           "Only .safetensors files load; pickle files are refused with a conversion command."}),
            "dtype": (["auto", "fp16", "bf16", "fp32"], {
                "default": "auto",
                "tooltip": "Weight dtype of the branch. auto follows ComfyUI's choice for the device (fp32 on CPU)."}),
        }}

    RETURN_TYPES = ("PAINTERNET",)
    RETURN_NAMES = ("painternet",)
    OUTPUT_TOOLTIPS = ("The loaded branch, to plug into PainterNetApply.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads a PainterNet branch for SD1.5 or SDXL."

    def load(self, painternet_name: str, dtype: str) -> tuple[Any]:
        import folder_paths

        from .branch import load_painternet
        from .limits import check_inputs

        check_inputs(PainterNetLoader, {"dtype": dtype})
        path = folder_paths.get_full_path("painternet", painternet_name)
        if path is None:
            raise FileNotFoundError(f"PainterNet file {painternet_name!r} not found in models/painternet; "
                                    "refresh the node list or copy the file there")
        return (load_painternet(path, dtype=dtype),)


class PainterNetApply:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "Any SD1.5 or SDXL checkpoint's model (fine-tunes included) of the "
                                           "branch's family."}),
            "vae": ("VAE", {"tooltip": "The VAE that encodes the image and the masked image."}),
            "image": ("IMAGE", {"tooltip": "The image to inpaint. Cropped to a multiple of 8 pixels if needed."}),
            "mask": ("MASK", {"tooltip": "White (1) = region to generate. Resized to the image if the aspect ratio "
                                         "matches. The branch sees it binarised at 0.5 (the hole it was trained "
                                         "on); the latent's noise_mask keeps its soft values (see noise_mask)."}),
            "painternet": ("PAINTERNET", {"tooltip": "Branch from PainterNetLoader."}),
            "positive": ("CONDITIONING", {"tooltip": "Passed through; describe the masked region (local prompt)."}),
            "negative": ("CONDITIONING", {"tooltip": "Passed through."}),
            "scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01,
                                "tooltip": "Preservation scale w: multiplies every layer and attention residual. "
                                           "0 disables the branch (it is then not run at all)."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                        "tooltip": "Sampling progress at which the branch starts acting."}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                      "tooltip": "Sampling progress after which the branch stops (and is not run)."}),
        }, "optional": {
            "noise_mask": (list(NOISE_MASK_MODES), {
                "default": "soft",
                "tooltip": "The mask put in the output latent's noise_mask (what the sampler and Differential "
                           "Diffusion read). soft: the mask as drawn, values in [0, 1] kept, so a feathered mask "
                           "gives Differential Diffusion a graded edge. binary: the hole the branch sees (0.5 "
                           "threshold). The branch always gets the binary hole."}),
        }}

    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("model", "positive", "negative", "latent")
    OUTPUT_TOOLTIPS = ("The model with the branch attached (the input model is left untouched).",
                       "Positive conditioning, unchanged.", "Negative conditioning, unchanged.",
                       "The encoded image with noise_mask (the mask as drawn, or the binary hole: see noise_mask): "
                       "sample it with denoise 1.0 to keep the unmasked area.")
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = "Patches a PainterNet branch into the model's UNet and prepares the inpainting latent."

    def apply(self, model: Any, vae: Any, image: Any, mask: Any, painternet: Any, positive: Any, negative: Any,
              scale: float, start_percent: float, end_percent: float,
              noise_mask: str = "soft") -> tuple[Any, Any, Any, dict[str, Any]]:
        from painternet_core.conditioning import inpaint_inputs, prepare_condition

        from .branch import check_base
        from .injection import apply_painternet
        from .limits import check_inputs

        check_inputs(PainterNetApply, {"scale": scale, "start_percent": start_percent, "end_percent": end_percent,
                                       "noise_mask": noise_mask})
        check_base(model, painternet.config)
        try:
            pixels, m, sampler_mask = inpaint_inputs(image, mask, vae.downscale_ratio, noise_mask)
        except ValueError as err:
            raise ValueError(f"PainterNetApply: {err}") from err
        latent_format = model.get_model_object("latent_format")

        def encode(px: Any) -> Any:
            return latent_format.process_in(vae.encode(px.movedim(1, -1)))

        condition = prepare_condition(pixels, m, encode, painternet.config)
        patched = apply_painternet(model, painternet, condition.cpu(), scale, start_percent, end_percent)
        latent = {"samples": vae.encode(pixels.movedim(1, -1)), "noise_mask": sampler_mask}
        return patched, positive, negative, latent


NODE_CLASS_MAPPINGS = {"PainterNetLoader": PainterNetLoader, "PainterNetApply": PainterNetApply}
NODE_DISPLAY_NAME_MAPPINGS = {"PainterNetLoader": "Load PainterNet", "PainterNetApply": "Apply PainterNet"}
