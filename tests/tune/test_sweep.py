"""Sweeps on a real local Ray: ASHA stops trials, results/best/report are right, resources come back,
and a killed sweep resumes without rerunning finished trials."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import ray
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from raysft.cli import main as cli_main
from raysft.config import flatten
from raysft.run_folder import METRICS_FILE, MLFLOW_DIR, step_dir_name
from raysft.track import read_metrics
from raysft.training.checkpoint import checkpoint_names, verify
from raysft.tune.config import parse_sweep
from raysft.tune.report import SweepResult
from raysft.tune.sweep import sweep
from tests.runs import (
    REPO,
    assert_mlflow_holds,
    logged_step,
    mlflow_client,
    mlflow_params,
    mlflow_steps,
    records_by_step,
    start_then_signal_when,
    step_seconds,
    tiny_config,
)


def tiny_base(model_dir: Path, tmp_path: Path, overrides: list[str]) -> dict[str, Any]:
    """The tiny train config as a sweep base: one Ray Train worker per trial, its own token cache."""
    settings = ["scaling.num_workers=1", f"data.cache_dir={tmp_path / 'token-cache'}", *overrides]
    return tiny_config(model_dir, tmp_path / "unused", settings, rows=64).model_dump(mode="json")


def read_results(sweep_dir: Path) -> list[dict[str, str]]:
    with (sweep_dir / "results.csv").open() as handle:
        return list(csv.DictReader(handle))


def wait_for_free_cpus(timeout_s: float = 60.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        available = ray.available_resources()
        if available.get("CPU", 0.0) == ray.cluster_resources()["CPU"] or time.monotonic() > deadline:
            return available
        time.sleep(1.0)


def assert_mlflow_nests_trials(sweep_dir: Path, result: SweepResult) -> None:
    """One local MLflow store in the sweep folder: the sweep's run, and each trial's nested under it with the
    trial's sampled values as params, its metrics.jsonl as metrics, and how it ended as its status."""
    client = mlflow_client(sweep_dir / MLFLOW_DIR)
    runs = client.search_runs([client.get_experiment_by_name("raysft").experiment_id])
    [parent] = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1 == len(result.trials)
    # The sweep's run: the resolved sweep (search space, base config) as params; it names the best trial.
    resolved = yaml.safe_load((sweep_dir / "sweep.yaml").read_text())
    assert parent.info.run_name == resolved["name"] and parent.info.status == "FINISHED"
    assert parent.data.params == mlflow_params(flatten(resolved))
    assert parent.data.params["space.train.lr"] == "grid [3e-2, 1e-6]"
    assert result.best is not None and parent.data.tags["raysft.best_trial"] == result.best.name
    assert parent.data.metrics["best_eval_loss"] == pytest.approx(result.best.last)
    trials = {trial.name: trial for trial in result.trials}
    assert {child.info.run_name for child in children} == set(trials)
    for child in children:
        trial = trials[child.info.run_name]
        assert child.data.params == mlflow_params(trial.params) and child.data.tags["raysft.trial"] == trial.name
        assert child.info.status == {"completed": "FINISHED", "stopped_early": "KILLED"}[trial.status]
        records = read_metrics(sweep_dir / "trials" / trial.name / "metrics.jsonl")
        if trial.status == "completed":
            assert_mlflow_holds(client, child.info.run_id, records)
        else:  # stopped between its metrics.jsonl line and MLflow at worst: one record short
            logged, expected = mlflow_steps(client, child.info.run_id), records_by_step(records)
            assert logged == {step: expected[step] for step in logged} and len(logged) >= len(expected) - 1


