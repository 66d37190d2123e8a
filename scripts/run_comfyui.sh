#!/usr/bin/env bash
# Starts a real ComfyUI with this pack: $COMFYUI_PATH if set, else the pinned stock ComfyUI 0.3.75 that
# bootstrap.sh fetches into .cache/comfyui. The pack is linked into that ComfyUI's custom_nodes folder.
# Extra arguments go to ComfyUI's main.py (e.g. --cpu, --listen 0.0.0.0, --port 8188).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
comfy="${COMFYUI_PATH:-$root/.cache/comfyui}"
if [ -z "${COMFYUI_PATH:-}" ] && [ ! -f "$root/.venv/.painternet-ui" ]; then
  # The pinned ComfyUI's template browser and node docs (not needed by the tests, so not in bootstrap.sh).
  "$root/.venv/bin/python" -m pip install -q "comfyui-workflow-templates==0.7.25" "comfyui-embedded-docs==0.3.1"
  touch "$root/.venv/.painternet-ui"
fi
mkdir -p "$comfy/custom_nodes" "$comfy/models/painternet"
link="$comfy/custom_nodes/ComfyUI-PainterNet"
if [ ! -e "$link" ] && [ "$(cd "$root/.." && pwd)" != "$(cd "$comfy/custom_nodes" && pwd)" ]; then
  ln -s "$root" "$link"
fi
cd "$comfy"
exec "$root/.venv/bin/python" main.py "$@"
