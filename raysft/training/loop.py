"""The training loop every Ray Train worker runs, written out in one place.

forward -> token-weighted loss -> backward (accumulate) -> unscale/clip -> step -> schedule -> eval (loss, then
eval.generate's task metrics) -> report -> checkpoint -> early stop
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from peft import PeftModel
from torch import nn

from raysft import storage
from raysft.config import Config, global_batch_rows, is_uri
from raysft.data.stream import PackedRows, chunks_to_keep
from raysft.fileio import replace_dir_atomically, write_error, write_text_atomically
from raysft.model import (
    TokenLoss,
    add_neftune_noise,
    apply_lora,
    load_model,
    load_tokenizer,
    load_tokenizer_and_new_ids,
)
from raysft.run_folder import (
    FINAL_DIR,
    GENERATIONS_FILE,
    METRICS_FILE,
    MLFLOW_DIR,
    RANK0_FILES,
    STAGING_PREFIX,
    checkpoint_root,
    step_dir_name,
)
from raysft.track import Tracker, read_metrics
from raysft.training.checkpoint import (
    better,
    higher_is_better,
    is_scored,
    load_trainable,
    remove_staging,
    restore,
    save_checkpoint,
)
from raysft.training.fsdp import all_finite, gathered_state_dict, is_sharded, shard
from raysft.training.generate_eval import GenerationEval
from raysft.training.interrupt import StopCheck
from raysft.training.optim import build_optimizer, lr_at, set_lr
from raysft.training.step import ORDER_CHUNK_ROWS, BatchSchedule, all_reduce_sum, autocast, train_step
from raysft.training.stopping import patience_of
from raysft.training.worker import LoopInputs  # defined apart so that Ray's controller unpickles it without torch
from raysft.training.decisions import STOP, TrialGate, eval_round


@torch.no_grad()
def evaluate(
    loss_module: TokenLoss, rows: PackedRows, cfg: Config, rank: int, world: int, pad_id: int, device: torch.device
) -> dict[str, float]:
    """Token-weighted eval loss, perplexity and next-token accuracy over all eval rows and workers."""
    loss_module.eval()
    micro = cfg.train.micro_batch_size
    mine = np.arange(rank, len(rows), world)
    batches: list[np.ndarray | None] = [mine[start : start + micro] for start in range(0, len(mine), micro)]
    if is_sharded(loss_module):
        # Each forward gathers the sharded layers collectively, so every rank runs as many as rank 0 (which
        # holds the most rows); a rank out of rows runs one of rank 0's and discards the result.
        batches += [None] * (math.ceil(math.ceil(len(rows) / world) / micro) - len(batches))
    loss_sum = correct = 0.0
    for indices in batches:
        batch = {k: v.to(device) for k, v in rows.batch(indices if indices is not None else np.arange(1), pad_id).items()}
        with autocast(cfg.train.precision, device):
            batch_loss, batch_correct = loss_module(**batch)
        if indices is not None:
            loss_sum += float(batch_loss)
            correct += float(batch_correct)
    tokens = rows.trained_tokens(mine)
    loss_sum, correct, tokens = all_reduce_sum([loss_sum, correct, tokens], device)
    loss_module.train()
    eval_loss = loss_sum / max(tokens, 1.0)
    return {"eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50.0)), "eval_token_accuracy": correct / max(tokens, 1.0)}


def _scheduler_stops(gate: TrialGate, round_: int, rank: int, device: torch.device) -> bool:
    """Rank 0 hears the sweep scheduler's decision on this evaluation round; every rank follows it."""
    says_stop = rank == 0 and gate.decision(round_) == STOP
    return all_reduce_sum([float(says_stop)], device)[0] > 0


def _truncate_metrics(path: Path, after_step: int) -> None:
    """On resume, drop metric (or generation) lines logged after the checkpoint (they are about to be redone).

    Without a checkpoint (after_step 0) the run starts over, its step-0 evaluation included.
    """
    if not path.exists():
        return
    kept = [record for record in read_metrics(path) if record["step"] <= after_step] if after_step > 0 else []
    write_text_atomically(path, "".join(json.dumps(record) + "\n" for record in kept))


def _working_folder(location: str) -> Path:
    """Where rank 0 writes metrics.jsonl, TensorBoard events and a local MLflow store: the run folder itself when
    it is a path, else a scratch folder on this node, copied to object storage at each checkpoint and at the end."""
    if not is_uri(location):
        return Path(location)
    return Path(tempfile.gettempdir()) / "raysft-runs" / hashlib.sha256(location.encode()).hexdigest()[:16]


def _sync_run_files(working: Path, location: str) -> None:
    """Copy rank 0's metrics, TensorBoard events and local MLflow store to object storage (a path run writes
    there directly)."""
    if not is_uri(location):
        return
    for name in RANK0_FILES:
        if (working / name).exists():
            storage.upload(working / name, storage.join(location, name))


