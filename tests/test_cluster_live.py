"""Real `ray start` clusters on this machine: the fake_multinode autoscaler adding and removing nodes for a
sweep, and `ray job submit` of a train run to a token-protected head.

Each test starts its own head with a dedicated --temp-dir and, when it ends (pass or fail), kills exactly the
processes of that cluster: never `ray stop`, which would stop every Ray on the machine.
"""

from __future__ import annotations

import csv
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from tests.runs import REPO, tiny_config
from tests.s3server import BUCKET, free_port

RAY = str(Path(sys.executable).with_name("ray"))
# Every process of a test cluster carries this variable (Ray passes its environment down to raylets,
# workers and the autoscaler's fake nodes); the cleanup finds them by it, even after setproctitle.
MARKER = "RAYSFT_LIVE_CLUSTER"
# The fake_multinode provider connects its worker nodes to the GCS on this fixed port.
FAKE_CLUSTER_GCS_PORT = 6379
IDLE_TIMEOUT_S = 30  # idle_timeout_minutes: 0.5 in cluster/local-autoscaling.yaml

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Cluster:
    temp_dir: Path
    env: dict[str, str]  # for clients: the token, and the marker so that cleanup also finds them
    token: str
    dashboard: str = ""
    gcs_address: str = ""
    log: list[str] = field(default_factory=list)

    def get(self, path: str, token: str | None = None) -> Any:
        """GET the dashboard's HTTP API as a token holder would."""
        request = urllib.request.Request(self.dashboard + path)
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())


def _cluster_processes(temp_dir: Path) -> list[psutil.Process]:
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if str(temp_dir) in " ".join(proc.cmdline()) or proc.environ().get(MARKER) == str(temp_dir):
                found[proc.pid] = proc
                found.update({child.pid: child for child in proc.children(recursive=True)})
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def kill_cluster(temp_dir: Path) -> list[psutil.Process]:
    """SIGKILL every process of the cluster under `temp_dir`; return what is still alive (nothing)."""
    for _ in range(3):  # a dying autoscaler may still spawn a node: sweep again
        procs = _cluster_processes(temp_dir)
        if not procs:
            return []
        for proc in procs:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)
        time.sleep(1)
    return _cluster_processes(temp_dir)


@contextmanager
def ray_head(args: list[str], extra_env: dict[str, str]) -> Iterator[Cluster]:
    """`ray start --head` with token auth and its own --temp-dir; its processes are killed on exit."""
    # Short: Ray's socket paths live under it and a Unix socket path is limited to 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="rsft-", dir="/tmp"))
    token = secrets.token_hex(32)
    token_file = temp_dir / "auth_token"  # RAY_AUTH_TOKEN_PATH: ~/.ray stays untouched
    token_file.write_text(token)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file), MARKER: str(temp_dir),
                "RAY_USAGE_STATS_ENABLED": "0"})
    cluster = Cluster(temp_dir=temp_dir, env=env, token=token)
    dashboard_port = free_port()
    try:
        start = subprocess.run(
            [RAY, "start", "--head", f"--temp-dir={temp_dir}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats", *args],
            check=False, cwd=REPO, env={**env, **extra_env}, capture_output=True, text=True, timeout=180,
        )
        assert start.returncode == 0, start.stdout[-3000:] + start.stderr[-3000:]
        cluster.dashboard = f"http://127.0.0.1:{dashboard_port}"
        with (temp_dir / "ray_current_cluster").open() as handle:
            cluster.gcs_address = handle.read().strip()
        yield cluster
    finally:
        left = kill_cluster(temp_dir)
        assert not left, f"processes of {temp_dir} still alive: {[p.pid for p in left]}"
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)


def alive_workers(cluster: Cluster) -> int:
    """Worker nodes (not the head) the cluster holds now, from the State API."""
    data = cluster.get("/api/v0/nodes?limit=100&detail=false", cluster.token)
    nodes = data["data"]["result"]["result"]
    return sum(1 for node in nodes if node["state"] == "ALIVE" and not node["is_head_node"])


class NodeSampler(threading.Thread):
    """Samples the number of alive worker nodes every `every` seconds: [(seconds since start, count)]."""

    def __init__(self, cluster: Cluster, every: float = 1.0):
        super().__init__(daemon=True)
        self.cluster, self.every = cluster, every
        self.t0, self.t0_wall = time.monotonic(), time.time()
        self.samples: list[tuple[float, int]] = []
        self.errors: list[str] = []
        self.done = threading.Event()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.samples.append((self.now(), alive_workers(self.cluster)))
            except (OSError, KeyError, ValueError) as err:  # the dashboard busy for a moment on 2 cores
                self.errors.append(repr(err))
            self.done.wait(self.every)

    def latest(self) -> int | None:
        return self.samples[-1][1] if self.samples else None

    def changes(self) -> list[tuple[float, int]]:
        out: list[tuple[float, int]] = []
        for t, n in self.samples:
            if not out or out[-1][1] != n:
                out.append((t, n))
        return out


