"""Wiring: config -> pre-flight checks -> data pipeline -> Ray Train TorchTrainer running `train_loop_per_worker`."""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import FailureConfig, RunConfig, ScalingConfig as RayScalingConfig
from ray.autoscaler.sdk import request_resources
from ray.train import CheckpointConfig, LoggingConfig
from ray.train.torch import TorchTrainer

from raysft.cluster import autoscaler_adds_nodes, gcs_node_types
from raysft.config import Config, check_batch_fits, is_uri, with_absolute_paths
from raysft.data.pipeline import PreparedData, prepare_data, stats_json
from raysft.data.prompts import generation_set
from raysft.errors import USER_ERRORS, RunError, RunInterrupted
from raysft.evaluation import GenerationSet
from raysft import storage
from raysft.fileio import write_error
from raysft.console import say, verbose
from raysft.track import read_metrics
from raysft.tokenizer import load_tokenizer
from raysft.ray_session import ensure_ray, set_train_controller_env, train_log_level
from raysft.training.checkpoint import (
    find_resumable,
    prune_extra_checkpoints,
    read_state,
    repair_ray_snapshot,
    set_aside,
)
from raysft.training.checkpoint import CHECKPOINT_SCORE_KEY, higher_is_better, is_scored
from raysft.training.interrupt import new_stop_board, run_until_signalled
from raysft.training.preflight import preflight
from raysft.training.startup import mark
from raysft.run_folder import (
    CHECKPOINTS_DIR,
    DATA_STATS_FILE,
    FINAL_DIR,
    METRICS_FILE,
    check_run_folder,
    checkpoint_root,
    copy_results_home,
    output_path,
    pin_global_batch,
    run_location,
    step_dir_name,
    write_run_config,
)
from raysft.training.worker import LoopInputs, train_loop_per_worker
from raysft.training.decisions import TrialGate


@dataclass(frozen=True)
class RunResult:
    """What a finished `train` run left behind."""

    output_dir: Path
    final_dir: Path
    metrics: dict[str, Any]

    def history(self) -> list[dict[str, Any]]:
        """Every line of metrics.jsonl."""
        return read_metrics(self.output_dir / METRICS_FILE)


def scaling_config(cfg: Config) -> RayScalingConfig:
    """The Ray Train ScalingConfig of `cfg` (a sweep also sizes its trial concurrency from it)."""
    scaling = cfg.scaling
    return RayScalingConfig(
        num_workers=(scaling.min_workers, scaling.num_workers) if scaling.elastic else scaling.num_workers,
        use_gpu=scaling.use_gpu,
        resources_per_worker=scaling.worker_resources,
        elastic_resize_monitor_interval_s=scaling.elastic_resize_interval_s,
    )


