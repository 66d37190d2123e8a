"""PowerPaint v2 task recipe: the task table, the placeholder-token expansion, the blend of task embeddings, and the
checks that a text-encoder file is the one PowerPaint v2 needs.

Why this lives apart from the branch: PowerPaint v2's branch (BrushNet with cross-attention) was trained on *task
tokens*, never on the user's prompt. Its context is `t·E(A) + (1−t)·E(B)` on the final hidden states of its own CLIP-L
text encoder (the stock SD1.5 encoder plus 30 learned rows), and its negative context the same blend of the task's
negative prompts; the base UNet keeps the user's prompt. Every task prompt is made only of placeholder tokens, so the
branch context is a pure function of (task, fitting): the four-or-fewer distinct strings are encoded once and cached.

Facts from the PowerPaint v2 release (open-mmlab/PowerPaint, `gradio_PowerPaint_BrushNet.py`, the demo that loads
`PowerPaint_Brushnet/pytorch_model.bin`; `powerpaint/utils/utils.py`; the BrushNet-CA pipeline):
- tokens are added in the order P_ctxt, P_shape, P_obj, 10 vectors each, so P_x becomes P_x_0 … P_x_9 with ids
  49408 … 49437 after the 49408-entry CLIP vocabulary;
- the encoder output used is `text_encoder(ids)[0]` (last hidden state, after the final layer norm), 77 tokens padded
  with the end token;
- the base prompt gets " empty scene blur" for object removal and " empty scene" for outpainting and context-aware.

Pure PyTorch: no comfy imports (the nodes adapt this to ComfyUI).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch

from .errors import quote

PLACEHOLDERS: tuple[str, ...] = ("P_ctxt", "P_shape", "P_obj")
VECTORS_PER_TOKEN = 10
CLIP_VOCAB = 49408  # the stock CLIP BPE vocabulary; added tokens follow it
FIRST_NEW_ID = CLIP_VOCAB
POWERPAINT_VOCAB = CLIP_VOCAB + len(PLACEHOLDERS) * VECTORS_PER_TOKEN
START_ID = 49406
END_ID = 49407  # also the padding id of the SD1.5 tokenizer
CONTEXT_LENGTH = 77
TASK_NAMES: tuple[str, ...] = ("text-guided", "shape-guided", "object-removal", "outpainting", "context-aware")


@dataclass(frozen=True)
class TaskRecipe:
    """The branch's prompts (A/B and negative A/B, blended by fitting) and the suffix the base prompt gets."""

    prompt_a: str
    prompt_b: str
    negative_a: str
    negative_b: str
    base_suffix: str


TASKS: dict[str, TaskRecipe] = {
    "text-guided": TaskRecipe("P_obj", "P_obj", "P_obj", "P_obj", ""),
    "shape-guided": TaskRecipe("P_shape", "P_ctxt", "P_shape", "P_ctxt", ""),
    "object-removal": TaskRecipe("P_ctxt", "P_ctxt", "P_obj", "P_obj", " empty scene blur"),
    "outpainting": TaskRecipe("P_ctxt", "P_ctxt", "P_obj", "P_obj", " empty scene"),
    "context-aware": TaskRecipe("P_ctxt", "P_ctxt", "", "", " empty scene"),
}


def task_recipe(task: str) -> TaskRecipe:
    if task not in TASKS:
        raise ValueError(f"unknown PowerPaint task {quote(task)}; use one of {', '.join(TASK_NAMES)}")
    return TASKS[task]


def task_strings() -> tuple[str, ...]:
    """Every distinct branch prompt of the table, in a fixed order: what the encoder node encodes once."""
    seen: dict[str, None] = {}
    for name in TASK_NAMES:
        r = TASKS[name]
        for text in (r.prompt_a, r.prompt_b, r.negative_a, r.negative_b):
            seen.setdefault(text, None)
    return tuple(seen)


def placeholder_ids(name: str) -> list[int]:
    """The 10 token ids `name` (one of PLACEHOLDERS) expands to."""
    if name not in PLACEHOLDERS:
        raise ValueError(f"unknown placeholder {quote(name)}; PowerPaint v2 has {', '.join(PLACEHOLDERS)}")
    first = FIRST_NEW_ID + PLACEHOLDERS.index(name) * VECTORS_PER_TOKEN
    return list(range(first, first + VECTORS_PER_TOKEN))


def expand_placeholders(text: str) -> str:
    """The text the tokenizer sees: each placeholder replaced by its vectors' token names (`P_x_0 … P_x_9`)."""
    for name in PLACEHOLDERS:
        text = re.sub(rf"\b{name}\b", " ".join(f"{name}_{i}" for i in range(VECTORS_PER_TOKEN)), text)
    return text


