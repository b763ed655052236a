"""What a training worker holds of the data: the packed rows its next steps need, read from the packed table
in chunks, with the chunks of the steps ahead read on a background thread.

Why read the cached Parquet directly rather than through ``get_dataset_shard().iter_batches()``: a step's rows
are a pure function of (seed, epoch, step) (raysft/training/step.py), which is what makes N workers equal one
worker and a mid-epoch resume exact without replaying data; a Ray Data stream split across workers decides
row placement at run time and cannot be restarted at a step. Each worker reads whole windows of rows, its
peers' share included; per epoch that is the dataset once per worker, a few bytes per token, which is
negligible next to the step's compute (a GPU trains ~10^4-10^5 tokens/s; Parquet decodes ~10^8).

Memory per worker: the chunks of the current and the next shuffle window, about
``2 x data.shuffle_window x max_seq_len x 8 bytes`` (token ids and labels, int32), whatever the dataset's size.
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
import numpy as np
import torch

from raysft.data.cache import CachedTable, list_arrays
from raysft.data.packing import collate, positions_of
from raysft.data.pipeline import PACKED_COLUMNS


@dataclass(frozen=True)
class Chunk:
    """Consecutive packed rows as flat int32 arrays and offsets (one Arrow-to-numpy conversion per chunk)."""

    input_ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    example_lengths: list[np.ndarray]
    num_tokens: np.ndarray
    num_trained: np.ndarray

    @classmethod
    def read(cls, table: CachedTable, start: int, stop: int) -> Chunk:
        rows = table.read(start, stop, PACKED_COLUMNS)
        input_ids, offsets = list_arrays(rows.column("input_ids"))
        lengths, length_offsets = list_arrays(rows.column("example_lengths"))
        return cls(
            input_ids=input_ids,
            labels=list_arrays(rows.column("labels"))[0],
            offsets=offsets,
            example_lengths=np.split(lengths, length_offsets[1:-1]),
            num_tokens=rows.column("num_tokens").to_numpy(),
            num_trained=rows.column("num_trained").to_numpy(),
        )

    def row(self, index: int) -> dict[str, np.ndarray]:
        span = slice(self.offsets[index], self.offsets[index + 1])
        return {"input_ids": self.input_ids[span], "labels": self.labels[span],
                "position_ids": positions_of(self.example_lengths[index])}


class PackedRows:
    """A packed split as a worker sees it: rows by index, loaded a chunk at a time, at most `max_chunks` kept.

    Example:
        >>> rows = PackedRows(prepared_table, chunk_rows=64, max_chunks=80)  # doctest: +SKIP
        >>> rows.prefetch(schedule.step_rows(step + 1))  # read on a background thread  # doctest: +SKIP
        >>> batch = rows.batch(schedule.micro_batches(step, rank)[0][1], pad_token_id=0)  # doctest: +SKIP
    """

    def __init__(self, table: CachedTable, chunk_rows: int, max_chunks: int):
        self.table, self.chunk_rows, self.max_chunks = table, max(1, chunk_rows), max_chunks
        self._chunks: OrderedDict[int, Future[Chunk]] = OrderedDict()
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raysft-rows")

    def __len__(self) -> int:
        return self.table.num_rows

    def _load(self, chunk: int) -> Chunk:
        start = chunk * self.chunk_rows
        return Chunk.read(self.table, start, start + self.chunk_rows)

    def _request(self, chunks: np.ndarray) -> None:
        needed = dict.fromkeys(int(c) for c in chunks)
        for chunk in needed:
            if chunk in self._chunks:
                self._chunks.move_to_end(chunk)
            else:
                self._chunks[chunk] = self._reader.submit(self._load, chunk)
        # Evict the least recently needed (a pending read just finishes unused), never one asked for now.
        while len(self._chunks) > self.max_chunks and next(iter(self._chunks)) not in needed:
            self._chunks.popitem(last=False)

    def prefetch(self, indices: np.ndarray) -> None:
        """Start reading the chunks of rows `indices` (the steps ahead) without waiting for them."""
        self._request(np.asarray(indices) // self.chunk_rows)

    def _rows(self, indices: np.ndarray) -> list[tuple[Chunk, int]]:
        chunks = np.asarray(indices) // self.chunk_rows
        self._request(chunks)
        return [(self._chunks[int(c)].result(), int(i) - int(c) * self.chunk_rows) for c, i in zip(chunks, indices)]

    def batch(self, indices: np.ndarray, pad_token_id: int) -> dict[str, torch.Tensor]:
        return collate([chunk.row(offset) for chunk, offset in self._rows(indices)], pad_token_id)

    def trained_tokens(self, indices: np.ndarray) -> int:
        """Tokens that contribute to the loss (next-token targets inside one example)."""
        return sum(int(chunk.num_trained[offset]) for chunk, offset in self._rows(indices))

    def real_tokens(self, indices: np.ndarray) -> int:
        return sum(int(chunk.num_tokens[offset]) for chunk, offset in self._rows(indices))

    def close(self) -> None:
        self._reader.shutdown(wait=False, cancel_futures=True)
        self._chunks.clear()
        self.table.close()


def chunks_to_keep(window_rows: int, global_batch: int, chunk_rows: int) -> int:
    """Chunks a worker keeps: the current and the next shuffle window, and a step's worth besides (a step may
    straddle two windows)."""
    per = -(-max(window_rows, 1) // chunk_rows)
    return 2 * per + 2 * -(-global_batch // chunk_rows) + 2

