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
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from painternet_core.reuse import BranchReuse, ReuseSchedule

logger = logging.getLogger("painternet")

WRAPPER_KEY = "painternet"
RESIDUALS = "painternet_residuals"
ACTIVE = "painternet_active"  # {apply id: bool}, set outside the compiled region by the APPLY_MODEL wrapper
AREAS = "painternet_areas"  # {cond uuid: (h, w, y, x) in latent pixels}, set by the CALC_COND_BATCH wrapper
STEP = "painternet_step"  # StepToken of the sampler evaluation, set by the CALC_COND_BATCH wrapper
FRESH = "painternet_fresh"  # {apply id: residual set} the branch made in this call, for the APPLY_MODEL wrapper
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
    """The other packs' patches on `hook`, for an error that names who changed the hidden state
    (forward_timestep_embed_patch entries are (module class, function) pairs: the function is named)."""
    patches = [p[-1] if isinstance(p, tuple) else p for p in options.get("patches", {}).get(hook, [])]
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


def _add(h: torch.Tensor, sets: list[tuple[dict[str, Any], float]] | None,
         pick: Callable[[dict[str, Any]], torch.Tensor | None], where: str, options: dict[str, Any],
         hook: str) -> torch.Tensor:
    """Add every apply's residual to `h`, each with its scale folded into the add: no scaled or summed copies."""
    for out, scale in sets or ():
        residual = pick(out)
        if residual is not None:
            h = torch.add(h, _fit(residual, h, where, options, hook).to(h.dtype), alpha=scale)
    return h


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
    sets = transformer_options.get(RESIDUALS)
    if not sets:
        return h
    i = transformer_options["block"][1]
    return _add(h, sets, lambda out: out["down"][i], f"input block {i}", transformer_options, "input_block_patch")