def test_asha_sweep_over_rank_lr_and_seq_len(ray_session: None, tiny_model_dir: Path, tmp_path: Path) -> None:
    base = tiny_base(tiny_model_dir, tmp_path, ["train.max_steps=8", "train.eval_every=2", "tracking.tensorboard=true",
                                                "tracking.mlflow=true"])
    sweep_dir = tmp_path / "sweep"
    cfg = parse_sweep({
        "name": "tiny-asha",
        "base": base,
        "output_dir": str(sweep_dir),
        # Grid points run in order: [good lr, hopeless lr] twice. The second hopeless trial reaches the
        # first rung after both earlier trials recorded theirs there, so ASHA must stop it.
        "space": {"train.lr": "grid [3e-2, 1e-6]", "lora.r": "choice [2, 4]", "data.max_seq_len": "choice [128, 256]"},
        "num_samples": 2,
        "max_concurrent_trials": 2,
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
    })
    result = sweep(cfg)

    rows = read_results(sweep_dir)
    assert len(rows) == 4 and len(result.trials) == 4
    assert list(rows[0]) == ["trial", "status", "train.lr", "lora.r", "data.max_seq_len",
                             "best_eval_loss", "last_eval_loss", "steps", "tokens", "wall_s"]
    stopped = [r for r in rows if r["status"] == "stopped_early"]
    completed = [r for r in rows if r["status"] == "completed"]
    assert stopped, rows  # ASHA stopped at least one trial
    assert all(int(r["steps"]) < 8 for r in stopped) and all(int(r["steps"]) == 8 for r in completed)
    for row in stopped:  # it stopped at the evaluation ASHA stopped it on: its folder holds what Tune saw, no more
        seen_by_tune = [json.loads(line) for line in (sweep_dir / "tune" / row["trial"] / "result.json").open()]
        assert int(row["steps"]) == seen_by_tune[-1]["step"], (row, seen_by_tune[-1])
        assert not (sweep_dir / "trials" / row["trial"] / "final").exists()
    for row in completed:  # a trial's own TorchTrainer polls its worker as often as a plain run's (not Ray's 2 s)
        seconds = step_seconds(read_metrics(sweep_dir / "trials" / row["trial"] / METRICS_FILE))
        assert sum(seconds[step] for step in range(2, 9)) < 7 * 2.0 / 2, seconds
    assert sum(int(r["tokens"]) for r in stopped) < sum(int(r["tokens"]) for r in completed)
    assert {r["data.max_seq_len"] for r in rows} <= {"128", "256"} and {r["lora.r"] for r in rows} <= {"2", "4"}

    # best/ is the completed trial with the lowest final eval loss, and it is a loadable adapter.
    best_row = min(completed, key=lambda r: float(r["last_eval_loss"]))
    assert result.best is not None and result.best.name == best_row["trial"]
    best_dir = sweep_dir / "best"
    assert yaml.safe_load((best_dir / "trial.json").read_text())["name"] == best_row["trial"]
    best_cfg = yaml.safe_load((best_dir / "config.yaml").read_text())
    assert best_cfg["train"]["lr"] == pytest.approx(float(best_row["train.lr"]))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), best_dir)
    assert model.peft_config["default"].r == int(best_row["lora.r"])

    assert (sweep_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert best_row["trial"] in (sweep_dir / "report.md").read_text()
    for row in rows:  # one TensorBoard log and one W&B group per trial/sweep
        trial_dir = sweep_dir / "trials" / row["trial"]
        assert any((trial_dir / "tensorboard").iterdir())
        assert yaml.safe_load((trial_dir / "config.yaml").read_text())["tracking"]["wandb_group"] == "tiny-asha"

    assert_mlflow_nests_trials(sweep_dir, result)

    # Tokenized once: trials with max_seq_len 128 and 256 re-packed the same cached tokens (train + eval).
    assert len(list((tmp_path / "token-cache" / "tokenized").glob("*/manifest.json"))) == 2

    # Stopped trials gave back their workers: the whole cluster is free again, no placement group left.
    available = wait_for_free_cpus()
    assert available.get("CPU") == ray.cluster_resources()["CPU"], available
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())

    # `raysft report` rebuilds the results from the folder alone.
    expected = (sweep_dir / "results.csv").read_text()
    (sweep_dir / "results.csv").unlink()
    (sweep_dir / "report.png").unlink()
    assert cli_main(["report", str(sweep_dir)]) == 0
    assert (sweep_dir / "results.csv").read_text() == expected and (sweep_dir / "report.png").exists()


