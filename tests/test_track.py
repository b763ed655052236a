"""MLflow tracking (raysft/track.py) on real runs, read back from the real store with MlflowClient; and the
console's lines and tables.

(TensorBoard and W&B are checked end to end in tests/test_cli.py; MLflow in object storage and across a
Ray Train worker restart in tests/test_storage.py; a sweep's nested runs in tests/tune/test_sweep.py.)
"""

from __future__ import annotations

import secrets
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.utils.file_utils import path_to_local_sqlite_uri

import raysft
from raysft.config import flatten
from raysft.errors import ConfigError
from raysft.track import (
    MLFLOW_DIR,
    MLFLOW_RUN_FILE,
    StepClock,
    Tracker,
    eval_line,
    format_duration,
    read_metrics,
    recorded_mlflow_run,
    split_line,
    stats_table,
    step_line,
    without_reported_tracebacks,
)
from raysft.training.preflight import preflight
from tests.runs import assert_mlflow_holds, mlflow_client, mlflow_params, tiny_config

pytestmark = pytest.mark.usefixtures("ray_session")


def test_one_mlflow_run_holds_metrics_jsonl_and_a_resume_continues_it(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # Credentials MLflow would send to a server: they are the environment's alone (this run uses a local store).
    secret = "mlflow-password-never-written-" + secrets.token_hex(8)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secret)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", secret)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # MLflow's own default (./mlflow.db, ./mlruns) would land here
    out = tmp_path / "run"
    common = ["tracking.mlflow=true", "tracking.console=true", "train.eval_every=2", "train.checkpoint_every=2"]
    first = raysft.train(tiny_config(tiny_model_dir, out, common))

    client = mlflow_client(out / MLFLOW_DIR)
    experiment = client.get_experiment_by_name("raysft")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == recorded_mlflow_run(str(out))
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert experiment.artifact_location == (out / MLFLOW_DIR / "artifacts").as_uri()
    # Params: the resolved config, flattened, as config.yaml holds it.
    assert run.data.params == mlflow_params(flatten(yaml.safe_load((out / "config.yaml").read_text())))
    assert run.data.params["train.lr"] == "0.01" and run.data.params["tracking.mlflow"] == "true"
    # Metrics: every metrics.jsonl record at its step, eval records included, the same values.
    records = first.history()
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 2, 4]
    assert_mlflow_holds(client, run.info.run_id, records)

    # --resume (longer) continues the same MLflow run from step 2's checkpoint: steps 3-4 are trained again.
    resumed = raysft.train(tiny_config(tiny_model_dir, out, [*common, "train.max_steps=6", "train.resume=true"]))
    [again] = client.search_runs([experiment.experiment_id])
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert [r["step"] for r in resumed.history()] == list(range(7))
    assert_mlflow_holds(client, run.info.run_id, resumed.history())  # the latest value at each step
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 6 + 2  # MLflow keeps the first 3-4 too

    # The secret is nowhere raysft or MLflow wrote: not in params, tags or the console, no file, not the store.
    run = client.get_run(run.info.run_id)
    assert not any(secret in text for text in [*run.data.params.values(), *run.data.tags.values(), run.info.run_name])
    captured = capfd.readouterr()
    assert secret not in captured.out + captured.err
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert not list(cwd.iterdir())


