"""Runs on object storage, against a real S3-compatible server (moto's, on a loopback port, started here).

Every run here is a fresh `raysft` process with its own Ray: the S3 endpoint and keys reach Ray's
workers through the environment, as credentials do on a cloud cluster.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from raysft import storage
from raysft.data.cache import CachedTable
from raysft.training.trainer import train as train_in_process
from raysft.training.checkpoint import checkpoint_at, checkpoint_names, find_resumable, verify
from raysft.errors import RunError
from raysft.track import read_metrics
from tests.runs import (
    KILLED_RUN_STEPS,
    REPO,
    SHARED_DATA,
    WorkerKiller,
    assert_mlflow_holds,
    assert_refused,
    cli,
    kill_mid_run_then_resume,
    losses,
    mlflow_client,
    start_then_kill_when,
    tiny_config,
)
from tests.s3server import BUCKET, Outage, s3_env, start_moto


@pytest.fixture
def s3_here(s3: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    return s3


def raysft(*args: str | Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "raysft", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "RAY_ADDRESS": "local", **env})


def write_config(tmp_path: Path, model_dir: Path, name: str, overrides: list[str]) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny_config(model_dir, tmp_path / name, overrides).model_dump(mode="json")))
    return path


def test_storage_round_trip(s3_here: dict[str, str], tmp_path: Path) -> None:
    root = f"s3://{BUCKET}/round-trip"
    storage.write_bytes(storage.join(root, "a", "b.txt"), b"hello")
    assert storage.exists(storage.join(root, "a", "b.txt")) and storage.is_dir(storage.join(root, "a"))
    assert storage.read_bytes(storage.join(root, "a", "b.txt")) == b"hello"
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "x.bin").write_bytes(b"\0\1")
    storage.upload(tmp_path / "folder", storage.join(root, "folder"))
    assert storage.list_dir(root) == ["a", "folder"]
    storage.download(storage.join(root, "folder"), tmp_path / "back")
    assert (tmp_path / "back" / "x.bin").read_bytes() == b"\0\1"
    storage.remove(storage.join(root, "folder"))
    assert not storage.exists(storage.join(root, "folder"))


def test_generate_reads_the_base_model_of_a_run_in_the_bucket(
    s3_here: dict[str, str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """`raysft generate --adapter s3://.../RUN/final` without --model: the base model comes from RUN/config.yaml."""
    import argparse

    from raysft.cli import _generate_model

    run = f"s3://{BUCKET}/generate-run"
    cfg = tiny_config(tiny_model_dir, tmp_path / "run")
    storage.write_bytes(storage.join(run, "config.yaml"), yaml.safe_dump(cfg.model_dump(mode="json")).encode())
    args = argparse.Namespace(model=None, adapter=f"{run}/final", gguf_file=None, trust_remote_code=False)
    model, key = _generate_model(args)
    assert model.name_or_path == cfg.model.name_or_path and "config.yaml" in key


@pytest.fixture
def outage(s3: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Outage]:
    """A proxy in front of the S3 server whose outages the test switches; this process talks to the server
    directly (its checks never meet an outage), what it starts goes through `outage.endpoint`."""
    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    proxy = Outage(s3["AWS_ENDPOINT_URL"])
    yield proxy
    proxy.close()


def test_storage_requests_ride_out_an_outage_and_stop_after_their_budget(
    outage: Outage, monkeypatch: pytest.MonkeyPatch
) -> None:
    location = f"s3://{BUCKET}/outage/a.txt"
    storage.write_bytes(location, b"kept")
    monkeypatch.setenv("AWS_ENDPOINT_URL", outage.endpoint)
    outage.down()
    read: list[bytes] = []
    reader = threading.Thread(target=lambda: read.append(storage.read_bytes(location)))
    reader.start()
    outage.wait_refused(6, timeout_s=60)  # the read met the outage six times (the SDK's own default gives up at 3)
    outage.up()
    reader.join(timeout=60)
    assert read == [b"kept"]

    outage.down()
    with storage.retry_budget(0.5), pytest.raises(OSError) as gave_up:
        storage.read_bytes(location)
    assert storage.is_transient(gave_up.value) and outage.refused > 6
    outage.up()
    # A request the storage refuses is not an outage: raised as it is, at once.
    with pytest.raises(OSError) as refused:
        storage.write_bytes("s3://no-such-bucket-here/a.txt", b"x")
    assert not storage.is_transient(refused.value)


def test_storage_retry_budget_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(storage.RETRY_ENV, "1")
    assert storage.retry_budget_s() == 1.0 and storage.s3_attempts(1.0) == 5
    monkeypatch.setenv(storage.RETRY_ENV, "soon")
    with pytest.raises(RunError, match=storage.RETRY_ENV):
        storage.retry_budget_s()
    monkeypatch.delenv(storage.RETRY_ENV)
    assert storage.retry_budget_s() == storage.DEFAULT_RETRY_S
    # Ray Train gets the file system pickled: its retries must travel with it.
    import pickle

    fs = storage.retrying(pafs.S3FileSystem(endpoint_override="http://127.0.0.1:9", region="us-east-1"))
    assert pickle.loads(pickle.dumps(fs)).attempts == storage.s3_attempts(storage.DEFAULT_RETRY_S) == 13


def run_until(command: list[str], env: dict[str, str], moment: Callable[[], bool], timeout_s: float = 400) -> subprocess.Popen[str]:
    """Start `command`; return once `moment()` holds, the command still running."""
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout_s
    while not moment():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            out, err = process.communicate()
            pytest.fail(f"the moment never came (status {process.returncode}): {err[-3000:]}")
        time.sleep(0.1)
    return process


def logged_step(location: str, step: int) -> Callable[[], bool]:
    """Whether the run's metrics.jsonl in storage has reached `step` (rank 0 copies it there at each checkpoint)."""
    def reached() -> bool:
        metrics = storage.join(location, "metrics.jsonl")
        return storage.exists(metrics) and any(json.loads(line).get("step", 0) >= step
                                               for line in storage.read_bytes(metrics).decode().splitlines())
    return reached


