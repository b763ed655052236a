"""Parquet tables on a cache location (a local folder, a shared mount, or object storage), trusted only
through the manifest written last.

Ray Data writes a table's files in parallel, wherever its tasks run; the manifest then records the files in
row order, each file's row groups and whatever summary the writer adds. Readers go by the manifest only: a
folder without one is an interrupted write and is never read (object storage has no atomic rename, so a
manifest written last is what makes a write all-or-nothing, as for checkpoints).

Row order: every row carries an int64 ``seq`` key, increasing in the order the rows were read. Ray Data
writes each file from consecutive blocks (``preserve_order``), so files hold disjoint, sorted key ranges;
ordering files by their smallest key (read from the Parquet footers, no data) gives the table's order, the
same on every run whatever the number of tasks. The commit checks that the ranges do not overlap.
"""

from __future__ import annotations

import bisect
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raysft import storage
from raysft.errors import RunError

MANIFEST = "manifest.json"
KEY_COLUMN = "seq"
# A raw row's key: source << 56 | file << 36 | row, so 255 sources, a million files each, 68 billion rows per file.
_SOURCE_SHIFT, _FILE_SHIFT = 56, 36


def seq_key(source_index: int, file_index: int, row_number: int) -> int:
    """The key of row `row_number` of file `file_index` of source `source_index`: increasing in read order."""
    return (source_index << _SOURCE_SHIFT) | (file_index << _FILE_SHIFT) | row_number


def source_of(seq: np.ndarray) -> np.ndarray:
    """The source index of each raw row's key."""
    return np.asarray(seq, dtype=np.int64) >> _SOURCE_SHIFT


@dataclass
class CachedTable:
    """A committed Parquet table: its files in row order and their row groups, read by global row index.

    Example:
        >>> table = CachedTable.open("/cache/packed/3f2a...")  # doctest: +SKIP
        >>> table.num_rows, table.read(0, 2, ["input_ids"]).num_rows  # doctest: +SKIP
        (1517, 2)
    """

    location: str
    files: list[str]
    row_groups: list[list[int]]
    info: dict[str, Any] = field(default_factory=dict)
    _starts: list[int] = field(init=False, repr=False)
    _groups: list[tuple[int, int]] = field(init=False, repr=False)
    _open: dict[int, pq.ParquetFile] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        # One entry per row group of the whole table: where it starts, and (file index, group index).
        self._starts, self._groups, start = [], [], 0
        for file_index, groups in enumerate(self.row_groups):
            for group_index, rows in enumerate(groups):
                self._starts.append(start)
                self._groups.append((file_index, group_index))
                start += rows
        self._starts.append(start)

    @property
    def num_rows(self) -> int:
        return self._starts[-1]

    @classmethod
    def open(cls, location: str) -> CachedTable | None:
        """The table committed at `location`, or None when there is none (never written, or interrupted)."""
        manifest = storage.join(location, MANIFEST)
        if not storage.exists(manifest):
            return None
        recorded = json.loads(storage.read_bytes(manifest))
        return cls(location, recorded["files"], recorded["row_groups"], recorded.get("info", {}))

    def __getstate__(self) -> dict[str, Any]:
        # Open Parquet handles stay in their process; a copy sent to a Ray task reopens what it reads.
        return {"location": self.location, "files": self.files, "row_groups": self.row_groups, "info": self.info}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def _file(self, index: int) -> pq.ParquetFile:
        if index not in self._open:
            fs, path = storage.resolve(storage.join(self.location, self.files[index]))
            self._open[index] = pq.ParquetFile(fs.open_input_file(path))
        return self._open[index]

    def read(self, start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
        """Rows [start, stop) in table order; only the row groups that hold them are read."""
        stop = min(stop, self.num_rows)
        if start >= stop:
            return self._file(0).schema_arrow.empty_table().select(columns) if columns else pa.table({})
        first = bisect.bisect_right(self._starts, start) - 1
        pieces, position = [], first
        while self._starts[position] < stop:
            file_index, group_index = self._groups[position]
            pieces.append(self._file(file_index).read_row_group(group_index, columns=columns))
            position += 1
        table = pa.concat_tables(pieces) if len(pieces) > 1 else pieces[0]
        return table.slice(start - self._starts[first], stop - start)

    def iter_groups(self, columns: list[str]) -> Iterator[pa.Table]:
        """Every row group in order, `columns` only: a pass over a column or two holds one group at a time."""
        for file_index, group_index in self._groups:
            yield self._file(file_index).read_row_group(group_index, columns=columns)

    def close(self) -> None:
        self._open.clear()

    def commit(self) -> None:
        """Write the manifest that makes the table readable (last: until then no reader trusts the files)."""
        manifest = {"files": self.files, "row_groups": self.row_groups, "info": self.info}
        storage.write_bytes(storage.join(self.location, MANIFEST), json.dumps(manifest).encode())


def list_arrays(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A list<int> column as (flat values, offsets from 0): row i is ``values[offsets[i]:offsets[i + 1]]``."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = array.offsets.to_numpy()
    return array.flatten().to_numpy(), offsets - offsets[0]


def index_written(location: str, folder: str) -> CachedTable:
    """The table Ray Data just wrote into `folder` (inside `location`), its files in row order; not yet
    committed (see :meth:`CachedTable.commit`)."""
    fs, root = storage.resolve(location)
    _, written_root = storage.resolve(folder)
    entries = fs.get_file_info(pafs.FileSelector(written_root, recursive=True, allow_not_found=True))
    ranges = []
    for entry in entries:
        if entry.type != pafs.FileType.File or not entry.path.endswith(".parquet"):
            continue
        metadata = pq.ParquetFile(fs.open_input_file(entry.path)).metadata
        groups = [metadata.row_group(i) for i in range(metadata.num_row_groups) if metadata.row_group(i).num_rows]
        if not groups:
            continue
        key = metadata.schema.to_arrow_schema().get_field_index(KEY_COLUMN)
        low = min(g.column(key).statistics.min for g in groups)
        high = max(g.column(key).statistics.max for g in groups)
        ranges.append((low, high, entry.path[len(root.rstrip("/")) + 1 :], [g.num_rows for g in groups]))
    ranges.sort()
    for before, after in zip(ranges, ranges[1:]):
        if after[0] <= before[1]:
            raise RunError(f"{location}: the written files' key ranges overlap ({before[2]}, {after[2]}); "
                           "the table's row order cannot be trusted; delete the folder and run again")
    return CachedTable(location, [r[2] for r in ranges], [r[3] for r in ranges])


def write_folder(location: str) -> str:
    """A new folder inside `location` for one write attempt. Attempts never share files, so concurrent writers
    of the same table (two sweep trials) cannot mix rows; the manifest names the folder that won."""
    return storage.join(location, f"w-{uuid.uuid4().hex[:12]}")
