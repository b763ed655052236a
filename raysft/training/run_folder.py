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
from raysft.errors import ConfigError
from raysft.evaluation import GENERATIONS_FILE
from raysft.track import METRICS_FILE, MLFLOW_DIR, MLFLOW_RUN_FILE

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

# Settings a resume may change: they decide how long the run goes on and what it reports, not what a
# step computes. A dotted prefix allows the whole section.
RESUMABLE_CHANGES = (
    "train.max_steps",
    "train.epochs",
    "train.eval_every",
    "train.log_every",
    "train.checkpoint_every",
    "train.checkpoints_to_keep",
    "train.checkpoint_score",
    "train.final",
    "train.early_stopping",  # None, or the section's keys below
    "train.early_stopping.",
    "train.on_nonfinite",
    "train.output_dir",  # the run folder was moved: where it is, not what it computes
    "scaling.num_workers",  # the global batch is fixed when the run starts: only who computes each step changes
    "train.grad_accum_steps",  # ... and how each worker cuts its share
    "scaling.max_failures",
    "scaling.ray_address",
    "scaling.resource_wait_s",
    "scaling.stop_grace_s",
    "data.num_tokenize_workers",
    "data.cache_dir",
    "tracking.",
    "eval.",  # generating answers to score them changes no step
)


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
    flat["train.global_batch_size"] = flat.get("train.global_batch_size") or _derived_global_batch(flat)
    return flat


def _derived_global_batch(flat: dict[str, Any]) -> int:
    return max(1, flat["scaling.num_workers"]) * flat["train.micro_batch_size"] * flat["train.grad_accum_steps"]


def pin_global_batch(cfg: Config) -> Config:
    """`cfg` with train.global_batch_size fixed: the user's value, else (resuming) the run's own, so that a resume
    on another number of workers trains the same steps, else the default from the current worker count."""
    if cfg.train.global_batch_size is not None:
        return cfg
    started = _started_config(run_location(cfg)) if cfg.train.resume else None
    rows = started["train.global_batch_size"] if started else global_batch_rows(cfg)
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"global_batch_size": rows})})


def _allowed(key: str) -> bool:
    return any(key == allowed or (allowed.endswith(".") and key.startswith(allowed)) for allowed in RESUMABLE_CHANGES)


def config_changes(cfg: Config, location: str) -> dict[str, dict[str, Any]]:
    """Every setting `cfg` changes against the config the run at `location` last ran with: {key: {from, to}}."""
    before = _started_config(location)
    if before is None:
        return {}
    after = flatten(public_tree(cfg))
    return {
        key: {"from": before.get(key), "to": after.get(key)}
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key) and key != "train.resume"  # resuming is the mode, not a setting
    }


def resume_changes(cfg: Config, location: str) -> dict[str, dict[str, Any]]:
    """The settings `cfg` changes against the run at `location`; ConfigError naming each one a resume may not change."""
    changed = config_changes(cfg, location)
    refused = [key for key in changed if not _allowed(key)]
    if refused:
        raise ConfigError(
            [f"{key}: the run in {location} was started with {changed[key]['from']!r}, not {changed[key]['to']!r}; "
             "a resume continues the same training, so this cannot change (set it back, or start a new "
             "train.output_dir)" for key in refused]
        )
    return changed


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
