"""benchmarks/gpu_ray_check.py, the device check of the path users run (a `ray start` head, `raysft train` and
`raysft sweep` through Ray Train workers), runs here in its CPU mode so that it cannot rot before a GPU session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.runs import REPO


def run_check(out: Path, variants: str, timeout_s: float) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "benchmarks/gpu_ray_check.py", "--device", "cpu", "--tiny", "--only",
                           variants, "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_ray_check.json").read_text())
    assert report["through_ray"] is True and report["ray"]["address"].startswith("127.0.0.1:")
    assert not Path(report["ray"]["temp_dir"]).exists()  # the head's processes and folder are gone
    return report


def test_gpu_ray_check_trains_through_its_own_ray_head_in_cpu_mode(tmp_path: Path) -> None:
    report = run_check(tmp_path, "train_1.7b", timeout_s=240)
    assert set(report["variants"]) == {"train_1.7b", "inprocess_1.7b"}
    main, inprocess = report["variants"]["train_1.7b"], report["variants"]["inprocess_1.7b"]
    assert main["passed"] and main["exit"] == 0 and main["steady_steps"] >= 2, main
    assert main["steps_logged"] == [1, 2, 3, 4, 5]
    # eval.generate ran at the end of the run and wrote its generations.
    assert main["eval_generate"]["evaluations"] == 1 and main["eval_generate"]["generations_file"]
    assert main["trained_tokens_per_s"] > 0 and inprocess["trained_tokens_per_s"] > 0
    assert main["mfu"] is None and inprocess["mfu"] is None  # MFU is a GPU figure
    assert main["through_ray_over_inprocess"] == pytest.approx(
        main["trained_tokens_per_s"] / inprocess["trained_tokens_per_s"])
    assert "| train_1.7b | passed |" in (tmp_path / "gpu_ray_check.md").read_text()


# Every variant (about 3 minutes on 2 cores) before a device session, not in CI's time: the default-tier test above
# keeps the script's main path from rotting; run this one before spending device time on the rest.
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("RAYSFT_DEVICE_PREP") != "1",
                    reason="before a device session: RAYSFT_DEVICE_PREP=1 pytest tests/test_gpu_ray_check.py")
def test_gpu_ray_check_runs_every_variant_in_cpu_mode(tmp_path: Path) -> None:
    report = run_check(tmp_path, "restart,qlora,sweep,train_8b", timeout_s=900)
    variants = report["variants"]
    assert all(v["passed"] for v in variants.values()), {k: v.get("log_tail") or v for k, v in variants.items()}
    restart = variants["restart"]
    assert restart["killed"] and restart["steps_after_restart"] and restart["max_abs_loss_delta"] <= 1e-5
    assert [t["completed"] for t in variants["sweep"]["trials"]] == [True, True] and variants["sweep"]["overlap_s"] > 0
    big = variants["train_8b"]
    assert big["planner_peak_gib"] > 0 and big["measured"] == {"nvml": False}  # no GPU: predicted only
