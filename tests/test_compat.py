"""The compatibility matrix (docs/compatibility.md): PainterNetApply next to ComfyUI's own model patches, samplers,
guiders, LoRA, ControlNet, area conditioning and TorchCompileModel, in both graph orders, on a tiny SD15-detected
model (real ComfyUI nodes, called in-process, 2 steps on a 16x16 latent).

Each model-patch row checks, for a PainterNet branch and a BrushNet-layout branch: it runs, the output is finite, the
branch still changes it, and `scale=0` gives exactly the patch alone, whichever of the two was applied first.
"""
from __future__ import annotations

import types
from typing import Any, Callable

import pytest
import torch

from harness.comfy_helpers import comfy_model_from_diffusers, pack_module
from harness.models import brushnet_layout
from painternet_core.branch import PainterNetBranch
from painternet_core.checkpoint import load_branch, save_branch
from painternet_core.config import TINY_SD15_UNET

LATENT = 16  # latent side: 128 px images
STEPS = 2


def _node(cls: Any, *args: Any) -> Any:
    """Run a ComfyUI node the way the executor would: V3 nodes through `execute`, V1 through FUNCTION."""
    if hasattr(cls, "FUNCTION"):
        return getattr(cls(), cls.FUNCTION)(*args)
    return cls.execute(*args).result


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Any]:
    """Tiny SD15-detected base, a PainterNet branch and a BrushNet-layout branch (TencentARC key names, no
    metadata) with random weights, a condition with a hole, conditioning and a latent with its noise mask."""
    from safetensors.torch import save_file

    from diffusers import UNet2DConditionModel

    tmp = tmp_path_factory.mktemp("compat")
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(TINY_SD15_UNET).eval()
    for p in unet.parameters():
        p.data.normal_(0, 0.05)
    build = pack_module("nodes.branch").build_branch
    branch = PainterNetBranch.from_unet(unet).eval()
    for p in branch.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    path = str(tmp / "painternet.safetensors")
    save_branch(path, branch.state_dict(), branch.config)
    brush = PainterNetBranch.from_unet(unet, cross_attention=False, attention_control=False)
    for p in brush.parameters():
        p.data.normal_(0, 0.05)
    sd = brushnet_layout(brush.state_dict())
    brush_path = str(tmp / "brushnet.safetensors")
    save_file(sd, brush_path)
    g = torch.Generator().manual_seed(1)
    condition = torch.randn(1, 5, LATENT, LATENT, generator=g)
    condition[:, 4] = 0.0
    condition[:, 4, 4:12, 3:11] = 1.0
    noise_mask = torch.zeros(1, 1, LATENT * 8, LATENT * 8)
    noise_mask[..., 32:96, 24:88] = 1.0
    return {
        "model": comfy_model_from_diffusers(unet, "sd15"),
        "branches": {"painternet": build(*load_branch(path), dtype="fp32"),
                     "brushnet": build(*load_branch(brush_path), dtype="fp32")},
        "condition": condition,
        "positive": [[torch.randn(1, 7, 32, generator=g), {}]],
        "negative": [[torch.randn(1, 7, 32, generator=g), {}]],
        "latent": {"samples": torch.randn(1, 4, LATENT, LATENT, generator=g), "noise_mask": noise_mask},
    }


def _apply(world: dict[str, Any], model: Any, kind: str, scale: float) -> Any:
    return pack_module("nodes.injection").apply_painternet(model, world["branches"][kind], world["condition"], scale,
                                                           0.0, 1.0)


def _ksampler(world: dict[str, Any], model: Any, sampler: str = "euler", positive: Any = None, cfg: float = 3.0,
              denoise: float = 1.0) -> torch.Tensor:
    import nodes

    (out,) = nodes.KSampler().sample(model, 7, STEPS, cfg, sampler, "normal", positive or world["positive"],
                                     world["negative"], world["latent"], denoise=denoise)
    return out["samples"]


