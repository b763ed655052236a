"""Read raw rows from files, Hugging Face datasets and inline lists; load and normalize them.

Each row comes with an origin (``file:LINE``, ``file:row N``, ``hf:NAME[i]``, ``rows[i]``) so
that every later error can say exactly where the bad data is.
"""

from __future__ import annotations

import csv
import fnmatch
import glob
import io
import itertools
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import pyarrow.fs as pafs

from raysft import storage
from raysft.config import DataConfig, SourceConfig, is_uri, uri_scheme
from raysft.data.formats import detect_format, normalize_row, source_name
from raysft.errors import DataError

log = logging.getLogger(__name__)

FILE_TYPES = {".json": "json", ".jsonl": "jsonl", ".parquet": "parquet", ".csv": "csv"}
# Decompressed on the fly by pyarrow's input streams (text formats; Parquet compresses inside the file).
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4")

# Past this many problems the rest are usually the same mistake repeated; stop and report.
MAX_PROBLEMS = 10

_WHITESPACE = re.compile(r"\s*")

# For callers that load sources without a DataConfig: the config's own default, not a second number.
DEFAULT_MAX_ROW_CHARS: int = DataConfig.model_fields["max_row_chars"].default


def read_source(source: SourceConfig) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(origin, raw_row)`` for every row of a source, at most ``source.limit`` of them, in this process.

    The Ray Data path (raysft/data/read.py) reads the same files with the same row readers, in parallel.

    Example:
        >>> list(read_source(SourceConfig(rows=[{"text": "hi"}])))
        [('rows[0]', {'text': 'hi'})]
    """
    if source.path is not None:
        rows = _read_paths(source.path, source.file_type)
    elif source.hf_dataset is not None:
        rows = _read_hf(source)
    else:
        rows = _read_inline(source.rows or [])
    return itertools.islice(rows, source.limit)


def source_format(source: SourceConfig) -> str:
    """A source's format: as configured, or detected from its first row (read here, in the driver).

    A source has one format; later rows that do not fit it are reported as the data problems they are.
    """
    if source.format != "auto":
        return source.format
    for origin, row in read_source(source):
        return detect_format(row, source, origin)
    raise DataError(f"{source_name(source)}: the source holds no rows")


def load_examples(sources: list[SourceConfig], max_row_chars: int = DEFAULT_MAX_ROW_CHARS) -> list[dict[str, Any]]:
    """Read, detect the format of, and normalize every source in this process; raise one DataError listing
    the problems. (Training reads through Ray Data instead; this is the same reading for small jobs and tests.)

    Rows with more than `max_row_chars` characters of text are invalid rows, like any other bad row.

    Example:
        >>> load_examples([SourceConfig(rows=[{"prompt": "Hi", "response": "Hello"}])])[0]["messages"][1]
        {'role': 'assistant', 'content': 'Hello'}
    """
    examples: list[dict[str, Any]] = []
    problems: list[str] = []
    for source in sources:
        _load_source(source, max_row_chars, examples, problems)
        if len(problems) >= MAX_PROBLEMS:
            break
    if problems:
        raise DataError(problem_report(problems, stopped=len(problems) >= MAX_PROBLEMS))
    return examples


def problem_report(problems: list[str], stopped: bool) -> str:
    """The text of a DataError listing bad rows: one per line, and a hint when the list was cut short."""
    more = f"\n(stopped after {MAX_PROBLEMS} problems; fix these and run again)" if stopped else ""
    return "\n".join(problems[:MAX_PROBLEMS]) + more


def _load_source(
    source: SourceConfig, max_row_chars: int, examples: list[dict[str, Any]], problems: list[str]
) -> None:
    """Append one source's normalized rows to `examples` and its problems to `problems`."""
    fmt: str | None = None if source.format == "auto" else source.format
    try:
        for origin, row in read_source(source):
            if fmt is None:
                # Detected once, from the first row: a source has one format, and later rows that
                # don't fit it are reported as the data problems they are.
                fmt = detect_format(row, source, origin)
            try:
                examples.append(normalize_row(row, fmt, source, origin, max_row_chars))
            except DataError as err:
                if source.invalid_rows == "skip":
                    log.warning("skipping invalid row: %s", err)
                    continue
                problems.append(str(err))
                if len(problems) >= MAX_PROBLEMS:
                    return
    except DataError as err:
        # Unreadable input or an undetectable format: the rest of this source can't be trusted.
        problems.append(str(err))


