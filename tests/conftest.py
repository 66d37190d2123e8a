"""Shared test harness: a real ComfyUI 0.3.75 on sys.path (COMFYUI_PATH or the copy `scripts/bootstrap.sh` makes),
CPU-only, and the pack importable under the name ComfyUI would give it."""
from __future__ import annotations

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFYUI_PATH = os.environ.get("COMFYUI_PATH") or os.path.join(REPO, ".cache", "comfyui")
CACHE = os.path.join(REPO, ".cache")

if not os.path.isfile(os.path.join(COMFYUI_PATH, "comfy", "model_management.py")):
    raise pytest.UsageError(
        f"no ComfyUI at {COMFYUI_PATH!r}: run `bash scripts/bootstrap.sh` or set COMFYUI_PATH to your ComfyUI folder"
    )

for path in (REPO, COMFYUI_PATH):
    if path not in sys.path:
        sys.path.insert(0, path)

import comfy.cli_args  # noqa: E402

# Tests never need a GPU: force the CPU path before model_management picks a device.
comfy.cli_args.args.cpu = True

sys.path.insert(0, os.path.join(REPO, "tests"))
