"""The branch configuration: everything needed to rebuild a branch and to prepare its condition.

It travels inside every checkpoint as JSON metadata (see `checkpoint.py`), so the loader never guesses the topology
from file names or tensor shapes when the file is one of ours.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from .errors import quote

Family = Literal["sd15", "sdxl"]
MaskPolarity = Literal["hole", "known"]
MaskResize = Literal["nearest", "area"]

FORMAT_VERSION = 1

# The diffusers UNet2DConditionModel config keys that fix the topology of the copy. Everything else in a diffusers
# config (class names, versions, sample_size) is irrelevant to the weights and is dropped.
_TOPOLOGY_KEYS = (
    "act_fn", "addition_embed_type", "addition_embed_type_num_heads", "addition_time_embed_dim", "attention_head_dim",
    "block_out_channels", "center_input_sample", "class_embed_type", "cross_attention_dim", "down_block_types",
    "downsample_padding", "dual_cross_attention", "encoder_hid_dim", "encoder_hid_dim_type", "flip_sin_to_cos",
    "freq_shift", "in_channels", "layers_per_block", "mid_block_scale_factor", "mid_block_type", "norm_eps",
    "norm_num_groups", "num_attention_heads", "num_class_embeds", "only_cross_attention", "out_channels",
    "projection_class_embeddings_input_dim", "resnet_time_scale_shift", "time_embedding_type",
    "transformer_layers_per_block", "up_block_types", "upcast_attention", "use_linear_projection",
)

SD15_UNET: dict[str, Any] = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 768, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                      "CrossAttnDownBlock2D", "DownBlock2D"],
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-5, "norm_num_groups": 32, "out_channels": 4,
    "transformer_layers_per_block": 1,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": False,
}

SDXL_UNET: dict[str, Any] = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-5, "norm_num_groups": 32, "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}


# Bounds a stored topology must respect before anything is built from it (a shared file is untrusted input). They are
# far above SD1.5 (4 blocks x 2 layers, 1280 channels, depth 1) and SDXL (3 blocks x 2 layers, depth 10) but keep the
# cost of building the reference branch on the meta device small, whatever a file claims.
MAX_BLOCKS = 6
MAX_CHANNELS = 4096
MAX_LAYERS_PER_BLOCK = 4
MAX_TRANSFORMER_DEPTH = 16
MAX_HEADS = 256
MAX_CROSS_ATTENTION_DIM = 8192
MAX_EMBED_DIM = 16384
_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
SOURCE_FORMATS = ("painternet", "brushnet", "powerpaint-ca")
# What ComfyUI's UNet blocks (comfy/ldm/modules/diffusionmodules/openaimodel.py, util.py), from which the loader node
# rebuilds the branch, can run: a value is (the values honoured, what ComfyUI hard-codes). diffusers builds any of the
# others without complaint, so a trainer left to accept them would train a network the node does not run.
_COMFY_FIXED: dict[str, tuple[tuple[Any, ...], str]] = {
    "act_fn": (("silu",), "SiLU activations"),
    "center_input_sample": ((False,), "no input centring"),
    "class_embed_type": ((None,), "no class embedding"),
    "dual_cross_attention": ((False, None), "one cross-attention"),
    "encoder_hid_dim": ((None,), "no encoder projection"),
    "encoder_hid_dim_type": ((None,), "no encoder projection"),
    "num_class_embeds": ((None,), "no class embedding"),
    "only_cross_attention": ((False,), "self- then cross-attention in every transformer block"),
    "resnet_time_scale_shift": (("default",), "resnets that add the time embedding"),
    "time_embedding_type": (("positional",), "a sinusoidal timestep embedding"),
    "addition_embed_type": ((None, "text_time"), "SD1.5 or SDXL added conditioning"),
    "norm_num_groups": ((32,), "GroupNorm(32) in every resnet and transformer"),
    "norm_eps": ((1e-5,), "the resnets' GroupNorm eps 1e-5"),
    "flip_sin_to_cos": ((True,), "a cos-first timestep embedding"),
    "freq_shift": ((0,), "an unshifted timestep embedding"),
    "downsample_padding": ((1,), "stride-2 downsampling convs padded by 1"),
    "mid_block_scale_factor": ((1,), "mid-block resnets without an output scale"),
    "upcast_attention": ((False, None), "attention in the compute dtype, no per-model upcast"),
    "mid_block_type": (("UNetMidBlock2DCrossAttn",), "a resnet-transformer-resnet mid block"),
    # diffusers options that a PainterNet config does not store (the trainer drops them), checked on the base UNet
    # the trainer copies: anything but diffusers' default would leave the copy different from its base.
    "conv_in_kernel": ((3,), "a 3x3 conv_in"),
    "conv_out_kernel": ((3,), "a 3x3 conv_out"),
    "time_embedding_dim": ((None,), "a time embedding 4x the first block's channels"),
    "time_embedding_act_fn": ((None,), "no activation after the time embedding"),
    "timestep_post_act": ((None,), "no activation inside the time embedding's output"),
    "time_cond_proj_dim": ((None,), "no timestep-condition projection"),
    "resnet_skip_time_act": ((False,), "resnets that activate the time embedding"),
    "resnet_out_scale_factor": ((1,), "resnets without an output scale"),
    "attention_type": (("default",), "plain cross-attention transformer blocks"),
    "mid_block_only_cross_attention": ((None, False), "self- then cross-attention in the mid block"),
    "cross_attention_norm": ((None,), "no norm on the cross-attention context"),
    "class_embeddings_concat": ((False,), "no class embedding"),
    "reverse_transformer_layers_per_block": ((None,), "up-block transformer depths mirroring the down blocks"),
}


def check_comfy_supported(unet_config: Mapping[str, Any]) -> None:
    """Refuse, in one line naming the field, its value and what is supported, a UNet config value that ComfyUI's
    rebuild of the branch would silently ignore.

    Why one function for both ends: the loader runs it on a file's stored topology (through `validate_unet`) and the
    trainer on the base UNet's full diffusers config before it copies anything (`PainterNetConfig.from_unet_config`),
    so a branch that trains is a branch the node runs as trained. Head counts are checked too: ComfyUI's UNet takes
    one head count for every block or one head size.
    """
    for key, (allowed, meaning) in _COMFY_FIXED.items():
        if key in unet_config and not any(_same(unet_config[key], a) for a in allowed):
            supported = " or ".join(json.dumps(a) for a in allowed)
            raise ValueError(f"unet.{key}={quote(unet_config[key])} is not supported: ComfyUI's UNet blocks, from "
                             f"which the PainterNet node rebuilds the branch, only run {key}={supported} ({meaning}); "
                             "train from an SD1.5- or SDXL-style UNet that uses it")
    channels, heads = unet_config.get("block_out_channels"), unet_config.get("num_attention_heads")
    heads = heads if heads is not None else unet_config.get("attention_head_dim")
    if isinstance(channels, (list, tuple)) and isinstance(heads, (list, tuple)) and len(heads) == len(channels) \
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (*channels, *heads)) \
            and len(set(heads)) > 1 and len({c / h for c, h in zip(channels, heads)}) > 1:
        raise ValueError(f"unet attention heads {quote(list(heads))} over block_out_channels {quote(list(channels))} "
                         "are not supported: ComfyUI's UNet blocks, from which the PainterNet node rebuilds the branch, "
                         "need one head count for every block or one head size (channels / heads) for every block")


def _same(value: Any, allowed: Any) -> bool:
    """Equal and of the same kind: True is not the integer 1 here, nor 0 the boolean False."""
    return value == allowed and isinstance(value, bool) == isinstance(allowed, bool)


def _int(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"painternet_config unet.{name}={quote(value)} must be an integer in [{low}, {high}]; "
                         "the file is damaged or not a supported SD1.5/SDXL branch")
    return value


def _ints(value: Any, name: str, n: int, low: int, high: int) -> list[int]:
    """An int or a list of n ints (diffusers allows both), each within [low, high]."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"painternet_config unet.{name} has {len(value)} entries, expected {n} (one per "
                             f"block): {quote(value)}; the file is damaged")
        return [_int(v, f"{name}[{i}]", low, high) for i, v in enumerate(value)]
    return [_int(value, name, low, high)] * n


