"""Parquet tables on a cache location (a local folder, a shared mount, or object storage), trusted only
through the manifest written last.

Ray Data writes a table's files in parallel, wherever its tasks run; the manifest then records the files in
row order, each file's row groups, size and checksum, and whatever summary the writer adds. Readers go by the
manifest only: a folder without one is an interrupted write and is never read (object storage has no atomic
rename, so a manifest written last is what makes a write all-or-nothing, as for checkpoints). Opening a table
checks every file's size and checksum (xxh3-128, about 20 GB/s); a table whose manifest or files do not verify
is named on the console, discarded and reported as absent, so the caller rebuilds it instead of training on
flipped or missing tokens.

Row order: every row carries an int64 ``seq`` key, increasing in the order the rows were read. Ray Data
writes each file from consecutive blocks (``preserve_order``), so files hold disjoint, sorted key ranges;
ordering files by their smallest key (read from the Parquet footers, no data) gives the table's order, the
same on every run whatever the number of tasks. The commit checks that the ranges do not overlap.
"""

from __future__ import annotations

import bisect
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import xxhash
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raysft import storage
from raysft.errors import RunError
from raysft.console import say

MANIFEST = "manifest.json"
# What a write attempt's folder is named (see write_folder): the only folders a discarded entry loses.
_WRITE_FOLDER = re.compile(r"^w-[0-9a-f]{12}$")
_HASH_BLOCK = 8 << 20
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
        """The table committed at `location`, or None when there is none to trust: never written, interrupted,
        or damaged (a file whose size or checksum differs from the manifest's, or an unreadable manifest). A
        damaged entry is named in one console line and discarded, so the caller writes it again."""
        manifest = storage.join(location, MANIFEST)
        if not storage.exists(manifest):
            return None
        try:
            recorded = json.loads(storage.read_bytes(manifest))
            table = cls(location, recorded["files"], recorded["row_groups"], recorded.get("info", {}))
        except (ValueError, KeyError, TypeError):
            problem = f"{manifest} is unreadable (half-written or damaged)"
        else:
            if "checksums" not in recorded:
                problem = f"{manifest} has no checksums (written by an older raysft)"
            else:
                checksums: dict[str, dict[str, Any]] = recorded["checksums"]
                problem = next(filter(None, (_file_problem(location, name, checksums.get(name))
                                             for name in table.files)), None)
            if problem is None:
                return table
        say(f"data cache: {problem}; discarding this cache entry and building it again")
        discard(location)
        return None

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
        """Write the manifest that makes the table readable (last: until then no reader trusts the files), with
        each file's size and checksum as written."""
        checksums = {name: file_checksum(storage.join(self.location, name)) for name in self.files}
        manifest = {"files": self.files, "row_groups": self.row_groups, "info": self.info, "checksums": checksums}
        storage.write_bytes(storage.join(self.location, MANIFEST), json.dumps(manifest).encode())


def file_checksum(location: str) -> dict[str, Any]:
    """The size and xxh3-128 of the file at `location`, read in blocks (memory stays bounded)."""
    fs, path = storage.resolve(location)
    digest, size = xxhash.xxh3_128(), 0
    with fs.open_input_stream(path) as stream:
        while block := stream.read(_HASH_BLOCK):
            digest.update(block)
            size += len(block)
    return {"size": size, "xxh3_128": digest.hexdigest()}


def _file_problem(location: str, name: str, recorded: dict[str, Any] | None) -> str | None:
    """What is wrong with the table file `name` against its manifest entry, or None when it verifies."""
    where = storage.join(location, name)
    if recorded is None:
        return f"{where} has no checksum in its manifest"
    fs, path = storage.resolve(where)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        return f"{where} is missing"
    if info.size != recorded["size"]:
        return f"{where} is {info.size:,} bytes, its manifest says {recorded['size']:,} (truncated or overwritten)"
    if file_checksum(where) != recorded:
        return f"{where} does not match its checksum (its bytes changed since it was written)"
    return None


def discard(location: str) -> None:
    """Remove the cache entry at `location`: its manifest first (from then on nothing trusts the entry), then the
    write folders raysft made in it. Nothing else is touched: the entry lives in a folder the user named."""
    storage.remove(storage.join(location, MANIFEST))
    for name in storage.list_dir(location):
        if _WRITE_FOLDER.match(name):
            storage.remove(storage.join(location, name))


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
