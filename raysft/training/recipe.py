"""What every Ray Train worker runs, as a recipe whose steps read top to bottom (torchtune's recipes, litgpt's
`setup -> fit`):

    recipe = SFTRecipe(inputs, tokenizer, new_token_ids)
    recipe.setup()     # data, model, optimizer (in that order: each draws on the seeded RNG)
    recipe.restore()   # the checkpoint to continue from, before DDP wraps the model; then the trackers
    end = recipe.fit() # step -> evaluate -> checkpoint -> stop, until done or asked to stop
    recipe.finish(end) # final/ (or a checkpoint for --resume), trackers closed

A step is forward -> token-weighted loss -> backward (accumulate) -> unscale/clip -> step -> schedule
(raysft/training/step.py); an evaluation is the eval loss, then eval.generate's task metrics. What the loop
carries from step to step is one `TrainState`, saved in every checkpoint and rebuilt by `restore`.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from peft import PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase

from raysft import storage
from raysft.config import Config, global_batch_rows, is_uri, loss_metrics
from raysft.data.stream import PackedRows, chunks_to_keep
from raysft.fileio import replace_dir_atomically, write_error, write_text_atomically
from raysft.model import TokenLoss, add_neftune_noise, apply_lora, load_model
from raysft.run_folder import (
    FINAL_DIR,
    GENERATIONS_FILE,
    METRICS_FILE,
    MLFLOW_DIR,
    RANK0_FILES,
    STAGING_PREFIX,
    checkpoint_root,
    copy_entries,
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
from raysft.training.decisions import STOP, TrialGate, eval_round
from raysft.training.fsdp import all_finite, gathered_state_dict, is_sharded, shard
from raysft.training.generate_eval import GenerationEval
from raysft.training.inputs import LoopInputs
from raysft.training.interrupt import StopCheck
from raysft.training.optim import build_optimizer, lr_at, set_lr
from raysft.training.startup import mark
from raysft.training.step import ORDER_CHUNK_ROWS, BatchSchedule, StepResult, all_reduce_sum, autocast, train_step
from raysft.training.stopping import Patience, patience_of

FitEnd = Literal["done", "scheduler_stop", "interrupted"]
"""How `fit` ended: every step trained (or early stopping), the sweep's scheduler stopped the trial, or the
driver asked the run to stop (SIGINT/SIGTERM)."""


@dataclass
class TrainState:
    """What the loop carries from step to step; a checkpoint saves it (`checkpoint_state`) and `restore` rebuilds it."""

    step: int = 0
    """Optimizer steps done."""
    seen_tokens: int = 0
    """Real (non-pad) tokens trained on so far, over all workers."""
    last_eval: dict[str, float] = field(default_factory=dict)
    best: dict[str, Any] | None = None
    """{"score", "step"} of the best checkpoint so far (train.final: best)."""
    patience: Patience | None = None
    """Early stopping's state (None without train.early_stopping)."""
    saved_step: int = 0
    """The step of this run's newest checkpoint (the restored one's at first; 0: none)."""
    stopped_at: int | None = None
    """The step at which the driver asked the run to stop, if it did."""
    step_trained_tokens: int = 0
    """The trained tokens of the latest step's global batch (all workers): its loss's normalizer, logged."""
    interval_start: float = 0.0
    """perf_counter() at the previous logged step: tokens/s is measured over the steps since."""
    interval_tokens: int = 0

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any], cfg: Config) -> "TrainState":
        """The state a checkpoint's state.json holds ({"step": 0} for a fresh run)."""
        return cls(step=saved["step"], seen_tokens=saved.get("num_tokens", 0), last_eval=saved.get("last_eval", {}),
                   best=saved.get("best"), patience=patience_of(cfg, saved.get("early_stopping")),
                   saved_step=saved["step"])


