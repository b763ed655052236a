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

With `scaling.strategy: fsdp` no rank holds the whole state, so every rank writes its own shards, in
parallel, with torch.distributed.checkpoint, and Ray Train merges the ranks' folders into the one checkpoint:

    sharded/                .metadata (rank 0) and one __RANK_0.distcp per rank: the trained parameters and the
                            optimizer state, reloadable on any number of workers
    rng.pt, state.json      as above (rank 0)
    manifest.json           rank 0's files, and how many ranks wrote shards
    manifest_rank_NNNNN.json  each other rank's files

The data position is the step itself: the batch schedule is a pure function of (seed, step).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import ray.train
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from raysft import storage
from raysft.config import Config, is_uri, metric_mode
from raysft.errors import RunError
from raysft.fileio import replace_dir_atomically, write_error
from raysft.run_folder import DAMAGED_PREFIX, RAY_SNAPSHOT, STAGING_PREFIX, is_step_dir, step_dir_name
from raysft.training.fsdp import is_sharded
from raysft.training.optim import set_weight_decay

if TYPE_CHECKING:
    from raysft.training.inputs import LoopInputs

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SHARDED_DIR = "sharded"
# The trained parameters only: a LoRA run's frozen base is reloaded from the model, never checkpointed.
# Loading them back is not strict about the frozen ones it leaves as they are; a trained parameter missing
# from the checkpoint still fails, in dcp.load.
_TRAINED_ONLY = StateDictOptions(ignore_frozen_params=True)
_LOAD_TRAINED = StateDictOptions(ignore_frozen_params=True, strict=False)


def _manifest_name(rank: int) -> str:
    return MANIFEST if rank == 0 else f"manifest_rank_{rank:05d}.json"


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
    _write_manifest(folder, state["step"], rank=0, ranks=1)


def write_sharded_checkpoint(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rng_states: list[dict[str, torch.Tensor]],
    state: dict[str, Any], rank: int, world: int,
) -> None:
    """FSDP, every rank: this rank's shards into the empty local `folder` (rank 0 adds RNG and state), its
    manifest last. Collective: every rank calls it."""
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_TRAINED_ONLY)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder / SHARDED_DIR))
    if rank == 0:
        torch.save(rng_states, folder / "rng.pt")
        (folder / "state.json").write_text(json.dumps(state, indent=2))
    _write_manifest(folder, state["step"], rank, world)


