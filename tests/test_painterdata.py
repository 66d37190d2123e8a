"""PainterData: the local-caption pipeline (captioner, shortener, CLIP filter), the RLE/segmentation decoding of the
BrushData shard format, caption shards and their resumability, and the captioner CLI over two processes, on tiny random
models.

The tiny CLIP, the images and the shard writer are shared with test_painterbench.py (painter_fixtures.py); the BLIP
captioner is built here, its only user.
"""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from painter_fixtures import (ColourCaptioner, FirstWordsShortener, coloured_sample, encode_rle, manual_cosine,
                              noise_image, torchrun, write_shard)
from training.painterbench.metrics import ClipScorer, crop_mask_region
from training.painterdata import captions, shards


# ------------------------------------------------------------------------------------------------------------------
# CLIP filter
# ------------------------------------------------------------------------------------------------------------------

def test_clip_filter_threshold_is_inclusive(clip: ClipScorer, clip_dir: Path) -> None:
    image = noise_image(6)
    masks = [np.zeros((40, 48), np.float32) for _ in range(3)]
    masks[0][5:20, 5:30] = 1.0
    masks[2][22:38, 10:44] = 1.0  # masks[1] stays empty -> null, never captioned
    crops = [crop_mask_region(image, masks[0]), crop_mask_region(image, masks[2])]
    shorter = FirstWordsShortener()
    texts = [shorter.shorten(ColourCaptioner().caption(crop)) for crop in crops]
    independent = [manual_cosine(clip_dir, crop, text) for crop, text in zip(crops, texts)]
    scores = [float(v) for v in clip.cosine(crops, texts)]
    assert scores == pytest.approx(independent, abs=1e-5)
    low, high = sorted(scores)
    assert low < high
    for threshold, kept in ((low - 1e-3, 2), (high, 1), (high + 1e-3, 0)):
        captioner = ColourCaptioner()
        got, meta = captions.caption_objects(image, masks, captioner, shorter,
                                             captions.ClipCaptionFilter(clip, threshold))
        assert captioner.calls == 2 and got[1] is None and meta[1] is None
        assert sum(c is not None for c in got) == kept
        for index, text, score in ((0, texts[0], scores[0]), (2, texts[1], scores[1])):
            assert meta[index]["short"] == text and meta[index]["clip"] == pytest.approx(score, abs=1e-6)
            assert got[index] == (text if score >= threshold else None)
    with pytest.raises(ValueError, match="not 20"):
        captions.ClipCaptionFilter(clip, 20.0)


# ------------------------------------------------------------------------------------------------------------------
# RLE, caption shards, resumability
# ------------------------------------------------------------------------------------------------------------------

def test_decode_segmentation_column_major_one_based() -> None:
    payload = json.dumps({"mask": [[2, 2, 6, 1], "1 6", []]})
    first, full, empty = shards.decode_segmentation(payload, 3, 2)
    # column-major cells 1, 2 and 5 (0-based): k -> (row k % 3, column k // 3)
    np.testing.assert_array_equal(first, np.array([[0, 0], [1, 0], [1, 1]], np.float32))
    assert first.dtype == np.float32 and full.all() and not empty.any()
    rng = np.random.default_rng(0)
    random_mask = (rng.random((7, 5)) > 0.5).astype(np.float32)
    decoded = shards.decode_segmentation(json.dumps({"mask": [encode_rle(random_mask)]}), 7, 5)[0]
    np.testing.assert_array_equal(decoded, random_mask)
    with pytest.raises(ValueError):
        shards.decode_segmentation(json.dumps({"mask": [[6, 2]]}), 3, 2)
    with pytest.raises(ValueError, match="mask"):
        shards.decode_segmentation("[1, 2]", 3, 2)


def read_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as archive:
        return {info.name: archive.extractfile(info).read() for info in archive if info.isfile()}


class FailingCaptioner(ColourCaptioner):
    def caption(self, image: Image.Image) -> str:
        raise RuntimeError("captioner crashed")


