"""Deterministic random test weights, generated once into .cache/test-models (never committed, never downloaded).

The checkpoints have the real SD1.5 / SDXL UNet *signatures* (model_channels=320, real heads, context dims) with fewer
levels of channel growth (channel_mult [1,1,1,1] / [1,1,1]), so ComfyUI detects them as SD15 / SDXL while they stay
small enough for a 2-core CPU. ComfyUI layers skip weight init, so every tensor is filled explicitly.
"""
from __future__ import annotations

import math
import os
import zlib
from typing import Any

import torch

from harness import CACHE

MODELS = os.path.join(CACHE, "test-models")
# Bumped whenever the weights a name stands for change (2: init by module type; 1 zeroed ComfyUI's GroupNorms and its
# UNets predicted exactly zero noise), so a cache written by an older harness is never read as the new weights.
WEIGHTS_VERSION = 2

NORM_TYPES = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.RMSNorm, torch.nn.modules.batchnorm._NormBase)


def cached_path(name: str) -> str:
    """Where the test weights called `name` live: the file name carries WEIGHTS_VERSION."""
    stem, ext = os.path.splitext(name)
    return os.path.join(MODELS, f"{stem}.w{WEIGHTS_VERSION}{ext}")

SD15_SMALL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 1, 1, 1], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
SDXL_SMALL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 1, 1],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_heads": -1,
    "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


def fill_(module: torch.nn.Module, seed: int, gain: float = 1.0) -> torch.nn.Module:
    """Seeded init by module type: normalisation layers weight 1 / bias 0, every other bias 0, every other weight a
    fan-in Gaussian scaled by `gain`; 0-d parameters (TAESD's latent scale/shift) keep their constructor values.

    Why by type and not by name: ComfyUI names its GroupNorms `in_layers.0`, `out_layers.0`, `out.0`, and zeroing
    those made every test UNet predict exactly zero noise. ComfyUI layers skip weight init, so every tensor is set
    here. Each tensor has its own generator (seed + its name), created on the tensor's device: the result does not
    depend on parameter order, and a full-size model fills on a GPU in seconds rather than minutes on a CPU generator.
    """
    with torch.no_grad():
        for module_name, sub in module.named_modules():
            is_norm = isinstance(sub, NORM_TYPES)
            for name, p in sub.named_parameters(recurse=False):
                if p.ndim == 0:
                    continue
                if is_norm or name == "bias":
                    p.fill_(1.0 if is_norm and name == "weight" else 0.0)
                    continue
                key = f"{module_name}.{name}".encode()
                g = torch.Generator(device=p.device).manual_seed(seed * 1000003 + zlib.crc32(key))
                noise = torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype)
                p.copy_(noise * (gain / math.sqrt(p[0].numel())))
    return module


def _unet_sd(unet_config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**unet_config, operations=comfy.ops.disable_weight_init)
    return fill_(unet, seed).state_dict()


def _taesd_sd(seed: int) -> dict[str, torch.Tensor]:
    import comfy.taesd.taesd

    return fill_(comfy.taesd.taesd.TAESD(), seed).state_dict()


def _clip_l_sd(seed: int) -> dict[str, torch.Tensor]:
    import comfy.sd1_clip

    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    sd = fill_(clip, seed, gain=0.5).state_dict()
    return {k: v for k, v in sd.items() if k.startswith("transformer.")}


def sd15_checkpoint() -> str:
    """An SD15-detected checkpoint (UNet + CLIP-L + TAESD) for the real-server workflows."""
    path = cached_path("tiny-sd15-320.safetensors")
    if os.path.exists(path):
        return path
    import comfy.utils

    os.makedirs(MODELS, exist_ok=True)
    sd = {f"model.diffusion_model.{k}": v.half() for k, v in _unet_sd(SD15_SMALL_UNET, 1).items()}
    sd.update({f"first_stage_model.{k}": v.half() for k, v in _taesd_sd(2).items()})
    sd.update({f"cond_stage_model.{k}": v.half() for k, v in _clip_l_sd(3).items()})
    tmp = f"{path}.{os.getpid()}.tmp"
    comfy.utils.save_torch_file(sd, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str, output_clip: bool = False) -> tuple[Any, Any, Any]:
    import comfy.sd

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=output_clip)
    return model, clip, vae


