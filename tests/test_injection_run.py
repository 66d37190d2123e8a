"""The per-run side of the injection (nodes/injection.py) through real ComfyUI samplers on a tiny SD15-detected
model: the branch's own context chosen per cond/uncond chunk, the window taken from the model the sampler uses, PAG
rows shared without value comparisons, and branch reuse across steps (calls counted with a forward hook)."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from harness.comfy_helpers import comfy_model_from_diffusers, pack_module, sampling_options
from painternet_core.branch import PainterNetBranch
from painternet_core.checkpoint import load_branch, save_branch
from painternet_core.config import TINY_SD15_UNET

LATENT = 16


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Any]:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(TINY_SD15_UNET).eval()
    for p in unet.parameters():
        p.data.normal_(0, 0.05)
    branch = PainterNetBranch.from_unet(unet).eval()
    for p in branch.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    path = str(tmp_path_factory.mktemp("run") / "painternet.safetensors")
    save_branch(path, branch.state_dict(), branch.config)
    g = torch.Generator().manual_seed(1)
    condition = torch.randn(1, 5, LATENT, LATENT, generator=g)
    condition[:, 4] = 0.0
    condition[:, 4, 4:12, 3:11] = 1.0
    noise_mask = torch.zeros(1, 1, LATENT * 8, LATENT * 8)
    noise_mask[..., 32:96, 24:88] = 1.0
    return {
        "model": comfy_model_from_diffusers(unet, "sd15"),
        "painternet": pack_module("nodes.branch").build_branch(*load_branch(path), dtype="fp32"),
        "condition": condition,
        "positive": [[torch.randn(1, 7, 32, generator=g), {}]],
        "negative": [[torch.randn(1, 7, 32, generator=g), {}]],
        "latent": {"samples": torch.randn(1, 4, LATENT, LATENT, generator=g), "noise_mask": noise_mask},
    }


def _apply(world: dict[str, Any], model: Any, scale: float = 1.0, start: float = 0.0, end: float = 1.0,
           **kwargs: Any) -> Any:
    return pack_module("nodes.injection").apply_painternet(model, world["painternet"], world["condition"], scale,
                                                           start, end, **kwargs)


def _ksampler(world: dict[str, Any], model: Any, steps: int = 4, cfg: float = 3.0, positive: Any = None,
              sampler: str = "euler") -> torch.Tensor:
    import nodes

    (out,) = nodes.KSampler().sample(model, 7, steps, cfg, sampler, "normal", positive or world["positive"],
                                     world["negative"], world["latent"], denoise=1.0)
    return out["samples"]


class _Calls:
    """Forward hook on the branch: one entry per branch run, with the context rows it got."""

    def __init__(self, world: dict[str, Any]) -> None:
        self.branch = world["painternet"].patcher.model
        self.contexts: list[torch.Tensor] = []

    def __enter__(self) -> _Calls:
        self.handle = self.branch.register_forward_hook(lambda m, args, out: self.contexts.append(args[2]))
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()

    def __len__(self) -> int:
        return len(self.contexts)


def _context(world: dict[str, Any]) -> Any:
    g = torch.Generator().manual_seed(9)
    return pack_module("nodes.injection").BranchContext(torch.randn(1, 5, 32, generator=g),
                                                        torch.randn(1, 5, 32, generator=g))


@pytest.mark.parametrize("cond_or_uncond", [[1, 0], [0, 1], [0], [1]])
def test_branch_context_is_chosen_per_chunk_by_cond_or_uncond(world, cond_or_uncond):
    """Each chunk's rows get cond (0) or uncond (1) whatever their batch position; batch of 2 rows per chunk."""
    import comfy.model_management as mm

    ctx = _context(world)
    patched = _apply(world, world["model"], branch_context=ctx)
    mm.load_models_gpu([patched] + patched.get_nested_additional_models())
    n = 2 * len(cond_or_uncond)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 4, LATENT, LATENT, generator=g)
    with _Calls(world) as calls, torch.no_grad():
        patched.model.diffusion_model(x, torch.tensor([400.0] * n), context=torch.randn(n, 7, 32, generator=g),
                                      transformer_options=sampling_options(patched, 1.0, cond_or_uncond))
    (got,) = calls.contexts
    want = torch.cat([(ctx.cond if k == 0 else ctx.uncond).expand(2, -1, -1) for k in cond_or_uncond])
    assert torch.equal(got, want)


