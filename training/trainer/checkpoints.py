"""Crash-safe training checkpoints on top of ``accelerator.save_state`` (DESIGN §7).

A checkpoint folder holds accelerate's state (branch, optimizer, scheduler, RNG states of every rank), the data
position of every rank (``data_state_<rank>.json``, so a resume skips what was consumed without decoding it) and a
ComfyUI-loadable ``painternet.safetensors`` of the branch at that step (try step 20k in ComfyUI while training goes
on); all of it appears at once, with the folder's rename.

Why not accelerate's automatic checkpoint naming and ``ProjectConfiguration(total_limit=...)`` (which only prunes
folders accelerate named itself, so it would do nothing here and is not passed): ``save_state`` writes its files
straight into the final folder, so a process killed mid-save leaves a ``checkpoint-N`` that looks complete to ``latest`` and fails to
load (or loads a truncated optimizer). Here every rank saves into ``.checkpoint-N.tmp``, all ranks synchronise, and
the main process renames the folder to ``checkpoint-N`` in one atomic ``os.replace``; only folders with the final name
are ever resumed from, stale ``.tmp`` folders are removed at start-up, and the total limit is applied after the
rename so the previous complete checkpoint is never deleted before the new one exists. A shared filesystem across
nodes is assumed (as for accelerate's own checkpoints).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger("painternet.training")

__all__ = ["CHECKPOINT_PATTERN", "list_checkpoints", "checkpoint_step", "resolve_resume", "remove_stale",
           "save_checkpoint", "write_data_state", "read_data_state"]

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
_TMP_PATTERN = re.compile(r"^\.checkpoint-(\d+)\.tmp$")
# Fault injection for the crash-safety test: "<step>:<point>" makes the process SIGKILL itself at that point of that
# step's save ("state": accelerate's state written, nothing else; "rename": everything written, not yet renamed), so
# the test kills a save at a known point instead of racing it.
KILL_DURING_SAVE_ENV = "PAINTERNET_KILL_DURING_SAVE"


def _fault_point(step: int, point: str) -> None:
    if os.environ.get(KILL_DURING_SAVE_ENV) == f"{step}:{point}":
        import signal

        logger.warning("%s=%d:%s: killing this process mid-save", KILL_DURING_SAVE_ENV, step, point)
        os.kill(os.getpid(), signal.SIGKILL)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (``checkpoint-N`` folders) of ``output_dir``, oldest step first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: str | Path) -> int:
    """The global step encoded in a ``checkpoint-N`` folder name."""
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    if match is None:
        raise ValueError(f"{str(path)!r} is not a checkpoint folder (expected a name like 'checkpoint-500'); pass "
                         "one of the output_dir's checkpoint-N folders or 'latest'.")
    return int(match.group(1))


def resolve_resume(value: str | None, output_dir: str | Path) -> Path | None:
    """``--resume_from_checkpoint``: None, ``latest`` (newest complete checkpoint, None if there is none) or a path."""
    if not value:
        return None
    if value == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.warning("--resume_from_checkpoint latest: no complete checkpoint in %s; starting a new run",
                           output_dir)
            return None
        return found[-1]
    path = Path(value)
    if not path.is_dir():
        raise ValueError(f"--resume_from_checkpoint {value!r} is not a folder; pass 'latest' or a checkpoint-N "
                         f"folder written by this trainer.")
    checkpoint_step(path)
    return path


def remove_stale(output_dir: str | Path) -> list[Path]:
    """Delete ``.checkpoint-N.tmp`` folders left by a run killed mid-save (call on the main process only)."""
    root = Path(output_dir)
    removed = []
    if root.is_dir():
        for path in root.iterdir():
            if path.is_dir() and _TMP_PATTERN.match(path.name):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
                logger.warning("removed incomplete checkpoint %s (a previous run stopped while saving it)", path)
    return removed


def write_data_state(folder: str | Path, rank: int, state: dict[str, Any]) -> Path:
    """Write rank ``rank``'s data position (JSON) into a checkpoint folder being written."""
    path = Path(folder) / f"data_state_{rank}.json"
    path.write_text(json.dumps(state), encoding="utf-8")
    return path


def read_data_state(folder: str | Path, rank: int) -> dict[str, Any] | None:
    """Rank ``rank``'s data position from a checkpoint, or None for checkpoints written before positions existed."""
    path = Path(folder) / f"data_state_{rank}.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def save_checkpoint(accelerator: Any, output_dir: str | Path, step: int, total_limit: int | None,
                    write_extra: Callable[[Path], None] | None = None) -> Path:
    """``save_state`` on every rank into a temporary folder, ``write_extra(folder)`` on every rank (the data
    position, the ComfyUI export), then an atomic rename and pruning to ``total_limit`` on the main process.

    Must be called on every rank (ZeRO and FSDP gather shards collectively inside ``save_state`` and
    ``get_state_dict``).
    """
    root = Path(output_dir)
    tmp = root / f".checkpoint-{step}.tmp"
    final = root / f"checkpoint-{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    _fault_point(step, "state")
    if write_extra is not None:
        write_extra(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fault_point(step, "rename")
        if final.exists():  # a rerun past a step a crashed run had saved: the new state replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit is not None:
            for old in list_checkpoints(root)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
                logger.info("removed old checkpoint %s (checkpoints_total_limit=%d)", old, total_limit)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()
    return final
