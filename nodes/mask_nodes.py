"""PainterNetMaskGenerator: the paper's training masks (box / irregular / segmentation / Eq. 6 mix) as a ComfyUI node.

Thin adapter over `painternet_core.masks`: it converts the MASK batch to numpy, gives every item its own generator
derived from the node's seed, and stacks the results. The same core functions build the trainer's masks, so what a
user previews here is what the model saw in training. Only ComfyUI's light node API is imported at module import
time; torch is imported inside the function (the pack's import must stay cheap and safe).
"""
from __future__ import annotations

import logging
from typing import Any

from comfy_api.v0_0_2 import io

from painternet_core import masks

from .limits import check_inputs, interrupt_poll, widget_check

logger = logging.getLogger("painternet")

_SEED_MAX = 0xFFFFFFFFFFFFFFFF
_DEFAULT_IRREGULAR = masks.IrregularMaskParams()


def _float(name: str, default: float, maximum: float, tooltip: str, step: float = 0.005) -> Any:
    return io.Float.Input(name, default=default, min=0.0, max=maximum, step=step, tooltip=tooltip, optional=True)


def _int(name: str, default: int, minimum: int, maximum: int, tooltip: str) -> Any:
    return io.Int.Input(name, default=default, min=minimum, max=maximum, step=1, tooltip=tooltip, optional=True)


