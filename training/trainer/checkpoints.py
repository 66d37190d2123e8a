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

Checkpoint folders belong to one run: a run gets an id when it starts (``OUTPUT_DIR/painternet_run.json``), and every
checkpoint records it with its step, its save time and the size of every file it holds (``painternet_run.json`` in
the checkpoint, written last, before the rename). Why: an ``--output_dir`` reused by a new run used to mix two runs'
checkpoints; pruning sorted by step and deleted each new checkpoint right after writing it (the old run's
higher-step checkpoint looked newest), and ``latest`` silently continued the old run. Now a fresh run into a folder
holding checkpoints refuses (:func:`claim_output_dir`) unless told to delete them, pruning orders one run's
checkpoints by save time (the one just written is always kept), and ``latest`` is the newest checkpoint of this run
whose files are all present at their recorded sizes and whose safetensors headers parse, falling back past a
damaged one with a warning naming it.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger("painternet.training")

__all__ = ["CHECKPOINT_PATTERN", "RUN_FILE", "adopt_run", "list_checkpoints", "checkpoint_step", "checkpoint_run",
           "checkpoint_problem", "claim_output_dir", "current_run", "refuse_foreign", "resolve_resume",
           "remove_stale",
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


#: ``save_branch``'s temporary export (``painternet_core.checkpoint``), left behind when a run is killed mid-export.
_EXPORT_TMP_PATTERN = re.compile(r"^\.painternet-.*\.tmp$")
#: The run record: in OUTPUT_DIR (the run that owns the folder) and in every checkpoint (its run, step, files).
RUN_FILE = "painternet_run.json"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def checkpoint_run(folder: str | Path) -> dict[str, Any] | None:
    """A checkpoint's run record (``run_id``, ``step``, ``saved_ns``, ``files``), None when absent or unreadable
    (checkpoints written before run ids, or a damaged one)."""
    return _read_json(Path(folder) / RUN_FILE)


def current_run(output_dir: str | Path) -> str | None:
    """The id of the run that owns ``output_dir`` (None for folders written before run ids)."""
    record = _read_json(Path(output_dir) / RUN_FILE)
    return str(record["run_id"]) if record and "run_id" in record else None


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why a checkpoint cannot be resumed from (a missing or truncated file, an unparsable safetensors header), or
    None when it is complete and loadable. Cheap: sizes and headers, never the weights."""
    from safetensors import safe_open

    root = Path(folder)
    record = checkpoint_run(root)
    if record is not None and isinstance(record.get("files"), dict):
        for name, size in record["files"].items():
            file = root / name
            if not file.is_file():
                return f"{name} is missing"
            if file.stat().st_size != size:
                return f"{name} is {file.stat().st_size} bytes, {size} were written"
    else:  # checkpoints written before run records: the files accelerate always writes must be there, non-empty
        if not list(root.glob("model*.safetensors")) and not list(root.glob("pytorch_model*.bin")):
            return "the model file (model.safetensors) is missing"
        empty = next((p.name for p in sorted(root.iterdir()) if p.is_file() and p.stat().st_size == 0), None)
        if empty is not None:
            return f"{empty} is empty"
        if record is None and (root / RUN_FILE).exists():
            return f"{RUN_FILE} is unreadable"
    for file in sorted(root.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error types on bad headers
            return f"{file.name} cannot be read ({type(error).__name__}: {str(error)[:120]})"
    return None


def _saved_order(folder: Path) -> tuple[int, int]:
    """When a checkpoint was saved: its recorded time, else (no record) its folder's modification time."""
    record = checkpoint_run(folder)
    saved = record.get("saved_ns") if record else None
    return (saved if isinstance(saved, int) else folder.stat().st_mtime_ns, checkpoint_step(folder))


def refuse_foreign(output_dir: str | Path) -> None:
    """Raise the one-line refusal when a fresh run's ``output_dir`` holds checkpoints (call on every rank)."""
    found = list_checkpoints(output_dir)
    if found:
        names = ", ".join(p.name for p in found[-3:])
        raise ValueError(f"--output_dir {str(output_dir)!r} holds checkpoints of another run ({names}); resume it "
                         "with --resume_from_checkpoint latest, choose a new --output_dir, or pass "
                         "--overwrite_output_dir to delete them")


def claim_output_dir(output_dir: str | Path, overwrite: bool) -> str:
    """Start a new run in ``output_dir`` (main process): refuse when it holds checkpoints (:func:`refuse_foreign`),
    or with ``overwrite`` delete them; record and return the new run id."""
    root = Path(output_dir)
    if not overwrite:
        refuse_foreign(root)
    for old in list_checkpoints(root):
        shutil.rmtree(old)
        logger.warning("removed %s of an earlier run (--overwrite_output_dir)", old)
    run_id = uuid.uuid4().hex
    _write_run(root, run_id)
    return run_id


def _write_run(output_dir: Path, run_id: str) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    temp = output_dir / f".{RUN_FILE}.tmp"
    temp.write_text(json.dumps({"run_id": run_id}), encoding="utf-8")
    os.replace(temp, output_dir / RUN_FILE)


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
    """``--resume_from_checkpoint``: None, ``latest`` or a path.

    ``latest``: the newest (by save time) checkpoint of the run that owns ``output_dir`` that is complete and
    loadable (:func:`checkpoint_problem`); damaged ones are passed over with a warning naming them; None when there
    is no checkpoint. A path must name a complete, loadable checkpoint.
    """
    if not value:
        return None
    if value == "latest":
        run = current_run(output_dir)
        found = [p for p in list_checkpoints(output_dir)
                 if run is None or (checkpoint_run(p) or {}).get("run_id") in (run, None)]
        if not found:
            logger.warning("--resume_from_checkpoint latest: no complete checkpoint in %s; starting a new run",
                           output_dir)
            return None
        damaged = []
        for candidate in sorted(found, key=_saved_order, reverse=True):
            problem = checkpoint_problem(candidate)
            if problem is None:
                return candidate
            damaged.append(f"{candidate.name} ({problem})")
            logger.warning("--resume_from_checkpoint latest: %s is damaged (%s); trying the one before it", candidate,
                           problem)
        raise ValueError(f"--resume_from_checkpoint latest: every checkpoint in {str(output_dir)!r} is damaged: "
                         f"{'; '.join(damaged)}; pass --overwrite_output_dir to start a new run there")
    path = Path(value)
    if not path.is_dir():
        raise ValueError(f"--resume_from_checkpoint {value!r} is not a folder; pass 'latest' or a checkpoint-N "
                         f"folder written by this trainer.")
    checkpoint_step(path)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(f"--resume_from_checkpoint {value!r} is damaged ({problem}); pass an intact checkpoint or "
                         "'latest' (which falls back to the newest intact one)")
    return path


def adopt_run(output_dir: str | Path, checkpoint: Path) -> str:
    """The run id a resume from ``checkpoint`` continues (recorded as the owner of ``output_dir``; main process).
    A checkpoint written before run ids continues the folder's run, or starts recording one."""
    record = checkpoint_run(checkpoint)
    run_id = str(record["run_id"]) if record and "run_id" in record else current_run(output_dir) or uuid.uuid4().hex
    _write_run(Path(output_dir), run_id)
    return run_id


def remove_stale(output_dir: str | Path) -> list[Path]:
    """Delete ``.checkpoint-N.tmp`` folders and ``.painternet-*.tmp`` exports left by a run killed mid-save or
    mid-export (call on the main process only)."""
    root = Path(output_dir)
    removed = []
    if root.is_dir():
        for path in root.iterdir():
            if path.is_dir() and _TMP_PATTERN.match(path.name):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
                logger.warning("removed incomplete checkpoint %s (a previous run stopped while saving it)", path)
            elif path.is_file() and _EXPORT_TMP_PATTERN.match(path.name):
                path.unlink(missing_ok=True)
                removed.append(path)
                logger.warning("removed incomplete export %s (a previous run stopped while exporting)", path)
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
                    write_extra: Callable[[Path], None] | None = None, run_id: str | None = None) -> Path:
    """``save_state`` on every rank into a temporary folder, ``write_extra(folder)`` on every rank (the data
    position, the ComfyUI export), the run record (``run_id``, step, save time, file sizes), then an atomic rename
    and pruning to ``total_limit`` among this run's checkpoints, newest saves kept, on the main process.

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
        run_id = run_id or current_run(root)
        if run_id is None:  # a caller that never claimed the folder: the first save claims it for later ones
            run_id = uuid.uuid4().hex
            _write_run(root, run_id)
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / RUN_FILE).write_text(json.dumps({"run_id": run_id, "step": step, "saved_ns": time.time_ns(),
                                                "files": files}), encoding="utf-8")
        _fault_point(step, "rename")
        if final.exists():  # a rerun past a step a crashed run had saved: the new state replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit is not None:
            mine = sorted((p for p in list_checkpoints(root) if (checkpoint_run(p) or {}).get("run_id") == run_id),
                          key=_saved_order)
            for old in mine[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
                logger.info("removed old checkpoint %s (checkpoints_total_limit=%d)", old, total_limit)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()
    return final
