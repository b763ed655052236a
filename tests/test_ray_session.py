"""The Ray a command runs on (raysft/ray_session.py): a local Ray listens on loopback only and knows its own address
(two local Rays on one machine do not confuse Ray's State API), and a joined cluster is named in one console line.

Each Ray here is started by a Python process of its own (the session's Ray is started without raysft), under the
machine-wide lock like every test that starts Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from raysft.errors import RunError
from raysft.ray_session import cluster_to_join, without_reported_tracebacks
from tests.runs import REPO, tiny_config

# Starts raysft's local Ray (or joins a cluster), then reports as one JSON line what the test checks: the address,
# what a task sees (its RAY_ADDRESS; Ray's State API called as Ray Train's actors call it, without an address) and
# every listening socket of this process and its descendants (GCS, raylet, dashboard, agents, workers).
PROBE = textwrap.dedent("""
    import json, os, sys
    import psutil, ray
    from raysft.ray_session import ensure_ray

    ensure_ray(sys.argv[1] if len(sys.argv) > 1 else None)

    @ray.remote
    def seen_by_a_task():
        from ray.util.state import list_nodes
        return os.environ.get("RAY_ADDRESS"), [node.node_ip for node in list_nodes()]

    task_address, node_ips = ray.get(seen_by_a_task.remote())
    me = psutil.Process()
    listening = sorted({f"{c.laddr.ip} {c.laddr.port} {p.name()}" for p in [me, *me.children(recursive=True)]
                        for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN})
    print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "task_address": task_address,
                      "node_ips": node_ips, "listening": listening}), flush=True)
    if os.environ.get("PROBE_HOLD"):
        sys.stdin.read()  # keep this Ray running until the test closes stdin
""")


def probe_env(**changes: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    return {**env, "PYTHONPATH": str(REPO), **changes}


def run_probe(*args: str, **env: str) -> tuple[dict[str, object], str]:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=REPO, env=probe_env(**env), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.fixture
def first_local_ray() -> Iterator[dict[str, object]]:
    """A local Ray started by raysft in another process, kept running while the test runs."""
    process = subprocess.Popen([sys.executable, "-c", PROBE], cwd=REPO, env=probe_env(PROBE_HOLD="1"),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None and process.stdin is not None
        yield json.loads(process.stdout.readline())
    finally:
        process.stdin.close()  # type: ignore[union-attr]
        process.wait(timeout=120)


def is_loopback(ip: str) -> bool:
    return ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def test_local_ray_on_loopback_a_second_beside_it_and_joining_one_said(first_local_ray: dict[str, object]) -> None:
    listening = first_local_ray["listening"]
    assert isinstance(listening, list)
    names = {line.split()[2] for line in listening}
    assert {"gcs_server", "raylet"} <= names, listening  # the processes looked at are that Ray's
    exposed = [line for line in listening if not is_loopback(line.split()[0])]
    assert exposed == [], f"Ray ports on other interfaces than loopback: {exposed}"
    gcs = first_local_ray["gcs"]
    assert isinstance(gcs, str) and gcs.startswith("127.0.0.1:")
    assert first_local_ray["task_address"] == gcs and first_local_ray["node_ips"] == ["127.0.0.1"]
    # Two runs at once: each starts its own Ray. Without its own RAY_ADDRESS, Ray's State API (as Ray Train's
    # actors call it) finds two GCS processes and raises "Found multiple active Ray instances".
    second, said = run_probe()
    assert second["gcs"] != first_local_ray["gcs"] and second["node_ips"] == ["127.0.0.1"]
    assert second["task_address"] == second["gcs"]
    assert [line for line in second["listening"] if not is_loopback(line.split()[0])] == []  # type: ignore[union-attr]
    assert "joining" not in said and "multiple active Ray instances" not in said, said
    # Joining a running cluster, named by RAY_ADDRESS or scaling.ray_address, is said in one line.
    # (Ray's token auth is on for a local Ray; one joined by its address needs RAY_AUTH_MODE=token.)
    for args, env, source in [((), {"RAY_ADDRESS": str(first_local_ray["gcs"])}, "RAY_ADDRESS"),
                              ((str(first_local_ray["gcs"]),), {}, "scaling.ray_address")]:
        joined, said = run_probe(*args, RAY_AUTH_MODE="token", **env)
        assert joined["gcs"] == first_local_ray["gcs"]
        assert f"[raysft] joining the Ray cluster at {first_local_ray['gcs']} ({source})\n" in said, said


@pytest.mark.parametrize("address", ["just-a-name", "nohost:notaport"])
def test_address_that_names_no_cluster_is_a_clear_error(address: str) -> None:
    with pytest.raises(RunError, match=rf"^scaling.ray_address: '{address}' names no Ray cluster to join"):
        cluster_to_join(address)


def test_local_address_starts_a_local_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "local")  # Ray's own spelling of "start one here"
    assert cluster_to_join(None) == (None, "")


# Slow tier: two whole runs (about a minute together on 2 cores).
@pytest.mark.slow
def test_two_runs_at_once_each_on_its_own_ray_without_ray_tracebacks(tiny_model_dir: Path, tmp_path: Path) -> None:
    commands = []
    for name in ("a", "b"):
        cfg = tiny_config(tiny_model_dir, tmp_path / f"run-{name}", ["scaling.num_workers=1"])
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        commands.append([sys.executable, "-m", "raysft", "train", str(path)])
    runs = [subprocess.Popen(command, cwd=REPO, env=probe_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for command in commands]
    outputs = [run.communicate(timeout=600) for run in runs]
    for run, (out, err) in zip(runs, outputs):
        assert run.returncode == 0, err[-3000:]
        assert "done: adapter in" in out
        assert "multiple active Ray instances" not in err and "Traceback" not in err, err[-3000:]
    assert all((tmp_path / f"run-{name}" / "final" / "adapter_model.safetensors").is_file() for name in ("a", "b"))


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
    # Ray's notice of a transient error it retries (its controller on a loaded machine) keeps its line only.
    notice = ("Failed to send resource request for train-6829. If this only happens transiently during network "
              "partition or CPU being overloaded, it's safe to ignore this error. If this error persists, file a "
              "GitHub issue.")
    transient = block(notice, "ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.")
    assert without_reported_tracebacks([*transient, "[raysft] step 5"]) == [notice, "[raysft] step 5"]


def test_environment_sets_variables_for_a_block_and_restores_them(monkeypatch) -> None:
    from raysft.ray_session import environment

    monkeypatch.setenv("RAYSFT_TEST_KEPT", "before")
    monkeypatch.delenv("RAYSFT_TEST_NEW", raising=False)
    monkeypatch.delenv("RAYSFT_TEST_UNTOUCHED", raising=False)
    with environment(RAYSFT_TEST_KEPT="during", RAYSFT_TEST_NEW="1", RAYSFT_TEST_UNTOUCHED=None):
        assert (os.environ["RAYSFT_TEST_KEPT"], os.environ["RAYSFT_TEST_NEW"]) == ("during", "1")
        assert "RAYSFT_TEST_UNTOUCHED" not in os.environ
    assert os.environ["RAYSFT_TEST_KEPT"] == "before"
    assert "RAYSFT_TEST_NEW" not in os.environ
