"""The run folder as the driver sees it: where it lives, what may be started or resumed there, and what
a resume may change.

A run lives at its *run location*: `scaling.storage_path` (a local or NFS folder, or `s3://`/`gs://`) when
set, else `train.output_dir`. Checkpoints, config.yaml, metrics.jsonl and final/ are all there; with a
storage path, `train.output_dir` on the driver's machine receives a copy of the results when the run ends.

A fresh run never starts over anything: it refuses a folder holding any file it would write. A resume
is checked here, in the driver, before anything is written or Ray Train starts: settings that change
what is trained (model, data, LoRA shape, batch, optimizer, seed) are refused with their key named;
settings that only change how long or how visibly the run goes on are allowed and recorded in
`config_history.jsonl`, while `config.yaml` keeps the config the run started with.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from raysft import storage
from raysft.config import Config, flatten, global_batch_rows, public_tree, to_yaml
from raysft.config.rules import check_resume_changes, derived_global_batch
from raysft.errors import ConfigError
from raysft.evaluation import GENERATIONS_FILE
from raysft.mlflow_run import MLFLOW_DIR, MLFLOW_RUN_FILE
from raysft.track import METRICS_FILE

CONFIG_FILE = "config.yaml"
HISTORY_FILE = "config_history.jsonl"
DATA_STATS_FILE = "data_stats.json"
FINAL_DIR = "final"
CHECKPOINTS_DIR = "checkpoints"
# Everything a run writes at the top of its folder: a fresh run refuses to start where any of these exists.
RUN_FILES = (CONFIG_FILE, HISTORY_FILE, DATA_STATS_FILE, METRICS_FILE, GENERATIONS_FILE, FINAL_DIR, CHECKPOINTS_DIR,
             "tensorboard", "wandb", MLFLOW_DIR, MLFLOW_RUN_FILE)
# What a run leaves once it has trained (as opposed to files of the user's that happen to share a name).
_TRAINED_MARKS = (METRICS_FILE, FINAL_DIR, CHECKPOINTS_DIR)

def output_path(cfg: Config) -> Path:
    """The run folder, absolute (`~` expanded): the one spelling every check and write uses."""
    return Path(cfg.train.output_dir).expanduser().resolve()


def run_location(cfg: Config) -> str:
    """Where the run's files live (a local path or a URI); see the module docstring."""
    return cfg.scaling.storage_path or str(output_path(cfg))


def checkpoint_root(cfg: Config) -> str:
    return storage.join(run_location(cfg), CHECKPOINTS_DIR)


def _started_config(location: str) -> dict[str, Any] | None:
    """The config the run at `location` last ran with: config.yaml plus every recorded resume change."""
    if not storage.exists(storage.join(location, CONFIG_FILE)):
        return None
    flat = flatten(yaml.safe_load(storage.read_bytes(storage.join(location, CONFIG_FILE))))
    history = storage.join(location, HISTORY_FILE)
    if storage.exists(history):
        for line in storage.read_bytes(history).decode().splitlines():
            try:
                changes = json.loads(line)["changes"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a torn last line: the resume it describes never started
            flat.update({key: change["to"] for key, change in changes.items()})
    # Runs started before train.global_batch_size existed derived it from their worker count.
    flat["train.global_batch_size"] = flat.get("train.global_batch_size") or derived_global_batch(flat)
    return flat


def pin_global_batch(cfg: Config) -> Config:
    """`cfg` with train.global_batch_size fixed: the user's value, else (resuming) the run's own, so that a resume
    on another number of workers trains the same steps, else the default from the current worker count."""
    if cfg.train.global_batch_size is not None:
        return cfg
    started = _started_config(run_location(cfg)) if cfg.train.resume else None
    rows = started["train.global_batch_size"] if started else global_batch_rows(cfg)
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"global_batch_size": rows})})


def resume_changes(cfg: Config, location: str) -> dict[str, dict[str, Any]]:
    """The settings `cfg` changes against the run at `location`; ConfigError naming each one a resume may not change."""
    before = _started_config(location)
    if before is None:
        return {}
    return check_resume_changes(before, flatten(public_tree(cfg)), location)


def check_run_folder(cfg: Config) -> dict[str, dict[str, Any]]:
    """Check that `cfg` may start (or resume) at its run location; return the changes a resume records.

    Nothing is written here, so a refused run leaves the folder exactly as it was.
    """
    run_dir = output_path(cfg)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError([f"train.output_dir: {run_dir} is a file, not a folder; choose a folder"])
    if cfg.train.resume:
        return resume_changes(cfg, run_location(cfg))
    places = [("train.output_dir", str(run_dir))]
    if cfg.scaling.storage_path:
        places.append(("scaling.storage_path", cfg.scaling.storage_path))
    for key, location in places:
        existing = [name for name in RUN_FILES if storage.exists(storage.join(location, name))]
        if existing:
            trained = [name for name in existing if name in _TRAINED_MARKS]
            what = f"a run ({trained[0]})" if trained else f"files raysft would overwrite ({', '.join(existing)})"
            raise ConfigError(
                [f"{key}: {location} already holds {what}; resume it with --resume (train.resume=true) "
                 "or choose a new one"]
            )
    return {}


def write_run_config(cfg: Config, changes: dict[str, dict[str, Any]]) -> None:
    """config.yaml for a new run; for a resume, one config_history.jsonl line with what it changed."""
    location = run_location(cfg)
    output_path(cfg).mkdir(parents=True, exist_ok=True)
    if not storage.exists(storage.join(location, CONFIG_FILE)):
        storage.write_bytes(storage.join(location, CONFIG_FILE), to_yaml(cfg).encode())
    elif changes:
        # Rewritten whole, not appended: object storage cannot append, and a reader never sees half a file.
        history = storage.join(location, HISTORY_FILE)
        earlier = storage.read_bytes(history) if storage.exists(history) else b""
        entry = {"resumed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changes": changes}
        storage.write_bytes(history, earlier + (json.dumps(entry) + "\n").encode())
