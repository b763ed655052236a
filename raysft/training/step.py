"""Which rows each optimizer step trains on, and the step itself: the part of the loop that needs no Ray.

Both are plain numpy/torch, so the benchmarks and the GPU check (benchmarks/gpu_check.py) run the loop's own
schedule and step without a Ray session; :mod:`raysft.training.recipe` wires them to Ray Train.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


# Rows that stay together when an epoch is shuffled in windows: the grain at which workers read the packed table.
ORDER_CHUNK_ROWS = 64


class EpochOrder:
    """The row order of one epoch: a pure function of (seed, epoch), so resume continues it exactly.

    Up to `window_rows` rows it is one uniform permutation. Past that the epoch is shuffled in two levels, as
    streaming loaders do (MosaicML streaming, WebDataset): chunks of ``ORDER_CHUNK_ROWS`` consecutive rows are
    permuted, consecutive runs of the permuted chunks form windows of about `window_rows` rows, and the rows
    of each window are permuted. A worker then needs one window of rows at a time (plus the next, prefetched),
    whatever the dataset's size, and any position's rows are computed without the ones before it.

    Example:
        >>> order = EpochOrder(num_rows=10, seed=0, epoch=1, window_rows=4)
        >>> sorted(order.rows(0, 10).tolist()) == list(range(10))
        True
    """

    def __init__(self, num_rows: int, seed: int, epoch: int, window_rows: int):
        self.num_rows, self.seed, self.epoch = num_rows, seed, epoch
        rng = np.random.default_rng([seed, epoch])
        if num_rows <= window_rows:
            self.chunk_rows, self._windows = num_rows, []
            self._whole = rng.permutation(num_rows)
            self._starts = np.array([0, num_rows])
            return
        self._whole = None
        self.chunk_rows = min(ORDER_CHUNK_ROWS, window_rows)
        chunks = rng.permutation(-(-num_rows // self.chunk_rows))
        per_window = max(1, window_rows // self.chunk_rows)
        self._windows = [chunks[i : i + per_window] for i in range(0, len(chunks), per_window)]
        sizes = [sum(self._chunk_size(c) for c in window) for window in self._windows]
        self._starts = np.concatenate([[0], np.cumsum(sizes)])
        self._cache: dict[int, np.ndarray] = {}

    def _chunk_size(self, chunk: int) -> int:
        return min(self.chunk_rows, self.num_rows - int(chunk) * self.chunk_rows)

    def window(self, index: int) -> np.ndarray:
        """The rows of window `index`, in their epoch order."""
        if self._whole is not None:
            return self._whole
        if index not in self._cache:
            rows = np.concatenate([np.arange(c * self.chunk_rows, c * self.chunk_rows + self._chunk_size(c))
                                   for c in self._windows[index]])
            rows = rows[np.random.default_rng([self.seed, self.epoch, index]).permutation(len(rows))]
            self._cache = {k: v for k, v in self._cache.items() if k >= index - 1}  # the current and the last
            self._cache[index] = rows
        return self._cache[index]

    def windows_of(self, start: int, stop: int) -> range:
        """The windows holding positions [start, stop)."""
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        last = int(np.searchsorted(self._starts, stop - 1, side="right")) - 1
        return range(first, last + 1)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """The rows at positions [start, stop) of the epoch."""
        stop = min(stop, self.num_rows)
        pieces = []
        for index in self.windows_of(start, stop):
            offset = int(self._starts[index])
            pieces.append(self.window(index)[max(start - offset, 0) : stop - offset])
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]


@functools.lru_cache(maxsize=2)
def epoch_order(num_rows: int, seed: int, epoch: int, window_rows: int) -> EpochOrder:
    """:class:`EpochOrder`, cached (the current and the next epoch): every step of an epoch reads it."""
    return EpochOrder(num_rows, seed, epoch, window_rows)


@dataclass(frozen=True)
class BatchSchedule:
    """Step -> the packed rows of its global batch, and each worker's micro-batches of them.

    A step trains ``global_batch`` rows taken in epoch order, cut into micro-batches of ``micro_batch_size`` rows
    (the last one shorter when it does not divide); micro-batch j goes to worker ``j % world_size``. The split never
    changes which rows a step trains on, only who computes them, which is why N workers == 1 worker and k
    micro-batches == one batch k times as large, and why a run may continue on another number of workers. A worker
    dealt fewer micro-batches than the others runs `fillers` (weighted 0) so that every worker takes part in the
    same collectives. The incomplete tail of an epoch is dropped, like ``drop_last``.

    Example:
        >>> schedule = BatchSchedule(num_rows=10, world_size=2, micro_batch_size=1, global_batch=4, seed=0)
        >>> schedule.global_batch, schedule.steps_per_epoch
        (4, 2)
        >>> rows = schedule.step_rows(0)
        >>> [m.tolist() for _, m in schedule.micro_batches(0, rank=1)] == [rows[1:2].tolist(), rows[3:4].tolist()]
        True
    """

    num_rows: int
    world_size: int
    micro_batch_size: int
    global_batch: int
    seed: int
    window_rows: int = 2048  # data.shuffle_window: see EpochOrder

    def __post_init__(self) -> None:
        if self.num_rows < self.global_batch:
            raise ValueError(
                f"{self.num_rows} training rows after packing but one optimizer step needs {self.global_batch} "
                "(train.global_batch_size): lower it or add data"
            )

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches in a step, all workers together."""
        return -(-self.global_batch // self.micro_batch_size)

    @property
    def micro_batches_per_worker(self) -> int:
        """Forward/backward passes each worker runs per step (its own micro-batches, then fillers)."""
        return -(-self.num_micro_batches // max(1, self.world_size))

    @property
    def steps_per_epoch(self) -> int:
        return self.num_rows // self.global_batch

    def total_steps(self, max_steps: int | None, epochs: float) -> int:
        """``max_steps`` when set, else ``epochs`` (possibly fractional) worth of steps, at least one."""
        return max_steps or max(1, math.ceil(epochs * self.steps_per_epoch))

    def epoch(self, step: int) -> float:
        """Epochs completed after ``step`` optimizer steps (fractional)."""
        return step / self.steps_per_epoch

    def step_rows(self, step: int) -> np.ndarray:
        """Indices of the rows optimizer step ``step`` (0-based) trains on, all workers together."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = epoch_order(self.num_rows, self.seed, epoch, self.window_rows)
        return order.rows(index * self.global_batch, (index + 1) * self.global_batch)

    def micro_batches(self, step: int, rank: int) -> list[tuple[int, np.ndarray]]:
        """Worker ``rank``'s micro-batches of step ``step``: (the micro-batch's place j in the step, its rows)."""
        rows, micro = self.step_rows(step), self.micro_batch_size
        return [(j, rows[j * micro : (j + 1) * micro])
                for j in range(rank, self.num_micro_batches, max(1, self.world_size))]

    def fillers(self, rank: int) -> int:
        """How many zero-weight passes worker ``rank`` adds so that it runs as many as every other worker."""
        return self.micro_batches_per_worker - len(range(rank, self.num_micro_batches, max(1, self.world_size)))

    def micro_batch_seed(self, step: int, place: int) -> int:
        """The torch seed of micro-batch ``place`` of step ``step``: its dropout and noise, on whatever worker."""
        return int(np.random.SeedSequence([self.seed, step, place]).generate_state(1, np.uint64)[0] >> 1)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision for ``train.precision`` ("fp32" runs without autocast)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums over every worker of the process group (the values themselves without one)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


@contextlib.contextmanager
def without_gradient_sync(forward: nn.Module) -> Iterator[None]:
    """Accumulate this micro-batch's gradients locally: DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync``."""
    if hasattr(forward, "no_sync"):
        with forward.no_sync():
            yield
        return
    forward.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        yield
    finally:
        forward.set_requires_gradient_sync(True)  # type: ignore[operator]


@dataclass(frozen=True)
class StepResult:
    loss: float
    """Mean loss per trained token of the whole global batch (every worker and micro-batch)."""
    grad_norm: float
    """Before clipping; non-finite when the gradients overflowed."""
    applied: bool
    """False when the step was skipped: non-finite gradients (fp16's GradScaler skips them itself)."""


def train_step(
    forward: nn.Module,
    micro_batches: Sequence[dict[str, torch.Tensor]],
    trained_tokens: int,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    params: Sequence[torch.Tensor],
    precision: str,
    max_grad_norm: float | None,
    world_size: int = 1,
    seeds: Sequence[int] | None = None,
    counted: int | None = None,
) -> StepResult:
    """One optimizer step over this worker's micro-batches: forward, token-weighted backward, clip, step.

    ``forward`` is a :class:`raysft.model.TokenLoss` (DDP-wrapped when ``world_size`` > 1) and returns summed
    token losses. Each is divided by ``trained_tokens``, the trained tokens of the *global* batch, so that
    k micro-batches == one batch k times as large and N workers == one worker, exactly; DDP averages
    gradients over workers, so the loss is multiplied by ``world_size`` first. Gradients sync only on the last
    micro-batch. ``seeds``: torch's seed before each micro-batch (its dropout and noise); only the first
    ``counted`` micro-batches count, the rest are fillers (BatchSchedule.fillers) weighted 0. A non-finite loss or
    gradient norm skips the step (the caller decides whether to abort).
    """
    device = micro_batches[0]["input_ids"].device
    counted = len(micro_batches) if counted is None else counted
    scale = world_size / max(trained_tokens, 1)
    local_loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # on device: no host sync per micro-batch
    for m, batch in enumerate(micro_batches):
        if seeds is not None and m < counted:
            torch.manual_seed(seeds[m])
        syncing = world_size == 1 or m == len(micro_batches) - 1
        with contextlib.nullcontext() if syncing else without_gradient_sync(forward):
            with autocast(precision, device):
                loss_sum, _ = forward(**batch)
            scaler.scale(loss_sum * (scale if m < counted else 0.0)).backward()
        if m < counted:
            local_loss_sum += loss_sum.detach()

    scaler.unscale_(optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf")))
    (global_loss_sum,) = all_reduce_sum([float(local_loss_sum)], device)
    loss = global_loss_sum / max(trained_tokens, 1)
    applied = math.isfinite(loss) and math.isfinite(grad_norm)
    if applied or scaler.is_enabled():
        scaler.step(optimizer)  # with fp16 the scaler itself skips steps whose gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=loss, grad_norm=grad_norm, applied=applied)
