#!/usr/bin/env bash
# Prepares what bench/gpu_inference.py needs on a GPU machine that has Python 3.12 with torch + CUDA, accelerate,
# safetensors, numpy, opencv, einops and requests but nothing can be downloaded there (the workplace's device machine;
# any CUDA box works the same way). Everything lands in .carry/ (git-ignored), to be carried with the working tree:
#   .carry/comfyui   the pinned ComfyUI 0.3.75 tree ($COMFYUI_PATH or .cache/comfyui), without its tests; the bench
#                    runs ComfyUI in-process, so neither the frontend package nor the server's requirements are needed
#   .carry/wheels    cp312 manylinux wheels the bench imports and the machine lacks: torchsde + trampoline (ComfyUI's
#                    samplers), diffusers + importlib_metadata (the reference branch), and the transformers,
#                    tokenizers and huggingface_hub versions this repository pins and tests (transformers < 5; the
#                    machine's own 5.x is shadowed through PYTHONPATH)
# and checks that the working tree plus .carry stays under the 64 MiB a device call may carry.
# Finally it runs the bench's dry run with only the machine's packages and the carried wheels importable
# (scripts/device_import_check.py; the machine's package list is $DEVICE_PACKAGES, by default the workplace's
# KINDS.md), so a missing wheel shows up here rather than in a device call.
# Usage: bash scripts/prepare_device.sh          (idempotent; run from any directory)
# The device command that uses it is in docs/gpu.md ("Inference").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
src="${COMFYUI_PATH:-.cache/comfyui}"
limit=$((64 * 1024 * 1024))
py="${PYTHON:-.venv/bin/python}"
[ -x "$py" ] || py=python3

if [ ! -f "$src/comfy/model_management.py" ]; then
  echo "no ComfyUI at $src: run scripts/bootstrap.sh or set COMFYUI_PATH" >&2
  exit 1
fi
grep -qx '/.carry/' .gitignore || { echo "/.carry/ must be in .gitignore (it is in the repository's)" >&2; exit 1; }

rm -rf .carry/comfyui
mkdir -p .carry/comfyui .carry/wheels
# -h follows the .cache/comfyui symlink; tests and caches are not needed in-process.
tar -C "$src/" -chf - --exclude=./tests --exclude=./tests-unit --exclude='__pycache__' --exclude='*.pyc' \
  --exclude=./.git --exclude=./output --exclude=./input --exclude=./user . | tar -C .carry/comfyui -xf -

wheels=(torchsde==0.2.6 trampoline==0.1.2 diffusers==0.36.0 importlib_metadata==10.2.0
        transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2)
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .carry/wheels "${wheels[@]}"
# One version of each: a stale wheel from an earlier pin would make the machine's pip refuse the whole set.
for w in "${wheels[@]}"; do
  name="${w%%==*}"; version="${w##*==}"
  find .carry/wheels -iname "${name//-/_}-*.whl" ! -iname "${name//-/_}-${version}-*.whl" -delete
done

tree_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
carry_bytes=$(find .carry -type f -printf '%s\n' | awk '{s+=$1} END {print s+0}')
total=$((tree_bytes + carry_bytes))
printf 'working tree %.1f MiB + .carry %.1f MiB (ComfyUI %.1f MiB, wheels %.1f MiB) = %.1f MiB of 64 MiB\n' \
  "$(echo "$tree_bytes / 1048576" | bc -l)" "$(echo "$carry_bytes / 1048576" | bc -l)" \
  "$(du -sb .carry/comfyui | awk '{print $1 / 1048576}')" "$(du -sb .carry/wheels | awk '{print $1 / 1048576}')" \
  "$(echo "$total / 1048576" | bc -l)"
if [ "$total" -ge "$limit" ]; then
  echo "over the 64 MiB a device call carries: remove untracked files or shrink .carry" >&2
  exit 1
fi

packages="${DEVICE_PACKAGES:-/work/.library/device/KINDS.md}"
if [ -f "$packages" ]; then
  "$py" -W ignore scripts/device_import_check.py "$packages" -- --dry-run --families sdxl \
    --comfyui .carry/comfyui --log "$(mktemp -d)/gpu_inference-import-check.txt" >/dev/null
  echo "dry run with only the machine's packages + .carry/wheels importable: passed"
else
  echo "no package list at $packages (set DEVICE_PACKAGES): import check skipped"
fi
