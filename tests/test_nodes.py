"""Tier 3 in-process: the Apply path through ComfyUI's model patcher — batch order, stacking, memory management,
family checks — on tiny SD1.5/SDXL-shaped models carrying the same weights in diffusers and ComfyUI."""
from __future__ import annotations

import os

import pytest
import torch

from harness.comfy_helpers import comfy_model_from_diffusers, load_pack, pack_module, sampling_options
from harness.models import brushnet_layout
from painternet_core.branch import PainterNetBranch
from painternet_core.checkpoint import load_branch, save_branch
from painternet_core.config import TINY_SD15_UNET, TINY_SDXL_UNET

FAMILIES = {"sd15": TINY_SD15_UNET, "sdxl": TINY_SDXL_UNET}


_CACHE: dict = {}


def _tiny(family: str, tmp_path, seed: int = 0, cross_attention: bool = True):
    """(diffusers UNet, loaded PainterNet, ComfyUI ModelPatcher) with the same random weights; built once per module
    (every test clones the model patcher, so sharing is safe)."""
    key = (family, seed, cross_attention)
    if key not in _CACHE:
        _CACHE[key] = _build_tiny(family, tmp_path, seed, cross_attention)
    return _CACHE[key]


def _build_tiny(family: str, tmp_path, seed: int, cross_attention: bool):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(FAMILIES[family]).eval()
    for p in unet.parameters():
        p.data.normal_(0, 0.05)
    branch = PainterNetBranch.from_unet(unet, cross_attention=cross_attention,
                                        attention_control=cross_attention).eval()
    for p in branch.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    path = str(tmp_path / f"{family}-{seed}.safetensors")
    save_branch(path, branch.state_dict(), branch.config)
    painternet = pack_module("nodes.branch").build_branch(*load_branch(path), dtype="fp32")
    return unet, painternet, comfy_model_from_diffusers(unet, family)


def _inputs(family: str, batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ctx_dim = FAMILIES[family]["cross_attention_dim"]
    x = torch.randn(batch, 4, 16, 16, generator=g)
    ctx = torch.randn(batch, 7, ctx_dim, generator=g)
    y = torch.randn(batch, 80, generator=g) if family == "sdxl" else None
    return x, torch.tensor([400.0] * batch), ctx, y


def _run(patched, x, t, ctx, y, cond_or_uncond, sigma=1.0):
    import comfy.model_management as mm

    # As sampler_helpers.prepare_sampling does: the model and its additional models (the branch) together.
    mm.load_models_gpu([patched] + patched.get_nested_additional_models())
    with torch.no_grad():
        return patched.model.diffusion_model(x, t, context=ctx, y=y,
                                             transformer_options=sampling_options(patched, sigma, cond_or_uncond))


def _apply(model, painternet, condition, scale=1.0, start=0.0, end=1.0):
    return pack_module("nodes.injection").apply_painternet(model, painternet, condition, scale, start, end)


def test_pack_loads_like_comfyui_loads_it():
    mappings = load_pack()
    for node in ("PainterNetLoader", "PainterNetApply", "PainterNetMaskGenerator"):
        assert node in mappings
        inputs = mappings[node].INPUT_TYPES()
        for section in inputs.values():
            for name, spec in section.items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node}.{name} has no tooltip"


def test_comfyui_registers_the_v3_nodes_through_comfy_entrypoint():
    """The pack exports no NODE_CLASS_MAPPINGS (ComfyUI would take that V1 path first): ComfyUI's loader awaits
    `comfy_entrypoint`, and every node it registered from the pack is a V3 io.ComfyNode with no V1 declaration."""
    import sys

    from comfy_api.v0_0_2 import io
    from harness.comfy_helpers import pack_module_name

    mappings = load_pack()
    pack = sys.modules[pack_module_name()]
    assert not hasattr(pack, "NODE_CLASS_MAPPINGS") and callable(pack.comfy_entrypoint)
    ours = {name: cls for name, cls in mappings.items()
            if getattr(cls, "RELATIVE_PYTHON_MODULE", None) == "custom_nodes.ComfyUI-PainterNet"}
    assert set(ours) == {cls.GET_SCHEMA().node_id for cls in pack_module("nodes").NODES}
    assert {"PainterNetLoader", "PainterNetApply", "PainterNetMaskGenerator", "PainterNetBoxMask", "PainterNetCrop",
            "PainterNetStitch"} <= set(ours)
    for name, cls in ours.items():
        assert issubclass(cls, io.ComfyNode) and "INPUT_TYPES" not in vars(cls) and "FUNCTION" not in vars(cls), name


