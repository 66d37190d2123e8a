"""The branch checkpoint format (DESIGN §4): safetensors only, config in the metadata, strict loading.

Two formats are recognised, most specific first: PainterNet files (`painternet_format` metadata) and diffusers
BrushNet / PowerPaint-CA files (`brushnet_down_blocks.*` keys, no metadata). BrushNet's control points follow the
same layout as ours, so its keys are renamed to ours and its mask polarity is recorded rather than folded in.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch

from . import logger
from .config import FORMAT_VERSION, SD15_UNET, SDXL_UNET, PainterNetConfig
from .errors import quote

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


# Safetensors header bounds. A real SDXL branch header is ~250 KB with ~2 600 tensors; the bounds leave a wide margin
# and refuse in milliseconds the 80 MB header of a million empty tensors that would otherwise take 30 s and 1.6 GB.
MAX_HEADER_BYTES = 16 * 2**20
MAX_TENSORS = 20_000
MAX_TENSOR_DIMS = 8
# Weights a branch may hold: what training and the public BrushNet files use. Integer, bool and fp64 tensors are not
# branch weights (a file holding them was exported wrongly or is not a branch).
WEIGHT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
_ITEM_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the safetensors header describes it (nothing of its data has been read)."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated safetensors header: every entry is well-typed, sized consistently and inside the file."""

    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int = 0  # byte offset of the data section (8 + header length); entries' offsets are relative to it


def _signature(head: bytes) -> str | None:
    """The format a file that is *not* safetensors announces by its own magic bytes, if any.

    A pickle starts with PROTO (0x80) and a protocol number 2..5; a zip (torch.save's default) with a local file
    header `PK\\x03\\x04` (or `PK\\x05\\x06` when empty). These are only consulted once the bytes failed to parse as a
    safetensors header: the first byte of a valid safetensors file is its header length's low byte, which may be 0x80.
    """
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:
        return "pickle"
    return None


def _not_safetensors(path: str, head: bytes, reason: str) -> ValueError:
    kind = _signature(head)
    if kind is not None:
        # torch's weights-only unpickler stops at the FRAME opcode of the protocols 4 and 5.
        note = "" if kind == "zip" or head[1] < 4 else (
            f" (it is pickle protocol {head[1]}, which torch's weights-only loader cannot read: only if you trust where "
            "the file came from, run that command with weights_only=False)")
        return ValueError(f"{quote(path)} is a {kind} (pickle/zip checkpoint), which is never loaded (it can run code); "
                          f"{_CONVERT_HINT}{note}")
    return ValueError(f"{quote(path)} is not a valid safetensors file ({reason}); it is corrupt or not safetensors: "
                      "re-download or re-export it")


class _TooManyTensors(Exception):
    """Raised from inside the JSON parser; not a ValueError, so the parser's own errors cannot be mistaken for it."""