def task_token_ids(prompt: str) -> list[int]:
    """The 77 token ids of a task prompt made only of placeholders (every prompt of the table): start token, the
    placeholders' ids, end token, padded with the end token, as the SD1.5 tokenizer with the added tokens gives."""
    words = prompt.split()
    unknown = [w for w in words if w not in PLACEHOLDERS]
    if unknown:
        raise ValueError(f"task prompt {quote(prompt)} has words other than placeholders ({quote(unknown)}); only "
                         f"{', '.join(PLACEHOLDERS)} are encoded without a tokenizer")
    ids = [START_ID] + [i for w in words for i in placeholder_ids(w)] + [END_ID]
    if len(ids) > CONTEXT_LENGTH:
        raise ValueError(f"task prompt {quote(prompt)} is {len(ids)} tokens, over CLIP's {CONTEXT_LENGTH}")
    return ids + [END_ID] * (CONTEXT_LENGTH - len(ids))


def blend(a: torch.Tensor, b: torch.Tensor, fitting: float) -> torch.Tensor:
    """PowerPaint's task blend `t·a + (1−t)·b` (t = fitting degree)."""
    return a * fitting + (1.0 - fitting) * b


def check_fitting(fitting: float) -> float:
    if isinstance(fitting, bool) or not isinstance(fitting, (int, float)) or not 0.0 <= float(fitting) <= 1.0:
        raise ValueError(f"fitting={quote(fitting)}: the fitting degree is a number in [0, 1] (1 = follow the mask's "
                         "shape exactly, as PowerPaint's default)")
    return float(fitting)


def branch_context(embeddings: Mapping[str, torch.Tensor], task: str,
                   fitting: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) contexts of the branch for `task`, each (1, 77, C), from the cached per-string embeddings."""
    recipe = task_recipe(task)
    t = check_fitting(fitting)
    missing = [s for s in (recipe.prompt_a, recipe.prompt_b, recipe.negative_a, recipe.negative_b)
               if s not in embeddings]
    if missing:
        raise ValueError(f"the task embeddings lack {quote(missing)}; re-run the PowerPaint text encoder node")
    cond = blend(embeddings[recipe.prompt_a], embeddings[recipe.prompt_b], t)
    uncond = blend(embeddings[recipe.negative_a], embeddings[recipe.negative_b], t)
    return cond, uncond


def base_prompt(text: str, task: str, append_suffix: bool = True) -> str:
    """The base UNet's prompt for `task`: the user's text plus the task's suffix (when asked)."""
    recipe = task_recipe(task)
    return text + recipe.base_suffix if append_suffix else text


# --------------------------------------------------------------------------------------------------------------------
# text-encoder files
# --------------------------------------------------------------------------------------------------------------------

TOKEN_EMBEDDING = "text_model.embeddings.token_embedding.weight"
POSITION_EMBEDDING = "text_model.embeddings.position_embedding.weight"
# Where whole-encoder files put the HF CLIPTextModel keys: bare (transformers / diffusers `text_encoder/`), under a
# ComfyUI or SD checkpoint prefix.
KEY_PREFIXES: tuple[str, ...] = ("", "transformer.", "cond_stage_model.transformer.", "text_encoder.",
                                 "clip_l.transformer.", "te.")
CLIP_HEAD_DIM = 64  # every OpenAI / OpenCLIP text tower uses 64-wide heads
MAX_LAYERS = 64
MAX_WIDTH = 4096
DOWNLOAD_HINT = ("use PowerPaint v2's own text encoder: powerpaint_brushnet_text_encoder_fp16.safetensors, or "
                 "PowerPaint_Brushnet/pytorch_model.bin converted to safetensors")


@dataclass(frozen=True)
class TextEncoderSpec:
    """What a PowerPaint text-encoder file holds, read from its tensor shapes only."""

    prefix: str
    width: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    positions: int

    def clip_config(self) -> dict[str, object]:
        """The config of a CLIP text tower of these sizes (OpenAI CLIP-L's activation and norms)."""
        return {"num_hidden_layers": self.layers, "hidden_size": self.width, "num_attention_heads": self.heads,
                "intermediate_size": self.intermediate, "hidden_act": "quick_gelu", "vocab_size": self.vocab,
                "max_position_embeddings": self.positions, "layer_norm_eps": 1e-5, "bos_token_id": START_ID,
                "eos_token_id": END_ID, "projection_dim": self.width}