def _write_manifest(folder: Path, step: int, rank: int, ranks: int) -> None:
    files = {str(p.relative_to(folder)): _sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    manifest: dict[str, Any] = {"step": step, "files": files}
    if rank == 0:
        manifest["ranks"] = ranks
    (folder / _manifest_name(rank)).write_text(json.dumps(manifest, indent=2))


def persist_checkpoint(folder: Path, root: str, name: str, keep: int | None, higher_first: bool = False) -> None:
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
        replace_dir_atomically(staging, Path(target))
    if keep is not None:
        for old in checkpoints_to_prune(root, keep, higher_first):
            storage.remove(storage.join(root, old))


def checkpoints_to_prune(root: str, keep: int, higher_first: bool, protected: Collection[str] = ()) -> list[str]:
    """What Ray Train's CheckpointConfig prunes, for checkpoints raysft stores itself: all but the `keep`
    best by their recorded score (the newest `keep` when unscored), the newest and the `protected`."""
    names = checkpoint_names(root)
    newest = names[-1:] if names else []
    scores = {name: _recorded_score(storage.join(root, name)) for name in names}
    if any(score is None for score in scores.values()):
        ranked = list(reversed(names))
    else:
        ranked = sorted(names, key=lambda n: scores[n], reverse=higher_first)
    kept = set(ranked[:keep]) | set(newest) | set(protected)
    return [name for name in names if name not in kept]


def checkpoint_at(location: str) -> ray.train.Checkpoint:
    """The Ray checkpoint at `location` (a path or a URI), read through raysft's storage (object storage retried)."""
    fs, path = storage.resolve(location)
    return ray.train.Checkpoint(path, filesystem=fs)


def _recorded_score(location: str) -> float | None:
    try:
        return read_state(location).get("score")
    except (OSError, ValueError):  # a save cut short before its state.json: unscored
        return None


def ray_train_checkpoints(root: str) -> set[str]:
    """The checkpoints Ray Train's snapshot lists: Ray Train prunes them itself, and refuses to resume a run
    whose snapshot lists one that is gone."""
    snapshot = storage.join(root, RAY_SNAPSHOT)
    if not storage.exists(snapshot):
        return set()
    try:
        results = json.loads(storage.read_bytes(snapshot))["checkpoint_results"]
        return {result["checkpoint_dir_name"] for result in results}
    except (ValueError, KeyError, TypeError):
        return set(checkpoint_names(root))  # unreadable: prune nothing Ray Train might still count on


def prune_extra_checkpoints(root: str, keep: int | None, higher_first: bool) -> list[str]:
    """After an interrupt and on resume: remove the checkpoints beyond `keep` that a stop left (one saved but
    not yet pruned, one stored but not yet registered with Ray Train); return their names. Never the newest
    verified one (what --resume continues from), nor the best-scored one it records (what train.final: best
    loads), nor one Ray Train manages, nor anything but raysft's own step_NNNNNN folders."""
    names = checkpoint_names(root)
    if keep is None or len(names) <= keep:
        return []
    protected = ray_train_checkpoints(root)
    newest = find_resumable(root)[0]
    if newest is not None:
        protected.add(Path(newest).name)
        best = read_state(newest).get("best")
        if best:
            protected.add(step_dir_name(best["step"]))
    pruned = checkpoints_to_prune(root, keep, higher_first, protected)
    for name in pruned:
        storage.remove(storage.join(root, name))
    return pruned


def checkpoint_names(root: str) -> list[str]:
    """Checkpoint folder names under `root` (a path or a URI), oldest first, verified or not."""
    return sorted(name for name in storage.list_dir(root) if is_step_dir(name))


def find_resumable(root: str) -> tuple[str | None, dict[str, str]]:
    """(the newest checkpoint under `root` that verifies, {name: what is wrong} for every newer one that does not).

    Only checkpoints from the newest down to the first that verifies are read: the older ones are not needed
    to resume, and reading every file of every checkpoint would cost a full fine-tune's resume minutes.
    """
    damaged: dict[str, str] = {}
    for name in reversed(checkpoint_names(root)):
        location = storage.join(root, name)
        if not storage.exists(storage.join(location, MANIFEST)):
            damaged[name] = f"no {MANIFEST} (its save was cut short)"
            continue
        with checkpoint_at(location).as_directory() as local:
            why = damage(Path(local))
        if why is None:
            return location, damaged
        damaged[name] = why
    return None, damaged


def set_aside(root: str, names: list[str]) -> dict[str, str]:
    """Move damaged checkpoints out of the run's way, never deleting them: {name: where it went}.

    A local one is renamed `damaged_<name>` (the user may still want to look at it); one in object storage, which
    has no rename, stays where it is, is dropped from Ray Train's record, and is overwritten when its step is
    trained again.
    """
    moved: dict[str, str] = {}
    for name in names:
        if is_uri(root):
            moved[name] = storage.join(root, name)
            continue
        target = Path(root) / f"{DAMAGED_PREFIX}{name}"
        suffix = 1
        while target.exists():  # damaged twice at the same step: keep both
            target, suffix = Path(root) / f"{DAMAGED_PREFIX}{name}.{suffix}", suffix + 1
        Path(root, name).rename(target)
        moved[name] = str(target)
    return moved


def repair_ray_snapshot(root: str) -> list[str]:
    """Drop from Ray Train's checkpoint record every checkpoint that is no longer under `root` (set aside, or
    removed by hand), so that Ray resumes from the newest one left instead of refusing to start (it would advise
    deleting every checkpoint). Returns the names dropped.

    Ray's own model of the record reads and writes it, so every field keeps Ray's meaning. A record Ray wrote
    only in part cannot be read: it is set aside, and the run resumes from the checkpoint raysft chose.
    """
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState

    snapshot = storage.join(root, RAY_SNAPSHOT)
    if not storage.exists(snapshot):
        return []
    raw = storage.read_bytes(snapshot)
    try:
        state = _CheckpointManagerState.parse_raw(raw)
    except ValueError:
        storage.write_bytes(storage.join(root, f"{DAMAGED_PREFIX}{RAY_SNAPSHOT}"), raw)
        storage.remove(snapshot)
        return []
    present = set(checkpoint_names(root))
    dropped = sorted({r.checkpoint_dir_name for r in state.checkpoint_results} - present)
    if not dropped:
        return []
    kept = [(result, index) for result, index in zip(state.checkpoint_results, state.checkpoint_report_indices)
            if result.checkpoint_dir_name in present]
    pending = [(result, spec) for result, spec in zip(state.pending_training_results, state.pending_validation_specs)
               if result.checkpoint_dir_name in present]
    state.checkpoint_results = [result for result, _ in kept]
    state.checkpoint_report_indices = [index for _, index in kept]
    latest = state.latest_checkpoint_result
    if latest is not None and latest.checkpoint_dir_name not in present:
        state.latest_checkpoint_result = max(kept, key=lambda pair: pair[1])[0] if kept else None
    state.pending_training_results = [result for result, _ in pending]
    state.pending_validation_specs = [spec for _, spec in pending]
    for names in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                  "failed_validation_checkpoint_dir_names"):
        setattr(state, names, [name for name in getattr(state, names) if name in present])
    storage.write_bytes(snapshot, state.json().encode())
    return dropped


