"""Data preparation end to end, on Ray Data, in bounded memory:

    sources ─► read (Ray Data, one task per file) ─► normalize + tokenize + mask (actor pool) ─► tokenized cache
    tokenized cache ─► length policy + best-fit-decreasing packing per window (tasks) ─► packed cache
    packed cache ─► Ray Train workers, each reading the windows of rows its next steps need (raysft/data/stream.py)

Both caches are Parquet tables on the cache location (``data.cache_dir``: a local folder, a shared mount or
object storage), keyed by content, written once and trusted only through their manifest (raysft/data/cache.py).
The tokenized key covers the sources (file names, sizes, modification times; inline rows themselves), the
tokenizer and every option that changes tokens or masks, not ``max_seq_len``: a rerun, a ``--resume`` and every
trial of a sweep reuse it, and a sweep over ``data.max_seq_len`` only re-packs. The driver never holds the rows:
its statistics come from one pass over small columns, a row group at a time (exact counts, and exact
percentiles from a histogram of lengths).

Packing runs within windows of ``PACK_WINDOW`` consecutive examples, so each window is packed by one task and
the result does not depend on how many tasks ran. Measured on GSM8K and Code Alpaca 2k (benchmarks/results/data_scale.md),
windows of 2048 lose at most 0.06 percentage point of packing efficiency against the whole dataset.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raysft import storage
from raysft.config import Config, DataConfig, SourceConfig, default_cache_root
from raysft.data.cache import CachedTable, index_written, list_arrays, write_folder
from raysft.data.packing import apply_length_policy, pack_examples, unpacked_rows
from raysft.data.sources import MAX_PROBLEMS, fingerprint_source, problem_report, resolve_files, source_format
from raysft.errors import DataError, RunError
from raysft.ray_session import ensure_ray
from raysft.console import format_duration, say, split_line, verbose

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# Bump when tokenization, masking or the cache layout changes meaning, so old caches are not reused.
CACHE_VERSION = "4"  # 3: Parquet tables with manifests, read and packed on Ray Data; 4: masks from one rendering
# Examples packed together by one task. Best-fit decreasing gains next to nothing from more candidates
# once a window holds thousands of examples (measured in benchmarks/results/data_scale.md).
PACK_WINDOW = 8192
# Rows per Parquet row group: the unit a reader fetches. Tokenized: a pack window reads about two groups per
# file it spans. Packed: small, so a worker's shuffle window is read at a fine grain.
TOKENIZED_GROUP_ROWS = 4096
PACKED_GROUP_ROWS = 64

# A tokenize actor that dies (most often OOM-killed by a row too large for its memory) is restarted and
# its batch retried this many times; Ray Data's default is forever, which hangs the run on such a row.
TOKENIZE_RETRIES = 1
TOKENIZE_BATCH_ROWS = 256
# Source bytes per tokenize actor: an actor costs 3-5 s of a core to start (importing transformers, unpickling the
# tokenizer), about what tokenizing 2 MiB of rows takes, so smaller inputs start fewer than data.num_tokenize_workers.
BYTES_PER_TOKENIZE_ACTOR = 2 << 20
LIMITED_ROW_BYTES = 4 << 10
WRITE_TASKS_AT_ONCE = 2

PACKED_COLUMNS = ["input_ids", "labels", "example_lengths", "num_tokens", "num_trained"]

# A long Ray Data job says how far it is at this interval (rows written so far), so a console or `ray job logs`
# shows it is alive; a job shorter than this prints only its start and its result.
PROGRESS_EVERY_S = 30.0


def cache_root(cfg: DataConfig) -> str:
    """Where both caches live: ``data.cache_dir`` (a path or a URI), else ``<cache root>/data``."""
    return cfg.cache_dir if cfg.cache_dir else str(default_cache_root() / "data")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """What decides a tokenizer's tokens: its vocabulary with every added token (model.add_special_tokens among
    them), its chat template and EOS."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)).encode())
    digest.update(str(tokenizer.chat_template).encode())
    digest.update(str(tokenizer.eos_token).encode())
    return digest.hexdigest()


