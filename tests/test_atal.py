"""ATAL (paper §3.3): the token set S, the indicator-attention map, the loss, and the recording processor."""
from __future__ import annotations

import copy
import functools
import logging
import re

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from painternet_core.atal import (ATALAttnProcessor, ATALRecorder, actual_token_mask, atal_loss, infer_map_size,
                                  install_atal_processors, token_mean_attention, tokenize_with_token_mask)
from training.trainer.presets import tiny_clip_tokenizer, tiny_sd15_components


def explicit_token_mean(query: torch.Tensor, key: torch.Tensor, token_mask: torch.Tensor, scale: float | None = None,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """The definition, materialising the HW×L map: mean_{j∈S} softmax(QKᵀ·scale + bias)[:, j], heads averaged."""
    scores = query @ key.transpose(-1, -2) * (query.shape[-1] ** -0.5 if scale is None else scale)
    if bias is not None:
        scores = scores + bias
    probs = scores.softmax(dim=-1)  # (B, heads, HW, L)
    weights = token_mask.to(probs.dtype)
    weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1)
    return (probs * weights[:, None, None, :]).sum(-1).mean(1)


# ------------------------------------------------------------------------------------------------------ the set S
@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"], ids=["sd15-eot-padded", "sdxl-tokenizer_2-bang-padded"])
def test_token_mask_excludes_sot_eot_and_padding(tmp_path, pad):
    tokenizer = tiny_clip_tokenizer(tmp_path, pad_token=pad, model_max_length=12)
    prompts = ["a red circle", "", "purple star!"]
    ids, mask = tokenize_with_token_mask(tokenizer, prompts)
    assert ids.shape == mask.shape == (3, 12) and mask.dtype == torch.bool
    tokens = [tokenizer.convert_ids_to_tokens(row) for row in ids.tolist()]
    selected = [[t for t, keep in zip(row, m) if keep] for row, m in zip(tokens, mask.tolist())]
    assert selected[0] == ["a</w>", "red</w>", "circle</w>"]
    assert selected[1] == []  # SOT + EOT only: an empty S
    # "!" is a real token here even though tokenizer_2 pads with "!" (id 0): S keeps it, padding stays out.
    assert [t.replace("</w>", "") for t in selected[2]] == ["purple", "star", "!"]
    assert mask[:, 0].sum() == 0
    if pad == "!":
        assert (ids[0, 5:] == tokenizer.pad_token_id).all() and tokenizer.pad_token_id == 0
    else:
        assert tokenizer.pad_token_id == tokenizer.eos_token_id