def remove_staging(folder: Path) -> None:
    """Delete what an interrupted save left (`.staging_*` in `folder`): it was never trusted, and it takes space."""
    if folder.is_dir():
        for leftover in folder.glob(f"{STAGING_PREFIX}*"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def damage(path: Path) -> str | None:
    """What is wrong with the checkpoint in the local folder `path` (None when its manifest exists and every file
    it lists has the recorded checksum; for a sharded checkpoint, every rank's manifest too)."""
    try:
        ranks = json.loads((path / MANIFEST).read_text()).get("ranks", 1)
        for rank in range(ranks):
            manifest = _manifest_name(rank)
            files = json.loads((path / manifest).read_text())["files"]
            for name, digest in files.items():
                if not (path / name).is_file():
                    return f"{name} is missing"
                if _sha256(path / name) != digest:
                    return f"{name} does not match the checksum in {manifest}"
        return None
    except FileNotFoundError as err:
        return f"{Path(err.filename or '?').name} is missing"
    except (OSError, ValueError, KeyError, AttributeError) as err:
        return f"its manifest cannot be read ({type(err).__name__})"


def verify(path: Path) -> bool:
    """True when the checkpoint in the local folder `path` is whole (see `damage`)."""
    return damage(path) is None


def read_state(path: Path | str) -> dict[str, Any]:
    """state.json of a checkpoint (a folder or a URI): step, data fingerprint, tokens seen, grad-scaler state."""
    return json.loads(storage.read_bytes(storage.join(str(path), "state.json")))


def _verified_state(path: Path, rank: int) -> dict[str, Any]:
    """state.json of the verified checkpoint in the local folder `path`, this rank's RNG restored. A checkpoint
    that does not verify is an error, never silently skipped: every rank must restore the same one."""
    why = damage(path)
    if why is not None:  # damaged after the driver verified it (a worker restart reads Ray's latest unchecked)
        raise RunError(f"checkpoint {path.name}: its files do not match its manifest ({why}); run the same command "
                       "with --resume: it sets damaged checkpoints aside and continues from the newest that verifies")
    rng_states = torch.load(path / "rng.pt", weights_only=True)
    if rank < len(rng_states):  # resumed on more workers than saved: the new ranks keep their seeded RNG
        torch.set_rng_state(rng_states[rank]["cpu"])
        if "cuda" in rng_states[rank] and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng_states[rank]["cuda"])
    return read_state(path)


def load_checkpoint(path: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Verify the checkpoint in the local folder `path`; return (trainable tensors, optimizer state, state.json)
    and restore this rank's RNG."""
    state = _verified_state(path, rank)
    trainable = load_file(str(path / "trainable.safetensors"))
    optimizer_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    return trainable, optimizer_state, state


def load_sharded_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> dict[str, Any]:
    """Every rank: verify the sharded checkpoint in the local folder `path`, load this rank's shards of the trained
    parameters and optimizer state into `model` and `optimizer` (any saved world size; a model that is not sharded
    takes them whole), restore its RNG."""
    state = _verified_state(path, rank)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_TRAINED_ONLY)
    dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(path / SHARDED_DIR))
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state, options=_LOAD_TRAINED)
    return state


CHECKPOINT_SCORE_KEY = "checkpoint_score"


def is_scored(cfg: Config, has_eval: bool) -> bool:
    """Whether checkpoints are ranked by an evaluation metric (else only by recency)."""
    return has_eval and bool(cfg.train.eval_every)


def higher_is_better(cfg: Config) -> bool:
    """Whether a higher `train.checkpoint_score` is better (accuracy, generation metrics) or a lower (loss)."""
    return metric_mode(cfg, cfg.train.checkpoint_score) == "max"


