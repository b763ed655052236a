#!/usr/bin/env bash
# The whole device call of benchmarks/gpu_ray_check.py: unpack the carried bundle, put it first on the paths, run
# the check, leave its results in $OUT (gpu_ray_check.json, gpu_ray_check.md, gpu_ray_check.log).
#
# Prepare here first: `RAYSFT_DEVICE_PREP=1 python -m pytest -q tests/test_gpu_ray_check.py` (every variant in CPU
# mode, about 4 minutes), then benchmarks/gpu_ray_pack.sh (builds .raydev). Then one `run` tool call:
#   command: bash benchmarks/gpu_ray_check.sh      carry: [".raydev"]      timeout_s: 600
# The check itself stops starting variants after --budget-s (default 460 s) and cuts each to its own budget.
# Extra arguments go to gpu_ray_check.py (e.g. --only train_1.7b,train_8b; --device cpu --tiny on a CPU box).
set -euo pipefail
cd "$(dirname "$0")/.."
site=${RAYDEV_SITE:-/tmp/raydev}
if [ ! -f "$site/.unpacked" ] || [ .raydev/site.tar.xz -nt "$site/.unpacked" ]; then
  rm -rf "$site" && mkdir -p "$site"
  tar -xJf .raydev/site.tar.xz -C "$site" --strip-components=1
  touch "$site/.unpacked"
fi
export PYTHONPATH="$site:$PWD/.raydev/extra:$PWD/.raydev/bnb:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$site/bin:$PATH" PYTHONUNBUFFERED=1
out=${OUT:-$PWD/gpu-ray-check-out}
mkdir -p "$out"
python=$(command -v python3 || command -v python)
echo "[gpu_ray_check.sh] python $("$python" -c 'import sys; print(sys.version.split()[0])'), ray from" \
     "$("$python" -c 'import ray; print(ray.__file__)')"
set -o pipefail
"$python" benchmarks/gpu_ray_check.py --out "$out" "$@" 2>&1 | tee "$out/gpu_ray_check.log"