class SFTRecipe:
    """Supervised fine-tuning on one Ray Train worker (or in the driver, in local mode); every rank runs the same
    steps, and collective ones (evaluation, checkpoints, stops) at the same places."""

    # Built by setup() and restore(), in this order.
    schedule: BatchSchedule
    train_rows: PackedRows
    eval_rows: PackedRows | None
    num_steps: int
    model: nn.Module
    loss_module: TokenLoss
    sharded: bool
    generation: GenerationEval | None
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    forward: nn.Module
    """What a step calls: the loss module, DDP-wrapped on more than one worker."""
    stop_check: StopCheck
    """The driver's stop board, as fit() hears it."""

    def __init__(self, inputs: LoopInputs, tokenizer: PreTrainedTokenizerBase, new_token_ids: list[int]):
        """`tokenizer`: the one the data were tokenized with (model.add_special_tokens included), loaded once per
        process and passed on; `new_token_ids`: the tokens it added (raysft.tokenizer.load_tokenizer_and_new_ids),
        whose embedding rows are made and trained."""
        self.inputs, self.cfg, self.location = inputs, inputs.config, inputs.run_location
        self.tokenizer, self.new_token_ids = tokenizer, new_token_ids
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.local_mode = self.cfg.scaling.num_workers == 0
        self.device = ray.train.torch.get_device()
        self.working = _working_folder(self.location)
        self.state = TrainState()
        self.tracker: Tracker | None = None
        torch.manual_seed(self.cfg.train.seed)  # training draws are seeded per micro-batch (BatchSchedule.micro_batch_seed)

    # -- setup --------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Data, model, optimizer: everything a step needs, before any checkpoint is read."""
        self._setup_data()
        self._setup_model()
        mark("model loaded")
        self._setup_optimizer()

    def _setup_data(self) -> None:
        """The batch schedule and the packed tables' readers: rows are read as the steps need them."""
        cfg = self.cfg
        self.schedule = BatchSchedule(self.inputs.train_data.num_rows, self.world, cfg.train.micro_batch_size,
                                      global_batch_rows(cfg), cfg.train.seed, cfg.data.shuffle_window)
        chunk_rows = min(ORDER_CHUNK_ROWS, cfg.data.shuffle_window)
        self.train_rows = PackedRows(self.inputs.train_data, chunk_rows,
                                     chunks_to_keep(cfg.data.shuffle_window, self.schedule.global_batch, chunk_rows))
        self.eval_rows = (PackedRows(self.inputs.eval_data, chunk_rows, max_chunks=4)
                          if self.inputs.eval_data is not None else None)
        self.num_steps = self.schedule.total_steps(cfg.train.max_steps, cfg.train.epochs)

    def _setup_model(self) -> None:
        """The base model with the tokenizer's new tokens' rows (made before LoRA wraps or FSDP shards it, and
        trained), LoRA, NEFTune, the loss module; sharded under FSDP; eval.generate's generator."""
        cfg = self.cfg
        base = load_model(cfg.model, self.device, num_tokens=len(self.tokenizer))
        adapted = apply_lora(base, cfg.lora, cfg.train.seed, self.new_token_ids)
        self.model = add_neftune_noise(adapted, cfg.train.neftune_alpha)
        self.loss_module = TokenLoss(self.model)
        if cfg.train.compile:
            self.loss_module.compile_layers()
        # Sharded on any number of Ray Train workers, one included: an elastic run's checkpoints then stay sharded
        # (torch.distributed.checkpoint reshards them for however many workers come next). Local mode has no
        # process group.
        self.sharded = cfg.scaling.strategy == "fsdp" and dist.is_available() and dist.is_initialized()
        if self.sharded:  # before the optimizer: it must hold the sharded parameters
            shard(self.loss_module, cfg)
        self.generation = (GenerationEval(self.inputs.generation, cfg, self.rank, self.world, self.device,
                                          self.sharded, self.tokenizer) if self.inputs.generation else None)

    def _setup_optimizer(self) -> None:
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, self.cfg.train)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.cfg.train.precision == "fp16")

    # -- restore ------------------------------------------------------------------------------------------------

    def restore(self) -> None:
        """Continue from the checkpoint Ray Train (or the driver, for --resume in local mode) gives, if any; then
        wrap the model for DDP and open the trackers.

        Before DDP wraps the model: every rank loads the same checkpoint, so the weights DDP broadcasts from rank
        0 are the ones every rank already holds. Sharded, each rank loads its shards.
        """
        saved, resumed = restore(self.inputs, self.model, self.optimizer, self.scaler, self.rank)
        self.state = TrainState.from_checkpoint(saved, self.cfg)
        self.forward = self.loss_module
        if self.world > 1 and not self.sharded:
            self.forward = ray.train.torch.prepare_model(self.loss_module, move_to_device=False)
        if self.rank == 0:
            self._open_tracker(saved, resumed)

    def _open_tracker(self, saved: dict[str, Any], resumed: str | None) -> None:
        """Rank 0: the working folder made ready (metrics after the checkpoint dropped: they are about to be redone),
        the tracker opened, and what this start is said."""
        state, location, working = self.state, self.location, self.working
        if is_uri(location):  # a fresh node: continue the run's metrics (and MLflow store) from storage
            shutil.rmtree(working, ignore_errors=True)
            working.mkdir(parents=True)
            copy_entries(location, working, (METRICS_FILE, GENERATIONS_FILE, MLFLOW_DIR))
        else:
            remove_staging(Path(checkpoint_root(location)))
            remove_staging(working)
        for name in (METRICS_FILE, GENERATIONS_FILE):  # before the tracker opens metrics.jsonl for appending
            _truncate_metrics(working / name, state.step)
        tracker = Tracker(self.cfg, working, total_steps=self.num_steps, location=location, start_step=state.step)
        self.tracker = tracker
        tracker.log_text(f"resuming from {resumed} at step {state.step}" if resumed else
                         f"{len(self.train_rows)} rows, {self.num_steps} steps, {self.world} worker(s)"
                         f"{' (FSDP)' if self.sharded else ''}, global batch {self.schedule.global_batch} rows")
        if resumed and saved.get("workers", self.world) != self.world:
            # An elastic run resized (or a resume on another worker count): the same steps go on, on `world` workers.
            lost = time.time() - saved.get("saved_at", time.time())
            tracker.log_text(f"resized: {saved['workers']} -> {self.world} worker(s) at step {state.step}, {lost:.1f} "
                             "s since that checkpoint (the steps after it are trained again)")
            tracker.record({"workers": float(self.world), "resized_from": float(saved["workers"]),
                            "seconds_lost": lost}, state.step)
        patience = state.patience
        if resumed and patience is not None and patience.best is not None:
            tracker.log_text(f"early stopping continues: {patience.metric} best {patience.best:.6g} at step "
                             f"{patience.best_step}, {patience.waited} evaluation(s) without improvement since")

    # -- fit ----------------------------------------------------------------------------------------------------

    def fit(self) -> FitEnd:
        """Train from the restored step to the last one, evaluating, checkpointing and stopping as configured."""
        state, cfg = self.state, self.cfg
        if self.eval_rows is not None and cfg.train.eval_every and state.step == 0:
            state.last_eval = self.evaluate(0)
            if state.patience is not None:  # the reference point the first evaluation in training must beat
                state.patience = state.patience.after_evaluation(state.last_eval, 0)
            self._report(state.last_eval, 0)
        self.loss_module.train()
        state.interval_start, state.interval_tokens = time.perf_counter(), 0  # after the first eval: not counted
        self.stop_check = stop_check = StopCheck(self.inputs.stop_board)
        first = state.step
        for step in range(first, self.num_steps):
            if stop_check.requested(self.world, self.device):  # SIGINT/SIGTERM on the driver (interrupt.py)
                state.stopped_at = step
                return "interrupted"
            result = self.train_step(step)
            if step == first:
                mark("first step done")
            end = self._after_step(result)
            if end is not None:
                return end
        return "done"

    def train_step(self, step: int) -> StepResult:
        """One optimizer step on this worker's micro-batches of the global batch `step`."""
        cfg, schedule, rows = self.cfg, self.schedule, self.train_rows
        step_rows = schedule.step_rows(step)
        for ahead in range(step + 1, min(step + 3, self.num_steps)):  # read on a background thread meanwhile
            rows.prefetch(schedule.step_rows(ahead))
        # The trained tokens of the whole global batch (all workers, all micro-batches) normalize the loss.
        step_trained = rows.trained_tokens(step_rows)
        set_lr(self.optimizer, lr_at(step, cfg.train, self.num_steps))
        mine = schedule.micro_batches(step, self.rank)
        # Fillers (a worker dealt fewer micro-batches than the others) rerun the step's first rows, weighted 0.
        filled = [batch_rows for _, batch_rows in mine] + [step_rows[: cfg.train.micro_batch_size]] * schedule.fillers(self.rank)
        pad_id = self.inputs.pad_token_id
        micro_batches = [{k: v.to(self.device) for k, v in rows.batch(batch_rows, pad_id).items()} for batch_rows in filled]
        result = train_step(self.forward, micro_batches, step_trained, self.optimizer, self.scaler, self.params,
                            cfg.train.precision, cfg.train.max_grad_norm, self.world,
                            seeds=[schedule.micro_batch_seed(step, j) for j, _ in mine], counted=len(mine))
        if not result.applied and cfg.train.on_nonfinite == "abort":
            raise FloatingPointError(
                f"non-finite loss {result.loss} / grad norm {result.grad_norm} at step {step + 1}; aborting")
        real_tokens = rows.real_tokens(step_rows)
        self.state.seen_tokens += real_tokens
        self.state.interval_tokens += real_tokens
        self.state.step, self.state.step_trained_tokens = step + 1, step_trained
        return result

    def _after_step(self, result: StepResult) -> FitEnd | None:
        """After a step: log, evaluate, checkpoint; how fit ends when early stopping or the scheduler stops it."""
        state, cfg, done = self.state, self.cfg, self.state.step
        metrics = self._step_metrics(result) if done % cfg.train.log_every == 0 or done == self.num_steps else {}
        early_stop = evaluated = False
        if self.eval_rows is not None and ((cfg.train.eval_every and done % cfg.train.eval_every == 0)
                                           or done == self.num_steps):
            evaluated = True
            state.last_eval = self.evaluate(done)
            metrics.update(state.last_eval)
            if state.patience is not None:
                state.patience = state.patience.after_evaluation(state.last_eval, done)
                early_stop = state.patience.exhausted and done < self.num_steps  # rank-identical metric: all alike
                if early_stop:
                    metrics["early_stopped"] = 1.0
        if self.tracker is not None and metrics:
            self.tracker.log(metrics, done)
        checkpoint_due = bool(cfg.train.checkpoint_every) and done % cfg.train.checkpoint_every == 0 and done < self.num_steps
        if checkpoint_due and all_finite(self.params, self.device):
            self.save_checkpoint(metrics)
        else:
            if checkpoint_due:
                self._say(f"step {done}: weights are not finite; checkpoint not written")
            if metrics:
                ray.train.report({"step": done, **metrics})
        if early_stop:
            assert state.patience is not None
            self._say(state.patience.reason(done))
            return "done"
        if self.inputs.gate is not None and evaluated and done < self.num_steps and self._scheduler_stops(done):
            self._say(f"stopped by the sweep's scheduler after step {done}'s evaluation")
            return "scheduler_stop"
        return None

    def _step_metrics(self, result: StepResult) -> dict[str, float]:
        """What a logged step reports; tokens/s over the steps since the previous logged one."""
        state = self.state
        elapsed = time.perf_counter() - state.interval_start
        metrics = dict(
            loss=result.loss, lr=self.optimizer.param_groups[0]["lr"], grad_norm=result.grad_norm,
            epoch=self.schedule.epoch(state.step), tokens_per_s=state.interval_tokens / max(elapsed, 1e-9),
            num_tokens=state.seen_tokens, trained_tokens=state.step_trained_tokens, skipped=0.0 if result.applied else 1.0,
        )
        state.interval_start, state.interval_tokens = time.perf_counter(), 0
        return metrics

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """What an evaluation logs: eval loss over every eval row, then eval.generate's task metrics."""
        assert self.eval_rows is not None
        scores = evaluate_loss(self.loss_module, self.eval_rows, self.cfg, self.rank, self.world,
                               self.inputs.pad_token_id, self.device)
        if self.generation is not None:
            task_scores, predictions = self.generation(self.loss_module)
            scores.update(task_scores)
            if self.rank == 0:
                self.generation.write(self.working, step, predictions)
        return scores

    def _scheduler_stops(self, done: int) -> bool:
        """Rank 0 hears the sweep scheduler's decision on this evaluation round; every rank follows it."""
        gate: TrialGate | None = self.inputs.gate
        assert gate is not None
        says_stop = self.rank == 0 and gate.decision(eval_round(done, self.cfg.train.eval_every)) == STOP
        return all_reduce_sum([float(says_stop)], self.device)[0] > 0

    def save_checkpoint(self, metrics: dict[str, float]) -> None:
        """Every rank: checkpoint the current step with `metrics` (rank 0's metrics files synced first, so the
        checkpoint and the metrics up to it land together)."""
        state, cfg = self.state, self.cfg
        if self.tracker is not None and is_uri(self.location):  # a path run writes its files there directly
            copy_entries(self.working, self.location, RANK0_FILES)
        score = state.last_eval.get(cfg.train.checkpoint_score) if is_scored(cfg, self.inputs.has_eval) else None
        if score is not None and better(score, state.best and state.best["score"], higher_is_better(cfg)):
            state.best = {"score": score, "step": state.step}
        save_checkpoint(self.inputs, state.step, self.model, self.optimizer, self.checkpoint_state(score), metrics,
                        self.rank, self.local_mode)
        state.saved_step = state.step

    def checkpoint_state(self, score: float | None) -> dict[str, Any]:
        """state.json's contents besides the step (what `TrainState.from_checkpoint` reads back)."""
        state = self.state
        return {"data_fingerprint": self.inputs.data_fingerprint, "num_tokens": state.seen_tokens,
                "scaler": self.scaler.state_dict(), "workers": self.world, "saved_at": time.time(), "score": score,
                "last_eval": state.last_eval, "best": state.best,
                "early_stopping": state.patience.state() if state.patience is not None else None}

    # -- finish -------------------------------------------------------------------------------------------------

    def finish(self, end: FitEnd) -> None:
        """final/ after a run that trained to its end; a checkpoint (no final/) for --resume after a stop request;
        nothing after a scheduler's stop (having no final/ is what tells a stopped trial from a completed one)."""
        if end == "scheduler_stop":
            self._close(mlflow_status="KILLED")  # as the sweep ends it
            return
        if end == "interrupted":
            self._checkpoint_for_resume()
            return
        self.save_final()
        self._close()

    def _checkpoint_for_resume(self) -> None:
        """Asked to stop: a checkpoint of where the run is (unless it has one), for --resume; no final/."""
        state = self.state
        if state.stopped_at != state.saved_step and all_finite(self.params, self.device):
            self.save_checkpoint({})  # of step `stopped_at`: the steps done
        self._say(f"stopped at step {state.stopped_at} on request (SIGINT/SIGTERM); checkpoint "
                  f"{step_dir_name(state.saved_step) if state.saved_step else 'none'}")
        self._close()
        if self.tracker is not None:
            self.stop_check.stopped(self.location, state.saved_step)

    def save_final(self) -> None:
        """final/: the last step's weights, or the best checkpoint's when it beat them (train.final: best)."""
        cfg, best = self.cfg, self.state.best
        final_score = self.state.last_eval.get(cfg.train.checkpoint_score)
        if (self.rank == 0 or self.sharded) and cfg.train.final == "best" and best and final_score is not None and better(
            best["score"], final_score, higher_is_better(cfg)
        ):
            load_trainable(self.model, storage.join(self.inputs.checkpoint_root, step_dir_name(best["step"])))
            self._say(f"final/ holds step {best['step']}'s weights ({cfg.train.checkpoint_score} {best['score']:.4f}, "
                      f"last step {final_score:.4f})")
        gathered = gathered_state_dict(self.model, trained_only=cfg.lora.enabled) if self.sharded else None  # all ranks
        if self.rank == 0:
            save_final(self.model, self.tokenizer, self.location, gathered)

    def _report(self, metrics: dict[str, float], step: int) -> None:
        if self.tracker is not None:
            self.tracker.log(metrics, step)
        ray.train.report({"step": step, **metrics})

    def _say(self, text: str) -> None:
        """A line on the console and in the run's logs (rank 0)."""
        if self.tracker is not None:
            self.tracker.log_text(text)

    def _close(self, mlflow_status: str = "FINISHED") -> None:
        self.train_rows.close()
        if self.eval_rows is not None:
            self.eval_rows.close()
        if self.tracker is not None:
            self.tracker.close(mlflow_status)
            if is_uri(self.location):
                copy_entries(self.working, self.location, RANK0_FILES)


def run(inputs: LoopInputs, tokenizer: PreTrainedTokenizerBase, new_token_ids: list[int]) -> None:
    """The recipe, top to bottom (raysft.training.worker.train_loop_per_worker calls it in every worker)."""
    recipe = SFTRecipe(inputs, tokenizer, new_token_ids)
    recipe.setup()
    recipe.restore()
    mark("restored")
    recipe.finish(recipe.fit())


@torch.no_grad()
def evaluate_loss(
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
    return loss_metrics(loss_sum, correct, tokens)


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


def save_final(model: nn.Module, tokenizer: PreTrainedTokenizerBase, location: str,
               state_dict: dict[str, torch.Tensor] | None) -> None:
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
        tokenizer.save_pretrained(staging)
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