def _check_orders(world: dict[str, Any], patch: Callable[[Any], Any], run: Callable[[Any], torch.Tensor],
                  kinds: tuple[str, ...] = ("painternet", "brushnet")) -> None:
    """Both graph orders: patch alone vs PainterNet before/after it, for each branch layout."""
    alone = run(patch(world["model"]))
    assert torch.isfinite(alone).all()
    for kind in kinds:
        for order in ("patch-then-apply", "apply-then-patch"):
            def build(scale: float) -> Any:
                if order == "patch-then-apply":
                    return _apply(world, patch(world["model"]), kind, scale)
                return patch(_apply(world, world["model"], kind, scale))

            on = run(build(1.0))
            assert torch.isfinite(on).all(), (kind, order)
            assert (on - alone).abs().max() > 1e-3, f"{kind} {order}: the branch had no effect"
            if kind == kinds[0]:  # at scale 0 the branch never runs, so its layout cannot matter: checked once
                assert torch.equal(run(build(0.0)), alone), f"{kind} {order}: scale=0 differs from the patch alone"


def _model_patches() -> dict[str, Callable[[Any], Any]]:
    from comfy_extras import (nodes_differential_diffusion, nodes_freelunch, nodes_hypertile, nodes_model_advanced,
                              nodes_model_downscale, nodes_pag, nodes_sag, nodes_tomesd)

    def first(cls: Any, *args: Any) -> Callable[[Any], Any]:
        return lambda m: _node(cls, m, *args)[0]

    return {
        "FreeU": first(nodes_freelunch.FreeU, 1.3, 1.4, 0.9, 0.2),
        "FreeU_V2": first(nodes_freelunch.FreeU_V2, 1.3, 1.4, 0.9, 0.2),
        "HyperTile": first(nodes_hypertile.HyperTile, 32, 2, 2, False),
        "PerturbedAttentionGuidance": first(nodes_pag.PerturbedAttentionGuidance, 3.0),
        "SelfAttentionGuidance": first(nodes_sag.SelfAttentionGuidance, 0.5, 2.0),
        "DifferentialDiffusion": first(nodes_differential_diffusion.DifferentialDiffusion, 1.0),
        "RescaleCFG": first(nodes_model_advanced.RescaleCFG, 0.7),
        "ModelSamplingDiscrete eps": first(nodes_model_advanced.ModelSamplingDiscrete, "eps", False),
        "ModelSamplingDiscrete v_prediction zsnr": first(nodes_model_advanced.ModelSamplingDiscrete, "v_prediction",
                                                         True),
        "ModelSamplingDiscrete lcm": first(nodes_model_advanced.ModelSamplingDiscrete, "lcm", False),
        "TomePatchModel": first(nodes_tomesd.TomePatchModel, 0.5),
        "PatchModelAddDownscale (Deep Shrink)": first(nodes_model_downscale.PatchModelAddDownscale, 3, 2.0, 0.0, 1.0,
                                                      True, "bicubic", "bicubic"),
        "Deep Shrink before skip, 1.5x, area": first(nodes_model_downscale.PatchModelAddDownscale, 1, 1.5, 0.0, 1.0,
                                                     False, "area", "bilinear"),
    }


PATCHES = list(_model_patches())


@pytest.mark.parametrize("name", PATCHES)
def test_model_patch_row(world, name):
    patch = _model_patches()[name]
    _check_orders(world, patch, lambda m: _ksampler(world, m))


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_2m", "lcm", "uni_pc", "ddim", "euler_cfg_pp"])
def test_sampler_row(world, sampler):
    _check_orders(world, lambda m: m, lambda m: _ksampler(world, m, sampler), kinds=("painternet",))


def test_denoise_below_one(world):
    _check_orders(world, lambda m: m, lambda m: _ksampler(world, m, denoise=0.6), kinds=("painternet",))


@pytest.mark.parametrize("start,end", [(0, 1), (1, 2)])
def test_ksampler_advanced_partial_range(world, start, end):
    import nodes

    def run(model: Any) -> torch.Tensor:
        (out,) = nodes.KSamplerAdvanced().sample(model, "enable", 7, STEPS, 3.0, "euler", "normal", world["positive"],
                                                 world["negative"], world["latent"], start, end,
                                                 "enable" if end < STEPS else "disable")
        return out["samples"]

    _check_orders(world, lambda m: m, run, kinds=("painternet",))


