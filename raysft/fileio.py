"""Writing files so that a crash never leaves one half-written: write a staging name, rename last."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` in one rename (readers see the old file or the new one, never a mix)."""
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_text(text)
    os.replace(staging, path)
