"""Resumable checkpoints, persisted by Ray Train to the run's storage (local, NFS, s3://, gs://).

Rank 0 writes one checkpoint folder locally and hands it to `ray.train.report(checkpoint=...)`; Ray
uploads it as `<run>/checkpoints/step_000040/`, registers it only once the upload is complete, prunes old
ones (`CheckpointConfig`) and gives it back through `ray.train.get_checkpoint()` after a worker restart or
to a `--resume` run: one decision, the same checkpoint on every rank. Layout:

    trainable.safetensors   the trained parameters (the adapter for LoRA)
    optimizer.pt            optimizer state (loaded with weights_only=True)
    rng.pt                  every rank's torch RNG state (dropout continues identically)
    state.json              step, data fingerprint, tokens seen, grad-scaler state, metrics at that step
    manifest.json           sha256 of every file above; a checkpoint whose files do not match is never resumed

The data position is the step itself: the batch schedule is a pure function of (seed, step).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from raysft import storage
from raysft.config import is_uri
from raysft.errors import RunError

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
STAGING_PREFIX = ".staging_"
MANIFEST = "manifest.json"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def gather_rng_states() -> list[dict[str, torch.Tensor]]:
    """Every rank's RNG state, in rank order (a collective: every rank calls it)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [_rng_state()]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, _rng_state())
    return states


def write_checkpoint(
    folder: Path,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    rng_states: list[dict[str, torch.Tensor]],
    state: dict[str, Any],
) -> None:
    """Write a checkpoint into the empty local `folder` (rank 0), the checksummed manifest last."""
    save_file({k: v.contiguous() for k, v in trainable.items()}, str(folder / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(rng_states, folder / "rng.pt")
    (folder / "state.json").write_text(json.dumps(state, indent=2))
    files = {p.name: _sha256(p) for p in sorted(folder.iterdir())}
    (folder / MANIFEST).write_text(json.dumps({"step": state["step"], "files": files}, indent=2))


def persist_checkpoint(folder: Path, root: str, name: str, keep: int | None, higher_is_better: bool = False) -> None:
    """Store the checkpoint `folder` as `root/name` where Ray Train does not (local mode), then keep the
    newest `keep`. A path gets it by one rename; object storage gets the manifest last, so a copy cut
    short is never taken for a checkpoint."""
    if not folder.joinpath(MANIFEST).exists():
        return  # ranks other than 0 hold no files
    target = storage.join(root, name)
    if is_uri(root):
        for file in sorted(folder.iterdir(), key=lambda p: p.name == MANIFEST):
            storage.upload(file, storage.join(target, file.name))
    else:
        staging = Path(root) / f"{STAGING_PREFIX}{name}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(folder, staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    if keep is not None:
        for old in checkpoints_to_prune(root, keep, higher_is_better):
            storage.remove(storage.join(root, old))


def checkpoints_to_prune(root: str, keep: int, higher_is_better: bool) -> list[str]:
    """What Ray Train's CheckpointConfig prunes, for checkpoints raysft stores itself: all but the `keep`
    best by their recorded score (the newest `keep` when unscored) and the newest."""
    names = checkpoint_names(root)
    newest = names[-1:] if names else []
    scores = {name: read_state(storage.join(root, name)).get("score") for name in names}
    if any(score is None for score in scores.values()):
        ranked = list(reversed(names))
    else:
        ranked = sorted(names, key=lambda n: scores[n], reverse=higher_is_better)
    kept = set(ranked[:keep]) | set(newest)
    return [name for name in names if name not in kept]


def checkpoint_names(root: str) -> list[str]:
    """Checkpoint folder names under `root` (a path or a URI), oldest first, verified or not."""
    return sorted(name for name in storage.list_dir(root) if _STEP_DIR.match(name))


def newest_complete(root: str) -> str | None:
    """The newest checkpoint under `root` that has its manifest (a path or a URI); checksums are verified
    by the workers when they load it."""
    for name in reversed(checkpoint_names(root)):
        if storage.exists(storage.join(root, name, MANIFEST)):
            return storage.join(root, name)
    return None


def remove_staging(folder: Path) -> None:
    """Delete what an interrupted save left (`.staging_*` in `folder`): it was never trusted, and it takes space."""
    if folder.is_dir():
        for leftover in folder.glob(f"{STAGING_PREFIX}*"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under `root`, oldest first (verified or not)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def verify(path: Path) -> bool:
    """True when the manifest exists and every file it lists has the recorded checksum."""
    manifest = path / MANIFEST
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


def read_state(path: Path | str) -> dict[str, Any]:
    """state.json of a checkpoint (a folder or a URI): step, data fingerprint, tokens seen, grad-scaler state."""
    return json.loads(storage.read_bytes(storage.join(str(path), "state.json")))


def load_checkpoint(path: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Verify the checkpoint in the local folder `path`; return (trainable tensors, optimizer state, state.json)
    and restore this rank's RNG. A checkpoint that does not verify is an error, never silently skipped:
    every rank must restore the same one."""
    if not verify(path):
        raise RunError(f"checkpoint {path.name}: its files do not match its manifest (damaged in storage?); "
                       "remove it from the run's checkpoints/ to resume from the one before")
    trainable = load_file(str(path / "trainable.safetensors"))
    optimizer_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    rng_states = torch.load(path / "rng.pt", weights_only=True)
    if rank < len(rng_states):  # resumed on more workers than saved: the new ranks keep their seeded RNG
        torch.set_rng_state(rng_states[rank]["cpu"])
        if "cuda" in rng_states[rank] and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng_states[rank]["cuda"])
    return trainable, optimizer_state, read_state(path)
