"""Checkpoint folders on a local path, without a Ray session (raysft.training.checkpoint): what is trusted,
what is kept, what is resumed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from raysft.errors import RunError
from raysft.run_folder import RAY_SNAPSHOT, STAGING_PREFIX, step_dir_name
from raysft.training.checkpoint import (
    MANIFEST,
    checkpoint_names,
    checkpoints_to_prune,
    find_resumable,
    load_checkpoint,
    persist_checkpoint,
    prune_extra_checkpoints,
    remove_staging,
    set_aside,
    verify,
    write_checkpoint,
)


def write(folder: Path, step: int, score: float | None = None, **state_extra: object) -> Path:
    """A real checkpoint of a one-layer model after one optimizer step, written by rank 0's writer (`state_extra`:
    more of its state.json)."""
    torch.manual_seed(step)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    folder.mkdir(parents=True)
    state = {"step": step, "data_fingerprint": "f", **({} if score is None else {"score": score}), **state_extra}
    write_checkpoint(folder, dict(model.named_parameters()), optimizer, [{"cpu": torch.get_rng_state()}], state)
    return folder


def test_a_fresh_checkpoint_verifies_and_loads_back(tmp_path: Path) -> None:
    folder = write(tmp_path / step_dir_name(3), 3)
    assert verify(folder)
    assert set(json.loads((folder / MANIFEST).read_text())["files"]) == {
        "trainable.safetensors", "optimizer.pt", "rng.pt", "state.json"
    }
    trainable, optimizer_state, state = load_checkpoint(folder, rank=0)
    assert set(trainable) == {"weight", "bias"} and state["step"] == 3
    assert optimizer_state["state"][0]["step"] == 1  # the optimizer's moments come back too


@pytest.mark.parametrize("damage", ["flipped byte", "truncated file", "missing file", "no manifest", "torn manifest"])
def test_a_damaged_or_partial_checkpoint_does_not_verify(tmp_path: Path, damage: str) -> None:
    folder = write(tmp_path / step_dir_name(1), 1)
    weights = folder / "trainable.safetensors"
    if damage == "flipped byte":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncated file":  # a copy cut short
        weights.write_bytes(weights.read_bytes()[:10])
    elif damage == "missing file":
        (folder / "optimizer.pt").unlink()
    elif damage == "no manifest":  # the manifest is written last: a save interrupted before it
        (folder / MANIFEST).unlink()
    else:
        (folder / MANIFEST).write_text('{"step": 1, "fil')
    assert not verify(folder)
    with pytest.raises(RunError, match=f"checkpoint {folder.name}: its files do not match its manifest"):
        load_checkpoint(folder, rank=0)


def test_find_resumable_skips_damaged_and_partial_checkpoints_and_says_why(tmp_path: Path) -> None:
    assert find_resumable(str(tmp_path)) == (None, {})  # an empty run folder: nothing to resume
    write(tmp_path / step_dir_name(2), 2)
    write(tmp_path / step_dir_name(4), 4)
    torn = write(tmp_path / step_dir_name(6), 6)
    (torn / "rng.pt").write_bytes(b"torn")
    (write(tmp_path / step_dir_name(8), 8) / MANIFEST).unlink()  # interrupted before its manifest
    (write(tmp_path / step_dir_name(9), 9) / "optimizer.pt").unlink()
    (tmp_path / f"{STAGING_PREFIX}{step_dir_name(10)}").mkdir()  # never a checkpoint, whatever it holds
    assert checkpoint_names(str(tmp_path)) == [step_dir_name(s) for s in (2, 4, 6, 8, 9)]
    newest, damaged = find_resumable(str(tmp_path))
    assert newest == str(tmp_path / step_dir_name(4))
    assert damaged == {step_dir_name(9): "optimizer.pt is missing",
                       step_dir_name(8): "no manifest.json (its save was cut short)",
                       step_dir_name(6): "rng.pt does not match the checksum in manifest.json"}


def test_set_aside_renames_damaged_checkpoints_and_never_deletes(tmp_path: Path) -> None:
    write(tmp_path / step_dir_name(2), 2)
    for _ in range(2):  # damaged at the same step twice: both kept
        (write(tmp_path / step_dir_name(4), 4) / "rng.pt").unlink()
        set_aside(str(tmp_path), [step_dir_name(4)])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"damaged_{step_dir_name(4)}", f"damaged_{step_dir_name(4)}.1", step_dir_name(2)]
    assert checkpoint_names(str(tmp_path)) == [step_dir_name(2)]


def test_prune_keeps_the_best_scored_and_the_newest(tmp_path: Path) -> None:
    for step, score in [(1, 0.9), (2, 0.3), (3, 0.5), (4, 0.7)]:
        write(tmp_path / step_dir_name(step), step, score)
    # lower is better (eval_loss): the 2 best are steps 2 and 3; step 4 stays as the newest.
    assert checkpoints_to_prune(str(tmp_path), keep=2, higher_first=False) == [step_dir_name(1)]
    # higher is better (token accuracy): the 2 best are 1 and 4 (the newest among them).
    assert checkpoints_to_prune(str(tmp_path), keep=2, higher_first=True) == [step_dir_name(2), step_dir_name(3)]
    assert checkpoints_to_prune(str(tmp_path), keep=1, higher_first=False) == [step_dir_name(s) for s in (1, 3)]


def test_prune_without_scores_keeps_the_newest(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        write(tmp_path / step_dir_name(step), step)
    assert checkpoints_to_prune(str(tmp_path), keep=2, higher_first=False) == [step_dir_name(1)]
    assert checkpoints_to_prune(str(tmp_path), keep=5, higher_first=False) == []


def test_prune_after_a_stop_keeps_the_newest_verified_the_recorded_best_and_ray_trains(tmp_path: Path) -> None:
    """What a stop can leave beyond train.checkpoints_to_keep=2 (a save not yet pruned, a torn newer one), pruned
    after the interrupt and on resume without touching what a resume or train.final: best needs."""
    for step, score in [(2, 0.9), (4, 0.2), (6, 0.8)]:
        write(tmp_path / step_dir_name(step), step, score)
    newest = write(tmp_path / step_dir_name(8), 8, 0.7, best={"score": 0.2, "step": 4})  # its record of the best
    torn = write(tmp_path / step_dir_name(10), 10, 0.1)
    (torn / "optimizer.pt").write_bytes(b"torn")  # newer, better-scored, but never verified
    (tmp_path / "notes").mkdir()  # not raysft's: never touched
    assert prune_extra_checkpoints(str(tmp_path), keep=None, higher_first=False) == []  # null keeps all
    assert prune_extra_checkpoints(str(tmp_path), keep=2, higher_first=False) == [step_dir_name(2), step_dir_name(6)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", step_dir_name(4), step_dir_name(8), step_dir_name(10)]
    assert find_resumable(str(tmp_path))[0] == str(newest)
    assert prune_extra_checkpoints(str(tmp_path), keep=2, higher_first=False) == []  # nothing more to do


def test_prune_leaves_the_checkpoints_ray_train_manages(tmp_path: Path) -> None:
    for step in (2, 4, 6):
        write(tmp_path / step_dir_name(step), step)
    # Ray Train lists 2 and 4 (it prunes them itself; resuming fails when one it lists is gone); 6 it never took.
    (tmp_path / RAY_SNAPSHOT).write_text(json.dumps({"checkpoint_results": [
        {"checkpoint_dir_name": step_dir_name(2)}, {"checkpoint_dir_name": step_dir_name(4)}]}))
    assert prune_extra_checkpoints(str(tmp_path), keep=1, higher_first=False) == []
    (tmp_path / RAY_SNAPSHOT).write_text(json.dumps({"checkpoint_results": [{"checkpoint_dir_name": step_dir_name(6)}]}))
    assert prune_extra_checkpoints(str(tmp_path), keep=1, higher_first=False) == [step_dir_name(2), step_dir_name(4)]


def test_persist_stores_by_rename_and_prunes_to_the_best_and_newest(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    root.mkdir()
    for step, score in [(1, 0.2), (2, 0.6), (3, 0.4)]:
        local = write(tmp_path / "local" / str(step), step, score)
        persist_checkpoint(local, str(root), step_dir_name(step), keep=1)
    assert sorted(p.name for p in root.iterdir()) == [step_dir_name(1), step_dir_name(3)]  # best, newest
    assert all(verify(root / name) for name in (step_dir_name(1), step_dir_name(3)))
    persist_checkpoint(tmp_path / "rank-1-holds-nothing", str(root), step_dir_name(4), keep=1)  # not rank 0
    assert sorted(p.name for p in root.iterdir()) == [step_dir_name(1), step_dir_name(3)]


def test_remove_staging_deletes_only_what_an_interrupted_save_left(tmp_path: Path) -> None:
    kept = write(tmp_path / step_dir_name(1), 1)
    (tmp_path / f"{STAGING_PREFIX}{step_dir_name(2)}").mkdir()
    (tmp_path / f"{STAGING_PREFIX}{step_dir_name(2)}" / "optimizer.pt").write_bytes(b"half")
    (tmp_path / f"{STAGING_PREFIX}stray").write_bytes(b"")
    remove_staging(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [kept.name] and verify(kept)
    remove_staging(tmp_path / "absent")  # a run that never saved: nothing to do