def better(score: float, than: float | None, higher: bool) -> bool:
    return than is None or (score > than if higher else score < than)


def save_checkpoint(
    inputs: "LoopInputs", step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
    metrics: dict[str, float], rank: int, local_mode: bool,
) -> None:
    """Every rank: write checkpoint `step` (rank 0's folder) and report it with `metrics`.

    Ray Train uploads it to the run's storage and registers it once complete; in local mode Ray keeps no
    checkpoints, so raysft persists it itself (same layout, manifest last).
    """
    rng_states = gather_rng_states()
    name = step_dir_name(step)
    sharded = is_sharded(model)
    with tempfile.TemporaryDirectory(prefix="raysft-checkpoint-") as tmp:
        folder = Path(tmp)
        try:
            if sharded:
                write_sharded_checkpoint(folder, model, optimizer, rng_states, {"step": step, **state}, rank,
                                         dist.get_world_size())
            elif rank == 0:
                from raysft.model import trainable_state_dict  # worker side: the driver never loads the model stack

                write_checkpoint(folder, trainable_state_dict(model), optimizer, rng_states, {"step": step, **state})
            if local_mode:
                persist_checkpoint(folder, inputs.checkpoint_root, name, inputs.config.train.checkpoints_to_keep,
                                   higher_first=higher_is_better(inputs.config))
        except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
            raise write_error(Path(storage.join(inputs.checkpoint_root, name)), err) from err
        # Sharded: every rank's folder, merged by Ray Train into one checkpoint; else rank 0's alone.
        checkpoint = None if local_mode or (rank != 0 and not sharded) else ray.train.Checkpoint.from_directory(tmp)
        # Ray Train ranks checkpoints by this key (CheckpointConfig); the metrics themselves stay as logged.
        score = {} if state.get("score") is None else {CHECKPOINT_SCORE_KEY: state["score"]}
        ray.train.report({"step": step, **metrics, **score}, checkpoint=checkpoint, checkpoint_dir_name=name)


def _restore_from(inputs: "LoopInputs") -> ray.train.Checkpoint | None:
    """The checkpoint to continue from: Ray Train's newest after a worker restart or for a --resume run
    (the same on every rank), else the one the driver chose."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and inputs.resume_from is not None:
        checkpoint = checkpoint_at(inputs.resume_from)
    return checkpoint


def restore(
    inputs: "LoopInputs", model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, rank: int
) -> tuple[dict[str, Any], str | None]:
    """Load the checkpoint to continue from into model, optimizer, scaler and RNG: (its state.json, its name)."""
    checkpoint = _restore_from(inputs)
    if checkpoint is None:
        return {"step": 0}, None
    with checkpoint.as_directory() as local:
        # What the checkpoint holds decides, not how this run is split: shards written by N ranks load on M ranks,
        # or whole into one model (torch.distributed.checkpoint reshards).
        if (Path(local) / SHARDED_DIR).is_dir():
            state = load_sharded_checkpoint(Path(local), model, optimizer, rank)
        elif is_sharded(model):
            raise RunError(f"checkpoint {checkpoint.path} was written without FSDP (scaling.strategy: ddp, or local "
                           "mode); resume it as it was written, or start a new train.output_dir")
        else:
            trainable, optimizer_state, state = load_checkpoint(Path(local), rank)
            _copy_into(model, trainable)
            optimizer.load_state_dict(optimizer_state)
    if state["data_fingerprint"] != inputs.data_fingerprint:
        raise RunError(f"checkpoint {checkpoint.path} was made with different data; start a new train.output_dir")
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    set_weight_decay(optimizer, inputs.config.train.weight_decay)  # the run's own, unless PBT mutated it
    return state, Path(checkpoint.path).name


def _copy_into(model: nn.Module, trainable: dict[str, torch.Tensor]) -> None:
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in trainable.items():
            named[name].copy_(tensor)


def load_trainable(model: nn.Module, location: str) -> None:
    """Copy the trained weights of the checkpoint at `location` into `model` (final: best); sharded, every rank
    loads its shards (collective)."""
    with checkpoint_at(location).as_directory() as local:
        if (Path(local) / SHARDED_DIR).is_dir():
            model_state = get_model_state_dict(model, options=_TRAINED_ONLY)
            dcp.load({"model": model_state}, checkpoint_id=str(Path(local) / SHARDED_DIR))
            set_model_state_dict(model, model_state, options=_LOAD_TRAINED)
        else:
            _copy_into(model, load_file(str(Path(local) / "trainable.safetensors")))
