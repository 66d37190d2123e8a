"""Tiny models and data shared by the PainterBench and PainterData tests (registered as a pytest plugin in
conftest.py, so ``clip_dir``, ``clip`` and ``gdino_dir`` are fixtures for every test module and the helpers are imported
by name).

Every model is built from a tiny config and saved to a temp folder (CLIP with a real BPE tokenizer written by
``training.trainer.presets``, Grounding DINO with a tiny Swin + BERT); expected values are computed independently of
the code under test (manual CLIP forward, hand-written RLE, hand-placed shards). Heavy imports stay inside the fixtures:
every test session loads this module.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from PIL import Image

if TYPE_CHECKING:
    from training.painterbench.metrics import ClipScorer

REPO = Path(__file__).resolve().parent.parent
PROJECTION = 16


# ------------------------------------------------------------------------------------------------------------------
# tiny models
# ------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from training.trainer.presets import tiny_clip_tokenizer

    directory = tmp_path_factory.mktemp("clip")
    tokenizer = tiny_clip_tokenizer(directory)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=PROJECTION)
    torch.manual_seed(0)
    CLIPModel(config).eval().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def clip(clip_dir: Path) -> ClipScorer:
    from training.painterbench.metrics import ClipScorer

    return ClipScorer(clip_dir)


@pytest.fixture(scope="module")
def gdino_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import (BertConfig, BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SwinConfig)

    directory = tmp_path_factory.mktemp("gdino")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "red", "blue", "circle", "square", "car"]
    (directory / "vocab.txt").write_text("\n".join(words) + "\n")
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 32, "longest_edge": 64}),
        tokenizer=BertTokenizer(str(directory / "vocab.txt")))
    processor.save_pretrained(directory)
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(window_size=7, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                                   image_size=32, out_features=["stage2", "stage3", "stage4"], out_indices=[2, 3, 4]),
        text_config=BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=37, max_position_embeddings=64),
        d_model=32, num_queries=6, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, num_feature_levels=3, encoder_n_points=2,
        decoder_n_points=2, max_text_len=32)
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(config).eval().save_pretrained(directory)
    return directory


def manual_cosine(clip_dir: Path, image: Image.Image, text: str) -> float:
    """CLIP cosine computed without ClipScorer: vision/text towers, projections, normalisation by hand."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor = CLIPProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        pixels = processor(images=image, return_tensors="pt")["pixel_values"]
        image_vec = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)[0]
        tokens = processor(text=[text], return_tensors="pt")
        text_vec = model.text_projection(model.text_model(**tokens).pooler_output)[0]
    return float(image_vec @ text_vec / (image_vec.norm() * text_vec.norm()))


def noise_image(seed: int, width: int = 48, height: int = 40) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------------------------------
# captioners, RLE and PainterData shards
# ------------------------------------------------------------------------------------------------------------------

class ColourCaptioner:
    """A real deterministic captioner: names the dominant channel of the crop's centre pixel."""

    def __init__(self) -> None:
        self.calls = 0

    def caption(self, image: Image.Image) -> str:
        self.calls += 1
        r, g, b = np.asarray(image.convert("RGB"))[image.height // 2, image.width // 2].tolist()
        colour = ("red", "green", "blue")[int(np.argmax([r, g, b]))]
        return f"a photo of a {colour} square object with a large background"


class FirstWordsShortener:
    """Keeps the colour and noun: 'a photo of a red square ...' -> 'red square'."""

    def shorten(self, caption: str) -> str:
        words = caption.split()
        return " ".join(words[4:6])


def encode_rle(mask: np.ndarray) -> list[int]:
    flat = (mask.reshape(-1, order="F") >= 0.5).astype(np.int8)
    edges = np.diff(np.concatenate([[0], flat, [0]]))
    starts, ends = np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]
    return [int(v) for pair in zip(starts + 1, ends - starts) for v in pair]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def coloured_sample() -> tuple[Image.Image, list[np.ndarray]]:
    array = np.zeros((40, 48, 3), np.uint8)
    array[:, :24] = (220, 30, 30)
    array[:, 24:] = (30, 30, 220)
    masks = [np.zeros((40, 48), np.float32) for _ in range(3)]
    masks[0][8:30, 2:20] = 1.0
    masks[2][5:35, 28:46] = 1.0
    return Image.fromarray(array), masks


def write_shard(path: Path) -> dict[str, bytes]:
    image, masks = coloured_sample()
    members = {
        "s0/000.image": png_bytes(image), "s0/000.caption": b"two colours", "s0/000.height": b"40",
        "s0/000.width": b"48", "s0/000.segmentation": json.dumps({"mask": [encode_rle(m) for m in masks]}).encode(),
        "s0/001.image": png_bytes(noise_image(7)), "s0/001.caption": b"broken", "s0/001.segmentation": b"{not json",
        "s0/002.caption": b"no image at all",
    }
    with tarfile.open(path, "w") as archive:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return members


def torchrun(script: str, argv: list[str], log: Path) -> tuple[int, str]:
    """``torchrun --standalone --nproc_per_node 2`` of a repository script on CPU (gloo), as the trainer's DDP test
    launches it: output to a file (two chatty ranks never block on a pipe), the whole process group killed on a
    timeout."""
    import signal

    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / script), *argv]
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return code, log.read_text(errors="replace")