def test_image_batch_that_does_not_divide_the_latent_batch_is_refused(tmp_path):
    """Two images against three latents per chunk: ComfyUI's broadcast would repeat them (0, 1, 0) silently."""
    _, painternet, model = _tiny("sd15", tmp_path)
    conditions = torch.randn(2, 5, 16, 16, generator=torch.Generator().manual_seed(5))
    x, t, ctx, y = _inputs("sd15", 6)
    with pytest.raises(ValueError, match="got 2 images but the latent batch is 3; use 1 image or one per latent"):
        _run(_apply(model, painternet, conditions), x, t, ctx, y, [1, 0])


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("cond_or_uncond", [[1, 0], [0], [1]], ids=["cfg", "cfg1", "split-chunk"])
def test_each_row_gets_its_own_image_condition(family, cond_or_uncond, tmp_path):
    """Two images with different masks; the batch is [uncond…, cond…] chunks in ComfyUI's order. Row r must see
    image r % 2's condition, exactly as if that condition had been given per row."""
    _, painternet, model = _tiny(family, tmp_path)
    g = torch.Generator().manual_seed(5)
    conditions = torch.randn(2, 5, 16, 16, generator=g)
    conditions[0, 4], conditions[1, 4] = 0.0, 1.0
    n = 2 * len(cond_or_uncond)
    x, t, ctx, y = _inputs(family, n)
    batched = _run(_apply(model, painternet, conditions), x, t, ctx, y, cond_or_uncond)
    per_row = conditions[[r % 2 for r in range(n)]]
    expected = _run(_apply(model, painternet, per_row), x, t, ctx, y, [0])
    assert (batched - expected).abs().max() <= 1e-5
    swapped = _run(_apply(model, painternet, conditions.flip(0)), x, t, ctx, y, cond_or_uncond)
    assert (swapped - batched).abs().max() > 1e-4  # the two images' conditions really differ


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_two_applies_sum_and_base_is_untouched(family, tmp_path):
    _, painternet, model = _tiny(family, tmp_path)
    x, t, ctx, y = _inputs(family, 1)
    cond = torch.randn(1, 5, 16, 16, generator=torch.Generator().manual_seed(2))
    base_before = _run(model, x, t, ctx, y, [0])
    twice = _apply(_apply(model, painternet, cond, scale=0.3), painternet, cond, scale=0.4)
    once = _apply(model, painternet, cond, scale=0.7)
    out_twice = _run(twice, x, t, ctx, y, [0])
    out_once = _run(once, x, t, ctx, y, [0])
    assert (out_twice - out_once).abs().max() <= 1e-5
    assert (out_once - base_before).abs().max() > 1e-3
    # After the patched clones ran, the plain model is restored: same numbers, no holder or marker left behind.
    assert torch.equal(_run(model, x, t, ctx, y, [0]), base_before)
    inj = pack_module("nodes.injection")
    assert not any(isinstance(m, (inj.UpsampleHolder, inj.ResidualMarker)) for m in model.model.modules())
    assert model.get_additional_models() == []


def test_mask_generator_node_between_comfyui_mask_nodes():
    """PainterNetMaskGenerator as ComfyUI loads it, fed by ComfyUI's own SolidMask/MaskComposite and read by
    MaskToImage: ComfyUI's MASK layout (B, H, W) in, the same layout out."""
    from comfy_extras import nodes_mask

    blank = nodes_mask.SolidMask().solid(0.0, 48, 40)[0]
    segmentation = nodes_mask.MaskComposite().combine(blank, nodes_mask.SolidMask().solid(1.0, 16, 12)[0], 8, 10,
                                                      "add")[0]
    node = load_pack()["PainterNetMaskGenerator"]()
    outputs = {mode: getattr(node, node.FUNCTION)(segmentation, mode, 3)[0]
               for mode in ("segmentation", "box", "irregular")}
    assert torch.equal(outputs["segmentation"], segmentation)
    for mode in ("box", "irregular"):
        mask = outputs[mode]
        assert mask.shape == (1, 40, 48) and mask.dtype == torch.float32
        assert set(mask.unique().tolist()) <= {0.0, 1.0} and (mask >= segmentation).all()
        assert mask.sum() > segmentation.sum()  # the hole reaches beyond the object
    image = nodes_mask.MaskToImage().mask_to_image(outputs["box"])[0]
    assert image.shape == (1, 40, 48, 3) and torch.equal(image[..., 0], outputs["box"])