OUTAGE_RUN = ["scaling.num_workers=1", "train.max_steps=16", "train.checkpoint_every=2"]


@pytest.mark.slow  # two runs on a fresh Ray each: about a minute on 2 cores
def test_run_on_s3_rides_out_a_storage_outage(outage: Outage, s3: dict[str, str], tiny_model_dir: Path, tmp_path: Path) -> None:
    straight = raysft("train", write_config(tmp_path, tiny_model_dir, "straight", OUTAGE_RUN), env=s3)
    assert straight.returncode == 0, straight.stderr[-3000:]

    location = f"s3://{BUCKET}/runs/outage"
    cfg = write_config(tmp_path, tiny_model_dir, "home", [*OUTAGE_RUN, f"scaling.storage_path={location}"])
    command = [sys.executable, "-m", "raysft", "train", str(cfg)]
    env = {**os.environ, "RAY_ADDRESS": "local", **s3, "AWS_ENDPOINT_URL": outage.endpoint}
    # The storage goes away once step 4's checkpoint is in it, and comes back only after the run's requests met
    # the outage ten times: more than the three attempts pyarrow and Ray Train make by themselves.
    process = run_until(command, env, lambda: storage.exists(f"{location}/checkpoints/step_000004/manifest.json"))
    outage.down()
    outage.wait_refused(10, timeout_s=120)
    outage.up()
    out, err = process.communicate(timeout=400)
    assert process.returncode == 0, err[-3000:]

    expected = losses(read_metrics(tmp_path / "straight" / "metrics.jsonl"))
    got = losses(read_metrics(tmp_path / "home" / "metrics.jsonl"))
    assert sorted(got) == sorted(expected) == list(range(1, 17))
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, abs=1e-5)
    adapter, expected_adapter = (load_file(str(tmp_path / name / "final" / "adapter_model.safetensors"))
                                 for name in ("home", "straight"))
    assert adapter.keys() == expected_adapter.keys()
    for name, tensor in expected_adapter.items():
        torch.testing.assert_close(adapter[name], tensor, rtol=0, atol=1e-6)


