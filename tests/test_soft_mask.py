"""Soft masks and Differential Diffusion (issue 25): PainterNetApply gives the branch the binary hole it was trained on
and the sampler the mask as drawn, so ComfyUI's DifferentialDiffusion gets a graded edge. Real ComfyUI nodes called
in-process on the tiny SD1.5 checkpoint (96² image, 2 steps)."""
from __future__ import annotations

import os
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from harness.comfy_helpers import load_pack

SIZE = 96
STEPS = 2


def _node(cls: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a ComfyUI node the way the executor would: V3 nodes through `execute`, V1 through FUNCTION."""
    if hasattr(cls, "FUNCTION"):
        return getattr(cls(), cls.FUNCTION)(*args, **kwargs)
    return cls.execute(*args, **kwargs).result


@pytest.fixture(scope="module")
def world() -> dict[str, Any]:
    import folder_paths

    from harness.models import MODELS, branch_file, load_checkpoint, sd15_checkpoint

    model, _, vae = load_checkpoint(sd15_checkpoint())
    name = os.path.basename(branch_file("sd15", "tiny-sd15-320-branch.safetensors"))
    folder_paths.add_model_folder_path("painternet", MODELS)
    mappings = load_pack()
    (painternet,) = _node(mappings["PainterNetLoader"], name, "fp32")
    g = torch.Generator().manual_seed(0)
    hole = np.zeros((SIZE, SIZE), np.float32)
    hole[24:72, 30:78] = 1.0
    soft = cv2.GaussianBlur(hole, (0, 0), 4.0)  # a feathered mask: about two thousand values strictly inside (0, 1)
    return {
        "model": model, "vae": vae, "painternet": painternet, "apply": mappings["PainterNetApply"],
        "image": torch.rand(1, SIZE, SIZE, 3, generator=g),
        "soft": torch.from_numpy(soft)[None], "binary": torch.from_numpy(hole)[None],
        "positive": [[torch.randn(1, 77, 768, generator=g), {}]],
        "negative": [[torch.randn(1, 77, 768, generator=g), {}]],
    }


def _apply(world: dict[str, Any], model: Any, mask: torch.Tensor, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    patched, _, _, latent = _node(world["apply"], model, world["vae"], world["image"], mask, world["painternet"],
                                  world["positive"], world["negative"], 1.0, 0.0, 1.0, **kwargs)
    return patched, latent


def _diffdiff(model: Any) -> Any:
    from comfy_extras.nodes_differential_diffusion import DifferentialDiffusion

    (out,) = _node(DifferentialDiffusion, model)
    return out


def _sample(world: dict[str, Any], model: Any, latent: dict[str, Any]) -> torch.Tensor:
    import nodes

    (out,) = nodes.KSampler().sample(model, 11, STEPS, 2.5, "euler", "normal", world["positive"], world["negative"],
                                     latent, denoise=1.0)
    return out["samples"]


def _set_noise_mask(latent: dict[str, Any], mask: torch.Tensor) -> dict[str, Any]:
    import nodes

    (out,) = nodes.SetLatentNoiseMask().set_mask(latent, mask)
    return out


def test_apply_latent_keeps_the_soft_values_and_the_branch_gets_the_binary_hole(world):
    soft = world["soft"]
    assert int(((soft > 0) & (soft < 1)).sum()) > 1000
    _, latent = _apply(world, world["model"], soft)
    assert torch.equal(latent["noise_mask"].reshape(soft.shape), soft)
    _, latent_b = _apply(world, world["model"], soft, noise_mask="binary")
    assert torch.equal(latent_b["noise_mask"].reshape(soft.shape), (soft > 0.5).float())
    _, clamped = _apply(world, world["model"], soft * 3.0 - 1.0)
    assert torch.equal(clamped["noise_mask"].reshape(soft.shape), (soft * 3.0 - 1.0).clamp(0, 1))
    with pytest.raises(ValueError, match="noise_mask"):
        _apply(world, world["model"], soft, noise_mask="fuzzy")


@pytest.mark.parametrize("order", ["diffdiff-then-apply", "apply-then-diffdiff"])
def test_diffdiff_on_apply_latent_equals_set_latent_noise_mask_after_apply(world, order):
    """Graph A: Apply (noise_mask soft) → DifferentialDiffusion → KSampler. Graph B: the same with Apply's latent
    re-masked by SetLatentNoiseMask(soft mask). Bit-exact, in both graph orders; and the soft mask matters (the
    binary noise mask gives another result, by far more than the soft mask's own effect without DiffDiff)."""
    def model_and_latent(noise_mask: str) -> tuple[Any, dict[str, Any]]:
        if order == "diffdiff-then-apply":
            return _apply(world, _diffdiff(world["model"]), world["soft"], noise_mask=noise_mask)
        patched, latent = _apply(world, world["model"], world["soft"], noise_mask=noise_mask)
        return _diffdiff(patched), latent

    model, latent = model_and_latent("soft")
    out = _sample(world, model, latent)
    model_b, latent_b = model_and_latent("binary")
    reference = _sample(world, model_b, _set_noise_mask(latent_b, world["soft"]))
    assert torch.isfinite(out).all()
    assert torch.equal(out, reference)
    if order == "apply-then-diffdiff":
        binary = _sample(world, model_b, latent_b)
        assert (out - binary).abs().sum() > 1.0  # DiffDiff now sees the soft edge (binarised, it had little effect)


def test_binary_masks_behave_as_before(world):
    """A binary mask gives the same latent in both modes and the same samples with or without DiffDiff's soft path."""
    patched, latent = _apply(world, world["model"], world["binary"])
    patched_b, latent_b = _apply(world, world["model"], world["binary"], noise_mask="binary")
    assert torch.equal(latent["noise_mask"], latent_b["noise_mask"])
    assert torch.equal(latent["samples"], latent_b["samples"])
    assert torch.equal(_sample(world, _diffdiff(patched), latent), _sample(world, _diffdiff(patched_b), latent_b))


@pytest.mark.parametrize("image, message", [
    (torch.zeros(0, SIZE, SIZE, 3), "PainterNetApply: image batch is empty"),
    (torch.zeros(1, SIZE, SIZE, 5), "PainterNetApply: image has 5 channels"),
])
def test_apply_refuses_an_empty_batch_or_odd_channels(world, image, message):
    with pytest.raises(ValueError, match=message):
        _node(world["apply"], world["model"], world["vae"], image, world["soft"], world["painternet"],
              world["positive"], world["negative"], 1.0, 0.0, 1.0)
