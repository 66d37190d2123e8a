"""The branch configuration: everything needed to rebuild a branch and to prepare its condition.

It travels inside every checkpoint as JSON metadata (see `checkpoint.py`), so the loader never guesses the topology
from file names or tensor shapes when the file is one of ours.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

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
            raise ValueError(f"family={self.family!r}: expected 'sd15' or 'sdxl'")
        if self.mask_polarity not in ("hole", "known"):
            raise ValueError(f"mask_polarity={self.mask_polarity!r}: expected 'hole' or 'known'")
        if self.mask_resize not in ("nearest", "area"):
            raise ValueError(f"mask_resize={self.mask_resize!r}: expected 'nearest' or 'area'")
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
        except json.JSONDecodeError as exc:
            raise ValueError(f"painternet_config metadata is not valid JSON ({exc}); the file is damaged") from exc
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"painternet_config has unknown fields {unknown}; the file was written by a newer PainterNet, "
                "update the pack"
            )
        return cls(**data)

    @classmethod
    def from_unet_config(cls, unet_config: Mapping[str, Any], **kwargs: Any) -> "PainterNetConfig":
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
