"""Tiny SD1.5/SDXL presets: deterministic, saved as diffusers folders, loadable and runnable."""
from __future__ import annotations

import pytest
import torch

from training.trainer.presets import TINY_WORDS, save_tiny_pipeline, tiny_clip_tokenizer, tiny_sd15_components


def test_every_tiny_word_is_one_token(tmp_path):
    tokenizer = tiny_clip_tokenizer(tmp_path)
    for word in TINY_WORDS:
        assert tokenizer.tokenize(word) == [word + "</w>"]
    assert tokenizer.tokenize("a red circle!") == ["a</w>", "red</w>", "circle</w>", "!</w>"]


def test_components_are_deterministic_by_seed(tmp_path):
    a = tiny_sd15_components(tmp_path / "a", seed=5)
    b = tiny_sd15_components(tmp_path / "b", seed=5)
    c = tiny_sd15_components(tmp_path / "c", seed=6)
    sa, sb, sc = a.unet.state_dict(), b.unet.state_dict(), c.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert torch.equal(a.text_encoder.text_model.embeddings.token_embedding.weight,
                       b.text_encoder.text_model.embeddings.token_embedding.weight)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_saved_pipeline_loads_and_unet_runs(tmp_path, family):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = save_tiny_pipeline(tmp_path / family, family)
    unet = UNet2DConditionModel.from_pretrained(root / "unet")
    vae = AutoencoderKL.from_pretrained(root / "vae")
    scheduler = DDPMScheduler.from_pretrained(root / "scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder")
    assert scheduler.config.num_train_timesteps == 1000
    prompts = ["a red circle", ""]
    ids = tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt").input_ids
    assert ids.shape == (2, 77)
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(image).latent_dist.sample() * vae.config.scaling_factor
        assert latents.shape == (2, 4, 8, 8)
        hidden = text_encoder(ids, output_hidden_states=True)
        kwargs = {}
        if family == "sdxl":
            tokenizer_2 = CLIPTokenizer.from_pretrained(root / "tokenizer_2")
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2")
            assert tokenizer_2.pad_token == "!" and tokenizer_2.pad_token_id == 0
            ids_2 = tokenizer_2(prompts, padding="max_length", truncation=True, return_tensors="pt").input_ids
            hidden_2 = text_encoder_2(ids_2, output_hidden_states=True)
            context = torch.cat([hidden.hidden_states[-2], hidden_2.hidden_states[-2]], dim=-1)
            time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)
            kwargs["added_cond_kwargs"] = {"text_embeds": hidden_2.text_embeds, "time_ids": time_ids}
        else:
            context = hidden.last_hidden_state
        assert context.shape == (2, 77, unet.config.cross_attention_dim)
        out = unet(latents, torch.tensor([10, 500]), encoder_hidden_states=context, **kwargs).sample
    assert out.shape == latents.shape and torch.isfinite(out).all()
    if family == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        pipeline = StableDiffusionXLPipeline.from_pretrained(root)
        assert pipeline.unet.config.addition_embed_type == "text_time"
