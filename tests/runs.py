"""Small train configs for tests: a tiny real model, a slice of real data, fast settings."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from raysft.cli import main
from raysft.config import Config, apply_overrides, parse_config
from raysft.training.trainer import RunResult

REPO = Path(__file__).resolve().parents[1]
"""The project root: commands run from here, shipped YAMLs are read from here."""
SHARED_DATA = REPO.parent / "shared" / "data"
"""The data sets beside the project (../shared/data): read in place, never copied into the project."""


def tiny_config(model_dir: Path, output_dir: Path, overrides: list[str] | None = None, rows: int = 48) -> Config:
    """GSM8K rows on a tiny model, 4 steps, fp32, local mode, no dropout (so runs compare exactly)."""
    raw: dict[str, Any] = {
        "model": {"name_or_path": str(model_dir)},
        "data": {
            "train": {"path": str(SHARED_DATA / "gsm8k" / "train.jsonl"), "limit": rows},
            "eval": {"path": str(SHARED_DATA / "gsm8k" / "test.jsonl"), "limit": 8},
            "max_seq_len": 256,
            # The cache is keyed by content, so sharing it across tests (and sessions) is safe.
            "cache_dir": str(Path(tempfile.gettempdir()) / "raysft-test-token-cache"),
        },
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {
            "output_dir": str(output_dir),
            "micro_batch_size": 2,
            "grad_accum_steps": 1,
            "max_steps": 4,
            "lr": 1e-2,
            "warmup_steps": 1,
        },
        "scaling": {"num_workers": 0},
        "tracking": {"console": False, "tensorboard": False},
    }
    return parse_config(apply_overrides(raw, overrides or []))


# Greedy answers of the tiny random model are gibberish, so exact match is 0 whatever happens: the digest of every
# answer (tests/metric_functions.py, a user function by module:function) is what tells two runs' generations apart.
GENERATE_WITH_DIGEST = ("eval.generate={max_new_tokens: 12, batch_size: 3, metrics: [exact_match, rouge_l, "
                        "{function: 'tests.metric_functions:answer_digest', name: answers}]}")


def generation_scores(result: RunResult) -> dict[int, dict[str, float]]:
    """eval.generate's metrics of every evaluation, by step."""
    return {e["step"]: {k: v for k, v in e.items() if k in {"eval_exact_match", "eval_rouge_l", "eval_answers_digest",
                                                            "eval_answers_chars"}}
            for e in result.history() if "eval_loss" in e}


def losses(history: list[dict[str, Any]]) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def step_seconds(history: list[dict[str, Any]]) -> dict[int, float]:
    """Each logged step's time as the loop measured it (its tokens over its tokens/s), from the previous logged step
    on: the step's own work and the wait for Ray Train to take the previous step's report."""
    seconds, seen = {}, 0
    for entry in (e for e in history if "loss" in e):
        seconds[entry["step"]] = (entry["num_tokens"] - seen) / entry["tokens_per_s"]
        seen = entry["num_tokens"]
    return seconds


def snapshot(*roots: Path) -> dict[str, tuple[bool, int, int]]:
    """Every path under `roots` with its kind, size and mtime: a write, an addition or a deletion shows."""
    return {
        str(p): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
        for root in roots if root.exists() for p in [root, *root.rglob("*")]
    }


def cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    """Run the raysft command line in this process: (exit status, stdout, stderr)."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(code: int, err: str, *named: str | Path) -> None:
    """A refusal as users see it: exit 2, one `raysft: ...` message naming each of `named`, no traceback."""
    assert code == 2, err
    assert "raysft: " in err and "Traceback" not in err, err
    for name in named:
        assert str(name) in err, (name, err)


def start_then_kill_when(command: list[str], env: dict[str, str], ready: Callable[[], bool], timeout_s: float) -> None:
    """Run `command` (raysft, with its own Ray) in a new session, and SIGKILL the whole session, its Ray
    included, once `ready()` holds: a driver killed mid-run, as a crash or `kill -9` leaves it."""
    process = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    try:
        while not ready():
            assert process.poll() is None, f"the command ended (status {process.returncode}) before it could be killed"
            assert time.monotonic() < deadline, "timed out waiting for the moment to kill"
            time.sleep(0.3)
    finally:
        # Every process of the run, not only its session: a Ray worker outside the group would train (and write
        # checkpoints) on for seconds after its driver is gone.
        try:
            tree = psutil.Process(process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        os.killpg(process.pid, signal.SIGKILL)
        for child in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        process.wait()
        psutil.wait_procs(tree, timeout=30)


# A run started this many steps long cannot end before the kill however fast the machine is (the kill comes a few
# steps in); the resume gives it its real length (train.max_steps may change on resume), and a constant learning rate
# keeps every step's values independent of the length it was started with.
KILLED_RUN_STEPS = ["train.max_steps=1000", "train.lr_schedule=constant"]


def kill_mid_run_then_resume(config: Path, env: dict[str, str], ready: Callable[[], bool], run_location: str,
                             more_steps: int = 4) -> tuple[subprocess.CompletedProcess[str], int]:
    """`raysft train config` (written with KILLED_RUN_STEPS) SIGKILLed with its Ray once `ready()` holds, then
    resumed by a fresh driver to `more_steps` past the checkpoint it resumes from (the newest that verifies in
    `run_location`, where the run lives: its output_dir or storage URI): (the finished resume, its max_steps)."""
    from raysft.run_folder import checkpoint_root
    from raysft.training.checkpoint import find_resumable

    command = [sys.executable, "-m", "raysft", "train", str(config)]
    start_then_kill_when(command, env, ready, timeout_s=400)
    newest, _ = find_resumable(checkpoint_root(run_location))
    assert newest is not None, f"no checkpoint that verifies in {run_location} after the kill"
    max_steps = int(newest.rstrip("/").rsplit("_", 1)[1]) + more_steps  # .../step_000012 -> 12 + more_steps
    resumed = subprocess.run([*command, "--resume", "--set", f"train.max_steps={max_steps}"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
    return resumed, max_steps


def logged_step(run_dir: Path) -> int:
    """The last step in the run's metrics.jsonl (0 before the first)."""
    from raysft.track import read_metrics

    metrics = run_dir / "metrics.jsonl"
    return max((record["step"] for record in read_metrics(metrics)), default=0) if metrics.exists() else 0