def read_header(path: str) -> SafetensorsHeader:
    """Read and validate a safetensors header without touching the tensor data.

    The file is recognised by its structure (an 8-byte little-endian length that fits the file and the bounds, then a
    JSON object), never by its first byte. Every entry is checked (dtype known, shape of non-negative ints, offsets
    inside the data and matching the shape), so what follows can trust the header and a damaged file is always a
    ValueError naming the problem.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{quote(path)} is {size} bytes: too short to be a safetensors file; re-download or "
                             "re-export it")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > size - 8:
            raise _not_safetensors(path, head, f"header length {n} does not fit the file size {size}")
        if n > MAX_HEADER_BYTES:
            raise _not_safetensors(path, head, f"header of {n} bytes is over the {MAX_HEADER_BYTES}-byte limit; no "
                                               "branch has one that large")
        raw = fh.read(n)
    if raw[:1] != b"{":
        raise _not_safetensors(path, head, "the header is not a JSON object")
    objects = 0

    def counted(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        # Called as each JSON object closes: one per tensor entry, plus __metadata__ and the header itself, so a
        # header listing too many tensors stops the parser there instead of being built whole.
        nonlocal objects
        objects += 1
        if objects > MAX_TENSORS + 2:
            raise _TooManyTensors
        return dict(pairs)

    try:
        header = json.loads(raw, object_pairs_hook=counted)
    except _TooManyTensors:
        raise ValueError(f"{quote(path)} lists more than the {MAX_TENSORS} tensors any branch has; it is not a branch "
                         "file") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"{quote(path)} has a corrupt safetensors header ({quote(str(exc))}); re-download or "
                         "re-export it") from None
    if not isinstance(header, dict):
        raise _not_safetensors(path, head, "the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise ValueError(f"{quote(path)} has malformed safetensors metadata ({quote(metadata)}): it must map strings "
                         "to strings; re-export the file")
    if len(header) > MAX_TENSORS:
        raise ValueError(f"{quote(path)} lists more than the {MAX_TENSORS} tensors any branch has ({len(header)}); it "
                         "is not a branch file")
    tensors = {}
    data_size = size - 8 - n
    for name, info in header.items():
        tensors[name] = _entry(path, name, info)
        if tensors[name].end > data_size:
            raise ValueError(f"{quote(path)} is truncated: the header describes {8 + n + tensors[name].end} bytes but "
                             f"the file has {size}; re-download or re-export it")
    return SafetensorsHeader(tensors, metadata, 8 + n)


def _entry(path: str, name: str, info: Any) -> TensorEntry:
    def bad(what: str) -> ValueError:
        return ValueError(f"{quote(path)} has a malformed safetensors entry {quote(name)}: {what} "
                          f"({quote(info)}); re-download or re-export it")

    if not isinstance(info, dict):
        raise bad("it is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _ITEM_SIZES:
        raise bad("unknown dtype")
    if (not isinstance(shape, list) or len(shape) > MAX_TENSOR_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape)):
        raise bad("shape must be a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]):
        raise bad("data_offsets must be [begin, end] with 0 <= begin <= end")
    if math.prod(shape) * _ITEM_SIZES[dtype] != offsets[1] - offsets[0]:
        raise bad("its byte size does not match its shape and dtype")
    return TensorEntry(dtype, tuple(shape), offsets[0], offsets[1])


def read_tensors(path: str, names: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a file `read_header` accepted; safetensors' own errors become one naming the file."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as fh:
            return {k: fh.get_tensor(k) for k in names}
    except Exception as exc:  # safetensors raises its own SafetensorError; keep the cause, name the file and fix
        raise ValueError(f"{quote(path)} could not be read as safetensors ({quote(str(exc))}); re-download or "
                         "re-export it") from exc


def _check_path(path: str) -> None:
    """Only that the file exists: what it is comes from its bytes (`read_header`), never from its suffix, so a
    safetensors file named `.bin` loads and a pickle named `.safetensors` is refused by its signature."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PainterNet checkpoint {quote(path)} does not exist; put it in models/painternet")


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


def _count(keys: set[str], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in keys if (m := pattern.match(k))})


def _brushnet_config(path: str, shapes: Mapping[str, tuple[int, ...]]) -> PainterNetConfig:
    """The config of a BrushNet / PowerPaint-CA file, read from the tensor shapes its header states."""
    keys = set(shapes)
    n_down = _count(keys, "brushnet_down_blocks.")
    if n_down == 12:
        unet = dict(SD15_UNET)
    elif n_down == 9:
        unet = dict(SDXL_UNET)
    else:
        raise ValueError(f"BrushNet checkpoint {quote(path)} has {n_down} down control points: expected 12 (SD1.5) or "
                         "9 (SDXL)")
    n_blocks = _count(keys, "down_blocks.")
    channels = []
    for i in range(n_blocks):
        shape = shapes.get(f"down_blocks.{i}.resnets.0.conv1.weight")
        if shape is None or len(shape) != 4:
            raise ValueError(f"BrushNet checkpoint {quote(path)} has no 4-d down_blocks.{i}.resnets.0.conv1.weight; "
                             "the file is incomplete or not a BrushNet checkpoint")
        channels.append(int(shape[0]))
    if len(channels) != len(unet["block_out_channels"]):
        raise ValueError(f"BrushNet checkpoint {quote(path)} has {len(channels)} down blocks, expected "
                         f"{len(unet['block_out_channels'])} for its {'SD1.5' if n_down == 12 else 'SDXL'} layout; the "
                         "file is incomplete or not a BrushNet checkpoint")
    unet["block_out_channels"] = channels
    cross = any(".attentions." in k for k in keys if k.startswith("down_blocks."))
    # What the weights state is read from them (a fine-tune may differ from the family's stock config); head counts
    # are not in the weights and stay the family's.
    to_k = next((k for k in sorted(keys) if k.endswith(".attn2.to_k.weight")), None)
    if to_k is not None and len(shapes[to_k]) == 2:
        unet["cross_attention_dim"] = int(shapes[to_k][1])
    if len(shapes.get("add_embedding.linear_1.weight", ())) == 2:
        unet["projection_class_embeddings_input_dim"] = int(shapes["add_embedding.linear_1.weight"][1])
    return PainterNetConfig(
        family="sd15" if n_down == 12 else "sdxl", unet=unet, cross_attention=cross, attention_control=False,
        mask_polarity="known", mask_resize="nearest", masked_fill=0.0,
        source_format="powerpaint-ca" if cross else "brushnet",
    )