def test_token_mask_from_ids_only_matches_attention_mask(tmp_path):
    tokenizer = tiny_clip_tokenizer(tmp_path, model_max_length=10)
    out = tokenizer(["a blue square on the background", "", "green"], padding="max_length", max_length=10,
                    truncation=True, return_attention_mask=True, return_tensors="pt")
    from_mask = actual_token_mask(out["attention_mask"])
    from_ids = actual_token_mask(input_ids=out["input_ids"], bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
    assert torch.equal(from_mask, from_ids)
    assert from_mask.sum(1).tolist() == [6, 0, 1]


def test_special_tokens_typed_inside_a_prompt_are_not_in_s(tmp_path):
    """A prompt may contain the specials' text; the tokenizer makes them special ids in mid-prompt, and S drops them
    without ending the prompt there (the attention mask, not the first EOT, says where it ends)."""
    tokenizer = tiny_clip_tokenizer(tmp_path, model_max_length=16)
    long = " ".join(["red"] * 20)
    ids, mask = tokenize_with_token_mask(tokenizer, ["red <|startoftext|> green <|endoftext|> circle", long],
                                         max_length=9)
    assert ids.shape == mask.shape == (2, 9)  # the explicit max_length, not model_max_length; the long one truncated
    tokens = [[t.replace("</w>", "") for t, keep in zip(tokenizer.convert_ids_to_tokens(row), m) if keep]
              for row, m in zip(ids.tolist(), mask.tolist())]
    assert tokens == [["red", "green", "circle"], ["red"] * 7]


def test_token_mask_of_left_padded_rows():
    """Rows may start at different positions (padding_side="left"): SOT and EOT are found per row."""
    attention = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    assert actual_token_mask(attention).tolist() == [[False, False, False, True, True, False],
                                                     [False, True, True, False, False, False]]


def test_token_mask_from_ids_drops_a_bos_inside_the_prompt():
    ids = torch.tensor([[7, 3, 7, 4, 9, 9]])  # SOT 7, a typed SOT at 2, EOT 9
    assert actual_token_mask(input_ids=ids, bos_token_id=7, eos_token_id=9).tolist() == [
        [False, True, False, True, False, False]]
    assert actual_token_mask(input_ids=ids, eos_token_id=9).tolist() == [[False, True, True, True, False, False]]


def test_token_mask_errors_name_the_fix():
    with pytest.raises(ValueError, match="attention_mask or input_ids"):
        actual_token_mask()
    with pytest.raises(ValueError, match="eos_token_id"):
        actual_token_mask(input_ids=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        actual_token_mask(torch.ones(4))


# ------------------------------------------------------------------------------------------------------ the map
def test_indicator_sdpa_equals_explicit_softmax_mean():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 48, 16, generator=gen)
    k = torch.randn(3, 4, 11, 16, generator=gen)
    mask = torch.zeros(3, 11, dtype=torch.bool)
    mask[0, 1:5] = True
    mask[1, 1:2] = True
    mask[2, 1:10] = True
    got = token_mean_attention(q, k, mask)
    assert got.shape == (3, 48)
    torch.testing.assert_close(got, explicit_token_mean(q, k, mask), atol=1e-6, rtol=0)


def test_empty_token_set_gives_zero_map():
    q, k = torch.randn(2, 2, 6, 8), torch.randn(2, 2, 5, 8)
    mask = torch.tensor([[False] * 5, [False, True, True, False, False]])
    out = token_mean_attention(q, k, mask)
    assert torch.equal(out[0], torch.zeros(6)) and out[1].abs().sum() > 0


def test_gradcheck_map_and_loss_float64():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 2, 6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    token_mask = torch.tensor([[False, True, True, True, False], [False, True, False, False, False]])
    hole = (torch.rand(2, 1, 4, 6, generator=gen) > 0.5).double()  # area-resized to the 2x3 map
    valid = torch.tensor([True, True])
    assert torch.autograd.gradcheck(lambda a, b: token_mean_attention(a, b, token_mask), (q, k))
    assert torch.autograd.gradcheck(lambda a, b: atal_loss([token_mean_attention(a, b, token_mask)], hole, valid),
                                    (q, k))


# ------------------------------------------------------------------------------------------------------ the loss
def test_loss_zero_when_map_equals_mask_and_hand_computed_value():
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, :2, :2] = 1.0
    # Map at the mask's own size equal to it → 0; at half size, area resizing gives [[1, 0], [0, 0]].
    assert atal_loss([mask[:, 0].reshape(2, 16)], mask).item() == 0.0
    assert atal_loss([torch.tensor([[1.0, 0, 0, 0]] * 2)], mask).item() == 0.0
    # Hand-computed: layer A (2x2 all 0.5): Σ (0.5-1)² + 3·(0.5)² = 1.0 per sample.
    # layer B (4x4 zeros): Σ mask² = 4 for sample 0; sample 1 is dropped (valid False), so the means are over sample 0.
    layer_a = torch.full((2, 2, 2), 0.5)
    layer_b = torch.zeros(2, 16)
    valid = torch.tensor([True, False])
    assert atal_loss([layer_a, layer_b], mask, valid).item() == pytest.approx((1.0 + 4.0) / 2)
    # Area interpolation: a 1-pixel hole on a 2x2 mask is 0.25 on a 1x1 map; map 0 → 0.0625.
    one = torch.zeros(1, 1, 2, 2)
    one[0, 0, 0, 0] = 1
    assert atal_loss([torch.zeros(1, 1)], one).item() == pytest.approx(0.0625)


