#!/usr/bin/env bash
# The test command: prepares the environment on a fresh machine (see bootstrap.sh), then runs the whole suite
# against a real ComfyUI 0.3.75 (or $COMFYUI_PATH). Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
exec .venv/bin/python -m pytest -c tests/pytest.ini --rootdir=tests -q -p no:cacheprovider "$@"
