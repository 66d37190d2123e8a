#!/usr/bin/env bash
# Mutation score of one module (docs/mutation.md):  bash scripts/mutation.sh painternet_core/config.py
# Runs mutmut (pinned in requirements-dev.txt, configured in pyproject.toml) in .mutation/<module>/, a copy of the
# sources and tests, so modules never share mutmut's cache and a rerun only retests functions that changed.
# Prints the score and the surviving mutants (`mutmut show NAME` inside the work folder shows one).
# mutmut keeps every verdict until the mutated function changes: after adding tests, MUTATION_RETEST=1 reruns the
# mutants that were not killed; MUTATION_FRESH=1 starts from scratch (what a reproduction of the scores should use).
# MUTATION_SAMPLE=N scores a seeded uniform sample of N mutants (seed MUTATION_SEED, default 0) with a 95 % interval
# instead of all of them: for nodes/injection.py, whose every mutant runs up to a minute of ComfyUI sampling tests.
# MUTATION_CHILDREN sets mutmut's parallel workers (default 2; the run is niced).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
module="${1:?usage: scripts/mutation.sh painternet_core/config.py (a key of [tool.painternet.mutation] in pyproject.toml)}"
py="${PYTHON:-$root/.venv/bin/python}"
export COMFYUI_PATH="${COMFYUI_PATH:-$root/.cache/comfyui}"
[ -f "$COMFYUI_PATH/comfy/model_management.py" ] || { echo "no ComfyUI at $COMFYUI_PATH: run scripts/bootstrap.sh or set COMFYUI_PATH" >&2; exit 2; }
work="$root/.mutation/$(echo "${module%.py}" | tr / _)"
[ "${MUTATION_FRESH:-0}" = 1 ] && rm -rf "$work"

"$py" - "$module" "$work" <<'EOF'
"""Lay out the work folder: the sources, tests and a pyproject.toml whose [tool.mutmut] is the repository's with
only this module mutated and only this module's tests selected."""
import shutil
import sys
import tomllib
from pathlib import Path

module, work = sys.argv[1], Path(sys.argv[2])
data = tomllib.loads(Path("pyproject.toml").read_text())
selection = data["tool"]["painternet"]["mutation"]
if module not in selection:
    sys.exit(f"no mutation test selection for {module!r}; pick one of {sorted(selection)} or add it to "
             "[tool.painternet.mutation] in pyproject.toml")
work.mkdir(parents=True, exist_ok=True)
skip = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis")
for name in ("painternet_core", "nodes", "harness", "tests", "web", "training"):
    # copy2 keeps mtimes: mutmut regenerates the mutants of a file only when its source is newer than them.
    shutil.copytree(name, work / name, ignore=skip, dirs_exist_ok=True)
shutil.copy2("__init__.py", work / "__init__.py")


def toml_value(value):
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value).lower() if isinstance(value, bool) else str(value)


table = dict(data["tool"]["mutmut"], only_mutate=[module], pytest_add_cli_args_test_selection=selection[module])
(work / "pyproject.toml").write_text("[tool.mutmut]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in table.items()))
EOF

cd "$work"
# The tests run nodes/ under the pack's folder-derived module name; this lets mutmut match it (harness/mutation.py).
export PAINTERNET_MUTATION=1
# mutmut forks each mutant's worker from a process that has already run the tests: a forked child of a process with a
# live OpenMP pool hangs at its first parallel op (seen: 0 CPU seconds for 10 minutes in futex_wait, then scored as a
# "timeout", i.e. killed). One intra-op thread keeps the pool from ever starting.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
if [ -n "${MUTATION_SAMPLE:-}" ]; then
  # A seeded uniform sample of the module's mutants (mutation sampling): for modules whose every mutant runs up to a
  # minute of model tests. `mutmut run` with a name that matches no mutant generates them all, then stops on that
  # name ("nothing matches"), so the full list exists before the sample is drawn.
  nice -n 19 "$root/.venv/bin/mutmut" run "no-such-mutant" >/dev/null 2>&1 || true
  "$root/.venv/bin/mutmut" results --all true | sed -n 's/^ *\([^ ]*\): .*/\1/p' >all-mutants.txt
  "$py" - "$MUTATION_SAMPLE" "${MUTATION_SEED:-0}" <<'EOF'
import random
import sys

names = sorted(open("all-mutants.txt").read().split())
picked = random.Random(int(sys.argv[2])).sample(names, min(int(sys.argv[1]), len(names)))
open("sample.txt", "w").write("\n".join(sorted(picked)) + "\n")
EOF
  mapfile -t sample <sample.txt
  nice -n 19 "$root/.venv/bin/mutmut" run --max-children "${MUTATION_CHILDREN:-2}" "${sample[@]}"
  "$root/.venv/bin/mutmut" results --all true >verdicts.txt
  "$py" - "$module" <<'EOF'
"""Score of the sample, killed (and timed out) / sampled, with its 95 % Wilson interval for the whole module."""
import math
import re
import sys

sample = sorted(open("sample.txt").read().split())
status = dict(re.findall(r"^ *(\S+): (.*)$", open("verdicts.txt").read(), re.M))
verdicts = [status.get(name, "missing") for name in sample]
caught, n = sum(v in ("killed", "timeout") for v in verdicts), len(verdicts)
z, p = 1.96, caught / n
centre = (p + z * z / (2 * n)) / (1 + z * z / n)
half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
total = len(open("all-mutants.txt").read().split())
print(f"{sys.argv[1]}: a sample of {n} of its {total} mutants: {caught} killed = {100 * p:.1f} % "
      f"(95 % interval {100 * (centre - half):.1f}-{100 * (centre + half):.1f} %); not killed:")
for name, verdict in zip(sample, verdicts):
    if verdict not in ("killed", "timeout"):
        print(f"    {name}: {verdict}")
EOF
  exit 0
fi
nice -n 19 "$root/.venv/bin/mutmut" run --max-children "${MUTATION_CHILDREN:-2}"
if [ "${MUTATION_RETEST:-0}" = 1 ]; then
  mapfile -t left < <("$root/.venv/bin/mutmut" results | sed -n 's/^ *\([^ ]*\): .*/\1/p')
  [ "${#left[@]}" -eq 0 ] || nice -n 19 "$root/.venv/bin/mutmut" run --max-children "${MUTATION_CHILDREN:-2}" "${left[@]}"
fi
"$root/.venv/bin/mutmut" export-cicd-stats >/dev/null
"$py" - "$module" <<'EOF'
"""Score = (killed + timed out) / all mutants; 'no tests' (no selected test reached the function) counts as survived."""
import json
import sys

s = json.load(open("mutants/mutmut-cicd-stats.json"))
caught = s["killed"] + s["timeout"]
left = s["total"] - caught
print(f"{sys.argv[1]}: {caught}/{s['total']} mutants killed = {100 * caught / max(s['total'], 1):.1f} % "
      f"(survived {s['survived']}, no tests {s['no_tests']}, suspicious {s['suspicious']}, timeout {s['timeout']}, "
      f"segfault {s['segfault']}, not checked {left - s['survived'] - s['no_tests'] - s['suspicious'] - s['segfault']})")
EOF
echo "survivors (inspect one with: cd $work && mutmut show NAME):"
"$root/.venv/bin/mutmut" results
