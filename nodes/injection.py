"""Riding ComfyUI's model patcher (DESIGN §5): a keyed DIFFUSION_MODEL wrapper runs the branch once per cond/uncond
chunk and leaves scaled residuals in that call's transformer_options; official patch points add them to the base.
Two spots have no hook (between a layer and its Upsample; after the last output block): object patches that keep
every state-dict key put a holder/marker there, handled by a forward_timestep_embed_patch.

Every callable here accepts and ignores unknown keyword arguments: ComfyUI adds arguments over time.

Living with other patches (DESIGN §5): a residual whose spatial size differs from the hidden state it joins (Kohya
Deep Shrink shrinks the base's state, not the branch's) is resized to it — `area` when shrinking (the mean over the
covered pixels, which keeps a residual field's local sums), bilinear when growing — for layer residuals as maps and
for ACP residuals after reshaping the token sequence to its map. Anything else is an error naming the patches on that
hook. Host-side decisions (is this step inside the sampling range?) are taken in an APPLY_MODEL wrapper, outside a
`TorchCompileModel` region, and handed in as Python values, so the compiled diffusion model sees no `float(tensor)`.
Area conditioning runs the model on a crop of the latent: a CALC_COND_BATCH wrapper records each cond's area by uuid
and the branch gets the same crop of its condition (ComfyUI resizes a ControlNet hint instead; the branch condition
is pixel-aligned with the latent, so the crop is exact).
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

logger = logging.getLogger("painternet")

WRAPPER_KEY = "painternet"
RESIDUALS = "painternet_residuals"
ACTIVE = "painternet_active"  # {apply id: bool}, set outside the compiled region by the APPLY_MODEL wrapper
AREAS = "painternet_areas"  # {cond uuid: (h, w, y, x) in latent pixels}, set by the CALC_COND_BATCH wrapper
_APPLY_IDS = itertools.count()


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


def _patch_names(options: dict[str, Any], hook: str) -> str:
    """The other packs' patches on `hook`, for an error that names who changed the hidden state."""
    patches = options.get("patches", {}).get(hook, [])
    names = [f"{getattr(p, '__module__', '?')}.{getattr(p, '__qualname__', type(p).__name__)}" for p in patches
             if getattr(p, "__module__", None) != __name__]
    return ", ".join(names) or "none registered on this hook"


def _conflict(residual: torch.Tensor, h: torch.Tensor, where: str, options: dict[str, Any], hook: str) -> RuntimeError:
    return RuntimeError(
        f"PainterNet residual of shape {tuple(residual.shape)} cannot join the model's hidden state "
        f"{tuple(h.shape)} at {where}: another model patch changed it in a way the branch cannot follow (other "
        f"{hook} patches: {_patch_names(options, hook)}). Set that patch so it keeps the channels and the batch size "
        "(a changed spatial size is followed), or use it on a model without PainterNet")


