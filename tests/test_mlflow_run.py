"""MLflow tracking (raysft/mlflow_run.py) on real runs, read back from the real store with MlflowClient.

(MLflow in object storage and across a Ray Train worker restart is checked in tests/test_storage.py; a sweep's
nested runs in tests/tune/test_sweep.py.)
"""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.utils.file_utils import path_to_local_sqlite_uri

import raysft
from raysft.config import flatten
from raysft.errors import ConfigError
from raysft.mlflow_run import recorded_mlflow_run
from raysft.run_folder import MLFLOW_DIR, MLFLOW_RUN_FILE
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
