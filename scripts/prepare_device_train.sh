#!/usr/bin/env bash
# Prepare the wheels that bench/gpu_train.py needs on the workplace's GPU machine (Python 3.12, torch 2.11 + CUDA,
# accelerate, transformers, safetensors; no diffusers; no network there) into the ignored folder .whl-train/, and
# check that they and the working tree together stay under the 64 MiB that travels with a device run.
#
# Carried (cp312 / py3, manylinux x86_64, no dependencies resolved — each missing one is named):
#   diffusers (the project's pin) + importlib_metadata   the models; everything else diffusers needs is there
#   bitsandbytes                                          8-bit AdamW (~43 MB): --optimizer adamw8bit_bnb
# Not torchao, although its 8-bit AdamW is the smaller wheel: with it installed, the pinned diffusers 0.36.0 fails
# to import (its torchao hook imports names torchao 0.17+ removed, then hits a NameError); see training/trainer/optim.py.
#   deepspeed (a py3-none-any wheel built here from the sdist, no ops prebuilt) + hjson, pydantic, pydantic-core,
#   annotated-types, typing-inspection                    the ZeRO-2 smoke run
# Set WITH_BNB=0 or WITH_DEEPSPEED=0 to leave those out (the bench then skips what needs them).
#
# Usage: bash scripts/prepare_device_train.sh        (then the device run in docs/gpu.md, "Training")
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out=.whl-train
python=${PYTHON:-"$root/.venv/bin/python"}
limit=$((64 * 1024 * 1024))
WITH_BNB=${WITH_BNB:-1}
WITH_DEEPSPEED=${WITH_DEEPSPEED:-1}

diffusers=$(sed -n 's/^diffusers==\(.*\)$/\1/p' requirements-dev.txt)
wheels=("diffusers==$diffusers" "importlib_metadata==10.2.0")
[ "$WITH_BNB" = 1 ] && wheels+=("bitsandbytes==0.50.2")
[ "$WITH_DEEPSPEED" = 1 ] && wheels+=("hjson==3.1.0" "pydantic==2.14.4" "pydantic_core==2.50.5"
                                       "annotated_types==0.8.0" "typing_inspection==0.4.5")

rm -rf "$out"
mkdir -p "$out"
platforms=()
for tag in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
           manylinux_2_28_x86_64 manylinux_2_34_x86_64; do
  platforms+=(--platform "$tag")
done
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$out" "${wheels[@]}"
if [ "$WITH_DEEPSPEED" = 1 ]; then
  # DeepSpeed publishes only an sdist; its setup.py needs torch, so the wheel is built here with no ops compiled
  # (ZeRO-2 with a torch optimizer needs none; the machine has nvcc for any op it would JIT-build).
  src=$(mktemp -d)
  "$python" -m pip download -q --no-deps --no-binary=:all: -d "$src" deepspeed==0.19.8
  DS_BUILD_OPS=0 "$python" -m pip wheel -q --no-deps --no-build-isolation -w "$out" "$src"/deepspeed-*.tar.gz
  rm -rf "$src"
fi

tree=$(git ls-files -z -co --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
carried=$(du -cb "$out"/*.whl | tail -1 | cut -f1)
total=$((tree + carried))
ls -l "$out"
"$python" -c "import sys; t, w = int(sys.argv[1]), int(sys.argv[2]); m = 2 ** 20
print(f'working tree {t / m:.1f} MiB + wheels {w / m:.1f} MiB = {(t + w) / m:.1f} MiB (limit 64 MiB)')" "$tree" "$carried"
if [ "$total" -gt "$limit" ]; then
  echo "over the 64 MiB a device run carries: rerun with WITH_BNB=0" >&2
  exit 1
fi
