"""Tier 2: the diffusers reference and the ComfyUI branch, on the same weights, give the same residuals and the same
UNet output; a zero-initialised branch leaves the base bit-exact. SD1.5- and SDXL-shaped tiny topologies."""
from __future__ import annotations

import pytest
import torch

from harness.comfy_helpers import comfy_model_from_diffusers, load_pack, pack_module, sampling_options
from painternet_core.branch import PainterNetBranch, painternet_unet_forward
from painternet_core.checkpoint import save_branch
from painternet_core.config import TINY_SD15_UNET, TINY_SDXL_UNET

TOL = 1e-5
FAMILIES = {"sd15": TINY_SD15_UNET, "sdxl": TINY_SDXL_UNET}


def load_with_loader_node(tmp_path, name: str, branch: PainterNetBranch):
    """Write with core's writer into a models/painternet folder, read back through the PainterNetLoader node.
    Names must be unique per test: the loader resolves a name in the first registered folder that has it."""
    import folder_paths

    folder = tmp_path / "painternet"
    folder.mkdir(exist_ok=True)
    save_branch(str(folder / name), branch.state_dict(), branch.config)
    folder_paths.add_model_folder_path("painternet", str(folder))
    (painternet,) = load_pack()["PainterNetLoader"].execute(name, "fp32")
    return painternet


_CACHE: dict = {}


def _setup(family: str, tmp_path, randomize: bool):
    """Built once per (family, randomize) for the module; tests only clone the ModelPatcher, never mutate it."""
    if (family, randomize) not in _CACHE:
        _CACHE[family, randomize] = _build(family, tmp_path, randomize)
    return _CACHE[family, randomize]


def _build(family: str, tmp_path, randomize: bool):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(FAMILIES[family]).eval()
    for p in unet.parameters():  # diffusers zero-inits some projections; make every path carry signal
        p.data.normal_(0, 0.05)
    branch = PainterNetBranch.from_unet(unet).eval()
    if randomize:
        for p in branch.parameters():
            p.data.add_(torch.randn_like(p) * 0.05)
    painternet = load_with_loader_node(tmp_path, f"{tmp_path.name}-{family}.safetensors", branch)
    model = comfy_model_from_diffusers(unet, family)
    b = 2
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 4, 16, 16, generator=g)
    cond = torch.randn(b, 5, 16, 16, generator=g)
    t = torch.tensor([500.0] * b)
    ctx = torch.randn(b, 7, unet.config.cross_attention_dim, generator=g)
    added, y = None, None
    if family == "sdxl":
        added = {"text_embeds": torch.randn(b, 32, generator=g), "time_ids": torch.rand(b, 6, generator=g) * 1024}
        y = torch.cat([added["text_embeds"], unet.add_time_proj(added["time_ids"].flatten()).reshape(b, -1)], dim=-1)
    return unet, branch, painternet, model, (x, cond, t, ctx, added, y)


def _comfy_forward(model, painternet, inputs, scale=1.0, start=0.0, end=1.0, sigma=1.0):
    import comfy.model_management as mm

    x, cond, t, ctx, _, y = inputs
    patched = pack_module("nodes.injection").apply_painternet(model, painternet, cond, scale, start, end)
    mm.load_models_gpu([patched])
    with torch.no_grad():
        out = patched.model.diffusion_model(x, t, context=ctx, y=y,
                                            transformer_options=sampling_options(patched, sigma, [0]))
    return out, patched


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_residuals_and_output_match_reference(family, tmp_path):
    unet, branch, painternet, model, inputs = _setup(family, tmp_path, randomize=True)
    x, cond, t, ctx, added, y = inputs
    with torch.no_grad():
        ref = branch(x, t, ctx, cond, added)
        got = painternet.patcher.model(torch.cat([x, cond], 1), t, ctx, y)
    assert len(got["down"]) == len(ref.down) == {"sd15": 12, "sdxl": 9}[family]
    assert len(got["up"]) == len(ref.up) == {"sd15": 15, "sdxl": 11}[family]
    assert len(got["attention"]) == len(ref.attention) == {"sd15": 16, "sdxl": 70}[family]
    for a, b in zip(ref.down + [ref.mid] + ref.up, got["down"] + [got["mid"]] + got["up"]):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= TOL
    for a, b in zip(ref.attention, got["attention"].values()):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= TOL
    with torch.no_grad():
        want = painternet_unet_forward(unet, branch, x, t, ctx, cond, 0.7, added)
        base = unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
    out, _ = _comfy_forward(model, painternet, inputs, scale=0.7)
    assert (want - base).abs().max() > 1e-2  # the branch really acts
    assert (out - want).abs().max() <= TOL


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_zero_init_branch_is_identity(family, tmp_path):
    _, _, painternet, model, inputs = _setup(family, tmp_path, randomize=False)
    x, _, t, ctx, _, y = inputs
    with torch.no_grad():
        base = model.model.diffusion_model(x, t, context=ctx, y=y, transformer_options={})
    out, _ = _comfy_forward(model, painternet, inputs)
    assert torch.equal(out, base)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("how", ["scale0", "outside_range"])
def test_branch_not_run_when_disabled(family, how, tmp_path):
    _, _, painternet, model, inputs = _setup(family, tmp_path, randomize=True)
    x, _, t, ctx, _, y = inputs
    with torch.no_grad():
        base = model.model.diffusion_model(x, t, context=ctx, y=y, transformer_options={})
    calls = []
    handle = painternet.patcher.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        if how == "scale0":
            out, _ = _comfy_forward(model, painternet, inputs, scale=0.0)
        else:  # sigma 1.0 lies early in sampling for SD; a range late in sampling excludes it
            out, _ = _comfy_forward(model, painternet, inputs, start=0.9, end=1.0, sigma=14.0)
    finally:
        handle.remove()
    assert torch.equal(out, base)
    assert calls == []
