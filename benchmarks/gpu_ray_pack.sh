#!/usr/bin/env bash
# Build .raydev, what benchmarks/gpu_ray_check.sh needs on a GPU machine whose Python has no Ray and no network:
# Ray and the other missing wheels (../shared/device/pack-ray.sh, ~31 MB as site.tar.xz), bitsandbytes for the
# QLoRA variant, unpacked into .raydev/bnb with its CPU and CUDA 13 libraries only (~4.5 MB; the GPU machine's
# torch is a CUDA 13 build), and Ray's start-up needs the image lacks (.raydev/extra, see below). Run from the repo root, once per session, before the device call:
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
# What Ray's node needs at start-up and the GPU image lacks (ray[default]'s extras): the raylet's agent imports
# opencensus and opentelemetry (ray/_private/metrics_agent.py, telemetry/); without them `ray start --head` timed out
# in a CPU rehearsal that hid these packages. Pure-Python wheels, unpacked into .raydev/extra; versions as here.
ver() { python -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null; }
extra=$(mktemp -d)
for pkg in opencensus opencensus-context opentelemetry-api opentelemetry-sdk opentelemetry-exporter-prometheus \
           opentelemetry-proto opentelemetry-semantic-conventions aiohttp-cors; do
  v=$(ver "$pkg" || true)
  python -m pip download -q --no-deps --only-binary=:all: --python-version "${PY:-3.12}" --implementation cp \
    --platform manylinux_2_17_x86_64 -d "$extra" "$pkg${v:+==$v}"
done
mkdir -p .raydev/extra
python - "$extra" .raydev/extra <<'PYEOF'
import glob, os, sys, zipfile
for wheel in glob.glob(os.path.join(sys.argv[1], "*.whl")):
    zipfile.ZipFile(wheel).extractall(sys.argv[2])
PYEOF
rm -rf "$extra"
du -sh .raydev/site.tar.xz .raydev/bnb .raydev/extra