def _workers_that_fit(node: dict[str, float], bundle: dict[str, float]) -> int:
    return min((int(node.get(resource, 0.0) // amount) for resource, amount in bundle.items() if amount > 0), default=0)


def _has_autoscaler() -> bool:
    """Whether an autoscaler that can add nodes runs.

    Autoscaler v2 (KubeRay) is announced by its environment variable. The v1 monitor runs on every
    cluster and reports its node types; without an autoscaling config it names each node `node_<id>`.
    """
    if os.environ.get("RAY_enable_autoscaler_v2") == "1":
        return True
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    return autoscaler_adds_nodes(gcs_node_types(_internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)))


def wait_for_worker_resources(cfg: Config, poll_s: float = 5.0) -> None:
    """Return once the cluster's nodes can hold the run's workers; RunError when they never will.

    Ray Train would otherwise wait for its worker group, time out and retry without end. Without an
    autoscaler the answer is known at once; with one, nodes may come: wait `scaling.resource_wait_s`.
    """
    if cfg.scaling.num_workers == 0:  # local mode: the loop runs in this process, on this machine's devices
        import torch

        if cfg.scaling.use_gpu and not torch.cuda.is_available():
            raise RunError("scaling.use_gpu: true, but this machine has no CUDA GPU and scaling.num_workers: 0 runs "
                           "the loop here; set num_workers >= 1 to run on the cluster's GPU nodes, or use_gpu: false")
        return
    bundle = scaling_config(cfg)._resources_per_worker_not_none
    wanted = cfg.scaling.min_workers or cfg.scaling.num_workers  # an elastic run starts with its minimum
    deadline, requested = time.monotonic() + cfg.scaling.resource_wait_s, False
    try:
        while True:
            nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
            if sum(_workers_that_fit(node, bundle) for node in nodes) >= wanted:
                return
            autoscaling = _has_autoscaler()
            if not autoscaling or time.monotonic() > deadline:
                has = "; ".join(", ".join(f"{k} {n.get(k, 0):g}" for k in sorted({"CPU", "GPU", *bundle})) for n in nodes)
                why = (f"no node came within scaling.resource_wait_s={cfg.scaling.resource_wait_s:g} s" if autoscaling
                       else "and no autoscaler to add nodes")
                raise RunError(
                    f"scaling: the cluster cannot hold {wanted} worker(s) of {bundle} each (scaling.num_workers="
                    f"{wanted}, scaling.use_gpu={str(cfg.scaling.use_gpu).lower()}, scaling.resources_per_worker="
                    f"{cfg.scaling.resources_per_worker}); its nodes have [{has}], {why}. Lower scaling.num_workers "
                    "or the per-worker resources, or add nodes"
                )
            if not requested:
                # The autoscaler adds nodes for work that waits; nothing waits yet, so ask for the workers' shape.
                request_resources(bundles=[bundle] * wanted)
                requested = True
                say(f"waiting up to {cfg.scaling.resource_wait_s:g} s for the autoscaler to add nodes for "
                    f"{wanted} worker(s) of {bundle}")
            time.sleep(poll_s)
    finally:
        if requested:
            request_resources(bundles=[])  # Ray Train's own placement group keeps the nodes from here on


# A storage that cannot take a write: full, over quota, read-only, or not ours to write.
STORAGE_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES}


def _failure_as_user_error(err: ray.train.TrainingFailedError, cfg: Config) -> Exception | None:
    """What a failed run says to the user: the raysft error a worker stopped with (changed data, a full
    disk, ...), or a storage write error (Ray Train uploading a checkpoint to a full or read-only place)."""
    failures = list(err.worker_failures.values()) if isinstance(err, ray.train.WorkerGroupError) else []
    failures += [err.controller_failure] if isinstance(err, ray.train.ControllerError) else []
    for failure in failures:
        cause: BaseException | None = getattr(failure, "cause", failure)  # a RayTaskError carries the worker's own
        while cause is not None:
            if isinstance(cause, USER_ERRORS):
                return cause
            if isinstance(cause, OSError) and cause.errno in STORAGE_WRITE_ERRORS:
                return write_error(Path(checkpoint_root(run_location(cfg))), cause)
            if storage.is_transient(cause):
                return storage_outage(cfg, cause)
            cause = cause.__cause__ or cause.__context__
    return None


def storage_outage(cfg: Config, err: BaseException) -> RunError:
    """What a run says when object storage stopped answering for longer than its retries wait: where, what is
    kept, and how to go on. The storage is asked once more (no retries) for the newest checkpoint that verifies."""
    waited = (f"the storage did not answer, and the run stopped after retrying each request for up to "
              f"{storage.retry_budget_s():g} s ({storage.RETRY_ENV}): {storage.one_line(err)}")
    longer = f"set {storage.RETRY_ENV} higher to ride out longer outages"
    if not cfg.scaling.storage_path:  # the data's storage (sources or data.cache_dir): nothing to resume
        return RunError(f"data: {waited}. Run again once it answers; {longer}")
    location = run_location(cfg)
    root = checkpoint_root(location)
    try:
        with storage.retry_budget(0):
            newest = find_resumable(root)[0]
        kept = f"the newest verified checkpoint, {newest}" if newest else f"no verified checkpoint in {root} yet"
    except OSError:
        kept = f"the checkpoints already in {root} (each one is checked against its manifest before it is resumed)"
    return RunError(
        f"scaling.storage_path: {location}: {waited}. Kept: {kept}. Once the storage answers again, run the same "
        f"command with --resume (`raysft train CONFIG --resume`) to continue from the newest checkpoint that "
        f"verifies; {longer}"
    )


def checkpoint_config(cfg: Config, has_eval: bool) -> CheckpointConfig:
    """Ray Train keeps the `checkpoints_to_keep` best by the evaluation score (plus the newest), or the newest."""
    if not is_scored(cfg, has_eval):
        return CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep)
    return CheckpointConfig(
        num_to_keep=cfg.train.checkpoints_to_keep,
        checkpoint_score_attribute=CHECKPOINT_SCORE_KEY,
        checkpoint_score_order="max" if higher_is_better(cfg) else "min",
    )


