"""Riding ComfyUI's model patcher (DESIGN §5): a keyed DIFFUSION_MODEL wrapper runs the branch once per cond/uncond
chunk and leaves scaled residuals in that call's transformer_options; official patch points add them to the base.
Two spots have no hook (between a layer and its Upsample; after the last output block): object patches that keep
every state-dict key put a holder/marker there, handled by a forward_timestep_embed_patch.

Every callable here accepts and ignores unknown keyword arguments: ComfyUI adds arguments over time.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

logger = logging.getLogger("painternet")

WRAPPER_KEY = "painternet"
RESIDUALS = "painternet_residuals"


class UpsampleHolder(nn.Module):
    """Stands in for an Upsample with the *same* conv (same keys, same weights), so a residual can be added right
    before the upsampling; forward_timestep_embed only hands non-Upsample layers to patches."""

    def __init__(self, upsample: nn.Module, point: int) -> None:
        super().__init__()
        self.channels = upsample.channels
        self.out_channels = upsample.out_channels
        self.use_conv = upsample.use_conv
        self.dims = upsample.dims
        if upsample.use_conv:
            self.conv = upsample.conv
        self.point = point

    def forward(self, x: torch.Tensor, output_shape: Any = None, **kwargs: Any) -> torch.Tensor:
        from comfy.ldm.modules.diffusionmodules.openaimodel import Upsample

        # Keywords a newer caller may add are accepted but not passed on: ComfyUI's Upsample.forward takes only
        # output_shape, and the holder must keep working where the caller grows and Upsample does not.
        return Upsample.forward(self, x, output_shape=output_shape)


class ResidualMarker(nn.Module):
    """Parameter-free marker appended to the last output block: the spot after it has no hook."""

    def __init__(self, point: int) -> None:
        super().__init__()
        self.point = point

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x


@dataclass(frozen=True)
class ComfyLayout:
    """Where each diffusers-ordered up control point lands in a ComfyUI UNetModel."""

    after_output: dict[int, int]  # output_block_patch slot j (h entering output block j) -> up index; mid is slot 0
    before_upsample: dict[int, int]  # output block j -> up index of its layer point (holder in that block)
    final: int  # up index after the last output block
    n_up: int


def comfy_layout(diffusion_model: nn.Module) -> ComfyLayout:
    from comfy.ldm.modules.diffusionmodules.openaimodel import Upsample

    after_output: dict[int, int] = {}
    before_upsample: dict[int, int] = {}
    point = 0
    blocks = diffusion_model.output_blocks
    for j, block in enumerate(blocks):
        last = block[-1]
        if isinstance(last, (Upsample, UpsampleHolder)):
            before_upsample[j] = point
            point += 1
        if j < len(blocks) - 1:
            after_output[j + 1] = point
            point += 1
    final = point
    return ComfyLayout(after_output, before_upsample, final, point + 1)


def _add(h: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    return h if residual is None else h + residual.to(h.dtype)


def input_block_patch(h: torch.Tensor, transformer_options: dict[str, Any], **kwargs: Any) -> torch.Tensor:
    res = transformer_options.get(RESIDUALS)
    if res is None:
        return h
    return _add(h, res["down"][transformer_options["block"][1]])


def output_block_patch(h: torch.Tensor, hsp: torch.Tensor, transformer_options: dict[str, Any],
                       **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    res = transformer_options.get(RESIDUALS)
    if res is None:
        return h, hsp
    j = transformer_options["block"][1]
    if j == 0:
        return _add(h, res["mid"]), hsp
    return _add(h, res["up"][res["layout"].after_output[j]]), hsp


def attn2_output_patch(n: torch.Tensor, extra_options: dict[str, Any], **kwargs: Any) -> torch.Tensor:
    res = extra_options.get(RESIDUALS)
    if res is None or not res["attention"]:
        return n
    block = extra_options["block"]
    return _add(n, res["attention"].get((block[0], block[1], extra_options.get("block_index", 0))))


def holder_patch(layer: UpsampleHolder, x: torch.Tensor, emb: Any, context: Any, transformer_options: dict[str, Any],
                 output_shape: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
    res = transformer_options.get(RESIDUALS)
    if res is not None:
        x = _add(x, res["up"][layer.point])
    return layer(x, output_shape=output_shape)


def marker_patch(layer: ResidualMarker, x: torch.Tensor, emb: Any, context: Any, transformer_options: dict[str, Any],
                 *args: Any, **kwargs: Any) -> torch.Tensor:
    res = transformer_options.get(RESIDUALS)
    return x if res is None else _add(x, res["up"][layer.point])


def _merge(total: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """Several applies on one model: their residual sets add up."""
    if total is None:
        return new
    attention = dict(total["attention"])
    for key, value in new["attention"].items():
        attention[key] = attention[key] + value if key in attention else value
    return {
        "down": [a + b for a, b in zip(total["down"], new["down"])],
        "mid": total["mid"] + new["mid"],
        "up": [a + b for a, b in zip(total["up"], new["up"])],
        "attention": attention,
        "layout": total["layout"],
    }


def install_layout(model: Any) -> ComfyLayout:
    """Install the patches and object patches on a (cloned) ModelPatcher once; later applies only add wrappers."""
    import comfy.ldm.modules.diffusionmodules.openaimodel as oam

    diffusion_model = model.get_model_object("diffusion_model")
    layout = comfy_layout(diffusion_model)
    patches = model.model_options["transformer_options"].get("patches", {})
    if input_block_patch in patches.get("input_block_patch", []):
        return layout
    model.set_model_input_block_patch(input_block_patch)
    model.set_model_output_block_patch(output_block_patch)
    model.set_model_attn2_output_patch(attn2_output_patch)
    model.set_model_forward_timestep_embed_patch((UpsampleHolder, holder_patch))
    model.set_model_forward_timestep_embed_patch((ResidualMarker, marker_patch))
    for j, point in layout.before_upsample.items():
        upsample = diffusion_model.output_blocks[j][-1]
        model.add_object_patch(f"diffusion_model.output_blocks.{j}.{len(diffusion_model.output_blocks[j]) - 1}",
                               UpsampleHolder(upsample, point))
    last = len(diffusion_model.output_blocks) - 1
    # The shared module may still carry another clone's object patches; build ours from the pristine children.
    children = [m for m in diffusion_model.output_blocks[last] if not isinstance(m, ResidualMarker)]
    model.add_object_patch(f"diffusion_model.output_blocks.{last}",
                           oam.TimestepEmbedSequential(*children, ResidualMarker(layout.final)))
    return layout


def make_wrapper(painternet: Any, condition: torch.Tensor, scale: float, sigma_start: float, sigma_end: float,
                 layout: ComfyLayout):
    """The DIFFUSION_MODEL wrapper for one apply. It holds the condition in its closure (never in model_options,
    which every clone() deep-copies) and runs the branch only inside the sampling range."""
    from comfy.controlnet import broadcast_image_to

    branch = painternet.patcher.model
    expected_down = len(branch.layer_control_down)

    def wrapper(executor: Any, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None, control: Any = None, transformer_options: dict[str, Any] | None = None,
                **kwargs: Any) -> torch.Tensor:
        if transformer_options is None:
            transformer_options = {}
        sigmas = transformer_options.get("sigmas")
        in_range = sigmas is None or sigma_end <= float(sigmas.reshape(-1)[0]) <= sigma_start
        if scale == 0.0 or not in_range:
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        latent = x[:, :4]
        if latent.shape[-2:] != condition.shape[-2:]:
            raise ValueError(f"latent is {latent.shape[-1] * 8}x{latent.shape[-2] * 8} px but PainterNetApply encoded a "
                             f"{condition.shape[-1] * 8}x{condition.shape[-2] * 8} image; sample the LATENT that "
                             "PainterNetApply outputs (or an image of the same size)")
        dtype = branch.compute_dtype
        cond_or_uncond = transformer_options.get("cond_or_uncond", [0])
        c = broadcast_image_to(condition.to(latent.device), latent.shape[0], len(cond_or_uncond))
        if c.shape[0] == 1:
            c = c.expand(latent.shape[0], -1, -1, -1)
        if c.shape[0] != latent.shape[0]:
            raise ValueError(f"PainterNetApply got {condition.shape[0]} images but the latent batch is "
                             f"{latent.shape[0] // max(len(cond_or_uncond), 1)}; use 1 image or one per latent")
        with torch.no_grad():
            out = branch(torch.cat([latent, c], dim=1).to(dtype), timesteps,
                         None if context is None else context.to(dtype), None if y is None else y.to(dtype))
        if len(out["down"]) != expected_down:
            raise RuntimeError("branch produced an unexpected number of control points")
        scaled = {"down": [r * scale for r in out["down"]], "mid": out["mid"] * scale,
                  "up": [r * scale for r in out["up"]],
                  "attention": {k: v * scale for k, v in out["attention"].items()}, "layout": layout}
        transformer_options[RESIDUALS] = _merge(transformer_options.get(RESIDUALS), scaled)
        try:
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        finally:
            transformer_options.pop(RESIDUALS, None)

    return wrapper


def apply_painternet(model: Any, painternet: Any, condition: torch.Tensor, scale: float, start_percent: float,
                     end_percent: float) -> Any:
    """Return a clone of `model` that runs `painternet` with the prepared `condition` (B,5,h,w, scaled latent)."""
    import comfy.patcher_extension

    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"start_percent={start_percent} end_percent={end_percent}: need 0 <= start <= end <= 1")
    patched = model.clone()
    layout = install_layout(patched)
    if layout.n_up != len(painternet.patcher.model.layer_control_up):
        raise ValueError(f"branch has {len(painternet.patcher.model.layer_control_up)} up control points but the model "
                         f"{layout.n_up}; branch and model topologies differ")
    sampling = patched.get_model_object("model_sampling")
    sigma_start = float(sampling.percent_to_sigma(start_percent))
    sigma_end = float(sampling.percent_to_sigma(end_percent))
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY,
                                 make_wrapper(painternet, condition, scale, sigma_start, sigma_end, layout))
    others = patched.get_additional_models_with_key(WRAPPER_KEY)
    patched.set_additional_models(WRAPPER_KEY, others + [painternet.patcher])
    return patched