def _number(value: Any, name: str, low: float, high: float) -> float:
    # An int is finite at any size and compares exactly with the bounds; math.isfinite(10**400) would raise
    # OverflowError instead of naming the field.
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or (isinstance(value, float) and not math.isfinite(value)) or not low <= value <= high:
        raise ValueError(f"painternet_config {name}={quote(value)} must be a finite number in [{low}, {high}]; "
                         "the file is damaged")
    return float(value)


def validate_unet(unet: Any) -> None:
    """Refuse a topology outside sane bounds or of the wrong types, naming the field, before anything is built.

    Every field the branch builders read is checked here, so a malformed or lying config is a ValueError and never
    a TypeError/ZeroDivisionError from deep inside a constructor, nor a multi-gigabyte model built for nothing.
    """
    if not isinstance(unet, dict):
        raise ValueError(f"painternet_config unet must be an object, got {quote(unet)}; the file is damaged")
    unknown = sorted(k for k in unet if k not in _TOPOLOGY_KEYS)
    if unknown:
        raise ValueError(f"painternet_config unet has unknown keys {quote(unknown)}; the file was written by a newer "
                         "PainterNet (update the pack) or is damaged")
    for key in ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
                "cross_attention_dim"):
        if key not in unet:
            raise ValueError(f"painternet_config unet has no {key!r}; the file is damaged")
    try:
        check_comfy_supported(unet)
    except ValueError as exc:
        raise ValueError(f"painternet_config {exc}") from None
    channels = unet["block_out_channels"]
    if not isinstance(channels, (list, tuple)) or not 1 <= len(channels) <= MAX_BLOCKS:
        raise ValueError(f"painternet_config unet.block_out_channels={quote(channels)} must be a list of 1 to "
                         f"{MAX_BLOCKS} channel counts; the file is damaged")
    n = len(channels)
    channels = [_int(c, f"block_out_channels[{i}]", 1, MAX_CHANNELS) for i, c in enumerate(channels)]
    groups = _int(unet.get("norm_num_groups", 32), "norm_num_groups", 1, 128)
    for i, c in enumerate(channels):
        if c % groups or c % channels[0]:
            raise ValueError(f"painternet_config unet.block_out_channels={channels}: entry {i} ({c}) must be a multiple "
                             f"of norm_num_groups ({groups}) and of the first entry; the file is damaged")
    for key, allowed in (("down_block_types", _DOWN_TYPES), ("up_block_types", _UP_TYPES)):
        types = unet[key]
        if not isinstance(types, (list, tuple)) or len(types) != n or any(t not in allowed for t in types):
            raise ValueError(f"painternet_config unet.{key}={quote(types)} must list {n} of {list(allowed)}")
    _ints(unet["layers_per_block"], "layers_per_block", n, 1, MAX_LAYERS_PER_BLOCK)
    _ints(unet.get("transformer_layers_per_block", 1), "transformer_layers_per_block", n, 1, MAX_TRANSFORMER_DEPTH)
    heads_key = "num_attention_heads" if unet.get("num_attention_heads") is not None else "attention_head_dim"
    if heads_key not in unet:
        raise ValueError("painternet_config unet has neither attention_head_dim nor num_attention_heads; the file is "
                         "damaged")
    heads = _ints(unet[heads_key], heads_key, n, 1, MAX_HEADS)
    for i, (c, h) in enumerate(zip(channels, heads)):
        if c % h:
            raise ValueError(f"painternet_config unet.{heads_key}[{i}]={h} does not divide {c} channels")
    _int(unet["cross_attention_dim"], "cross_attention_dim", 1, MAX_CROSS_ATTENTION_DIM)
    for key in ("in_channels", "out_channels"):
        if key in unet:
            _int(unet[key], key, 1, 16)
    if "norm_eps" in unet:
        _number(unet["norm_eps"], "unet.norm_eps", 1e-12, 1.0)
    for key in ("freq_shift", "mid_block_scale_factor", "downsample_padding"):
        if key in unet:
            _number(unet[key], f"unet.{key}", -16, 16)
    for key in ("flip_sin_to_cos", "use_linear_projection", "upcast_attention"):
        if key in unet and not isinstance(unet[key], bool) and unet[key] is not None:
            raise ValueError(f"painternet_config unet.{key}={quote(unet[key])} must be true or false")
    if unet.get("addition_embed_type") == "text_time":
        _int(unet.get("addition_time_embed_dim"), "addition_time_embed_dim", 1, MAX_EMBED_DIM)
        _int(unet.get("projection_class_embeddings_input_dim"), "projection_class_embeddings_input_dim", 1,
             MAX_EMBED_DIM)
    if unet.get("addition_embed_type_num_heads") is not None:
        _int(unet["addition_embed_type_num_heads"], "addition_embed_type_num_heads", 1, MAX_HEADS)


