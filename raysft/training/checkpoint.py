"""Resumable checkpoints: written under a temp name, a checksummed manifest last, then renamed.

Layout of `<root>/step_000040/`:
    trainable.safetensors   the trained parameters (the adapter for LoRA)
    optimizer.pt            optimizer state (loaded with weights_only=True)
    rng_rank{r}.pt          each worker's torch RNG state (dropout continues identically)
    state.json              step, data fingerprint, grad-scaler state
    manifest.json           sha256 of every file above; a checkpoint without a valid one is ignored

The data position is the step itself: the batch schedule is a pure function of (seed, step).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from raysft.fileio import write_error

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
STAGING_PREFIX = ".staging_"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(
    root: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    rank: int,
    keep: int | None,
) -> Path:
    """Collectively write checkpoint `step` (every rank calls this). Returns its final folder."""
    final = root / f"step_{step:06d}"
    staging = root / f"{STAGING_PREFIX}step_{step:06d}"
    try:
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        _barrier()
        torch.save(_rng_state(), staging / f"rng_rank{rank}.pt")
        _barrier()
        if rank == 0:
            save_file({k: v.contiguous() for k, v in trainable.items()}, str(staging / "trainable.safetensors"))
            torch.save(optimizer.state_dict(), staging / "optimizer.pt")
            (staging / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
            files = {p.name: _sha256(p) for p in sorted(staging.iterdir())}
            (staging / "manifest.json").write_text(json.dumps({"step": step, "files": files}, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
            _prune(root, keep)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(staging, ignore_errors=True)
        raise write_error(staging, err) from err
    _barrier()
    return final


def remove_staging(folder: Path) -> None:
    """Delete what an interrupted save left (`.staging_*` in `folder`): it was never trusted, and it takes space."""
    if folder.is_dir():
        for leftover in folder.glob(f"{STAGING_PREFIX}*"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _prune(root: Path, keep: int | None) -> None:
    if keep is None:
        return
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under `root`, oldest first (verified or not)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def verify(path: Path) -> bool:
    """True when the manifest exists and every file it lists has the recorded checksum."""
    manifest = path / "manifest.json"
    try:
        files = json.loads(manifest.read_text())["files"]
        return all(_sha256(path / name) == digest for name, digest in files.items())
    except (OSError, ValueError, KeyError):
        return False


def latest_verified(root: Path) -> Path | None:
    """The newest checkpoint whose manifest verifies; damaged ones are skipped with a warning."""
    for path in reversed(list_checkpoints(root)):
        if verify(path):
            return path
        log.warning("ignoring checkpoint %s: manifest missing or checksums differ", path)
    return None


def read_state(path: Path) -> dict[str, Any]:
    """state.json of a checkpoint: step, data fingerprint, tokens seen, grad-scaler state."""
    return json.loads((path / "state.json").read_text())


def load_checkpoint(path: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Return (trainable tensors, optimizer state, state.json) and restore this rank's RNG."""
    trainable = load_file(str(path / "trainable.safetensors"))
    optimizer_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    state = read_state(path)
    rng_file = path / f"rng_rank{rank}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return trainable, optimizer_state, state