@dataclass
class Signalled:
    """How a command stopped by a signal ended."""

    returncode: int
    stdout: str
    stderr: str
    processes: list[psutil.Process]
    """Every process it had started when signalled (its local Ray's among them)."""

    def raysft_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("raysft: ")]


def start_then_signal_when(command: list[str], env: dict[str, str], ready: Callable[[], bool], signum: int,
                           whole_group: bool, timeout_s: float) -> Signalled:
    """Run `command` in a new session and, once `ready()` holds, send it `signum`: to its whole process group as
    a Ctrl-C in a terminal does (`whole_group`), or to the command alone as a preemption notice does. Waits for it
    to end; whatever is left of it after `timeout_s` is killed."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, stdout=out, stderr=err, text=True)
        deadline = time.monotonic() + timeout_s
        try:
            while not ready():
                assert process.poll() is None, f"the command ended (status {process.returncode}) before the signal"
                assert time.monotonic() < deadline, "timed out waiting for the moment to signal"
                time.sleep(0.3)
            started = psutil.Process(process.pid).children(recursive=True)
            (os.killpg if whole_group else os.kill)(process.pid, signum)
            returncode = process.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        out.seek(0)
        err.seek(0)
        return Signalled(returncode, out.read(), err.read(), started)


class WorkerKiller:
    """Kill this machine's Ray Train worker processes once `ready()` holds, from a background thread: a worker
    lost mid-run the way an OOM kill or a lost node loses it, injected from outside the training code.

    Use as a context manager around the run; `killed` lists the pids it SIGKILLed (empty: the moment never
    came). Only one Ray runs on the test machine at a time, so every Ray Train worker found is the run's.
    """

    def __init__(self, ready: Callable[[], bool], poll_s: float = 0.05):
        self.ready, self.poll_s = ready, poll_s
        self.killed: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            if self.ready():
                for process in psutil.process_iter(["pid", "cmdline"]):
                    # Ray titles each actor's process after its class: "ray::RayTrainWorker...".
                    if any("RayTrainWorker" in part for part in process.info["cmdline"] or []):
                        process.kill()
                        self.killed.append(process.info["pid"])
                if self.killed:
                    return
            time.sleep(self.poll_s)

    def __enter__(self) -> "WorkerKiller":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def kill_workers_after_checkpoint(train: Callable[[], object], run_folder: Path, step: int) -> None:
    """Run `train` (a run with no restarts allowed) and kill its Ray Train workers from outside once its
    checkpoint `step` is stored: the run must end in TrainingFailedError, with that checkpoint kept."""
    import ray.train

    stored = run_folder / "checkpoints" / f"step_{step:06d}" / "manifest.json"
    with WorkerKiller(stored.exists) as killer:
        with pytest.raises(ray.train.TrainingFailedError):
            train()
    assert killer.killed


def mlflow_client(store_dir: Path) -> Any:
    """A client of the local MLflow store (mlflow.db) in `store_dir`."""
    from mlflow import MlflowClient
    from mlflow.utils.file_utils import path_to_local_sqlite_uri

    assert (store_dir / "mlflow.db").is_file(), store_dir
    return MlflowClient(tracking_uri=path_to_local_sqlite_uri(str(store_dir / "mlflow.db")))


def mlflow_steps(client: Any, run_id: str) -> dict[int, dict[str, float]]:
    """An MLflow run's metrics read back as metrics.jsonl holds them: step -> {key: value}, the latest value
    logged at each step (a step redone after a resume is logged again)."""
    steps: dict[int, dict[str, tuple[int, float]]] = {}
    for key in client.get_run(run_id).data.metrics:
        for point in client.get_metric_history(run_id, key):
            seen = steps.setdefault(point.step, {}).get(key)
            if seen is None or point.timestamp >= seen[0]:
                steps[point.step][key] = (point.timestamp, point.value)
    return {step: {key: value for key, (_, value) in metrics.items()} for step, metrics in steps.items()}


def records_by_step(records: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """metrics.jsonl records as `mlflow_steps` reads an MLflow run back."""
    return {record["step"]: {k: float(v) for k, v in record.items() if k != "step"} for record in records}


def assert_mlflow_holds(client: Any, run_id: str, records: list[dict[str, Any]]) -> None:
    """The MLflow run holds every metrics.jsonl record (`records`) at its step, every key, the same value, and
    nothing else."""
    assert mlflow_steps(client, run_id) == records_by_step(records)


def mlflow_params(values: dict[str, Any]) -> dict[str, str]:
    """`values` as raysft logs them as MLflow params: strings as they are, the rest as JSON (true, null, [..])."""
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in values.items()}