def unet_topology(unet_config: Mapping[str, Any]) -> dict[str, Any]:
    """The topology subset of a diffusers UNet config, with tuples turned into lists so it survives JSON."""
    out: dict[str, Any] = {}
    for key in _TOPOLOGY_KEYS:
        if key in unet_config:
            value = unet_config[key]
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def infer_family(unet_config: Mapping[str, Any]) -> Family:
    """SDXL-style UNets condition on text_time embeddings; SD1.5-style ones do not. Anything else is refused."""
    if unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if unet_config.get("addition_embed_type") is None and unet_config.get("class_embed_type") is None:
        return "sd15"
    raise ValueError(
        f"unsupported UNet: addition_embed_type={unet_config.get('addition_embed_type')!r}, "
        f"class_embed_type={unet_config.get('class_embed_type')!r}; PainterNet supports SD1.5- and SDXL-style UNets"
    )


@dataclass(frozen=True)
class ControlLayout:
    """Channels of every control point, in injection order (DESIGN §3)."""

    down: tuple[int, ...]
    mid: int
    up: tuple[int, ...]
    attention: tuple[int, ...]


def _per_block(value: Any, n: int) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def control_layout(unet_config: Mapping[str, Any], with_attention: bool) -> ControlLayout:
    """Derive the layer control points (after conv_in, each layer, each down/upsampler, the mid block) and the ACP
    channels (one per cross-attention transformer block of the base, in the base's attn2 order).

    The ACP count follows the *base* topology, so `with_attention=False` (BrushNet) gives none at all.
    """
    channels = list(unet_config["block_out_channels"])
    n = len(channels)
    layers = _per_block(unet_config["layers_per_block"], n)
    depth = _per_block(unet_config.get("transformer_layers_per_block", 1), n)
    down_types = list(unet_config["down_block_types"])
    up_types = list(unet_config["up_block_types"])

    down = [channels[0]]
    attention: list[int] = []
    for i in range(n):
        for _ in range(layers[i]):
            down.append(channels[i])
            if "CrossAttn" in down_types[i]:
                attention += [channels[i]] * depth[i]
        if i < n - 1:
            down.append(channels[i])
    if unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn":
        attention += [channels[-1]] * depth[-1]
    up = []
    rev_channels, rev_layers, rev_depth = channels[::-1], layers[::-1], depth[::-1]
    for i in range(n):
        for _ in range(rev_layers[i] + 1):
            up.append(rev_channels[i])
            if "CrossAttn" in up_types[i]:
                attention += [rev_channels[i]] * rev_depth[i]
        if i < n - 1:
            up.append(rev_channels[i])
    return ControlLayout(tuple(down), channels[-1], tuple(up), tuple(attention) if with_attention else ())