def resize_map(residual: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a (B,C,h,w) residual to `size`: area when shrinking in both directions, bilinear otherwise."""
    import torch.nn.functional as F

    shrink = size[0] <= residual.shape[-2] and size[1] <= residual.shape[-1]
    if shrink:
        return F.interpolate(residual, size=size, mode="area")
    return F.interpolate(residual, size=size, mode="bilinear", align_corners=False)


def _fit(residual: torch.Tensor, h: torch.Tensor, where: str, options: dict[str, Any], hook: str) -> torch.Tensor:
    if residual.shape == h.shape:
        return residual
    if residual.ndim == 4 and h.ndim == 4 and residual.shape[:2] == h.shape[:2]:
        return resize_map(residual, (h.shape[-2], h.shape[-1]))
    raise _conflict(residual, h, where, options, hook)


def _add(h: torch.Tensor, residual: torch.Tensor | None, where: str, options: dict[str, Any],
         hook: str) -> torch.Tensor:
    if residual is None:
        return h
    return h + _fit(residual, h, where, options, hook).to(h.dtype)


def _token_grid(tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int] | None:
    """The (h, w) map of a branch attention output with `tokens` tokens: the latent halved (rounding up, as a stride-2
    conv with padding 1 does) until the count matches."""
    h, w = latent_hw
    while h * w > tokens and (h > 1 or w > 1):
        h, w = (h + 1) // 2, (w + 1) // 2
    return (h, w) if h * w == tokens else None


def _fit_tokens(residual: torch.Tensor, n: torch.Tensor, options: dict[str, Any]) -> torch.Tensor:
    """ACP residuals are (B, h*w, C) sequences: reshape both to their maps, resize, flatten."""
    from einops import rearrange

    if residual.shape == n.shape:
        return residual
    where = f"the cross-attention output of {options.get('block')} (transformer {options.get('block_index', 0)})"
    target = options.get("activations_shape")
    original = options.get("original_shape")
    if (residual.ndim != 3 or n.ndim != 3 or residual.shape[0] != n.shape[0] or residual.shape[2] != n.shape[2]
            or target is None or original is None or target[-2] * target[-1] != n.shape[1]):
        raise _conflict(residual, n, where, options, "attn2_output_patch")
    grid = _token_grid(residual.shape[1], (original[-2], original[-1]))
    if grid is None:
        raise _conflict(residual, n, where, options, "attn2_output_patch")
    as_map = rearrange(residual, "b (h w) c -> b c h w", h=grid[0], w=grid[1])
    return rearrange(resize_map(as_map, (target[-2], target[-1])), "b c h w -> b (h w) c")


def input_block_patch(h: torch.Tensor, transformer_options: dict[str, Any], **kwargs: Any) -> torch.Tensor:
    res = transformer_options.get(RESIDUALS)
    if res is None:
        return h
    i = transformer_options["block"][1]
    return _add(h, res["down"][i], f"input block {i}", transformer_options, "input_block_patch")


def output_block_patch(h: torch.Tensor, hsp: torch.Tensor, transformer_options: dict[str, Any],
                       **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    res = transformer_options.get(RESIDUALS)
    if res is None:
        return h, hsp
    j = transformer_options["block"][1]
    if j == 0:
        return _add(h, res["mid"], "the middle block", transformer_options, "output_block_patch"), hsp
    return _add(h, res["up"][res["layout"].after_output[j]], f"output block {j - 1}", transformer_options,
                "output_block_patch"), hsp


def attn2_output_patch(n: torch.Tensor, extra_options: dict[str, Any], **kwargs: Any) -> torch.Tensor:
    res = extra_options.get(RESIDUALS)
    if res is None or not res["attention"]:
        return n
    block = extra_options["block"]
    residual = res["attention"].get((block[0], block[1], extra_options.get("block_index", 0)))
    if residual is None:
        return n
    return n + _fit_tokens(residual, n, extra_options).to(n.dtype)


def holder_patch(layer: UpsampleHolder, x: torch.Tensor, emb: Any, context: Any, transformer_options: dict[str, Any],
                 output_shape: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
    res = transformer_options.get(RESIDUALS)
    if res is not None:
        x = _add(x, res["up"][layer.point], f"the upsampler of {transformer_options.get('block')}",
                 transformer_options, "forward_timestep_embed_patch")
    return layer(x, output_shape=output_shape)


def marker_patch(layer: ResidualMarker, x: torch.Tensor, emb: Any, context: Any, transformer_options: dict[str, Any],
                 *args: Any, **kwargs: Any) -> torch.Tensor:
    res = transformer_options.get(RESIDUALS)
    if res is None:
        return x
    return _add(x, res["up"][layer.point], "the last output block", transformer_options, "forward_timestep_embed_patch")


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


def _area_crop(condition: torch.Tensor, area: Any) -> torch.Tensor:
    """The part of the condition under one cond's area, clamped to the latent exactly as ComfyUI clamps the crop of
    x (samplers.py `get_area_and_mult`)."""
    if area is None:
        return condition
    area = list(area)
    if len(area) != 4:
        import comfy.samplers

        area = comfy.samplers.add_area_dims(area, 2)
        half = len(area) // 2
        area = area[:2] + area[half:half + 2]
    for i in range(2):
        offset = area[2 + i]
        size = min(condition.shape[i + 2] - offset, area[i])
        condition = condition.narrow(i + 2, offset, size)
    return condition


def _chunk_conditions(condition: torch.Tensor, latent: torch.Tensor, options: dict[str, Any]) -> torch.Tensor:
    """One condition row per latent row: each cond/uncond chunk gets its area's crop (or the whole condition),
    broadcast like ControlNet's hint (`broadcast_image_to`)."""
    from comfy.controlnet import broadcast_image_to

    cond_or_uncond = options.get("cond_or_uncond") or [0]
    chunks = len(cond_or_uncond)
    per_chunk = latent.shape[0] // chunks
    # Only a cropped latent looks the areas up: reading the uuids inside a compiled model would guard on them and
    # recompile at every sampling run.
    cropped = latent.shape[-2:] != condition.shape[-2:]
    areas = (options.get(AREAS) or {}) if cropped else {}
    uuids = (options.get("uuids") or []) if areas else []
    rows = []
    for o in range(chunks):
        area = areas.get(uuids[o]) if o < len(uuids) else None
        c = _area_crop(condition, area)
        if c.shape[-2:] != latent.shape[-2:]:
            raise ValueError(
                f"latent is {latent.shape[-1] * 8}x{latent.shape[-2] * 8} px but PainterNetApply encoded a "
                f"{condition.shape[-1] * 8}x{condition.shape[-2] * 8} image"
                + (f" (area {tuple(area)} in latent pixels)" if area is not None else "")
                + "; sample the LATENT that PainterNetApply outputs (or an image of the same size)")
        if c.shape[0] not in (1, per_chunk):
            # broadcast_image_to would repeat the images cyclically (2 images for 3 latents: 0, 1, 0).
            raise ValueError(f"PainterNetApply got {c.shape[0]} images but the latent batch is {per_chunk}; "
                             "use 1 image or one per latent")
        c = broadcast_image_to(c, per_chunk, 1)
        if c.shape[0] == 1:
            c = c.expand(per_chunk, -1, -1, -1)
        if c.shape[0] != per_chunk:
            raise ValueError(f"PainterNetApply got {condition.shape[0]} images but the latent batch is {per_chunk}; "
                             "use 1 image or one per latent")
        rows.append(c)
    return rows[0] if chunks == 1 else torch.cat(rows)


def _in_range(sigmas: Any, sigma_start: float, sigma_end: float) -> bool:
    return sigmas is None or sigma_end <= float(sigmas.reshape(-1)[0]) <= sigma_start


def make_apply_model_wrapper(apply_id: int, sigma_start: float, sigma_end: float) -> Callable[..., Any]:
    """Decides, outside any compiled diffusion model, whether this apply's branch runs at this step, and hands the
    answer in as a Python bool: `float(sigma)` inside a `TorchCompileModel` region would break its graph each call."""

    def apply_model_wrapper(executor: Any, x: torch.Tensor, t: torch.Tensor, c_concat: Any = None,
                            c_crossattn: Any = None, control: Any = None,
                            transformer_options: dict[str, Any] | None = None, **kwargs: Any) -> torch.Tensor:
        if transformer_options is None:
            transformer_options = {}
        active = dict(transformer_options.get(ACTIVE) or {})
        active[apply_id] = _in_range(transformer_options.get("sigmas", t), sigma_start, sigma_end)
        transformer_options[ACTIVE] = active
        try:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            active.pop(apply_id, None)
            if not active:
                transformer_options.pop(ACTIVE, None)

    return apply_model_wrapper


def calc_cond_batch_wrapper(executor: Any, model: Any, conds: list[list[dict[str, Any]]], x_in: torch.Tensor,
                            timestep: Any, model_options: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
    """Record each cond's area (latent pixels) by uuid so the DIFFUSION_MODEL wrapper can crop the branch condition
    for the chunk ComfyUI runs on that area. Without areas the options pass through untouched."""
    areas = {c["uuid"]: tuple(c["area"]) for group in conds if group for c in group
             if c is not None and c.get("area") is not None and "uuid" in c}
    if areas:
        options = dict(model_options.get("transformer_options", {}))
        options[AREAS] = areas
        model_options = dict(model_options, transformer_options=options)
    return executor(model, conds, x_in, timestep, model_options, *args, **kwargs)


REUSE_IDENTICAL_CALLS = True  # reuse branch rows across calls whose inputs are equal (PAG); tests compare with off


class BranchRowCache:
    """The branch's unscaled residuals of the last call and the inputs that produced them, for one apply.

    The branch is a pure function of each row's (input, timestep, context, y): rows are independent (GroupNorm and
    attention never mix batch rows) and the branch gets its own clean transformer_options, so a guider that calls the
    model again with equal inputs in the same step (PerturbedAttentionGuidance re-runs the cond rows with a perturbed
    *base* self-attention) gets the same residuals. Equality is checked on the values (`torch.equal`), never assumed;
    the cache is emptied at the end of each sampling run so nothing outlives it."""

    def __init__(self) -> None:
        self.inputs: tuple[Any, ...] | None = None
        self.out: dict[str, Any] | None = None

    def clear(self) -> None:
        self.inputs = self.out = None

    def lookup(self, inputs: tuple[Any, ...]) -> dict[str, Any] | None:
        if self.inputs is None or self.out is None:
            return None
        rows = []
        for i in range(inputs[0].shape[0]):
            match = next((j for j in range(self.inputs[0].shape[0])
                          if all(_row_equal(a, b, i, j) for a, b in zip(inputs, self.inputs))), None)
            if match is None:
                return None
            rows.append(match)
        index = torch.tensor(rows, device=self.out["mid"].device)
        pick = lambda t: t.index_select(0, index)  # noqa: E731
        return {"down": [pick(r) for r in self.out["down"]], "mid": pick(self.out["mid"]),
                "up": [pick(r) for r in self.out["up"]], "attention": {k: pick(v) for k, v in self.out["attention"].items()}}

    def store(self, inputs: tuple[Any, ...], out: dict[str, Any]) -> None:
        self.inputs, self.out = inputs, out


def _row_equal(a: Any, b: Any, i: int, j: int) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape[1:] == b.shape[1:] and a.dtype == b.dtype and torch.equal(a[i], b[j])


def make_outer_sample_wrapper(cache: BranchRowCache) -> Callable[..., Any]:
    def outer_sample_wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
        cache.clear()
        try:
            return executor(*args, **kwargs)
        finally:
            cache.clear()

    return outer_sample_wrapper


def make_wrapper(painternet: Any, condition: torch.Tensor, scale: float, sigma_start: float, sigma_end: float,
                 layout: ComfyLayout, apply_id: int = -1, cache: BranchRowCache | None = None) -> Callable[..., Any]:
    """The DIFFUSION_MODEL wrapper for one apply. It holds the condition in its closure (never in model_options,
    which every clone() deep-copies) and runs the branch only inside the sampling range. Inside a compiled model it
    does no host-side work: the range decision arrives from the APPLY_MODEL wrapper, and the branch is traced into
    the same graph (static shapes per resolution)."""
    branch = painternet.patcher.model
    expected_down = len(branch.layer_control_down)

    def wrapper(executor: Any, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None, control: Any = None, transformer_options: dict[str, Any] | None = None,
                **kwargs: Any) -> torch.Tensor:
        if transformer_options is None:
            transformer_options = {}
        active = transformer_options.get(ACTIVE)
        if active is not None and apply_id in active:
            in_range = active[apply_id]
        else:  # called without apply_model (direct diffusion_model calls): decide here, eagerly
            in_range = _in_range(transformer_options.get("sigmas"), sigma_start, sigma_end)
        if scale == 0.0 or not in_range:
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        latent = x[:, :4]
        dtype = branch.compute_dtype
        c = _chunk_conditions(condition.to(latent.device), latent, transformer_options)
        inputs = (torch.cat([latent, c], dim=1).to(dtype), timesteps,
                  None if context is None else context.to(dtype), None if y is None else y.to(dtype))
        # Value comparisons are host-side work: never inside a compiled model, where the branch is traced instead.
        reuse = cache is not None and REUSE_IDENTICAL_CALLS and not torch.compiler.is_compiling()
        out = cache.lookup(inputs) if reuse else None
        if out is None:
            if reuse:
                cache.clear()  # the previous residuals go before new ones are made: one set alive, not two
            with torch.no_grad():
                out = branch(*inputs)
            if reuse:
                cache.store(inputs, out)
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
    apply_id = next(_APPLY_IDS)
    wrappers = comfy.patcher_extension.WrappersMP
    patched.add_wrapper_with_key(wrappers.APPLY_MODEL, WRAPPER_KEY,
                                 make_apply_model_wrapper(apply_id, sigma_start, sigma_end))
    cache = BranchRowCache()
    patched.add_wrapper_with_key(wrappers.DIFFUSION_MODEL, WRAPPER_KEY,
                                 make_wrapper(painternet, condition, scale, sigma_start, sigma_end, layout, apply_id,
                                              cache))
    patched.add_wrapper_with_key(wrappers.OUTER_SAMPLE, WRAPPER_KEY, make_outer_sample_wrapper(cache))
    if calc_cond_batch_wrapper not in patched.get_wrappers(wrappers.CALC_COND_BATCH, WRAPPER_KEY):
        patched.add_wrapper_with_key(wrappers.CALC_COND_BATCH, WRAPPER_KEY, calc_cond_batch_wrapper)
    others = patched.get_additional_models_with_key(WRAPPER_KEY)
    patched.set_additional_models(WRAPPER_KEY, others + [painternet.patcher])
    return patched
