"""PowerPaint v2 through ComfyUI against an independent re-implementation of the published recipe.

The reference is written here from PowerPaint's maths, sharing nothing with the pack's PowerPaint code: a tiny random
CLIP-L-shaped text encoder (transformers' CLIPTextModel, 64-wide heads, quick-GELU, 49 408 + 30 token rows) fed the
ids of the SD1.5 tokenizer ComfyUI ships with the placeholder tokens added in PowerPaint's order; branch context
t·E(A) + (1−t)·E(B) per task (and the same blend of the negatives); a diffusers UNet2DConditionModel with a BrushNet-CA
branch built from it (core's diffusers reference, saved in the public BrushNet key layout) whose cross-attention sees
the task context while the base sees the user's conditioning; the BrushNet condition [VAE(image·(1−m))·0.18215,
1 − m↓nearest]; classifier-free guidance and Euler over ComfyUI's "simple" schedule, written out step by step.

The pack's side is the real nodes (Load PainterNet, Load PowerPaint Task Encoder, Apply PowerPaint) and ComfyUI's
own sampler (`comfy.sample.sample`, euler/simple), fp32 on CPU, batch 2, every task, cfg 1 and 7.5, fitting 0.3/1.
"""
from __future__ import annotations

import math

import pytest
import torch

from harness import torch_threads
from harness.comfy_helpers import comfy_model_from_diffusers, load_pack, pack_module
from harness.models import brushnet_layout
from painternet_core.branch import PainterNetBranch, injected
from painternet_core.config import TINY_SD15_UNET

WIDTH = 128  # text width: two 64-wide heads, the CLIP-L head size
UNET = dict(TINY_SD15_UNET, cross_attention_dim=WIDTH)
REL = 1e-4
BATCH = 2
SIZE = 64  # px; 8x8 latents
# PowerPaint v2's table (gradio_PowerPaint_BrushNet.py add_task), written independently of the pack's core.
RECIPE = {
    "text-guided": ("P_obj", "P_obj", "P_obj", "P_obj"),
    "shape-guided": ("P_shape", "P_ctxt", "P_shape", "P_ctxt"),
    "object-removal": ("P_ctxt", "P_ctxt", "P_obj", "P_obj"),
    "outpainting": ("P_ctxt", "P_ctxt", "P_obj", "P_obj"),
    "context-aware": ("P_ctxt", "P_ctxt", "", ""),
}


class StubVAE:
    """A fixed linear 'VAE' (8×8 average pool, 3→4 channel mix): both sides encode with it; the VAE is not under test."""

    downscale_ratio = 8
    mix = torch.tensor([[0.5, -0.3, 0.2], [0.1, 0.4, -0.6], [-0.2, 0.3, 0.5], [0.7, 0.1, 0.1]])

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.avg_pool2d(pixels.movedim(-1, 1).float(), 8)
        return torch.einsum("oc,bchw->bohw", self.mix, x) * 4.0


class World:
    pass


def _tokenizer():
    import os

    from transformers import CLIPTokenizer

    from harness import COMFYUI_PATH

    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(COMFYUI_PATH, "comfy", "sd1_tokenizer"))
    for name in ("P_ctxt", "P_shape", "P_obj"):  # PowerPaint's add_tokens order, 10 vectors each
        tokenizer.add_tokens([f"{name}_{i}" for i in range(10)])
    return tokenizer


