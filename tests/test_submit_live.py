"""`raysft submit` to a real token-protected `ray start --head` (its job server on loopback) with a moto S3 bucket:
local data uploaded, the job reading it from the bucket, the run's checkpoints and final/ landing there; a GPU
request the CPU cluster cannot hold refused before anything is submitted; and Ray's own `ray job submit` of a shipped
example, whose outputs outlive the job."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raysft.cluster import autoscaler_adds_nodes, dashboard_node_types
from tests.runs import REPO
from tests.s3server import BUCKET, free_port
from tests.test_cluster_live import RAY, ray_head

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_submit_uploads_local_data_and_the_run_lives_in_the_bucket(
    tiny_model_dir: Path, tmp_path: Path, s3: dict[str, str]
) -> None:
    data = tmp_path / "my-data"  # the user's own folder: nothing the cluster could find by itself
    data.mkdir()
    for name in ("gsm8k_train.jsonl", "gsm8k_test.jsonl"):
        shutil.copy(REPO / "examples" / "data" / name, data / name)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": {"path": "my-data/gsm8k_train.jsonl", "limit": 32},  # relative to this file
                 "eval": {"path": "my-data/gsm8k_test.jsonl", "limit": 4}, "max_seq_len": 128,
                 "cache_dir": str(tmp_path / "token-cache")},
        "lora": {"r": 4, "alpha": 8},
        "train": {"output_dir": "runs/submitted", "max_steps": 2, "micro_batch_size": 2, "checkpoint_every": 1},
        "scaling": {"num_workers": 1, "storage_path": f"s3://{BUCKET}/submitted"},
        "tracking": {"tensorboard": False},
    }))
    inputs = f"s3://{BUCKET}/datasets"

    with ray_head([f"--port={free_port()}", "--num-cpus=2"], s3) as cluster:
        env = {**cluster.env, **s3, "PYTHONPATH": str(REPO)}
        submit = [sys.executable, "-m", "raysft", "submit", "--address", cluster.dashboard]

        # The dashboard's autoscaler report as raysft submit reads it: a head without an autoscaling config has only
        # Ray's read-only monitor, which names its node node_<id> (no node can be added). Its first report comes
        # a few seconds after the start.
        deadline, node_types = time.monotonic() + 60, {}
        while not node_types and time.monotonic() < deadline:
            node_types = dashboard_node_types(cluster.get("/api/cluster_status", cluster.token)["data"])
            time.sleep(0 if node_types else 1)
        assert node_types and not autoscaler_adds_nodes(node_types), node_types

        # A GPU asked of this CPU-only cluster: refused here, naming the key and the fix; no job is created.
        refused = subprocess.run([*submit, str(config), "--set", "scaling.use_gpu=true"], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and "scaling.use_gpu: true, but the cluster" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr and cluster.get("/api/jobs/", cluster.token) == []

        started = time.monotonic()
        done = subprocess.run([*submit, str(config), "--data-to", inputs, "--submission-id", "raysft-live", "--wait"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        wall_s = time.monotonic() - started
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-5000:]
        status = cluster.get("/api/jobs/raysft-live", cluster.token)

    print(f"\n[submit] `raysft submit --wait` of a 2-step run took {wall_s:.1f} s")
    assert status["status"] == "SUCCEEDED"
    assert "scaling.use_gpu: false (the cluster has no GPU)" in output
    assert f"data: {data / 'gsm8k_train.jsonl'} -> {inputs}/inputs/train-0/gsm8k_train.jsonl" in output
    assert f"outputs: s3://{BUCKET}/submitted" in output and "ray job logs -f --address" in output
    assert f"done: adapter in s3://{BUCKET}/submitted/final" in output  # where the run is, not Ray's temporary folder

    with pytest.MonkeyPatch.context() as patch:
        for key, value in s3.items():
            patch.setenv(key, value)
        from raysft import storage

        run = f"s3://{BUCKET}/submitted"
        assert {"config.yaml", "metrics.jsonl", "final", "checkpoints"} <= set(storage.list_dir(run))
        assert "adapter_model.safetensors" in storage.list_dir(storage.join(run, "final"))
        assert storage.list_dir(storage.join(run, "checkpoints"))
        submitted = yaml.safe_load(storage.read_bytes(storage.join(run, "config.yaml")))
        assert submitted["data"]["train"][0]["path"] == f"{inputs}/inputs/train-0/gsm8k_train.jsonl"
        steps = [json.loads(line)["step"] for line in storage.read_bytes(storage.join(run, "metrics.jsonl")).splitlines()]
        assert max(steps) == 2
    # The head runs on this machine: the run's local copy is where a local run would put it.
    assert (tmp_path / "runs" / "submitted" / "final" / "adapter_model.safetensors").is_file()
    # And the run is used from the bucket: its adapter merged into the base model.
    merged = tmp_path / "merged"
    export = subprocess.run([sys.executable, "-m", "raysft", "export", f"s3://{BUCKET}/submitted", "--merge", str(merged)],
                            cwd=tmp_path, env={**os.environ, **s3, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    assert (merged / "config.json").is_file() and list(merged.glob("*.safetensors"))


def test_plain_ray_job_submit_of_a_shipped_example_keeps_its_outputs(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The README's `ray job submit --working-dir . -- python -m raysft train examples/gsm8k_lora.yaml` on a head
    on this machine: the example's data travel with the checkout (paths relative to the YAML), and its relative
    output_dir lands in the home folder of the node that runs the driver, not in Ray's temporary copy."""
    home = tmp_path / "home"
    home.mkdir()
    sets = [f"model.name_or_path={tiny_model_dir}", "train.max_steps=2", "train.eval_every=1", "data.max_seq_len=128",
            "data.eval.limit=4", "train.checkpoint_every=null", "tracking.tensorboard=false"]
    with ray_head([f"--port={free_port()}", "--num-cpus=2"], {"HOME": str(home)}) as cluster:
        job = subprocess.run(
            [RAY, "job", "submit", "--address", cluster.dashboard, "--working-dir", ".", "--", "python", "-m", "raysft",
             "train", "examples/gsm8k_lora.yaml", *[arg for item in sets for arg in ("--set", item)]],
            cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=600,
        )
    output = job.stdout + job.stderr
    assert job.returncode == 0, output[-5000:]
    run = home / "runs" / "gsm8k-lora"
    assert f"[raysft] done: adapter in {run / 'final'}" in output
    assert (run / "final" / "adapter_model.safetensors").is_file()
    assert "runtime_resources" not in output.split("[raysft] done:")[1]
