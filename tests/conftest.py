"""Shared test harness: a real ComfyUI 0.3.75 on sys.path (COMFYUI_PATH or the copy `scripts/bootstrap.sh` makes),
CPU-only, and the pack importable under the name ComfyUI would give it. The helpers live in the `harness` package
(shared with bench/)."""
from __future__ import annotations

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from harness import CACHE, COMFYUI_PATH, use_comfyui  # noqa: E402,F401

try:
    # Tests never need a GPU: force the CPU path before model_management picks a device.
    use_comfyui(cpu=True)
except RuntimeError as error:
    raise pytest.UsageError(str(error)) from None

sys.path.insert(0, os.path.join(REPO, "tests"))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # scripts/test.sh runs one worker per core: each keeps to one intra-op thread, or the workers' OpenMP threads
    # (two each by default on a 2-core machine) wait on each other. Tests that need another count pin it
    # (harness.torch_threads).
    import torch

    torch.set_num_threads(1)

if os.environ.get("PAINTERNET_MUTATION") == "1":
    # A mutation run of nodes/ (scripts/mutation.sh): see harness/mutation.py.
    from harness.comfy_helpers import pack_module_name
    from harness.mutation import bridge_pack_names

    bridge_pack_names(pack_module_name())

    def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
        """mutmut passes a mutant's tests fastest first, which interleaves files: every switch of file tears down and
        rebuilds module fixtures (tiny ComfyUI models). Grouping by file, in the order of each file's fastest test,
        keeps `-x` stopping early and builds each fixture once."""
        first: dict[object, int] = {}
        for i, item in enumerate(items):
            first.setdefault(item.path, i)
        items.sort(key=lambda item: first[item.path])

# Tiny CLIP / Grounding-DINO fixtures shared by the PainterBench and PainterData tests.
pytest_plugins = ["painter_fixtures"]
