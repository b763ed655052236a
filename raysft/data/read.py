"""Sources as Ray Data datasets of raw rows, read in parallel on the cluster.

Every source becomes rows ``{seq, origin, row, error, skippable}``:

- ``seq``: an int64 key increasing in read order (source, file, row within the file), which fixes the
  order of everything downstream whatever the number of read tasks (see raysft/data/cache.py);
- ``origin``: ``file:LINE``, ``file:row N``, ``hf:NAME[i]`` or ``rows[i]``, for every later error;
- ``row``: the raw row as JSON text (rows of any shape travel through Arrow unchanged);
- ``error``: set on a row that stands for a problem instead (a file that is not JSON, not UTF-8, empty):
  the reading of that file stops there, and the problem is reported with the others before training.

Files (local, NFS, ``s3://``, ``gs://``, compressed) are read by a Ray Data file datasource, one read task
per file, with raysft's own row readers (raysft/data/sources.py), which know lines and row numbers;
Hugging Face datasets go through ``ray.data.from_arrow`` of their memory-mapped table, inline rows through
``ray.data.from_items``.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import ray.data
from ray.data.datasource import FileBasedDatasource

from raysft import storage
from raysft.config import SourceConfig
from raysft.data.cache import seq_key
from raysft.data.sources import file_kind, hf_origin, load_hf_dataset, read_file, resolve_files
from raysft.errors import DataError

RAW_SCHEMA = pa.schema([("seq", pa.int64()), ("origin", pa.string()), ("row", pa.string()), ("error", pa.string())])

# Rows per block a read task yields: small enough to stream, large enough that Arrow's per-block cost vanishes.
READ_BLOCK_ROWS = 2048
# Read tasks reserve no CPU: reading is a small fraction of the tokenizing it feeds (about 40k rows/s per task
# against 1k per tokenize actor), and a CPU held by a read is one the tokenize pool cannot have: on a 2-CPU node
# a second actor never started, and tokenizing ran at one core's speed. So few run at once instead.
READ_TASKS_AT_ONCE = 4


def _raw_json(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False, default=str)


def _blocks(rows: Iterator[tuple[int, str, str | None, str | None]]) -> Iterator[pa.Table]:
    """(seq, origin, row, error) tuples as raw-row blocks of READ_BLOCK_ROWS rows."""
    while batch := list(itertools.islice(rows, READ_BLOCK_ROWS)):
        yield pa.table([list(column) for column in zip(*batch)], schema=RAW_SCHEMA)


class SourceFilesDatasource(FileBasedDatasource):
    """The files of one path source; each read task reads whole files with raysft's row readers."""

    def __init__(self, files: list[str], file_type: str, source_index: int):
        # Read tasks run in other processes, whose working folder need not be the driver's: a relative path
        # becomes absolute here (and so in the rows' origins).
        files = [file if storage.is_uri(file) else storage.resolve(file)[1] for file in files]
        super().__init__(files)
        self._source_index = source_index
        # Ray hands each read its path inside the file system (no scheme); map it back to the source's file.
        self._files = {storage.resolve(file)[1]: (index, file) for index, file in enumerate(files)}
        self._kinds = {file: file_kind(file, file_type) for file in files}

    def _read_stream(self, f: Any, path: str) -> Iterator[pa.Table]:
        file_index, file = self._files[path]
        yield from _blocks(self._rows(file_index, file))

    def _rows(self, file_index: int, file: str) -> Iterator[tuple[int, str, str | None, str | None]]:
        number = 0
        try:
            # The file is opened again by the row reader: Parquet needs random access, and text readers
            # re-read the file to name the line of a UTF-8 error.
            for number, (origin, row) in enumerate(read_file(file, self._kinds[file])):
                yield seq_key(self._source_index, file_index, number), origin, _raw_json(row), None
        except DataError as err:
            yield seq_key(self._source_index, file_index, number + 1), file, None, str(err)


def _hf_rows(batch: pa.Table, name: str, source_index: int) -> pa.Table:
    indices = batch.column("__raysft_index").to_numpy()
    rows = batch.drop_columns(["__raysft_index"]).to_pylist()
    return pa.table({
        "seq": pa.array([seq_key(source_index, 0, int(i)) for i in indices], pa.int64()),
        "origin": pa.array([hf_origin(name, int(i)) for i in indices], pa.string()),
        "row": pa.array([_raw_json(row) for row in rows], pa.string()),
        "error": pa.nulls(len(rows), pa.string()),
    })


def source_dataset(source: SourceConfig, source_index: int) -> ray.data.Dataset:
    """The raw rows of one source as a Ray Dataset (at most ``source.limit`` of them), in read order."""
    if source.path is not None:
        files = resolve_files(source.path, source.file_type)
        dataset = ray.data.read_datasource(SourceFilesDatasource(files, source.file_type, source_index),
                                           num_cpus=0, concurrency=min(READ_TASKS_AT_ONCE, len(files)))
    elif source.hf_dataset is not None:
        loaded = load_hf_dataset(source)
        table = (loaded.flatten_indices() if loaded._indices is not None else loaded).data.table
        blocks = [
            table.slice(start, READ_BLOCK_ROWS * 8).append_column(
                "__raysft_index", pa.array(np.arange(start, min(start + READ_BLOCK_ROWS * 8, len(table))), pa.int64()))
            for start in range(0, len(table), READ_BLOCK_ROWS * 8)
        ]
        dataset = ray.data.from_arrow(blocks).map_batches(
            _hf_rows, fn_kwargs={"name": source.hf_dataset, "source_index": source_index}, batch_format="pyarrow",
            batch_size=None)
    else:
        items = [{"seq": seq_key(source_index, 0, i), "origin": f"rows[{i}]", "row": _raw_json(row), "error": None}
                 for i, row in enumerate(source.rows or [])]
        dataset = ray.data.from_arrow(pa.Table.from_pylist(items, schema=RAW_SCHEMA))
    return dataset.limit(source.limit) if source.limit is not None else dataset


def split_dataset(sources: list[SourceConfig]) -> ray.data.Dataset:
    """The raw rows of a split's sources, concatenated in order."""
    datasets = [source_dataset(source, index) for index, source in enumerate(sources)]
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
