"""Actual-Token Attention Loss (ATAL, paper §3.3, Eq. 3-5) and the attention processor that records its maps.

The loss pulls the branch's cross-attention towards the hole: for every cross-attention layer i of the branch,

    L_ATAL = 1/N Σ_i ‖ mean_{j∈S} A_i[:, j] − m_i ‖²

with A_i = softmax(Q Kᵀ/√d) (heads averaged), S the prompt's *actual* tokens (no SOT, EOT or padding) and m_i the hole
mask resized to the layer's resolution. Three choices here are not spelled out by the paper and are documented where
they are made:

* the squared norm is a **sum over pixels** (a pixel mean makes the term ~1e-6 with β = 1e-5 and it does nothing);
* the mask is resized with **area interpolation** (a soft, coverage-weighted target at coarse layers, which is what an
  attention probability averaged over a patch can actually reach; nearest would alias thin masks away);
* the map is computed without materialising the HW×L attention matrix: mean_{j∈S} A[:, j] is an attention *output*
  whose value vector is v_j = 1[j∈S]/|S|, so one extra ``scaled_dot_product_attention`` call (fused kernels, O(HW)
  memory) yields it exactly and differentiably.

Pure PyTorch; diffusers is never imported here — :class:`ATALAttnProcessor` only relies on the ``Attention`` module's
attributes (duck typing), so ``painternet_core`` stays importable without diffusers.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from einops import rearrange

logger = logging.getLogger("painternet")

__all__ = [
    "actual_token_mask",
    "tokenize_with_token_mask",
    "token_mean_attention",
    "infer_map_size",
    "atal_loss",
    "ATALRecorder",
    "ATALAttnProcessor",
    "install_atal_processors",
]

#: Value channels of the indicator attention: fused SDPA kernels want head dims that are multiples of 8.
_VALUE_CHANNELS = 8


# ---------------------------------------------------------------------------------------------------------------------
# The set S of actual tokens
# ---------------------------------------------------------------------------------------------------------------------
def actual_token_mask(
    attention_mask: torch.Tensor | None = None,
    input_ids: torch.Tensor | None = None,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> torch.Tensor:
    """Boolean (B, L) mask of the prompt's actual tokens S: no SOT, no EOT, no padding.

    Why the attention mask and not the ids: SD1.5's CLIP tokenizer pads with EOT (pad id == eos id), so "not a pad id"
    cannot tell padding from the real EOT; SDXL's ``tokenizer_2`` pads with "!" (id 0), which is also a real token.
    The tokenizer's ``attention_mask`` (``padding="max_length", return_attention_mask=True``) marks SOT, the prompt
    and the first EOT in both cases, so S = attended positions minus the first and the last attended one.

    Without an attention mask, ``input_ids`` and ``eos_token_id`` are used instead: S = positions after the first
    token (SOT) and before the first EOT. If both are given, positions whose id equals ``bos_token_id`` or
    ``eos_token_id`` are also removed (a no-op for CLIP tokenizers; a guard for tokenizers that add extra specials).

    Rows whose prompt is empty ("" → SOT, EOT) get an all-False row; the loss excludes them.
    """
    if attention_mask is None and input_ids is None:
        raise ValueError("actual_token_mask needs attention_mask or input_ids; got neither. Pass the tokenizer output "
                         "of tokenizer(prompts, padding='max_length', return_attention_mask=True).")
    if attention_mask is not None:
        if attention_mask.ndim != 2:
            raise ValueError(f"attention_mask must be (B, L); got shape {tuple(attention_mask.shape)}. "
                             "Tokenize a list of prompts, not a single string.")
        attended = attention_mask.bool()
        length = attended.shape[1]
        positions = torch.arange(length, device=attended.device).expand_as(attended)
        big = torch.full_like(positions, length)
        first = torch.where(attended, positions, big).amin(dim=1, keepdim=True)
        last = torch.where(attended, positions, torch.full_like(positions, -1)).amax(dim=1, keepdim=True)
        mask = attended & (positions != first) & (positions != last)
        if input_ids is not None:
            if input_ids.shape != attention_mask.shape:
                raise ValueError(f"input_ids shape {tuple(input_ids.shape)} differs from attention_mask shape "
                                 f"{tuple(attention_mask.shape)}; pass both from the same tokenizer call.")
            for special in (bos_token_id, eos_token_id):
                if special is not None:
                    mask &= input_ids != special
        return mask
    assert input_ids is not None
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (B, L); got shape {tuple(input_ids.shape)}.")
    if eos_token_id is None:
        raise ValueError("actual_token_mask(input_ids=...) without attention_mask needs eos_token_id (e.g. "
                         "tokenizer.eos_token_id) to find where the prompt ends.")
    length = input_ids.shape[1]
    positions = torch.arange(length, device=input_ids.device).expand_as(input_ids)
    is_eos = input_ids == eos_token_id
    # Position 0 is SOT; the first EOT at or after position 1 ends the prompt (no EOT: the row is all prompt).
    is_eos_after_sot = is_eos & (positions >= 1)
    end = torch.where(is_eos_after_sot, positions, torch.full_like(positions, length)).amin(dim=1, keepdim=True)
    mask = (positions >= 1) & (positions < end)
    if bos_token_id is not None:
        mask &= input_ids != bos_token_id
    return mask


def tokenize_with_token_mask(tokenizer: Any, prompts: Sequence[str],
                             max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize ``prompts`` the way the UNet expects (max-length padding, truncation) and return (input_ids, S mask).

    Why a helper: the S mask must come from the *same* call that made the ids the text encoder sees, with the
    attention mask requested explicitly; doing it in one place keeps SD1.5 and SDXL's two tokenizers consistent.
    ``tokenizer`` is any Hugging Face tokenizer (duck-typed; transformers is not imported here).
    """
    if isinstance(prompts, str):
        raise ValueError(f"prompts must be a list of strings, got the single string {prompts!r}; wrap it in a list.")
    out = tokenizer(list(prompts), padding="max_length", truncation=True,
                    max_length=max_length or tokenizer.model_max_length, return_attention_mask=True,
                    return_tensors="pt")
    mask = actual_token_mask(out["attention_mask"], out["input_ids"], bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    return out["input_ids"], mask


# ---------------------------------------------------------------------------------------------------------------------
# The token-mean map and the loss
# ---------------------------------------------------------------------------------------------------------------------
def token_mean_attention(query: torch.Tensor, key: torch.Tensor, token_mask: torch.Tensor,
                         scale: float | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Exact mean_{j∈S} softmax(Q Kᵀ·scale)[:, j], heads averaged, as a (B, HW) map — without an HW×L matrix.

    Why it is exact: attention output = A V; with V[j] = 1[j∈S]/|S| in one channel it is Σ_j A[:, j]·1[j∈S]/|S|, the
    token mean. The value is padded with zero channels to 8 so fused SDPA kernels accept it; gradients flow to Q and K
    through the same kernel. ``query`` (B, heads, HW, d), ``key`` (B, heads, L, d), ``token_mask`` (B, L) bool;
    ``scale`` defaults to 1/√d like SDPA; ``attn_mask`` is passed through to SDPA (same as the main attention).
    Rows with an empty S give a zero map.
    """
    if query.ndim != 4 or key.ndim != 4:
        raise ValueError(f"query and key must be (B, heads, tokens, d); got {tuple(query.shape)} and "
                         f"{tuple(key.shape)}. Split heads first (diffusers: view(B, -1, heads, d).transpose(1, 2)).")
    batch, heads, length = key.shape[0], key.shape[1], key.shape[2]
    if token_mask.shape != (batch, length):
        raise ValueError(f"token_mask must be (B, L) = ({batch}, {length}) to match key; got "
                         f"{tuple(token_mask.shape)}. Build it from the same tokenizer call as the text embeddings.")
    weights = token_mask.to(device=key.device, dtype=key.dtype)
    weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1.0)
    value = key.new_zeros(batch, heads, length, _VALUE_CHANNELS)
    value[..., 0] = rearrange(weights, "b l -> b 1 l").expand(batch, heads, length)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=0.0, is_causal=False,
                                         scale=scale)
    return out[..., 0].mean(dim=1)


def infer_map_size(tokens: int, height: int, width: int) -> tuple[int, int]:
    """(h, w) of a flattened attention map with ``tokens`` = h·w pixels, for a mask of size (height, width).

    Why a search: diffusers flattens the spatial dims before attention, so a recorded map does not carry its shape.
    Each UNet level halves the latent with ceil rounding (stride-2 conv, padding 1), so the map is
    (ceil(H/s), ceil(W/s)) for a power of two s; the unique s that matches ``tokens`` gives the shape.
    """
    for power in range(0, 16):
        factor = 2 ** power
        h, w = math.ceil(height / factor), math.ceil(width / factor)
        if h * w == tokens:
            return h, w
        if h * w < tokens:
            break
    raise ValueError(f"cannot place an attention map of {tokens} pixels on a {height}x{width} mask: no power-of-two "
                     "downscale of the mask has that many pixels. Pass maps as (B, h, w) to give their shape.")


def atal_loss(maps: Sequence[torch.Tensor], mask: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """L_ATAL = mean over layers and over valid samples of Σ_pixels (map − m_i)², in fp32 (paper Eq. 4).

    ``maps``: per layer (B, HW) (shape inferred with :func:`infer_map_size`) or (B, h, w).
    ``mask``: (B, 1, H, W) or (B, H, W) float, 1 = hole, at any size ≥ the maps (pixel or latent size).
    ``valid``: (B,) bool, False for samples whose prompt was dropped or whose S is empty; None = all valid.
    m_i is the mask area-resized to the map (see module docstring). With no valid sample the result is a zero that is
    still connected to the maps, so every rank runs the same backward graph (DDP/FSDP need that).
    """
    with torch.autocast(device_type=mask.device.type, enabled=False):  # fp32 whatever the training autocast
        return _atal_loss(maps, mask, valid)


def _atal_loss(maps: Sequence[torch.Tensor], mask: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if len(maps) == 0:
        raise ValueError("atal_loss got no attention maps; install ATALAttnProcessor on the branch's cross-attention "
                         "(install_atal_processors) and run the branch inside recorder.record(...).")
    if mask.ndim == 3:
        mask = rearrange(mask, "b h w -> b 1 h w")
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be (B, 1, H, W) or (B, H, W); got shape {tuple(mask.shape)}.")
    batch, _, height, width = mask.shape
    if valid is None:
        valid = torch.ones(batch, dtype=torch.bool, device=mask.device)
    if valid.shape != (batch,):
        raise ValueError(f"valid must be a (B,) = ({batch},) bool tensor; got shape {tuple(valid.shape)}.")
    weights = valid.to(device=mask.device, dtype=torch.float64)
    count = weights.sum()
    per_layer = []
    for index, layer_map in enumerate(maps):
        if layer_map.shape[0] != batch:
            raise ValueError(f"map {index} has batch {layer_map.shape[0]} but the mask has {batch}; record maps for "
                             "the same batch (with CFG-style doubled batches, split them first).")
        if layer_map.ndim == 2:
            h, w = infer_map_size(layer_map.shape[1], height, width)
            layer_map = rearrange(layer_map, "b (h w) -> b h w", h=h, w=w)
        elif layer_map.ndim != 3:
            raise ValueError(f"map {index} must be (B, HW) or (B, h, w); got shape {tuple(layer_map.shape)}.")
        h, w = layer_map.shape[1:]
        dtype = torch.promote_types(layer_map.dtype, torch.float32)  # fp32 at least (bf16 maps), fp64 kept
        target = F.interpolate(mask.to(dtype), size=(h, w), mode="area")[:, 0]
        squared = (layer_map.to(dtype) - target).pow(2).sum(dim=(1, 2))
        per_layer.append((squared * weights.to(dtype)).sum() / count.to(dtype).clamp_min(1.0))
    return torch.stack(per_layer).mean()


# ---------------------------------------------------------------------------------------------------------------------
# Recording maps inside a diffusers model
# ---------------------------------------------------------------------------------------------------------------------
class ATALRecorder:
    """Shared state between the trainer and the branch's :class:`ATALAttnProcessor` instances.

    Why a dict keyed by layer name: with gradient checkpointing the processors run again during backward; writing
    ``maps[name] = ...`` makes that recomputation overwrite an entry instead of appending a duplicate layer. The
    recorder must stay active (same token mask) until ``backward()`` has run, so the recomputed forward is the same
    graph as the first one (non-reentrant checkpointing checks that); :meth:`record` scopes that.
    """

    def __init__(self, map_dtype: torch.dtype | None = torch.float32) -> None:
        #: dtype the map attention runs in (None = the query's dtype). fp32 keeps the small map values precise under
        #: bf16 training at the cost of an fp32 copy of Q and K for one extra SDPA call.
        self.map_dtype = map_dtype
        self.token_mask: torch.Tensor | None = None
        self.maps: dict[str, torch.Tensor] = {}

    def __deepcopy__(self, memo: dict[int, Any]) -> ATALRecorder:
        """A recorder is a shared handle: deep-copying a model that holds ATAL processors (EMA copies, test
        fixtures) must keep them reporting to the trainer's recorder, not to a private copy nobody reads."""
        return self

    @property
    def active(self) -> bool:
        """True while a token mask is set: processors record maps only then."""
        return self.token_mask is not None

    def start(self, token_mask: torch.Tensor) -> None:
        """Begin recording for one batch; ``token_mask`` (B, L) bool from :func:`actual_token_mask`."""
        if token_mask.ndim != 2:
            raise ValueError(f"token_mask must be (B, L); got shape {tuple(token_mask.shape)}.")
        self.token_mask = token_mask.bool()
        self.maps = {}

    def stop(self) -> None:
        """End recording and drop the maps (and with them the graph they hold)."""
        self.token_mask = None
        self.maps = {}

    @contextmanager
    def record(self, token_mask: torch.Tensor) -> Iterator[ATALRecorder]:
        """``with recorder.record(mask): forward; loss; backward`` — recording on inside, off afterwards."""
        self.start(token_mask)
        try:
            yield self
        finally:
            self.stop()

    def ordered_maps(self) -> list[torch.Tensor]:
        """The recorded maps in recording order (one per cross-attention layer that ran)."""
        return list(self.maps.values())

    def store(self, name: str, layer_map: torch.Tensor) -> None:
        """Record (or, on checkpoint recomputation, replace) the map of layer ``name``."""
        self.maps[name] = layer_map


class _AttentionLike(Protocol):
    """The attributes of a diffusers ``Attention`` module that the processor uses (no diffusers import needed)."""

    heads: int
    spatial_norm: Any
    group_norm: Any
    norm_cross: Any
    norm_q: Any
    norm_k: Any
    to_q: Any
    to_k: Any
    to_v: Any
    to_out: Any
    residual_connection: bool
    rescale_output_factor: float

    def prepare_attention_mask(self, attention_mask: torch.Tensor, target_length: int,
                               batch_size: int) -> torch.Tensor: ...

    def norm_encoder_hidden_states(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor: ...


class ATALAttnProcessor:
    """diffusers attention processor: the math of ``AttnProcessor2_0`` plus, for cross-attention while the shared
    :class:`ATALRecorder` is active, the token-mean map of the same Q and K stored under ``name``.

    Why a processor and not hooks: the map needs the head-split Q and K (post ``norm_q``/``norm_k``), which exist only
    inside the processor; recomputing them from module hooks would double the projection cost.
    """

    def __init__(self, recorder: ATALRecorder, name: str) -> None:
        self.recorder = recorder
        self.name = name

    def __call__(self, attn: _AttentionLike, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 temb: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        is_cross = encoder_hidden_states is not None
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = rearrange(hidden_states, "b c h w -> b (h w) c")
        batch_size, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                          else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        heads = attn.heads
        query = rearrange(query, "b n (h d) -> b h n d", h=heads)
        key = rearrange(key, "b n (h d) -> b h n d", h=heads)
        value = rearrange(value, "b n (h d) -> b h n d", h=heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                             is_causal=False)

        if is_cross and self.recorder.active:
            self._record(query, key, attention_mask)

        out = rearrange(out, "b h n d -> b n (h d)").to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = rearrange(out, "b (h w) c -> b c h w", h=height, w=width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _record(self, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        token_mask = self.recorder.token_mask
        assert token_mask is not None
        if token_mask.shape != (key.shape[0], key.shape[2]):
            raise ValueError(f"ATAL token mask has shape {tuple(token_mask.shape)} but layer {self.name} attends to "
                             f"(B, L) = ({key.shape[0]}, {key.shape[2]}); start the recorder with the mask of the "
                             "prompts actually encoded for this batch.")
        dtype = self.recorder.map_dtype or query.dtype
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.to(dtype)  # an additive bias must match the map's dtype
        # Autocast would recast the fp32 copies to bf16/fp16 inside SDPA; the map's precision is the point here.
        with torch.autocast(device_type=query.device.type, enabled=False):
            layer_map = token_mean_attention(query.to(dtype), key.to(dtype), token_mask.to(query.device),
                                             attn_mask=attention_mask)
        self.recorder.store(self.name, layer_map)


def install_atal_processors(model: Any, recorder: ATALRecorder) -> list[str]:
    """Put an :class:`ATALAttnProcessor` on every cross-attention (``attn2``) of a module tree; keep the rest.

    Why only attn2: ATAL is defined on the text cross-attention maps; self-attention processors are left untouched.
    ``model`` is any ``nn.Module`` containing diffusers ``Attention`` modules named ``...attn2`` (the PainterNet
    branch, a UNet2DConditionModel). Returns the layer names in module order; they are the recorder's keys.
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"install_atal_processors needs an nn.Module (the PainterNet branch); got "
                         f"{type(model).__name__}.")
    names = []
    for name, module in model.named_modules():
        if name.split(".")[-1] == "attn2" and hasattr(module, "set_processor"):
            module.set_processor(ATALAttnProcessor(recorder, name))
            names.append(name)
    if not names:
        raise ValueError(f"{type(model).__name__} has no cross-attention (attn2) layers; ATAL needs a branch that "
                         "keeps cross-attention (PainterNet, not BrushNet).")
    logger.debug("ATAL processors installed on %d cross-attention layers", len(names))
    return names
