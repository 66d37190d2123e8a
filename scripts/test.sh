#!/usr/bin/env bash
# The test command: prepares the environment on a fresh machine (see bootstrap.sh), then runs the whole suite
# against a real ComfyUI 0.3.75 (or $COMFYUI_PATH). Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
# From inside tests/ so tests/pytest.ini is the config and tests/ the rootdir (see that file); paths given as
# arguments are relative to tests/, e.g. `bash scripts/test.sh test_core.py -k layout`.
cd "$root/tests"
exec "$root/.venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
