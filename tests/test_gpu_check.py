"""benchmarks/gpu_check.py, the script prepared for a GPU machine, runs here in its CPU mode, so it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.runs import REPO


def test_gpu_check_runs_its_cpu_mode_and_every_check_passes(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--tiny", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = report["correctness"]
    assert set(checks) == {"packed_equals_unpacked", "varlen_kernel_equals_loop", "linear_cross_entropy",
                           "fp16_overflow_step_skipped", "compiled_equals_eager"}
    assert all(check["passed"] is True for check in checks.values()), checks
    assert checks["packed_equals_unpacked"]["examples"] == 24  # every example compared, none lost in packing
    variants = report["throughput"]["tiny"]["variants"]
    assert {"raysft packed", "transformers padded", "raysft packed, compiled"} <= set(variants)
    for variant in variants.values():
        assert variant["trained_tokens_per_s"] > 0 and 0 <= variant["pad_fraction"] < 1
    # Both variants trained on the same examples: packing pads far less than per-batch padding.
    assert variants["raysft packed"]["pad_fraction"] < variants["transformers padded"]["pad_fraction"]
    assert "| raysft packed |" in (tmp_path / "gpu_check.md").read_text()