@pytest.mark.parametrize("guider", ["CFGGuider", "DualCFGGuider"])
def test_sampler_custom_advanced_row(world, guider):
    from comfy_extras import nodes_custom_sampler as cs

    def run(model: Any) -> torch.Tensor:
        if guider == "CFGGuider":
            (g,) = _node(cs.CFGGuider, model, world["positive"], world["negative"], 3.0)
        else:
            (g,) = _node(cs.DualCFGGuider, model, world["positive"], world["negative"], world["negative"], 3.0, 2.0,
                         "regular")
        (noise,) = _node(cs.RandomNoise, 7)
        (sampler,) = _node(cs.KSamplerSelect, "euler")
        (sigmas,) = _node(cs.BasicScheduler, model, "normal", STEPS, 1.0)
        out, _ = _node(cs.SamplerCustomAdvanced, noise, g, sampler, sigmas, world["latent"])
        return out["samples"]

    _check_orders(world, lambda m: m, run, kinds=("painternet",))


def test_lora_row(world):
    """A random LoRA on every cross-attention key/value projection of the UNet, loaded by ComfyUI's own LoRA code
    (what LoraLoaderModelOnly runs)."""
    import comfy.lora
    import comfy.sd

    key_map = comfy.lora.model_lora_keys_unet(world["model"].model, {})
    shapes = world["model"].model.state_dict()
    g = torch.Generator().manual_seed(3)
    lora: dict[str, torch.Tensor] = {}
    for lora_key, weight_key in sorted(key_map.items()):
        if (not lora_key.startswith("lora_unet_") or not isinstance(weight_key, str) or weight_key not in shapes
                or not weight_key.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))):
            continue
        shape = shapes[weight_key].shape
        if len(shape) != 2:
            continue
        lora[f"{lora_key}.lora_up.weight"] = torch.randn(shape[0], 4, generator=g) * 0.1
        lora[f"{lora_key}.lora_down.weight"] = torch.randn(4, shape[1], generator=g) * 0.1
    assert len(lora) >= 16

    def patch(model: Any) -> Any:
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
        return patched

    _check_orders(world, patch, lambda m: _ksampler(world, m))


def test_controlnet_row(world):
    """A random ControlNet built from ComfyUI's own classes for this UNet, applied with ControlNetApplyAdvanced."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management as mm
    import comfy.ops
    import nodes

    from harness.models import fill_

    config = dict(world["model"].model.model_config.unet_config)
    for key in ("out_channels", "dtype", "device", "operations"):
        config.pop(key, None)
    control_model = comfy.cldm.cldm.ControlNet(**config, hint_channels=3, operations=comfy.ops.disable_weight_init,
                                               dtype=torch.float32, device="cpu")
    fill_(control_model, 6, gain=0.5)
    controlnet = comfy.controlnet.ControlNet(control_model, load_device=mm.get_torch_device())
    hint = torch.rand(1, LATENT * 8, LATENT * 8, 3, generator=torch.Generator().manual_seed(4))
    positive, negative = nodes.ControlNetApplyAdvanced().apply_controlnet(
        world["positive"], world["negative"], controlnet, hint, 1.0, 0.0, 1.0)

    def run(model: Any) -> torch.Tensor:
        import nodes as n

        (out,) = n.KSampler().sample(model, 7, STEPS, 3.0, "euler", "normal", positive, negative, world["latent"])
        return out["samples"]

    assert (run(world["model"]) - _ksampler(world, world["model"])).abs().max() > 1e-3  # the ControlNet acts
    _check_orders(world, lambda m: m, run)


def test_area_conditioning_row(world):
    """ConditioningSetArea + ConditioningCombine on Apply's conditioning: ComfyUI runs the model on the area's crop
    of the latent, and the branch gets the same crop of its condition (issue 12 finding 5)."""
    import nodes

    (area,) = nodes.ConditioningSetArea().append(world["positive"], 64, 48, 32, 24, 1.0)
    (combined,) = nodes.ConditioningCombine().combine(world["positive"], area)
    _check_orders(world, lambda m: m, lambda m: _ksampler(world, m, positive=combined))


def test_area_crop_feeds_the_branch_the_matching_condition(world):
    """On the area's chunk, the patched UNet equals the same UNet given that crop of the condition directly."""
    import uuid

    from harness.comfy_helpers import sampling_options

    import comfy.model_management as mm

    inj = pack_module("nodes.injection")
    model = world["model"]
    full = _apply(world, model, "painternet", 1.0)
    h, w, y, x = 6, 8, 5, 4
    crop = world["condition"][..., y:y + h, x:x + w]
    cropped = pack_module("nodes.injection").apply_painternet(model, world["branches"]["painternet"], crop, 1.0, 0, 1)
    g = torch.Generator().manual_seed(9)
    xin = torch.randn(2, 4, h, w, generator=g)
    t = torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 7, 32, generator=g)
    ids = [uuid.uuid4(), uuid.uuid4()]

    def run(patched: Any, areas: dict | None) -> torch.Tensor:
        mm.load_models_gpu([patched] + patched.get_nested_additional_models())
        options = sampling_options(patched, 1.0, [1, 0])
        options["uuids"] = ids
        if areas is not None:
            options[inj.AREAS] = areas
        with torch.no_grad():
            return patched.model.diffusion_model(xin, t, context=ctx, transformer_options=options)

    want = run(cropped, None)
    got = run(full, {ids[0]: (h, w, y, x), ids[1]: (h, w, y, x)})
    assert torch.equal(got, want)
    other = run(full, {ids[0]: (h, w, y + 1, x), ids[1]: (h, w, y + 1, x)})
    assert (other - want).abs().max() > 1e-4  # the offset matters: it really is that crop
    with pytest.raises(ValueError, match="sample the LATENT that PainterNetApply outputs"):
        run(full, None)