def comfy_model(model_config_cls: Any, unet_config: dict[str, Any], seed: int = 4) -> Any:
    """A ModelPatcher of a given family class built in-process (no file), for the family checks."""
    import comfy.model_management as mm
    import comfy.model_patcher

    model_config = model_config_cls(dict(unet_config))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    fill_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def branch_file(family: str, name: str, seed: int = 5, gain: float = 0.3) -> str:
    """A PainterNet branch for the small real-signature topologies, random non-zero weights, written with core's
    writer; cached."""
    from painternet_core.branch import PainterNetBranch
    from painternet_core.checkpoint import save_branch
    from painternet_core.config import SD15_UNET, SDXL_UNET, PainterNetConfig

    path = cached_path(name)
    if os.path.exists(path):
        return path
    unet = dict(SD15_UNET, block_out_channels=[320] * 4) if family == "sd15" else dict(
        SDXL_UNET, block_out_channels=[320] * 3, attention_head_dim=[5, 5, 5])
    branch = PainterNetBranch(PainterNetConfig(family=family, unet=unet))
    fill_(branch, seed, gain=gain)
    os.makedirs(MODELS, exist_ok=True)
    save_branch(path, {k: v.half() for k, v in branch.state_dict().items()}, branch.config)
    return path


def sd15_checkpoint_variant(name: str, seed: int) -> str:
    """Another SD15-detected checkpoint of the same topology with *different* weights (UNet, CLIP-L and TAESD seeded
    from `seed`), written as its own file: what a real checkpoint swap looks like to ComfyUI. Cached by name."""
    path = cached_path(name)
    if os.path.exists(path):
        return path
    import comfy.utils

    os.makedirs(MODELS, exist_ok=True)
    sd = {f"model.diffusion_model.{k}": v.half() for k, v in _unet_sd(SD15_SMALL_UNET, seed).items()}
    sd.update({f"first_stage_model.{k}": v.half() for k, v in _taesd_sd(seed + 1).items()})
    sd.update({f"cond_stage_model.{k}": v.half() for k, v in _clip_l_sd(seed + 2).items()})
    tmp = f"{path}.{os.getpid()}.tmp"
    comfy.utils.save_torch_file(sd, tmp)
    os.replace(tmp, path)
    return path


# Our layer-control names -> the names in TencentARC's public BrushNet / PowerPaint-CA files.
_BRUSHNET_NAMES = {"conv_in.": "conv_in_condition.", "layer_control_down.": "brushnet_down_blocks.",
                   "layer_control_mid.": "brushnet_mid_block.", "layer_control_up.": "brushnet_up_blocks."}


def brushnet_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A branch state dict renamed to the public BrushNet key layout (what a downloaded BrushNet file holds), so
    tests load the real format rather than our own export of it."""
    out = {}
    for key, value in state_dict.items():
        prefix = next((p for p in _BRUSHNET_NAMES if key.startswith(p)), None)
        out[_BRUSHNET_NAMES[prefix] + key[len(prefix):] if prefix else key] = value.contiguous()
    return out


def powerpaint_branch_file(name: str = "tiny-sd15-powerpaint-branch.safetensors", seed: int = 11) -> str:
    """A PowerPaint v2-style branch (BrushNet key layout *with* cross-attention, what the public
    PowerPaint_Brushnet/diffusion_pytorch_model.safetensors holds) for the small real-signature SD1.5 UNet; cached."""
    path = cached_path(name)
    if os.path.exists(path):
        return path
    from safetensors.torch import save_file

    from painternet_core.branch import PainterNetBranch
    from painternet_core.config import SD15_UNET, PainterNetConfig

    config = PainterNetConfig(family="sd15", unet=dict(SD15_UNET, block_out_channels=[320] * 4), cross_attention=True,
                              attention_control=False)
    branch = fill_(PainterNetBranch(config), seed, gain=0.3)
    os.makedirs(MODELS, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    save_file({k: v.half() for k, v in brushnet_layout(branch.state_dict()).items()}, tmp)
    os.replace(tmp, path)
    return path


def clip_text_encoder_file(path: str, vocab: int = 49438, width: int = 768, layers: int = 1, prefix: str = "",
                           seed: int = 12) -> str:
    """A random CLIP text encoder in the HF `text_model.*` layout (fp16), 64-wide heads and quick-GELU like CLIP-L;
    the default vocabulary is PowerPaint v2's (CLIP's 49 408 rows plus its 30 task-token rows). Written when missing."""
    if os.path.exists(path):
        return path
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
                                         num_hidden_layers=layers, num_attention_heads=width // 64,
                                         max_position_embeddings=77, hidden_act="quick_gelu"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({prefix + k: v.half().contiguous() for k, v in model.state_dict().items()
               if not k.endswith("position_ids")}, f"{path}.{os.getpid()}.tmp")
    os.replace(f"{path}.{os.getpid()}.tmp", path)
    return path