def test_nine_channel_inpaint_base_feeds_the_branch_the_noisy_latent(tmp_path):
    """An SD1.5 *inpainting* checkpoint (9 input channels: latent, mask, masked latent) takes the branch too: the
    branch sees the first 4 channels, the residuals go into the inpainting UNet, as in the diffusers reference."""
    from diffusers import UNet2DConditionModel

    from painternet_core.branch import injected

    unet4, _, _ = _tiny("sd15", tmp_path)
    torch.manual_seed(3)
    unet9 = UNet2DConditionModel.from_config({**TINY_SD15_UNET, "in_channels": 9}).eval()
    branch = PainterNetBranch.from_unet(unet4).eval()
    for p in list(unet9.parameters()) + list(branch.parameters()):
        p.data.normal_(0, 0.05)
    path = str(tmp_path / "for-inpaint-base.safetensors")
    save_branch(path, branch.state_dict(), branch.config)
    painternet = pack_module("nodes.branch").build_branch(*load_branch(path), dtype="fp32")
    model9 = comfy_model_from_diffusers(unet9, "sd15")
    g = torch.Generator().manual_seed(4)
    x9 = torch.randn(1, 9, 16, 16, generator=g)
    cond = torch.randn(1, 5, 16, 16, generator=g)
    _, t, ctx, _ = _inputs("sd15", 1)
    with torch.no_grad():
        residuals = branch(x9[:, :4], t, ctx, cond)
        with injected(unet9, residuals, 1.0):
            want = unet9(x9, t, encoder_hidden_states=ctx).sample
        plain = unet9(x9, t, encoder_hidden_states=ctx).sample
    got = _run(_apply(model9, painternet, cond), x9, t, ctx, None, [0])
    assert (got - want).abs().max() <= 1e-5
    assert (got - plain).abs().max() > 1e-3


def test_apply_latent_keeps_the_unmasked_area_through_a_plain_sampler(tmp_path):
    """PainterNetApply's LATENT carries the mask as noise_mask: ComfyUI's sampler at denoise 1.0 regenerates the hole
    and leaves the latent outside it as encoded (the workflow needs no extra composite for the latent)."""
    import comfy.sample
    import folder_paths
    import torch.nn.functional as F

    from harness.models import MODELS, branch_file, load_checkpoint, sd15_checkpoint

    model, _, vae = load_checkpoint(sd15_checkpoint())
    branch_name = os.path.basename(branch_file("sd15", "tiny-sd15-320-branch.safetensors"))
    folder_paths.add_model_folder_path("painternet", MODELS)
    mappings = load_pack()
    (painternet,) = mappings["PainterNetLoader"].execute(branch_name, "fp32")
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 8:40] = 1.0
    g = torch.Generator().manual_seed(1)
    positive = [[torch.randn(1, 77, 768, generator=g), {}]]
    negative = [[torch.randn(1, 77, 768, generator=g), {}]]
    patched, positive, negative, latent = mappings["PainterNetApply"].execute(
        model, vae, image, mask, painternet, positive, negative, 1.0, 0.0, 1.0)
    assert torch.equal(latent["noise_mask"].reshape(1, 64, 64), mask)
    samples = latent["samples"]
    noise = comfy.sample.prepare_noise(samples, 0)
    out = comfy.sample.sample(patched, noise, 2, 2.0, "euler", "normal", positive, negative, samples,
                              denoise=1.0, noise_mask=latent["noise_mask"], seed=0).float()
    keep = (F.interpolate(latent["noise_mask"].reshape(1, 1, 64, 64), size=samples.shape[-2:], mode="bilinear")
            == 0).expand_as(samples)
    assert keep.any() and (~keep).any()
    assert torch.allclose(out[keep], samples.float()[keep], atol=1e-4)
    assert (out[~keep] - samples.float()[~keep]).abs().max() > 0.1  # the hole was regenerated


def test_branch_is_an_additional_model_managed_by_comfyui(tmp_path):
    import comfy.model_management as mm

    import comfy.sampler_helpers

    _, painternet, model = _tiny("sd15", tmp_path)
    patched = _apply(model, painternet, torch.zeros(1, 5, 16, 16))
    assert painternet.patcher in patched.get_additional_models()
    comfy.sampler_helpers.prepare_sampling(patched, (1, 4, 16, 16), {"positive": [], "negative": []},
                                           model_options=patched.model_options)
    loaded = [lm.model for lm in mm.current_loaded_models]
    assert painternet.patcher in loaded and patched in loaded
    # Keys are untouched by the object patches (a LoRA or a save still sees the original layout).
    assert set(patched.model.state_dict()) == set(model.model.state_dict())


