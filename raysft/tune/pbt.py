"""Population Based Training (`scheduler: pbt` / `pb2`) on raysft's own checkpoints.

Ray Tune's PBT exploits a trailing trial by restarting it from a leading trial's *Tune* checkpoint with mutated
values. A raysft trial's checkpoints belong to its Ray Train run (weights, optimizer, schedule and data position,
each verified by its manifest), so what a trial reports to Tune with an evaluation is a small pointer to the raysft
checkpoint saved at that step. When Tune restarts a trial with another trial's pointer, the trial's run folder
takes that checkpoint as its own newest one (`adopt_donor_checkpoint`), records the config change and the lineage,
and resumes from it like any `--resume`: the same step, optimizer state and data order as the donor, with the
mutated values from the next step on.

Only values a restart can change may be mutated (MUTABLE_MID_RUN): a checkpoint fixes the adapter's shape, the
model, the packed data and the batch.
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import ray
from ray.tune.experiment import Trial
from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler
from ray.tune.schedulers.pb2 import PB2

from raysft import storage
from raysft.config import Config
from raysft.errors import RunError
from raysft.run_folder import (
    CHECKPOINTS_DIR,
    RAY_SNAPSHOT,
    config_changes,
    pin_global_batch,
    run_location,
    step_dir_name,
    write_run_config,
)
from raysft.training.checkpoint import checkpoint_at, checkpoint_names, damage, find_resumable, persist_checkpoint
from raysft.training.decisions import CONTINUE, STOP, eval_round, mark_paused, post_decision
from raysft.tune.config import SweepConfig, mutation_domains

POINTER_FILE = "raysft_checkpoint.json"


class DecidingScheduler:
    """What DecidingASHA, DecidingPBT and DecidingPB2 add to Tune's scheduler: a trial's last evaluation is left alone (it has no
    steps left to train from a better checkpoint), and every decision reaches the trial's workers through the sweep's
    decision board, so that a trial PBT pauses (to exploit another's checkpoint, or to let a waiting trial run) stops
    at the next step boundary, after the checkpoint of the evaluation it reported (raysft/training/decisions.py)."""

    board: str
    last_round: int | None

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        if self.last_round is not None and int(result["eval_round"]) >= self.last_round:
            return TrialScheduler.CONTINUE
        decision = super().on_trial_result(tune_controller, trial, result)  # type: ignore[misc]
        paused = trial.status == Trial.PAUSED or decision == TrialScheduler.PAUSE
        halts = paused or decision == TrialScheduler.STOP
        post_decision(self.board, trial.trial_id, int(result["eval_round"]), STOP if halts else CONTINUE)
        if paused:  # the trial's driver then waits for Tune to restart it
            mark_paused(self.board, trial.trial_id)
        return decision


class DecidingPBT(DecidingScheduler, PopulationBasedTraining):
    """Tune's PBT, deciding through the sweep's decision board."""

    def __init__(self, board: str, last_round: int | None, **pbt: Any):
        super().__init__(**pbt)
        self.board, self.last_round = board, last_round


class DecidingPB2(DecidingScheduler, PB2):
    """Tune's PB2 (PBT with a Gaussian-process bandit choosing the new values), deciding through the decision board."""

    def __init__(self, board: str, last_round: int | None, **pb2: Any):
        super().__init__(**pb2)
        self.board, self.last_round = board, last_round


def pbt_scheduler(cfg: SweepConfig, board: str) -> PopulationBasedTraining:
    """Tune's PBT or PB2 over `scheduler.hyperparam_mutations`, in eval rounds."""
    scheduler, domains, train = cfg.scheduler, mutation_domains(cfg), cfg.base.train
    last_round = eval_round(train.max_steps, train.eval_every) if train.max_steps else None
    # The sweep's lineage.jsonl records every exploit (log_config's files would be local to Tune's driver).
    common: dict[str, Any] = dict(time_attr="eval_round", perturbation_interval=scheduler.perturbation_interval,
                                  quantile_fraction=scheduler.quantile_fraction, synch=scheduler.synch,
                                  log_config=False)
    if scheduler.name == "pb2":
        bounds = {key: [domain.args[0], domain.args[1]] for key, domain in domains.items()}
        return DecidingPB2(board, last_round, hyperparam_bounds=bounds, **common)
    mutations = {key: domain.to_tune() for key, domain in domains.items()}
    return DecidingPBT(board, last_round, hyperparam_mutations=mutations, resample_probability=scheduler.resample_probability,
                       **common)


def pointer_checkpoint(folder: Path, trial: str, run: str, step: int, params: dict[str, Any]) -> ray.tune.Checkpoint:
    """The Tune checkpoint a trial reports with an evaluation: where raysft's checkpoint of that step is."""
    pointer = {"trial": trial, "run": run, "step": step, "params": params, "id": uuid.uuid4().hex}
    (folder / POINTER_FILE).write_text(json.dumps(pointer, indent=2))
    return ray.tune.Checkpoint.from_directory(folder)


def read_pointer(checkpoint: ray.tune.Checkpoint | None) -> dict[str, Any] | None:
    """The pointer in the Tune checkpoint a trial (re)starts from, or None."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as local:
        path = Path(local) / POINTER_FILE
        return json.loads(path.read_text()) if path.exists() else None


def _donor_checkpoint(pointer: dict[str, Any]) -> str:
    """The donor's checkpoint at the reported step when it still verifies, else its newest that does (Ray Train
    may have pruned the reported one since, as the donor trained on)."""
    root = storage.join(pointer["run"], CHECKPOINTS_DIR)
    reported = storage.join(root, step_dir_name(pointer["step"]))
    if storage.exists(reported):
        with checkpoint_at(reported).as_directory() as local:
            if damage(Path(local)) is None:
                return reported
    newest, _ = find_resumable(root)
    if newest is None:
        raise RunError(f"{pointer['trial']}: no verified checkpoint in {root} for another trial to continue from; "
                       "keep more (base.train.checkpoints_to_keep)")
    return newest


def adopt_donor_checkpoint(pointer: dict[str, Any], cfg: Config, before: dict[str, Any],
                           after: dict[str, Any]) -> dict[str, Any]:
    """Make the donor's checkpoint this trial's newest (its own checkpoints and Ray Train's record of them go: the
    run continues from the donor's state), record the config it now runs with, and return the lineage entry.

    Safe to repeat: a restart cut short does it again (the caller records the entry last)."""
    source = _donor_checkpoint(pointer)
    name = Path(source).name
    root = storage.join(run_location(cfg), CHECKPOINTS_DIR)
    own = find_resumable(root)[0]  # how far this trial had come itself
    with checkpoint_at(source).as_directory() as local:
        persist_checkpoint(Path(local), root, name, keep=None)
    for old in checkpoint_names(root):
        if old != name:
            storage.remove(storage.join(root, old))
    if storage.exists(storage.join(root, RAY_SNAPSHOT)):  # else Ray Train would hand back this trial's own newest
        storage.remove(storage.join(root, RAY_SNAPSHOT))
    cfg = pin_global_batch(cfg)
    write_run_config(cfg, config_changes(cfg, run_location(cfg)))
    return {"cloned": pointer["trial"], "step": step_of(name), "own_step": step_of(Path(own).name) if own else 0,
            "before": before, "after": after, "donor_values": pointer["params"], "checkpoint": source,
            "time": time.time(), "pointer": pointer["id"]}


def step_of(checkpoint_name: str) -> int:
    return int(checkpoint_name.rsplit("_", 1)[-1])


def applied(lineage: list[dict[str, Any]], pointer: dict[str, Any]) -> bool:
    """Whether the trial already continued from this pointer (Tune hands it back on --resume until the trial reports
    a checkpoint of its own)."""
    return bool(lineage) and lineage[-1].get("pointer") == pointer["id"]


def new_pointer_folder() -> Path:
    return Path(tempfile.mkdtemp(prefix="raysft-tune-pointer-"))
