"""`raysft sweep`: Ray Tune over train configs. One trial = one Ray Train run (the Train V2 way: a Tune
driver function per trial builds and fits a TorchTrainer with the trial's values set in the base config).

Sweep folder (``output_dir``):

    sweep.yaml        the resolved sweep (base config inline)
    tune/             Ray Tune's experiment state (what --resume restores)
    trials/trial_N/   each trial's train run folder: trial.json, metrics.jsonl, checkpoints/, final/
    mlflow_run.json   with base.tracking.mlflow: the sweep's MLflow run, parent of every trial's
    mlflow/           ... and, without MLFLOW_TRACKING_URI, the local store all trials log to
    results.csv  best/  report.png  report.md   (see raysft.tune.report)
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import tune
from ray.train.v2.api.callback import UserCallback
from ray.util.queue import Empty, Queue
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from raysft import storage
from raysft.config import (
    EVAL_LOSS,
    Config,
    absolute_path,
    flatten,
    output_base,
    set_dotted,
    validate_section,
    with_absolute_paths,
)
from raysft.errors import ConfigError, RunInterrupted
from raysft.fileio import write_text_atomically
from raysft.console import VERBOSE_ENV, verbose
from raysft.mlflow_run import MlflowRun, open_mlflow_run, recorded_mlflow_run
from raysft.ray_session import environment, quiet_worker
from raysft.training.interrupt import SweepStopper, new_stop_board, recorded_signals
from raysft.training.preflight import preflight
from raysft import run_folder
from raysft.run_folder import (
    FINAL_DIR,
    METRICS_FILE,
    MLFLOW_DIR,
    SWEEP_FILE,
    TRIAL_FILE,
    TRIALS_DIR,
    TUNE_DIR,
    run_location,
)
from raysft.data.pipeline import prepare_data
from raysft.ray_session import ensure_ray
from raysft.training.trainer import scaling_config, train, wait_for_worker_resources
from raysft.tune.config import SweepConfig, check_sweep, mutation_domains, sweep_yaml
from raysft.training.decisions import TrialGate, board_name, eval_round, open_board
from raysft.tune.pbt import (
    REPLAYED,
    SCHEDULE_FILE,
    DecidingScheduler,
    adopt_donor_checkpoint,
    applied,
    new_pointer_folder,
    pbt_scheduler,
    pointer_checkpoint,
    read_pointer,
    read_schedule,
)
from raysft.tune.report import SweepResult, write_report
from raysft.tune.space import Domain, to_param_space

# Tune needs a non-empty resource request per trial. The driver function only coordinates (its Ray
# Train workers hold the CPUs/GPUs), so it reserves a little memory and no CPU: a CPU here would be
# a CPU the trial's own workers could not get.
TRIAL_DRIVER_RESOURCES: dict[str, float] = {"memory": 512.0 * 2**20}
# ASHA's horizon when the base config does not fix the number of steps.
DEFAULT_MAX_ROUNDS = 100
# How a trial's MLflow run ends (a completed trial's rank 0 has ended it FINISHED already).
MLFLOW_STATUS = {"completed": "FINISHED", "stopped_early": "KILLED", "interrupted": "KILLED", "error": "FAILED"}
# Tune's statuses of a trial that has not ended: a stopped sweep leaves it to --resume.
UNFINISHED_TUNE_STATUSES = ("PENDING", "RUNNING", "PAUSED")


class SweepProgress:
    """What the sweep driver knows while Tune runs: each trial's latest Tune status, and whether the sweep is
    stopping on a signal. Module-wide (one sweep per driver process at a time) because on --resume Tune brings
    back its callbacks (LiveTable) as copies from its saved state, which must report to this process's sweep."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.statuses: dict[str, str] = {}
        self.stopping = threading.Event()


PROGRESS = SweepProgress()


def trial_name(trial: Any) -> str:
    """Folder and display name of a trial, stable across --resume: `trial_00003` from Tune's trial counter
    (random and grid search), `trial_<id>` from the searcher's own trial id (optuna)."""
    return f"trial_{trial.trial_id.rsplit('_', 1)[-1]}"


