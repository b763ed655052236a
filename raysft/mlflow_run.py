"""MLflow as a tracker backend, following Ray's integration (ray.air.integrations.mlflow) where it fits: rank 0
logs, the experiment is created when missing, the tracking URI and its credentials come from the environment, a
trial's params are its sampled values, artifacts are not uploaded unless asked. It uses an `MlflowClient` of its
own rather than `setup_mlflow`: that sets the process-wide tracking URI (in local mode the driver's) and opens a
new run on every call, where a resume and a Ray Train restart must continue the one recorded in the run folder.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysft import storage
from raysft.config import TrackingConfig
from raysft.errors import RunError
from raysft.run_folder import MLFLOW_RUN_FILE

log = logging.getLogger(__name__)



def mlflow_store(tracking: TrackingConfig, default_dir: Path) -> tuple[str, Path | None]:
    """(tracking URI, local store folder): MLFLOW_TRACKING_URI when set (no local folder: the server keeps the
    artifacts), else a SQLite store, MLflow 3's default backend, in `tracking.mlflow_dir` or `default_dir`."""
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri, None
    from mlflow.utils.file_utils import path_to_local_sqlite_uri

    folder = Path(tracking.mlflow_dir).expanduser() if tracking.mlflow_dir else default_dir
    return path_to_local_sqlite_uri(str(folder / "mlflow.db")), folder


@dataclass(frozen=True)
class MlflowRun:
    """One MLflow run, written through its own client (never MLflow's process-wide active run)."""

    client: Any  # mlflow.MlflowClient
    run_id: str

    def log(self, metrics: dict[str, float], step: int) -> None:
        """One metrics.jsonl record. A step redone after a resume or a restart is logged again (MLflow cannot
        remove a point): the latest value at each step is the one metrics.jsonl keeps."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        points = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=points, synchronous=True)

    def end(self, status: str) -> None:
        """FINISHED, KILLED or FAILED (a resume sets it RUNNING again)."""
        self.client.set_terminated(self.run_id, status)


def mlflow_client(tracking: TrackingConfig, default_dir: Path) -> tuple[Any, Path | None]:
    """A client of the store `mlflow_store` names, and its local folder (created) or None."""
    from mlflow import MlflowClient

    uri, folder = mlflow_store(tracking, default_dir)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri), folder


def recorded_mlflow_run(location: str) -> str | None:
    """The MLflow run id recorded in the run (or sweep) folder `location`, if any."""
    record = storage.join(location, MLFLOW_RUN_FILE)
    return json.loads(storage.read_bytes(record))["run_id"] if storage.exists(record) else None


def open_mlflow_run(tracking: TrackingConfig, location: str, default_dir: Path, run_name: str,
                    params: dict[str, Any], tags: dict[str, str] | None = None) -> MlflowRun:
    """Continue the MLflow run recorded in `location` (set RUNNING again), or start one with `params` and
    `tags`, nested under `tracking.mlflow_parent_run_id`, and record its id there.

    A recorded run the store does not hold (another MLFLOW_TRACKING_URI than the run started with, a
    deleted run) is not an error: a new run starts, and the log says so.
    """
    client, folder = mlflow_client(tracking, default_dir)
    recorded = recorded_mlflow_run(location)
    if recorded is not None:
        if _live_run(client, recorded):
            client.update_run(recorded, status="RUNNING")
            return MlflowRun(client, recorded)
        log.warning("MLflow run %s (recorded in %s) is not in this store; starting a new one", recorded,
                    storage.join(location, MLFLOW_RUN_FILE))
    experiment_id = _experiment_id(client, tracking.mlflow_experiment, folder)
    all_tags = dict(tags or {})
    if tracking.mlflow_parent_run_id:
        all_tags["mlflow.parentRunId"] = tracking.mlflow_parent_run_id
    run_id = client.create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id
    _log_params(client, run_id, params)
    record = {"run_id": run_id, "experiment_id": experiment_id, "experiment": tracking.mlflow_experiment}
    storage.write_bytes(storage.join(location, MLFLOW_RUN_FILE), json.dumps(record, indent=2).encode())
    return MlflowRun(client, run_id)


def _live_run(client: Any, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


def _experiment_id(client: Any, name: str, folder: Path | None) -> str:
    """The experiment `name`, created when missing; a local store keeps its artifacts in its own folder
    (MLflow's default would be ./mlruns in whatever directory the process runs in)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name, artifact_location=(folder / "artifacts").as_uri() if folder else None)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            found = client.get_experiment_by_name(name)  # created meanwhile by a parallel trial
    if found.lifecycle_stage != "active":
        raise RunError(f"tracking.mlflow_experiment: MLflow experiment {name!r} is deleted; restore it (mlflow "
                       f"experiments restore --experiment-id {found.experiment_id}) or choose another name")
    return found.experiment_id


def _log_params(client: Any, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

    # As config.yaml spells them (true, null, [a, b]), cut to what MLflow stores.
    items = [Param(key, (value if isinstance(value, str) else json.dumps(value))[:MAX_PARAM_VAL_LENGTH])
             for key, value in params.items()]
    for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=items[start : start + MAX_PARAMS_TAGS_PER_BATCH], synchronous=True)
