"""The tracker (raysft/track.py): each record to metrics.jsonl and the console once.

(TensorBoard and W&B are checked end to end in tests/test_cli.py; MLflow in tests/test_mlflow_run.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from raysft.track import Tracker, read_metrics
from tests.runs import tiny_config

pytestmark = pytest.mark.usefixtures("ray_session")


def test_tracker_prints_each_step_and_evaluation_once_on_stderr(
    tiny_model_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", ["tracking.console=true"])
    (tmp_path / "run").mkdir()
    tracker = Tracker(cfg, tmp_path / "run", total_steps=4, location=str(tmp_path / "run"))
    tracker.log({"eval_loss": 2.0}, 0)
    for step in (1, 2):
        tracker.log({"loss": 1.5, "lr": 1e-3, "tokens_per_s": 100.0}, step)
    tracker.log({"loss": 1.25, "lr": 1e-3, "tokens_per_s": 100.0, "eval_loss": 1.75}, 2)
    tracker.log_text("note")
    tracker.close()
    out, err = capfd.readouterr()
    assert out == ""  # progress goes to stderr; a command's results (stdout) stay clean
    lines = err.splitlines()
    assert lines[0] == "[raysft] eval at step 0/4  eval_loss 2"
    assert lines[1].startswith("[raysft] step 1/4 (25%)  loss 1.5  lr 1.00e-03  tokens/s 100  eta ")
    assert lines[3].startswith("[raysft] step 2/4 (50%)  loss 1.25")
    assert lines[4] == "[raysft] eval at step 2/4  eval_loss 1.75"
    assert lines[5:] == ["[raysft] note"]
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 4  # the file has every record, as before
