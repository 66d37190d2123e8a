#!/usr/bin/env bash
# The test command: prepares the environment on a fresh machine (see bootstrap.sh), then runs the whole suite
# against a real ComfyUI 0.3.75 (or $COMFYUI_PATH). Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
# From inside tests/ so tests/pytest.ini is the config and tests/ the rootdir (see that file); paths given as
# arguments are relative to tests/, e.g. `bash scripts/test.sh test_core.py -k layout`.
# Two worker processes by default (CI has two cores; much of the suite waits on server and browser subprocesses);
# --dist loadfile keeps each test file in one worker, so its module fixtures are built once.
# PAINTERNET_TEST_WORKERS=0 runs everything in this process (for -x or --pdb).
cd "$root/tests"
exec "$root/.venv/bin/python" -m pytest -q -p no:cacheprovider -n "${PAINTERNET_TEST_WORKERS:-2}" --dist loadfile "$@"