def output_block_patch(h: torch.Tensor, hsp: torch.Tensor, transformer_options: dict[str, Any],
                       **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    sets = transformer_options.get(RESIDUALS)
    if not sets:
        return h, hsp
    j = transformer_options["block"][1]
    if j == 0:
        return _add(h, sets, lambda out: out["mid"], "the middle block", transformer_options,
                    "output_block_patch"), hsp
    return _add(h, sets, lambda out: out["up"][out["layout"].after_output[j]], f"output block {j - 1}",
                transformer_options, "output_block_patch"), hsp


def attn2_output_patch(n: torch.Tensor, extra_options: dict[str, Any], **kwargs: Any) -> torch.Tensor:
    sets = extra_options.get(RESIDUALS)
    if not sets:
        return n
    block = extra_options["block"]
    key = (block[0], block[1], extra_options.get("block_index", 0))
    for out, scale in sets:
        residual = out["attention"].get(key)
        if residual is not None:
            n = torch.add(n, _fit_tokens(residual, n, extra_options).to(n.dtype), alpha=scale)
    return n


def holder_patch(layer: UpsampleHolder, x: torch.Tensor, emb: Any, context: Any, transformer_options: dict[str, Any],
                 output_shape: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
    x = _add(x, transformer_options.get(RESIDUALS), lambda out: out["up"][layer.point],
             f"the upsampler of {transformer_options.get('block')}", transformer_options, "forward_timestep_embed_patch")
    return layer(x, output_shape=output_shape)


def marker_patch(layer: ResidualMarker, x: torch.Tensor, emb: Any, context: Any, transformer_options: dict[str, Any],
                 *args: Any, **kwargs: Any) -> torch.Tensor:
    return _add(x, transformer_options.get(RESIDUALS), lambda out: out["up"][layer.point], "the last output block",
                transformer_options, "forward_timestep_embed_patch")


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


@dataclass(frozen=True)
class BranchContext:
    """The branch's own text context, for branches not trained on the base's prompt (PowerPaint v2 sees task tokens
    only). `cond` (1,T,C) goes to the cond chunks and `uncond` (1,T,C) to the uncond chunks of each model call, chosen
    by transformer_options["cond_or_uncond"], never by batch position: at cfg 1 ComfyUI runs the cond chunk alone."""

    cond: torch.Tensor
    uncond: torch.Tensor

    def __post_init__(self) -> None:
        for name, t in (("cond", self.cond), ("uncond", self.uncond)):
            if not isinstance(t, torch.Tensor) or t.ndim != 3 or t.shape[0] != 1:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"BranchContext.{name} is {got}; expected a (1, tokens, channels) tensor")
        if self.cond.shape != self.uncond.shape:
            raise ValueError(f"BranchContext cond {tuple(self.cond.shape)} and uncond {tuple(self.uncond.shape)} "
                             "differ; encode both to the same token count")


class _Run:
    """What one apply needs per sampling run: the window in sigmas, the condition (and branch context) already on
    the sampling device in the branch's dtype, and the step-reuse bookkeeping. Set by the OUTER_SAMPLE wrapper from
    the model the sampler really uses; outside a sampling run (a direct diffusion-model call) apply-time values hold."""

    def __init__(self, condition: torch.Tensor, context: BranchContext | None, window: tuple[float, float],
                 percents: tuple[float, float], sampling: Any, reuse: BranchReuse | None) -> None:
        self.percents = percents
        self.reuse = reuse
        self.default = (condition, context, window, sampling)
        self.condition, self.context, self.window, self.sampling = self.default
        self.reset_steps()

    def reset_steps(self) -> None:
        self.steps = ReuseSchedule(self.reuse)  # in-window model evaluations, keyed by sigma

    def begin(self, model_sampling: Any, device: Any, dtype: torch.dtype) -> tuple[Any, ...]:
        previous = (self.condition, self.context, self.window, self.sampling, self.steps)
        condition, context, window, sampling = self.default
        if model_sampling is not None:
            sampling = model_sampling
            window = (float(model_sampling.percent_to_sigma(self.percents[0])),
                      float(model_sampling.percent_to_sigma(self.percents[1])))
        if device is not None:
            condition = condition.to(device=device, dtype=dtype)
            if context is not None:
                context = BranchContext(context.cond.to(device=device, dtype=dtype),
                                        context.uncond.to(device=device, dtype=dtype))
        self.condition, self.context, self.window, self.sampling = condition, context, window, sampling
        self.reset_steps()
        return previous

    def end(self, previous: tuple[Any, ...]) -> None:
        self.condition, self.context, self.window, self.sampling, self.steps = previous

    def runs_branch(self, sigma: float, x: torch.Tensor) -> bool:
        """Whether the branch runs at this in-window evaluation (False: reuse the last residuals); the rule is
        `painternet_core.reuse`'s, fed the model's scaled input (one device->host sync per evaluation when
        adaptive, outside any compiled region)."""
        return self.steps.runs_branch(sigma, lambda: self.sampling.calculate_input(
            torch.full((x.shape[0],), sigma, device=x.device), x))


def _branch_input(condition: torch.Tensor, latent: torch.Tensor, options: dict[str, Any],
                  dtype: torch.dtype) -> torch.Tensor:
    """The branch's (B, 4+C, h, w) input, written once: the latent and, per cond/uncond chunk, its area's crop of the
    condition (or the whole condition) broadcast to the chunk's rows, cast in the same copy."""
    cond_or_uncond = options.get("cond_or_uncond") or [0]
    chunks = len(cond_or_uncond)
    per_chunk = latent.shape[0] // chunks
    # Only a cropped latent looks the areas up: reading the uuids inside a compiled model would guard on them and
    # recompile at every sampling run.
    cropped = latent.shape[-2:] != condition.shape[-2:]
    areas = (options.get(AREAS) or {}) if cropped else {}
    uuids = (options.get("uuids") or []) if areas else []
    if condition.device != latent.device:
        condition = condition.to(latent.device)
    x = torch.empty((latent.shape[0], latent.shape[1] + condition.shape[1]) + tuple(latent.shape[2:]), dtype=dtype,
                    device=latent.device)
    x[:, :latent.shape[1]] = latent
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
            raise ValueError(f"PainterNetApply got {c.shape[0]} images but the latent batch is {per_chunk}; "
                             "use 1 image or one per latent")
        x[o * per_chunk:(o + 1) * per_chunk, latent.shape[1]:] = c
    return x


def _branch_context(context: BranchContext, rows: int, options: dict[str, Any]) -> torch.Tensor:
    """Each chunk's rows get the cond or uncond context its `cond_or_uncond` entry names (0 cond, 1 uncond)."""
    cond_or_uncond = options.get("cond_or_uncond") or [0]
    per_chunk = rows // len(cond_or_uncond)
    parts = []
    for kind in cond_or_uncond:
        if kind not in (0, 1):
            raise ValueError(f"cond_or_uncond entry {kind!r}: a branch context knows cond (0) and uncond (1) only")
        parts.append((context.cond if kind == 0 else context.uncond).expand(per_chunk, -1, -1))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _in_range(sigmas: Any, sigma_start: float, sigma_end: float) -> bool:
    return sigmas is None or sigma_end <= float(sigmas.reshape(-1)[0]) <= sigma_start


def make_apply_model_wrapper(apply_id: int, run: _Run, cache: BranchRowCache | None = None) -> Callable[..., Any]:
    """Takes every host-side decision outside any compiled diffusion model and hands it in as a Python value in
    transformer_options[ACTIVE][apply_id]: False (outside the window: the branch is not run), True (run the branch),
    or the residual set to reuse (same-step rows for PAG, or the last run's rows on a step that `reuse` skips).
    `float(sigma)`, step tokens and uuids inside a `TorchCompileModel` region would break or re-guard its graph. New
    residuals come back through transformer_options[FRESH] and are cached here."""

    def apply_model_wrapper(executor: Any, x: torch.Tensor, t: torch.Tensor, c_concat: Any = None,
                            c_crossattn: Any = None, control: Any = None,
                            transformer_options: dict[str, Any] | None = None, **kwargs: Any) -> torch.Tensor:
        if transformer_options is None:
            transformer_options = {}
        sigmas = transformer_options.get("sigmas", t)
        decision: Any = _in_range(sigmas, *run.window)
        step = transformer_options.get(STEP)
        uuids = tuple(transformer_options.get("uuids") or ())
        chunks = len(transformer_options.get("cond_or_uncond") or [0])
        key = (x.shape[0] // chunks, tuple(x.shape[1:]))
        caching = (cache is not None and step is not None and len(uuids) == chunks
                   and (REUSE_IDENTICAL_CALLS or run.reuse is not None))
        if decision and caching:
            skip = not run.runs_branch(float(sigmas.reshape(-1)[0]), x)
            reused = cache.lookup(step, uuids, *key, any_step=skip) if skip or REUSE_IDENTICAL_CALLS else None
            if reused is not None:
                decision = reused
            else:
                cache.keep_step(step)  # the previous residuals go before new ones are made: one set alive
        active = dict(transformer_options.get(ACTIVE) or {})
        active[apply_id] = decision
        transformer_options[ACTIVE] = active
        fresh = transformer_options.setdefault(FRESH, {}) if decision is True and caching else None
        try:
            out = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
            if fresh is not None and apply_id in fresh:
                cache.store(step, uuids, *key, fresh[apply_id])
            return out
        finally:
            active.pop(apply_id, None)
            if not active:
                transformer_options.pop(ACTIVE, None)
            if fresh is not None:
                fresh.pop(apply_id, None)
                if not fresh:
                    transformer_options.pop(FRESH, None)

    return apply_model_wrapper


class StepToken:
    """Names one sampler evaluation: the very tensors `calc_cond_batch` got for x and sigma, unmodified since. Two
    calls with equal tokens feed each cond the same branch input (the crop of x for its area, scaled for sigma), so
    a guider that re-runs cond rows in the same step (PerturbedAttentionGuidance) gets them without comparing values
    (each `torch.equal` is a device->host sync). Weak references: the token keeps nothing alive. ComfyUI samples
    under `torch.inference_mode`, whose tensors have no version counter: for them identity and liveness decide alone,
    which holds because a sampler hands each step a new sigma tensor, so a token never spans two steps."""

    def __init__(self, *tensors: Any) -> None:
        self.refs = tuple(weakref.ref(t) if isinstance(t, torch.Tensor) else t for t in tensors)
        self.versions = tuple(t._version if isinstance(t, torch.Tensor) and not t.is_inference() else None
                              for t in tensors)

    def same(self, other: StepToken | None) -> bool:
        if other is None or len(other.refs) != len(self.refs) or other.versions != self.versions:
            return False
        for a, b in zip(self.refs, other.refs):
            if isinstance(a, weakref.ref) and isinstance(b, weakref.ref):
                if a() is None or a() is not b():
                    return False
            elif a is not b:
                return False
        return True


def calc_cond_batch_wrapper(executor: Any, model: Any, conds: list[list[dict[str, Any]]], x_in: torch.Tensor,
                            timestep: Any, model_options: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
    """Record each cond's area (latent pixels) by uuid so the DIFFUSION_MODEL wrapper can crop the branch condition
    for the chunk ComfyUI runs on that area, and the step token that lets same-step calls share branch rows."""
    options = dict(model_options.get("transformer_options", {}))
    areas = {c["uuid"]: tuple(c["area"]) for group in conds if group for c in group
             if c is not None and c.get("area") is not None and "uuid" in c}
    if areas:
        options[AREAS] = areas
    options[STEP] = StepToken(x_in, timestep)
    model_options = dict(model_options, transformer_options=options)
    return executor(model, conds, x_in, timestep, model_options, *args, **kwargs)


REUSE_IDENTICAL_CALLS = True  # reuse branch rows across same-step calls (PAG); tests compare with off


class BranchRowCache:
    """The unscaled residuals of this apply's branch calls in the current step (never more than one step's).

    The branch is a pure function of each row's (input, timestep, context, y): rows are independent (GroupNorm and
    attention never mix batch rows) and the branch gets its own clean transformer_options, so a guider that calls the
    model again in the same step for the same cond (PAG re-runs the cond rows with a perturbed *base* self-attention)
    gets the same residuals. "Same step, same cond" is the step token plus the cond's uuid, never a value
    comparison; the cache is emptied at the end of each sampling run so nothing outlives it."""

    def __init__(self) -> None:
        self.step: StepToken | None = None
        self.calls: list[tuple[tuple[Any, ...], int, tuple[int, ...], dict[str, Any]]] = []

    def clear(self) -> None:
        self.step, self.calls = None, []

    def keep_step(self, step: StepToken | None) -> None:
        """Drop what another step left, before new residuals are made: one step's set alive, not two."""
        if step is None or not step.same(self.step):
            self.clear()
            self.step = step

    def lookup(self, step: StepToken | None, uuids: tuple[Any, ...], per_chunk: int, shape: tuple[int, ...],
               any_step: bool = False) -> dict[str, Any] | None:
        """The cached rows of these conds' chunks: from this very step, or (`any_step`, a step that branch reuse
        skips) from the last step the branch ran."""
        if step is None or not uuids or not (any_step or step.same(self.step)):
            return None
        for cached, rows, cached_shape, out in self.calls:
            if rows != per_chunk or cached_shape != shape or not all(u in cached for u in uuids):
                continue
            index = [cached.index(u) for u in uuids]
            if index == list(range(len(cached))):
                return out
            if index == list(range(index[0], index[0] + len(index))):
                pick = lambda t: t.narrow(0, index[0] * rows, len(index) * rows)  # noqa: E731
            else:
                picked = torch.tensor([i * rows + r for i in index for r in range(rows)], device=out["mid"].device)
                pick = lambda t: t.index_select(0, picked)  # noqa: E731
            return {"down": [pick(r) for r in out["down"]], "mid": pick(out["mid"]), "up": [pick(r) for r in out["up"]],
                    "attention": {k: pick(v) for k, v in out["attention"].items()}, "layout": out["layout"]}
        return None

    def store(self, step: StepToken | None, uuids: tuple[Any, ...], per_chunk: int, shape: tuple[int, ...],
              out: dict[str, Any]) -> None:
        if step is not None and uuids:
            self.keep_step(step)
            self.calls.append((uuids, per_chunk, shape, out))


def make_outer_sample_wrapper(cache: BranchRowCache, run: _Run, branch: Any) -> Callable[..., Any]:
    """At the start of each sampling run: the window from the model_sampling of the model the guider samples (a
    ModelSampling node placed after Apply counts, as it does for ControlNet's `pre_run`), and the condition moved to
    the device once. At the end: nothing of the run is kept."""

    def outer_sample_wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
        patcher = getattr(getattr(executor, "class_obj", None), "model_patcher", None)
        sampling = patcher.get_model_object("model_sampling") if patcher is not None else None
        device = getattr(patcher, "load_device", None)
        cache.clear()
        previous = run.begin(sampling, device, branch.compute_dtype)
        try:
            return executor(*args, **kwargs)
        finally:
            run.end(previous)
            cache.clear()

    return outer_sample_wrapper


def make_wrapper(painternet: Any, run: _Run, scale: float, layout: ComfyLayout,
                 apply_id: int = -1) -> Callable[..., Any]:
    """The DIFFUSION_MODEL wrapper for one apply. It holds the condition in its closure (never in model_options,
    which every clone() deep-copies) and runs the branch only when the APPLY_MODEL wrapper says so. Inside a compiled
    model it does no host-side work: decisions and reused residuals arrive as values, and the branch is traced into
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
            decision = active[apply_id]
        else:  # called without apply_model (direct diffusion_model calls): decide here, eagerly
            decision = _in_range(transformer_options.get("sigmas"), *run.window)
        if scale == 0.0 or decision is False:
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        if decision is True:
            dtype = branch.compute_dtype
            inputs = _branch_input(run.condition, x[:, :4], transformer_options, dtype)
            if run.context is not None:
                ctx = _branch_context(run.context, x.shape[0], transformer_options)
            else:
                ctx = None if context is None else context.to(dtype)
            with torch.no_grad():
                out = branch(inputs, timesteps, ctx, None if y is None else y.to(dtype))
            del inputs, ctx
            if len(out["down"]) != expected_down:
                raise RuntimeError("branch produced an unexpected number of control points")
            out["layout"] = layout
            fresh = transformer_options.get(FRESH)
            if fresh is not None:
                fresh[apply_id] = out
        else:
            out = decision
        transformer_options[RESIDUALS] = list(transformer_options.get(RESIDUALS) or ()) + [(out, scale)]
        try:
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        finally:
            transformer_options.pop(RESIDUALS, None)

    return wrapper


def apply_painternet(model: Any, painternet: Any, condition: torch.Tensor, scale: float, start_percent: float,
                     end_percent: float, *, branch_context: BranchContext | None = None,
                     reuse: BranchReuse | None = None) -> Any:
    """Return a clone of `model` that runs `painternet` with the prepared `condition` (B,5,h,w, scaled latent).

    `branch_context`: the branch's own cond/uncond text context (None: the base's, as PainterNet and BrushNet were
    trained). `reuse`: run the branch on some steps only (None: every step in the window)."""
    import comfy.patcher_extension

    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"start_percent={start_percent} end_percent={end_percent}: need 0 <= start <= end <= 1")
    if branch_context is not None and not isinstance(branch_context, BranchContext):
        raise ValueError(f"branch_context is a {type(branch_context).__name__}; pass a BranchContext or None")
    if reuse is not None and not isinstance(reuse, BranchReuse):
        raise ValueError(f"reuse is a {type(reuse).__name__}; pass a BranchReuse or None")
    patched = model.clone()
    layout = install_layout(patched)
    branch = painternet.patcher.model
    if layout.n_up != len(branch.layer_control_up):
        raise ValueError(f"branch has {len(branch.layer_control_up)} up control points but the model "
                         f"{layout.n_up}; branch and model topologies differ")
    sampling = patched.get_model_object("model_sampling")
    window = (float(sampling.percent_to_sigma(start_percent)), float(sampling.percent_to_sigma(end_percent)))
    run = _Run(condition, branch_context, window, (start_percent, end_percent), sampling, reuse)
    apply_id = next(_APPLY_IDS)
    wrappers = comfy.patcher_extension.WrappersMP
    cache = BranchRowCache()
    patched.add_wrapper_with_key(wrappers.APPLY_MODEL, WRAPPER_KEY, make_apply_model_wrapper(apply_id, run, cache))
    patched.add_wrapper_with_key(wrappers.DIFFUSION_MODEL, WRAPPER_KEY,
                                 make_wrapper(painternet, run, scale, layout, apply_id))
    patched.add_wrapper_with_key(wrappers.OUTER_SAMPLE, WRAPPER_KEY, make_outer_sample_wrapper(cache, run, branch))
    if calc_cond_batch_wrapper not in patched.get_wrappers(wrappers.CALC_COND_BATCH, WRAPPER_KEY):
        patched.add_wrapper_with_key(wrappers.CALC_COND_BATCH, WRAPPER_KEY, calc_cond_batch_wrapper)
    others = patched.get_additional_models_with_key(WRAPPER_KEY)
    patched.set_additional_models(WRAPPER_KEY, others + [painternet.patcher])
    return patched