def test_local_autoscaler_adds_nodes_for_a_sweep_and_removes_them_when_idle(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if port_in_use(FAKE_CLUSTER_GCS_PORT):
        pytest.fail(f"port {FAKE_CLUSTER_GCS_PORT} is taken: the fake_multinode cluster needs it for its GCS")
    base = tiny_config(tiny_model_dir, tmp_path / "unused", [
        # Its own token cache: the sweep's Ray Data tokenization also has to wait for a node.
        "scaling.num_workers=1", "train.max_steps=4", "train.eval_every=2", f"data.cache_dir={tmp_path / 'token-cache'}",
    ]).model_dump(mode="json")
    sweep_dir = tmp_path / "sweep"
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "tiny-autoscale",
        "base": base,
        "output_dir": str(sweep_dir),
        "space": {"train.lr": "grid [1e-2, 3e-2]"},
        "max_concurrent_trials": 2,
        "scheduler": {"name": "fifo"},
    }))

    with ray_head(
        ["--num-cpus=0", f"--port={FAKE_CLUSTER_GCS_PORT}",
         f"--autoscaling-config={REPO / 'cluster' / 'local-autoscaling.yaml'}"],
        {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"},
    ) as cluster:
        sampler = NodeSampler(cluster)
        sampler.start()
        try:
            deadline = time.monotonic() + 60
            while sampler.latest() is None and time.monotonic() < deadline:
                time.sleep(0.5)
            assert sampler.latest() == 0, (sampler.samples, sampler.errors)  # the head alone, no CPU for work

            sweep_start = sampler.now()
            run = subprocess.run(
                [sys.executable, "-m", "raysft", "sweep", str(sweep_file)], check=False, cwd=REPO,
                env={**cluster.env, "RAY_ADDRESS": cluster.gcs_address},
                capture_output=True, text=True, timeout=600,
            )
            sweep_end = sampler.now()
            assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]

            # Idle nodes go after idle_timeout_minutes (30 s) and an autoscaler round or two.
            deadline = time.monotonic() + IDLE_TIMEOUT_S + 120
            while sampler.latest() != 0 and time.monotonic() < deadline:
                time.sleep(1)
            time.sleep(3)  # one more sample or two at zero
        finally:
            sampler.done.set()
            sampler.join()

    with (sweep_dir / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    trials = {}  # trial -> (start, end of its last metrics write), on the sampler's clock
    for row in rows:
        started = json.loads((sweep_dir / "trials" / row["trial"] / "trial.json").read_text())["started"]
        trials[row["trial"]] = (started - sampler.t0_wall, started - sampler.t0_wall + float(row["wall_s"]))
    changes = sampler.changes()
    with capsys.disabled():
        print(f"\n[autoscaling] sweep process t={sweep_start:.0f}s..{sweep_end:.0f}s; "
              + "; ".join(f"{name} t={a:.0f}s..{b:.0f}s" for name, (a, b) in trials.items())
              + "; worker nodes over time: " + ", ".join(f"t={t:.0f}s {n}" for t, n in changes)
              + f"  ({len(sampler.samples)} samples, {len(sampler.errors)} failed)")

    during = [n for t, n in sampler.samples if sweep_start <= t <= sweep_end]
    assert max(during, default=0) == 2, changes  # both trials waited for, and got, a node of their own
    first_up = next(t for t, n in sampler.samples if n > 0)
    assert sweep_start < first_up < sweep_end, changes  # added while the sweep's work waited
    after = [(t, n) for t, n in sampler.samples if t > sweep_end]
    assert after and after[-1][1] == 0, changes  # removed once idle
    removed_at = next(t for t, n in after if n == 0)
    # The two trials ran at the same time, and the nodes stayed until they had been idle for the timeout.
    assert max(a for a, _ in trials.values()) < min(b for _, b in trials.values()), trials
    assert removed_at >= max(b for _, b in trials.values()) + IDLE_TIMEOUT_S - 5, (changes, trials)

    assert [row["status"] for row in rows] == ["completed", "completed"], rows
    assert all(int(row["steps"]) == 4 for row in rows), rows
    for row in rows:
        assert (sweep_dir / "trials" / row["trial"] / "final" / "adapter_model.safetensors").is_file()
    assert (sweep_dir / "best" / "adapter_config.json").is_file()


def test_job_submit_to_a_token_protected_head(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret = "fake-wandb-key-" + secrets.token_hex(16)
    run_dir = tmp_path / "run"
    cfg = tiny_config(tiny_model_dir, run_dir, [
        "scaling.num_workers=1", "train.checkpoint_every=2",
        "tracking.console=true", "tracking.tensorboard=true", "tracking.wandb=true",
    ])
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    # The key reaches the job as a runtime_env variable; W&B runs offline with it (no network here).
    runtime_env = {"env_vars": {"WANDB_API_KEY": secret, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}}
    entrypoint = ["python", "-m", "raysft", "train", str(cfg_file)]

    with ray_head([f"--port={free_port()}", "--num-cpus=2"], {}) as cluster:
        submit = [RAY, "job", "submit", "--address", cluster.dashboard, "--working-dir", "."]

        # Without the token (and with a wrong one) the job API refuses, and nothing runs.
        no_token_home = tmp_path / "home"
        no_token_home.mkdir()
        anonymous = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
        for env, answer in [
            ({**anonymous, "HOME": str(no_token_home)}, "Unauthorized: Missing authentication token"),  # HTTP 401
            ({**anonymous, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, "Forbidden: Invalid authentication token"),
        ]:
            refused = subprocess.run([*submit, "--", "python", "-c", "print('ran')"], check=False, cwd=REPO, env=env,
                                     capture_output=True, text=True, timeout=120)
            output = refused.stdout + refused.stderr
            assert refused.returncode != 0 and answer in output, output[-3000:]
        for token, code in [(None, 401), ("0" * 64, 403)]:
            with pytest.raises(urllib.error.HTTPError) as denied:
                cluster.get("/api/jobs/", token)
            assert denied.value.code == code
        assert cluster.get("/api/jobs/", cluster.token) == []  # no job was created by the refused calls

        submission_id = f"raysft-{secrets.token_hex(4)}"
        started = time.monotonic()
        job = subprocess.run(
            [*submit, "--submission-id", submission_id, "--runtime-env-json", json.dumps(runtime_env),
             "--", *entrypoint],
            check=False, cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=600,
        )
        wall_s = time.monotonic() - started
        output = job.stdout + job.stderr
        assert job.returncode == 0, output[-5000:]
        status = cluster.get(f"/api/jobs/{submission_id}", cluster.token)
        assert status["status"] == "SUCCEEDED", status
        assert status["runtime_env"]["env_vars"]["WANDB_API_KEY"] == secret  # the job really had it
        logs = cluster.get(f"/api/jobs/{submission_id}/logs", cluster.token)["logs"]

    with capsys.disabled():
        print(f"\n[job submit] `ray job submit ... python -m raysft train` took {wall_s:.1f} s until SUCCEEDED")

    assert "[raysft] step 4/4" in logs and "[raysft] step 4/4" in output
    assert {"config.yaml", "metrics.jsonl", "data_stats.json", "final", "checkpoints", "tensorboard", "wandb"} <= {
        p.name for p in run_dir.iterdir()
    }
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (run_dir / "final").iterdir()}
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4

    # The secret is in none of the files raysft wrote (configs, metrics, checkpoints, TensorBoard, W&B) ...
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any("checkpoints" in p.parts for p in files) and any("tensorboard" in p.parts for p in files)
    leaked = [str(p) for p in files if secret.encode() in p.read_bytes()]
    assert not leaked, leaked
    # ... nor in the job's logs (everything raysft and its workers printed).
    assert secret not in logs and secret not in output


def test_two_nodes_without_a_shared_folder_keep_everything_in_the_bucket(
    tiny_model_dir: Path, tmp_path: Path, s3: dict[str, str]
) -> None:
    """A head and a second node (each its own --temp-dir, 1 CPU each), no folder they share: a 2-worker run
    whose checkpoints, metrics and final adapter land in the bucket, and come home to the driver's folder."""
    location = f"s3://{BUCKET}/two-nodes"
    cfg = tiny_config(tiny_model_dir, tmp_path / "home", [
        "scaling.num_workers=2", "train.max_steps=4", "train.checkpoint_every=2", f"scaling.storage_path={location}",
    ])
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    with ray_head([f"--port={free_port()}", "--num-cpus=1"], s3) as cluster:
        node_dir = Path(tempfile.mkdtemp(prefix="rsft-node-", dir="/tmp"))
        try:
            joined = subprocess.run(
                [RAY, "start", f"--address={cluster.gcs_address}", f"--temp-dir={node_dir}", "--num-cpus=1",
                 "--disable-usage-stats"],
                check=False, cwd=REPO, env={**cluster.env, MARKER: str(cluster.temp_dir), **s3},
                capture_output=True, text=True, timeout=180,
            )
            assert joined.returncode == 0, joined.stdout[-3000:] + joined.stderr[-3000:]
            run = subprocess.run(
                [sys.executable, "-m", "raysft", "train", str(cfg_file)], check=False, cwd=REPO,
                env={**cluster.env, **s3, "RAY_ADDRESS": cluster.gcs_address}, capture_output=True, text=True, timeout=600,
            )
            assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
        finally:
            kill_cluster(node_dir)
            subprocess.run(["rm", "-rf", str(node_dir)], check=False)

    with pytest.MonkeyPatch.context() as patch:
        for key, value in s3.items():
            patch.setenv(key, value)
        from raysft import storage

        assert {"config.yaml", "metrics.jsonl", "final", "checkpoints"} <= set(storage.list_dir(location))
        assert "step_000002" in storage.list_dir(storage.join(location, "checkpoints"))
    assert (tmp_path / "home" / "final" / "adapter_model.safetensors").is_file()
    steps = [json.loads(line)["step"] for line in (tmp_path / "home" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4
