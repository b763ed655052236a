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

Tune restores a sweep's scheduler as it was before the first trial, so the perturbation schedule (when each trial
was last perturbed, when all next perturb together) is recorded in the sweep folder (`schedule.json`) and brought
back on --resume (`DecidingPopulation`).
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
SCHEDULE_FILE = "schedule.json"
"""A PBT sweep's perturbation schedule, in the sweep folder: what --resume continues."""
REPLAYED = "raysft_replayed"
"""Set in the results a trial that had finished before a --resume gives Tune again: they are the record, not news."""


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


def read_schedule(location: str) -> dict[str, Any]:
    """The perturbation schedule recorded at `location` ({} when there is none): `next_sync` (the eval round at which
    a synchronous PBT perturbs all trials next) and, by Tune trial id, `trials` {last_perturbed, last_counted} (the
    rounds at which PBT last perturbed the trial and last counted a result of it). RunError when it is damaged."""
    if not storage.exists(location):
        return {}
    try:
        schedule = json.loads(storage.read_bytes(location))
        for state in schedule["trials"].values():
            int(state["last_perturbed"]), int(state["last_counted"])
        int(schedule["next_sync"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise RunError(f"{location}: not a PBT schedule raysft wrote ({type(err).__name__}: {err}); move it away to "
                       "resume with PBT's clock started anew (a trial may then be perturbed again at a round it "
                       "already was)") from None
    return schedule


class DecidingPopulation(DecidingScheduler):
    """What DecidingPBT and DecidingPB2 add to Tune's PBT: a schedule that survives --resume, and a synchronous round
    that does not wait for a trial that will not report it.

    Tune restores a sweep's scheduler as it was before the first trial (a scheduler is not part of Tune's experiment
    state). A resumed PBT would then start its clock anew: perturb again at a round it already had, and, in
    synchronous mode, hold every trial that reported a perturbation round paused until all live trials reported one;
    a trial resumed past that round, or in its last round (left alone, DecidingScheduler), never does, so the sweep
    stalled with no trial running. So each trial's clock is recorded in `schedule_file` as PBT moves it, and
    restored when Tune adds the trial on --resume (trial ids stay the same); and when every live trial waits paused
    with none left to run, the perturbation those trials wait for happens then (as it would have on the last report),
    or, if they already had it, the next one is set after them."""

    schedule_file: str
    _recorded: dict[str, Any] | None
    _written: dict[str, Any] | None
    # Tune's PopulationBasedTraining's own state, which this restores and records.
    _trial_state: dict[Trial, Any]
    _next_perturbation_sync: int
    _perturbation_interval: int
    _synch: bool

    def _start_schedule(self, board: str, last_round: int | None, schedule_file: str) -> None:
        self.board, self.last_round, self.schedule_file = board, last_round, schedule_file
        self._recorded = self._written = None  # read when the first trial is added (Tune pickles this before)

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)  # type: ignore[misc]
        if self._recorded is None:
            self._recorded = read_schedule(self.schedule_file)
            if self._recorded:
                self._next_perturbation_sync = int(self._recorded["next_sync"])
        if (recorded := self._recorded.get("trials", {}).get(trial.trial_id)) is not None:
            state = self._trial_state[trial]
            state.last_perturbation_time = int(recorded["last_perturbed"])
            state.last_train_time = int(recorded["last_counted"])

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        if result.get(REPLAYED):
            return TrialScheduler.CONTINUE
        decision = super().on_trial_result(tune_controller, trial, result)
        self._record()
        return decision

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        chosen = super().choose_trial_to_run(tune_controller)  # type: ignore[misc]
        if chosen is None and self._synch and (waiting := self._waiting(tune_controller)):
            self._perturb_waiting(tune_controller, waiting)
            chosen = super().choose_trial_to_run(tune_controller)  # type: ignore[misc]
        return chosen

    def _waiting(self, tune_controller: Any) -> list[Trial]:
        """The live trials when every one of them is paused (so no result will come), else []."""
        live = [trial for trial in tune_controller.get_live_trials() if not trial.is_finished()]
        return live if live and all(trial.status == Trial.PAUSED for trial in live) else []

    def _perturb_waiting(self, tune_controller: Any, waiting: list[Trial]) -> None:
        states = [self._trial_state[trial] for trial in waiting]
        due = [trial for trial, state in zip(waiting, states) if state.last_result is not None
               and state.last_train_time - state.last_perturbation_time >= self._perturbation_interval]
        if due:  # Tune's own synchronous perturbation, as the result the last of them reported would have started it
            trial = max(due, key=lambda t: self._trial_state[t].last_train_time)
            super(DecidingScheduler, self).on_trial_result(tune_controller, trial, self._trial_state[trial].last_result)
        if all(state.last_train_time >= self._next_perturbation_sync for state in states):
            self._next_perturbation_sync = max(state.last_train_time for state in states) + self._perturbation_interval
        self._record()

    def _record(self) -> None:
        """Record the schedule where the sweep lives, when PBT moved it."""
        schedule = {"next_sync": self._next_perturbation_sync, "trials": {
            trial.trial_id: {"last_perturbed": state.last_perturbation_time, "last_counted": state.last_train_time}
            for trial, state in self._trial_state.items()}}
        if schedule != self._written:
            storage.write_bytes(self.schedule_file, json.dumps(schedule, indent=2).encode())
            self._written = schedule


class DecidingPBT(DecidingPopulation, PopulationBasedTraining):
    """Tune's PBT, deciding through the sweep's decision board, its schedule recorded for --resume."""

    def __init__(self, board: str, last_round: int | None, schedule_file: str, **pbt: Any):
        super().__init__(**pbt)
        self._start_schedule(board, last_round, schedule_file)


class DecidingPB2(DecidingPopulation, PB2):
    """Tune's PB2 (PBT with a Gaussian-process bandit choosing the new values), deciding through the decision board,
    its schedule recorded for --resume (the bandit's data starts anew: results since the resume)."""

    def __init__(self, board: str, last_round: int | None, schedule_file: str, **pb2: Any):
        super().__init__(**pb2)
        self._start_schedule(board, last_round, schedule_file)


def pbt_scheduler(cfg: SweepConfig, board: str, home: str) -> PopulationBasedTraining:
    """Tune's PBT or PB2 over `scheduler.hyperparam_mutations`, in eval rounds."""
    scheduler, domains, train = cfg.scheduler, mutation_domains(cfg), cfg.base.train
    last_round = eval_round(train.max_steps, train.eval_every) if train.max_steps else None
    # The sweep's lineage.jsonl records every exploit (log_config's files would be local to Tune's driver).
    common: dict[str, Any] = dict(time_attr="eval_round", perturbation_interval=scheduler.perturbation_interval,
                                  quantile_fraction=scheduler.quantile_fraction, synch=scheduler.synch,
                                  log_config=False)
    schedule = storage.join(home, SCHEDULE_FILE)
    if scheduler.name == "pb2":
        bounds = {key: [domain.args[0], domain.args[1]] for key, domain in domains.items()}
        return DecidingPB2(board, last_round, schedule, hyperparam_bounds=bounds, **common)
    mutations = {key: domain.to_tune() for key, domain in domains.items()}
    return DecidingPBT(board, last_round, schedule, hyperparam_mutations=mutations,
                       resample_probability=scheduler.resample_probability, **common)


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
