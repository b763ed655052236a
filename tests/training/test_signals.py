"""SIGINT (Ctrl-C) and SIGTERM (a preemption notice) to `raysft train` (slow tier): the workers finish their step
and checkpoint, the driver prints one line with the command that resumes, exits 128 + the signal, leaves no Ray
process behind, and the resumed run trains exactly what an uninterrupted one does."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from raysft.track import read_metrics
from raysft.run_folder import step_dir_name
from raysft.training.checkpoint import checkpoint_names, verify
import raysft
from tests.runs import KILLED_RUN_STEPS, REPO, logged_step, losses, start_then_signal_when, tiny_config
from tests.training.test_faults import raysft_command, write_config

pytestmark = pytest.mark.slow
KEEP = ["train.checkpoint_every=4", "train.checkpoints_to_keep=2"]  # a stop mid-interval writes a checkpoint of its own
WORKER_RUN = ["scaling.num_workers=1", *KEEP]
LOCAL_RUN = ["scaling.num_workers=0", *KEEP]


@pytest.mark.parametrize(("signum", "whole_group", "overrides"), [
    (signal.SIGINT, True, WORKER_RUN),  # Ctrl-C in a terminal: the whole foreground process group
    (signal.SIGTERM, False, LOCAL_RUN),  # a preemption notice: the driver alone
], ids=["ctrl-c-to-the-group-ray-train-worker", "sigterm-to-the-driver-local-mode"])
def test_a_signal_checkpoints_says_how_to_resume_and_the_resume_is_exact(
    tiny_model_dir: Path, tmp_path: Path, signum: int, whole_group: bool, overrides: list[str]
) -> None:
    env = {**os.environ, "RAY_ADDRESS": "local"}  # its own Ray, which must be gone with it
    run = tmp_path / "stopped"
    cfg = write_config(tmp_path, tiny_model_dir, run, [*overrides, *KILLED_RUN_STEPS])  # it cannot end on its own
    stopped = start_then_signal_when(raysft_command("train", cfg), env, lambda: logged_step(run) >= 6, signum,
                                     whole_group, timeout_s=400)
    assert stopped.returncode == 128 + signum, stopped.stderr[-3000:]
    (line,) = stopped.raysft_lines()
    assert line.endswith(f"; resume with: raysft train {cfg} --resume"), line
    assert "Traceback" not in stopped.stderr and "core dump" not in stopped.stderr and not stopped.stdout
    # The workers stopped at a step boundary and checkpointed it; nothing beyond train.checkpoints_to_keep is left.
    step = int(re.search(r"stopped at step (\d+)", line).group(1))  # type: ignore[union-attr]
    assert step >= 6 and logged_step(run) == step
    assert verify(run / "checkpoints" / step_dir_name(step))
    assert len(checkpoint_names(str(run / "checkpoints"))) <= 2
    assert not (run / "final").exists()
    # Its local Ray (GCS, raylet, workers, dashboard) went with it.
    _, alive = psutil.wait_procs(stopped.processes, timeout=30)
    assert not alive, [p.info for p in psutil.process_iter(["pid", "name"]) if p in alive]

    # Resumed for 4 more steps; the same steps straight, in local mode in this process.
    resumed = subprocess.run([*raysft_command("train", cfg, "--resume"), "--set", f"train.max_steps={step + 4}"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = raysft.train(tiny_config(tiny_model_dir, tmp_path / "straight", [
        *LOCAL_RUN, *KILLED_RUN_STEPS, f"train.max_steps={step + 4}"]))
    expected, got = losses(straight.history()), losses(read_metrics(run / "metrics.jsonl"))
    assert sorted(got) == sorted(expected) == list(range(1, step + 5))  # no step lost or logged twice
    for at, loss in expected.items():
        assert got[at] == pytest.approx(loss, abs=1e-5)
