"""Tiny SD1.5- and SDXL-shaped components built from configs, for tests and the CPU smoke run (``--preset tiny-*``).

Why: the trainer and the branch must be exercised end to end without downloading anything. These models keep the
*topology* that matters to PainterNet (block types, layers per block, where cross-attention sits, SDXL's text_time
embedding and two text encoders, a VAE that downsamples by 8) with channel counts small enough for a 2-core CPU.
Weights are random but deterministic for a seed; the tokenizers are real ``CLIPTokenizer`` BPE tokenizers over a
small vocabulary written here (byte alphabet + whole-word merges for the synthetic captions).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from painternet_core.config import TINY_SD15_UNET, TINY_SDXL_UNET

logger = logging.getLogger("painternet.training")

__all__ = [
    "TINY_WORDS",
    "TinyComponents",
    "write_tiny_clip_tokenizer_files",
    "tiny_clip_tokenizer",
    "tiny_sd15_components",
    "tiny_sdxl_components",
    "save_tiny_pipeline",
]

#: Words that tokenize to one token each (the synthetic dataset's captions use only these).
TINY_WORDS: tuple[str, ...] = (
    "a", "an", "the", "on", "in", "of", "and", "with", "background", "photo", "image", "object",
    "red", "blue", "green", "yellow", "white", "black", "orange", "purple", "gray",
    "circle", "square", "triangle", "star", "ellipse", "rectangle", "shape", "small", "large",
)

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """The byte→printable-unicode table of CLIP/GPT-2 BPE (so every byte is a vocabulary symbol)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes)))


