"""Branch reuse across steps (issue 23): the core rule (`painternet_core.reuse`) and the diffusers sampler that uses
it (`training.inference.inpaint`), on a tiny SD1.5 base. The ComfyUI side is tested in test_injection_run.py."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from painternet_core.reuse import PRESETS, BranchReuse, ReuseSchedule, relative_change, reuse_preset


def _decisions(rule: BranchReuse | None, inputs: list[torch.Tensor]) -> list[bool]:
    schedule = ReuseSchedule(rule)
    return [schedule.runs_branch(float(step), lambda x=x: x) for step, x in enumerate(inputs)]


def test_every_n_runs_the_first_step_then_every_nth():
    inputs = [torch.full((2,), float(i + 1)) for i in range(7)]
    assert _decisions(None, inputs) == [True] * 7
    assert _decisions(BranchReuse(1), inputs) == [True] * 7
    assert _decisions(BranchReuse(2), inputs) == [True, False, True, False, True, False, True]
    assert _decisions(BranchReuse(3), inputs) == [True, False, False, True, False, False, True]


def test_one_decision_per_step_key():
    """Calls sharing a step (split cond/uncond, PAG) get that step's decision; the input is read once per step."""
    reads = []
    schedule = ReuseSchedule(BranchReuse(2, max_change=10.0))

    def read(value: float) -> Any:
        return lambda: reads.append(value) or torch.full((3,), value)

    got = [schedule.runs_branch(s, read(s)) for s in (9.0, 9.0, 8.0, 8.0, 7.0)]
    assert got == [True, True, False, False, True] and reads == [9.0, 8.0, 7.0]
    assert schedule.evaluations == 3 and schedule.runs == 2


def test_adaptive_runs_when_the_input_moved_since_the_last_run():
    """The change is measured against the input of the last *run*, so slow drifts add up until they re-run it."""
    inputs = [torch.ones(4) * v for v in (1.0, 1.02, 1.04, 1.06, 1.08, 1.30)]
    # Since the last run: .02, .04, .06 -> run; then .019, .226 -> run. The cadence caps the skips: every 3.
    assert _decisions(BranchReuse(10, max_change=0.05), inputs) == [True, False, False, True, False, True]
    assert _decisions(BranchReuse(2, max_change=0.05), inputs) == [True, False, True, False, True, True]
    assert _decisions(BranchReuse(3, max_change=0.0), inputs) == [True] * 6
    assert _decisions(BranchReuse(3, max_change=1e9), inputs) == _decisions(BranchReuse(3), inputs)
    assert relative_change(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 5.0])) == pytest.approx(
        float(torch.tensor([3.0, -1.0]).norm() / 5.0))


def test_rules_and_presets_refuse_bad_values():
    for bad in (0, 1.5, True, -2):
        with pytest.raises(ValueError, match="BranchReuse.every"):
            BranchReuse(every=bad)
    with pytest.raises(ValueError, match="max_change"):
        BranchReuse(2, max_change=float("nan"))
    with pytest.raises(ValueError, match="every_4"):
        reuse_preset("every_4")
    assert list(PRESETS) == ["off", "every_2", "every_3", "adaptive"] and reuse_preset("off") is None


def test_node_choices_are_the_core_presets():
    """PainterNetApply's branch_reuse options are a node contract; each must name a core preset (read with ast,
    so this test needs no ComfyUI)."""
    import ast

    source = (Path(__file__).resolve().parent.parent / "nodes" / "painternet_nodes.py").read_text(encoding="utf-8")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "BRANCH_REUSE" for t in node.targets):
            assert tuple(ast.literal_eval(node.value)) == tuple(PRESETS)
            return
    raise AssertionError("BRANCH_REUSE not found in nodes/painternet_nodes.py")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """A tiny SD1.5 diffusers base and a branch of it with non-zero control points (a zero branch would make reuse
    invisible), in eval mode."""
    from painternet_core.branch import PainterNetBranch
    from training.inference import load_base_model
    from training.trainer.presets import save_tiny_pipeline

    root = tmp_path_factory.mktemp("reuse")
    save_tiny_pipeline(root / "base", "sd15", seed=0)
    base = load_base_model(root / "base")
    base.freeze_to(torch.device("cpu"), torch.float32)
    branch = PainterNetBranch.from_unet(base.unet, attention_control=True).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in branch.named_parameters():
            if name.startswith(("layer_control", "attention_control")):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return base, branch


def _scene() -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.rand((1, 3, 64, 64), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros((1, 1, 64, 64))
    mask[..., 16:48, 8:40] = 1.0
    return image, mask


@torch.no_grad()
def _reference(base: Any, branch: Any, image: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """The loop before reuse existed: the core's reference forward (branch, then base with residuals) each step."""
    import torch.nn.functional as F
    from diffusers import DDIMScheduler

    from painternet_core.branch import painternet_unet_forward
    from painternet_core.conditioning import prepare_condition
    from training.inference import encode_prompts, vae_encoder

    scheduler = DDIMScheduler.from_config(base.noise_scheduler.config)
    scheduler.set_timesteps(steps)
    text = [encode_prompts(base, ["red"], torch.tensor([d]), torch.device("cpu"), torch.float32).hidden_states
            for d in (True, False)]
    hidden = torch.cat(text)
    condition = prepare_condition(image, mask, vae_encoder(base.vae, sample=False), branch.config)
    condition = torch.cat([condition, condition])
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(5)) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        uncond, cond = painternet_unet_forward(base.unet, branch, model_in, t, hidden, condition).chunk(2)
        latents = scheduler.step(uncond + 5.0 * (cond - uncond), t, latents).prev_sample
    decoded = base.vae.decode(latents / base.vae.config.scaling_factor).sample
    decoded = ((decoded + 1) / 2).clamp(0, 1)
    hole = (F.interpolate(mask, size=decoded.shape[-2:], mode="nearest") > 0.5).float()
    return decoded * hole + image * (1 - hole)


def test_diffusers_sampler_reuse_skips_branch_calls_and_is_exact_when_off(tiny, monkeypatch):
    from training.inference import inpaint

    base, branch = tiny
    image, mask = _scene()
    steps = 5
    calls = []
    forward = branch.forward
    monkeypatch.setattr(branch, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))

    def sample(**kwargs: Any) -> tuple[torch.Tensor, int]:
        calls.clear()
        out = inpaint(base, branch, image, mask, "red", config=branch.config, seed=5, num_inference_steps=steps,
                      guidance_scale=5.0, **kwargs)
        return out, len(calls)

    off, off_calls = sample()
    assert off_calls == steps
    assert torch.equal(off, _reference(base, branch, image, mask, steps))
    every_1, every_1_calls = sample(reuse=BranchReuse(1))
    assert torch.equal(every_1, off) and every_1_calls == steps
    every_2, every_2_calls = sample(reuse=BranchReuse(2))
    assert every_2_calls == 3 and not torch.equal(every_2, off)
    schedule = ReuseSchedule(BranchReuse(3))
    every_3, every_3_calls = sample(schedule=schedule)
    assert every_3_calls == schedule.runs == 2 and schedule.evaluations == steps
    always = ReuseSchedule(BranchReuse(3, max_change=0.0))
    adaptive, adaptive_calls = sample(schedule=always)
    assert torch.equal(adaptive, off) and adaptive_calls == steps
    with pytest.raises(ValueError, match="both reuse and schedule"):
        sample(reuse=BranchReuse(2), schedule=ReuseSchedule(None))
