"""Where a run's files live: a local or shared (NFS) folder, or object storage (`s3://`, `gs://`, anything
`pyarrow.fs` resolves, the file systems Ray Train itself stores checkpoints with).

Credentials come from the environment the cloud way (instance profile, workload identity, `AWS_*` /
`GOOGLE_APPLICATION_CREDENTIALS`, `AWS_ENDPOINT_URL` for S3-compatible servers); raysft never reads, prints
or stores them. A location is a string: an absolute local path or a URI. Object storage has no rename,
so readers trust only what a manifest written last vouches for (see raysft/training/checkpoint.py).

Object storage goes away now and then (a restart, a network cut, throttling): every request to it is retried
on transient errors (connection refused/reset, timeouts, 5xx, SlowDown) with exponential backoff, for up to
RAYSFT_STORAGE_RETRY_S seconds in all. The file systems' own retry machinery does it (the AWS SDK's retry
strategy for S3, the GCS client's time limit), so each request is retried where it failed, a part of a
multipart upload included; an error it deems permanent (access denied, no such bucket) is raised at once.
Ray Train stores checkpoints through the same file system (see raysft/training/trainer.py).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from raysft.config import absolute_path, is_uri
from raysft.errors import RunError
from raysft.fileio import write_bytes_atomically

RETRY_ENV = "RAYSFT_STORAGE_RETRY_S"
DEFAULT_RETRY_S = 300.0
# The AWS SDK's default retry strategy waits 25 ms x 2^k before retry k: 50 ms, 100 ms, ... doubling, no cap.
_AWS_FIRST_WAIT_S = 0.025
# What the AWS SDK (and GCS client) report for an error they retry; after the retries ran out, such an error
# means storage that did not answer, not a request it refused.
_TRANSIENT_MARKERS = ("NETWORK_CONNECTION", "SLOW_DOWN", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE",
                      "REQUEST_TIMEOUT", "THROTTLING", "Could not connect", "Connection refused",
                      "Connection reset", "timed out", "Timeout was reached", "Unavailable", "DeadlineExceeded")


_budget_override: float | None = None


@contextlib.contextmanager
def retry_budget(seconds: float) -> Iterator[None]:
    """Within the block, this process's storage requests are retried for up to `seconds` (0: tried once)."""
    global _budget_override
    saved, _budget_override = _budget_override, seconds
    try:
        yield
    finally:
        _budget_override = saved


def retry_budget_s() -> float:
    """How long a storage request is retried in all: RAYSFT_STORAGE_RETRY_S seconds (default 300)."""
    if _budget_override is not None:
        return _budget_override
    text = os.environ.get(RETRY_ENV, "").strip()
    if not text:
        return DEFAULT_RETRY_S
    try:
        budget = float(text)
    except ValueError:
        budget = -1.0
    if not budget >= 0:
        raise RunError(f"{RETRY_ENV}={text!r}: expected seconds (a number >= 0), e.g. {RETRY_ENV}=300")
    return budget


def s3_attempts(budget_s: float) -> int:
    """The most attempts of one S3 request whose backoff waits add up to at most `budget_s` (at least one).

    Example:
        >>> s3_attempts(300), s3_attempts(1), s3_attempts(0)  # 205 s, 0.75 s and no wait in all
        (13, 5, 1)
    """
    attempts = 1
    while _AWS_FIRST_WAIT_S * (2 ** (attempts + 1) - 2) <= budget_s:
        attempts += 1
    return attempts


