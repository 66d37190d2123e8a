"""The ComfyUI harness shared by ``tests/`` and ``bench/``: a real ComfyUI 0.3.75 on ``sys.path`` (``COMFYUI_PATH``
or the copy ``scripts/bootstrap.sh`` makes), the pack loaded the way ComfyUI loads it (``comfy_helpers``),
deterministic random ComfyUI checkpoints (``models``), a real ``main.py`` server (``server``) and the reliability
soak (``soak``).

Why a package and not ``tests/``: the benchmarks run the same models, server and soak as the tests, and a script
that imports pytest modules drags pytest's collection rules and fixtures with it (DESIGN §1: bench never imports
tests/). Nothing here imports the trainer; importing this package is cheap (ComfyUI is put on the path by
:func:`use_comfyui`, not imported).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFYUI_PATH = os.environ.get("COMFYUI_PATH") or os.path.join(REPO, ".cache", "comfyui")
CACHE = os.path.join(REPO, ".cache")

__all__ = ["REPO", "COMFYUI_PATH", "CACHE", "use_comfyui", "torch_threads"]


def use_comfyui(cpu: bool = True) -> None:
    """Put the repository and ComfyUI on ``sys.path`` and choose the device before ``comfy.model_management`` is
    imported (that import picks the device once): ``cpu=True`` forces the CPU, as every test does."""
    if not os.path.isfile(os.path.join(COMFYUI_PATH, "comfy", "model_management.py")):
        raise RuntimeError(f"no ComfyUI at {COMFYUI_PATH!r}: run `bash scripts/bootstrap.sh` or set COMFYUI_PATH to "
                           "your ComfyUI folder")
    for path in (REPO, COMFYUI_PATH):
        if path not in sys.path:
            sys.path.insert(0, path)
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run a block on ``count`` intra-op CPU threads, restored after.

    Why: the thread count changes float reduction order, and multithreaded CPU backward is not bitwise
    reproducible run to run (torch 2.14, 2 threads: two identical tiny training runs ended ~1e-7 apart; one thread is
    bit-exact). Tests that compare two runs bit for bit, or whose thresholds were measured at a thread count, pin it.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
