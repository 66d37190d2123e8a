"""Peak resident memory of one piece of work in this process (Linux ``/proc``): reset the high-water mark, do the
work, read the mark. Used by the memory tests and ``bench/loader_memory.py``, each load in a fresh interpreter.

Why not ``ru_maxrss``: Linux carries a process's peak RSS across fork + exec, so a probe started from a 3 GB pytest
process already "peaked" at 3 GB before it did anything (a CI run read 23x the file for a 145 MB load that way).
Writing ``5`` to ``/proc/self/clear_refs`` resets ``VmHWM`` to the current RSS, so the peak read afterwards belongs
to the work alone.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

__all__ = ["reset_peak", "status_bytes", "load_peak"]


def status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``, ...) in bytes."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field + ":"))


def reset_peak() -> int:
    """Reset this process's peak RSS to its current RSS and return that RSS (bytes): the baseline of a measure."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return status_bytes("VmRSS")


_LOAD_PROBE = r"""
import json, sys
sys.path.insert(0, {repo!r})
from harness import use_comfyui
use_comfyui(cpu=True)
from harness.comfy_helpers import pack_module
from harness.memory import reset_peak, status_bytes
from painternet_core.checkpoint import load_branch
branch = pack_module("nodes.branch")
# the modules the load imports lazily, imported before the baseline so the peak is the load's own
import comfy.ldm.modules.diffusionmodules.openaimodel, comfy.model_management, comfy.model_patcher, comfy.ops
import comfy.supported_models, comfy.utils, safetensors.torch
before = reset_peak()
if {how!r} == "stream":
    loaded = branch.load_painternet({path!r}, dtype={dtype!r})
else:
    loaded = branch.build_branch(*load_branch({path!r}), dtype={dtype!r})
peak = status_bytes("VmHWM")
resident = sum(p.numel() * p.element_size() for p in loaded.patcher.model.parameters())
print(json.dumps({{"before": before, "peak": peak, "resident": resident}}))
"""


def load_peak(path: str, dtype: str, how: str = "stream", timeout: float = 1800) -> dict[str, int]:
    """Load a branch file in a fresh interpreter by the loader node's path (``how="stream"``) or by reading the whole
    file first (``"whole"``); return its RSS just before the load (``before``), the peak during it (``peak``) and the
    bytes of the loaded parameters (``resident``)."""
    if how not in ("stream", "whole"):
        raise ValueError(f"how must be 'stream' or 'whole', not {how!r}")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _LOAD_PROBE.format(repo=repo, path=path, dtype=dtype, how=how)],
                         capture_output=True, text=True, timeout=timeout, check=False,
                         env=dict(os.environ, PYTHONPATH=repo))
    if out.returncode != 0:
        raise RuntimeError(f"the load probe of {path} ({dtype}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
