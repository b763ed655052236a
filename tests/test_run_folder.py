"""The run and sweep folders (raysft/run_folder.py): the one copy between object storage and a local home, in both
directions, and the local copy `export`, `generate` and `report` read a run or sweep in a bucket from.

(What a fresh run refuses and a resume records is checked on real runs in tests/test_bad_inputs.py; the rule of
what a resume may change in tests/config/test_rules.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from raysft import storage
from raysft.config import default_cache_root
from raysft.errors import ConfigError
from raysft.run_folder import (
    CONFIG_FILE,
    FINAL_DIR,
    METRICS_FILE,
    RESULT_FILES,
    copy_entries,
    is_step_dir,
    local_copy,
    run_files_in,
    step_dir_name,
)
from tests.s3server import BUCKET


@pytest.fixture
def s3_here(s3: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("RAYSFT_CACHE", str(tmp_path / "cache"))  # where local_copy downloads
    return s3


def test_results_go_home_and_rank0_files_go_up_one_entry_at_a_time(s3_here: dict[str, str], tmp_path: Path) -> None:
    run = f"s3://{BUCKET}/runs/a"
    working = tmp_path / "node"
    (working / FINAL_DIR).mkdir(parents=True)
    (working / FINAL_DIR / "adapter.safetensors").write_bytes(b"new")
    (working / METRICS_FILE).write_text('{"step": 1}\n')
    # What the source lacks (config.yaml here) is no error: only what is there is copied.
    assert copy_entries(working, run, (CONFIG_FILE, METRICS_FILE, FINAL_DIR)) == [METRICS_FILE, FINAL_DIR]

    home = tmp_path / "home"
    (home / FINAL_DIR).mkdir(parents=True)
    (home / FINAL_DIR / "stale.bin").write_bytes(b"old")  # an earlier copy: replaced whole, not merged
    assert copy_entries(run, home, RESULT_FILES) == [METRICS_FILE, FINAL_DIR]
    assert sorted(p.name for p in (home / FINAL_DIR).iterdir()) == ["adapter.safetensors"]
    assert (home / METRICS_FILE).read_text() == '{"step": 1}\n'
    assert copy_entries(home, home, RESULT_FILES) == []  # a run stored at home: nothing to copy onto itself


def test_local_copy_of_a_run_in_a_bucket_holds_only_what_was_asked(s3_here: dict[str, str], tmp_path: Path) -> None:
    run = f"s3://{BUCKET}/runs/b"
    storage.write_bytes(storage.join(run, CONFIG_FILE), b"model: {}\n")
    storage.write_bytes(storage.join(run, "checkpoints", step_dir_name(4), "x"), b"big")
    local = local_copy(run, "run_dir", (CONFIG_FILE, FINAL_DIR))
    assert local.is_relative_to(default_cache_root()) and sorted(p.name for p in local.iterdir()) == [CONFIG_FILE]
    assert local_copy(str(tmp_path), "run_dir") == tmp_path  # a path is read where it is
    with pytest.raises(ConfigError, match=rf"run_dir: s3://{BUCKET}/runs/none does not exist"):
        local_copy(f"s3://{BUCKET}/runs/none", "run_dir")


def test_checkpoint_folders_are_named_by_step() -> None:
    assert step_dir_name(40) == "step_000040" and is_step_dir("step_000040") and is_step_dir("step_1234567")
    assert not any(is_step_dir(name) for name in ("step_40", "damaged_step_000040", ".staging_step_000040"))


def test_run_files_in_names_what_a_run_left_in_a_folder_or_a_bucket(s3_here: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("the user's own")  # not a run's file: no reason to refuse the folder
    assert run_files_in(str(tmp_path)) == [] and run_files_in(str(tmp_path / "missing")) == []
    (tmp_path / METRICS_FILE).write_text('{"step": 1}\n')
    (tmp_path / FINAL_DIR).mkdir()
    assert run_files_in(str(tmp_path)) == [METRICS_FILE, FINAL_DIR]
    run = f"s3://{BUCKET}/runs/c"
    storage.write_bytes(storage.join(run, CONFIG_FILE), b"model: {}\n")
    assert run_files_in(run) == [CONFIG_FILE]
