"""Writing files and folders so that a crash never leaves one half-written: write a staging name, rename last."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from raysft.errors import RunError


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Replace `path` with what `write(staging)` writes to a staging name beside it, in one rename (readers see
    the old file or the new one, never a mix). For writers that take a path, e.g. a matplotlib figure's savefig
    (give it the format: the staging name's suffix is not the target's)."""
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(staging)
        os.replace(staging, path)
    except OSError as err:
        staging.unlink(missing_ok=True)
        raise write_error(path, err) from err
    finally:
        staging.unlink(missing_ok=True)


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` in one rename (readers see the old file or the new one, never a mix)."""
    write_atomically(path, lambda staging: staging.write_bytes(data))


def write_text_atomically(path: Path, text: str) -> None:
    """`write_bytes_atomically` for UTF-8 text."""
    write_bytes_atomically(path, text.encode("utf-8"))


def replace_dir_atomically(staging: Path, target: Path) -> None:
    """Put the finished folder `staging` at `target`, replacing the folder there (if any) whole.

    `target` is never a mix of old and new files: both moves are renames within one parent. Between
    the two renames `target` is briefly absent; a crash there leaves the old folder beside it under a
    dot-name, whole. The caller decides that `target` may be replaced; this deletes the old folder.
    """
    if not target.exists():
        os.replace(staging, target)
        return
    old = target.with_name(f".{target.name}.{os.getpid()}.old")
    os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old)


def place_dir_atomically(built: Path, target: Path) -> bool:
    """Put the finished folder `built` at `target` by one rename unless a folder is there already (another process
    built the same thing first: its copy is kept, `built` is left to its caller). True when `built` was placed."""
    try:
        os.rename(built, target)
    except OSError:
        if not target.exists():
            raise
        return False
    return True


def write_error(path: Path, err: BaseException) -> RunError:
    """A RunError naming `path` and what went wrong, ENOSPC spelled out.

    torch.save on a full disk raises a bare `RuntimeError: ... iostream error` with no path and no
    errno: the free space of `path`'s file system tells that case apart.
    """
    code = getattr(err, "errno", None)
    existing = next((p for p in (path, *path.parents) if p.exists()), path)
    if code is None and shutil.disk_usage(existing).free < 1 << 20:
        code = errno.ENOSPC
    if code == errno.ENOSPC:
        reason = "no space left on device (ENOSPC); free some space, or set another folder, then resume"
    elif code is not None:
        reason = f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
    else:
        reason = str(err)
    return RunError(f"writing {path}: {reason}")