@dataclass(frozen=True)
class PainterNetConfig:
    """Frozen description of a branch; serialised into the checkpoint's `painternet_config` metadata.

    `unet` is the diffusers topology of the base UNet the branch was copied from (`in_channels` of the *base*, 4).
    `cross_attention=False` describes BrushNet-style branches whose copy has no attention at all.
    """

    family: Family
    unet: Mapping[str, Any] = field(hash=False)
    cross_attention: bool = True
    attention_control: bool = True
    mask_polarity: MaskPolarity = "hole"
    mask_resize: MaskResize = "area"
    masked_fill: float = 0.0
    source_format: str = "painternet"

    def __post_init__(self) -> None:
        if self.family not in ("sd15", "sdxl"):
            raise ValueError(f"family={quote(self.family)}: expected 'sd15' or 'sdxl'")
        if self.mask_polarity not in ("hole", "known"):
            raise ValueError(f"mask_polarity={quote(self.mask_polarity)}: expected 'hole' or 'known'")
        if self.mask_resize not in ("nearest", "area"):
            raise ValueError(f"mask_resize={quote(self.mask_resize)}: expected 'nearest' or 'area'")
        for name in ("cross_attention", "attention_control"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={quote(getattr(self, name))}: expected true or false")
        _number(self.masked_fill, "masked_fill", -1.0, 2.0)
        if self.source_format not in SOURCE_FORMATS:
            raise ValueError(f"source_format={quote(self.source_format)}: expected one of {list(SOURCE_FORMATS)}")
        validate_unet(self.unet if not isinstance(self.unet, Mapping) else dict(self.unet))
        if self.attention_control and not self.cross_attention:
            raise ValueError("attention_control=True needs cross_attention=True: ACP reads the branch's attn2 outputs")
        if infer_family(self.unet) != self.family:
            raise ValueError(f"family={self.family!r} does not match the UNet topology ({infer_family(self.unet)!r})")

    @property
    def layout(self) -> ControlLayout:
        return control_layout(self.unet, with_attention=self.attention_control)

    @property
    def branch_unet_config(self) -> dict[str, Any]:
        """The diffusers config of the branch's UNet copy: 9 input channels and, for BrushNet, no attention."""
        cfg = dict(self.unet)
        cfg["in_channels"] = 9
        if not self.cross_attention:
            cfg["down_block_types"] = ["DownBlock2D"] * len(cfg["down_block_types"])
            cfg["up_block_types"] = ["UpBlock2D"] * len(cfg["up_block_types"])
            cfg["mid_block_type"] = "UNetMidBlock2D"
        return cfg

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["unet"] = dict(self.unet)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PainterNetConfig":
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"painternet_config metadata is not valid JSON ({quote(str(exc))}); the file is "
                             "damaged") from None
        if not isinstance(data, dict):
            raise ValueError(f"painternet_config metadata must be a JSON object, got {quote(data)}; the file is damaged")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"painternet_config has unknown fields {unknown}; the file was written by a newer PainterNet, "
                "update the pack"
            )
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.name not in data and f.default is dataclasses.MISSING)
        if missing:
            raise ValueError(f"painternet_config has no {missing}; the file is damaged, re-export it")
        return cls(**data)

    @classmethod
    def from_unet_config(cls, unet_config: Mapping[str, Any], **kwargs: Any) -> "PainterNetConfig":
        check_comfy_supported(unet_config)
        topo = unet_topology(unet_config)
        topo["in_channels"] = 4
        return cls(family=infer_family(topo), unet=topo, **kwargs)


# Tiny topologies of the same families, for tests and the CPU smoke preset of the trainer: every control-point count
# (12/1/15 and 16 ACPs for SD1.5, 9/1/11 and 70 ACPs for SDXL) equals the real model's. Channels stay multiples of 32:
# ComfyUI's blocks hard-code 32 GroupNorm groups.
TINY_SD15_UNET: dict[str, Any] = dict(
    SD15_UNET, block_out_channels=[32, 32, 64, 64], attention_head_dim=8, cross_attention_dim=32,
)
TINY_SDXL_UNET: dict[str, Any] = dict(
    SDXL_UNET, block_out_channels=[32, 32, 64], attention_head_dim=[2, 2, 4], cross_attention_dim=64,
    addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
)