def _read_inline(rows: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    if not rows:
        raise DataError("rows: no rows given")
    for index, row in enumerate(rows):
        yield f"rows[{index}]", row


def file_kind(file: str, file_type: str) -> str:
    """The reader a file needs: `file_type`, or the extension's (under a compression suffix, e.g. `.jsonl.gz`)."""
    if file_type != "auto":
        return file_type
    name = file.lower()
    for compression in COMPRESSION_SUFFIXES:
        name = name.removesuffix(compression)
    return FILE_TYPES[PurePosixPath(name).suffix]


def read_file(file: str, kind: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every row of one local or object-storage file (compressed files are decompressed on the fly)."""
    fs, path = storage.resolve(file)
    if kind == "parquet":  # needs random access to its footer
        with fs.open_input_file(path) as handle:
            yield from read_stream(handle, file, kind)
        return
    with fs.open_input_stream(path) as handle:
        yield from read_stream(handle, file, kind)


def read_stream(handle: BinaryIO, file: str, kind: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every row of an open file, with its origin; a file without rows or not UTF-8 is a DataError."""
    reader = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}[kind]
    yielded = False
    try:
        for item in reader(handle, file):
            yielded = True
            yield item
    except UnicodeDecodeError:
        raise _not_utf8(file) from None
    if not yielded:
        raise DataError(f"{file}: the file holds no rows")


def _read_paths(path: str, file_type: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for file in resolve_files(path, file_type):
        yield from read_file(file, file_kind(file, file_type))


def _suffixes(file_type: str) -> set[str]:
    return set(FILE_TYPES) if file_type == "auto" else {s for s, t in FILE_TYPES.items() if t == file_type}


def _readable(name: str, suffixes: set[str]) -> bool:
    lowered = name.lower()
    for compression in COMPRESSION_SUFFIXES:
        lowered = lowered.removesuffix(compression)
    return PurePosixPath(lowered).suffix in suffixes


def resolve_files(path: str, file_type: str) -> list[str]:
    """The files a source path names, sorted: a file, every supported file in a folder, or a glob's matches.
    Local paths and object-storage URIs (`s3://bucket/prefix/`, `gs://bucket/data/*.jsonl`) alike."""
    suffixes = _suffixes(file_type)
    if is_uri(path):
        return _resolve_remote(path, file_type, suffixes)
    target = Path(path)
    if target.is_file():
        if file_type == "auto" and not _readable(target.name, set(FILE_TYPES)):
            raise DataError(
                f"{path}: cannot tell the file type from the extension '{target.suffix}'; "
                f"use one of {', '.join(FILE_TYPES)} or set file_type"
            )
        return [str(target)]
    if target.is_dir():
        files = sorted(str(p) for p in target.iterdir() if p.is_file() and _readable(p.name, suffixes))
        what = f"no {'/'.join(sorted(suffixes))} files in the folder"
    elif glob.has_magic(path):
        files = sorted(p for p in glob.glob(path) if Path(p).is_file() and _readable(p, suffixes))
        what = f"the pattern matches no {'/'.join(sorted(suffixes))} files"
    else:
        raise DataError(f"{path}: no such file or folder")
    if not files:
        raise DataError(f"{path}: {what}")
    return files


def _resolve_remote(uri: str, file_type: str, suffixes: set[str]) -> list[str]:
    scheme = uri_scheme(uri)
    pattern = uri if glob.has_magic(uri) else None
    listed = uri[: uri.index("*")].rsplit("/", 1)[0] if pattern else uri.rstrip("/")
    try:
        fs, path = storage.resolve(listed)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File and pattern is None:
            if file_type == "auto" and not _readable(path, set(FILE_TYPES)):
                raise DataError(f"{uri}: cannot tell the file type from the extension; set file_type")
            return [uri]
        if info.type != pafs.FileType.Directory:
            raise DataError(f"{uri}: no such object or prefix")
        entries = fs.get_file_info(pafs.FileSelector(path, recursive=pattern is not None))
    except (OSError, ValueError) as err:
        raise DataError(f"{uri}: cannot list it ({storage.one_line(err)}); check the URI and the credentials "
                        "in the environment") from None
    files = sorted(scheme + e.path for e in entries if e.type == pafs.FileType.File and _readable(e.path, suffixes))
    if pattern is not None:
        files = [f for f in files if fnmatch.fnmatchcase(f, pattern)]
    if not files:
        raise DataError(f"{uri}: no {'/'.join(sorted(suffixes))} files there")
    return files


def _read_jsonl(handle: BinaryIO, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    with io.TextIOWrapper(handle, encoding="utf-8") as text:
        for line_number, line in enumerate(text, 1):
            if not line.strip():
                continue
            origin = f"{path}:{line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{origin}: invalid JSON: {err.msg} (column {err.colno})") from None
            yield origin, _as_object(row, origin)


def _read_json(handle: BinaryIO, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    text = handle.read().decode("utf-8")
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    try:
        start = _WHITESPACE.match(text).end()  # type: ignore[union-attr]  # \s* always matches
        if text.startswith("[", start):
            yield from _json_array_items(path, text, start)
            return
        document = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
    lists = [key for key, value in document.items() if isinstance(value, list)] if isinstance(document, dict) else []
    if len(lists) != 1:
        raise DataError(
            f"{path}: expected a JSON array of row objects, or an object holding exactly one list of them "
            f"(got {type(document).__name__}{' with list keys ' + str(lists) if lists else ''})"
        )
    for index, row in enumerate(document[lists[0]]):
        origin = f"{path}:{lists[0]}[{index}]"
        yield origin, _as_object(row, origin)


def _json_array_items(path: str, text: str, start: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """Decode a top-level JSON array item by item, so each row's origin can name its line."""
    decoder = json.JSONDecoder()
    position, line, counted_to = start + 1, 1, 0
    for index in itertools.count():
        position = _WHITESPACE.match(text, position).end()  # type: ignore[union-attr]
        if text.startswith("]", position):
            break
        if index > 0:
            if not text.startswith(",", position):
                raise json.JSONDecodeError("expected ',' or ']' between array items", text, position)
            position = _WHITESPACE.match(text, position + 1).end()  # type: ignore[union-attr]
        row, end = decoder.raw_decode(text, position)
        line += text.count("\n", counted_to, position)
        counted_to = position
        origin = f"{path}:{line} [{index}]"
        yield origin, _as_object(row, origin)
        position = end
    if text[position + 1 :].strip():
        raise json.JSONDecodeError("extra data after the array", text, position + 1)


def _read_csv(handle: BinaryIO, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    # Python's csv refuses cells over 128 KiB by default; a long row is judged by data.max_row_chars instead.
    csv.field_size_limit(2**31 - 1)
    with io.TextIOWrapper(handle, encoding="utf-8", newline="") as text:
        reader = csv.DictReader(text)
        next_line = 2  # the header is line 1
        try:
            for row in reader:
                # A quoted cell may span lines; report the line the record starts on.
                origin, next_line = f"{path}:{next_line}", reader.line_num + 1
                if None in row:
                    raise DataError(f"{origin}: the row has more cells than the header has columns")
                yield origin, row
        except csv.Error as err:
            raise DataError(f"{path}:{reader.line_num}: not readable as CSV: {err}") from None


def _read_parquet(handle: BinaryIO, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    number = 0
    try:
        for batch in pq.ParquetFile(handle).iter_batches():
            for row in batch.to_pylist():
                number += 1
                yield f"{path}:row {number}", row
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file: {err}") from None


def _not_utf8(path: str) -> DataError:
    """The error for a text file that is not UTF-8, naming the line (and byte) where decoding fails.

    Decoding line by line finds the same first bad byte as decoding the whole file: a newline byte
    never occurs inside a multi-byte UTF-8 sequence.
    """
    fs, location = storage.resolve(path)
    with fs.open_input_stream(location) as handle:
        for line_number, line in enumerate(io.BufferedReader(handle), 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                return DataError(
                    f"{path}:{line_number}: not UTF-8 text (byte 0x{line[err.start]:02x} at byte {err.start + 1} "
                    "of the line); save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or point the source "
                    "at the data file if this one is not text"
                )
    return DataError(f"{path}: not UTF-8 text; save the file as UTF-8")


def load_hf_dataset(source: SourceConfig) -> Any:
    """The `datasets.Dataset` of an `hf_dataset` source (memory-mapped Arrow: reading it holds no rows in RAM)."""
    import datasets

    name = source.hf_dataset
    assert name is not None  # callers dispatch here only when it is set
    if Path(name).is_dir():
        loaded = datasets.load_from_disk(name)
        if isinstance(loaded, datasets.DatasetDict):
            if source.split not in loaded:
                raise DataError(f"hf:{name}: no split '{source.split}' (splits: {', '.join(loaded)})")
            loaded = loaded[source.split]
    else:
        loaded = datasets.load_dataset(name, source.hf_config, split=source.split)
    if len(loaded) == 0:
        raise DataError(f"hf:{name}: split '{source.split}' holds no rows")
    return loaded


def hf_origin(name: str, index: int) -> str:
    return f"hf:{name}[{index}]"


def _read_hf(source: SourceConfig) -> Iterator[tuple[str, dict[str, Any]]]:
    for index, row in enumerate(load_hf_dataset(source)):
        yield hf_origin(str(source.hf_dataset), index), row


def fingerprint_source(source: SourceConfig, digest: Any) -> None:
    """Feed what identifies a source's rows into `digest`: its options, and for files their names, sizes and
    modification times (stat calls only, so a warm run over terabytes on object storage reads no data; a
    rewritten file changes size or time). Inline rows are hashed whole; hub datasets by their fingerprint."""
    digest.update(json.dumps(source.model_dump(exclude={"rows"}), sort_keys=True).encode())
    if source.rows is not None:
        digest.update(json.dumps(source.rows, sort_keys=True, default=str).encode())
    elif source.path is not None:
        for file in resolve_files(source.path, source.file_type):
            fs, path = storage.resolve(file)
            info = fs.get_file_info(path)
            digest.update(f"{file}|{info.size}|{info.mtime_ns}".encode())
    elif source.hf_dataset is not None and Path(source.hf_dataset).is_dir():
        for file in sorted(p for p in Path(source.hf_dataset).rglob("*") if p.is_file()):
            stat = file.stat()
            digest.update(f"{file}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    else:
        digest.update(str(getattr(load_hf_dataset(source), "_fingerprint", "")).encode())


def _as_object(row: Any, origin: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DataError(f"{origin}: expected a JSON object (one row), got {type(row).__name__}")
    return row
