"""PowerPaint v2 recipe in core: task table, token expansion and ids (checked against the SD1.5 tokenizer ComfyUI
ships, with the tokens added the way PowerPaint's demo adds them), the fitting blend, the text-encoder file checks,
and the outpainting canvas."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from painternet_core import outpaint, powerpaint
from painternet_core.crop import stitch_batch


def _tokenizer():
    from transformers import CLIPTokenizer

    from harness import COMFYUI_PATH

    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(COMFYUI_PATH, "comfy", "sd1_tokenizer"))
    # PowerPaint's demo: add_tokens(["P_ctxt", "P_shape", "P_obj"], num_vectors_per_token=10), each vector its own token
    for name in ("P_ctxt", "P_shape", "P_obj"):
        for i in range(10):
            assert tokenizer.add_tokens(f"{name}_{i}") == 1
    return tokenizer


def test_placeholder_ids_follow_powerpaint_order():
    assert powerpaint.placeholder_ids("P_ctxt") == list(range(49408, 49418))
    assert powerpaint.placeholder_ids("P_shape") == list(range(49418, 49428))
    assert powerpaint.placeholder_ids("P_obj") == list(range(49428, 49438))
    assert powerpaint.POWERPAINT_VOCAB == 49438
    with pytest.raises(ValueError, match="P_ctxt, P_shape, P_obj"):
        powerpaint.placeholder_ids("P_foo")


@pytest.mark.parametrize("prompt", sorted(powerpaint.task_strings()))
def test_task_token_ids_match_the_real_tokenizer(prompt):
    tokenizer = _tokenizer()
    expected = tokenizer(powerpaint.expand_placeholders(prompt), padding="max_length", max_length=77,
                         truncation=True).input_ids
    assert powerpaint.task_token_ids(prompt) == expected
    assert len(expected) == 77


def test_expand_placeholders():
    assert powerpaint.expand_placeholders("P_obj") == " ".join(f"P_obj_{i}" for i in range(10))
    assert powerpaint.expand_placeholders("") == ""
    with pytest.raises(ValueError, match="placeholders"):
        powerpaint.task_token_ids("a cat P_obj")


def test_task_table():
    t = powerpaint.TASKS
    assert set(t) == set(powerpaint.TASK_NAMES)
    assert (t["shape-guided"].prompt_a, t["shape-guided"].prompt_b) == ("P_shape", "P_ctxt")
    assert (t["shape-guided"].negative_a, t["shape-guided"].negative_b) == ("P_shape", "P_ctxt")
    assert (t["object-removal"].prompt_a, t["object-removal"].negative_a) == ("P_ctxt", "P_obj")
    assert (t["context-aware"].negative_a, t["context-aware"].negative_b) == ("", "")
    assert (t["text-guided"].prompt_a, t["text-guided"].negative_b) == ("P_obj", "P_obj")
    assert powerpaint.base_prompt("a room", "object-removal") == "a room empty scene blur"
    assert powerpaint.base_prompt("a room", "outpainting") == "a room empty scene"
    assert powerpaint.base_prompt("a room", "context-aware") == "a room empty scene"
    assert powerpaint.base_prompt("a room", "object-removal", append_suffix=False) == "a room"
    assert powerpaint.base_prompt("a cat", "text-guided") == "a cat"
    assert set(powerpaint.task_strings()) == {"P_obj", "P_shape", "P_ctxt", ""}
    with pytest.raises(ValueError, match="object-removal"):
        powerpaint.task_recipe("inpaint")


@pytest.mark.parametrize("fitting", [0.0, 0.3, 1.0])
def test_branch_context_blend(fitting):
    g = torch.Generator().manual_seed(0)
    emb = {s: torch.randn(1, 77, 8, generator=g) for s in powerpaint.task_strings()}
    cond, uncond = powerpaint.branch_context(emb, "shape-guided", fitting)
    torch.testing.assert_close(cond, fitting * emb["P_shape"] + (1 - fitting) * emb["P_ctxt"], rtol=0, atol=1e-6)
    torch.testing.assert_close(uncond, fitting * emb["P_shape"] + (1 - fitting) * emb["P_ctxt"], rtol=0, atol=1e-6)
    cond, uncond = powerpaint.branch_context(emb, "object-removal", fitting)
    torch.testing.assert_close(cond, emb["P_ctxt"], rtol=0, atol=1e-6)
    torch.testing.assert_close(uncond, emb["P_obj"], rtol=0, atol=1e-6)
    cond, uncond = powerpaint.branch_context(emb, "context-aware", fitting)
    torch.testing.assert_close(uncond, emb[""], rtol=0, atol=1e-6)
    for bad in (-0.1, 1.5, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="fitting"):
            powerpaint.branch_context(emb, "shape-guided", bad)


def _clip_shapes(width=768, layers=12, vocab=49438, prefix=""):
    shapes = {f"{prefix}text_model.embeddings.token_embedding.weight": (vocab, width),
              f"{prefix}text_model.embeddings.position_embedding.weight": (77, width),
              f"{prefix}text_model.final_layer_norm.weight": (width,)}
    for i in range(layers):
        shapes[f"{prefix}text_model.encoder.layers.{i}.self_attn.q_proj.weight"] = (width, width)
        shapes[f"{prefix}text_model.encoder.layers.{i}.mlp.fc1.weight"] = (width * 4, width)
    return shapes


def test_inspect_text_encoder_accepts_whole_powerpaint_encoder():
    spec = powerpaint.inspect_text_encoder("pp.safetensors", _clip_shapes())
    assert (spec.width, spec.layers, spec.heads, spec.intermediate, spec.vocab, spec.prefix) == (
        768, 12, 12, 3072, 49438, "")
    spec = powerpaint.inspect_text_encoder("pp.safetensors", _clip_shapes(prefix="cond_stage_model.transformer."))
    assert spec.prefix == "cond_stage_model.transformer."


@pytest.mark.parametrize("shapes, match", [
    (_clip_shapes(vocab=49408), "without PowerPaint's 30 task-token rows"),
    (_clip_shapes(width=1280, layers=32, vocab=49408), "SDXL CLIP-G"),
    (_clip_shapes(width=1280, layers=32, vocab=49438), "SDXL CLIP-G"),
    ({"P_ctxt": (30, 768)}, "only the 30 added token rows"),
    ({"brushnet_down_blocks.0.weight": (320, 320, 1, 1)}, "is a branch"),
    ({"conditioner.embedders.1.model.ln_final.weight": (1280,)}, "SDXL"),
    ({"foo": (3,)}, "no CLIP text-encoder token embedding"),
])
def test_inspect_text_encoder_refusals(shapes, match):
    with pytest.raises(ValueError, match=match) as err:
        powerpaint.inspect_text_encoder("x.safetensors", shapes)
    assert "\n" not in str(err.value)
    assert "powerpaint_brushnet_text_encoder_fp16.safetensors" in str(err.value)


def _image(b=2, h=24, w=40, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).random((b, h, w, 3), dtype=np.float32))


def test_outpaint_canvas_mask_and_band():
    image = _image()
    canvas, mask, info = outpaint.pad_batch(image, left=16, top=0, right=8, bottom=0)
    assert canvas.shape == (2, 24, 64, 3)
    assert torch.equal(canvas[:, :, 16:56], image)
    assert torch.all(canvas[:, :, :16] == torch.tensor(127 / 255))
    assert torch.all(canvas[:, :, 56:] == torch.tensor(127 / 255))
    m = mask[0].numpy().astype(bool)
    expected = np.ones((24, 64), bool)
    expected[:, 26:46] = False  # 10 px band inside the left and right edges only; rows untouched (no vertical pad)
    assert np.array_equal(m, expected)
    assert info.crop_size == (64, 24)


def test_outpaint_rounds_canvas_to_multiple_of_8():
    canvas, mask, _ = outpaint.pad_batch(_image(b=1, h=21, w=30), left=0, top=5, right=0, bottom=0)
    assert canvas.shape[1:3] == (32, 32)  # 21+5 -> 32 (6 more at the bottom), 30 -> 32 (2 at the right)
    m = mask[0].numpy().astype(bool)
    assert m[:15].all() and m[:, 20:].all()  # top pad + band; right pad (2 px) + band reaching column 20
    assert not m[15:16, :20].any()


def test_outpaint_stitch_keeps_original_outside_band():
    image = _image()
    canvas, mask, info = outpaint.pad_batch(image, left=8, top=8, right=8, bottom=8, feather=0)
    decoded = torch.rand(canvas.shape, generator=torch.Generator().manual_seed(3))
    out = stitch_batch(info, decoded, "feather", "none")
    assert out.shape == canvas.shape
    keep = ~mask.bool()
    assert torch.equal(out[keep], canvas[keep])
    assert torch.equal(out[:, 18:22, 18:30], image[:, 10:14, 10:22])
    hole = mask.bool()
    torch.testing.assert_close(out[hole], decoded[hole], rtol=0, atol=1e-6)  # region + 1·(new − region)


def test_outpaint_refusals():
    with pytest.raises(ValueError, match="left padding"):
        outpaint.pad_batch(_image(), left=-1, top=0, right=0, bottom=0)
    with pytest.raises(ValueError, match="nothing to outpaint"):
        outpaint.pad_batch(_image(b=1, h=16, w=16), left=0, top=0, right=0, bottom=0)
