"""The trainer's step (paper §3.3, DESIGN §7): the loss L = L_diff + β·L_ATAL of one micro-batch
(:func:`compute_loss`) and one full training step (:func:`train_step`: loss, backward, clipping, optimizer and
scheduler step), with the per-step generator that makes resumes exact. ``training/trainer/train.py`` only
orchestrates these.

Why public functions and not inline in the script: the tests and the benchmarks (``bench/gpu_train.py``, GPU
benches) run exactly the trainer's step (same condition prep, same loss, same injection, same optimizer step), so a
number measured there is a number of the trainer.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from painternet_core.atal import ATALRecorder, atal_loss
from painternet_core.branch import injected
from painternet_core.conditioning import prepare_condition
from training.inference import BaseModel, cpu_randn, encode_prompts, vae_encoder

logger = logging.getLogger("painternet.training")

__all__ = [
    "StepOutput",
    "step_generator",
    "compute_loss",
    "train_step",
]


# ------------------------------------------------------------------------------------------------------------ step
@dataclass
class StepOutput:
    """Loss terms of one micro-batch. ``loss`` carries the graph; the rest are detached for logging."""

    loss: torch.Tensor
    l_diff: torch.Tensor
    l_atal: torch.Tensor
    l_atal_weighted: torch.Tensor
    prediction: torch.Tensor = field(repr=False)


def step_generator(seed: int, micro_step: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator of one micro-batch's noise, timesteps, prompt dropout and VAE sampling.

    Why seeded by the micro-step index and rank instead of a running RNG: a run resumed from a checkpoint draws
    exactly what an uninterrupted run draws at the same step, whatever happened before (validation, a crash).
    """
    import numpy as np

    state = np.random.SeedSequence([int(seed), int(micro_step), int(rank), 0x5EED]).generate_state(1, np.uint64)[0]
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)
    return generator


@contextlib.contextmanager
def _maybe_record(recorder: ATALRecorder | None, token_mask: torch.Tensor) -> Iterator[None]:
    if recorder is None:
        yield
    else:
        with recorder.record(token_mask):
            yield


def compute_loss(
    base: BaseModel,
    branch: nn.Module,
    batch: dict[str, Any],
    generator: torch.Generator,
    *,
    config: Any,
    weight_dtype: torch.dtype,
    recorder: ATALRecorder | None,
    beta: float,
    prompt_dropout: float,
    backward: Callable[[torch.Tensor], None] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> StepOutput:
    """One micro-batch: L = mse(pred, target) + β·L_ATAL, optionally followed by ``backward(loss)``.

    Why backward happens in here: two things must stay alive until the backward pass has run — the ATAL recorder
    (non-reentrant checkpointing recomputes the branch's attention and must see the same token mask) and the residual
    hooks on the base UNet (with UNet gradient checkpointing its blocks are recomputed, and without the hooks the
    recomputed activations would lack the residuals, silently corrupting the gradient). So the base forward is run
    inside ``injected(...)`` here rather than through ``painternet_unet_forward``, whose context closes on return;
    the prediction is the same (the parity test checks it against ``painternet_unet_forward``).
    ``branch`` may be the accelerate-prepared wrapper (DDP/ZeRO/FSDP): it is only ever called, never unwrapped.
    """
    device = batch["pixel_values"].device
    pixels = batch["pixel_values"]
    mask = batch["mask"]
    bsz = pixels.shape[0]
    dropped = torch.rand(bsz, generator=generator) < prompt_dropout
    text = encode_prompts(base, batch["prompt"], dropped, device, weight_dtype, batch)

    with torch.no_grad():
        image01 = (pixels.float() + 1) / 2
        latents = vae_encoder(base.vae, True, generator)(image01).to(weight_dtype)
        # The node's untrusted-input checks are not run here: each is a device sync, and the data pipeline checks
        # the samples it yields.
        condition = prepare_condition(image01, mask, vae_encoder(base.vae, True, generator), config,
                                      check_values=False).to(weight_dtype)
        noise = cpu_randn(latents.shape, generator, device, weight_dtype)
        scheduler = base.noise_scheduler
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (bsz,), generator=generator).to(device)
        noisy = scheduler.add_noise(latents.float(), noise.float(), timesteps).to(weight_dtype)
        prediction_type = scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise.float()
        elif prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents.float(), noise.float(), timesteps)
        else:
            raise ValueError(f"scheduler prediction_type {prediction_type!r} is not supported; PainterNet trains "
                             "epsilon or v_prediction bases.")

    # The ATAL map is only meaningful for samples whose prompt survived dropout, has actual tokens and describes the
    # hole (a scene caption used as a fallback does not: its tokens would be pulled into the hole).
    valid = ~dropped.to(device) & text.token_mask.any(dim=1)
    if "atal" in batch:
        valid = valid & torch.as_tensor(batch["atal"], dtype=torch.bool).to(device)
    with _maybe_record(recorder, text.token_mask):
        with autocast():
            residuals = branch(noisy, timesteps, text.hidden_states, condition, text.added_cond_kwargs)
        with injected(base.unet, residuals, 1.0):
            with autocast():
                pred = base.unet(noisy, timesteps, encoder_hidden_states=text.hidden_states,
                                 added_cond_kwargs=text.added_cond_kwargs).sample
                l_diff = F.mse_loss(pred.float(), target, reduction="mean")
                if recorder is not None:
                    l_atal = atal_loss(recorder.ordered_maps(), mask.float(), valid)
                else:
                    l_atal = torch.zeros((), device=device)
                loss = l_diff + beta * l_atal
            # Outside autocast, as torch.amp asks: backward ops run in the dtype their forward chose (checkpointed
            # blocks re-enter the autocast state they recorded), not in one the backward would pick.
            if backward is not None:
                backward(loss)
    return StepOutput(loss=loss, l_diff=l_diff.detach(), l_atal=l_atal.detach(),
                      l_atal_weighted=(beta * l_atal).detach(), prediction=pred.detach())




