#!/usr/bin/env bash
# Build .raydev, what benchmarks/gpu_ray_check.sh needs on a GPU machine whose Python has no Ray and no network:
# Ray and the other missing wheels (../shared/device/pack-ray.sh, ~31 MB as site.tar.xz) plus bitsandbytes for
# the QLoRA variant, unpacked into .raydev/bnb with its CPU and CUDA 13 libraries only (~8 MB; the GPU machine's
# torch is a CUDA 13 build). Run from the repo root, once per session, before the device call:
#
#   benchmarks/gpu_ray_pack.sh                  # Python 3.12 wheels (the GPU machine's); PY=3.11 for this CPU box
#   grep -qx '/.raydev/' .git/info/exclude || echo /.raydev/ >> .git/info/exclude   # the main checkout's .git
#
# BNB (default 0.50.2, the version run 4 of benchmarks/results/gpu_check.md carried) may be set in the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-3.12} "$(cd .. && pwd)/shared/device/pack-ray.sh" .raydev
BNB=${BNB:-0.50.2}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python -m pip download -q --no-deps --only-binary=:all: --python-version "${PY:-3.12}" --implementation cp \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$tmp" "bitsandbytes==$BNB"
mkdir -p .raydev/bnb
python - "$tmp" .raydev/bnb <<'PYEOF'
import glob, os, sys, zipfile
wheels, target = glob.glob(os.path.join(sys.argv[1], "bitsandbytes-*.whl")), sys.argv[2]
with zipfile.ZipFile(wheels[0]) as wheel:
    for name in wheel.namelist():
        library = os.path.basename(name).startswith("libbitsandbytes_")
        if library and not os.path.basename(name) in ("libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so"):
            continue  # the other CUDA/ROCm/XPU builds: 100+ MB the GPU machine does not load
        wheel.extract(name, target)
PYEOF
du -sh .raydev/site.tar.xz .raydev/bnb