@pytest.mark.slow  # one run on a fresh Ray: about 40 s on 2 cores
def test_run_on_s3_stops_cleanly_when_the_storage_stays_away(
    outage: Outage, s3: dict[str, str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    location = f"s3://{BUCKET}/runs/gone"
    # Every checkpoint kept (none pruned while the test looks): all but the one being written may be checked.
    cfg = write_config(tmp_path, tiny_model_dir, "home", [*OUTAGE_RUN, "train.checkpoints_to_keep=null",
                                                           f"scaling.storage_path={location}"])
    command = [sys.executable, "-m", "raysft", "train", str(cfg)]
    env = {**os.environ, "RAY_ADDRESS": "local", **s3, "AWS_ENDPOINT_URL": outage.endpoint, storage.RETRY_ENV: "1"}
    # Step 6 in the bucket's metrics: rank 0 is past step 4's report, so step 4's checkpoint is whole there.
    process = run_until(command, env, logged_step(location, 6))
    outage.down()
    out, err = process.communicate(timeout=400)
    assert_refused(process.returncode, err, "scaling.storage_path", location, storage.RETRY_ENV, "--resume")
    assert outage.refused > 0
    outage.up()

    # What was written before the outage verifies; only the checkpoint being written when it began may not.
    root = storage.join(location, "checkpoints")
    names = checkpoint_names(root)
    verified = []
    for name in names:
        with checkpoint_at(storage.join(root, name)).as_directory() as local:
            if verify(Path(local)):
                verified.append(name)
    assert "step_000004" in verified and set(names[:-1]) <= set(verified)
    assert find_resumable(root)[0] == storage.join(root, verified[-1])


def test_data_read_from_s3_and_cached_in_s3(s3_here: dict[str, str], tiny_model_dir: Path, tmp_path: Path) -> None:
    # Sources under an s3:// prefix (a gzipped JSONL and a Parquet file) are read by Ray Data's tasks, which get
    # the endpoint and keys from the environment; the tokenized and packed tables go to an s3:// cache.
    lines = (SHARED_DATA / "gsm8k" / "train.jsonl").read_text().splitlines()[:40]
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines[:20]) + "\n").encode()))
    pq.write_table(pa.Table.from_pylist([json.loads(line) for line in lines[20:]]), tmp_path / "b.parquet")
    for name in ("a.jsonl.gz", "b.parquet"):
        storage.upload(tmp_path / name, f"s3://{BUCKET}/data/{name}")
    cache = f"s3://{BUCKET}/cache"
    config = write_config(tmp_path, tiny_model_dir, "s3data",
                          [f"data.train.path=s3://{BUCKET}/data/", "data.train.limit=null", "data.eval=null",
                           f"data.cache_dir={cache}"])
    done = raysft("data", config, "--json", env=s3_here)
    assert done.returncode == 0, done.stderr[-3000:]
    stats = json.loads(done.stdout[: done.stdout.rindex("}") + 1])
    assert stats["rows_read"]["train"] == 40 and stats["counts"]["train"]["invalid_skipped"] == 0
    (packed_key,) = storage.list_dir(storage.join(cache, "packed"))
    table = CachedTable.open(storage.join(cache, "packed", packed_key))
    assert table is not None and table.num_rows == stats["rows_after_packing"]["train"]
    assert sum(table.read(0, table.num_rows, ["num_tokens"]).column("num_tokens").to_pylist()) == \
        stats["tokens_after_packing"]["train"]
    assert not (REPO / "s3:").exists() and not Path("s3:").exists()  # nothing written to a folder named after the URI


def test_bad_storage_fails_before_ray_naming_the_key(
    s3_here: dict[str, str], capsys: pytest.CaptureFixture[str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, tiny_model_dir, "run", [])
    for location, reason in [("s3://no-such-bucket-here/run", "cannot write there"),
                             ("foo://bucket/run", "not a storage location")]:
        code, _, err = cli(capsys, "train", cfg, "--set", f"scaling.storage_path={location}")
        assert_refused(code, err, "scaling.storage_path", location, reason)
    assert not list(tmp_path.glob("**/s3:*")) and not (REPO / "s3:").exists()  # never a local folder named after a URI


def test_sweep_in_the_bucket_needs_an_mlflow_server(
    s3_here: dict[str, str], capsys: pytest.CaptureFixture[str], tiny_model_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    # Trials on any node cannot share one local SQLite store: refused before Ray starts, naming the way out.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    base = tiny_config(tiny_model_dir, tmp_path / "unused", ["scaling.num_workers=1", "train.eval_every=2",
                                                             "tracking.mlflow=true",
                                                             f"scaling.storage_path=s3://{BUCKET}/sweeps"])
    path = tmp_path / "sweep.yaml"
    sweep = {"name": "s", "base": base.model_dump(mode="json"), "output_dir": str(tmp_path / "sweep"),
             "space": {"train.lr": "choice [1e-3, 1e-2]"}}
    path.write_text(yaml.safe_dump(sweep))
    code, _, err = cli(capsys, "sweep", path)
    assert_refused(code, err, "base.tracking.mlflow", "MLFLOW_TRACKING_URI")
    assert not (tmp_path / "sweep").exists()