@pytest.mark.parametrize("source_format", ["brushnet", "powerpaint-ca"])
def test_brushnet_checkpoint_loads_and_runs(tmp_path, source_format):
    """A diffusers BrushNet SD1.5 file in TencentARC's public key layout (conv_in_condition, brushnet_*_blocks, no
    metadata); BrushNet's blocks have no attention, PowerPaint-CA's keep cross-attention."""
    from safetensors.torch import save_file

    from diffusers import UNet2DConditionModel

    _, _, model = _tiny("sd15", tmp_path)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(TINY_SD15_UNET)
    cross = source_format == "powerpaint-ca"
    ref = PainterNetBranch.from_unet(unet, cross_attention=cross, attention_control=False)
    for p in ref.parameters():
        p.data.normal_(0, 0.05)
    sd = brushnet_layout(ref.state_dict())
    assert "conv_in_condition.weight" in sd and sd["conv_in_condition.weight"].shape[1] == 9
    assert any(k.startswith("brushnet_down_blocks.11.") for k in sd)
    assert any(".attentions." in k for k in sd) == cross
    path = str(tmp_path / f"{source_format}.safetensors")
    save_file(sd, path)
    state, config = load_branch(path)
    assert (config.source_format, config.mask_polarity, config.attention_control) == (source_format, "known", False)
    assert config.cross_attention == cross
    painternet = pack_module("nodes.branch").build_branch(state, config, dtype="fp32")
    x, t, ctx, y = _inputs("sd15", 1)
    cond = torch.randn(1, 5, 16, 16)
    with torch.no_grad():
        want = ref.to(torch.float32)(x, t, ctx, cond)
        got = painternet.patcher.model(torch.cat([x, cond], 1), t, ctx)
    for a, b in zip(want.down + [want.mid] + want.up, got["down"] + [got["mid"]] + got["up"]):
        assert (a - b).abs().max() <= 1e-5
    out = _run(_apply(model, painternet, cond), x, t, ctx, y, [0])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("branch_family,model_kind,message", [
    ("sd15", "sdxl", "for SD15 but the model is SDXL"),
    ("sdxl", "sd15", "for SDXL but the model is SD15"),
    ("sdxl", "ssd1b", "SSD-1B"),
    ("sdxl", "vega", "SSD-1B, Segmind Vega and KOALA are not supported"),
    ("sd15", "sd2", "model family SD20 is not supported"),
])
def test_family_mismatch_is_a_clear_error(branch_family, model_kind, message, tmp_path):
    import comfy.model_patcher
    import comfy.supported_models as sm

    _, painternet, _ = _tiny(branch_family, tmp_path)
    unet_cfg = pack_module("nodes.branch").comfy_unet_config
    sd15 = unet_cfg(TINY_SD15_UNET, in_channels=4)
    sdxl = unet_cfg(TINY_SDXL_UNET, in_channels=4)
    cls, cfg = {
        "sd15": (sm.SD15, sd15), "sdxl": (sm.SDXL, sdxl),
        "ssd1b": (sm.SSD1B, dict(sdxl, transformer_depth=[0, 0, 2, 2, 4, 4],
                                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 4, 4, 4], transformer_depth_middle=-1)),
        "vega": (sm.Segmind_Vega, dict(sdxl, transformer_depth=[0, 0, 1, 1, 2, 2],
                                       transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2], transformer_depth_middle=-1)),
        "sd2": (sm.SD20, dict(sd15, context_dim=1024)),
    }[model_kind]
    model_config = cls(cfg)
    for key in ("num_heads", "num_head_channels"):
        model_config.unet_config[key] = cfg[key]
    model_config.set_inference_dtype(torch.float32, None)
    model = comfy.model_patcher.ModelPatcher(model_config.get_model({}, device="meta"), "cpu", "cpu")
    with pytest.raises(ValueError, match=message):
        pack_module("nodes.branch").check_base(model, painternet.config)


def test_loading_needs_no_diffusers(tmp_path):
    """Inference stays on ComfyUI's own modules: a branch loads and runs with diffusers unimportable."""
    import subprocess
    import sys

    from conftest import REPO

    from diffusers import UNet2DConditionModel

    path = tmp_path / "branch.safetensors"

    branch = PainterNetBranch.from_unet(UNet2DConditionModel.from_config(TINY_SD15_UNET))
    save_branch(str(path), branch.state_dict(), branch.config)
    script = f"""
import sys
sys.modules["diffusers"] = None
sys.path.insert(0, {os.path.join(REPO, "tests")!r})
import conftest, torch
from harness.comfy_helpers import pack_module
pn = pack_module("nodes.branch").load_painternet({str(path)!r}, "fp32")
out = pn.patcher.model(torch.zeros(1, 9, 16, 16), torch.tensor([10.0]), torch.zeros(1, 7, 32))
assert len(out["down"]) == 12 and "diffusers" not in [m for m in sys.modules if sys.modules[m] is not None]
print("OK")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip().endswith("OK"), result.stderr[-3000:]
