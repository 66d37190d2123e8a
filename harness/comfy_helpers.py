"""Builders shared by the ComfyUI tests: the pack loaded the way ComfyUI loads it, and ComfyUI models carrying the
weights of a tiny diffusers UNet so both worlds can be compared on the same numbers."""
from __future__ import annotations

import asyncio
import importlib
import os
import sys
from typing import Any

import torch

from harness import CACHE, REPO

PACK_NAME = "ComfyUI-PainterNet"


def pack_module_name() -> str:
    """The module name ComfyUI gives the pack: its path with dots escaped (nodes.py `load_custom_node`)."""
    return os.path.join(CACHE, "custom_nodes", PACK_NAME).replace(".", "_x_")


def load_pack() -> dict[str, type]:
    """Import the pack through ComfyUI's own `load_custom_node`, which swallows import errors: a failure here means
    the nodes would silently vanish for a user, so it fails the test instead."""
    import nodes

    if pack_module_name() in sys.modules:
        return nodes.NODE_CLASS_MAPPINGS
    folder = os.path.join(CACHE, "custom_nodes")
    os.makedirs(folder, exist_ok=True)
    link = os.path.join(folder, PACK_NAME)
    if not os.path.islink(link):
        try:
            os.symlink(REPO, link)
        except FileExistsError:  # another test process linked it first
            pass
    if not asyncio.run(nodes.load_custom_node(link)):
        raise RuntimeError("ComfyUI failed to import the pack (see the log above)")
    return nodes.NODE_CLASS_MAPPINGS


def pack_module(name: str) -> Any:
    """A submodule of the loaded pack, e.g. pack_module("nodes.branch")."""
    load_pack()
    return importlib.import_module(f"{pack_module_name()}.{name}")


def residual_tensors(out: dict[str, Any]) -> list[torch.Tensor]:
    """Every tensor one branch call hands the UNet (nodes/branch.py's output): what a sampling step must hold at once
    on top of the base model, so the benches measure memory and fp8 error against exactly these."""
    return [*out["down"], out["mid"], *out["up"], *out["attention"].values()]


def comfy_model_config(family: str, unet_config: dict[str, Any]) -> Any:
    import comfy.supported_models as sm

    model_config = {"sd15": sm.SD15, "sdxl": sm.SDXL}[family](unet_config)
    # The family classes force their real head layout; tiny test topologies keep their own.
    for key in ("num_heads", "num_head_channels"):
        model_config.unet_config[key] = unet_config[key]
    return model_config


def _diffusers_model_config(unet: torch.nn.Module, family: str) -> Any:
    unet_config = pack_module("nodes.branch").comfy_unet_config(dict(unet.config), in_channels=unet.config.in_channels)
    return comfy_model_config(family, unet_config)


def comfy_unet_key_map(unet: torch.nn.Module, family: str) -> dict[str, str]:
    """diffusers key → ComfyUI/original-SD key (``diffusion_model.`` stripped) for the diffusers `unet`."""
    import comfy.utils

    return comfy.utils.unet_to_diffusers(_diffusers_model_config(unet, family).unet_config)


def comfy_model_from_diffusers(unet: torch.nn.Module, family: str) -> Any:
    """A ComfyUI ModelPatcher whose UNet holds exactly the weights of the diffusers `unet`."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.utils

    model_config = _diffusers_model_config(unet, family)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    key_map = comfy.utils.unet_to_diffusers(model_config.unet_config)
    model.diffusion_model.load_state_dict({key_map[k]: v for k, v in unet.state_dict().items()}, strict=True)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def sampling_options(patched: Any, sigma: float, cond_or_uncond: list[int]) -> dict[str, Any]:
    """transformer_options as ComfyUI's sampler builds them for one chunk (samplers.py `_calc_cond_batch`)."""
    import comfy.patcher_extension

    options = comfy.patcher_extension.merge_nested_dicts({}, patched.model_options["transformer_options"])
    options["wrappers"] = comfy.patcher_extension.copy_nested_dicts(patched.wrappers)
    options["cond_or_uncond"] = list(cond_or_uncond)
    options["sigmas"] = torch.tensor([sigma])
    return options