def cache_key(sources: list[SourceConfig], tokenizer: Any, cfg: DataConfig) -> str:
    """The tokenized cache's key: every data option that changes which rows are kept or how they are
    tokenized, and nothing else."""
    options = f"{cfg.train_on_inputs}|{cfg.parse_special_tokens}|{cfg.max_row_chars}"
    digest = hashlib.sha256(f"{CACHE_VERSION}|{options}|{tokenizer_fingerprint(tokenizer)}".encode())
    for source in sources:
        fingerprint_source(source, digest)
    return digest.hexdigest()[:24]


@dataclass(frozen=True)
class PackPlan:
    """How one packed split is made from a tokenized table: which of its rows, and the length policy."""

    name: str
    source: str  # the split whose tokenized table it reads
    tokenized_key: str
    holdout: tuple[float, int, bool] | None  # (fraction, seed, held out?) when eval is held out of train
    max_seq_len: int
    over_length: str
    packing: bool

    @property
    def key(self) -> str:
        text = f"{CACHE_VERSION}|{self.tokenized_key}|{self.holdout}|{self.max_seq_len}|{self.over_length}|" \
               f"{self.packing}|{PACK_WINDOW}"
        return hashlib.sha256(text.encode()).hexdigest()[:24]


def held_out(seq: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Which rows an `eval_fraction` hold-out takes: a hash of (seed, row key) below `fraction`.

    A pure function of each row, so every pack window decides alone and the split is the same on every run;
    the eval share is `fraction` of the rows in expectation (not exactly).

    Example:
        >>> held_out(np.arange(10_000), 0.1, seed=0).mean().round(2)
        0.1
    """
    # splitmix64 finalizer over (key + seed * golden ratio): well mixed, vectorized, no Python per row.
    with np.errstate(over="ignore"):
        x = np.asarray(seq, dtype=np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


def in_split(table: pa.Table, plan: PackPlan) -> np.ndarray:
    """Rows of a tokenized table slice that belong to the split: read without a problem, and on the right
    side of the hold-out."""
    keep = pc.is_null(table.column("error")).to_numpy(zero_copy_only=False)
    if plan.holdout is not None:
        fraction, seed, want_held = plan.holdout
        keep &= held_out(table.column("seq").to_numpy(), fraction, seed) == want_held
    return keep


class _QuietRayDataConsole(logging.Filter):
    """On Ray Data's console handlers: warnings and errors only, and not the notice that raysft turned its
    progress bars off (its info lines, "Dataset ... execution finished", "Data sink Parquet finished", stay in
    Ray Data's log file)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and not record.getMessage().startswith("Progress bars disabled")


def _ray_data_console_handlers() -> list[logging.Handler]:
    return [handler for handler in logging.getLogger("ray.data").handlers
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)]


@contextlib.contextmanager
def quiet_data_context(preserve_order: bool = False, verbose_run: bool = False) -> Iterator[Any]:
    """Ray Data settings for raysft's own jobs: no progress bars, no start banner, only warnings on the console
    (all of it as Ray Data prints it with `verbose_run`), and with `preserve_order` a deterministic output
    order; the previous settings come back on exit.

    Ray's DataContext is one per process, shared with whatever else the process runs on Ray Data (a
    user's own pipeline next to `raysft.train`), so raysft changes it only while its own job runs.
    Run the job (not only build the Dataset) inside the block. raysft prints its own line per stage
    (`prepare_data`); Ray Data's bars, when verbose, become its log lines every 10 s where the output is not
    a terminal.

    Example:
        >>> with quiet_data_context(preserve_order=True):  # doctest: +SKIP
        ...     dataset.write_parquet(folder)
    """
    import ray.data

    context = ray.data.DataContext.get_current()
    options = context.execution_options
    saved = (options.preserve_order, context.enable_progress_bars, context.print_on_execution_start)
    if preserve_order:
        options.preserve_order = True
    context.enable_progress_bars = verbose_run
    context.print_on_execution_start = verbose_run
    console_filter, handlers = _QuietRayDataConsole(), [] if verbose_run else _ray_data_console_handlers()
    for handler in handlers:
        handler.addFilter(console_filter)
    try:
        yield context
    finally:
        options.preserve_order, context.enable_progress_bars, context.print_on_execution_start = saved
        for handler in handlers:
            handler.removeFilter(console_filter)


@dataclass
class WrittenSoFar:
    """What a running Ray Data write has finished so far in its folder: rows, and the distinct pack windows of
    their keys (window << 32 | row). Each finished Parquet file is read once (its footer only); a file still
    being written has no footer yet and is counted when it has."""

    folder: str
    rows: int = 0
    windows: set[int] = field(default_factory=set)
    seen: set[str] = field(default_factory=set)

    def poll(self) -> WrittenSoFar:
        fs, path = storage.resolve(self.folder)
        for entry in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)):
            if entry.type != pafs.FileType.File or not entry.path.endswith(".parquet") or entry.path in self.seen:
                continue
            try:
                metadata = pq.ParquetFile(fs.open_input_file(entry.path)).metadata
            except (OSError, pa.ArrowInvalid):
                continue  # not finished yet
            self.seen.add(entry.path)
            key = metadata.schema.to_arrow_schema().get_field_index("seq")
            for index in range(metadata.num_row_groups):
                group = metadata.row_group(index)
                self.rows += group.num_rows
                stats = group.column(key).statistics if key >= 0 and group.num_rows else None
                if stats is not None and stats.has_min_max:
                    self.windows.update(range(int(stats.min) >> 32, (int(stats.max) >> 32) + 1))
        return self