def test_dropped_prompts_are_excluded_and_all_dropped_gives_connected_zero():
    mask = torch.ones(2, 1, 4, 4)
    layer = torch.zeros(2, 4, requires_grad=True)
    full = atal_loss([layer], mask, torch.tensor([True, True]))
    only_first = atal_loss([torch.stack([layer[0], torch.full((4,), 123.0)])], mask, torch.tensor([True, False]))
    assert full.item() == pytest.approx(4.0) and only_first.item() == pytest.approx(4.0)
    none = atal_loss([layer], mask, torch.tensor([False, False]))
    assert none.item() == 0.0
    none.backward()
    assert layer.grad is not None and torch.equal(layer.grad, torch.zeros_like(layer))


def test_a_mask_without_channel_axis_gives_the_same_loss():
    gen = torch.Generator().manual_seed(2)
    maps = [torch.rand(2, 16, generator=gen), torch.rand(2, 2, 2, generator=gen)]
    mask = (torch.rand(2, 1, 8, 8, generator=gen) > 0.5).float()
    assert atal_loss(maps, mask[:, 0]).item() == atal_loss(maps, mask).item() > 0


def test_loss_is_fp32_for_bf16_maps():
    mask = torch.ones(1, 1, 2, 2)
    assert atal_loss([torch.zeros(1, 4, dtype=torch.bfloat16)], mask).dtype == torch.float32


def test_map_size_inference_and_errors():
    assert infer_map_size(64 * 48, 512, 384) == (64, 48)
    assert infer_map_size(4 * 3, 512, 384) == (4, 3)
    assert infer_map_size(2 * 2, 7, 7) == (2, 2)  # ceil rounding of stride-2 convs: 7 → 4 → 2
    with pytest.raises(ValueError, match="cannot place"):
        infer_map_size(7, 8, 8)
    with pytest.raises(ValueError, match="no attention maps"):
        atal_loss([], torch.ones(1, 1, 2, 2))
    with pytest.raises(ValueError, match=r"valid must be"):
        atal_loss([torch.zeros(2, 4)], torch.ones(2, 1, 2, 2), torch.tensor([True]))


# ------------------------------------------------------------------------------------------------------ processor
def _tiny_attention(seed: int = 0):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(seed)
    return Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8).eval()