def write_tiny_clip_tokenizer_files(directory: str | Path, words: tuple[str, ...] = TINY_WORDS) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` of a tiny CLIP BPE vocabulary into ``directory``.

    Layout follows CLIP's: the 256 byte symbols, the same with ``</w>``, then one entry per merge, then SOT and EOT
    last. The merges are *learned* by BPE on ``words`` (repeatedly merge the most frequent adjacent pair, ties broken
    lexicographically, until every word is one symbol), which is what guarantees that applying them in rank order
    turns each word into a single ``word</w>`` token; hand-written prefix merges would interfere across words (the
    "r e" of "red" would split "green"). Any other text still tokenizes, into byte symbols. Returns the two paths.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for symbol in symbols + [s + "</w>" for s in symbols]:
        vocab[symbol] = len(vocab)
    for word in words:
        if not word.isascii() or not word.isalpha():
            raise ValueError(f"tiny tokenizer words must be ASCII letters; got {word!r}. Remove it from words.")
    segmented = [list(word[:-1]) + [word[-1] + "</w>"] for word in dict.fromkeys(words)]
    merges: list[tuple[str, str]] = []
    while any(len(pieces) > 1 for pieces in segmented):
        counts: dict[tuple[str, str], int] = {}
        for pieces in segmented:
            for pair in zip(pieces, pieces[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        for index, pieces in enumerate(segmented):
            merged: list[str] = []
            position = 0
            while position < len(pieces):
                if position + 1 < len(pieces) and (pieces[position], pieces[position + 1]) == best:
                    merged.append(best[0] + best[1])
                    position += 2
                else:
                    merged.append(pieces[position])
                    position += 1
            segmented[index] = merged
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    vocab_path = directory / "vocab.json"
    merges_path = directory / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def tiny_clip_tokenizer(directory: str | Path, *, pad_token: str = EOS, model_max_length: int = 77) -> Any:
    """A real ``transformers.CLIPTokenizer`` over the tiny vocabulary.

    ``pad_token``: ``<|endoftext|>`` mimics SD1.5's tokenizer (pads with EOT); ``"!"`` mimics SDXL's
    ``tokenizer_2`` (pads with id 0). These are the two cases the ATAL token mask must handle.
    """
    from transformers import CLIPTokenizer

    vocab_path, merges_path = write_tiny_clip_tokenizer_files(directory)
    return CLIPTokenizer(str(vocab_path), str(merges_path), pad_token=pad_token, model_max_length=model_max_length)


@dataclass
class TinyComponents:
    """Everything a PainterNet trainer needs from a base pipeline (``*_2`` are None for SD1.5)."""

    family: str
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    text_encoder_2: Any = None
    tokenizer_2: Any = None


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed module initialisation without disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _text_encoder(tokenizer: Any, hidden: int, *, with_projection: bool, projection_dim: int, seed: int) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length, projection_dim=projection_dim,
        hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed):
        model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    return model.eval()


def _vae(scaling_factor: float, seed: int, *, force_upcast: bool) -> Any:
    from diffusers import AutoencoderKL

    with _seeded(seed):
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=64,
            scaling_factor=scaling_factor, force_upcast=force_upcast,
        )
    return vae.eval()


def _scheduler() -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="epsilon", clip_sample=False, steps_offset=1, timestep_spacing="leading")


def tiny_sd15_components(tmpdir: str | Path, seed: int = 0) -> TinyComponents:
    """SD1.5-shaped: 3×CrossAttnDownBlock2D + DownBlock2D, 2 layers per block (so 12/1/15 layer control points and
    16 cross-attention blocks like the real model), channels (32, 32, 64, 64) (``TINY_SD15_UNET``, shared with the
    parity tests so an exported tiny branch runs in ComfyUI too), one text encoder of width 32.

    ``tmpdir`` receives the tokenizer's vocabulary files.
    """
    from diffusers import UNet2DConditionModel

    tokenizer = tiny_clip_tokenizer(Path(tmpdir) / "tokenizer")
    text_encoder = _text_encoder(tokenizer, 32, with_projection=False, projection_dim=32, seed=seed + 1)
    with _seeded(seed):
        unet = UNet2DConditionModel.from_config(dict(TINY_SD15_UNET, sample_size=8))
    return TinyComponents(family="sd15", unet=unet.eval(), vae=_vae(0.18215, seed + 2, force_upcast=False),
                          text_encoder=text_encoder, tokenizer=tokenizer, scheduler=_scheduler())


def tiny_sdxl_components(tmpdir: str | Path, seed: int = 0) -> TinyComponents:
    """SDXL-shaped (``painternet_core.config.TINY_SDXL_UNET``): DownBlock2D + 2×CrossAttnDownBlock2D with the real
    transformer depths (1, 2, 10), so 9/1/11 layer control points and 70 ACPs; linear projections, ``text_time``
    added conditioning, two text encoders (widths 32 + 32 = cross_attention_dim 64; the second with a 32-d projection
    used as the pooled embedding) and tokenizers padding with EOT and with "!" respectively. The same topology as the
    parity tests, so an exported tiny branch also runs in ComfyUI (channels are multiples of 32 there).
    """
    from diffusers import UNet2DConditionModel

    tokenizer = tiny_clip_tokenizer(Path(tmpdir) / "tokenizer")
    tokenizer_2 = tiny_clip_tokenizer(Path(tmpdir) / "tokenizer_2", pad_token="!")
    text_encoder = _text_encoder(tokenizer, 32, with_projection=False, projection_dim=32, seed=seed + 1)
    text_encoder_2 = _text_encoder(tokenizer_2, 32, with_projection=True, projection_dim=32, seed=seed + 3)
    with _seeded(seed):
        unet = UNet2DConditionModel.from_config(dict(TINY_SDXL_UNET, sample_size=8))
    return TinyComponents(family="sdxl", unet=unet.eval(), vae=_vae(0.13025, seed + 2, force_upcast=True),
                          text_encoder=text_encoder, tokenizer=tokenizer, scheduler=_scheduler(),
                          text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)


def save_tiny_pipeline(directory: str | Path, family: str, seed: int = 0) -> Path:
    """Write a diffusers-format pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
    [text_encoder_2/, tokenizer_2/], scheduler/) that ``from_pretrained(directory)`` loads, per component or whole.

    Why a real folder: the trainer loads its base model only through ``from_pretrained(local path)``, so the tiny
    presets exercise exactly the code path a real SD1.5/SDXL checkpoint takes.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    directory = Path(directory)
    scratch = directory / ".tokenizer_src"
    if family == "sd15":
        parts = tiny_sd15_components(scratch, seed)
        pipeline = StableDiffusionPipeline(
            vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
            scheduler=parts.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif family == "sdxl":
        parts = tiny_sdxl_components(scratch, seed)
        pipeline = StableDiffusionXLPipeline(
            vae=parts.vae, text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2,
            tokenizer=parts.tokenizer, tokenizer_2=parts.tokenizer_2, unet=parts.unet, scheduler=parts.scheduler)
    else:
        raise ValueError(f"family must be 'sd15' or 'sdxl'; got {family!r}.")
    pipeline.save_pretrained(directory, safe_serialization=True)
    for leftover in sorted(scratch.rglob("*"), reverse=True):
        leftover.unlink() if leftover.is_file() else leftover.rmdir()
    scratch.rmdir()
    logger.info("wrote tiny %s pipeline to %s", family, directory)
    return directory