@pytest.mark.slow  # a sweep of its own (2 trials): about a minute on 2 cores
def test_sweep_ranks_trials_by_a_generation_metric(ray_session: None, tiny_model_dir: Path, tmp_path: Path) -> None:
    # The metric is a key of a user function's dict (tests/metric_functions.py): the characters the trial's model
    # generated, different per trial where exact match would be 0 for every tiny random model. Higher is better.
    generate = ("eval.generate={num_prompts: 4, max_new_tokens: 6, metrics: [exact_match, "
                "{function: 'tests.metric_functions:answer_digest', name: answers}]}")
    base = tiny_base(tiny_model_dir, tmp_path, ["train.max_steps=2", "train.eval_every=2", generate])
    sweep_dir = tmp_path / "sweep"
    cfg = parse_sweep({"name": "tiny-generate", "base": base, "output_dir": str(sweep_dir), "scheduler": "fifo",
                       "space": {"train.lr": "grid [3e-1, 1e-6]"}, "metric": "eval_answers_chars",
                       "max_concurrent_trials": 1})
    assert cfg.mode == "max"
    result = sweep(cfg)
    rows = read_results(sweep_dir)
    assert [r["status"] for r in rows] == ["completed", "completed"]
    assert list(rows[0])[3:5] == ["best_eval_answers_chars", "last_eval_answers_chars"]
    assert len({r["last_eval_answers_chars"] for r in rows}) == 2  # the ranking means something
    best_row = max(rows, key=lambda r: float(r["last_eval_answers_chars"]))
    assert result.best is not None and result.best.name == best_row["trial"]
    for row in rows:  # every trial evaluated with generation at steps 0 and 2
        records = read_metrics(sweep_dir / "trials" / row["trial"] / "metrics.jsonl")
        assert [r["step"] for r in records if "eval_exact_match" in r] == [0, 2]
        assert float(row["last_eval_answers_chars"]) == [r for r in records if r["step"] == 2][0]["eval_answers_chars"]


def _wait_until(condition: Any, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"sweep exited early with {process.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the sweep")
        time.sleep(0.3)


@pytest.mark.slow  # a sweep stopped and resumed, two fresh Ray clusters: about 1.5 minutes on 2 cores
def test_a_sweep_stopped_by_ctrl_c_checkpoints_its_trials_and_resumes_them(tiny_model_dir: Path, tmp_path: Path) -> None:
    base = tiny_base(tiny_model_dir, tmp_path, ["train.max_steps=20", "train.eval_every=10", "train.checkpoint_every=4",
                                                "train.checkpoints_to_keep=2"])
    sweep_dir, sweep_file = tmp_path / "sweep", tmp_path / "stopped.yaml"
    sweep_file.write_text(yaml.safe_dump({"name": "tiny-stopped", "base": base, "output_dir": str(sweep_dir),
                                          "space": {"train.lr": "grid [1e-2]"}, "scheduler": "fifo"}))
    command = [sys.executable, "-m", "raysft", "sweep", str(sweep_file)]
    env = {**os.environ, "RAY_ADDRESS": "local"}
    trial_dir = sweep_dir / "trials" / "trial_00000"

    stopped = start_then_signal_when(command, env, lambda: logged_step(trial_dir) >= 3, signal.SIGINT, whole_group=True,
                                     timeout_s=400)
    output = stopped.stdout + stopped.stderr
    assert stopped.returncode == 130, output[-3000:]
    (line,) = stopped.raysft_lines()
    assert line.endswith(f"; resume with: raysft sweep {sweep_file} --resume"), line
    # Not Tune's own `Tuner.restore(...)` hint, and no pointer to an error file that was never written.
    assert "Tuner.restore" not in output and "error.txt" not in output and "Traceback" not in output
    (row,) = read_results(sweep_dir)
    assert row["status"] == "interrupted"
    assert verify(trial_dir / "checkpoints" / step_dir_name(int(row["steps"])))  # checkpointed where it stopped
    assert len(checkpoint_names(str(trial_dir / "checkpoints"))) <= 2
    _, alive = psutil.wait_procs(stopped.processes, timeout=30)
    assert not alive

    resumed = subprocess.run([*command, "--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert [(r["trial"], r["status"], r["steps"]) for r in read_results(sweep_dir)] == [("trial_00000", "completed", "20")]
    steps = [r["step"] for r in read_metrics(trial_dir / METRICS_FILE)]
    assert steps == sorted(set(steps)) and steps[-1] == 20  # continued from its checkpoint: every step logged once