def test_processor_matches_attnprocessor2_0_and_records_map():
    from diffusers.models.attention_processor import AttnProcessor2_0

    attn = _tiny_attention()
    hidden = torch.randn(2, 20, 16)
    context = torch.randn(2, 7, 12)
    reference = attn(hidden, encoder_hidden_states=context)
    assert isinstance(attn.processor, AttnProcessor2_0)
    recorder = ATALRecorder()
    attn.set_processor(ATALAttnProcessor(recorder, "blk.attn2"))
    idle = attn(hidden, encoder_hidden_states=context)
    token_mask = torch.zeros(2, 7, dtype=torch.bool)
    token_mask[:, 1:4] = True
    with recorder.record(token_mask):
        recording = attn(hidden, encoder_hidden_states=context)
        assert list(recorder.maps) == ["blk.attn2"]
        heads_q = attn.to_q(hidden).view(2, 20, 2, 8).transpose(1, 2)
        heads_k = attn.to_k(context).view(2, 7, 2, 8).transpose(1, 2)
        torch.testing.assert_close(recorder.maps["blk.attn2"], explicit_token_mean(heads_q, heads_k, token_mask),
                                   atol=1e-6, rtol=0)
        from diffusers.models.attention_processor import Attention

        self_attn = Attention(query_dim=16, heads=2, dim_head=8)
        self_attn.set_processor(ATALAttnProcessor(recorder, "blk.attn1"))
        self_attn(hidden)  # self-attention: nothing recorded
        assert list(recorder.maps) == ["blk.attn2"]
    assert not recorder.active and recorder.maps == {}
    with recorder.record(token_mask):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            attn(hidden, encoder_hidden_states=context)
        assert recorder.maps["blk.attn2"].dtype == torch.float32  # fp32 map under bf16 autocast
        torch.testing.assert_close(recorder.maps["blk.attn2"], explicit_token_mean(heads_q, heads_k, token_mask),
                                   atol=2e-2, rtol=0)  # only Q/K projections ran in bf16
    torch.testing.assert_close(idle, reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(recording, reference, atol=1e-6, rtol=0)
    with recorder.record(torch.zeros(2, 5, dtype=torch.bool)), pytest.raises(ValueError, match="token mask"):
        attn(hidden, encoder_hidden_states=context)


def test_install_on_unet_and_checkpointing_gives_equal_nonzero_atal_gradient(tmp_path):
    parts = tiny_sd15_components(tmp_path)
    unet = parts.unet
    recorder = ATALRecorder()
    names = install_atal_processors(unet, recorder)
    assert len(names) == 16 and all(name.endswith("attn2") for name in names)
    assert sum(type(p).__name__ == "ATALAttnProcessor" for p in unet.attn_processors.values()) == 16
    block = unet.down_blocks[0]  # CrossAttnDownBlock2D: 2 resnets + 2 transformers (2 cross-attention layers)
    gen = torch.Generator().manual_seed(3)
    sample = torch.randn(2, 32, 8, 8, generator=gen)
    temb = torch.randn(2, 128, generator=gen)
    context = torch.randn(2, 9, 32, generator=gen)
    token_mask = torch.zeros(2, 9, dtype=torch.bool)
    token_mask[0, 1:4] = True
    token_mask[1, 1:7] = True
    hole = torch.zeros(2, 1, 8, 8)
    hole[:, :, 2:6, 1:5] = 1

    def run(use_checkpoint: bool) -> dict[str, torch.Tensor]:
        model = copy.deepcopy(block)
        for p in model.parameters():
            p.grad = None
        with recorder.record(token_mask):
            if use_checkpoint:
                checkpoint(lambda x: model(x, temb, encoder_hidden_states=context)[0], sample, use_reentrant=False)
            else:
                model(sample, temb, encoder_hidden_states=context)
            maps = recorder.ordered_maps()
            assert len(maps) == 2
            loss = atal_loss(maps, hole)
            loss.backward()
            assert len(recorder.maps) == 2  # recomputation overwrote, not appended
            replaced = [a is not b for a, b in zip(maps, recorder.ordered_maps())]
            assert replaced == [use_checkpoint] * 2  # the checkpointed forward really ran again
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = run(False), run(True)
    to_k = [n for n in plain if n.endswith("attn2.to_k.weight")]
    assert to_k and all(plain[n].abs().sum() > 0 for n in to_k)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_atal_through_the_painternet_branch_sdxl_with_block_checkpointing(tmp_path):
    """End to end on the real branch (SDXL-shaped tiny): every attn2 is recorded at its own resolution and the ATAL
    gradient reaches the branch identically with diffusers' (non-reentrant) block checkpointing on."""
    from painternet_core.branch import PainterNetBranch
    from training.trainer.presets import tiny_sdxl_components

    parts = tiny_sdxl_components(tmp_path)
    gen = torch.Generator().manual_seed(4)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    condition = torch.randn(2, 5, 8, 8, generator=gen)
    context = torch.randn(2, 9, 64, generator=gen)
    added = {"text_embeds": torch.randn(2, 32, generator=gen), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    token_mask = torch.zeros(2, 9, dtype=torch.bool)
    token_mask[0, 1:3] = True
    token_mask[1, 1:8] = True
    hole = torch.zeros(2, 1, 64, 64)
    hole[0, :, 8:40, 16:56] = 1
    hole[1, :, 30:, :20] = 1
    grads = []
    for use_checkpoint in (False, True):
        branch = PainterNetBranch.from_unet(parts.unet)
        recorder = ATALRecorder()
        names = install_atal_processors(branch, recorder)
        assert len(names) == 70  # the real SDXL depths (1, 2, 10): 24 down + 10 mid + 36 up
        if use_checkpoint:
            # What diffusers' ModelMixin.enable_gradient_checkpointing does to each block (non-reentrant).
            for module in branch.modules():
                if hasattr(module, "gradient_checkpointing") and module is not branch:
                    module.gradient_checkpointing = True
                    module._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
        branch.train()
        with recorder.record(token_mask):
            branch(latents, torch.tensor([10, 700]), context, condition, added_cond_kwargs=added)
            assert list(recorder.maps) != [] and set(recorder.maps) == set(names)
            assert {m.shape[1] for m in recorder.maps.values()} == {16, 4}  # 4x4 and 2x2 levels
            before = dict(recorder.maps)
            loss = atal_loss(recorder.ordered_maps(), hole, torch.tensor([True, True]))
            loss.backward()
            recomputed = [name for name in names if recorder.maps[name] is not before[name]]
            assert recomputed == (names if use_checkpoint else [])
        grads.append({n: p.grad.clone() for n, p in branch.named_parameters() if p.grad is not None})
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys() and any("attn2.to_k" in n for n in plain)
    assert all(plain[n].abs().sum() > 0 for n in plain if n.endswith("attn2.to_q.weight"))
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------ messages
def _record_with_wrong_mask() -> None:
    attn = _tiny_attention()
    recorder = ATALRecorder()
    attn.set_processor(ATALAttnProcessor(recorder, "blk.attn2"))
    with recorder.record(torch.zeros(1, 5, dtype=torch.bool)):  # batch 1, 2 heads: the message's B is the batch
        attn(torch.randn(1, 20, 16), encoder_hidden_states=torch.randn(1, 7, 12))


ERRORS = {
    "no mask and no ids": (
        lambda: actual_token_mask(),
        "actual_token_mask needs attention_mask or input_ids; got neither. Pass the tokenizer output of "
        "tokenizer(prompts, padding='max_length', return_attention_mask=True)."),
    "1-D attention mask": (
        lambda: actual_token_mask(torch.ones(4)),
        "attention_mask must be (B, L); got shape (4,). Tokenize a list of prompts, not a single string."),
    "ids and mask of different shapes": (
        lambda: actual_token_mask(torch.ones(1, 4), torch.ones(1, 5, dtype=torch.long)),
        "input_ids shape (1, 5) differs from attention_mask shape (1, 4); pass both from the same tokenizer call."),
    "1-D ids": (
        lambda: actual_token_mask(input_ids=torch.ones(4, dtype=torch.long), eos_token_id=2),
        "input_ids must be (B, L); got shape (4,)."),
    "ids without eos": (
        lambda: actual_token_mask(input_ids=torch.zeros(1, 4, dtype=torch.long)),
        "actual_token_mask(input_ids=...) without attention_mask needs eos_token_id (e.g. tokenizer.eos_token_id) to "
        "find where the prompt ends."),
    "one prompt string": (
        lambda: tokenize_with_token_mask(None, "a cat"),
        "prompts must be a list of strings, got the single string 'a cat'; wrap it in a list."),
    "3-D query": (
        lambda: token_mean_attention(torch.zeros(1, 6, 4), torch.zeros(1, 2, 5, 4), torch.zeros(1, 5)),
        "query and key must be (B, heads, tokens, d); got (1, 6, 4) and (1, 2, 5, 4). Split heads first (diffusers: "
        "view(B, -1, heads, d).transpose(1, 2))."),
    "token mask of another length": (
        lambda: token_mean_attention(torch.zeros(1, 2, 6, 4), torch.zeros(1, 2, 5, 4), torch.zeros(1, 4)),
        "token_mask must be (B, L) = (1, 5) to match key; got (1, 4). Build it from the same tokenizer call as the "
        "text embeddings."),
    "map of no power-of-two size": (
        lambda: infer_map_size(7, 8, 8),
        "cannot place an attention map of 7 pixels on a 8x8 mask: no power-of-two downscale of the mask has that many "
        "pixels. Pass maps as (B, h, w) to give their shape."),
    "no maps": (
        lambda: atal_loss([], torch.ones(1, 1, 2, 2)),
        "atal_loss got no attention maps; install ATALAttnProcessor on the branch's cross-attention "
        "(install_atal_processors) and run the branch inside recorder.record(...)."),
    "2-channel mask": (
        lambda: atal_loss([torch.zeros(1, 4)], torch.ones(1, 2, 2, 2)),
        "mask must be (B, 1, H, W) or (B, H, W); got shape (1, 2, 2, 2)."),
    "valid of another batch": (
        lambda: atal_loss([torch.zeros(2, 4)], torch.ones(2, 1, 2, 2), torch.tensor([True])),
        "valid must be a (B,) = (2,) bool tensor; got shape (1,)."),
    "map of another batch": (
        lambda: atal_loss([torch.zeros(2, 4), torch.zeros(3, 4)], torch.ones(2, 1, 2, 2)),
        "map 1 has batch 3 but the mask has 2; record maps for the same batch (with CFG-style doubled batches, split "
        "them first)."),
    "4-D map": (
        lambda: atal_loss([torch.zeros(1, 1, 2, 2)], torch.ones(1, 1, 2, 2)),
        "map 0 must be (B, HW) or (B, h, w); got shape (1, 1, 2, 2)."),
    "1-D recorder mask": (
        lambda: ATALRecorder().start(torch.ones(5)),
        "token_mask must be (B, L); got shape (5,)."),
    "recorder mask of another length": (
        _record_with_wrong_mask,
        "ATAL token mask has shape (1, 5) but layer blk.attn2 attends to (B, L) = (1, 7); start the recorder with the "
        "mask of the prompts actually encoded for this batch."),
    "not a module": (
        lambda: install_atal_processors("unet", ATALRecorder()),
        "install_atal_processors needs an nn.Module (the PainterNet branch); got str."),
    "no cross-attention": (
        lambda: install_atal_processors(torch.nn.Linear(2, 2), ATALRecorder()),
        "Linear has no cross-attention (attn2) layers; ATAL needs a branch that keeps cross-attention (PainterNet, "
        "not BrushNet)."),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_error_messages_are_exact(case):
    """The message is the contract (it names the bad value and the fix): anchored whole, so any edit of it shows."""
    call, message = ERRORS[case]
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        call()


def test_install_replaces_only_cross_attention_and_logs_the_count(caplog):
    model = torch.nn.Module()
    model.block = torch.nn.Module()
    model.block.attn1 = _tiny_attention()
    model.block.attn2 = _tiny_attention(1)
    self_processor = model.block.attn1.processor
    with caplog.at_level(logging.DEBUG, logger="painternet"):
        names = install_atal_processors(model, ATALRecorder())
    assert names == ["block.attn2"] and model.block.attn1.processor is self_processor
    assert isinstance(model.block.attn2.processor, ATALAttnProcessor)
    assert [r.getMessage() for r in caplog.records if r.name == "painternet"] == [
        "ATAL processors installed on 1 cross-attention layers"]


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_processor_matches_attnprocessor2_0_on_every_attention_option(cross):
    """The processor replaces diffusers' for any Attention it is installed on: 4-D input, spatial and group norm, a
    normed context, q/k norms, an attention mask, the residual and the output rescale all behave as in diffusers."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(3)
    attn = Attention(query_dim=32, cross_attention_dim=12 if cross else None, heads=2, dim_head=8,
                     cross_attention_norm="layer_norm" if cross else None, qk_norm="layer_norm", norm_num_groups=4,
                     spatial_norm_dim=6, rescale_output_factor=2.0, residual_connection=True).eval()
    hidden = torch.randn(2, 32, 3, 5)  # SpatialNorm's GroupNorm(32) needs 32 channels
    temb = torch.randn(2, 6, 3, 5)
    context = torch.randn(2, 7, 12) if cross else None
    keep = torch.ones(2, 7 if cross else 15)
    keep[1, -2:] = 0
    bias = (1 - keep) * -10000.0
    attn.set_processor(AttnProcessor2_0())
    reference = attn(hidden, encoder_hidden_states=context, attention_mask=bias, temb=temb)
    recorder = ATALRecorder()
    attn.set_processor(ATALAttnProcessor(recorder, "mid.attn2"))
    token_mask = torch.zeros(2, 7 if cross else 15, dtype=torch.bool)
    token_mask[:, 1:4] = True
    with recorder.record(token_mask):
        got = attn(hidden, encoder_hidden_states=context, attention_mask=bias, temb=temb)
        assert list(recorder.maps) == (["mid.attn2"] if cross else [])
    assert got.shape == hidden.shape
    torch.testing.assert_close(got, reference, atol=1e-6, rtol=0)


def test_loss_of_a_half_precision_mask_is_computed_in_fp32():
    """A one-pixel hole on a 3x3 mask is 1/9 on a 1x1 map, a value fp16/bf16 cannot hold: the target is resized in
    fp32, so the loss is 1/81 to fp32 precision."""
    mask = torch.zeros(1, 1, 3, 3)
    mask[0, 0, 1, 1] = 1
    for dtype in (torch.float16, torch.bfloat16):
        loss = atal_loss([torch.zeros(1, 1)], mask.to(dtype))
        assert loss.dtype == torch.float32 and loss.item() == pytest.approx(1 / 81, rel=1e-6)


def test_token_mean_attention_uses_the_scale_and_mask_given_at_float64_precision():
    """The map is the definition with the caller's scale and additive mask, to float64 precision: the token weights
    are built in the key's dtype, so a float64 gradient check is not limited by fp32 weights."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 2, 6, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 2, 5, 8, generator=gen, dtype=torch.float64)
    token_mask = torch.tensor([[False, True, True, True, False], [False, True, False, True, True]])
    bias = torch.randn(2, 1, 6, 5, generator=gen, dtype=torch.float64) * 3
    got = token_mean_attention(q, k, token_mask, scale=0.9, attn_mask=bias)
    torch.testing.assert_close(got, explicit_token_mean(q, k, token_mask, scale=0.9, bias=bias), atol=1e-14, rtol=0)


@pytest.mark.parametrize("case", ["bias", "per-query", "bf16"])
def test_recorded_map_is_taken_under_the_attention_mask(case):
    """A masked-out token gets no attention in the recorded map either, as in the main attention: for a (B, L)
    bias, a per-query (B, HW, L) bias, and a bf16 model whose bf16 bias meets the recorder's fp32 map."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    attn = _tiny_attention().to(dtype)
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, 20, 16, generator=gen).to(dtype)
    context = torch.randn(2, 7, 12, generator=gen).to(dtype)
    if case == "per-query":
        keep = torch.rand(2, 20, 7, generator=gen) > 0.4
        keep[..., 0] = True
    else:
        keep = torch.ones(2, 7, dtype=torch.bool)
        keep[0, 2] = keep[1, 3:5] = False  # tokens inside S masked out
    bias = ((~keep).float() * -10000.0).to(dtype)
    reference = attn(hidden, encoder_hidden_states=context, attention_mask=bias)
    assert isinstance(attn.processor, AttnProcessor2_0)
    recorder = ATALRecorder()
    attn.set_processor(ATALAttnProcessor(recorder, "blk.attn2"))
    token_mask = torch.zeros(2, 7, dtype=torch.bool)
    token_mask[:, 1:5] = True
    with recorder.record(token_mask):
        got = attn(hidden, encoder_hidden_states=context, attention_mask=bias)
        heads_q = attn.to_q(hidden).view(2, 20, 2, 8).transpose(1, 2).float()
        heads_k = attn.to_k(context).view(2, 7, 2, 8).transpose(1, 2).float()
        expected = explicit_token_mean(heads_q, heads_k, token_mask,
                                       bias=bias.float()[:, None] if bias.ndim == 3 else bias.float()[:, None, None])
        assert recorder.maps["blk.attn2"].dtype == torch.float32
        torch.testing.assert_close(recorder.maps["blk.attn2"], expected, atol=1e-6, rtol=0)
        unmasked = explicit_token_mean(heads_q, heads_k, token_mask)
        assert (recorder.maps["blk.attn2"] - unmasked).abs().max() > 1e-2
    torch.testing.assert_close(got, reference, atol=0, rtol=0)


def test_a_fresh_recorder_is_inactive_and_holds_no_maps():
    recorder = ATALRecorder()
    assert not recorder.active and recorder.token_mask is None
    assert recorder.maps == {} and recorder.ordered_maps() == []


def test_tokenize_requests_the_attention_mask_even_when_the_tokenizer_would_not_return_it(tmp_path):
    """A tokenizer saved with ``model_input_names = ["input_ids"]`` returns no attention mask unless asked; S needs
    it (the ids cannot tell SD1.5's EOT padding from the EOT), so the helper asks for it explicitly."""
    tokenizer = tiny_clip_tokenizer(tmp_path, model_max_length=8)
    tokenizer.model_input_names = ["input_ids"]
    assert "attention_mask" not in tokenizer(["a red circle"], padding="max_length", max_length=8)
    ids, mask = tokenize_with_token_mask(tokenizer, ["a red circle", ""])
    assert ids.shape == mask.shape == (2, 8)
    assert mask.tolist() == [[False, True, True, True, False, False, False, False], [False] * 8]
