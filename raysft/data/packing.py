"""Length policy, best-fit-decreasing packing, and the collate function.

Packed rows carry ``position_ids`` that restart at 0 for every example. With no attention mask and
``use_cache=False``, transformers turns those restarts into a block-diagonal causal mask, so a packed
row computes exactly what its examples would compute one by one.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from raysft.errors import DataError
from raysft.labels import IGNORE_INDEX, count_trained

if TYPE_CHECKING:
    import torch

LengthPolicy = Literal["drop", "truncate", "raise"]


def apply_length_policy(
    examples: list[dict[str, Any]], max_seq_len: int, policy: LengthPolicy
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Drop, truncate or reject over-long examples, then drop those with no trained token; count both.

    Example:
        >>> example = {"input_ids": [1, 2, 3], "labels": [1, 2, 3], "origin": "a"}
        >>> kept, counts = apply_length_policy([example], 2, "truncate")
        >>> kept[0]["input_ids"], counts
        ([1, 2], {'over_length_dropped': 0, 'truncated': 1, 'no_trained_tokens': 0})
    """
    if policy not in ("drop", "truncate", "raise"):
        raise ValueError(f"unknown over_length policy {policy!r}; expected drop, truncate or raise")
    counts = {"over_length_dropped": 0, "truncated": 0, "no_trained_tokens": 0}
    kept = []
    for example in examples:
        length = len(example["input_ids"])
        if length > max_seq_len:
            if policy == "raise":
                raise DataError(
                    f"{example['origin']}: {length} tokens, more than max_seq_len={max_seq_len}; "
                    "raise data.max_seq_len or set data.over_length to drop or truncate"
                )
            if policy == "drop":
                counts["over_length_dropped"] += 1
                continue
            example = {
                **example,
                "input_ids": example["input_ids"][:max_seq_len],
                "labels": example["labels"][:max_seq_len],
            }
            counts["truncated"] += 1
        if count_trained(example["labels"]) == 0:
            # Nothing to learn from; kept, it would only dilute batches. Counted so it is never silent.
            counts["no_trained_tokens"] += 1
            continue
        kept.append(example)
    return kept, counts


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group item indices into bins of total length at most `capacity`, longest items first.

    Each item goes to the fullest bin it still fits in (ties: the earliest bin), else a new bin.
    Deterministic; O(n log n) searches over the sorted remaining capacities.

    Example:
        >>> best_fit_decreasing([3, 5, 2, 4], 7)
        [[1, 2], [3, 0]]
    """
    too_long = [i for i, length in enumerate(lengths) if length > capacity]
    if too_long:
        raise ValueError(f"item {too_long[0]} has length {lengths[too_long[0]]} > capacity {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin index), kept sorted
    for item in order:
        slot = bisect.bisect_left(free, (lengths[item], -1))
        if slot == len(free):
            bin_index, remaining = len(bins), capacity
            bins.append([])
        else:
            remaining, bin_index = free.pop(slot)
        bins[bin_index].append(item)
        bisect.insort(free, (remaining - lengths[item], bin_index))
    return bins


def pack_examples(examples: list[dict[str, Any]], max_seq_len: int) -> list[dict[str, Any]]:
    """Pack examples into rows of at most `max_seq_len` tokens (best-fit decreasing).

    Example:
        >>> rows = pack_examples([{"input_ids": [5, 6], "labels": [5, 6]}, {"input_ids": [7], "labels": [7]}], 4)
        >>> rows[0]["position_ids"].tolist(), rows[0]["num_examples"]
        ([0, 1, 0], 2)
    """
    bins = best_fit_decreasing([len(e["input_ids"]) for e in examples], max_seq_len)
    return [_row([examples[i] for i in members]) for members in bins]


def unpacked_rows(examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One example per row, in the same row schema as :func:`pack_examples`.

    Example:
        >>> unpacked_rows([{"input_ids": [5, 6], "labels": [5, 6]}])[0]["position_ids"].tolist()
        [0, 1]
    """
    return [_row([example]) for example in examples]


def collate(rows: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad rows to the longest one; padding is untrained and forms its own position segment.

    No attention mask is returned on purpose: a 2-D mask would stop transformers from deriving the
    block-diagonal mask from the position_ids restarts. Run the model with ``use_cache=False``.

    Example:
        >>> collate([{"input_ids": [5, 6, 7], "labels": [5, 6, 7], "position_ids": [0, 1, 2]},
        ...          {"input_ids": [8], "labels": [8], "position_ids": [0]}], pad_token_id=0)["position_ids"]
        tensor([[0, 1, 2],
                [0, 0, 1]])
    """
    # Imported here: the pack tasks of the data pipeline import this module, and torch would cost each fresh Ray
    # worker seconds of import (12.8 s in one process on a loaded 2-core machine) for a function only training calls.
    import torch

    width = max(len(row["input_ids"]) for row in rows)
    # Filled in preallocated arrays: the loop builds every micro-batch on the training thread.
    input_ids = np.full((len(rows), width), pad_token_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.empty((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        length = len(row["input_ids"])
        input_ids[i, :length] = row["input_ids"]
        labels[i, :length] = row["labels"]
        position_ids[i, :length] = row["position_ids"]
        position_ids[i, length:] = np.arange(width - length)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(position_ids),
    }


def packing_efficiency(rows: list[dict[str, Any]], max_seq_len: int) -> float:
    """Real tokens over row slots: 1.0 means no padding would be needed at max_seq_len.

    Example:
        >>> packing_efficiency([{"input_ids": [1, 2, 3]}, {"input_ids": [4]}], 4)
        0.5
    """
    if not rows:
        return 0.0
    return sum(len(row["input_ids"]) for row in rows) / (len(rows) * max_seq_len)


def _row(examples: list[dict[str, Any]]) -> dict[str, Any]:
    input_ids = np.concatenate([np.asarray(e["input_ids"], dtype=np.int32) for e in examples])
    labels = np.concatenate([np.asarray(e["labels"], dtype=np.int32) for e in examples])
    lengths = np.array([len(e["input_ids"]) for e in examples], dtype=np.int32)
    # The first token of an example would be predicted from the previous example's last token;
    # alone it has no predecessor and is never a target, so it is not one when packed either.
    labels[np.cumsum(lengths) - lengths] = IGNORE_INDEX
    position_ids = positions_of(lengths)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "example_lengths": lengths,
            "num_examples": len(examples), "num_trained": count_trained(labels, position_ids)}


def positions_of(example_lengths: np.ndarray) -> np.ndarray:
    """A packed row's position ids from its examples' lengths: 0, 1, ... restarting at every example.

    Example:
        >>> positions_of(np.array([3, 2])).tolist()
        [0, 1, 2, 0, 1]
    """
    lengths = np.asarray(example_lengths, dtype=np.int64)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return (np.arange(int(lengths.sum())) - starts).astype(np.int32)