def test_branch_context_at_cfg_1_is_the_cond_context(world):
    """At cfg 1 ComfyUI runs the cond chunk alone ([0]): the branch must get `cond`, never the uncond context that
    batch position 0 holds at cfg > 1."""
    ctx = _context(world)
    with _Calls(world) as calls:
        _ksampler(world, _apply(world, world["model"], branch_context=ctx), steps=2, cfg=1.0)
    assert len(calls) == 2 and all(torch.equal(c, ctx.cond) for c in calls.contexts)
    with _Calls(world) as calls:
        _ksampler(world, _apply(world, world["model"], branch_context=ctx), steps=2, cfg=3.0)
    assert len(calls) == 2 and all(torch.equal(c, torch.cat([ctx.uncond, ctx.cond])) for c in calls.contexts)


def test_without_branch_context_the_branch_sees_the_base_context(world):
    with _Calls(world) as calls:
        _ksampler(world, _apply(world, world["model"]), steps=1, cfg=3.0)
    want = torch.cat([world["negative"][0][0], world["positive"][0][0]])
    assert torch.equal(calls.contexts[0], want)


@pytest.mark.parametrize("cond,uncond,message", [
    ((5, 32), (1, 5, 32), "BranchContext.cond is (5, 32); expected a (1, tokens, channels) tensor"),
    ((1, 32), (1, 32), "BranchContext.cond is (1, 32); expected a (1, tokens, channels) tensor"),
    ((1, 5, 32, 1), (1, 5, 32, 1), "BranchContext.cond is (1, 5, 32, 1); expected a (1, tokens, channels) tensor"),
    ((1, 5, 32), (2, 5, 32), "BranchContext.uncond is (2, 5, 32); expected a (1, tokens, channels) tensor"),
    ((1, 5, 32), "list", "BranchContext.uncond is list; expected a (1, tokens, channels) tensor"),
    ((1, 5, 32), (1, 6, 32), "BranchContext cond (1, 5, 32) and uncond (1, 6, 32) differ; encode both to the same "
                             "token count"),
])
def test_bad_branch_context_is_refused(cond, uncond, message):
    inj = pack_module("nodes.injection")
    with pytest.raises(ValueError) as refused:
        inj.BranchContext(torch.zeros(cond), [] if uncond == "list" else torch.zeros(uncond))
    assert str(refused.value) == message


def test_branch_context_rows_follow_cond_or_uncond_without_copying_one_chunk():
    inj = pack_module("nodes.injection")
    context = inj.BranchContext(torch.zeros(1, 3, 4), torch.ones(1, 3, 4))
    assert torch.equal(inj._branch_context(context, 2, {}), torch.zeros(2, 3, 4))  # no cond_or_uncond: cond
    alone = inj._branch_context(context, 2, {"cond_or_uncond": [1]})
    assert torch.equal(alone, torch.ones(2, 3, 4)) and alone.stride(0) == 0  # the expanded view, not a copy
    both = inj._branch_context(context, 4, {"cond_or_uncond": [1, 0]})
    assert torch.equal(both, torch.cat([torch.ones(2, 3, 4), torch.zeros(2, 3, 4)]))
    with pytest.raises(ValueError) as refused:
        inj._branch_context(context, 2, {"cond_or_uncond": [2]})
    assert str(refused.value) == "cond_or_uncond entry 2: a branch context knows cond (0) and uncond (1) only"


@pytest.mark.parametrize("shape,size,mode", [
    ((1, 2, 6, 4), (2, 4), "area"),  # shrinks the height, keeps the width
    ((1, 1, 2, 9), (2, 3), "area"),  # keeps the height, shrinks the width below the old height
    ((1, 1, 3, 9), (2, 12), "bilinear"),  # shrinks one side, grows the other
    ((1, 1, 4, 5), (6, 5), "bilinear"),
])
def test_residual_maps_shrink_by_area_and_grow_bilinearly(shape, size, mode):
    """Non-square maps and factor-3 shrinks, where area and bilinear differ (at factor 2 they agree)."""
    import torch.nn.functional as F

    residual = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    kwargs = {} if mode == "area" else {"align_corners": False}
    want = F.interpolate(residual, size=size, mode=mode, **kwargs)
    other = F.interpolate(residual, size=size, mode="bilinear" if mode == "area" else "area")
    got = pack_module("nodes.injection").resize_map(residual, size)
    assert torch.equal(got, want) and not torch.allclose(got, other)


@pytest.mark.parametrize("tokens,latent,grid", [
    (1, (1, 8), (1, 1)), (1, (2, 1), (1, 1)), (1, (1, 2), (1, 1)), (2, (2, 4), (1, 2)), (8, (1, 8), (1, 8)),
    (0, (7, 13), None), (3, (1, 8), None),
])
def test_token_grid_halves_each_side_down_to_one(tokens, latent, grid):
    assert pack_module("nodes.injection")._token_grid(tokens, latent) == grid