def inspect_text_encoder(name: str, shapes: Mapping[str, tuple[int, ...]]) -> TextEncoderSpec:
    """Check that a file's tensors are a whole CLIP text encoder carrying the 30 PowerPaint rows; every refusal is one
    line naming what the file is and which file to use instead."""
    where = quote(name)
    prefix = next((p for p in KEY_PREFIXES if p + TOKEN_EMBEDDING in shapes), None)
    if prefix is None:
        if any(k.startswith(("brushnet_", "conv_in_condition.", "down_blocks.")) for k in shapes):
            raise ValueError(f"{where} is a branch (BrushNet/PowerPaint UNet weights), not a text encoder; load it "
                             f"with Load PainterNet and give this node the text encoder: {DOWNLOAD_HINT}")
        if any(k.startswith("conditioner.embedders.") for k in shapes):
            raise ValueError(f"{where} holds an SDXL text encoder; {DOWNLOAD_HINT}")
        rows = [k for k, s in shapes.items() if len(s) == 2 and s[0] == POWERPAINT_VOCAB - CLIP_VOCAB]
        if rows:
            raise ValueError(f"{where} holds only the {POWERPAINT_VOCAB - CLIP_VOCAB} added token rows ({quote(rows)}), "
                             f"not the whole encoder they belong to; {DOWNLOAD_HINT}")
        raise ValueError(f"{where} has no CLIP text-encoder token embedding ({TOKEN_EMBEDDING}; first keys "
                         f"{quote(sorted(shapes)[:3])}); {DOWNLOAD_HINT}")
    token = shapes[prefix + TOKEN_EMBEDDING]
    if len(token) != 2:
        raise ValueError(f"{where}: token embedding has shape {token}, expected (vocab, width); {DOWNLOAD_HINT}")
    vocab, width = token
    layers = 0
    while f"{prefix}text_model.encoder.layers.{layers}.self_attn.q_proj.weight" in shapes:
        layers += 1
        if layers > MAX_LAYERS:
            raise ValueError(f"{where} has over {MAX_LAYERS} encoder layers; it is not a CLIP text encoder")
    if width == 1280 or layers == 32:
        raise ValueError(f"{where} is an SDXL CLIP-G text encoder (width {width}, {layers} layers); PowerPaint v2 is "
                         f"SD1.5 and needs its CLIP-L encoder: {DOWNLOAD_HINT}")
    if width == 1024 and layers in (23, 24):
        raise ValueError(f"{where} is an SD2 OpenCLIP-H text encoder (width {width}); {DOWNLOAD_HINT}")
    if not 1 <= width <= MAX_WIDTH or width % CLIP_HEAD_DIM or layers == 0:
        raise ValueError(f"{where} has a token embedding of width {width} and {layers} encoder layers: not a CLIP "
                         f"text encoder; {DOWNLOAD_HINT}")
    if vocab == CLIP_VOCAB:
        raise ValueError(f"{where} is a stock CLIP text encoder ({vocab} token rows) without PowerPaint's "
                         f"{POWERPAINT_VOCAB - CLIP_VOCAB} task-token rows; {DOWNLOAD_HINT}")
    if vocab != POWERPAINT_VOCAB:
        raise ValueError(f"{where} has {vocab} token rows; PowerPaint v2's encoder has {POWERPAINT_VOCAB} (CLIP's "
                         f"{CLIP_VOCAB} plus 30 task tokens); {DOWNLOAD_HINT}")
    fc1 = shapes.get(f"{prefix}text_model.encoder.layers.0.mlp.fc1.weight")
    positions = shapes.get(prefix + POSITION_EMBEDDING)
    if fc1 is None or len(fc1) != 2 or positions is None or len(positions) != 2 or positions[0] < CONTEXT_LENGTH:
        raise ValueError(f"{where} lacks parts of a CLIP text encoder (mlp or {CONTEXT_LENGTH} position rows); "
                         f"{DOWNLOAD_HINT}")
    return TextEncoderSpec(prefix=prefix, width=width, layers=layers, heads=width // CLIP_HEAD_DIM,
                           intermediate=fc1[0], vocab=vocab, positions=positions[0])


@dataclass(frozen=True)
class PowerPaintTasks:
    """The cached branch embeddings (the POWERPAINT_TASKS value): one (1, 77, C) fp32 CPU tensor per task string.

    Small (4 × 77 × 768 floats ≈ 1 MB) and device/dtype-agnostic: the injection moves and casts it once per
    sampling run. The text encoder that produced it is gone by the time anyone holds this."""

    embeddings: Mapping[str, torch.Tensor]
    source: str
    width: int

    def context(self, task: str, fitting: float) -> tuple[torch.Tensor, torch.Tensor]:
        return branch_context(self.embeddings, task, fitting)

    def __repr__(self) -> str:
        return f"PowerPaintTasks({self.source!r}, width {self.width}, {len(self.embeddings)} strings)"
