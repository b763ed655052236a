"""The run folder and the sweep folder: where each lives, the name of everything in them, what may be started or
resumed there, and copying between storage and home. Every other module asks here for a path or a file name.

A run lives at its *run location*: `scaling.storage_path` (a local or NFS folder, or `s3://`/`gs://`) when
set, else `train.output_dir`. Checkpoints, config.yaml, metrics.jsonl and final/ are all there; with a
storage path, `train.output_dir` on the driver's machine (the run's *home*) receives a copy of the results
when the run ends (`copy_entries`, the one routine that copies between storage and a local folder).

Local paths are made absolute one way, `absolute_path` (raysft/config/paths.py: `~` expanded, then
`os.path.abspath`, symlinks kept as spelled): the folder a user named is the one every check, write and
message names, and a run folder reached through a symlink is not renamed to its target. Only a check that two
paths are the same folder (`raysft export` into its own run) looks through symlinks.

A fresh run never starts over anything: it refuses a folder holding any file it would write. A resume
is checked here, in the driver, before anything is written or Ray Train starts: settings that change
what is trained are refused with their key named (the rule, `RESUMABLE_CHANGES`, is in raysft/config/rules.py);
settings that only change how long or how visibly the run goes on are allowed and recorded in
`config_history.jsonl`, while `config.yaml` keeps the config the run started with.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from raysft import storage
from raysft.config import (
    Config,
    absolute_path,
    default_cache_root,
    flatten,
    global_batch_rows,
    is_uri,
    public_tree,
    to_yaml,
)
from raysft.config.rules import changes_between, check_resume_changes, derived_global_batch
from raysft.errors import ConfigError

# --- what a run folder holds ---------------------------------------------------------------------------------

CONFIG_FILE = "config.yaml"
HISTORY_FILE = "config_history.jsonl"
DATA_STATS_FILE = "data_stats.json"
METRICS_FILE = "metrics.jsonl"
GENERATIONS_FILE = "generations.jsonl"
"""eval.generate's answers, one JSON line per prompt and evaluation (rank 0)."""
FINAL_DIR = "final"
CHECKPOINTS_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
MLFLOW_DIR = "mlflow"
"""The local MLflow store (mlflow.db, artifacts/), when it is the default; in a run or a sweep folder."""
MLFLOW_RUN_FILE = "mlflow_run.json"
"""The id of the folder's MLflow run, what a resume and a worker restart continue. Beside the store, not in it:
an object-storage run's store is a copy synced from rank 0's node, the id is written at once."""
# Everything a run writes at the top of its folder: a fresh run refuses to start where any of these exists.
RUN_FILES = (CONFIG_FILE, HISTORY_FILE, DATA_STATS_FILE, METRICS_FILE, GENERATIONS_FILE, FINAL_DIR, CHECKPOINTS_DIR,
             TENSORBOARD_DIR, WANDB_DIR, MLFLOW_DIR, MLFLOW_RUN_FILE)
# What a run leaves once it has trained (as opposed to files of the user's that happen to share a name).
_TRAINED_MARKS = (METRICS_FILE, FINAL_DIR, CHECKPOINTS_DIR)
RESULT_FILES = (CONFIG_FILE, DATA_STATS_FILE, METRICS_FILE, GENERATIONS_FILE, FINAL_DIR, MLFLOW_DIR, MLFLOW_RUN_FILE)
"""What a run stored elsewhere (scaling.storage_path) leaves in its home when it ends."""
RANK0_FILES = (METRICS_FILE, GENERATIONS_FILE, TENSORBOARD_DIR, MLFLOW_DIR)
"""What rank 0 writes as it goes; for object storage in a node-local folder, uploaded with each checkpoint."""

# In checkpoints/: one folder per checkpoint (its contents are raysft/training/checkpoint.py's), Ray Train's record
# of them, and the names raysft gives what it has not finished or has set aside.
_STEP_DIR = re.compile(r"^step_(\d{6,})$")
STAGING_PREFIX = ".staging_"
"""A folder being written (a checkpoint or final/): never trusted, removed when found."""
DAMAGED_PREFIX = "damaged_"
"""A checkpoint that did not verify, set aside (never deleted)."""
# Ray Train's record of a run's checkpoints (<run>/checkpoints/): which exist, their metrics, the latest. Ray gives
# the latest back to the workers of a resumed run and refuses to start when one it lists is missing.
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def is_step_dir(name: str) -> bool:
    return _STEP_DIR.match(name) is not None


# --- what a sweep folder holds --------------------------------------------------------------------------------

SWEEP_FILE = "sweep.yaml"
TRIALS_DIR = "trials"
"""One run folder per trial: trials/<trial>/."""
TRIAL_FILE = "trial.json"
"""In a trial's run folder: its name, sampled values and start time."""
TUNE_DIR = "tune"
"""Ray Tune's own state; tune/<trial>/error.txt holds a failed trial's error."""
TRIAL_ERROR_FILE = "error.txt"
BEST_DIR = "best"
RESULTS_FILE = "results.csv"
LINEAGE_FILE = "lineage.jsonl"
"""PBT/PB2 sweeps: one line per exploit (which trial continued from which trial's checkpoint, at what step, with
which values before and after), rebuilt from the trials' trial.json."""
REPORT_PLOT = "report.png"
REPORT_PAGE = "report.md"
TRIAL_RESULT_FILES = (TRIAL_FILE, CONFIG_FILE, METRICS_FILE, FINAL_DIR)
"""What the sweep's home receives of each trial stored elsewhere, and what best/ holds besides final/'s files."""


