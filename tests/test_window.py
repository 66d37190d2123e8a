"""The start/end window under every ModelSampling node (issue 25): the branch runs on the same sampler steps whether
the ModelSampling node comes before or after PainterNetApply, and those steps are the ones the percents give under
the model_sampling of the model being sampled (ControlNet's rule: percents converted when sampling starts).

Counted, not inferred: a forward pre-hook on the branch marks the sampler steps on which it ran (euler, cfg 1, so one
model call per step), on the tiny SD15-detected model of test_compat.
"""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from test_compat import world  # noqa: F401  (fixture)

STEPS = 6
START, END = 0.2, 0.6


def _sampling_nodes() -> dict[str, Callable[[Any], Any]]:
    from comfy_extras import nodes_model_advanced as adv

    def node(cls: Any, *args: Any) -> Callable[[Any], Any]:
        return lambda model: getattr(cls(), cls.FUNCTION)(model, *args)[0]

    return {
        "Discrete eps": node(adv.ModelSamplingDiscrete, "eps", False),
        "Discrete v_prediction zsnr": node(adv.ModelSamplingDiscrete, "v_prediction", True),
        "Discrete lcm": node(adv.ModelSamplingDiscrete, "lcm", False),
        "ContinuousEDM eps 120-0.002": node(adv.ModelSamplingContinuousEDM, "eps", 120.0, 0.002),
        "ContinuousEDM v_prediction": node(adv.ModelSamplingContinuousEDM, "v_prediction", 120.0, 0.002),
        "ContinuousV": node(adv.ModelSamplingContinuousV, "v_prediction", 500.0, 0.03),
        "SD3 shift 3": node(adv.ModelSamplingSD3, 3.0),
    }


SAMPLING = ["Discrete eps", "Discrete v_prediction zsnr", "Discrete lcm", "ContinuousEDM eps 120-0.002",
            "ContinuousEDM v_prediction", "ContinuousV", "SD3 shift 3"]


def _branch_steps(world: dict[str, Any], model: Any) -> list[int]:
    """Sample STEPS euler steps with cfg 1 and return the steps on which the branch ran."""
    import comfy.patcher_extension
    import nodes

    calls: list[list[Any]] = []

    def record(executor: Any, x: torch.Tensor, t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append([float(t.reshape(-1)[0]), False])  # apply_model's t is the sigma
        return executor(x, t, *args, **kwargs)

    model = model.clone()
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test-window", record)
    branch = world["branches"]["painternet"].patcher.model
    hook = branch.register_forward_pre_hook(lambda module, args: calls[-1].__setitem__(1, True))
    try:
        nodes.KSampler().sample(model, 5, STEPS, 1.0, "euler", "normal", world["positive"], world["negative"],
                                world["latent"], denoise=1.0)
    finally:
        hook.remove()
    assert len(calls) == STEPS
    return [i for i, (_, ran) in enumerate(calls) if ran]


def _expected(model: Any) -> list[int]:
    """The steps whose sigma lies in [sigma(end), sigma(start)] under the model's own model_sampling."""
    import comfy.samplers

    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", STEPS)
    high, low = float(sampling.percent_to_sigma(START)), float(sampling.percent_to_sigma(END))
    return [i for i in range(STEPS) if low <= float(sigmas[i]) <= high]


@pytest.mark.parametrize("name", SAMPLING)
def test_window_is_the_same_in_both_graph_orders_and_follows_the_sampler(world, name):  # noqa: F811
    from harness.comfy_helpers import pack_module

    injection = pack_module("nodes.injection")

    def apply(model: Any) -> Any:
        return injection.apply_painternet(model, world["branches"]["painternet"], world["condition"], 1.0, START, END)

    patch = _sampling_nodes()[name]
    before = patch(world["model"])  # ModelSampling node, then Apply
    after = patch(apply(world["model"]))  # Apply, then the ModelSampling node
    expected = _expected(after)
    assert expected == _expected(apply(before))
    assert 0 < len(expected) < STEPS  # the window matters for this schedule
    assert _branch_steps(world, apply(before)) == expected
    assert _branch_steps(world, after) == expected
