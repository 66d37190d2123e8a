"""The branch checkpoint format (DESIGN §4): safetensors only, config in the metadata, strict loading.

Two formats are recognised, most specific first: PainterNet files (`painternet_format` metadata) and diffusers
BrushNet / PowerPaint-CA files (`brushnet_down_blocks.*` keys, no metadata). BrushNet's control points follow the
same layout as ours, so its keys are renamed to ours and its mask polarity is recorded rather than folded in.
"""
from __future__ import annotations

import json
import os
import re
import struct
import tempfile
from typing import Any, Mapping

import torch

from . import logger
from .config import FORMAT_VERSION, SD15_UNET, SDXL_UNET, PainterNetConfig

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pt2")

_CONVERT_HINT = (
    "convert it once in a trusted environment with: python -c \"import torch, safetensors.torch as st; "
    "sd = torch.load('IN', map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); "
    "st.save_file({k: v.contiguous() for k, v in sd.items()}, 'OUT.safetensors')\""
)

# The public BrushNet/PowerPaint layout (TencentARC's BrushNetModel): its 9-channel input conv is
# ``conv_in_condition`` over [noisy latent, masked-image latent, mask], the same channel order as our ``conv_in``.
_BRUSHNET_RENAMES = (
    ("conv_in_condition.", "conv_in."),
    ("brushnet_down_blocks.", "layer_control_down."),
    ("brushnet_mid_block.", "layer_control_mid."),
    ("brushnet_up_blocks.", "layer_control_up."),
)


def _check_safetensors_header(path: str) -> dict[str, Any]:
    """Validate the header ourselves so a truncated or non-safetensors file gets a message naming the problem."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{path!r} is {size} bytes: too short to be a safetensors file; re-download or re-export it")
        if head[:2] == b"PK" or head[:1] == b"\x80":
            raise ValueError(f"{path!r} is a pickle/zip checkpoint, which is never loaded (it can run code); {_CONVERT_HINT}")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100_000_000):
            raise ValueError(
                f"{path!r} is not a valid safetensors file (header length {n} > file size {size}); "
                "it is corrupt or not safetensors: re-download or re-export it"
            )
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path!r} has a corrupt safetensors header ({exc}); re-download or re-export it") from exc
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ValueError(
            f"{path!r} is truncated: the header describes {8 + n + end} bytes but the file has {size}; "
            "re-download or re-export it"
        )
    return header


def read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors and metadata, refusing pickle files and reporting corrupt ones clearly."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"PainterNet checkpoint {path!r} does not exist; put it in models/painternet")
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise ValueError(f"{os.path.basename(path)!r} is a pickle checkpoint, which is never loaded (it can run code); "
                         f"{_CONVERT_HINT}")
    _check_safetensors_header(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own SafetensorError; keep the cause, name the file and fix
        raise ValueError(f"{path!r} could not be read as safetensors ({exc}); re-download or re-export it") from exc
    return tensors, metadata


def save_branch(path: str, state_dict: Mapping[str, torch.Tensor], config: PainterNetConfig) -> None:
    """Write a branch atomically: a crash mid-write leaves the previous file, never a half-written one."""
    from safetensors.torch import save_file

    expected = expected_keys(config)
    missing = sorted(expected - set(state_dict))
    if missing:
        raise ValueError(f"state dict is missing {len(missing)} branch keys, e.g. {missing[:3]}; save the full branch")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    metadata = {"painternet_format": str(FORMAT_VERSION), "painternet_config": config.to_json()}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".painternet-", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def expected_keys(config: PainterNetConfig) -> set[str]:
    """Every key a complete branch of this config has (diffusers naming), built on the meta device."""
    from .branch import PainterNetBranch

    with torch.device("meta"):
        return set(PainterNetBranch(config).state_dict().keys())


def _count(keys: set[str], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in keys if (m := pattern.match(k))})


def _brushnet_config(tensors: Mapping[str, torch.Tensor]) -> PainterNetConfig:
    keys = set(tensors)
    n_down = _count(keys, "brushnet_down_blocks.")
    if n_down == 12:
        unet = dict(SD15_UNET)
    elif n_down == 9:
        unet = dict(SDXL_UNET)
    else:
        raise ValueError(f"BrushNet checkpoint with {n_down} down control points: expected 12 (SD1.5) or 9 (SDXL)")
    unet["block_out_channels"] = [int(tensors[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0])
                                  for i in range(_count(keys, "down_blocks."))]
    cross = any(".attentions." in k for k in keys if k.startswith("down_blocks."))
    # What the weights state is read from them (a fine-tune may differ from the family's stock config); head counts
    # are not in the weights and stay the family's.
    to_k = next((k for k in sorted(keys) if k.endswith(".attn2.to_k.weight")), None)
    if to_k is not None:
        unet["cross_attention_dim"] = int(tensors[to_k].shape[1])
    if "add_embedding.linear_1.weight" in tensors:
        unet["projection_class_embeddings_input_dim"] = int(tensors["add_embedding.linear_1.weight"].shape[1])
    return PainterNetConfig(
        family="sd15" if n_down == 12 else "sdxl", unet=unet, cross_attention=cross, attention_control=False,
        mask_polarity="known", mask_resize="nearest", masked_fill=0.0,
        source_format="powerpaint-ca" if cross else "brushnet",
    )


def load_branch(path: str, check_keys: bool = True) -> tuple[dict[str, torch.Tensor], PainterNetConfig]:
    """Load a branch file into (state dict in our diffusers naming, config), strictly.

    Detectors run most specific first; a file matching none is refused with what was found. `check_keys` compares
    the keys with a reference branch built by diffusers on the meta device; the ComfyUI loader passes False because
    it has no diffusers and its own strict load of the converted keys is the same check.
    """
    tensors, metadata = read_safetensors(path)
    if "painternet_format" in metadata:
        version = metadata["painternet_format"]
        if version != str(FORMAT_VERSION):
            raise ValueError(f"{path!r} has painternet_format={version!r}; this pack reads format {FORMAT_VERSION}: "
                             "update the pack")
        if "painternet_config" not in metadata:
            raise ValueError(f"{path!r} has painternet_format but no painternet_config metadata; re-export it")
        config = PainterNetConfig.from_json(metadata["painternet_config"])
    elif any(k.startswith("brushnet_down_blocks.") for k in tensors):
        config = _brushnet_config(tensors)
        renamed = {}
        for key, value in tensors.items():
            for old, new in _BRUSHNET_RENAMES:
                if key.startswith(old):
                    key = new + key[len(old):]
                    break
            renamed[key] = value
        tensors = renamed
        logger.info("loaded %s as a %s checkpoint (mask polarity: known pixels = 1)", path, config.source_format)
    else:
        sample = sorted(tensors)[:3]
        raise ValueError(
            f"{path!r} is not a PainterNet or BrushNet checkpoint (no painternet_format metadata, no "
            f"brushnet_down_blocks.* keys; first keys: {sample}). Export it with training/trainer/train.py or pick another file"
        )
    if check_keys:
        expected = expected_keys(config)
        check_layout(path, config, sorted(expected - set(tensors)), sorted(set(tensors) - expected))
    return tensors, config


def check_layout(path: str, config: PainterNetConfig, missing: list[str], unexpected: list[str]) -> None:
    """The one error for a file whose keys do not match its declared layout, whichever side noticed it."""
    if missing or unexpected:
        raise ValueError(
            f"{path!r} does not match its {config.family} {config.source_format} layout: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected keys "
            f"(e.g. {unexpected[:3]}); the file is incomplete or was written for another topology"
        )