def trial_config(cfg: SweepConfig, params: dict[str, Any], name: str, mlflow_parent: str | None = None) -> Config:
    """The train config of one trial: base + the trial's values, writing into the sweep's trials/ folder
    (`mlflow_parent`: the sweep's MLflow run, which the trial's nests under)."""
    raw = copy.deepcopy(cfg.base.model_dump(mode="json"))
    for key, value in params.items():
        set_dotted(raw, key, value)
    raw["train"]["output_dir"] = str(Path(str(cfg.output_dir)) / TRIALS_DIR / name)  # absolute: see sweep()
    # A trial restarted by --resume continues from its own newest checkpoint (a fresh one finds none).
    raw["train"]["resume"] = True
    root = sweep_storage(cfg)
    if root is not None:  # the trial's run lives in the sweep's storage; trials/<name> gets its results
        raw["scaling"]["storage_path"] = storage.join(root, TRIALS_DIR, name)
    # The sweep prints one table for all trials; per-step lines of every trial would bury it.
    raw["tracking"]["console"] = False
    raw["tracking"]["wandb_group"] = raw["tracking"].get("wandb_group") or cfg.name
    raw["tracking"]["run_name"] = name
    if raw["tracking"]["mlflow"]:  # one local store for the sweep, unless a server or a folder was given
        raw["tracking"]["mlflow_dir"] = raw["tracking"]["mlflow_dir"] or str(Path(str(cfg.output_dir)) / MLFLOW_DIR)
        raw["tracking"]["mlflow_parent_run_id"] = mlflow_parent or raw["tracking"]["mlflow_parent_run_id"]
    return validate_section(Config, raw, f"trial {name}")


def sweep_storage(cfg: SweepConfig) -> str | None:
    """Where the sweep lives on storage, or None (run_folder.sweep_storage_location)."""
    return run_folder.sweep_storage_location(cfg.base.scaling.storage_path, cfg.name)


def sweep_home(cfg: SweepConfig) -> str:
    """Where the sweep lives: its storage, else its (absolute) output_dir."""
    return sweep_storage(cfg) or str(cfg.output_dir)


def fetch_trials(cfg: SweepConfig) -> None:
    """Copy every trial's results (and Tune's error files) from the sweep's storage to the local sweep folder."""
    if (root := sweep_storage(cfg)) is not None:
        run_folder.fetch_trials(root, Path(str(cfg.output_dir)))


def is_evaluation(record: dict[str, Any]) -> bool:
    """Only evaluations go to Tune: Tune requires the sweep metric in every result it gets."""
    return EVAL_LOSS in record


def tune_result(record: dict[str, Any], eval_every: int | None) -> dict[str, Any]:
    """The Tune result of one evaluation report: the record tagged with its eval round."""
    return {**record, "eval_round": eval_round(int(record["step"]), eval_every)}


class EvalRoundsToTune(UserCallback):
    """Pass rank 0's evaluation reports, tagged with their eval round, to the trial's Tune session (other reports stay
    out), with whether a checkpoint was saved at that step. Ray Train runs callbacks in its controller, so the trial's
    driver takes them from `queue` and reports them to Tune itself, each with a pointer to its checkpoint (pbt.py)."""

    def __init__(self, eval_every: int | None, queue: Queue):
        self.eval_every = eval_every
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if is_evaluation(metrics[0]):
            self.queue.put((tune_result(metrics[0], self.eval_every), checkpoint is not None))


def report_to_tune(result: dict[str, Any], checkpointed: bool, name: str, location: str,
                   params: dict[str, Any]) -> None:
    """One evaluation to Tune; with a checkpoint at its step, a Tune checkpoint that points at it (what PBT clones)."""
    if not checkpointed:
        ray.tune.report(result)
        return
    folder = new_pointer_folder()
    try:
        ray.tune.report(result, checkpoint=pointer_checkpoint(folder, name, location, int(result["step"]), params))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def train_reporting(train_cfg: Config, gate: TrialGate | None, stop_board: Any, name: str,
                    params: dict[str, Any]) -> None:
    """`train` on a thread of its own while this (the trial's Tune) thread reports its evaluations to Tune."""
    queue: Queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    raised: list[BaseException] = []

    def target() -> None:
        try:
            train(train_cfg, callbacks=[EvalRoundsToTune(train_cfg.train.eval_every, queue)], gate=gate,
                  stop_board=stop_board)
        except BaseException as err:  # re-raised on the trial's thread
            raised.append(err)

    location = run_location(train_cfg)
    thread = threading.Thread(target=target, name=f"raysft-{name}", daemon=True)
    thread.start()
    try:
        while True:
            alive = thread.is_alive()  # before the get: a result put just before the run ended is still taken
            try:
                item = queue.get(timeout=0.5)
            except Empty:
                if alive:
                    continue
                break
            report_to_tune(*item, name, location, params)
    finally:
        thread.join()
        queue.shutdown(force=True)
    if raised:
        raise raised[0]


