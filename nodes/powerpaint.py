"""PowerPaint v2 in ComfyUI: its text encoder rebuilt from ComfyUI's own CLIP modules, encoded once into the task
embeddings, and the checks that tell a PowerPaint branch from a BrushNet/PainterNet one.

The encoder is a stock SD1.5 CLIP-L (`comfy.clip_model.CLIPTextModel`, ComfyUI's own ops) whose token embedding
grows by the 30 learned rows. It exists only while the node runs: the four task strings are encoded in one call and
the ~1 MB of final hidden states is all that is kept (the 492 MB encoder never stays resident). Results are cached
per file (path, size, mtime), so re-running a graph or loading the same file in two nodes encodes nothing again.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Any

import torch

from painternet_core.checkpoint import WEIGHT_DTYPES, read_header, read_tensors
from painternet_core.errors import quote
from painternet_core.powerpaint import PowerPaintTasks, inspect_text_encoder, task_strings, task_token_ids

logger = logging.getLogger("painternet")

POWERPAINT_FORMAT = "powerpaint-ca"
_CACHE: "OrderedDict[tuple[str, int, int], PowerPaintTasks]" = OrderedDict()
_CACHE_SIZE = 4


def is_powerpaint(painternet: Any) -> bool:
    """A PowerPaint v2 branch is a BrushNet-layout file *with* cross-attention (the loader's `powerpaint-ca`)."""
    return getattr(getattr(painternet, "config", None), "source_format", None) == POWERPAINT_FORMAT


def _check_path(path: str) -> None:
    """Only that the file exists: what it is comes from its bytes (`read_header` refuses pickle/zip by signature
    with the conversion command), as for branch files."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PowerPaint text encoder {quote(path)} does not exist; put it in models/text_encoders "
                                "or models/inpaint")


def _encode(path: str) -> PowerPaintTasks:
    import comfy.clip_model
    import comfy.model_management as mm
    import comfy.ops

    name = os.path.basename(path)
    header = read_header(path)
    spec = inspect_text_encoder(name, {k: v.shape for k, v in header.tensors.items()})
    wanted = [k for k in header.tensors if k.startswith(spec.prefix + "text_model.")
              and not k.endswith("embeddings.position_ids")]
    bad = sorted(k for k in wanted if header.tensors[k].dtype not in WEIGHT_DTYPES)
    if bad:
        raise ValueError(f"{quote(name)} stores {quote(bad[:3])} as {header.tensors[bad[0]].dtype}; a text encoder "
                         "holds fp16/bf16/fp32 weights: re-download the file")
    device = mm.text_encoder_device()
    dtype = torch.float32 if device.type == "cpu" else mm.text_encoder_dtype(device)
    # Built on the meta device and filled by assignment: the file's tensors become the weights, so loading peaks at
    # one copy of the encoder, not two.
    model = comfy.clip_model.CLIPTextModel(spec.clip_config(), dtype=dtype, device="meta",
                                           operations=comfy.ops.manual_cast).text_model
    # ComfyUI builds the stock 49408-row vocabulary; PowerPaint's encoder is that plus the 30 task-token rows.
    model.embeddings.token_embedding = comfy.ops.manual_cast.Embedding(spec.vocab, spec.width, dtype=dtype,
                                                                       device="meta")
    cut = len(spec.prefix + "text_model.")
    state = {k[cut:]: v.to(device, dtype) for k, v in read_tensors(path, wanted).items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"{quote(name)} does not match a CLIP text encoder of its own sizes (missing "
                         f"{quote(missing[:3])}, unexpected {quote(unexpected[:3])}); re-download the file")
    del state
    strings = task_strings()
    ids = torch.tensor([task_token_ids(s) for s in strings], device=device)
    with torch.no_grad():
        hidden = model(ids, dtype=torch.float32)[0]  # last hidden state, after the final layer norm
    embeddings = {s: hidden[i:i + 1].detach().to("cpu", torch.float32).clone() for i, s in enumerate(strings)}
    del model, hidden
    mm.soft_empty_cache()
    if not all(torch.isfinite(e).all() for e in embeddings.values()):
        raise ValueError(f"{quote(name)} gives NaN/inf task embeddings: the file is damaged; re-download it")
    logger.info("PowerPaint text encoder %s: %d layers, width %d, %d task strings encoded on %s", name, spec.layers,
                spec.width, len(strings), device)
    return PowerPaintTasks(embeddings=embeddings, source=name, width=spec.width)


def load_task_embeddings(path: str) -> PowerPaintTasks:
    """The PowerPaint task embeddings of a text-encoder file, encoded on first use and cached per file version."""
    _check_path(path)
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    tasks = _encode(path)
    _CACHE[key] = tasks
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return tasks


def check_tasks_fit(tasks: PowerPaintTasks, painternet: Any) -> None:
    width = painternet.config.unet.get("cross_attention_dim")
    if tasks.width != width:
        raise ValueError(f"the task embeddings of {quote(tasks.source)} are {tasks.width} wide but the branch "
                         f"{quote(painternet.name)} attends to {width}-wide context; load PowerPaint v2's own text "
                         "encoder (powerpaint_brushnet_text_encoder_fp16.safetensors)")


def require_powerpaint(painternet: Any, node: str) -> None:
    if not is_powerpaint(painternet):
        fmt = getattr(getattr(painternet, "config", None), "source_format", type(painternet).__name__)
        raise ValueError(f"{node}: {quote(getattr(painternet, 'name', '?'))} is a {fmt} branch, not PowerPaint v2 "
                         "(BrushNet with cross-attention, PowerPaint_Brushnet/diffusion_pytorch_model.safetensors); "
                         "tasks only exist for PowerPaint: use Apply PainterNet for this branch")
