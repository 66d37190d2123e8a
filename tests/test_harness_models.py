"""The harness's test weights behave like a model: every test checkpoint predicts noise with a real spread that depends
on its input, and a random branch moves that prediction. Without this, every server workflow, soak and reliability
row passes whether the branch runs or not (the first harness zeroed ComfyUI's GroupNorms: all outputs were 0)."""
from __future__ import annotations

import pytest
import torch

from harness.comfy_helpers import load_pack, pack_module, sampling_options
from harness.models import (NORM_TYPES, SDXL_SMALL_UNET, branch_file, comfy_model, fill_, load_checkpoint,
                            sd15_checkpoint, sd15_checkpoint_variant)

# A noise prediction of a healthy model has a spread of order 1; the zeroed harness gave exactly 0.
MIN_STD = 0.1
# How much a random branch at scale 1 must move the prediction, relative to the prediction's own spread.
MIN_BRANCH_MOVE = 0.05


def _predict(patched, x, t, context, y=None, branch=False):
    import comfy.model_management as mm

    mm.load_models_gpu([patched] + patched.get_nested_additional_models())
    kwargs = {"transformer_options": sampling_options(patched, 1.0, [0])} if branch else {}
    with torch.no_grad():
        return patched.model.diffusion_model(x, t, context=context, y=y, **kwargs).float()


def _condition(latent: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(9)
    condition = torch.randn(1, 5, latent, latent, generator=g)
    condition[:, 4] = 0.0
    condition[:, 4, latent // 4: 3 * latent // 4, latent // 4: 3 * latent // 4] = 1.0
    return condition


def _check_model_and_branch(model, branch_path, context_dim, y=None):
    load_pack()
    injection = pack_module("nodes.injection")
    painternet = pack_module("nodes.branch").load_painternet(branch_path, "fp32")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    other = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 7, context_dim, generator=g)
    t = torch.tensor([500.0])

    plain = _predict(model, x, t, context, y)
    assert torch.isfinite(plain).all()
    assert plain.std() > MIN_STD, f"prediction spread {plain.std():.3g}: the test weights are degenerate"
    assert (_predict(model, other, t, context, y) - plain).abs().max() > MIN_STD, "prediction ignores its input"

    patched = injection.apply_painternet(model, painternet, _condition(8), 1.0, 0.0, 1.0)
    with_branch = _predict(patched, x, t, context, y, branch=True)
    assert torch.isfinite(with_branch).all()
    moved = (with_branch - plain).abs().mean() / plain.std()
    assert moved > MIN_BRANCH_MOVE, f"the random branch moves the prediction by only {moved:.3g} of its spread"

    off = injection.apply_painternet(model, painternet, _condition(8), 0.0, 0.0, 1.0)
    assert torch.allclose(_predict(off, x, t, context, y, branch=True), plain, atol=1e-5)


@pytest.mark.parametrize("variant", [None, ("tiny-sd15-320-b.safetensors", 21)])
def test_sd15_test_checkpoints_predict_noise_a_branch_moves(variant):
    path = sd15_checkpoint() if variant is None else sd15_checkpoint_variant(*variant)
    model, _, vae = load_checkpoint(path)
    _check_model_and_branch(model, branch_file("sd15", "tiny-sd15-320-branch.safetensors"), 768)
    _check_model_and_branch(model, branch_file("sd15", "tiny-sd15-320-branch-b.safetensors", seed=6), 768)
    # The checkpoint's VAE (TAESD) decodes different latents to different, non-flat pictures.
    g = torch.Generator().manual_seed(1)
    a, b = vae.decode(torch.randn(1, 4, 8, 8, generator=g)), vae.decode(torch.randn(1, 4, 8, 8, generator=g))
    assert torch.isfinite(a).all() and a.std() > 0.02 and (a - b).abs().mean() > 0.02


def test_sdxl_test_model_predicts_noise_a_branch_moves():
    import comfy.supported_models as sm

    model = comfy_model(sm.SDXL, SDXL_SMALL_UNET)
    y = torch.randn(1, SDXL_SMALL_UNET["adm_in_channels"], generator=torch.Generator().manual_seed(2))
    _check_model_and_branch(model, branch_file("sdxl", "tiny-sdxl-320-branch.safetensors"), 2048, y=y)


def test_fill_initialises_by_module_type_not_by_name():
    """ComfyUI names GroupNorms `in_layers.0`/`out.0`: the type decides, so they get weight 1 like `norm1` does."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    block = fill_(ResBlock(32, 64, 0.0, out_channels=32, operations=comfy.ops.disable_weight_init), seed=3)
    norms = [m for m in block.modules() if isinstance(m, NORM_TYPES)]
    assert norms and all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in norms)
    weights = [p for n, p in block.named_parameters() if n.endswith("weight") and p.ndim > 1]
    assert weights and all(p.std() > 0 for p in weights)
    again = fill_(ResBlock(32, 64, 0.0, out_channels=32, operations=comfy.ops.disable_weight_init), seed=3)
    assert all(torch.equal(p, q) for p, q in zip(block.parameters(), again.parameters()))

