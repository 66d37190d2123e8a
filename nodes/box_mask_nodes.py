"""PainterNetBoxMask: boxes and scribbles drawn on the image in the graph (web/painternet.js) turned into a MASK.

Thin adapter over `painternet_core.shapes`: the editor stores the drawing as normalised JSON in the `shapes` widget,
this node rasterises it at the connected image's size and sends the image back to the editor as a temp preview (the
`ui.images` entry, saved the way ComfyUI's PreviewImage saves), so after one run the user draws on the real picture.
Only ComfyUI's light node API is imported at module import time; torch and folder_paths inside the functions.
"""
from __future__ import annotations

import logging
import os
import secrets
from typing import Any

from comfy_api.v0_0_2 import io

from painternet_core import shapes

from .limits import check_inputs, interrupt_poll

logger = logging.getLogger("painternet")

# The node's widget is called `shapes` (the name saved in workflows), which shadows the module inside `draw`.
_render_mask = shapes.render_mask


def _save_preview(image: Any) -> dict[str, str]:
    """Save one (H, W, C) IMAGE item as a PNG in ComfyUI's temp folder; returns the /view reference the UI loads."""
    import folder_paths
    import numpy as np
    from PIL import Image

    pixels = np.clip(image.detach().to("cpu").float().numpy() * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    elif pixels.shape[-1] == 4:
        pixels = pixels[..., :3]
    height, width = pixels.shape[:2]
    # A random prefix per call, like PreviewImage, so two editors never overwrite each other's preview.
    prefix = f"PainterNetBoxMask_{secrets.token_hex(3)}"
    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
        prefix, folder_paths.get_temp_directory(), width, height)
    name = f"{filename}_{counter:05}_.png"
    Image.fromarray(pixels).save(os.path.join(folder, name), compress_level=1)
    return {"filename": name, "subfolder": subfolder, "type": "temp"}


class PainterNetBoxMask(io.ComfyNode):
    """Rasterises the boxes / strokes drawn in the node's editor into a MASK at the image's size."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PainterNetBoxMask", display_name="PainterNet Box / Scribble Mask", category="inpaint/PainterNet",
            description=(
                "Draw boxes or brush strokes on the image right in the graph. Run once to see the connected image "
                "in the editor; shapes are stored as fractions of the image, so they follow the image when its "
                "size changes. Box mode: drag a rectangle. Stroke mode: paint with the brush width shown."),
            inputs=[
                io.Image.Input("image", tooltip="The image to draw on. The mask has its height and width; after a "
                                                "run the editor shows its first item."),
                io.String.Input("shapes", default=shapes.EMPTY_SHAPES_JSON, multiline=False, tooltip=(
                    "What was drawn, written by the editor: JSON {\"version\": 1, \"shapes\": [...]} with boxes "
                    "{type: box, x, y, w, h} and strokes {type: stroke, width, points: [[x, y], ...]}, all as "
                    "fractions of the image (stroke width: of its short side).")),
                io.Boolean.Input("invert", default=False, tooltip=(
                    "Off: 1 inside the shapes (regenerate what you drew). On: 1 outside them (keep what you drew, "
                    "regenerate the rest).")),
            ],
            outputs=[io.Mask.Output(display_name="mask", tooltip=(
                "(B, H, W) float32 in {0, 1} at the image's size, the same drawing on every batch item; 1 = inside "
                "a shape = region to generate (0 there when invert is on)."))],
        )

    @classmethod
    def execute(cls, image: Any, shapes: str, invert: bool) -> io.NodeOutput:
        """Rasterise `shapes` at the image's size, repeat over the batch, and hand the first item back as preview."""
        check_inputs(cls, locals())
        import torch

        from painternet_core.conditioning import check_image

        try:
            batch, height, width, _ = check_image(image, channels=(1, 3, 4))
        except ValueError as err:
            raise ValueError(f"PainterNetBoxMask: {err}") from err
        mask = _render_mask(shapes, height, width, bool(invert), check_interrupt=interrupt_poll())
        result = torch.from_numpy(mask).unsqueeze(0).expand(batch, height, width).contiguous()
        logger.debug("PainterNetBoxMask: %dx%d, batch %d, coverage %.4f", width, height, batch, float(mask.mean()))
        return io.NodeOutput(result, ui={"images": [_save_preview(image[0])]})


NODES: list[type[io.ComfyNode]] = [PainterNetBoxMask]