def _resume_point(cfg: Config, fingerprint: str) -> str | None:
    """The newest verified checkpoint a --resume continues from; it must have been trained on this data
    (the files may have changed since). Newer damaged checkpoints are set aside (never deleted) and dropped from
    Ray Train's record of the run, which would otherwise hand the newest one back to the workers."""
    if not cfg.train.resume:
        return None
    root = checkpoint_root(run_location(cfg))
    newest, damaged = find_resumable(root)
    for name, where in set_aside(root, list(damaged)).items():
        kept = f"kept as {where}" if where != storage.join(root, name) else "left in place"
        say(f"checkpoint {name} is damaged ({damaged[name]}); {kept}, not resumed")
    for name in repair_ray_snapshot(root):
        if name not in damaged:
            say(f"checkpoint {name} is no longer in {root}; Ray Train's record of it is dropped")
    if newest is None and damaged:
        say("no checkpoint verifies: the run starts over from step 0")
    if newest is not None and read_state(newest)["data_fingerprint"] != fingerprint:
        raise RunError(
            f"data: the training data differs from the data checkpoint {newest} was trained on (the files "
            "changed since); a resume must see the same rows. Restore the data, or start a new train.output_dir"
        )
    return newest


def prune_checkpoints(cfg: Config) -> list[str]:
    """Remove the checkpoints a stopped run left beyond train.checkpoints_to_keep (see prune_extra_checkpoints)."""
    root = checkpoint_root(run_location(cfg))
    return prune_extra_checkpoints(root, cfg.train.checkpoints_to_keep, higher_is_better(cfg))


def _interrupted(cfg: Config, signum: int | None, stopped_at: int | None) -> RunInterrupted:
    """What the driver says when the run stopped on request: where the run is, and whether it checkpointed."""
    if stopped_at is None:
        at = (f"did not stop within scaling.stop_grace_s={cfg.scaling.stop_grace_s:g} s; it continues from its "
              "newest checkpoint")
    else:
        at = f"stopped at step {stopped_at}" + (f" (checkpoint {step_dir_name(stopped_at)})" if stopped_at else "")
        copy_results_home(cfg)
    prune_checkpoints(cfg)
    return RunInterrupted(f"interrupted: the run in {run_location(cfg)} {at}", signum, stopped=stopped_at is not None)


@dataclass(frozen=True)
class CheckedRun:
    """A run that passed every check `train` makes before training: what it would train on, and from where."""

    config: Config
    """The config with every local path made absolute."""
    resume_changes: dict[str, dict[str, Any]]
    prepared: PreparedData
    generation: GenerationSet | None
    resume_from: str | None


def check(cfg: Config) -> CheckedRun:
    """Every check a run makes before training, in the order `train` makes them; trains nothing.

    The pre-flight checks and the run folder come first, before Ray starts; then the data is read, tokenized
    and packed on Ray Data (a local Ray is started unless one is reached; the data cache is filled, the run
    folder is not touched), and the packed data is checked against the batch size, the `eval.generate`
    references and a resume's checkpoint. `raysft train CONFIG --check` prints what this returns.

    Example:
        >>> import raysft
        >>> checked = check(raysft.load_config("examples/gsm8k_lora.yaml"))  # doctest: +SKIP
        >>> checked.prepared.stats  # doctest: +SKIP
    """
    cfg = with_absolute_paths(cfg)
    preflight(cfg)  # first: it also tells whether the storage can be reached at all
    cfg = pin_global_batch(cfg)  # before the resume check: a resume keeps the global batch the run started with
    resume_changes = check_run_folder(cfg)
    tokenizer = load_tokenizer(cfg.model)  # once in the driver: the data's cache keys and eval.generate's prompts
    prepared = prepare_data(cfg, tokenizer)
    check_batch_fits(cfg, prepared.num_rows("train"))
    generation = generation_set(cfg, prepared, tokenizer) if cfg.eval.generate is not None else None
    return CheckedRun(cfg, resume_changes, prepared, generation, _resume_point(cfg, prepared.fingerprint))