class PainterNetMaskGenerator(io.ComfyNode):
    """Turns a segmentation MASK into a PainterNet training-style mask (paper §3.4 Eq. 6, supplement Algorithm 1)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        d = _DEFAULT_IRREGULAR
        lo_box, hi_box = masks.DEFAULT_BOX_EXPAND
        return io.Schema(
            node_id="PainterNetMaskGenerator", display_name="PainterNet Mask Generator",
            category="inpaint/PainterNet",
            description=(
                "Builds the PainterNet paper's masks from a segmentation mask: its bounding box randomly expanded, "
                "an irregular 'finger scribble' mask (coverage-dependent dilation plus random lines, circles and "
                "squares), the segmentation itself, or the paper's 25/50/25 mix. Deterministic for a seed; every "
                "batch item gets its own random stream."),
            inputs=[
                io.Mask.Input("mask", tooltip="Segmentation mask of the object, (B, H, W) or (H, W); pixels >= 0.5 "
                                              "count as the object (1 = region to generate)."),
                io.Combo.Input("mode", options=list(masks.MASK_MODES), default="paper_mix", tooltip=(
                    "segmentation: the mask itself. box: its bounding box, randomly expanded. irregular: dilated by "
                    "coverage ratio, then random strokes. paper_mix: per item, box 25 %, irregular 50 %, "
                    "segmentation 25 % (paper Eq. 6).")),
                io.Int.Input("seed", default=0, min=0, max=_SEED_MAX, control_after_generate=True, tooltip=(
                    "Random seed. Item i of the batch uses its own stream derived from (seed, i), so results are "
                    "reproducible and items differ.")),
                _float("box_expand_min", lo_box, 4.0, "Box: smallest expansion of each side, as a fraction of the "
                                                      "box's width (left/right) or height (top/bottom).", step=0.01),
                _float("box_expand_max", hi_box, 4.0, "Box: largest expansion of each side (fraction of the box "
                                                      "size). Each side draws its own value in [min, max].",
                       step=0.01),
                _float("dilation_scale", d.dilation_scale, 10.0, "Irregular: multiplies the dilation kernel chosen "
                                                                 "from the coverage ratio; 0 = no dilation, 2 = twice "
                                                                 "as wide.", step=0.05),
                _int("strokes_min", d.strokes[0], 0, 64, "Irregular: fewest drawings, each starting at a random "
                                                         "point of the dilated mask."),
                _int("strokes_max", d.strokes[1], 0, 64, "Irregular: most drawings (inclusive)."),
                _int("segments_min", d.segments[0], 1, 64, "Irregular: fewest chained segments (line, circle or "
                                                           "square) per drawing."),
                _int("segments_max", d.segments[1], 1, 64, "Irregular: most chained segments per drawing "
                                                           "(inclusive)."),
                _float("length_min", d.length[0], 2.0, "Irregular: shortest segment, as a fraction of the image's "
                                                       "short side."),
                _float("length_max", d.length[1], 2.0, "Irregular: longest segment (fraction of the short side)."),
                _float("width_min", d.width[0], 1.0, "Irregular: thinnest brush, as a fraction of the image's short "
                                                     "side (at least 1 px)."),
                _float("width_max", d.width[1], 1.0, "Irregular: widest brush (fraction of the short side). Circles "
                                                     "have radius = width, squares side = 2 x width."),
                _float("line_weight", d.shape_weights[0], 100.0, "Irregular: relative chance that a segment is a "
                                                                 "thick line.", step=0.05),
                _float("circle_weight", d.shape_weights[1], 100.0, "Irregular: relative chance that a segment is a "
                                                                   "filled circle.", step=0.05),
                _float("square_weight", d.shape_weights[2], 100.0, "Irregular: relative chance that a segment is a "
                                                                   "filled, rotated square.", step=0.05),
            ],
            outputs=[io.Mask.Output(display_name="mask", tooltip=(
                "The generated masks, (B, H, W) float32 in {0, 1} on the CPU; 1 = region to generate."))],
        )

    @classmethod
    def validate_inputs(cls, mode: str) -> bool | str:
        return widget_check(cls, locals())

    @classmethod
    def execute(cls, mask: Any, mode: str, seed: int,
                 box_expand_min: float = masks.DEFAULT_BOX_EXPAND[0],
                 box_expand_max: float = masks.DEFAULT_BOX_EXPAND[1],
                 dilation_scale: float = _DEFAULT_IRREGULAR.dilation_scale,
                 strokes_min: int = _DEFAULT_IRREGULAR.strokes[0], strokes_max: int = _DEFAULT_IRREGULAR.strokes[1],
                 segments_min: int = _DEFAULT_IRREGULAR.segments[0],
                 segments_max: int = _DEFAULT_IRREGULAR.segments[1],
                 length_min: float = _DEFAULT_IRREGULAR.length[0], length_max: float = _DEFAULT_IRREGULAR.length[1],
                 width_min: float = _DEFAULT_IRREGULAR.width[0], width_max: float = _DEFAULT_IRREGULAR.width[1],
                 line_weight: float = _DEFAULT_IRREGULAR.shape_weights[0],
                 circle_weight: float = _DEFAULT_IRREGULAR.shape_weights[1],
                 square_weight: float = _DEFAULT_IRREGULAR.shape_weights[2]) -> io.NodeOutput:
        """Generate one mask per batch item; item i draws from `SeedSequence(seed).spawn(B)[i]`."""
        check_inputs(cls, locals())
        import numpy as np
        import torch

        check_interrupt = interrupt_poll()
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"mask must be a torch tensor (a ComfyUI MASK), got {type(mask).__name__}")
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if mask.ndim != 3:
            raise ValueError(f"mask must have shape (B, H, W) or (H, W), got {tuple(mask.shape)}; squeeze or "
                             "reshape the channel axis away")
        irregular = masks.IrregularMaskParams(
            dilation_scale=float(dilation_scale), strokes=(int(strokes_min), int(strokes_max)),
            segments=(int(segments_min), int(segments_max)), length=(float(length_min), float(length_max)),
            width=(float(width_min), float(width_max)),
            shape_weights=(float(line_weight), float(circle_weight), float(square_weight)))
        box_expand = (float(box_expand_min), float(box_expand_max))

        batch = mask.detach().to(device="cpu", dtype=torch.float32).numpy()
        children = np.random.SeedSequence(int(seed)).spawn(batch.shape[0])
        out = np.empty(batch.shape, dtype=np.float32)
        kinds = []
        for i, (item, child) in enumerate(zip(batch, children)):
            check_interrupt()
            rng = np.random.Generator(np.random.PCG64(child))
            if mode == "paper_mix":
                drawn = masks.paper_mix_mask(item, rng, box_expand=box_expand, irregular=irregular,
                                             check_interrupt=check_interrupt)
                out[i], kind = drawn.mask, drawn.kind
            else:
                out[i] = masks.generate_mask(item, mode, rng, box_expand=box_expand, irregular=irregular,
                                             check_interrupt=check_interrupt)
                kind = mode
            kinds.append(kind)
        logger.debug("PainterNetMaskGenerator: seed=%d kinds=%s", seed, kinds)
        return io.NodeOutput(torch.from_numpy(out))


NODES: list[type[io.ComfyNode]] = [PainterNetMaskGenerator]
