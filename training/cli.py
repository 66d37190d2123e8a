"""One flag convention for the four command lines (trainer, PainterBench evaluation and manifest, PainterData
captions, the learning check): ``--snake_case``, as diffusers' training scripts spell theirs.

Why a shim for the old spellings: 0.1 shipped the evaluation, caption and manifest CLIs with ``--kebab-case`` flags
and scripts call them; they keep working for one release (until 0.2) with a warning naming the new spelling.
"""
from __future__ import annotations

import argparse
import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger("painternet.training")

__all__ = ["DEPRECATED_UNTIL", "normalize_flags", "parse_args", "process_state", "rank_device", "gather_in_order"]

#: The release that stops accepting the old ``--kebab-case`` spellings.
DEPRECATED_UNTIL = "0.2"


def normalize_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``argv`` with every ``--old-spelling`` of one of ``parser``'s ``--new_spelling`` flags rewritten to the new
    one (``--flag=value`` too), each with a ``FutureWarning``; everything after a bare ``--`` is left alone."""
    known = {option for action in parser._actions for option in action.option_strings if option.startswith("--")}
    out: list[str] = []
    passthrough = False
    for token in argv:
        if passthrough or token == "--" or not token.startswith("--"):
            passthrough = passthrough or token == "--"
            out.append(token)
            continue
        name, equals, value = token.partition("=")
        candidate = "--" + name[2:].replace("-", "_")
        if name not in known and candidate in known:
            message = (f"{name} is deprecated and will stop working in {DEPRECATED_UNTIL}; use {candidate} "
                       "(flags are snake_case, as in diffusers' training scripts)")
            warnings.warn(message, FutureWarning, stacklevel=3)
            logger.warning("%s", message)
            token = candidate + equals + value
        out.append(token)
    return out


def process_state() -> Any:
    """accelerate's ``PartialState``: rank and world size under ``accelerate launch`` / ``torchrun`` (one process,
    rank 0, otherwise). Why accelerate and not torch.distributed directly: the same launch configs as the trainer
    (multi-GPU, multi-node, CPU gloo) work unchanged."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # PartialState (unlike Accelerator) reads no ACCELERATE_USE_CPU; without an accelerator, ranks talk over gloo.
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def rank_device(device: str, state: Any) -> str:
    """``--device cuda`` means this rank's own GPU when several processes run; other values are used as given."""
    if device == "cuda" and state.num_processes > 1:
        return f"cuda:{state.local_process_index}"
    return device


def gather_in_order(values: list[Any], state: Any, key: Callable[[Any], int]) -> list[Any]:
    """Every rank's ``values`` on every rank, sorted by ``key`` (the input order), so the merged result does not
    depend on the number of processes or on which rank finished first."""
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        values = gather_object(values)
    return sorted(values, key=key)


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args`` accepting the deprecated spellings (see :func:`normalize_flags`)."""
    import sys

    return parser.parse_args(normalize_flags(parser, list(sys.argv[1:] if argv is None else argv)))


def end_processes(code: int) -> int:
    """Leave the process group in step with the other ranks and close it while the interpreter is fully alive;
    returns ``code`` for ``SystemExit``, so the process then ends normally (exit handlers run, buffers flush).

    Why: a gloo process group still open when the interpreter tears down aborts the process ("terminate called
    without an active exception", SIGABRT), PyTorch's own behaviour when ``destroy_process_group`` is not called
    (pytorch/pytorch#190489): the group's native threads and pending work are destroyed with the interpreter. It hit
    about half of the 2-process CPU captioning runs before this function existed. The barrier keeps a rank that
    finishes first (rank 0 after the merge, say) from closing its connections while a peer still uses them. The
    measurements are in docs/evaluation.md ("Ending a multi-process run").
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return code
