"""Read raw rows from files, Hugging Face datasets and inline lists; load and normalize them.

Each row comes with an origin (``file:LINE``, ``file:row N``, ``hf:NAME[i]``, ``rows[i]``) so
that every later error can say exactly where the bad data is.
"""

from __future__ import annotations

import csv
import glob
import itertools
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from raysft.config import DataConfig, SourceConfig
from raysft.data.formats import detect_format, normalize_row
from raysft.errors import DataError

log = logging.getLogger(__name__)

FILE_TYPES = {".json": "json", ".jsonl": "jsonl", ".parquet": "parquet", ".csv": "csv"}

# Past this many problems the rest are usually the same mistake repeated; stop and report.
MAX_PROBLEMS = 10

_WHITESPACE = re.compile(r"\s*")

# For callers that load sources without a DataConfig: the config's own default, not a second number.
DEFAULT_MAX_ROW_CHARS: int = DataConfig.model_fields["max_row_chars"].default


def read_source(source: SourceConfig) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(origin, raw_row)`` for every row of a source, at most ``source.limit`` of them.

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


def load_examples(sources: list[SourceConfig], max_row_chars: int = DEFAULT_MAX_ROW_CHARS) -> list[dict[str, Any]]:
    """Read, detect the format of, and normalize every source; raise one DataError listing the problems.

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
        more = (
            f"\n(stopped after {MAX_PROBLEMS} problems; fix these and run again)"
            if len(problems) >= MAX_PROBLEMS
            else ""
        )
        raise DataError("\n".join(problems) + more)
    return examples


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


def _read_paths(path: str, file_type: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for file in _resolve_files(path, file_type):
        kind = file_type if file_type != "auto" else FILE_TYPES[file.suffix.lower()]
        reader = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}[kind]
        yielded = False
        try:
            for item in reader(file):
                yielded = True
                yield item
        except UnicodeDecodeError:
            raise _not_utf8(file) from None
        if not yielded:
            raise DataError(f"{file}: the file holds no rows")


def _resolve_files(path: str, file_type: str) -> list[Path]:
    """The files a source path names: a file, every supported file in a folder, or a glob's matches."""
    suffixes = set(FILE_TYPES) if file_type == "auto" else {s for s, t in FILE_TYPES.items() if t == file_type}
    target = Path(path)
    if target.is_file():
        if file_type == "auto" and target.suffix.lower() not in FILE_TYPES:
            raise DataError(
                f"{path}: cannot tell the file type from the extension '{target.suffix}'; "
                f"use one of {', '.join(FILE_TYPES)} or set file_type"
            )
        return [target]
    if target.is_dir():
        files = sorted(p for p in target.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
        what = f"no {'/'.join(sorted(suffixes))} files in the folder"
    elif glob.has_magic(path):
        files = sorted(Path(p) for p in glob.glob(path) if Path(p).is_file() and Path(p).suffix.lower() in suffixes)
        what = f"the pattern matches no {'/'.join(sorted(suffixes))} files"
    else:
        raise DataError(f"{path}: no such file or folder")
    if not files:
        raise DataError(f"{path}: {what}")
    return files


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            origin = f"{path}:{line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{origin}: invalid JSON: {err.msg} (column {err.colno})") from None
            yield origin, _as_object(row, origin)


def _read_json(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    text = path.read_text(encoding="utf-8")
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


def _json_array_items(path: Path, text: str, start: int) -> Iterator[tuple[str, dict[str, Any]]]:
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


def _read_csv(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    # Python's csv refuses cells over 128 KiB by default; a long row is judged by data.max_row_chars instead.
    csv.field_size_limit(2**31 - 1)
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
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


def _read_parquet(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    number = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches():
            for row in batch.to_pylist():
                number += 1
                yield f"{path}:row {number}", row
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file: {err}") from None


def _not_utf8(path: Path) -> DataError:
    """The error for a text file that is not UTF-8, naming the line (and byte) where decoding fails.

    Decoding line by line finds the same first bad byte as decoding the whole file: a newline byte
    never occurs inside a multi-byte UTF-8 sequence.
    """
    with path.open("rb") as handle:
        for line_number, line in enumerate(handle, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                return DataError(
                    f"{path}:{line_number}: not UTF-8 text (byte 0x{line[err.start]:02x} at byte {err.start + 1} "
                    "of the line); save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or point the source "
                    "at the data file if this one is not text"
                )
    return DataError(f"{path}: not UTF-8 text; save the file as UTF-8")


def _read_hf(source: SourceConfig) -> Iterator[tuple[str, dict[str, Any]]]:
    import datasets

    name = source.hf_dataset
    assert name is not None  # read_source dispatches here only when it is set
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
    for index, row in enumerate(loaded):
        yield f"hf:{name}[{index}]", row


def _as_object(row: Any, origin: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DataError(f"{origin}: expected a JSON object (one row), got {type(row).__name__}")
    return row
