"""Where a run's files live: a local or shared (NFS) folder, or object storage (`s3://`, `gs://`, anything
`pyarrow.fs` resolves, the file systems Ray Train itself stores checkpoints with).

Credentials come from the environment the cloud way (instance profile, workload identity, `AWS_*` /
`GOOGLE_APPLICATION_CREDENTIALS`, `AWS_ENDPOINT_URL` for S3-compatible servers); raysft never reads, prints
or stores them. A location is a string: an absolute local path or a URI. Object storage has no rename,
so readers trust only what a manifest written last vouches for (see raysft/training/checkpoint.py).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pyarrow.fs as pafs

from raysft.config import is_uri
from raysft.fileio import write_bytes_atomically


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """The file system and the path inside it. Raises ValueError/OSError for an unknown scheme."""
    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())


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


def local_copy(location: str, names: tuple[str, ...] = ()) -> Path:
    """`location` as a local folder: the folder itself for a path; for a URI a fresh download into raysft's
    cache (only the entries `names` inside it, when given), so `export`/`generate` read runs from storage."""
    if not is_uri(location):
        return Path(location)
    from raysft.config import default_cache_root

    local = default_cache_root() / "downloads" / hashlib.sha256(location.encode()).hexdigest()[:16]
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True)
    for name in names or ("",):
        source = join(location, name) if name else location
        if exists(source):
            download(source, local / name if name else local)
    return local


PROBE_NAME = ".raysft-write-probe"


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
        with fs.open_output_stream(probe) as stream:
            stream.write(b"raysft checks that it may write here\n")
        fs.delete_file(probe)
    except OSError as err:
        return (f"{key}: {location}: cannot write there ({one_line(err)}); check the bucket exists and the "
                "credentials in the environment may write to it")
    return None


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."
