"""The PainterNet branch rebuilt from ComfyUI's own UNet blocks, so it follows ComfyUI's dtype, cast and memory rules
exactly like a ControlNet does, plus the checks that a branch fits the base it is applied to."""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from painternet_core.checkpoint import check_layout
from painternet_core.config import ControlLayout, PainterNetConfig

logger = logging.getLogger("painternet")

# The unet_config keys that fix the tensors the branch produces and consumes; the base must match on these.
_LAYER_SIGNATURE = ("model_channels", "channel_mult", "num_res_blocks", "adm_in_channels")
_ATTENTION_SIGNATURE = ("transformer_depth", "transformer_depth_output", "transformer_depth_middle", "context_dim",
                        "use_linear_in_transformer")


def _per_block(value: Any, n: int) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def comfy_unet_config(unet: dict[str, Any], in_channels: int, with_attention: bool = True) -> dict[str, Any]:
    """Translate a diffusers UNet topology into the `unet_config` ComfyUI's `UNetModel` takes."""
    channels = list(unet["block_out_channels"])
    n = len(channels)
    layers = _per_block(unet["layers_per_block"], n)
    depth = _per_block(unet.get("transformer_layers_per_block", 1), n)
    heads = _per_block(unet.get("num_attention_heads") or unet["attention_head_dim"], n)
    down_attn = ["CrossAttn" in t for t in unet["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in unet["up_block_types"]][::-1]
    transformer_depth, transformer_depth_output = [], []
    for i in range(n):
        transformer_depth += [depth[i] if down_attn[i] and with_attention else 0] * layers[i]
        transformer_depth_output += [depth[i] if up_attn[i] and with_attention else 0] * (layers[i] + 1)
    cfg: dict[str, Any] = {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "in_channels": in_channels, "out_channels": unet.get("out_channels", 4), "model_channels": channels[0],
        "num_res_blocks": layers, "channel_mult": [c // channels[0] for c in channels],
        "transformer_depth": transformer_depth, "transformer_depth_output": transformer_depth_output,
        "transformer_depth_middle": depth[-1] if with_attention else 0,
        "context_dim": unet["cross_attention_dim"], "use_linear_in_transformer": bool(unet.get("use_linear_projection")),
        "adm_in_channels": None, "use_temporal_attention": False, "use_temporal_resblock": False,
    }
    if len(set(heads)) == 1:
        cfg["num_heads"], cfg["num_head_channels"] = heads[0], -1
    else:
        head_dims = {c // h for c, h in zip(channels, heads)}
        if len(head_dims) != 1:
            raise ValueError(f"attention heads {heads} over channels {channels} have no common head size")
        cfg["num_heads"], cfg["num_head_channels"] = -1, head_dims.pop()
    if unet.get("addition_embed_type") == "text_time":
        cfg["num_classes"] = "sequential"
        cfg["adm_in_channels"] = unet["projection_class_embeddings_input_dim"]
    return cfg


def check_base(model_patcher: Any, config: PainterNetConfig) -> None:
    """Refuse a base the branch cannot drive, naming what was found: wrong family, an SDXL/SD1.5 variant with another
    UNet (SSD-1B, Vega, KOALA pass the isinstance test), or a fine-tune of a different size."""
    import comfy.supported_models as sm

    model_config = model_patcher.model.model_config
    found = type(model_config).__name__
    wanted = {"sd15": sm.SD15, "sdxl": sm.SDXL}[config.family]
    other = "sdxl" if config.family == "sd15" else "sd15"
    other_cls = {"sd15": sm.SD15, "sdxl": sm.SDXL}[other]
    if not isinstance(model_config, wanted):
        if isinstance(model_config, other_cls):
            raise ValueError(f"this PainterNet branch is for {config.family.upper()} but the model is {found} "
                             f"({other.upper()}); load a {config.family.upper()} checkpoint or a branch trained "
                             f"for {other.upper()}")
        raise ValueError(f"model family {found} is not supported: PainterNet supports SD1.5 and SDXL checkpoints "
                         f"(this branch is for {config.family.upper()})")
    expected = comfy_unet_config(config.unet, in_channels=4)
    base = model_config.unet_config
    keys = _LAYER_SIGNATURE + (_ATTENTION_SIGNATURE if config.cross_attention else ())
    diffs = {k: (base.get(k), expected.get(k)) for k in keys if _norm(base.get(k)) != _norm(expected.get(k))}
    if diffs:
        detail = ", ".join(f"{k}: model {b!r} vs branch {e!r}" for k, (b, e) in diffs.items())
        raise ValueError(f"the model is a {found} variant with another UNet ({detail}); this branch fits the standard "
                         f"{config.family.upper()} UNet only (SSD-1B, Segmind Vega and KOALA are not supported)")


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


class ComfyPainterNetBranch(nn.Module):
    """`diffusion_model` is ComfyUI's UNetModel with 9 input channels and no output head; the control convs and the
    ACP projections use the same `operations` so manual casting and lowvram loading treat them alike."""

    def __init__(self, config: PainterNetConfig, dtype: torch.dtype, device: Any, operations: Any) -> None:
        super().__init__()
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

        self.config = config
        self.unet_config = comfy_unet_config(config.unet, in_channels=9, with_attention=config.cross_attention)
        self.diffusion_model = UNetModel(**self.unet_config, dtype=dtype, device=device, operations=operations)
        del self.diffusion_model.out
        if not config.cross_attention:
            # BrushNet's mid block is two resnets without attention; ComfyUI's UNetModel builds resnet-attn-resnet,
            # so the attention slot becomes an identity and the keys of both resnets still line up.
            self.diffusion_model.middle_block[1] = nn.Identity()
        layout: ControlLayout = config.layout
        self.layer_control_down = nn.ModuleList(
            operations.Conv2d(c, c, 1, dtype=dtype, device=device) for c in layout.down)
        self.layer_control_mid = operations.Conv2d(layout.mid, layout.mid, 1, dtype=dtype, device=device)
        self.layer_control_up = nn.ModuleList(operations.Conv2d(c, c, 1, dtype=dtype, device=device) for c in layout.up)
        self.attention_control = nn.ModuleList(
            operations.Linear(c, c, dtype=dtype, device=device) for c in layout.attention)

    def load_diffusers_state_dict(self, state_dict: dict[str, torch.Tensor], path: str, assign: bool = False) -> None:
        """Rename our diffusers-named keys with ComfyUI's own map and load strictly (`assign`: the tensors become the
        parameters, for a module built on `meta` from tensors already in their final dtype and device)."""
        import comfy.utils

        unet_map = comfy.utils.unet_to_diffusers(self.unet_config)
        back = {"diffusion_model." + v: k for k, v in unet_map.items()}
        converted, unplaced = {}, []
        for key, value in state_dict.items():
            if key in unet_map:
                converted["diffusion_model." + unet_map[key]] = value
            elif key.startswith(("layer_control_", "attention_control.")):
                converted[key] = value
            else:
                unplaced.append(key)
        missing, unexpected = self.load_state_dict(converted, strict=False, assign=assign)
        check_layout(path, self.config, sorted(back.get(k, k) for k in missing), sorted(unplaced + unexpected))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None,
                y: torch.Tensor | None = None, **kwargs: Any) -> dict[str, Any]:
        """Run the branch; return unscaled residuals: lists `down`, `up`, tensor `mid`, and `attention` keyed by
        the (block kind, block id, transformer index) of the base block each ACP output belongs to."""
        from comfy.ldm.modules.diffusionmodules.openaimodel import Upsample, forward_timestep_embed
        from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

        unet = self.diffusion_model
        attn_out: dict[tuple[str, int, int], torch.Tensor] = {}

        def record_attn2(n: torch.Tensor, extra_options: dict[str, Any], **_: Any) -> torch.Tensor:
            block = extra_options["block"]
            attn_out[(block[0], block[1], extra_options.get("block_index", 0))] = n
            return n

        # A clean transformer_options: never the base's, which carries our wrapper and other packs' patches.
        options: dict[str, Any] = {"patches": {"attn2_output_patch": [record_attn2]}} if self.attention_control else {}
        emb = unet.time_embed(timestep_embedding(timesteps, unet.model_channels).to(x.dtype))
        if unet.num_classes is not None:
            emb = emb + unet.label_emb(y)
        h = x
        hs, down, up = [], [], []
        for i, module in enumerate(unet.input_blocks):
            options["block"] = ("input", i)
            h = forward_timestep_embed(module, h, emb, context, options)
            hs.append(h)
            down.append(h)
        options["block"] = ("middle", 0)
        h = forward_timestep_embed(unet.middle_block, h, emb, context, options)
        mid = h
        for i, module in enumerate(unet.output_blocks):
            options["block"] = ("output", i)
            h = torch.cat([h, hs.pop()], dim=1)
            output_shape = hs[-1].shape if hs else None
            if isinstance(module[-1], Upsample):
                h = forward_timestep_embed(list(module)[:-1], h, emb, context, options)
                up.append(h)
                h = module[-1](h, output_shape=output_shape)
            else:
                h = forward_timestep_embed(module, h, emb, context, options)
            up.append(h)
        keys = sorted(attn_out, key=_block_order)
        return {
            "down": [conv(r) for conv, r in zip(self.layer_control_down, down)],
            "mid": self.layer_control_mid(mid),
            "up": [conv(r) for conv, r in zip(self.layer_control_up, up)],
            "attention": {k: lin(attn_out[k]) for k, lin in zip(keys, self.attention_control)},
        }


_KIND_ORDER = {"input": 0, "middle": 1, "output": 2}


def _block_order(key: tuple[str, int, int]) -> tuple[int, int, int]:
    return _KIND_ORDER[key[0]], key[1], key[2]


class PainterNet:
    """What the loader node hands to Apply: the branch's ModelPatcher and config. The patcher lets ComfyUI's model
    management load, offload and partially load the branch together with the base."""

    def __init__(self, patcher: Any, config: PainterNetConfig, name: str) -> None:
        self.patcher = patcher
        self.config = config
        self.name = name

    def __repr__(self) -> str:
        return f"PainterNet({self.name!r}, {self.config.family}, {self.config.source_format})"


WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
                 "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def _dtypes(dtype: str, params: int) -> tuple[torch.dtype, torch.dtype | None, Any, Any, Any]:
    """(weight dtype, manual-cast compute dtype or None, operations, load device, offload device) by the rules
    ComfyUI's UNETLoader and ControlNet use: fp8 weights are stored as fp8 and computed in the dtype ComfyUI picks for
    the device through its manual-cast ops."""
    import comfy.model_management as mm
    import comfy.ops

    load_device = mm.get_torch_device()
    if dtype == "auto":
        unet_dtype = mm.unet_dtype(model_params=params, supported_dtypes=[torch.float16, torch.bfloat16, torch.float32])
    elif dtype in WEIGHT_DTYPES:
        unet_dtype = WEIGHT_DTYPES[dtype]
    else:
        raise ValueError(f"dtype {dtype!r} is not one of {['auto', *WEIGHT_DTYPES]}")
    manual_cast = mm.unet_manual_cast(unet_dtype, load_device,
                                      supported_dtypes=[torch.float16, torch.bfloat16, torch.float32])
    return unet_dtype, manual_cast, comfy.ops.pick_operations(unet_dtype, manual_cast), load_device, \
        mm.unet_offload_device()


def _wrap(module: ComfyPainterNetBranch, config: PainterNetConfig, unet_dtype: torch.dtype,
          manual_cast: torch.dtype | None, load_device: Any, offload_device: Any, name: str) -> PainterNet:
    import comfy.model_patcher

    module.compute_dtype = manual_cast or unet_dtype
    patcher = comfy.model_patcher.ModelPatcher(module, load_device=load_device, offload_device=offload_device)
    logger.info("PainterNet %s: %s %s, weights %s, compute %s", name, config.family, config.source_format,
                unet_dtype, module.compute_dtype)
    return PainterNet(patcher, config, name)


def build_branch(state_dict: dict[str, torch.Tensor], config: PainterNetConfig, dtype: str = "auto",
                 name: str = "branch") -> PainterNet:
    """Instantiate the ComfyUI branch from an in-memory state dict with the dtype rules ControlNet uses and wrap it in
    a ModelPatcher (the loader node streams from the file instead: `load_painternet`)."""
    unet_dtype, manual_cast, operations, load_device, offload_device = _dtypes(
        dtype, sum(v.numel() for v in state_dict.values()))
    module = ComfyPainterNetBranch(config, dtype=unet_dtype, device=offload_device, operations=operations)
    module.load_diffusers_state_dict(state_dict, name)
    return _wrap(module, config, unet_dtype, manual_cast, load_device, offload_device, name)


def comfy_reference_shapes(config: PainterNetConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the ComfyUI branch of this config loads, with its shape, in the file's diffusers naming.

    Built on the meta device, so checking a file against its config allocates nothing: a file whose config asks for
    a huge network but whose tensors do not match is refused before any memory is spent.
    """
    import comfy.ops
    import comfy.utils

    with torch.device("meta"):
        module = ComfyPainterNetBranch(config, dtype=torch.float32, device="meta",
                                       operations=comfy.ops.disable_weight_init)
    back: dict[str, str] = {}
    # ComfyUI's map lists SDXL's label embedding under both diffusers names; files (ours, diffusers', BrushNet's)
    # use add_embedding.*, so that alias wins.
    for diffusers_key, comfy_key in sorted(comfy.utils.unet_to_diffusers(module.unet_config).items()):
        current = back.get("diffusion_model." + comfy_key)
        if current is None or current.startswith("class_embedding."):
            back["diffusion_model." + comfy_key] = diffusers_key
    return {back.get(k, k): tuple(v.shape) for k, v in module.state_dict().items()}


def load_painternet(path: str, dtype: str = "auto") -> PainterNet:
    """The loader node's path: every check on the header first, then the branch built on `meta` and each tensor
    streamed from the file straight into its final dtype and device (`assign`), so the load peaks at about the
    resident branch, not at the file plus a cast copy plus the module."""
    import math
    import os

    from painternet_core.checkpoint import open_branch, stream_branch

    name = os.path.basename(path)
    header, config, names = open_branch(path, expected_shapes=comfy_reference_shapes)
    params = sum(math.prod(header.tensors[f].shape) for f in names.values())
    unet_dtype, manual_cast, operations, load_device, offload_device = _dtypes(dtype, params)
    with torch.device("meta"):
        module = ComfyPainterNetBranch(config, dtype=unet_dtype, device="meta", operations=operations)
    module.load_diffusers_state_dict(dict(stream_branch(path, header, names, unet_dtype, offload_device)), name,
                                     assign=True)
    if config.source_format != "painternet":
        logger.info("loaded %s as a %s checkpoint (mask polarity: known pixels = 1)", path, config.source_format)
    return _wrap(module, config, unet_dtype, manual_cast, load_device, offload_device, name)
