"""The data pipeline: read + normalize (driver, before Ray) -> tokenize + mask (Ray Data actors, cached)
-> length policy -> pack -> Ray Datasets streamed to the training workers.

The tokenized cache is keyed by content (source bytes, source options, tokenizer, masking) and not by
max_seq_len, so a rerun or a sweep over sequence lengths only re-applies the length policy and re-packs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
from transformers import PreTrainedTokenizerBase

from raysft.config import Config, DataConfig, SourceConfig, default_cache_root
from raysft.errors import DataError, RunError
from raysft.data.labels import count_trained
from raysft.data.packing import (
    apply_length_policy,
    pack_examples,
    packing_efficiency,
    unpacked_rows,
)
from raysft.data.sources import MAX_PROBLEMS, load_examples
from raysft.data.tokenize import TokenizeBatch

# Bump when tokenization or masking changes meaning, so old caches are not reused.
CACHE_VERSION = "2"  # 2: special tokens spelled in content are plain text unless data.parse_special_tokens

# A tokenize actor that dies (most often OOM-killed by a row too large for its memory) is restarted and
# its batch retried this many times; Ray Data's default is forever, which hangs the run on such a row.
TOKENIZE_RETRIES = 1


def _hash_path(path: Path, digest: Any) -> None:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)


def _source_fingerprint(source: SourceConfig, digest: Any) -> None:
    digest.update(json.dumps(source.model_dump(exclude={"rows"}), sort_keys=True).encode())
    if source.rows is not None:
        digest.update(json.dumps(source.rows, sort_keys=True, default=str).encode())
    elif source.path is not None:
        matched = sorted(Path().glob(source.path)) if any(c in source.path for c in "*?[") else [Path(source.path)]
        for path in matched:
            if path.exists():
                _hash_path(path, digest)
    elif source.hf_dataset is not None and Path(source.hf_dataset).is_dir():
        _hash_path(Path(source.hf_dataset), digest)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)).encode())
    digest.update(str(tokenizer.chat_template).encode())
    digest.update(str(tokenizer.eos_token).encode())
    return digest.hexdigest()


def cache_key(sources: list[SourceConfig], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> str:
    # Every data option that changes which rows are kept or how they are tokenized, and nothing else.
    options = f"{cfg.train_on_inputs}|{cfg.parse_special_tokens}|{cfg.max_row_chars}"
    digest = hashlib.sha256(f"{CACHE_VERSION}|{options}|{tokenizer_fingerprint(tokenizer)}".encode())
    for source in sources:
        _source_fingerprint(source, digest)
    return digest.hexdigest()[:24]


@dataclass
class Split:
    """One split on its way through the pipeline: its cache file, and the rows to tokenize on a miss."""

    name: str
    cache_file: Path
    examples: list[dict[str, Any]] | None


def read_splits(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> list[Split]:
    """Phase 1, before Ray starts: read and validate every source not already in the tokenized cache."""
    cache_root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_root() / "tokenized"
    splits = []
    for name, sources in (("train", cfg.train), ("eval", cfg.eval)):
        if not sources:
            continue
        cache_file = cache_root / cache_key(sources, tokenizer, cfg) / "examples.parquet"
        examples = None if cache_file.exists() else load_examples(sources, cfg.max_row_chars)
        splits.append(Split(name, cache_file, examples))
    return splits


@contextlib.contextmanager
def quiet_data_context(preserve_order: bool = False) -> Iterator[ray.data.DataContext]:
    """Ray Data settings for raysft's own jobs: no progress bars, no start banner, and with
    `preserve_order` a deterministic output order; the previous settings come back on exit.

    Ray's DataContext is one per process, shared with whatever else the process runs on Ray Data (a
    user's own pipeline next to `raysft.train`), so raysft changes it only while its own job runs.
    Run the job (not only build the Dataset) inside the block.

    Example:
        >>> with quiet_data_context(preserve_order=True):  # doctest: +SKIP
        ...     frame = ray.data.from_items(rows).map_batches(fn).to_pandas()
    """
    context = ray.data.DataContext.get_current()
    options = context.execution_options
    saved = (options.preserve_order, context.enable_progress_bars, context.print_on_execution_start)
    if preserve_order:
        options.preserve_order = True
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    try:
        yield context
    finally:
        options.preserve_order, context.enable_progress_bars, context.print_on_execution_start = saved


def _tokenize_with_ray(examples: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> pa.Table:
    # preserve_order: the cache (and so the data order) must be deterministic.
    with quiet_data_context(preserve_order=True):
        with warnings.catch_warnings():
            # Ray 2.60 deprecates **ray_remote_args but has no named parameter for restarts or retries yet.
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            dataset = ray.data.from_items(examples).map_batches(
                TokenizeBatch,
                fn_constructor_args=(tokenizer, cfg.train_on_inputs, cfg.parse_special_tokens),
                compute=ray.data.ActorPoolStrategy(size=min(cfg.num_tokenize_workers, max(1, len(examples) // 256))),
                batch_size=256,
                batch_format="numpy",
                max_restarts=TOKENIZE_RETRIES,
                max_task_retries=TOKENIZE_RETRIES,
            )
        try:
            frame = dataset.select_columns(["input_ids", "labels", "origin", "error"]).to_pandas()
        except ray.exceptions.RayError as err:
            raise RunError(
                f"the tokenize job (Ray Data) failed: {_one_line(err)}. The likely cause is a row too large for "
                "the tokenize actors' memory: lower data.max_row_chars (longer rows are then reported before "
                "tokenizing) or give the workers more memory"
            ) from None
    problems = [error for error in frame["error"] if error]
    if problems:
        more = f"\n(and {len(problems) - MAX_PROBLEMS} more)" if len(problems) > MAX_PROBLEMS else ""
        raise DataError("\n".join(problems[:MAX_PROBLEMS]) + more)
    return pa.Table.from_pandas(frame.drop(columns="error"), preserve_index=False)


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
# A task error's text is a remote traceback; its first "SomeError: message" line names what went wrong.
_EXCEPTION_LINE = re.compile(r"^[\w.]*(?:Error|Exception)\b.*$", re.MULTILINE)


def _one_line(err: Exception) -> str:
    """The reason a Ray job failed, on one line (Ray's own text runs to tracebacks and node details)."""
    text = _ANSI_ESCAPE.sub("", str(err))
    found = _EXCEPTION_LINE.search(text)
    if found:
        return found.group()
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _write_atomically(table: pa.Table, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    pq.write_table(table, staging)
    os.replace(staging, target)


def tokenize_splits(splits: list[Split], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> dict[str, list[dict[str, Any]]]:
    """Phase 2, on Ray: tokenize what is not cached (parallel actors), then load every split's tokens."""
    pending = [s for s in splits if s.examples is not None]
    if pending:
        # One Ray Data job for all splits: the actor pool (and its tokenizer load) starts once.
        examples = [e for split in pending for e in split.examples or []]
        table = _tokenize_with_ray(examples, tokenizer, cfg)
        offset = 0
        for split in pending:
            count = len(split.examples or [])
            _write_atomically(table.slice(offset, count), split.cache_file)
            offset += count
    tokens = {}
    for split in splits:
        table = pq.read_table(split.cache_file)
        tokens[split.name] = [
            {"input_ids": np.asarray(ids, dtype=np.int64), "labels": np.asarray(labels, dtype=np.int64), "origin": origin}
            for ids, labels, origin in zip(
                table.column("input_ids").to_pylist(), table.column("labels").to_pylist(), table.column("origin").to_pylist()
            )
        ]
    return tokens


@dataclass
class DataStats:
    """What happened to the data; printed by `raysft data` and saved as data_stats.json."""

    rows_read: dict[str, int] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    examples_kept: dict[str, int] = field(default_factory=dict)
    token_length_percentiles: dict[str, dict[str, int]] = field(default_factory=dict)
    trained_token_fraction: dict[str, float] = field(default_factory=dict)
    rows_after_packing: dict[str, int] = field(default_factory=dict)
    packing_efficiency: dict[str, float] = field(default_factory=dict)


@dataclass
class PreparedData:
    """Packed rows for each split, ready to hand to TorchTrainer."""

    rows: dict[str, list[dict[str, Any]]]
    examples: dict[str, list[dict[str, Any]]]
    stats: DataStats
    fingerprint: str

    def ray_datasets(self) -> dict[str, ray.data.Dataset]:
        return {name: _to_ray_dataset(rows) for name, rows in self.rows.items()}


def _to_ray_dataset(rows: list[dict[str, Any]]) -> ray.data.Dataset:
    table = pa.table(
        {
            "row_id": pa.array(np.arange(len(rows), dtype=np.int64)),
            **{            key: pa.array([np.asarray(r[key], dtype=np.int32) for r in rows], type=pa.list_(pa.int32()))
            for key in ("input_ids", "labels", "position_ids")},
        }
    )
    return ray.data.from_arrow(table)


def _hold_out(examples: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    order = np.random.default_rng(seed).permutation(len(examples))
    held = set(order[: int(round(len(examples) * fraction))].tolist())
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def shape_splits(tokens: dict[str, list[dict[str, Any]]], cfg: Config) -> PreparedData:
    """Length policy, eval hold-out, packing and statistics (cheap; rerun for every seq_len)."""
    data = cfg.data
    tokens = dict(tokens)
    if "eval" not in tokens and data.eval_fraction > 0:
        tokens["train"], tokens["eval"] = _hold_out(tokens["train"], data.eval_fraction, cfg.train.seed)
    stats, rows, kept_examples = DataStats(), {}, {}
    digest = hashlib.sha256(f"{data.max_seq_len}|{data.over_length}|{data.packing}".encode())
    for name, examples in tokens.items():
        kept, counts = apply_length_policy(examples, data.max_seq_len, data.over_length)
        if not kept:
            raise DataError(f"data.{name}: no examples left after the length policy ({counts}); check max_seq_len")
        packed = pack_examples(kept, data.max_seq_len) if data.packing else unpacked_rows(kept)
        lengths = np.array([len(e["input_ids"]) for e in examples])  # as read, before the length policy
        trained = sum(count_trained(e["labels"]) for e in examples)  # the loss's rule: no example start counts
        stats.rows_read[name] = len(examples)
        stats.counts[name] = counts
        stats.examples_kept[name] = len(kept)
        stats.token_length_percentiles[name] = {
            f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)
        } | {"max": int(lengths.max())}
        stats.trained_token_fraction[name] = trained / max(int(lengths.sum()), 1)
        stats.rows_after_packing[name] = len(packed)
        stats.packing_efficiency[name] = packing_efficiency(packed, data.max_seq_len)
        rows[name], kept_examples[name] = packed, kept
        for row in packed:
            digest.update(np.asarray(row["input_ids"], dtype=np.int64).tobytes())
            digest.update(np.asarray(row["labels"], dtype=np.int64).tobytes())
    return PreparedData(rows, kept_examples, stats, digest.hexdigest()[:24])


def stats_json(stats: DataStats) -> str:
    return json.dumps(stats.__dict__, indent=2)