def _eval_records(location: str) -> list[dict[str, Any]]:
    metrics = storage.join(location, METRICS_FILE)
    if not storage.exists(metrics):
        return []
    lines = storage.read_bytes(metrics).decode().splitlines()
    return [r for r in map(json.loads, lines) if is_evaluation(r)]


def run_trial(params: dict[str, Any], sweep: dict[str, Any], mlflow_parent: str | None = None,
              verbose_run: bool = False, stop_board: Any = None) -> None:
    """Tune driver function of one trial: train the base config with `params` set, reporting evaluations.
    `verbose_run` is the sweep driver's console mode, which this process (Tune's, for this trial) takes on;
    `stop_board` the sweep's (raysft/training/interrupt.py), through which a signal to the sweep stops the trial."""
    os.environ[VERBOSE_ENV] = "1" if verbose_run else "0"
    quiet_worker(verbose_run)
    cfg = SweepConfig.model_validate(sweep)
    name = ray.tune.get_context().get_trial_name()
    train_cfg = trial_config(cfg, params, name, mlflow_parent)
    location = run_location(train_cfg)
    eval_every = train_cfg.train.eval_every
    if storage.exists(storage.join(location, FINAL_DIR)):
        # Finished before the sweep was interrupted: give Tune its evaluations again instead of retraining (marked,
        # so that PBT does not take them for news: pbt.py).
        for record in _eval_records(location):
            ray.tune.report({**tune_result(record, eval_every), REPLAYED: True})
        return
    trial_file = storage.join(location, TRIAL_FILE)
    earlier = json.loads(storage.read_bytes(trial_file)) if storage.exists(trial_file) else {}
    lineage = earlier.get("lineage", [])
    pointer = read_pointer(ray.tune.get_checkpoint())
    if pointer is not None and pointer["trial"] != name and not applied(lineage, pointer):
        # PBT restarted this trial from another trial's checkpoint, with mutated values (raysft/tune/pbt.py).
        lineage.append(adopt_donor_checkpoint(pointer, train_cfg, before=earlier.get("params", params), after=params))
    elif lineage and earlier["params"] != params:
        # Tune saves its experiment state every few seconds: what --resume restored may predate an exploit this trial
        # already took (its run folder holds the donor's checkpoint), with the values from before. Its own record wins.
        params = earlier["params"]
        train_cfg = trial_config(cfg, params, name, mlflow_parent)
    info = {"name": name, "params": params, "started": earlier.get("started", time.time())}
    trial_info = json.dumps({**info, **({"lineage": lineage} if lineage else {})}, indent=2).encode()
    storage.write_bytes(trial_file, trial_info)
    if location != train_cfg.train.output_dir:
        storage.write_bytes(str(Path(train_cfg.train.output_dir) / TRIAL_FILE), trial_info)
    if train_cfg.tracking.mlflow:
        # Opened here so that its params are the trial's sampled values (as Ray Tune's MLflow callback logs
        # them; the whole config is in the parent's); rank 0 finds the run in the trial folder and continues it.
        open_mlflow_run(train_cfg.tracking, location, Path(train_cfg.train.output_dir) / MLFLOW_DIR, name, params,
                        tags={"raysft.sweep": cfg.name, "raysft.trial": name})
    # A scheduler that can stop a trial is heard at every evaluation (raysft/training/decisions.py); FIFO never stops one.
    gate = TrialGate(board_name(sweep_home(cfg)), ray.tune.get_context().get_trial_id()) if stops_trials(cfg) else None
    if gate is not None:
        gate.restarted()
    ray.get(stop_board.begin.remote(name))
    try:
        train_reporting(train_cfg, gate, stop_board, name, params)
        if gate is not None and gate.paused():
            # Paused by PBT (its workers stopped after the checkpoint of the evaluation it reported): Tune ends this
            # process and restarts the trial from a checkpoint, its own or a better trial's.
            ray.get(stop_board.end.remote(name))
            threading.Event().wait()
    except RunInterrupted:
        ray.get(stop_board.end.remote(name))
        # Checkpointed. The trial holds its place (no other trial starts in it) until the sweep driver ends the
        # experiment, which Tune saves with this trial unfinished: --resume continues it.
        threading.Event().wait()
    finally:
        stop_board.end.remote(name)