def test_deep_shrink_residuals_are_resized_to_the_shrunk_state():
    inj = pack_module("nodes.injection")
    r = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.equal(inj.resize_map(r, (2, 2)), torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))  # area mean
    up = inj.resize_map(torch.tensor([[[[0.0, 1.0]]]]), (1, 4))
    assert torch.allclose(up, torch.tensor([[[[0.0, 0.25, 0.75, 1.0]]]]))  # bilinear
    assert inj._token_grid(91, (7, 13)) == (7, 13)
    assert inj._token_grid(28, (7, 13)) == (4, 7)  # a stride-2 conv with padding 1 rounds up
    assert inj._token_grid(8, (7, 13)) == (2, 4)
    assert inj._token_grid(12, (7, 13)) is None


def test_unresolvable_conflict_names_the_patch_in_the_way(world):
    """A patch that changes the channels of the hidden state cannot be followed: the error names it, not torch."""
    def widen(h: torch.Tensor, transformer_options: dict, **kwargs: Any) -> torch.Tensor:
        return torch.cat([h, h], dim=1) if transformer_options["block"][1] == 4 else h

    model = world["model"].clone()
    model.set_model_input_block_patch(widen)
    with pytest.raises(RuntimeError, match=r"PainterNet residual .* at input block 4: .*widen"):
        _ksampler(world, _apply(world, model, "painternet", 1.0))