def test_caption_shards_end_to_end_and_resumable(clip: ClipScorer, tmp_path: Path) -> None:
    source = tmp_path / "in"
    source.mkdir()
    members = write_shard(source / "shard-000.tar")
    write_shard(source / "shard-001.tar")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".shard-000.tar.tmp-999").write_bytes(b"stale temp of a killed run")
    with pytest.raises(RuntimeError, match="captioner crashed"):
        captions.process_shards([source], out, FailingCaptioner(), progress=False)
    assert sorted(p.name for p in out.iterdir()) == []  # no partial shard, stale temp removed

    threshold = -1.0  # keep everything: alignment and copying are what this test checks
    stats = captions.process_shards([source], out, ColourCaptioner(), FirstWordsShortener(),
                                    captions.ClipCaptionFilter(clip, threshold), progress=False)
    assert [(s.samples, s.objects, s.kept, s.malformed, s.skipped) for s in stats] == [(3, 2, 2, 2, False)] * 2
    written = read_members(out / "shard-000.tar")
    for name, payload in members.items():
        assert written[name] == payload  # every input member copied byte for byte
    assert json.loads(written["s0/000.local_caption"]) == ["red square", None, "blue square"]
    meta = json.loads(written["s0/000.local_caption_meta"])
    assert meta[1] is None and meta[0]["caption"].startswith("a photo of a red")
    image, masks = coloured_sample()
    assert meta[2]["clip"] == pytest.approx(float(clip.cosine([crop_mask_region(image, masks[2])],
                                                              ["blue square"])[0]), abs=1e-6)
    assert "s0/001.local_caption" not in written and "s0/002.local_caption" not in written
    assert sorted(p.name for p in out.iterdir()) == ["shard-000.tar", "shard-001.tar"]

    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    captioner = ColourCaptioner()
    again = captions.process_shards([source], out, captioner, progress=False)
    assert all(s.skipped for s in again) and captioner.calls == 0
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before
    with pytest.raises(ValueError, match="holds the input shards"):
        captions.process_shards([source], source, captioner, progress=False)


BLIP_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "picture", "of", "red", "blue", "square"]


def save_tiny_blip(tmp_path: Path) -> Path:
    """A tiny random BLIP captioner (processor + model) saved to ``tmp_path``."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    words = BLIP_WORDS
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer(str(tmp_path / "vocab.txt"), bos_token="[DEC]")
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(tmp_path)
    config = BlipConfig(
        text_config=dict(vocab_size=len(words), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, encoder_hidden_size=32, bos_token_id=5, pad_token_id=0,
                         sep_token_id=3, eos_token_id=3, max_position_embeddings=64),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(tmp_path)
    return tmp_path


def test_transformers_captioner_runs_a_local_blip(tmp_path: Path) -> None:
    words = BLIP_WORDS
    save_tiny_blip(tmp_path)
    captioner = captions.TransformersCaptioner(tmp_path, prompt="a picture of", max_new_tokens=5)
    assert isinstance(captioner, captions.Captioner)
    text = captioner.caption(noise_image(11))
    assert isinstance(text, str) and not text.startswith("a picture of")
    assert set(text.split()) <= set(words[6:])
    assert captioner.caption(noise_image(11)) == text  # greedy: reproducible
    with pytest.raises(ValueError, match="is not a folder"):
        captions.TransformersCaptioner(tmp_path / "missing")


def test_transformers_shortener_runs_a_local_causal_lm(clip_dir: Path, tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    tokenizer = GPT2TokenizerFast(vocab_file=str(clip_dir / "vocab.json"), merges_file=str(clip_dir / "merges.txt"),
                                  unk_token="<|endoftext|>", bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    tokenizer.save_pretrained(tmp_path)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=16, n_layer=1, n_head=2,
                               bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
                    ).save_pretrained(tmp_path)
    shortener = captions.TransformersShortener(tmp_path, max_new_tokens=4)
    first = shortener.shorten("a red square on a blue background")
    assert isinstance(first, str) and first and "\n" not in first
    assert shortener.shorten("a red square on a blue background") == first  # greedy: reproducible
    with pytest.raises(ValueError, match="placeholder"):
        captions.TransformersShortener(tmp_path, instruction="no slot")


@pytest.mark.slow
def test_captions_spread_over_two_processes(tmp_path: Path) -> None:
    """`torchrun --nproc_per_node 2` (CPU): each rank captions its own shards; the outputs are byte-identical to a
    one-process run."""
    blip = save_tiny_blip(tmp_path / "blip")
    source = tmp_path / "in"
    source.mkdir()
    for n in range(3):
        write_shard(source / f"shard-{n:03d}.tar")
    common = ["--shards", str(source), "--captioner", str(blip), "--captioner_max_new_tokens", "4",
              "--no_clip_filter", "--no_progress"]
    assert captions.main(common + ["--out_dir", str(tmp_path / "one")]) == 0
    code, text = torchrun("training/painterdata/captions.py", common + ["--out_dir", str(tmp_path / "two")],
                          tmp_path / "captions.log")
    assert code == 0, text[-4000:]
    assert "rank 0/2 captioned 2 shards" in text and "rank 1/2 captioned 1 shards" in text
    one = sorted((tmp_path / "one").iterdir())
    assert [p.name for p in one] == [f"shard-{n:03d}.tar" for n in range(3)]
    for path in one:
        assert (tmp_path / "two" / path.name).read_bytes() == path.read_bytes()
    assert "3 shards captioned" in text