def _tune_console() -> contextlib.AbstractContextManager[None]:
    """Tune's own console off unless verbose: its output engine prints an experiment box and a TensorBoard hint
    at every start whatever RunConfig's `verbose` says; its legacy engine (RAY_AIR_NEW_OUTPUT=0, read when the
    run starts) prints nothing at verbose=0. The LiveTable callback is the sweep's console."""
    return environment(RAY_AIR_NEW_OUTPUT=None if verbose() else "0")


def default_max_concurrent(train_cfg: Config, cluster: dict[str, float]) -> int:
    """How many trials the cluster holds at once, each with its full set of Ray Train workers."""
    need = {k: v for k, v in scaling_config(train_cfg).total_resources.items() if v > 0}
    fits = [int(cluster.get(resource, 0.0) // amount) for resource, amount in need.items()]
    return max(1, min(fits, default=1))


def _max_rounds(cfg: SweepConfig) -> int:
    if cfg.scheduler.max_rounds:
        return cfg.scheduler.max_rounds
    train = cfg.base.train
    if train.max_steps and train.eval_every:
        return math.ceil(train.max_steps / train.eval_every)
    return DEFAULT_MAX_ROUNDS


class DecidingASHA(DecidingScheduler, ASHAScheduler):
    """ASHA deciding through the sweep's decision board. ASHA stops every trial that reaches max_t; the last round
    is left alone instead, so the trial ends by itself and writes final/."""

    def __init__(self, board: str, last_round: int, **asha: Any):
        super().__init__(**asha)
        self.board, self.last_round = board, last_round


def stops_trials(cfg: SweepConfig) -> bool:
    """Whether the sweep's scheduler may stop a trial before its last step."""
    return cfg.scheduler.name != "fifo"


def _scheduler(cfg: SweepConfig, home: str) -> Any:
    if not stops_trials(cfg):
        return FIFOScheduler()
    if cfg.scheduler.name in ("pbt", "pb2"):
        return pbt_scheduler(cfg, board_name(home), home)
    return DecidingASHA(
        board_name(home),
        last_round=_max_rounds(cfg),
        time_attr="eval_round",
        grace_period=cfg.scheduler.grace_period,
        reduction_factor=cfg.scheduler.reduction_factor,
        max_t=max(_max_rounds(cfg), cfg.scheduler.grace_period),
    )


def _search_alg(cfg: SweepConfig, max_concurrent: int) -> Any:
    if cfg.search_alg == "optuna":
        from ray.tune.search.optuna import (
            OptunaSearch,  # optuna is imported only when asked for
        )

        return OptunaSearch(seed=cfg.seed)
    # Tune applies max_concurrent_trials to a Searcher (optuna) itself, but not to a generator passed in.
    return BasicVariantGenerator(max_concurrent=max_concurrent, random_state=cfg.seed)


def _num_samples(cfg: SweepConfig, domains: dict[str, Domain]) -> int:
    if cfg.num_samples:
        return cfg.num_samples
    pure_grid = cfg.search_alg == "grid" or all(d.form == "grid" for d in domains.values())
    return 1 if pure_grid else 8


class LiveTable(tune.Callback):
    """The sweep's console: one line per evaluation and per finished trial (trial, params, step, metric, status)."""

    def __init__(self, metric: str, keys: list[str]):
        self.metric = metric
        self.keys = keys

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        if not PROGRESS.stopping.is_set():  # the statuses before the stop, not those of its teardown
            PROGRESS.statuses = {trial_name(t): t.status for t in trials}

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        print(f"[sweep] {trial_name(trial)}  {_params_text(trial.config, self.keys)}  started", flush=True)

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any) -> None:
        running = sum(t.status == "RUNNING" for t in trials)
        print(
            f"[sweep] {trial_name(trial)}  {_params_text(trial.config, self.keys)}  step {result.get('step')}  "
            f"{self.metric} {result.get(self.metric, float('nan')):.4f}  RUNNING  ({running} running)",
            flush=True,
        )

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        if PROGRESS.stopping.is_set():  # a trial stopped with the sweep: the sweep's one line says what to do
            return
        done = 1 + sum(t.status in ("TERMINATED", "ERROR") for t in trials if t is not trial)
        print(f"[sweep] {trial_name(trial)}  finished  ({done}/{len(trials)} trials done)", flush=True)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        if PROGRESS.stopping.is_set():
            return
        error_file = getattr(trial, "error_file", None)  # Tune writes it before this call, when it has a folder
        where = f"see {error_file}" if error_file and os.path.exists(error_file) else f"{trial.error_msg or ''}"[:300]
        print(f"[sweep] {trial_name(trial)}  ERROR  ({where})", flush=True)


def _params_text(config: dict[str, Any], keys: list[str]) -> str:
    return " ".join(f"{k}={_short(config.get(k))}" for k in keys)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _mlflow_problem(cfg: SweepConfig) -> str | None:
    tracking = cfg.base.tracking
    if tracking.mlflow and sweep_storage(cfg) and not (os.environ.get("MLFLOW_TRACKING_URI") or tracking.mlflow_dir):
        return ("base.tracking.mlflow: a sweep in object storage (base.scaling.storage_path) runs its trials on any "
                "node, and they cannot share one local MLflow store; set MLFLOW_TRACKING_URI to a tracking server "
                "(or base.tracking.mlflow_dir to a folder every node mounts)")
    return None


def open_sweep_mlflow_run(cfg: SweepConfig, home: str) -> MlflowRun | None:
    """The sweep's own MLflow run, which every trial's nests under (its params: the resolved sweep, base
    included); a --resume continues it. None without base.tracking.mlflow."""
    if not cfg.base.tracking.mlflow:
        return None
    return open_mlflow_run(cfg.base.tracking, home, Path(str(cfg.output_dir)) / MLFLOW_DIR, cfg.name,
                           params=flatten(yaml.safe_load(sweep_yaml(cfg))), tags={"raysft.sweep": cfg.name})


def end_sweep_mlflow_run(run: MlflowRun, cfg: SweepConfig, home: str, result: SweepResult) -> None:
    """End the runs of trials that did not finish (stopped early: KILLED, failed: FAILED), tag the sweep's run
    with the best trial and its metric, and end it."""
    for trial in result.trials:
        child = recorded_mlflow_run(storage.join(home, TRIALS_DIR, trial.name))
        if child is not None and trial.status != "completed":
            run.client.set_terminated(child, MLFLOW_STATUS[trial.status])
    if result.best is not None and result.best.last is not None:
        run.client.set_tag(run.run_id, "raysft.best_trial", result.best.name)
        run.client.log_metric(run.run_id, f"best_{cfg.metric}", result.best.last)
    run.end("FINISHED")


class _TuneStopHint(logging.Filter):
    """Drops Tune's own lines about a stop (its `Tuner.restore(...)` hint among them): raysft's line names
    `raysft sweep ... --resume` instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("Tuner.restore" in message or message.startswith("Stop signal received"))


@contextlib.contextmanager
def _stop_handled_by_raysft() -> Iterator[None]:
    """While Tune runs: SIGINT is raysft's (Tune would end the experiment at once, the trials unsaved), and
    Tune's stop messages are dropped."""
    tune_logger, hint = logging.getLogger("ray.tune.tune"), _TuneStopHint()
    tune_logger.addFilter(hint)
    try:
        with environment(TUNE_DISABLE_SIGINT_HANDLER="1"):
            yield
    finally:
        tune_logger.removeFilter(hint)


def mark_interrupted(home: str, names: list[str]) -> None:
    """Record in each trial's trial.json that a stopped sweep interrupted it (its run resumes on --resume, which
    rewrites trial.json without the mark)."""
    for name in names:
        trial_file = storage.join(home, TRIALS_DIR, name, TRIAL_FILE)
        if storage.exists(trial_file):
            info = json.loads(storage.read_bytes(trial_file))
            storage.write_bytes(trial_file, json.dumps({**info, "interrupted": time.time()}, indent=2).encode())


def sweep(cfg: SweepConfig, resume: bool = False) -> SweepResult:
    """Run (or with `resume`, continue) a sweep on Ray Tune and write results.csv, best/ and report.png.

    Example:
        >>> import raysft
        >>> result = raysft.sweep(raysft.load_sweep("sweeps/lora_rank_lr.yaml"))  # doctest: +SKIP
        >>> result.best.name, result.best_dir  # doctest: +SKIP
    """
    # Every path is resolved here, once: each trial runs in a working directory Tune chose, where a
    # relative output folder or data path would point somewhere else (and the results would be lost).
    sweep_dir = absolute_path(str(cfg.output_dir), output_base())  # an absolute one stays as it is
    cfg = cfg.model_copy(update={"output_dir": str(sweep_dir), "base": with_absolute_paths(cfg.base)})
    home = sweep_home(cfg)
    where = "base.scaling.storage_path" if sweep_storage(cfg) else "output_dir"
    tune_dir = storage.join(home, TUNE_DIR)
    preflight(cfg.base.model_copy(update={"train": cfg.base.train.model_copy(update={"output_dir": str(sweep_dir)})}))
    if (problem := _mlflow_problem(cfg)) is not None:
        raise ConfigError([problem])
    if resume and not tune.Tuner.can_restore(tune_dir):
        raise ConfigError([f"{where}: no sweep to resume in {home}"])
    if not resume and storage.exists(tune_dir):
        raise ConfigError([f"{where}: {home} already holds a sweep; continue it with --resume or choose a new one"])
    if resume:
        read_schedule(storage.join(home, SCHEDULE_FILE))  # a damaged PBT schedule is refused before Ray starts
    domains = check_sweep(cfg)  # configs built in Python get the same checks as loaded YAML
    # PBT's mutated values that the space does not sample are drawn from their mutation domains at the start.
    mutated_only = {key: domain for key, domain in mutation_domains(cfg).items() if key not in domains}
    # The whole base config (above), data included (below), is checked before any trial starts: a mistake
    # there would otherwise fail every trial, one by one.
    # Tokenize once for every trial: the cache is keyed by content, not max_seq_len, so trials that
    # differ in sequence length only re-pack.
    prepare_data(cfg.base)
    ensure_ray(cfg.base.scaling.ray_address)
    wait_for_worker_resources(cfg.base)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(sweep_dir / SWEEP_FILE, sweep_yaml(cfg))
    if home != str(sweep_dir):
        storage.write_bytes(storage.join(home, SWEEP_FILE), sweep_yaml(cfg).encode())
    mlflow_run = open_sweep_mlflow_run(cfg, home)

    max_concurrent = cfg.max_concurrent_trials or default_max_concurrent(cfg.base, ray.cluster_resources())
    print(f"[sweep] {cfg.name}: {cfg.scheduler.name}, {cfg.search_alg} search, up to {max_concurrent} trial(s) at once; "
          f"folder {sweep_dir}", flush=True)
    stop_board = new_stop_board()
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, sweep=cfg.model_dump(mode="json"),
                             mlflow_parent=mlflow_run.run_id if mlflow_run else None, verbose_run=verbose(),
                             stop_board=stop_board),
        TRIAL_DRIVER_RESOURCES,
    )
    if resume:
        tuner = tune.Tuner.restore(tune_dir, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={**to_param_space(domains, cfg.search_alg), **to_param_space(mutated_only, "random")},
            tune_config=tune.TuneConfig(
                metric=cfg.metric,
                mode=cfg.mode,
                num_samples=_num_samples(cfg, domains),
                max_concurrent_trials=max_concurrent if cfg.search_alg == "optuna" else None,
                scheduler=_scheduler(cfg, home),
                search_alg=_search_alg(cfg, max_concurrent),
                trial_name_creator=trial_name,
                trial_dirname_creator=trial_name,
            ),
            run_config=tune.RunConfig(
                name=TUNE_DIR,
                storage_path=home,
                callbacks=[LiveTable(cfg.metric, [*domains, *mutated_only])],
                verbose=0,
            ),
        )
    # Held until the trials are done: the board lives as long as this handle (Tune restores the scheduler, which
    # names the board, on --resume).
    board = open_board(board_name(home)) if stops_trials(cfg) else None
    PROGRESS.reset()
    stopper = SweepStopper(stop_board, cfg.base.scaling.stop_grace_s, PROGRESS.stopping)
    with _tune_console(), _stop_handled_by_raysft(), recorded_signals(stopper.on_signal) as received:
        stopper.received = received
        tuner.fit()
    if board is not None:
        ray.kill(board)
    if received:
        unfinished = [name for name, status in PROGRESS.statuses.items() if status in UNFINISHED_TUNE_STATUSES]
        mark_interrupted(home, unfinished)
        fetch_trials(cfg)
        write_report(sweep_dir)
        raise RunInterrupted(f"interrupted: the sweep in {sweep_dir} stopped, its running trials checkpointed "
                             f"({len(unfinished)} unfinished; results.csv lists them as interrupted)", received[0])
    fetch_trials(cfg)
    result = write_report(sweep_dir)
    if mlflow_run is not None:
        end_sweep_mlflow_run(mlflow_run, cfg, home, result)
    return result