def _reference_embedding(encoder, tokenizer, text: str) -> torch.Tensor:
    for name in ("P_ctxt", "P_shape", "P_obj"):  # TokenizerWrapper.replace_placeholder_tokens_in_text
        text = text.replace(name, " ".join(f"{name}_{i}" for i in range(10)))
    ids = tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(ids)[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import folder_paths
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffusers import UNet2DConditionModel

    w = World()
    # Many small convolutions: one thread avoids thread hand-offs that dominate on a loaded 2-core machine.
    with torch_threads(1):
        root = tmp_path_factory.mktemp("powerpaint")
        torch.manual_seed(0)
        w.unet = UNet2DConditionModel.from_config(UNET).eval()
        for p in w.unet.parameters():
            p.data.normal_(0, 0.05)
        w.branch = PainterNetBranch.from_unet(w.unet, cross_attention=True, attention_control=False).eval()
        for p in w.branch.parameters():
            p.data.add_(torch.randn_like(p) * 0.05)
        (root / "inpaint").mkdir()
        save_file(brushnet_layout(w.branch.state_dict()), str(root / "inpaint" / "pp_test_brushnet.safetensors"))
        w.encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49438, hidden_size=WIDTH, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407)).eval()
        (root / "text_encoders").mkdir()
        save_file({k: v.contiguous() for k, v in w.encoder.state_dict().items() if not k.endswith("position_ids")},
                  str(root / "text_encoders" / "pp_test_text_encoder.safetensors"))
        # First in the search order: a process that ran these tests before (mutmut runs pytest several times in one
        # process) still lists its own folder with files of the same names, whose cached embeddings would be reused.
        folder_paths.add_model_folder_path("inpaint", str(root / "inpaint"), is_default=True)
        folder_paths.add_model_folder_path("text_encoders", str(root / "text_encoders"), is_default=True)
        nodes = load_pack()
        (w.painternet,) = nodes["PainterNetLoader"].execute("pp_test_brushnet.safetensors", "fp32")
        w.nodes = nodes
        w.model = comfy_model_from_diffusers(w.unet, "sd15")
        tokenizer = _tokenizer()
        w.embed = {s: _reference_embedding(w.encoder, tokenizer, s) for s in ("P_ctxt", "P_shape", "P_obj", "")}
        g = torch.Generator().manual_seed(1)
        w.image = torch.rand(BATCH, SIZE, SIZE, 3, generator=g)
        w.mask = torch.zeros(BATCH, SIZE, SIZE)
        w.mask[0, 16:48, 20:52] = 1.0
        w.mask[1, 4:32, 8:60] = 1.0
        w.positive = torch.randn(1, 77, WIDTH, generator=g)
        w.negative = torch.randn(1, 77, WIDTH, generator=g)
        w.noise = torch.randn(BATCH, 4, SIZE // 8, SIZE // 8, generator=g)
        w.root = root
        yield w


@pytest.fixture(scope="module")
def tasks(world):
    calls = []
    import comfy.clip_model

    original = comfy.clip_model.CLIPTextModel_.forward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    comfy.clip_model.CLIPTextModel_.forward = counted
    world.encoder_calls = calls
    try:
        (value,) = world.nodes["PowerPaintTaskEncoder"].execute("pp_test_text_encoder.safetensors")
        yield value
    finally:
        comfy.clip_model.CLIPTextModel_.forward = original


# ------------------------------------------------------------------------------------------------------------------
# the reference
# ------------------------------------------------------------------------------------------------------------------

def _sigmas() -> torch.Tensor:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float()


def _schedule(steps: int) -> list[float]:
    sigmas = _sigmas()
    stride = len(sigmas) / steps
    return [float(sigmas[-(1 + int(i * stride))]) for i in range(steps)] + [0.0]


def _reference_condition(w) -> torch.Tensor:
    m = w.mask[:, None]
    masked = w.image * (1.0 - w.mask[..., None])
    z = StubVAE().encode(masked) * 0.18215
    m_latent = 1.0 - torch.nn.functional.interpolate(m, size=z.shape[-2:], mode="nearest")
    return torch.cat([z, m_latent], dim=1)


def _reference_eps(w, x, sigma, base_ctx, branch_ctx, condition, scale):
    log_sigmas = _sigmas().log()
    t = (math.log(sigma) - log_sigmas).abs().argmin().float().expand(x.shape[0])
    x_in = x / (sigma ** 2 + 1.0) ** 0.5
    with torch.no_grad():
        residuals = w.branch(x_in, t, branch_ctx.expand(x.shape[0], -1, -1), condition)
        with injected(w.unet, residuals, scale):
            return w.unet(x_in, t, encoder_hidden_states=base_ctx.expand(x.shape[0], -1, -1)).sample


def reference_sample(w, task: str, fitting: float, cfg: float, steps: int, scale: float = 1.0) -> torch.Tensor:
    a, b, na, nb = RECIPE[task]
    cond_ctx = fitting * w.embed[a] + (1 - fitting) * w.embed[b]
    uncond_ctx = fitting * w.embed[na] + (1 - fitting) * w.embed[nb]
    condition = _reference_condition(w)
    latent_image = StubVAE().encode(w.image) * 0.18215
    sigmas = _schedule(steps)
    x = latent_image + w.noise * (1.0 + sigmas[0] ** 2) ** 0.5
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        eps_c = _reference_eps(w, x, sigma, w.positive, cond_ctx, condition, scale)
        if cfg == 1.0:
            eps = eps_c
        else:
            eps_u = _reference_eps(w, x, sigma, w.negative, uncond_ctx, condition, scale)
            eps = eps_u + cfg * (eps_c - eps_u)
        denoised = x - eps * sigma
        x = x + (x - denoised) / sigma * (sigma_next - sigma)
    return x / 0.18215


def pack_sample(w, tasks, task: str, fitting: float, cfg: float, steps: int) -> torch.Tensor:
    import comfy.sample

    model, positive, negative, latent = w.nodes["PowerPaintApply"].execute(
        w.model, StubVAE(), w.image, w.mask, w.painternet, tasks, [[w.positive, {}]], [[w.negative, {}]], task,
        fitting, 1.0, 0.0, 1.0)
    assert latent["noise_mask"].shape == (BATCH, 1, SIZE, SIZE)
    # The LATENT's noise_mask makes ComfyUI paste the original back outside the hole each step; the reference tests
    # the denoiser, so both sides sample the whole latent.
    return comfy.sample.sample(model, w.noise, steps, cfg, "euler", "simple", positive, negative, latent["samples"],
                               denoise=1.0, seed=0)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


CASES = [(task, fitting, cfg) for task in RECIPE for cfg in (1.0, 7.5)
         for fitting in ((0.3, 1.0) if task in ("shape-guided", "object-removal") else (1.0,))]


@pytest.mark.parametrize("task,fitting,cfg", CASES)
def test_matches_reference_recipe(world, tasks, task, fitting, cfg):
    calls_before = len(world.encoder_calls)
    for steps in (1, 3):  # one denoising call (1-step Euler returns the denoised latent), then a 3-step sample
        want = reference_sample(world, task, fitting, cfg, steps)
        got = pack_sample(world, tasks, task, fitting, cfg, steps)
        assert got.shape == want.shape == (BATCH, 4, SIZE // 8, SIZE // 8)
        assert _rel(got, want) <= REL, (task, fitting, cfg, steps, _rel(got, want))
    assert len(world.encoder_calls) == calls_before  # no text encoder call while sampling


def test_branch_sees_task_not_prompt(world, tasks):
    """The recipe's distinguishing fact, shown on the reference itself: swapping the branch context for the user's
    prompt (what Apply PainterNet does) changes the result, and the pack follows the task context."""
    want = reference_sample(world, "object-removal", 1.0, 7.5, 1)
    got = pack_sample(world, tasks, "object-removal", 1.0, 7.5, 1)
    no_branch = reference_sample(world, "object-removal", 1.0, 7.5, 1, scale=0.0)
    assert _rel(want, no_branch) > 1e-2  # the branch really acts
    saved = dict(world.embed)
    try:
        for key in world.embed:
            world.embed[key] = world.positive
        prompt_fed = reference_sample(world, "object-removal", 1.0, 7.5, 1)
    finally:
        world.embed.update(saved)
    assert _rel(prompt_fed, want) > 1e-3
    assert _rel(got, want) <= REL


def test_task_embeddings_encoded_once_and_cached(world, tasks):
    assert world.encoder_calls == [1]  # the four strings in one call
    assert set(tasks.embeddings) == {"P_ctxt", "P_shape", "P_obj", ""}
    for text, emb in tasks.embeddings.items():
        assert emb.shape == (1, 77, WIDTH) and emb.dtype == torch.float32 and emb.device.type == "cpu"
        assert float((emb - world.embed[text]).abs().max()) <= 1e-5
    again = world.nodes["PowerPaintTaskEncoder"].execute("pp_test_text_encoder.safetensors")[0]
    assert again is tasks
    assert world.encoder_calls == [1]


def test_fp16_file_and_prefixed_keys_load(world, tasks):
    from safetensors.torch import save_file

    sd = {k: v.half().contiguous() for k, v in world.encoder.state_dict().items() if not k.endswith("position_ids")}
    save_file({"cond_stage_model.transformer." + k: v for k, v in sd.items()},
              str(world.root / "text_encoders" / "pp_test_fp16.safetensors"))
    (half,) = world.nodes["PowerPaintTaskEncoder"].execute("pp_test_fp16.safetensors")
    for text, emb in half.embeddings.items():
        assert float((emb - tasks.embeddings[text]).abs().max()) < 0.05 * float(tasks.embeddings[text].abs().max())


def test_non_powerpaint_branch_refused(world, tasks, tmp_path):
    from safetensors.torch import save_file

    brush = PainterNetBranch.from_unet(world.unet, cross_attention=False, attention_control=False)
    save_file(brushnet_layout(brush.state_dict()), str(world.root / "inpaint" / "pp_test_plain_brushnet.safetensors"))
    (plain,) = world.nodes["PainterNetLoader"].execute("pp_test_plain_brushnet.safetensors", "fp32")
    with pytest.raises(ValueError, match="is a brushnet branch, not PowerPaint v2.*use Apply PainterNet") as err:
        world.nodes["PowerPaintApply"].execute(world.model, StubVAE(), world.image, world.mask, plain, tasks,
                                               [[world.positive, {}]], [[world.negative, {}]], "object-removal", 1.0,
                                               1.0, 0.0, 1.0)
    assert "\n" not in str(err.value)


def test_powerpaint_branch_in_painternet_apply_warns(world, caplog):
    with caplog.at_level("WARNING", logger="painternet"):
        world.nodes["PainterNetApply"].execute(world.model, StubVAE(), world.image, world.mask, world.painternet,
                                               [[world.positive, {}]], [[world.negative, {}]], 1.0, 0.0, 1.0)
    assert any("Apply PowerPaint" in r.getMessage() for r in caplog.records)


def test_text_encode_appends_task_suffix():
    class FakeClip:
        def tokenize(self, text):
            self.text = text
            return {"l": text}

        def encode_from_tokens_scheduled(self, tokens):
            return [[tokens, {}]]

    clip = FakeClip()
    node = load_pack()["PowerPaintTextEncode"]
    node.execute(clip, "a room", "object-removal", True)
    assert clip.text == "a room empty scene blur"
    node.execute(clip, "a room", "outpainting", True)
    assert clip.text == "a room empty scene"
    node.execute(clip, "a room", "object-removal", False)
    assert clip.text == "a room"
    node.execute(clip, "a cat", "shape-guided", True)
    assert clip.text == "a cat"


def test_samples_under_inference_mode(world, tasks):
    """ComfyUI's server runs every node and the sampler under torch.inference_mode (inference tensors: no version
    counter, no autograd): the same numbers come out."""
    want = reference_sample(world, "object-removal", 1.0, 7.5, 1)
    with torch.inference_mode():
        got = pack_sample(world, tasks, "object-removal", 1.0, 7.5, 1)
    assert _rel(got, want) <= REL