def _rebuild_s3(attempts: int, options: dict[str, Any]) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(attempts, **options)


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 file system with the AWS SDK's default retry strategy for `attempts` attempts per request.

    pyarrow leaves the retry strategy out of what it pickles; this keeps it, so Ray Train's controller and
    workers, which get the file system pickled, retry as the driver does.
    """

    def __init__(self, attempts: int, **options: Any):
        super().__init__(retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=attempts), **options)
        self.attempts = attempts

    def __reduce__(self) -> tuple[Any, tuple[int, dict[str, Any]]]:
        _, (options,) = pafs.S3FileSystem.__reduce__(self)
        return _rebuild_s3, (self.attempts, options)


def retrying(fs: pafs.FileSystem) -> pafs.FileSystem:
    """`fs` with its requests retried on transient errors for up to :func:`retry_budget_s` (S3 and GCS; other
    file systems as they are)."""
    budget = retry_budget_s()
    if isinstance(fs, pafs.S3FileSystem):
        _, (options,) = pafs.S3FileSystem.__reduce__(fs)
        return RetryingS3FileSystem(s3_attempts(budget), **options)
    if isinstance(fs, pafs.GcsFileSystem):
        _, (options,) = pafs.GcsFileSystem.__reduce__(fs)
        return pafs.GcsFileSystem(**{**options, "retry_time_limit": datetime.timedelta(seconds=budget)})
    return fs


def is_transient(err: BaseException) -> bool:
    """Whether `err` is object storage that did not answer (as opposed to a request it refused)."""
    return isinstance(err, OSError) and is_transient_text(str(err))


def is_transient_text(text: str) -> bool:
    """Whether an error's text says object storage did not answer."""
    return any(marker in text for marker in _TRANSIENT_MARKERS)


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """The file system and the path inside it; object storage retries transient errors. Raises
    ValueError/OSError for an unknown scheme."""
    if is_uri(location):
        fs, path = pafs.FileSystem.from_uri(location)
        return retrying(fs), path
    return pafs.LocalFileSystem(), str(absolute_path(location))


def join(location: str, *parts: str) -> str:
    return "/".join([location.rstrip("/"), *parts]) if is_uri(location) else str(Path(location, *parts))


def exists(location: str) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(location: str) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def list_dir(location: str) -> list[str]:
    """Names directly inside `location` ([] when there is nothing)."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return sorted(info.base_name for info in fs.get_file_info(pafs.FileSelector(path)))


def read_bytes(location: str) -> bytes:
    fs, path = resolve(location)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(location: str, data: bytes) -> None:
    """Write one file whole (object stores make a new object visible only once it is complete)."""
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomically(Path(path), data)
        return
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def upload(local: Path, location: str) -> None:
    """Copy the folder or file `local` to `location` (files already there with other names are kept)."""
    fs, path = resolve(location)
    if local.is_dir():
        fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download(location: str, local: Path) -> None:
    """Copy the folder or file at `location` to `local`."""
    fs, path = resolve(location)
    local.parent.mkdir(parents=True, exist_ok=True)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        # copy_files writes files only; the folders they go into must exist first.
        local.mkdir(exist_ok=True)
        for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
            if info.type == pafs.FileType.Directory:
                (local / info.path[len(path.rstrip("/")) + 1 :]).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def remove(location: str) -> None:
    fs, path = resolve(location)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        if isinstance(fs, pafs.LocalFileSystem):
            shutil.rmtree(path, ignore_errors=True)
        else:
            fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)


PROBE_NAME = ".raysft-write-probe"
# Before a run starts, storage that does not answer is more often a wrong endpoint than an outage: the probe
# waits this long at most, not the whole retry budget, before saying so.
PROBE_RETRY_S = 10.0


def storage_problem(location: str, key: str) -> str | None:
    """Why `location` cannot hold a run (unknown scheme, no bucket, no credentials, read-only), or None.

    Object storage is tried for real, with a small probe object written and deleted: only a write shows
    a missing bucket or missing permissions. Local folders are judged without writing (preflight).
    """
    try:
        fs, path = resolve(location)
    except (ValueError, OSError) as err:
        return f"{key}: {location}: not a storage location raysft can use ({one_line(err)})"
    if isinstance(fs, pafs.LocalFileSystem):
        return None
    probe = f"{path.rstrip('/')}/{PROBE_NAME}"
    try:
        with retry_budget(min(retry_budget_s(), PROBE_RETRY_S)):
            fs = retrying(fs)
            with fs.open_output_stream(probe) as stream:
                stream.write(b"raysft checks that it may write here\n")
            fs.delete_file(probe)
    except OSError as err:
        if is_transient(err):
            return (f"{key}: {location}: the storage did not answer within {PROBE_RETRY_S:g} s ({one_line(err)}); "
                    "check the endpoint (AWS_ENDPOINT_URL) and the network, or run again once it is back")
        return (f"{key}: {location}: cannot write there ({one_line(err)}); check the bucket exists and the "
                "credentials in the environment may write to it")
    return None


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."