def test_conflict_names_the_other_packs_patches_and_not_ours():
    """The error names every foreign patch on the hook (a function, a callable object, the function of a
    (class, function) pair, an object with no module) and leaves out the pack's own."""
    import functools

    inj = pack_module("nodes.injection")

    def widen(h: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return h

    tail = ("Set that patch so it keeps the channels and the batch size (a changed spatial size is followed), or use "
            "it on a model without PainterNet")
    residual, h = torch.zeros(2, 32, 8, 8), torch.zeros(2, 64, 8, 8)
    patches = {"input_block_patch": [inj.input_block_patch, widen, functools.partial(widen), (1).__add__],
               "forward_timestep_embed_patch": [(inj.UpsampleHolder, inj.holder_patch), (torch.nn.Identity, widen)]}
    message = str(inj._conflict(residual, h, "input block 4", {"patches": patches}, "input_block_patch"))
    here = f"{__name__}.test_conflict_names_the_other_packs_patches_and_not_ours.<locals>.widen"
    assert message == ("PainterNet residual of shape (2, 32, 8, 8) cannot join the model's hidden state (2, 64, 8, 8) at "
                       "input block 4: another model patch changed it in a way the branch cannot follow (other "
                       f"input_block_patch patches: {here}, functools.partial, ?.int.__add__). " + tail)
    embed = str(inj._conflict(residual, h, "the last output block", {"patches": patches},
                              "forward_timestep_embed_patch"))
    assert f"(other forward_timestep_embed_patch patches: {here}). Set" in embed
    for options in ({}, {"patches": {}}, {"patches": {"input_block_patch": [inj.input_block_patch]}}):
        message = str(inj._conflict(residual, h, "input block 4", options, "input_block_patch"))
        assert "(other input_block_patch patches: none registered on this hook). " + tail in message


@pytest.mark.parametrize("order", ["sampling-after-apply", "sampling-before-apply"])
def test_window_comes_from_the_model_the_sampler_uses(world, order):
    """ModelSamplingContinuousEDM (sigma 120 -> 0.002) placed after Apply changes the model the sampler uses: the
    branch runs on the steps whose sigma lies in the window under *that* model_sampling, in both graph orders."""
    from comfy_extras import nodes_model_advanced

    def edm(m: Any) -> Any:
        return nodes_model_advanced.ModelSamplingContinuousEDM().patch(m, "eps", 120.0, 0.002)[0]

    model = edm(_apply(world, world["model"], end=0.5)) if order == "sampling-after-apply" \
        else _apply(world, edm(world["model"]), end=0.5)
    import comfy.samplers

    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", 10)[:-1]
    end = float(sampling.percent_to_sigma(0.5))
    want = sum(1 for s in sigmas if float(s) >= end)
    with _Calls(world) as calls:
        _ksampler(world, model, steps=10)
    assert len(calls) == want
    # The apply-time model (plain SD1.5 discrete sampling) would give another count: the test can tell them apart.
    apply_time = world["model"].get_model_object("model_sampling").percent_to_sigma(0.5)
    assert sum(1 for s in sigmas if float(s) >= float(apply_time)) != want


def test_pag_shares_rows_without_comparing_values(world, monkeypatch):
    """PerturbedAttentionGuidance re-runs the cond rows in each step: the branch runs once per step, and deciding
    so compares no tensor values (each torch.equal / item would be a device->host sync)."""
    from comfy_extras import nodes_pag

    inj = pack_module("nodes.injection")
    pag = nodes_pag.PerturbedAttentionGuidance.execute(_apply(world, world["model"]), 3.0).result[0]
    compared = []
    real_equal = torch.equal
    monkeypatch.setattr(torch, "equal", lambda a, b: compared.append(1) or real_equal(a, b))
    with _Calls(world) as calls:
        reused = _ksampler(world, pag, steps=3)
    assert len(calls) == 3 and compared == []
    monkeypatch.setattr(inj, "REUSE_IDENTICAL_CALLS", False)
    with _Calls(world) as calls:
        recomputed = _ksampler(world, pag, steps=3)
    assert len(calls) == 6
    assert (reused - recomputed).abs().max() <= 1e-4


def _reuse(every: int, max_change: float | None = None) -> Any:
    return pack_module("nodes.injection").BranchReuse(every=every, max_change=max_change)


class _Seen:
    """An input_block_patch after the pack's: where the residuals the base got in each call live (data_ptr)."""

    def __init__(self, model: Any) -> None:
        self.sets: list[int] = []
        inj = pack_module("nodes.injection")

        def record(h: torch.Tensor, transformer_options: dict[str, Any], **kwargs: Any) -> torch.Tensor:
            if transformer_options["block"][1] == 0:
                self.sets.append(transformer_options[inj.RESIDUALS][0][0]["down"][0].data_ptr())
            return h

        self.model = model.clone()
        self.model.set_model_input_block_patch(record)


@pytest.mark.parametrize("every", [2, 3])
def test_reuse_every_n_skips_the_branch_and_reuses_the_last_residuals(world, every):
    steps = 6
    seen = _Seen(_apply(world, world["model"], reuse=_reuse(every)))
    with _Calls(world) as calls:
        reused = _ksampler(world, seen.model, steps=steps)
    assert len(calls) == len(range(0, steps, every))
    runs = [s for s in range(steps) if s % every == 0]
    # Each skipped step hands the base the very residuals of the last run (same tensors, not copies).
    for step in range(steps):
        last_run = max(r for r in runs if r <= step)
        assert seen.sets[step] == seen.sets[last_run]
    off = _ksampler(world, _apply(world, world["model"]), steps=steps)
    assert torch.isfinite(reused).all() and (reused - off).abs().max() > 1e-6


def test_reuse_off_and_every_1_are_exact(world):
    off = _ksampler(world, _apply(world, world["model"]), steps=3)
    with _Calls(world) as calls:
        every_1 = _ksampler(world, _apply(world, world["model"], reuse=_reuse(1)), steps=3)
    assert torch.equal(off, every_1) and len(calls) == 3
    base = _ksampler(world, world["model"], steps=3)
    with _Calls(world) as calls:
        scale_0 = _ksampler(world, _apply(world, world["model"], scale=0.0, reuse=_reuse(2)), steps=3)
    assert torch.equal(base, scale_0) and len(calls) == 0


def test_adaptive_reuse_runs_when_the_input_moved(world):
    """max_change 0: any move re-runs the branch (= reuse off, bit-exact); a huge max_change leaves the cadence
    alone (= every N). (On this 6-step schedule the scaled latent moves > 15 % per step, so a middle threshold
    re-runs every step: the adaptive preset's 5 % is not calibrated on longer schedules yet.)"""
    steps = 6
    off = _ksampler(world, _apply(world, world["model"]), steps=steps)
    with _Calls(world) as calls:
        always = _ksampler(world, _apply(world, world["model"], reuse=_reuse(3, 0.0)), steps=steps)
    assert torch.equal(always, off) and len(calls) == steps
    every = _ksampler(world, _apply(world, world["model"], reuse=_reuse(3)), steps=steps)
    with _Calls(world) as calls:
        never = _ksampler(world, _apply(world, world["model"], reuse=_reuse(3, 1e9)), steps=steps)
    assert torch.equal(never, every) and len(calls) == 2


def test_reuse_follows_the_window_and_pag(world):
    """The cadence counts steps inside the window only; PAG's extra call in a step shares that step's rows."""
    from comfy_extras import nodes_pag

    steps = 6
    with _Calls(world) as calls:
        _ksampler(world, _apply(world, world["model"], start=0.5, reuse=_reuse(2)), steps=steps)
    import comfy.samplers

    sampling = world["model"].get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", steps)[:-1]
    in_window = sum(1 for s in sigmas if float(s) <= float(sampling.percent_to_sigma(0.5)))
    assert 0 < in_window < steps and len(calls) == (in_window + 1) // 2
    pag = nodes_pag.PerturbedAttentionGuidance.execute(_apply(world, world["model"], reuse=_reuse(2)), 3.0).result[0]
    with _Calls(world) as calls:
        _ksampler(world, pag, steps=4)
    assert len(calls) == 2


def test_reuse_with_area_conditioning_and_a_batch(world):
    """Area conds run as separate chunks on crops; each keeps its own reused rows (per cond uuid): every 2 over 4
    steps runs the branch exactly half as often as off, batch of 2 latents."""
    import nodes

    area = nodes.ConditioningSetArea().append(world["positive"], 64, 64, 0, 0, 1.0)[0]
    both = world["positive"] + area
    batch = dict(world["latent"], samples=world["latent"]["samples"].repeat(2, 1, 1, 1))

    def sample(model: Any) -> tuple[torch.Tensor, int]:
        with _Calls(world) as calls:
            (out,) = nodes.KSampler().sample(model, 7, 4, 3.0, "euler", "normal", both, world["negative"], batch,
                                             denoise=1.0)
        return out["samples"], len(calls)

    reused, reused_calls = sample(_apply(world, world["model"], reuse=_reuse(2)))
    _, off_calls = sample(_apply(world, world["model"]))
    assert off_calls >= 4 and reused_calls * 2 == off_calls
    assert torch.isfinite(reused).all()
