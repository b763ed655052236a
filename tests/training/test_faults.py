"""Faults a real run meets (slow tier): a disk that fills up.

(Also covered elsewhere: the driver SIGKILLed mid-run and resumed by a fresh one, with its checkpoints in a bucket,
tests/test_storage.py; a worker killed mid-run, tests/training/test_train.py; a torn checkpoint, the same file;
a torn metrics line and a half-written checkpoint folder, tests/test_bad_inputs.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.runs import REPO, tiny_config

pytestmark = pytest.mark.slow


def write_config(tmp_path: Path, model_dir: Path, out: Path, overrides: list[str]) -> Path:
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(tiny_config(model_dir, out, overrides).model_dump(mode="json")))
    return path


def raysft_command(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "raysft", *map(str, args)]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a disk that fills up within the run."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def test_full_disk_is_named_and_leaves_no_staging(tiny_model_dir: Path, tmp_path: Path, small_disk: Path) -> None:
    # Room for the run's config and first metrics, not for a checkpoint (adapter + optimizer state).
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (2 * 2**20 - 48 * 2**10))
    out = small_disk / "run"
    cfg = write_config(tmp_path, tiny_model_dir, out, ["train.checkpoint_every=1", "lora.r=64", "scaling.num_workers=1"])
    # A process of its own, with its own Ray: this slow tier also runs tests that start Ray in subprocesses,
    # and two Ray instances in one test process's view confuse Ray Train's placement-group cleanup.
    done = subprocess.run(raysft_command("train", cfg), cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RAY_ADDRESS": "local"})
    assert done.returncode == 2, done.stderr[-3000:]
    # raysft's own message (Ray's worker logs above it may hold the worker's traceback, as Ray prints them).
    message = next(line for line in done.stderr.splitlines() if line.startswith("raysft: "))
    assert "ENOSPC" in message and str(small_disk) in message, message
    assert not [p for p in out.rglob("*") if p.name.startswith(".staging")]
    assert filler.exists()  # the user's file is untouched
