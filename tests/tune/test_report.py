"""Sweep results read from the sweep folder alone (raysft.tune.report.summarize): trial status, curves, the best."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from raysft.errors import RunError
from raysft.tune.report import STATUSES, summarize


def sweep_folder(root: Path, metric: str = "eval_loss", mode: str = "min") -> Path:
    (root / "trials").mkdir(parents=True)
    settings = {"metric": metric, "mode": mode, "space": {"train.lr": "choice [1, 2]"}}
    (root / "sweep.yaml").write_text(yaml.safe_dump(settings))
    return root


def trial(sweep: Path, name: str, evals: list[float], *, final: bool = True, error: bool = False,
          started: float = 1000.0, ended: float = 1060.0, metric: str = "eval_loss", interrupted: bool = False) -> None:
    """A trial folder as a sweep leaves it: trial.json, metrics.jsonl (an evaluation at step 0, then one every
    2 steps, a training record between), final/ when it completed, tune/<name>/error.txt when it failed."""
    folder = sweep / "trials" / name
    folder.mkdir()
    info = {"name": name, "params": {"train.lr": len(evals)}, "started": started}
    if interrupted:  # as a sweep stopped by SIGINT/SIGTERM marks its unfinished trials
        info["interrupted"] = ended
    (folder / "trial.json").write_text(json.dumps(info))
    records: list[dict[str, Any]] = [{"step": 0, metric: 99.0}]
    for i, value in enumerate(evals, 1):
        records += [{"step": 2 * i - 1, "loss": 1.0, "num_tokens": 100 * (2 * i - 1)}, {"step": 2 * i, metric: value}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    os.utime(folder / "metrics.jsonl", (ended, ended))
    if final:
        (folder / "final").mkdir()
    if error:
        (sweep / "tune" / name).mkdir(parents=True)
        (sweep / "tune" / name / "error.txt").write_text("Traceback ...")


def test_summarize_reads_each_trials_status_curve_and_totals(tmp_path: Path) -> None:
    sweep = sweep_folder(tmp_path / "sweep")
    trial(sweep, "trial_00000", [0.9, 0.7], started=1000.0, ended=1090.5)
    trial(sweep, "trial_00001", [1.2], final=False)
    trial(sweep, "trial_00002", [], final=False, error=True)
    result = summarize(sweep)
    assert (result.metric, result.mode, result.sweep_dir) == ("eval_loss", "min", sweep.resolve())
    done, stopped, failed = result.trials
    assert [t.status for t in result.trials] == ["completed", "stopped_early", "error"]
    assert done.curve == [(2, 0.9), (4, 0.7)]  # the step-0 evaluation (before training) is not on the curve
    assert (done.steps, done.tokens, done.wall_s) == (4, 300, 90.5)
    assert done.params == {"train.lr": 2} and stopped.last == 1.2 and failed.last is None


def test_a_trial_a_signal_stopped_is_interrupted_until_it_completes(tmp_path: Path) -> None:
    sweep = sweep_folder(tmp_path / "sweep")
    trial(sweep, "trial_00000", [0.9], final=False, interrupted=True)
    trial(sweep, "trial_00001", [0.8], final=False, interrupted=True, error=True)  # an earlier failure, retried
    trial(sweep, "trial_00002", [0.7], final=True, interrupted=True)  # finished as the sweep stopped
    trial(sweep, "trial_00003", [0.6], final=False)  # stopped by the scheduler
    assert [t.status for t in summarize(sweep).trials] == ["interrupted", "interrupted", "completed", "stopped_early"]
    assert "interrupted" in STATUSES


def test_the_best_is_the_completed_trial_with_the_best_final_metric(tmp_path: Path) -> None:
    sweep = sweep_folder(tmp_path / "sweep")
    trial(sweep, "trial_00000", [0.3, 0.8])  # best ever 0.3, but its final adapter is the 0.8 one
    trial(sweep, "trial_00001", [0.6, 0.5])
    trial(sweep, "trial_00002", [0.1], final=False)  # stopped early: no final adapter to be the best
    result = summarize(sweep)
    assert result.best is not None and result.best.name == "trial_00001"
    assert result.trials[0].best("min") == 0.3 and result.trials[0].best("max") == 0.8


def test_the_best_under_mode_max_is_the_highest(tmp_path: Path) -> None:
    sweep = sweep_folder(tmp_path / "sweep", metric="eval_token_accuracy", mode="max")
    trial(sweep, "trial_00000", [0.4, 0.6], metric="eval_token_accuracy")
    trial(sweep, "trial_00001", [0.5, 0.7], metric="eval_token_accuracy")
    assert summarize(sweep).best.name == "trial_00001"  # type: ignore[union-attr]


def test_no_completed_trial_means_no_best(tmp_path: Path) -> None:
    sweep = sweep_folder(tmp_path / "sweep")
    trial(sweep, "trial_00000", [0.5], final=False)
    trial(sweep, "trial_00001", [], error=True, final=False)
    assert summarize(sweep).best is None
    assert summarize(sweep_folder(tmp_path / "empty")).trials == []


def test_a_torn_last_metrics_line_is_dropped_not_fatal(tmp_path: Path) -> None:
    sweep = sweep_folder(tmp_path / "sweep")
    trial(sweep, "trial_00000", [0.5, 0.4], final=False)
    with (sweep / "trials" / "trial_00000" / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 5, "eval_lo')  # a sweep killed mid-append
    assert summarize(sweep).trials[0].curve == [(2, 0.5), (4, 0.4)]


def test_a_folder_that_is_not_a_sweep_is_refused_by_what_it_is(tmp_path: Path) -> None:
    sweep = sweep_folder(tmp_path / "sweep")
    trial(sweep, "trial_00000", [0.5])
    with pytest.raises(RunError, match="is one trial of a sweep; report on the sweep folder"):
        summarize(sweep / "trials" / "trial_00000")
    with pytest.raises(RunError, match="does not exist"):
        summarize(tmp_path / "absent")