def test_credentials_the_server_refuses(capsys: pytest.CaptureFixture[str], tiny_model_dir: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    server, endpoint = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})  # this server checks keys
    try:
        for key, value in s3_env(endpoint).items():
            monkeypatch.setenv(key, value)
        code, _, err = cli(capsys, "train", write_config(tmp_path, tiny_model_dir, "run", []),
                           "--set", f"scaling.storage_path=s3://{BUCKET}/run")
        assert_refused(code, err, "scaling.storage_path", "credentials")
    finally:
        server.kill()
        server.wait()


def test_run_on_s3_survives_a_worker_kill_and_exports_from_the_bucket(
    s3: dict[str, str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    common = ["scaling.num_workers=1", "train.max_steps=16", "train.checkpoint_every=2"]
    straight = raysft("train", write_config(tmp_path, tiny_model_dir, "straight", common), env=s3)
    assert straight.returncode == 0, straight.stderr[-3000:]

    location = f"s3://{BUCKET}/runs/recovered"
    cfg = write_config(tmp_path, tiny_model_dir, "home", [*common, "scaling.max_failures=1", "tracking.console=true",
                                                           "tracking.mlflow=true", f"scaling.storage_path={location}"])
    with pytest.MonkeyPatch.context() as patch:
        for key, value in s3.items():
            patch.setenv(key, value)  # the watcher reads the bucket too
        # Once step 4's checkpoint is in the bucket, step 2's is surely registered with Ray Train (each report
        # is a barrier), so the restart has a checkpoint to resume from.
        in_bucket = storage.join(location, "checkpoints", "step_000004", "manifest.json")
        with WorkerKiller(lambda: storage.exists(in_bucket), poll_s=0.2) as killer:
            done = raysft("train", cfg, env=s3)
    assert done.returncode == 0, done.stderr[-3000:]
    assert killer.killed  # the worker died once and its restart resumed from the bucket's checkpoint
    assert "resuming from step_" in done.stdout + done.stderr

    with pytest.MonkeyPatch.context() as patch:
        for key, value in s3.items():
            patch.setenv(key, value)
        run_files = {"config.yaml", "data_stats.json", "metrics.jsonl", "final", "checkpoints", "mlflow",
                     "mlflow_run.json"}
        assert run_files <= set(storage.list_dir(location))
        assert storage.exists(storage.join(location, "mlflow", "mlflow.db"))  # rank 0's local store, uploaded
        newest = sorted(storage.list_dir(storage.join(location, "checkpoints")))[-1]
        manifest = json.loads(storage.read_bytes(storage.join(location, "checkpoints", newest, "manifest.json")))
        assert newest == f"step_{manifest['step']:06d}"
    expected = losses(read_metrics(tmp_path / "straight" / "metrics.jsonl"))
    got = losses(read_metrics(tmp_path / "home" / "metrics.jsonl"))  # copied home when the run ended
    assert sorted(got) == sorted(expected) == list(range(1, 17))
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, abs=1e-5)
    assert not list(REPO.glob("s3:*")) and not list(tmp_path.glob("**/s3:*"))
    # MLflow: one run across the worker restart, its store copied home with the results.
    client = mlflow_client(tmp_path / "home" / "mlflow")
    [run] = client.search_runs([client.get_experiment_by_name("raysft").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "home"
    assert_mlflow_holds(client, run.info.run_id, read_metrics(tmp_path / "home" / "metrics.jsonl"))

    merged = tmp_path / "merged"
    exported = raysft("export", location, "--merge", merged, env=s3)
    assert exported.returncode == 0, exported.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == model.config.vocab_size
    adapter = load_file(str(tmp_path / "home" / "final" / "adapter_model.safetensors"))
    assert adapter  # the local copy of final/ holds the adapter

    generated = raysft("generate", "--model", tiny_model_dir, "--adapter", f"{location}/final",
                       "--prompt", "What is 2+2?", "--max-new-tokens", "4", env=s3)
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert "> What is 2+2?" in generated.stdout


@pytest.mark.slow
def test_run_on_s3_killed_with_its_driver_resumes_from_the_bucket(s3: dict[str, str], tiny_model_dir: Path, tmp_path: Path) -> None:
    common = ["scaling.num_workers=1", "train.lr_schedule=constant", "train.checkpoint_every=2"]
    location = f"s3://{BUCKET}/runs/killed"
    cfg = write_config(tmp_path, tiny_model_dir, "home", [*common, *KILLED_RUN_STEPS, f"scaling.storage_path={location}"])
    with pytest.MonkeyPatch.context() as patch:
        for key, value in s3.items():
            patch.setenv(key, value)
        # A fresh process (a new driver: nothing of the first one's local state is needed) resumes from the bucket.
        resumed, max_steps = kill_mid_run_then_resume(
            cfg, {**os.environ, "RAY_ADDRESS": "local", **s3},
            lambda: storage.exists(f"{location}/checkpoints/step_000004/manifest.json"), location)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert storage.exists(f"{location}/final/adapter_model.safetensors")
    # The same steps straight, in local mode in this process (one Ray worker trains as local mode does).
    straight = train_in_process(tiny_config(tiny_model_dir, tmp_path / "straight", [
        *common, "scaling.num_workers=0", f"train.max_steps={max_steps}"]))
    expected = losses(straight.history())
    got = losses(read_metrics(tmp_path / "home" / "metrics.jsonl"))
    assert sorted(got) == sorted(expected) == list(range(1, max_steps + 1))
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, abs=1e-5)


@pytest.mark.slow  # two fresh Ray clusters and 2 x 30 steps: about 5 minutes on 2 cores
def test_sweep_on_s3_killed_and_resumed_by_a_fresh_driver(s3: dict[str, str], tiny_model_dir: Path, tmp_path: Path) -> None:
    import shutil

    storage_root = f"s3://{BUCKET}/sweeps"
    base = tiny_config(tiny_model_dir, tmp_path / "unused", [
        "scaling.num_workers=1", "train.max_steps=30", "train.eval_every=10", "train.checkpoint_every=5",
        f"scaling.storage_path={storage_root}", f"data.cache_dir={tmp_path / 'token-cache'}",
    ]).model_dump(mode="json")
    sweep_dir = tmp_path / "sweep"
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "s3-resume", "base": base, "output_dir": str(sweep_dir), "space": {"train.lr": "grid [3e-2, 1e-2]"},
        "max_concurrent_trials": 1, "scheduler": "fifo",
    }))
    home = f"{storage_root}/s3-resume"
    first, second = f"{home}/trials/trial_00000", f"{home}/trials/trial_00001"
    command = [sys.executable, "-m", "raysft", "sweep", str(sweep_file)]
    env = {**os.environ, "RAY_ADDRESS": "local", **s3}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in s3.items():
            patch.setenv(key, value)
        start_then_kill_when(command, env, lambda: storage.exists(f"{first}/final") and storage.exists(
            f"{second}/checkpoints/step_000005/manifest.json"), timeout_s=450)
        assert not storage.exists(f"{second}/final"), "trial 1 finished before the kill; the test needs more steps"
        first_metrics = storage.read_bytes(f"{first}/metrics.jsonl")

    shutil.rmtree(sweep_dir)  # a fresh driver machine: nothing local is left, the bucket has it all
    resumed = subprocess.run([*command, "--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    rows = (sweep_dir / "results.csv").read_text().splitlines()[1:]
    assert [row.split(",")[:2] for row in rows] == [["trial_00000", "completed"], ["trial_00001", "completed"]], rows
    assert (sweep_dir / "best" / "adapter_model.safetensors").exists()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in s3.items():
            patch.setenv(key, value)
        assert storage.read_bytes(f"{first}/metrics.jsonl") == first_metrics  # the finished trial was not rerun
        steps = [json.loads(line)["step"] for line in storage.read_bytes(f"{second}/metrics.jsonl").decode().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 30  # continued from its checkpoint, every step once
    reported = subprocess.run([sys.executable, "-m", "raysft", "report", home], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
    assert reported.returncode == 0, reported.stderr[-3000:]
    assert "trial_00001,completed" in reported.stdout  # results.csv, rebuilt from the bucket alone
