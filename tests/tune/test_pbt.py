"""Population Based Training on a real local Ray: an exploited trial continues from the donor's checkpoint bit for
bit, with the mutated learning rate from its next step, and the sweep records the lineage. (A PBT sweep killed and
resumed is not tested yet: a synchronous PBT sweep's resume was seen to stall, issue 28.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from raysft.track import read_metrics
from raysft.tune.config import parse_sweep
from raysft.tune.sweep import sweep
from tests.tune.test_sweep import read_results, tiny_base

LRS = [3e-2, 1e-2, 1e-4, 1e-6]


def pbt_sweep(model_dir: Path, tmp_path: Path, name: str) -> dict[str, Any]:
    """4 trials over train.lr, all running at once (half a CPU each), perturbed together once, at their second
    evaluation (step 4 of 6): PBT's synchronous mode, so that which trial clones which does not depend on timing
    (the worst clones the best; quantile 0.25 of 4 is one trial)."""
    base = tiny_base(model_dir, tmp_path, [
        "train.max_steps=6", "train.eval_every=2", "train.checkpoint_every=2", "train.checkpoints_to_keep=null",
        "train.lr_schedule=constant", "scaling.resources_per_worker={CPU: 0.5}",
    ])
    return {
        "name": name, "base": base, "output_dir": str(tmp_path / "sweep"),
        "space": {"train.lr": f"grid {LRS}"}, "max_concurrent_trials": 4,
        "scheduler": {"name": "pbt", "perturbation_interval": 2, "synch": True, "resample_probability": 0.0,
                      "hyperparam_mutations": {"train.lr": "loguniform [1e-7, 1e-1]"}},
    }


def by_step(trial_dir: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(trial_dir / "metrics.jsonl") if key in r}


@pytest.mark.slow  # 4 trials, each restarted once (synchronous PBT pauses them all): about 2 minutes on 2 cores
def test_pbt_exploit_continues_from_the_donor_checkpoint_with_the_mutated_lr(
    ray_session: None, tiny_model_dir: Path, tmp_path: Path
) -> None:
    result = sweep(parse_sweep(pbt_sweep(tiny_model_dir, tmp_path, "tiny-pbt")))
    sweep_dir = tmp_path / "sweep"
    trials = {json.loads((d / "trial.json").read_text())["name"]: d for d in (sweep_dir / "trials").iterdir()}
    first_lr = {name: json.loads((d / "trial.json").read_text()).get("lineage", [{}])[0].get("before", {}).get(
        "train.lr", json.loads((d / "trial.json").read_text())["params"]["train.lr"]) for name, d in trials.items()}
    worst = next(name for name, lr in first_lr.items() if lr == LRS[-1])
    best = next(name for name, lr in first_lr.items() if lr == LRS[0])

    # One exploit: the worst trial continued from the best trial's checkpoint at step 4, its lr perturbed.
    (entry,) = [json.loads(line) for line in (sweep_dir / "lineage.jsonl").read_text().splitlines()]
    assert (entry["trial"], entry["cloned"], entry["step"]) == (worst, best, 4), entry
    assert entry["before"] == {"train.lr": LRS[-1]} and entry["donor_values"] == {"train.lr": LRS[0]}
    new_lr = entry["after"]["train.lr"]
    assert new_lr == pytest.approx(LRS[0] * 1.2) or new_lr == pytest.approx(LRS[0] * 0.8)  # PBT's perturbation
    assert json.loads((trials[worst] / "trial.json").read_text())["params"] == {"train.lr": new_lr}

    # Its restored weights are the donor's checkpoint bit for bit: the copy's files have the donor's checksums, and
    # step 5's loss and gradient norm (computed from the weights at step 4 and step 5's batch, before the learning
    # rate acts) equal the donor's exactly.
    donor_manifest = json.loads((trials[best] / "checkpoints" / "step_000004" / "manifest.json").read_text())
    copy_manifest = json.loads((trials[worst] / "checkpoints" / "step_000004" / "manifest.json").read_text())
    assert copy_manifest["files"] == donor_manifest["files"]
    for key in ("loss", "grad_norm"):
        assert by_step(trials[worst], key)[5] == by_step(trials[best], key)[5], key
    # ... and its next steps use the mutated learning rate (so step 6 differs from the donor's).
    assert by_step(trials[worst], "lr")[5] == by_step(trials[worst], "lr")[6] == pytest.approx(new_lr)
    assert by_step(trials[worst], "lr")[3] == pytest.approx(LRS[-1])
    assert by_step(trials[worst], "loss")[6] != by_step(trials[best], "loss")[6]
    history = [json.loads(line) for line in (trials[worst] / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["changes"] == {"train.lr": {"from": LRS[-1], "to": new_lr}}

    # results.csv and the report name the lineage; every trial completed its 6 steps.
    rows = {row["trial"]: row for row in read_results(sweep_dir)}
    assert list(next(iter(rows.values()))) == ["trial", "status", "train.lr", "cloned_from", "best_eval_loss",
                                               "last_eval_loss", "steps", "tokens", "wall_s"]
    assert {name: row["cloned_from"] for name, row in rows.items()} == {
        name: (f"{best}@4" if name == worst else "") for name in trials}
    assert all(row["status"] == "completed" and row["steps"] == "6" for row in rows.values())
    assert f"{best}@4" in (sweep_dir / "report.md").read_text()
    assert result.best is not None


@pytest.mark.parametrize("where", ["local", "s3"])
def test_an_exploited_trial_takes_the_donor_checkpoint_as_its_own(
    where: str, tiny_model_dir: Path, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No Ray: the exploit's file work on a path and on object storage. The donor's checkpoint (the reported one, or
    its newest verified one once that is pruned) becomes the trial's only checkpoint, byte for byte; Ray Train's
    record of the trial's own checkpoints goes; the new values are recorded, so the resume check passes."""
    import torch

    from raysft import storage
    from raysft.training.checkpoint import checkpoint_names, persist_checkpoint, write_checkpoint
    from raysft.run_folder import (
        HISTORY_FILE, RAY_SNAPSHOT, pin_global_batch, resume_changes, run_location, write_run_config)
    from raysft.tune.pbt import adopt_donor_checkpoint
    from tests.runs import tiny_config

    if where == "s3":
        for key, value in request.getfixturevalue("s3").items():
            monkeypatch.setenv(key, value)
    root = str(tmp_path) if where == "local" else f"s3://raysft-test/pbt-{tmp_path.name}"

    def trial(name: str, lr: float):
        overrides = [f"train.lr={lr}", "train.resume=true"]
        if where == "s3":
            overrides.append(f"scaling.storage_path={root}/trials/{name}")
        return tiny_config(tiny_model_dir, tmp_path / "trials" / name, overrides)

    def save(cfg: Any, step: int, value: float) -> None:
        weight = torch.nn.Parameter(torch.full((2, 2), value))
        folder = tmp_path / f"ckpt-{value}"
        folder.mkdir()
        write_checkpoint(folder, {"w": weight.detach()}, torch.optim.AdamW([weight]), [{"cpu": torch.get_rng_state()}],
                         {"step": step, "data_fingerprint": "f"})
        persist_checkpoint(folder, storage.join(run_location(cfg), "checkpoints"), f"step_{step:06d}", keep=None)

    donor, before, after = trial("trial_a", 3e-2), trial("trial_b", 1e-6), trial("trial_b", 2.4e-2)
    for cfg in (donor, before):
        write_run_config(cfg, {})
    save(donor, 4, 1.0)
    save(donor, 6, 2.0)
    save(before, 2, 3.0)
    recipient_root = storage.join(run_location(before), "checkpoints")
    storage.write_bytes(storage.join(recipient_root, RAY_SNAPSHOT), b"{}")
    pointer = {"trial": "trial_a", "run": run_location(donor), "step": 4, "params": {"train.lr": 3e-2}, "id": "p1"}

    entry = adopt_donor_checkpoint(pointer, after, before={"train.lr": 1e-6}, after={"train.lr": 2.4e-2})
    assert {k: entry[k] for k in ("cloned", "step", "own_step", "before", "after", "pointer")} == {
        "cloned": "trial_a", "step": 4, "own_step": 2, "before": {"train.lr": 1e-6}, "after": {"train.lr": 2.4e-2},
        "pointer": "p1"}
    assert checkpoint_names(recipient_root) == ["step_000004"]
    assert not storage.exists(storage.join(recipient_root, RAY_SNAPSHOT))
    donor_root = storage.join(run_location(donor), "checkpoints")
    for name in ("trainable.safetensors", "optimizer.pt", "manifest.json"):
        assert storage.read_bytes(storage.join(recipient_root, "step_000004", name)) == storage.read_bytes(
            storage.join(donor_root, "step_000004", name))
    history = storage.read_bytes(storage.join(run_location(after), HISTORY_FILE)).decode().splitlines()
    assert json.loads(history[-1])["changes"] == {"train.lr": {"from": 1e-6, "to": 2.4e-2}}
    assert resume_changes(pin_global_batch(after), run_location(after)) == {}  # what `train` checks before resuming

    # The reported checkpoint pruned since (the donor trained on): its newest verified one.
    storage.remove(storage.join(donor_root, "step_000004"))
    entry = adopt_donor_checkpoint({**pointer, "id": "p2"}, after, before={"train.lr": 2.4e-2}, after={"train.lr": 2.4e-2})
    assert (entry["step"], checkpoint_names(recipient_root)) == (6, ["step_000006"])