def train_step(
    base: BaseModel,
    branch: nn.Module,
    batch: dict[str, Any],
    generator: torch.Generator,
    optimizer: torch.optim.Optimizer,
    *,
    config: Any,
    weight_dtype: torch.dtype,
    recorder: ATALRecorder | None,
    beta: float,
    prompt_dropout: float,
    max_grad_norm: float = 1.0,
    lr_scheduler: Any = None,
    accelerator: Any = None,
) -> StepOutput:
    """One micro-batch of training: :func:`compute_loss` with its backward, then gradient clipping (when gradients
    are synchronised and ``max_grad_norm > 0``), ``optimizer.step()``, ``lr_scheduler.step()`` and ``zero_grad``.

    With an ``accelerator`` (what ``train.py`` passes) the step runs inside ``accelerator.accumulate(branch)`` with
    its backward, autocast and clipping, so gradient accumulation, mixed precision, DDP, ZeRO and FSDP behave as in
    the trainer; the prepared optimizer skips its step on non-synchronising micro-batches. Without one it is the
    plain PyTorch step (``loss.backward()``, ``clip_grad_norm_``) a benchmark on one device can time; the maths is
    the same. The caller owns ``generator`` (use :func:`step_generator` to draw what the trainer draws).
    """
    if accelerator is None:
        accumulate: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        backward: Callable[[torch.Tensor], None] = lambda loss: loss.backward()
        autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    else:
        accumulate, backward, autocast = accelerator.accumulate(branch), accelerator.backward, accelerator.autocast
    with accumulate:
        out = compute_loss(base, branch, batch, generator, config=config, weight_dtype=weight_dtype,
                           recorder=recorder, beta=beta, prompt_dropout=prompt_dropout, backward=backward,
                           autocast=autocast)
        sync = True if accelerator is None else accelerator.sync_gradients
        if sync and max_grad_norm > 0:
            if accelerator is None:
                torch.nn.utils.clip_grad_norm_(branch.parameters(), max_grad_norm)
            else:
                accelerator.clip_grad_norm_(branch.parameters(), max_grad_norm)
        optimizer.step()
        if lr_scheduler is not None:
            lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return out