def test_mlflow_tracking_uri_from_the_environment_wins(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Any tracking URI does (a server in production); another SQLite file here, as no server can be reached.
    elsewhere = tmp_path / "server"
    elsewhere.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", path_to_local_sqlite_uri(str(elsewhere / "mlflow.db")))
    out = tmp_path / "run"
    result = raysft.train(tiny_config(tiny_model_dir, out, [
        "tracking.mlflow=true", "tracking.mlflow_experiment=sft-tiny", f"tracking.mlflow_dir={tmp_path / 'unused'}",
    ]))
    assert (out / MLFLOW_RUN_FILE).is_file() and not (out / MLFLOW_DIR).exists()  # the run's id; the store is elsewhere
    assert not (tmp_path / "unused").exists()
    client = mlflow_client(elsewhere)
    [run] = client.search_runs([client.get_experiment_by_name("sft-tiny").experiment_id])
    assert run.info.run_id == recorded_mlflow_run(str(out))
    assert_mlflow_holds(client, run.info.run_id, result.history())


def test_mlflow_not_installed_is_named_before_ray(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # Python's own "not installed"
    with pytest.raises(ConfigError, match=r"tracking.mlflow: the mlflow package is not installed; pip install"):
        preflight(tiny_config(tiny_model_dir, tmp_path / "run", ["tracking.mlflow=true"]))
    preflight(tiny_config(tiny_model_dir, tmp_path / "run", ["tracking.mlflow=false"]))  # only when asked for


# --- the console (no Ray needed; the real runs' console is checked in tests/test_cli.py) ----------------------


def test_step_line_shows_progress_loss_throughput_and_eta() -> None:
    metrics = {"loss": 1.23456, "lr": 2e-4, "grad_norm": 0.5, "epoch": 0.25, "tokens_per_s": 12345.6,
               "num_tokens": 4096, "trained_tokens": 900, "skipped": 0.0, "aux_loss": 0.125}
    line = step_line(7, 28, metrics, eta_s=125.0)
    assert line == "step 7/28 (25%)  loss 1.235  lr 2.00e-04  grad_norm 0.5  aux_loss 0.125  tokens/s 12,346  eta 2m05s"
    assert step_line(1, 28, {"loss": 2.0}, eta_s=None).endswith("eta ?")  # no step timed yet
    skipped = step_line(3, 28, {"loss": float("nan"), "skipped": 1.0}, 3.0)
    assert skipped.endswith("(update skipped: non-finite gradients)")
    assert eval_line(28, 28, {"loss": 1.0, "eval_loss": 0.51234, "eval_ppl": 1.67}) == \
        "eval at step 28/28  eval_loss 0.5123  eval_ppl 1.67"
    assert [format_duration(s) for s in (0.4, 59.6, 61, 3599, 3600, 90061)] == \
        ["0s", "1m00s", "1m01s", "59m59s", "1h00m", "25h01m"]


def test_eta_counts_steps_since_the_start_but_not_a_first_evaluation() -> None:
    clock = StepClock(start_step=10)  # resumed at step 10: those steps took no time here
    time.sleep(0.3)
    clock.evaluated(10)  # an evaluation before the first step: not a step's time
    assert clock.eta(10, 20) is None
    time.sleep(0.2)
    eta = clock.eta(12, 20)  # 2 steps in ~0.2 s: 8 steps left, ~0.8 s
    assert eta is not None and 0.7 < eta < 1.6, eta
    clock.evaluated(12)  # a later evaluation is part of the run's pace: it does not restart the clock
    assert clock.eta(12, 20) == pytest.approx(eta, rel=0.5)


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


def test_stats_table_holds_every_number_of_the_statistics() -> None:
    stats = {
        "rows_read": {"train": 12_345, "eval": 80},
        "counts": {"train": {"over_length_dropped": 12, "truncated": 0, "no_trained_tokens": 3, "invalid_skipped": 1},
                   "eval": {"over_length_dropped": 0, "truncated": 0, "no_trained_tokens": 0, "invalid_skipped": 0}},
        "examples_kept": {"train": 12_329, "eval": 80},
        "token_length_percentiles": {"train": {"p50": 210, "p90": 400, "p99": 801, "max": 1900},
                                     "eval": {"p50": 190, "p90": 350, "p99": 500, "max": 510}},
        "trained_token_fraction": {"train": 0.41234, "eval": 0.4},
        "rows_after_packing": {"train": 3_001, "eval": 20},
        "packing_efficiency": {"train": 0.97123, "eval": 0.95},
        "tokens_after_packing": {"train": 1_591_000, "eval": 9_728},
    }
    lines = stats_table(stats).splitlines()
    assert lines[0].split() == ["train", "eval"]
    assert "rows read                         12,345     80" in lines
    assert "  dropped (over length)               12      0" in lines
    assert "tokens per example, p99              801    500" in lines
    assert "trained tokens                     41.2%  40.0%" in lines
    assert "tokens after packing           1,591,000  9,728" in lines
    assert split_line({k: v["train"] for k, v in stats.items()}) == (
        "12,345 rows read, 12 dropped (over length), 3 dropped (no trained tokens), 1 skipped (invalid), "
        "12,329 examples kept, 3,001 rows 97.1% full")


def test_tracebacks_of_errors_the_driver_reports_are_dropped_from_forwarded_output() -> None:
    def block(header: str, error: str) -> list[str]:
        return [header, "Traceback (most recent call last):", '  File "loop.py", line 3, in step',
                "    upload()", error]

    outage = ("OSError: When uploading part for key 'run/checkpoints/step_000006/x' in bucket 'b': AWS Error "
              "NETWORK_CONNECTION during UploadPart operation: curlCode: 56, Failure when receiving data from the peer")
    lines = ["[raysft] step 4 loss 1.2",
             *block("2026-12-07 09:05:01 ERROR util.py:252 -- Error in training function:", outage),
             *block("Error in control loop iteration: When initiating multiple part upload", outage),
             *block("Error in training function:", "raysft.errors.RunError: checkpoint step_000004 was made with "
                                                  "different data; start a new train.output_dir"),
             "[raysft] after"]
    assert without_reported_tracebacks(lines) == ["[raysft] step 4 loss 1.2", "[raysft] after"]
    # Any other error keeps its traceback, and so does a request the storage refused.
    bug = block("Error in training function:", "ZeroDivisionError: division by zero")
    refused = block("Error in training function:", "OSError: When reading key 'x': AWS Error ACCESS_DENIED")
    assert without_reported_tracebacks([*bug, *refused]) == [*bug, *refused]