@pytest.mark.parametrize("order", ["compile-then-apply", "apply-then-compile"])
def test_torch_compile_row(world, order, monkeypatch):
    """ComfyUI's TorchCompileModel node around the patched model: dynamo captures one graph per model with no graph
    break and no recompile across sampling runs, and the result equals eager (tolerance 1e-5). The eager backend
    keeps the test fast (inductor's code generation takes minutes on a 2-core CPU; bench/compile_overhead.py
    measures it); graph capture, where the pack could break graphs, is the same for every backend."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    import comfy.ldm.modules.attention as attention
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile (dynamo) is not supported on this Python/platform")
    # ComfyUI's CPU attention (sub-quadratic) asks psutil for free memory, which breaks any graph, base included;
    # --use-pytorch-cross-attention (ComfyUI's default on CUDA) selects SDPA, as here.
    monkeypatch.setattr(attention, "optimized_attention", attention.attention_pytorch)
    model = world["model"]
    if order == "compile-then-apply":
        compiled = _apply(world, _node(TorchCompileModel, model, "eager")[0], "painternet", 1.0)
    else:
        compiled = _node(TorchCompileModel, _apply(world, model, "painternet", 1.0), "eager")[0]
    eager = _ksampler(world, _apply(world, model, "painternet", 1.0))
    torch._dynamo.reset()
    counters.clear()
    try:
        first = _ksampler(world, compiled)
        graphs = counters["stats"]["unique_graphs"]
        breaks = dict(counters["graph_break"])
        second = _ksampler(world, compiled)
        again = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert not breaks, f"graph breaks: {list(breaks)[:3]}"
    assert graphs == 1, f"{graphs} graphs for one model"
    assert again == graphs, "a second sampling run recompiled"
    assert (first - eager).abs().max() <= 1e-5 and torch.equal(first, second)
    assert (first - _ksampler(world, model)).abs().max() > 1e-3


def test_pag_reuses_the_branch_rows_of_the_same_step(world, monkeypatch):
    """PerturbedAttentionGuidance re-runs the cond rows with the same x, sigma and context in each step: the branch
    runs once per step instead of twice, and the sampled result is the one recomputing gives (fp tolerance: the
    recomputed rows come from a batch of 1 instead of 2: 1e-4 on latents of magnitude ~1)."""
    from comfy_extras import nodes_pag

    inj = pack_module("nodes.injection")
    branch = world["branches"]["painternet"].patcher.model
    calls = []
    handle = branch.register_forward_hook(lambda *_: calls.append(1))
    try:
        def run() -> torch.Tensor:
            calls.clear()
            model = _node(nodes_pag.PerturbedAttentionGuidance, _apply(world, world["model"], "painternet", 1.0),
                          3.0)[0]
            return _ksampler(world, model)

        reused, reused_calls = run(), len(calls)
        monkeypatch.setattr(inj, "REUSE_IDENTICAL_CALLS", False)
        recomputed, recomputed_calls = run(), len(calls)
    finally:
        handle.remove()
    assert (reused_calls, recomputed_calls) == (STEPS, 2 * STEPS)
    assert (reused - recomputed).abs().max() <= 1e-4


def test_new_wrappers_accept_and_forward_unknown_keyword_arguments():
    """The APPLY_MODEL, CALC_COND_BATCH and OUTER_SAMPLE wrappers take and pass on arguments a newer ComfyUI may add."""
    inj = pack_module("nodes.injection")
    future = {"painternet_future_option": object()}
    seen = {}

    def executor(*args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        return "out"

    options: dict = {"sigmas": torch.tensor([5.0])}
    run = inj._Run(torch.zeros(1, 5, 2, 2), None, (10.0, 1.0), (0.0, 1.0), None, None)
    assert inj.make_apply_model_wrapper(7, run)(executor, torch.zeros(1), torch.tensor([5.0]), None, None, None,
                                                options, **future) == "out"
    assert seen["kwargs"] == future and seen["args"][5] is options and inj.ACTIVE not in options
    area_cond = {"uuid": "u", "area": (2, 3, 1, 0)}
    assert inj.calc_cond_batch_wrapper(executor, "model", [[area_cond], None], "x", "t", {"transformer_options": {}},
                                       **future) == "out"
    assert seen["kwargs"] == future and seen["args"][4]["transformer_options"][inj.AREAS] == {"u": (2, 3, 1, 0)}
    cache = inj.BranchRowCache()
    x = torch.zeros(1)
    cache.store(inj.StepToken(x), ("u",), 1, (1,), {"mid": torch.zeros(1)})
    assert inj.make_outer_sample_wrapper(cache, run, types.SimpleNamespace(compute_dtype=torch.float32))(executor, 1, 2, **future) == "out"
    assert seen["kwargs"] == future and cache.calls == []


def test_step_token_under_inference_mode():
    """ComfyUI samples under torch.inference_mode: its tensors have no version counter, and a token must still tell
    the same evaluation (PAG's second call gets the very x and sigma tensors) from the next step (a new sigma)."""
    inj = pack_module("nodes.injection")
    with torch.inference_mode():
        x, sigma = torch.zeros(2, 4, 8, 8), torch.tensor([3.0, 3.0])
        token = inj.StepToken(x, sigma)
        assert token.same(inj.StepToken(x, sigma))
        assert not token.same(inj.StepToken(x, torch.tensor([2.0, 2.0])))
        assert not token.same(inj.StepToken(x.clone(), sigma))
    x = torch.zeros(2)
    token = inj.StepToken(x)
    x.add_(1.0)  # outside inference mode an in-place update is seen through the version counter
    assert not token.same(inj.StepToken(x))
