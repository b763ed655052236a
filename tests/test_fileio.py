"""Atomic writes (raysft/fileio.py), every one of raysft's: a reader sees the old file or folder or the new one,
never a mix, and a write that fails leaves the old one and no staging file behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from raysft.errors import RunError
from raysft.fileio import place_dir_atomically, replace_dir_atomically, write_atomically, write_bytes_atomically


def test_a_failed_write_leaves_the_old_file_and_no_staging(tmp_path: Path) -> None:
    target = tmp_path / "report.png"
    write_bytes_atomically(target, b"old")

    def half_then_fail(staging: Path) -> None:
        staging.write_bytes(b"ha")
        raise OSError(28, "No space left on device")

    with pytest.raises(RunError, match=r"writing .*report.png: no space left on device"):
        write_atomically(target, half_then_fail)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["report.png"]
    write_atomically(target, lambda staging: staging.write_bytes(b"new"))  # a writer that takes a path
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["report.png"]


def test_folders_are_replaced_whole_or_kept_when_another_writer_was_first(tmp_path: Path) -> None:
    def built(name: str, files: dict[str, str]) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for file, text in files.items():
            (folder / file).write_text(text)
        return folder

    target = tmp_path / "model"
    assert place_dir_atomically(built("first", {"a": "1"}), target)
    assert not place_dir_atomically(built("second", {"b": "2"}), target)  # the first one's folder is kept
    assert sorted(p.name for p in target.iterdir()) == ["a"] and (tmp_path / "second").is_dir()
    replace_dir_atomically(built("third", {"c": "3"}), target)  # replaced whole: nothing of the old one stays
    assert sorted(p.name for p in target.iterdir()) == ["c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "second"]