# --- where a run lives ----------------------------------------------------------------------------------------


def output_path(cfg: Config) -> Path:
    """The run's home folder, absolute (see the module docstring): the one spelling every check and write uses."""
    return absolute_path(cfg.train.output_dir)


def run_location(cfg: Config) -> str:
    """Where the run's files live (a local path or a URI); see the module docstring."""
    return cfg.scaling.storage_path or str(output_path(cfg))


def checkpoint_root(location: str) -> str:
    """The checkpoints/ folder of the run at `location` (a path or a URI)."""
    return storage.join(location, CHECKPOINTS_DIR)


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


def config_changes(cfg: Config, location: str) -> dict[str, dict[str, Any]]:
    """Every setting `cfg` changes against the config the run at `location` last ran with: {key: {from, to}}."""
    before = _started_config(location)
    return {} if before is None else changes_between(before, flatten(public_tree(cfg)))


def resume_changes(cfg: Config, location: str) -> dict[str, dict[str, Any]]:
    """The settings `cfg` changes against the run at `location`; ConfigError naming each one a resume may not change."""
    before = _started_config(location)
    if before is None:
        return {}
    return check_resume_changes(before, flatten(public_tree(cfg)), location)


def run_files_in(location: str) -> list[str]:
    """The files and folders of a run that `location` (a path or URI) already holds."""
    return [name for name in RUN_FILES if storage.exists(storage.join(location, name))]


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
        if existing := run_files_in(location):
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


def sweep_storage_location(storage_path: str | None, sweep_name: str) -> str | None:
    """With `base.scaling.storage_path` (e.g. s3://bucket/sweeps), where the sweep lives: `<storage>/<name>`
    holds sweep.yaml, Tune's state (tune/) and every trial's run (trials/<trial>/), so a fresh driver can
    resume it; the local output_dir receives results.csv, best/, the report and copies of the trials.

    Example:
        >>> sweep_storage_location("s3://bucket/sweeps", "lora_rank_lr")
        's3://bucket/sweeps/lora_rank_lr'
    """
    return storage.join(storage_path, sweep_name) if storage_path else None


# --- copying between storage and home -------------------------------------------------------------------------


def copy_entries(source: str, target: str | Path, names: tuple[str, ...]) -> list[str]:
    """Copy each of `names` that `source` holds to `target` (a run's results home, rank 0's files up to object
    storage, a sweep's trials home); the names copied. One of the two is a local path; nothing is copied onto
    itself. A download replaces a local folder whole; an upload overwrites the files it brings and keeps others.

    Example:
        >>> copy_entries("s3://bucket/runs/a", "/home/me/runs/a", RESULT_FILES)  # doctest: +SKIP
        ['config.yaml', 'metrics.jsonl', 'final']
    """
    if str(source) == str(target):
        return []
    copied = []
    for name in names:
        if not storage.exists(storage.join(str(source), name)):
            continue
        if is_uri(str(target)):
            storage.upload(Path(source) / name, storage.join(str(target), name))
        else:
            local = Path(target) / name
            if local.is_dir():
                shutil.rmtree(local)
            storage.download(storage.join(str(source), name), local)
        copied.append(name)
    return copied


def copy_results_home(cfg: Config) -> None:
    """With a storage path, the driver's train.output_dir gets the run's results when it ends."""
    copy_entries(run_location(cfg), output_path(cfg), RESULT_FILES)


def fetch_trials(storage_root: str, sweep_dir: Path) -> None:
    """Copy every trial's results (and Tune's error files) from a sweep's storage to its local folder."""
    for name in storage.list_dir(storage.join(storage_root, TRIALS_DIR)):
        copy_entries(storage.join(storage_root, TRIALS_DIR, name), sweep_dir / TRIALS_DIR / name, TRIAL_RESULT_FILES)
        copy_entries(storage.join(storage_root, TUNE_DIR, name), sweep_dir / TUNE_DIR / name, (TRIAL_ERROR_FILE,))


def local_copy(location: str, key: str, names: tuple[str, ...] = ()) -> Path:
    """`location` as a local folder: a path as it is; a run, adapter or sweep on object storage downloaded afresh
    into raysft's cache (only the entries `names` inside it, when given), so `export`, `generate` and `report`
    read them from storage. ConfigError naming `key` when it cannot be read or is not there."""
    if not is_uri(location):
        return Path(location)
    try:
        found = storage.exists(location)
    except (ValueError, OSError) as err:
        raise ConfigError([f"{key}: {location}: cannot read it ({' '.join(str(err).split())[:300]})"]) from None
    if not found:
        raise ConfigError([f"{key}: {location} does not exist (or the credentials in the environment cannot read it)"])
    local = default_cache_root() / "downloads" / hashlib.sha256(location.encode()).hexdigest()[:16]
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True)
    if names:
        copy_entries(location, local, names)
    else:
        storage.download(location, local)
    return local