def _renamed(key: str) -> str:
    for old, new in _BRUSHNET_RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


ShapeFn = Callable[[PainterNetConfig], Mapping[str, tuple[int, ...]]]


def reference_shapes(config: PainterNetConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a complete branch of this config and its shape (diffusers naming), built on the meta device:
    no memory is allocated, whatever size the config asks for."""
    from .branch import PainterNetBranch

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in PainterNetBranch(config).state_dict().items()}


def inspect_branch(path: str) -> tuple[SafetensorsHeader, PainterNetConfig, dict[str, str]]:
    """Validate a branch file's header and config without reading any tensor: (header, config, {our key: file key}).

    Detectors run most specific first; a file matching none is refused with what was found.
    """
    _check_path(path)
    header = read_header(path)
    metadata = header.metadata
    if "painternet_format" in metadata:
        version = metadata["painternet_format"]
        if version != str(FORMAT_VERSION):
            raise ValueError(f"{quote(path)} has painternet_format={quote(version)}; this pack reads format "
                             f"{FORMAT_VERSION}: update the pack")
        if "painternet_config" not in metadata:
            raise ValueError(f"{quote(path)} has painternet_format but no painternet_config metadata; re-export it")
        try:
            config = PainterNetConfig.from_json(metadata["painternet_config"])
        except ValueError as exc:
            raise ValueError(f"{quote(path)}: {exc}") from None
        names = {k: k for k in header.tensors}
    elif any(k.startswith("brushnet_down_blocks.") for k in header.tensors):
        try:
            config = _brushnet_config(path, {k: v.shape for k, v in header.tensors.items()})
        except ValueError as exc:
            message = str(exc)
            raise ValueError(message if message.startswith("BrushNet checkpoint") else f"{quote(path)}: {message}") \
                from None
        names = {_renamed(k): k for k in header.tensors}
        if len(names) != len(header.tensors):
            clashes = sorted(k for k in header.tensors if k != _renamed(k) and _renamed(k) in header.tensors)
            raise ValueError(f"{quote(path)} holds both BrushNet and PainterNet names for the same tensors (e.g. "
                             f"{quote(clashes[:3])}); it is not a valid BrushNet checkpoint")
    else:
        sample = sorted(header.tensors)[:3]
        raise ValueError(
            f"{quote(path)} is not a PainterNet or BrushNet checkpoint (no painternet_format metadata, no "
            f"brushnet_down_blocks.* keys; first keys: {quote(sample)}). Export it with training/trainer/train.py or pick "
            "another file"
        )
    return header, config, names


def open_branch(path: str, expected_shapes: ShapeFn | None = None
                ) -> tuple[SafetensorsHeader, PainterNetConfig, dict[str, str]]:
    """Everything `load_branch` checks before reading a weight (header, config bounds, keys and shapes against
    `expected_shapes`, float dtypes), without reading one: (header, config, {our key: file key})."""
    header, config, names = inspect_branch(path)
    if expected_shapes is not None:
        check_shapes(path, config, expected_shapes(config), {k: header.tensors[f].shape for k, f in names.items()})
    for file_key in sorted(names.values()):
        dtype = header.tensors[file_key].dtype
        if dtype not in WEIGHT_DTYPES:
            raise ValueError(f"{quote(path)}: tensor {quote(file_key)} has dtype {dtype}; branch weights are F16, BF16 "
                             "or F32: re-export the file with float weights")
    return header, config, names


def stream_branch(path: str, header: SafetensorsHeader, names: Mapping[str, str], dtype: torch.dtype,
                  device: Any = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (our key, tensor) one at a time, read with plain file reads (no mmap whose touched pages would stay in
    the process's memory) straight into `dtype` on `device`: the caller that keeps each tensor peaks at the resident
    branch plus one tensor in the file's dtype, not at 2-3x the file. Finiteness is checked after the cast, so a
    finite F32 weight that overflows the chosen dtype (1e5 in fp16 is inf) is refused naming the weight and the fix."""
    with open(path, "rb") as fh:
        for key in sorted(names):
            entry = header.tensors[names[key]]
            source = WEIGHT_DTYPES[entry.dtype]
            buffer = torch.empty(entry.shape, dtype=source)
            fh.seek(header.data_start + entry.begin)
            raw = buffer.reshape(-1).view(torch.uint8).numpy()
            if fh.readinto(memoryview(raw)) != entry.end - entry.begin:
                raise ValueError(f"{quote(path)} is truncated inside tensor {quote(names[key])}; re-download or "
                                 "re-export it")
            wide = dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
            tensor = buffer.to(device=device, dtype=dtype)
            # fp8 casts saturate (e4m3fn turns 1e5 into 448) or give inf: refuse what the dtype cannot hold.
            clipped = not wide and buffer.numel() > 0 and bool(buffer.abs().amax() > torch.finfo(dtype).max)
            if clipped or not bool(torch.isfinite(tensor if wide else tensor.to(torch.float16)).all()):
                if not bool(torch.isfinite(buffer).all()):
                    raise ValueError(f"{quote(path)}: tensor {quote(key)} contains NaN or infinite values; the file "
                                     "is damaged (or the training diverged): use another checkpoint")
                raise ValueError(
                    f"{quote(path)}: tensor {quote(key)} contains NaN or infinite values once cast from {entry.dtype} "
                    f"to {str(dtype).removeprefix('torch.')}: a finite weight outside that dtype's range becomes inf "
                    "or NaN (or is clipped, for fp8); load it with a wider dtype, e.g. fp32 or bf16")
            del buffer, raw
            yield key, tensor


def load_branch(path: str, check_keys: bool = True,
                expected_shapes: ShapeFn | None = None) -> tuple[dict[str, torch.Tensor], PainterNetConfig]:
    """Load a branch file into (state dict in our diffusers naming, config), strictly.

    Before a single weight is read, the config is validated against its bounds and every tensor's key and shape in
    the header is compared with the branch that config describes (`expected_shapes`, computed on the meta device:
    the diffusers reference by default, the ComfyUI rebuild for the loader node, which has no diffusers). So a file
    whose config lies costs nothing, and a file that passes holds exactly the weights the branch will allocate.
    `check_keys=False` without `expected_shapes` skips that comparison (the caller's strict load does it). Weights
    must be float16/bfloat16/float32 and finite.
    """
    if expected_shapes is None and check_keys:
        expected_shapes = reference_shapes
    _, config, names = open_branch(path, expected_shapes)
    raw = read_tensors(path, sorted(names.values()))
    tensors = {k: raw[f] for k, f in names.items()}
    for key in sorted(tensors):
        if not bool(torch.isfinite(tensors[key]).all()):
            raise ValueError(f"{quote(path)}: tensor {quote(key)} contains NaN or infinite values; the file is damaged "
                             "(or the training diverged): use another checkpoint")
    if config.source_format != "painternet":
        logger.info("loaded %s as a %s checkpoint (mask polarity: known pixels = 1)", path, config.source_format)
    return tensors, config


def expected_keys(config: PainterNetConfig) -> set[str]:
    """Every key a complete branch of this config has (diffusers naming), built on the meta device."""
    return set(reference_shapes(config))


def check_shapes(path: str, config: PainterNetConfig, expected: Mapping[str, tuple[int, ...]],
                 found: Mapping[str, tuple[int, ...]]) -> None:
    """Keys and shapes of a file against the branch its config describes; one clear error naming a few offenders."""
    check_layout(path, config, sorted(set(expected) - set(found)), sorted(set(found) - set(expected)))
    wrong = [k for k in sorted(expected) if tuple(found[k]) != tuple(expected[k])]
    if wrong:
        examples = ", ".join(f"{quote(k, 80)}: file {list(found[k])} vs config {list(expected[k])}" for k in wrong[:3])
        raise ValueError(f"{quote(path)} has {len(wrong)} tensors whose shape does not match its {config.family} "
                         f"{config.source_format} config (e.g. {examples}); the file is damaged or its config lies")


def check_layout(path: str, config: PainterNetConfig, missing: list[str], unexpected: list[str]) -> None:
    """The one error for a file whose keys do not match its declared layout, whichever side noticed it."""
    if missing or unexpected:
        raise ValueError(
            f"{quote(path)} does not match its {config.family} {config.source_format} layout: "
            f"{len(missing)} missing keys (e.g. {quote(missing[:3])}), {len(unexpected)} unexpected keys "
            f"(e.g. {quote(unexpected[:3])}); the file is incomplete or was written for another topology"
        )
