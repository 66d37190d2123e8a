"""Branch reuse across sampling steps (issue 23): which steps run the branch, and which reuse its last residuals.

Why one owner: the ComfyUI nodes (`nodes.injection`) and the trainer's diffusers sampler (`training.inference`) must
skip the same steps for the same rule, or quality measured on the learning task would not describe the node. Both
hand the rule the step's key (a sigma or a timestep) and, for the adaptive test, the branch's moving input — the
noisy latent in the model's input scale (ComfyUI's `calculate_input`, diffusers' `scale_model_input`) — as a thunk,
so the every-N path never computes it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BranchReuse:
    """Run the branch on some sampling steps only and reuse its last residuals (and ACP outputs) on the others.

    `every`: the branch runs on every `every`-th step of its window (1 = every step). `max_change`: when set, a
    skipped step runs the branch anyway once the branch input (the scaled noisy latent) has moved by more than this
    relative L2 change since the branch last ran."""

    every: int = 1
    max_change: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 1:
            raise ValueError(f"BranchReuse.every={self.every!r}; need an integer >= 1 (1 runs the branch every step)")
        if self.max_change is not None and not (0.0 <= float(self.max_change) < float("inf")):
            raise ValueError(f"BranchReuse.max_change={self.max_change!r}; need a finite number >= 0 or None")


def relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    """‖new − old‖ / ‖old‖ over the whole batch (one device→host sync)."""
    diff = torch.linalg.vector_norm((new - old).float())
    return float(diff / torch.linalg.vector_norm(old.float()).clamp_min(1e-12))


class ReuseSchedule:
    """One sampling run's reuse bookkeeping for a `BranchReuse` (None: the branch runs on every step).

    The decision is taken once per step key, so calls that share a step (split cond/uncond batches, PAG's extra
    call) agree. The first step of a run always runs the branch: there is nothing to reuse yet."""

    def __init__(self, rule: BranchReuse | None) -> None:
        self.rule = rule
        self.evaluations = 0  # distinct steps seen so far
        self.runs = 0  # steps on which the branch ran
        self.since_run = 0  # steps skipped since the branch last ran
        self.step: float | None = None
        self.run_now = True
        self.last_input: torch.Tensor | None = None

    def runs_branch(self, step: float, branch_input: Callable[[], torch.Tensor]) -> bool:
        """Whether the branch runs at this step (False: reuse the last residuals)."""
        if self.rule is None:
            return True
        if step == self.step:
            return self.run_now
        self.step = step
        self.evaluations += 1
        run = self.evaluations == 1 or self.since_run + 1 >= self.rule.every
        current = None
        if self.rule.max_change is not None:
            current = branch_input()
            last = self.last_input
            if last is None or last.shape != current.shape:
                run = True
            elif not run:
                run = relative_change(current, last) > self.rule.max_change
        self.since_run = 0 if run else self.since_run + 1
        if run:
            self.runs += 1
            if current is not None:
                self.last_input = current
        self.run_now = run
        return run


#: The named settings of PainterNetApply's `branch_reuse` input (node contract: names never change) and of the
#: diffusers sampler's `reuse`; None runs the branch on every step. `adaptive` is calibrated in docs/benchmarks.md.
PRESETS: dict[str, BranchReuse | None] = {
    "off": None,
    "every_2": BranchReuse(every=2),
    "every_3": BranchReuse(every=3),
    "adaptive": BranchReuse(every=3, max_change=0.05),
}


def reuse_preset(name: str) -> BranchReuse | None:
    """The BranchReuse named `name` (one of PRESETS)."""
    if name not in PRESETS:
        raise ValueError(f"branch reuse {name!r} is not one of {', '.join(PRESETS)}")
    return PRESETS[name]