def train(cfg: Config, callbacks: list[Any] | None = None, gate: TrialGate | None = None,
          stop_board: Any = None) -> RunResult:
    """Fine-tune the model of `cfg` on Ray and write the run folder (docs: "Outputs, tracking, export").

    Everything that can be checked before Ray starts is (`check`; docs: "Guarantees and troubleshooting"); a
    refused run writes nothing. SIGINT or SIGTERM (on the main thread) or `stop_board` (a sweep's) stops the workers
    at a step boundary with a checkpoint: RunInterrupted, and `--resume` continues the run. `callbacks`: Ray Train
    callbacks; `gate`: a sweep trial's line to its scheduler.

    Example:
        >>> import raysft
        >>> cfg = raysft.load_config("examples/gsm8k_lora.yaml", ["train.max_steps=5"])  # doctest: +SKIP
        >>> result = raysft.train(cfg)  # doctest: +SKIP
        >>> result.final_dir  # a PEFT adapter folder  # doctest: +SKIP
    """
    cfg = with_absolute_paths(cfg)
    try:
        return _train(cfg, callbacks, gate, stop_board)
    except OSError as err:
        if storage.is_transient(err):  # the driver's own requests (run folder, data cache) gave up retrying
            raise storage_outage(cfg, err) from None
        raise


def _train(cfg: Config, callbacks: list[Any] | None, gate: TrialGate | None, stop_board: Any) -> RunResult:
    mark("train")
    checked = check(cfg)
    mark("checked")
    cfg, resume_changes, prepared = checked.config, checked.resume_changes, checked.prepared
    generation, resume_from = checked.generation, checked.resume_from
    if cfg.train.resume and (pruned := prune_checkpoints(cfg)):
        say(f"removed checkpoint(s) beyond train.checkpoints_to_keep={cfg.train.checkpoints_to_keep}: {', '.join(pruned)}")
    ensure_ray(cfg.scaling.ray_address)
    wait_for_worker_resources(cfg)
    own_board = stop_board is None
    stop_board = new_stop_board() if own_board else stop_board

    location = run_location(cfg)
    write_run_config(cfg, resume_changes)
    storage.write_bytes(storage.join(location, DATA_STATS_FILE), stats_json(prepared.stats).encode())
    inputs = LoopInputs(
        config=cfg,
        run_location=location,
        data_fingerprint=prepared.fingerprint,
        pad_token_id=prepared.pad_token_id,
        train_data=prepared.splits["train"],
        eval_data=prepared.splits.get("eval"),
        resume_from=resume_from,
        verbose=verbose(),
        generation=generation,
        gate=gate,
        stop_board=stop_board,
    )
    set_train_controller_env()
    # Object storage: Ray Train uploads checkpoints and its snapshot through raysft's retrying file system (and
    # tries a checkpoint upload up to 3 times itself: an outage then ends the run after up to 3 x the budget).
    storage_filesystem, storage_path = storage.resolve(location) if is_uri(location) else (None, location)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"inputs": inputs},
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(
            # Ray Train keeps the run's checkpoints (and its own snapshot of them) in <run>/checkpoints/.
            name=CHECKPOINTS_DIR,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=cfg.scaling.restarts),
            checkpoint_config=checkpoint_config(cfg, inputs.has_eval),
            callbacks=callbacks,
            logging_config=LoggingConfig(log_level=train_log_level()),
        ),
        # No Ray Datasets here: each worker reads the packed table's rows its steps need
        # (raysft/data/stream.py), in an order fixed by (seed, epoch, step).
    )
    mark("fit")
    try:
        outcome = run_until_signalled(trainer.fit, stop_board, cfg.scaling.stop_grace_s)
        stopped_at = ray.get(stop_board.stopped_at.remote(location)) if outcome.stopped else None
    except ray.train.TrainingFailedError as err:
        raise _failure_as_user_error(err, cfg) or err
    finally:
        if own_board:  # an actor (a process) per run: a session that trains many times keeps none of them
            ray.kill(stop_board)
    if not outcome.stopped or stopped_at is not None:
        raise _interrupted(cfg, outcome.signum, stopped_at)
    result = outcome.result
    assert result is not None  # a run that returned without being stopped
    copy_results_home(cfg)
    return RunResult(output_path(cfg), output_path(cfg) / FINAL_DIR, dict(result.metrics or {}))