def _save_final(model: nn.Module, cfg: Config, location: str, state_dict: dict[str, torch.Tensor] | None) -> None:
    """final/: the adapter (or model) and tokenizer, replaced whole; on object storage uploaded file by file.
    `state_dict`: the gathered weights of a sharded model (else the model's own are saved)."""
    staging_parent = Path(location) if not is_uri(location) else Path(tempfile.mkdtemp(prefix="raysft-final-"))
    staging = staging_parent / f"{STAGING_PREFIX}{FINAL_DIR}"
    try:
        shutil.rmtree(staging, ignore_errors=True)
        options: dict[str, Any] = {"state_dict": state_dict} if state_dict else {}
        if isinstance(model, PeftModel):
            # New tokens' rows are in the adapter (trainable tokens); PEFT's default would add the whole resized
            # embedding matrices to it as well.
            options["save_embedding_layers"] = False
        model.save_pretrained(staging, safe_serialization=True, **options)
        load_tokenizer(cfg.model).save_pretrained(staging)
        if is_uri(location):
            storage.remove(storage.join(location, FINAL_DIR))
            storage.upload(staging, storage.join(location, FINAL_DIR))
        else:
            replace_dir_atomically(staging, Path(location) / FINAL_DIR)
    except (OSError, RuntimeError) as err:
        raise write_error(staging, err) from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if is_uri(location):
            shutil.rmtree(staging_parent, ignore_errors=True)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point: setup -> restore -> loop -> save. `loop_config["inputs"]` is the driver's LoopInputs."""
    inputs: LoopInputs = loop_config["inputs"]
    cfg, location = inputs.config, inputs.run_location
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    local_mode = cfg.scaling.num_workers == 0
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)  # training draws are seeded per micro-batch (BatchSchedule.micro_batch_seed)

    # Setup: data, model, optimizer. Rows are read from the packed table as the steps need them.
    schedule = BatchSchedule(inputs.train_data.num_rows, world, cfg.train.micro_batch_size,
                             global_batch_rows(cfg), cfg.train.seed, cfg.data.shuffle_window)
    chunk_rows = min(ORDER_CHUNK_ROWS, cfg.data.shuffle_window)
    train_rows = PackedRows(inputs.train_data, chunk_rows,
                            chunks_to_keep(cfg.data.shuffle_window, schedule.global_batch, chunk_rows))
    eval_rows = PackedRows(inputs.eval_data, chunk_rows, max_chunks=4) if inputs.eval_data is not None else None
    num_steps = schedule.total_steps(cfg.train.max_steps, cfg.train.epochs)
    # The tokenizer the data were tokenized with (model.add_special_tokens included): its new tokens' rows are made
    # before LoRA wraps or FSDP shards the model, and trained.
    tokenizer, new_token_ids = load_tokenizer_and_new_ids(cfg.model)
    base = load_model(cfg.model, device, num_tokens=len(tokenizer))
    model = add_neftune_noise(apply_lora(base, cfg.lora, cfg.train.seed, new_token_ids), cfg.train.neftune_alpha)
    pad_id = inputs.pad_token_id
    loss_module = TokenLoss(model)
    if cfg.train.compile:
        loss_module.compile_layers()
    # Sharded on any number of Ray Train workers, one included: an elastic run's checkpoints then stay sharded
    # (torch.distributed.checkpoint reshards them for however many workers come next). Local mode has no process group.
    sharded = cfg.scaling.strategy == "fsdp" and dist.is_available() and dist.is_initialized()
    if sharded:  # before the optimizer: it must hold the sharded parameters
        shard(loss_module, cfg)
    generation = GenerationEval(inputs.generation, cfg, rank, world, device, sharded) if inputs.generation else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, cfg.train)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")

    # Restore, before DDP wraps the model: every rank loads the same checkpoint, so the weights DDP
    # broadcasts from rank 0 are the ones every rank already holds. Sharded, each rank loads its shards.
    restored, resumed = restore(inputs, model, optimizer, scaler, rank)
    start_step, seen_tokens = restored["step"], restored.get("num_tokens", 0)
    scored, higher = is_scored(cfg, inputs.has_eval), higher_is_better(cfg)
    last_eval: dict[str, float] = restored.get("last_eval", {})
    best: dict[str, Any] | None = restored.get("best")  # {"score", "step"} of the best checkpoint so far
    patience = patience_of(cfg, restored.get("early_stopping"))  # counts on from the checkpoint's evaluations
    forward: nn.Module = loss_module
    if world > 1 and not sharded:
        forward = ray.train.torch.prepare_model(loss_module, move_to_device=False)

    working = _working_folder(location)
    if rank == 0:
        if is_uri(location):  # a fresh node: continue the run's metrics (and MLflow store) from storage
            shutil.rmtree(working, ignore_errors=True)
            working.mkdir(parents=True)
            for name in (METRICS_FILE, GENERATIONS_FILE, MLFLOW_DIR):
                if storage.exists(storage.join(location, name)):
                    storage.download(storage.join(location, name), working / name)
        else:
            remove_staging(Path(checkpoint_root(location)))
            remove_staging(working)
        for name in (METRICS_FILE, GENERATIONS_FILE):  # before the tracker opens metrics.jsonl for appending
            _truncate_metrics(working / name, start_step)
    tracker = Tracker(cfg, working, total_steps=num_steps, location=location, start_step=start_step) if rank == 0 else None
    if tracker is not None:
        tracker.log_text(f"resuming from {resumed} at step {start_step}" if resumed else
                         f"{len(train_rows)} rows, {num_steps} steps, {world} worker(s)"
                         f"{' (FSDP)' if sharded else ''}, global batch {schedule.global_batch} rows")

    if tracker is not None and resumed and restored.get("workers", world) != world:
        # An elastic run resized (or a resume on another worker count): the same steps go on, on `world` workers.
        lost = time.time() - restored.get("saved_at", time.time())
        tracker.log_text(f"resized: {restored['workers']} -> {world} worker(s) at step {start_step}, {lost:.1f} s since "
                         "that checkpoint (the steps after it are trained again)")
        tracker.record({"workers": float(world), "resized_from": float(restored["workers"]), "seconds_lost": lost},
                       start_step)

    if tracker is not None and resumed and patience is not None and patience.best is not None:
        tracker.log_text(f"early stopping continues: {patience.metric} best {patience.best:.6g} at step "
                         f"{patience.best_step}, {patience.waited} evaluation(s) without improvement since")

    def report(metrics: dict[str, float], step: int) -> None:
        if tracker is not None:
            tracker.log(metrics, step)
        ray.train.report({"step": step, **metrics})

    def evaluation(step: int) -> dict[str, float]:
        """What an evaluation logs: eval loss over every eval row, then eval.generate's task metrics."""
        assert eval_rows is not None
        scores = evaluate(loss_module, eval_rows, cfg, rank, world, pad_id, device)
        if generation is not None:
            task_scores, predictions = generation(loss_module)
            scores.update(task_scores)
            if rank == 0:
                generation.write(working, step, predictions)
        return scores

    if eval_rows is not None and cfg.train.eval_every and start_step == 0:
        last_eval = evaluation(0)
        if patience is not None:  # the reference point the first evaluation in training must beat
            patience = patience.after_evaluation(last_eval, 0)
        report(last_eval, 0)

    def checkpoint(done: int, metrics: dict[str, float]) -> None:
        nonlocal best, saved_step
        if tracker is not None:
            _sync_run_files(working, location)  # the checkpoint and the metrics up to it land together
        score = last_eval.get(cfg.train.checkpoint_score) if scored else None
        if score is not None and better(score, best and best["score"], higher):
            best = {"score": score, "step": done}
        state = {"data_fingerprint": inputs.data_fingerprint, "num_tokens": seen_tokens, "scaler": scaler.state_dict(),
                 "workers": world, "saved_at": time.time(), "score": score, "last_eval": last_eval, "best": best,
                 "early_stopping": patience.state() if patience is not None else None}
        save_checkpoint(inputs, done, model, optimizer, state, metrics, rank, local_mode)
        saved_step = done

    # Loop.
    stopped_by_scheduler = False
    loss_module.train()
    interval_start, interval_tokens = time.perf_counter(), 0  # after the first eval, so it is not counted
    stop_check, saved_step, stopped_at = StopCheck(inputs.stop_board), start_step, None
    for step in range(start_step, num_steps):
        if stop_check.requested(world, device):  # SIGINT/SIGTERM on the driver (raysft/training/interrupt.py)
            stopped_at = step
            break
        step_rows = schedule.step_rows(step)
        for ahead in range(step + 1, min(step + 3, num_steps)):  # read on a background thread meanwhile
            train_rows.prefetch(schedule.step_rows(ahead))
        # The trained tokens of the whole global batch (all workers, all micro-batches) normalize the loss.
        step_trained = train_rows.trained_tokens(step_rows)
        set_lr(optimizer, lr_at(step, cfg.train, num_steps))
        mine = schedule.micro_batches(step, rank)
        # Fillers (a worker dealt fewer micro-batches than the others) rerun the step's first rows, weighted 0.
        filled = [rows for _, rows in mine] + [step_rows[: cfg.train.micro_batch_size]] * schedule.fillers(rank)
        micro_batches = [{k: v.to(device) for k, v in train_rows.batch(rows, pad_id).items()} for rows in filled]
        result = train_step(forward, micro_batches, step_trained, optimizer, scaler, params, cfg.train.precision,
                            cfg.train.max_grad_norm, world, seeds=[schedule.micro_batch_seed(step, j) for j, _ in mine],
                            counted=len(mine))
        if not result.applied and cfg.train.on_nonfinite == "abort":
            raise FloatingPointError(
                f"non-finite loss {result.loss} / grad norm {result.grad_norm} at step {step + 1}; aborting")

        real_tokens = train_rows.real_tokens(step_rows)
        seen_tokens += real_tokens
        interval_tokens += real_tokens
        done = step + 1
        metrics: dict[str, float] = {}
        if done % cfg.train.log_every == 0 or done == num_steps:
            elapsed = time.perf_counter() - interval_start
            metrics.update(
                loss=result.loss, lr=optimizer.param_groups[0]["lr"], grad_norm=result.grad_norm,
                epoch=schedule.epoch(done), tokens_per_s=interval_tokens / max(elapsed, 1e-9), num_tokens=seen_tokens,
                trained_tokens=step_trained, skipped=0.0 if result.applied else 1.0,
            )
            interval_start, interval_tokens = time.perf_counter(), 0
        stop = evaluated = False
        if eval_rows is not None and (
            (cfg.train.eval_every and done % cfg.train.eval_every == 0) or done == num_steps
        ):
            evaluated = True
            last_eval = evaluation(done)
            metrics.update(last_eval)
            if patience is not None:
                patience = patience.after_evaluation(last_eval, done)
                stop = patience.exhausted and done < num_steps  # every rank alike: the metric is rank-identical
                if stop:
                    metrics["early_stopped"] = 1.0
        if tracker is not None and metrics:
            tracker.log(metrics, done)
        checkpoint_due = bool(cfg.train.checkpoint_every) and done % cfg.train.checkpoint_every == 0 and done < num_steps
        weights_finite = checkpoint_due and all_finite(params, device)
        if weights_finite:
            checkpoint(done, metrics)
        else:
            if checkpoint_due and tracker is not None:
                tracker.log_text(f"step {done}: weights are not finite; checkpoint not written")
            if metrics:
                ray.train.report({"step": done, **metrics})
        if stop:
            assert patience is not None
            if tracker is not None:
                tracker.log_text(patience.reason(done))
            break
        if inputs.gate is not None and evaluated and done < num_steps:
            stopped_by_scheduler = _scheduler_stops(inputs.gate, eval_round(done, cfg.train.eval_every), rank, device)
            if stopped_by_scheduler:
                if tracker is not None:
                    tracker.log_text(f"stopped by the sweep's scheduler after step {done}'s evaluation")
                break

    if stopped_by_scheduler:  # a stopped trial has no final/: that is what tells it from a completed one
        _close(train_rows, eval_rows, tracker, working, location, mlflow_status="KILLED")  # as the sweep ends it
        return
    if stopped_at is not None:
        # Asked to stop: a checkpoint of where the run is (unless it has one), for --resume; no final/.
        if stopped_at != saved_step and all_finite(params, device):
            checkpoint(stopped_at, {})
        if tracker is not None:
            tracker.log_text(f"stopped at step {stopped_at} on request (SIGINT/SIGTERM); checkpoint "
                             f"{step_dir_name(saved_step) if saved_step else 'none'}")
        _close(train_rows, eval_rows, tracker, working, location)
        if tracker is not None:
            stop_check.stopped(location, saved_step)
        return

    # Save: the last step's weights, or the best checkpoint's when it beat them.
    final_score = last_eval.get(cfg.train.checkpoint_score)
    if (rank == 0 or sharded) and cfg.train.final == "best" and best and final_score is not None and better(
        best["score"], final_score, higher
    ):
        load_trainable(model, storage.join(inputs.checkpoint_root, step_dir_name(best["step"])))
        if tracker is not None:
            tracker.log_text(f"final/ holds step {best['step']}'s weights ({cfg.train.checkpoint_score} {best['score']:.4f}, "
                             f"last step {final_score:.4f})")
    gathered = gathered_state_dict(model, trained_only=cfg.lora.enabled) if sharded else None  # every rank
    if rank == 0:
        _save_final(model, cfg, location, gathered)
    _close(train_rows, eval_rows, tracker, working, location)


def _close(train_rows: PackedRows, eval_rows: PackedRows | None, tracker: Tracker | None, working: Path,
           location: str, mlflow_status: str = "FINISHED") -> None:
    train_rows.close()
    if eval_rows is not None:
        eval_rows.close()
    if tracker is not None:
        tracker.close(mlflow_status)
        _sync_run_files(working, location)