@contextlib.contextmanager
def progress_lines(describe: Callable[[], str], every_s: float = PROGRESS_EVERY_S) -> Iterator[None]:
    """While the block runs, say `describe()` and the time so far every `every_s` seconds (from a thread of its
    own: the job's call blocks). A failing `describe` (storage not answering) skips that line."""
    stop, started = threading.Event(), time.monotonic()

    def run() -> None:
        while not stop.wait(every_s):
            try:
                text = describe()
            except Exception:  # noqa: BLE001, S112 (a progress line is never worth failing the job for)
                continue
            say(f"{text} ({format_duration(time.monotonic() - started)})")

    thread = threading.Thread(target=run, name="raysft-data-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


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


# --- statistics: one pass over small columns, a row group at a time ------------------------------------------


@dataclass
class LengthSummary:
    """Counts and an exact histogram of example lengths (tokens), mergeable and bounded by the longest example."""

    rows: int = 0
    tokens: int = 0
    trained: int = 0
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def add(self, lengths: np.ndarray, trained: np.ndarray) -> None:
        self.rows += len(lengths)
        self.tokens += int(lengths.sum())
        self.trained += int(trained.sum())
        counts = np.bincount(lengths)
        if len(counts) > len(self.histogram):
            self.histogram = np.pad(self.histogram, (0, len(counts) - len(self.histogram)))
        self.histogram[: len(counts)] += counts

    def percentile(self, q: float) -> int:
        """numpy's default (linear) percentile of the lengths, from the histogram."""
        cumulative = np.cumsum(self.histogram)
        position = q / 100 * (self.rows - 1)
        below, above = int(np.floor(position)), int(np.ceil(position))
        low, high = (int(np.searchsorted(cumulative, rank, side="right")) for rank in (below, above))
        return int(low + (high - low) * (position - below))

    def longer_than(self, limit: int) -> int:
        return int(self.histogram[limit + 1 :].sum())

    def percentiles(self) -> dict[str, int]:
        return {f"p{q}": self.percentile(q) for q in (50, 90, 99)} | {"max": len(self.histogram) - 1}


def _tokenized_problems(table: CachedTable) -> tuple[list[str], int, list[str], int]:
    """(problems, problem count, skipped rows' messages, skipped count) of a freshly tokenized table."""
    problems: list[str] = []
    skipped: list[str] = []
    problem_count = skipped_count = 0
    for group in table.iter_groups(["error", "skippable"]):
        bad = pc.is_valid(group.column("error")).to_numpy(zero_copy_only=False)
        if not bad.any():
            continue
        errors = np.asarray(group.column("error").to_pylist(), dtype=object)[bad]
        skippable = group.column("skippable").to_numpy(zero_copy_only=False)[bad]
        problem_count += int((~skippable).sum())
        skipped_count += int(skippable.sum())
        problems += list(errors[~skippable][: MAX_PROBLEMS - len(problems)])
        skipped += list(errors[skippable][: MAX_PROBLEMS - len(skipped)])
    return problems, problem_count, skipped, skipped_count


def split_summary(tokenized: CachedTable, plan: PackPlan) -> tuple[LengthSummary, int]:
    """The split's examples as read (lengths, trained tokens) and its skipped invalid rows; raises the
    over-length DataError of `over_length: raise` naming the first offending example."""
    summary, skipped = LengthSummary(), 0
    for group in tokenized.iter_groups(["seq", "num_tokens", "num_trained", "error"]):
        keep = in_split(group, plan)
        errors = pc.is_valid(group.column("error")).to_numpy(zero_copy_only=False)
        skipped += int(errors.sum())
        lengths = group.column("num_tokens").to_numpy()[keep]
        summary.add(lengths, group.column("num_trained").to_numpy()[keep])
        if plan.over_length == "raise" and (lengths > plan.max_seq_len).any():
            seq = group.column("seq").to_numpy()[keep][np.argmax(lengths > plan.max_seq_len)]
            origin = _origin_of(tokenized, int(seq))
            raise DataError(
                f"{origin}: {int(lengths.max())} tokens, more than max_seq_len={plan.max_seq_len}; "
                "raise data.max_seq_len or set data.over_length to drop or truncate")
    return summary, skipped


def _origin_of(tokenized: CachedTable, seq: int) -> str:
    for group in tokenized.iter_groups(["seq", "origin"]):
        found = np.flatnonzero(group.column("seq").to_numpy() == seq)
        if len(found):
            return str(group.column("origin")[int(found[0])])
    return f"row {seq}"


# --- the Ray Data jobs ---------------------------------------------------------------------------------------


def tokenize_actors(sources: list[SourceConfig], most: int) -> int:
    """How many tokenize actors a split's sources keep busy, at most `most`: by their size in bytes (file sizes from
    stat calls; a hub dataset, whose size is not known before it loads, gets `most`).

    The pool is fixed at this size, its actors started together, rather than grown by Ray Data's autoscaler, which
    starts one and adds the next only once batches queue on it: at 100k rows the second actor was asked for 6.6 s
    into the job and then took its own 3-5 s to start, time the first actor's start could have covered.

    Example:
        >>> tokenize_actors([SourceConfig(rows=[{"text": "hi"}])], most=4)
        1
    """
    size = 0
    for source in sources:
        if source.path is not None:
            files = 0
            for file in resolve_files(source.path, source.file_type):
                fs, path = storage.resolve(file)
                files += fs.get_file_info(path).size or 0
            # A `limit` reads only the start of the files; a generous row size bounds what it reads.
            size += files if source.limit is None else min(files, source.limit * LIMITED_ROW_BYTES)
        elif source.rows is not None:
            size += len(json.dumps(source.rows, default=str))
        else:
            return most
    return max(1, min(most, -(-size // BYTES_PER_TOKENIZE_ACTOR)))


def tokenize_split(sources: list[SourceConfig], tokenizer: Any, cfg: DataConfig, location: str,
                   label: str | None = None) -> CachedTable:
    """Read, normalize and tokenize a split's sources into the tokenized table at `location`; every bad row
    is reported together (DataError) and then nothing is committed. With `label` (e.g. "data train"), a long
    job says on the console how many rows it has done."""
    import ray
    import ray.data

    from raysft.data.read import split_dataset
    from raysft.data.tokenize import TokenizeRows

    formats = [source_format(source) for source in sources]
    # The actors need each source's settings, not inline rows (those travel in the dataset itself).
    settings = [source.model_copy(update={"rows": None}) for source in sources]
    folder = write_folder(location)
    written = WrittenSoFar(folder)
    progress = progress_lines(lambda: f"{label}: tokenizing, {written.poll().rows:,} rows done") if label \
        else contextlib.nullcontext()
    with quiet_data_context(preserve_order=True, verbose_run=verbose()), warnings.catch_warnings(), progress:
        # Ray 2.60 deprecates **ray_remote_args but has no named parameter for restarts or retries yet.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        dataset = split_dataset(sources).map_batches(
            TokenizeRows,
            fn_constructor_args=(tokenizer, settings, formats, cfg.train_on_inputs, cfg.parse_special_tokens,
                                 cfg.max_row_chars),
            compute=ray.data.ActorPoolStrategy(size=tokenize_actors(sources, cfg.num_tokenize_workers)),
            batch_size=TOKENIZE_BATCH_ROWS,
            batch_format="pyarrow",
            max_restarts=TOKENIZE_RETRIES,
            max_task_retries=TOKENIZE_RETRIES,
        )
        try:
            # Writes reserve no CPU either (see READ_TASKS_AT_ONCE): encoding Parquet is a sliver of tokenizing.
            dataset.write_parquet(folder, row_group_size=TOKENIZED_GROUP_ROWS, ray_remote_args={"num_cpus": 0},
                                  concurrency=WRITE_TASKS_AT_ONCE)
        except ray.exceptions.RayError as err:
            storage.remove(folder)
            raise RunError(
                f"the tokenize job (Ray Data) failed: {_one_line(err)}. The likely cause is a row too large for "
                "the tokenize actors' memory: lower data.max_row_chars (longer rows are then reported before "
                "tokenizing) or give the workers more memory"
            ) from None
    table = index_written(location, folder)
    problems, problem_count, skipped, skipped_count = _tokenized_problems(table)
    if problem_count:
        storage.remove(folder)  # never committed, so never read; removed to save the space
        more = f"\n(and {problem_count - MAX_PROBLEMS} more)" if problem_count > MAX_PROBLEMS else ""
        raise DataError(problem_report(problems, stopped=False) + more)
    for message in skipped:
        log.warning("skipping invalid row: %s", message)
    if skipped_count > len(skipped):
        log.warning("skipping %d more invalid rows", skipped_count - len(skipped))
    table.commit()
    return table


def pack_window(window: dict[str, Any], tokenized: CachedTable, plan: PackPlan) -> pa.Table:
    """One pack window: rows [start, stop) of the tokenized table -> the split's examples -> length policy
    -> best-fit-decreasing rows (or one row per example). Row keys: window << 32 | row."""
    rows = tokenized.read(int(window["start"]), int(window["stop"]), ["seq", "input_ids", "labels", "error"])
    keep = in_split(rows, plan)
    ids, offsets = list_arrays(rows.column("input_ids"))
    labels, _ = list_arrays(rows.column("labels"))
    examples = [{"input_ids": ids[offsets[i] : offsets[i + 1]], "labels": labels[offsets[i] : offsets[i + 1]],
                 "origin": ""} for i in np.flatnonzero(keep)]
    kept, _ = apply_length_policy(examples, plan.max_seq_len, "truncate" if plan.over_length == "raise" else plan.over_length)
    packed = pack_examples(kept, plan.max_seq_len) if plan.packing else unpacked_rows(kept)
    base = int(window["window"]) << 32
    return pa.table({
        "seq": pa.array(np.arange(base, base + len(packed), dtype=np.int64)),
        "input_ids": _list_column([row["input_ids"] for row in packed]),
        "labels": _list_column([row["labels"] for row in packed]),
        "example_lengths": _list_column([row["example_lengths"] for row in packed]),
        "num_tokens": pa.array([len(row["input_ids"]) for row in packed], pa.int32()),
        "num_trained": pa.array([row["num_trained"] for row in packed], pa.int32()),
    })


def _list_column(rows: list[np.ndarray]) -> pa.ListArray:
    """int32 rows as an Arrow list column, from one flat array (no Python list per row)."""
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.concatenate(rows).astype(np.int32, copy=False) if rows else np.zeros(0, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def _pack_batch(batch: pa.Table, tokenized: CachedTable, plan: PackPlan) -> pa.Table:
    tables = [pack_window(window, tokenized, plan) for window in batch.to_pylist()]
    return pa.concat_tables(tables)


def pack_split(tokenized: CachedTable, plan: PackPlan, location: str, label: str | None = None) -> CachedTable:
    """The packed table of one split, made by Ray Data tasks one pack window each, written to `location`.
    With `label`, a long job says on the console how many windows it has packed."""
    import ray.data

    windows = [{"window": index, "start": start, "stop": min(start + PACK_WINDOW, tokenized.num_rows)}
               for index, start in enumerate(range(0, tokenized.num_rows, PACK_WINDOW))]
    folder = write_folder(location)
    written = WrittenSoFar(folder)
    progress = progress_lines(
        lambda: f"{label}: packing, {len(written.poll().windows)}/{len(windows)} windows done ({written.rows:,} rows)"
    ) if label else contextlib.nullcontext()
    _wait_for_a_free_cpu()
    with quiet_data_context(preserve_order=True, verbose_run=verbose()), progress:
        ray.data.from_items(windows, override_num_blocks=len(windows)).map_batches(
            _pack_batch, fn_kwargs={"tokenized": tokenized, "plan": plan}, batch_size=1, batch_format="pyarrow",
        ).write_parquet(folder, row_group_size=PACKED_GROUP_ROWS)
    return index_written(location, folder)


def _wait_for_a_free_cpu(timeout_s: float = 10.0) -> None:
    """Give the tokenize job's actors a moment to hand their CPUs back before the next job starts: Ray Data
    checks for a free CPU once, at the start, and otherwise warns that the job "will hang", which it would not.
    A cluster whose CPUs stay busy (a sweep's trials) still gets the warning, where it is true."""
    import ray

    deadline = time.monotonic() + timeout_s
    while not ray.available_resources().get("CPU") and time.monotonic() < deadline:
        time.sleep(0.2)


# --- the driver's view ---------------------------------------------------------------------------------------


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
    tokens_after_packing: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, info: dict[str, Any]) -> None:
        for key, value in info.items():
            getattr(self, key)[name] = value


def split_stats(read: tuple[LengthSummary, int], plan: PackPlan, packed: CachedTable) -> dict[str, Any]:
    """The split's statistics (a DataStats column), exact: `read` is its :func:`split_summary` (examples as read),
    the packed side comes from small columns of the packed table."""
    summary, skipped = read
    if plan.holdout is not None and plan.holdout[2]:
        skipped = 0  # skipped rows are reported once, with the split they were read for (train)
    rows = examples = tokens = 0
    for group in packed.iter_groups(["num_tokens", "example_lengths"]):
        rows += group.num_rows
        tokens += int(pc.sum(group.column("num_tokens")).as_py() or 0)
        examples += int(pc.sum(pc.list_value_length(group.column("example_lengths"))).as_py() or 0)
    over = summary.longer_than(plan.max_seq_len)
    dropped = over if plan.over_length == "drop" else 0
    counts = {"over_length_dropped": dropped, "truncated": over if plan.over_length != "drop" else 0,
              "no_trained_tokens": summary.rows - dropped - examples, "invalid_skipped": skipped}
    if examples == 0:
        raise DataError(f"data.{plan.name}: no examples left after the length policy ({counts}); check max_seq_len")
    return {
        "rows_read": summary.rows + skipped,
        "counts": counts,
        "examples_kept": examples,
        "token_length_percentiles": summary.percentiles(),
        "trained_token_fraction": summary.trained / max(summary.tokens, 1),
        "rows_after_packing": rows,
        "packing_efficiency": tokens / max(rows * plan.max_seq_len, 1),
        "tokens_after_packing": tokens,
    }


@dataclass
class PreparedData:
    """The packed splits the workers read, the tokenized tables they came from, and their statistics."""

    splits: dict[str, CachedTable]
    tokenized: dict[str, CachedTable]
    stats: DataStats
    fingerprint: str
    pad_token_id: int
    plans: dict[str, PackPlan] = field(default_factory=dict)
    """How each packed split was made from its tokenized table (raysft/data/prompts.py reads eval examples by it)."""

    def num_rows(self, split: str) -> int:
        return self.splits[split].num_rows


def _pack_plans(cfg: Config, keys: dict[str, str]) -> list[PackPlan]:
    data = cfg.data
    common = {"max_seq_len": data.max_seq_len, "over_length": data.over_length, "packing": data.packing}
    if "eval" in keys:
        return [PackPlan(name, name, keys[name], None, **common) for name in ("train", "eval")]
    if data.eval_fraction > 0:
        return [PackPlan(name, "train", keys["train"], (data.eval_fraction, cfg.train.seed, name == "eval"), **common)
                for name in ("train", "eval")]
    return [PackPlan("train", "train", keys["train"], None, **common)]


def prepare_data(cfg: Config, tokenizer: PreTrainedTokenizerBase | None = None) -> PreparedData:
    """Read, tokenize and pack the data of `cfg` on Ray Data, or find it in the cache. `tokenizer`: the caller's,
    when it needs one too (a process loads it once); else loaded here.

    Sources are checked (files exist, formats detected) before Ray starts; Ray starts only when something is
    not cached yet. Bad rows raise one DataError listing them with their origins.

    Example:
        >>> prepared = prepare_data(raysft.load_config("examples/gsm8k_lora.yaml"))  # doctest: +SKIP
        >>> prepared.num_rows("train"), prepared.stats.packing_efficiency["train"]  # doctest: +SKIP
        (41, 0.97)
    """
    if tokenizer is None:
        from raysft.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg.model)
    root = cache_root(cfg.data)
    sources = {"train": cfg.data.train, **({"eval": cfg.data.eval} if cfg.data.eval else {})}
    keys = {name: cache_key(split_sources, tokenizer, cfg.data) for name, split_sources in sources.items()}
    tokenized = {name: CachedTable.open(storage.join(root, "tokenized", key)) for name, key in keys.items()}
    for name, split_sources in sources.items():
        if tokenized[name] is None:
            for source in split_sources:
                source_format(source)  # an unreadable or undetectable source fails here, before Ray starts
    stats, splits, digest = DataStats(), {}, hashlib.sha256()
    # The console's line per stage (tracking.console): what runs, then what it made, or what the cache holds.
    report = say if cfg.tracking.console else (lambda text: None)
    plans = {plan.name: plan for plan in _pack_plans(cfg, keys)}
    for plan in plans.values():
        location = storage.join(root, "packed", plan.key)
        packed = CachedTable.open(location)
        label = f"data {plan.name}"
        if packed is None:
            ensure_ray(cfg.scaling.ray_address)
            source_table = tokenized[plan.source]
            if source_table is None:
                count = len(sources[plan.source])
                report(f"data {plan.source}: reading and tokenizing {count} source{'s' * (count != 1)} on Ray Data")
                started = time.monotonic()
                source_table = tokenized[plan.source] = tokenize_split(
                    sources[plan.source], tokenizer, cfg.data, storage.join(root, "tokenized", plan.tokenized_key),
                    label=f"data {plan.source}" if cfg.tracking.console else None)
                report(f"data {plan.source}: {source_table.num_rows:,} rows read and tokenized "
                       f"({format_duration(time.monotonic() - started)})")
            read = split_summary(source_table, plan)  # over_length: raise fails here, before packing
            report(f"{label}: packing {read[0].rows:,} examples into rows of {plan.max_seq_len} tokens"
                   if plan.packing else f"{label}: {read[0].rows:,} examples, one per row of up to {plan.max_seq_len}")
            started = time.monotonic()
            packed = pack_split(source_table, plan, location, label=label if cfg.tracking.console else None)
            packed.info = split_stats(read, plan, packed)
            packed.commit()
            report(f"{label}: {split_line(packed.info)} ({format_duration(time.monotonic() - started)})")
        else:
            report(f"{label}: cached, {split_line(packed.info)}")
        splits[plan.name] = packed
        stats.add(plan.name, packed.info)
        digest.update(plan.key.encode())
    eval_source = plans["eval"].source if "eval" in plans else None
    if cfg.eval.generate is not None and eval_source is not None and tokenized[eval_source] is None:
        # eval.generate reads its prompts from the tokenized eval examples (raysft/data/prompts.py); the packed
        # table can outlive its tokenized one when a cache is pruned by hand.
        ensure_ray(cfg.scaling.ray_address)
        tokenized[eval_source] = tokenize_split(sources[eval_source], tokenizer, cfg.data,
                                                storage.join(root, "tokenized", keys[eval_source]))
    return PreparedData(splits, {k: v for k, v in tokenized.items() if v is not None}, stats, digest.hexdigest()[:24],
                        int(tokenizer.pad_token_id), plans)


def first_examples(tokenized: CachedTable, count: int) -> list[dict[str, Any]]:
    """The first `count` usable examples of a tokenized table (what `raysft data --show` prints)."""
    examples: list[dict[str, Any]] = []
    for group in tokenized.iter_groups(["origin", "input_ids", "labels", "error"]):
        for row in group.to_pylist():
            if row["error"] is None:
                examples.append(row)
            if len(examples) == count:
                return examples
    return examples


def stats_json(stats: DataStats) -> str:
    return json.dumps(stats.__dict__, indent=2)
