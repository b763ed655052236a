"""Population Based Training on a real local Ray: an exploited trial continues from the donor's checkpoint bit for
bit, with the mutated learning rate from its next step, and the sweep records the lineage; a PBT sweep killed after
its exploit resumes with the schedule it had."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from raysft.track import read_metrics
from raysft.tune.config import parse_sweep
from tests.runs import REPO
from tests.tune.test_sweep import _wait_until, read_results, tiny_base

LRS = [3e-2, 1e-2, 1e-4, 1e-6]


def pbt_sweep(model_dir: Path, tmp_path: Path, name: str, lrs: list[float] = LRS, max_steps: int = 6) -> dict[str, Any]:
    """A trial per learning rate, all running at once (half a CPU each), perturbed together at their second
    evaluation (step 4) and every second one after it but the last: PBT's synchronous mode, so that which trial
    clones which does not depend on timing (the worst clones the best; quantile 0.25 of 4, or of 2, is one trial)."""
    base = tiny_base(model_dir, tmp_path, [
        f"train.max_steps={max_steps}", "train.eval_every=2", "train.checkpoint_every=2",
        "train.checkpoints_to_keep=null", "train.lr_schedule=constant", "scaling.resources_per_worker={CPU: 0.5}",
    ])
    return {
        "name": name, "base": base, "output_dir": str(tmp_path / "sweep"),
        "space": {"train.lr": f"grid {lrs}"}, "max_concurrent_trials": len(lrs),
        "scheduler": {"name": "pbt", "perturbation_interval": 2, "synch": True, "resample_probability": 0.0,
                      "hyperparam_mutations": {"train.lr": "loguniform [1e-7, 1e-1]"}},
    }


def by_step(trial_dir: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(trial_dir / "metrics.jsonl") if key in r}


def trial_infos(sweep_dir: Path) -> dict[str, dict[str, Any]]:
    """Each trial's trial.json (its current values and lineage), by trial name."""
    infos = (json.loads(path.read_text()) for path in (sweep_dir / "trials").glob("*/trial.json"))
    return {info["name"]: info for info in infos}


def first_lr(info: dict[str, Any]) -> float:
    """The learning rate a trial started with (before any exploit)."""
    return info.get("lineage", [{}])[0].get("before", info["params"])["train.lr"]


@pytest.mark.slow  # 4 trials at once, killed after the exploit and resumed, two fresh Ray clusters: about 2.5 minutes
def test_pbt_exploit_takes_the_donor_checkpoint_and_a_killed_sweep_resumes_with_its_schedule(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """4 trials of 8 steps, perturbed together at step 4 (round 2; round 4 is the last, left alone): the worst
    continues from the best one's checkpoint bit for bit, with the mutated learning rate from its next step. Killed
    once that exploit is recorded: the resumed sweep does not perturb again at round 3 (its clock would start anew
    without the recorded schedule, and a resumed trial past round 2 left the others waiting for it), the exploited
    trial keeps its new values whatever Tune's last saved state says, and every trial finishes."""
    sweep_dir, sweep_file = tmp_path / "sweep", tmp_path / "pbt_resume.yaml"
    sweep_file.write_text(yaml.safe_dump(pbt_sweep(tiny_model_dir, tmp_path, "tiny-pbt", LRS, max_steps=8)))
    command = [sys.executable, "-m", "raysft", "sweep", str(sweep_file)]
    env = {**os.environ, "RAY_ADDRESS": "local"}  # its own Ray, killed with it

    def exploited() -> bool:
        return any("lineage" in info for info in trial_infos(sweep_dir).values()) if sweep_dir.exists() else False

    process = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_until(exploited, process, timeout_s=300)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    # Resumed in a group of its own, ended with its Ray if it stalls (the bug this guards against).
    resumed = subprocess.Popen([*command, "--resume"], cwd=REPO, env=env, start_new_session=True, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = resumed.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(resumed.pid, signal.SIGKILL)
        resumed.wait()
    assert resumed.returncode == 0, output[-5000:]

    infos = trial_infos(sweep_dir)
    trials = {name: sweep_dir / "trials" / name for name in infos}
    worst = next(name for name, info in infos.items() if first_lr(info) == LRS[-1])
    best = next(name for name, info in infos.items() if first_lr(info) == LRS[0])
    # The one exploit, at round 2: the worst trial continued from the best one's checkpoint at step 4, its lr
    # perturbed; none again after the resume.
    (entry,) = [json.loads(line) for line in (sweep_dir / "lineage.jsonl").read_text().splitlines()]
    assert (entry["trial"], entry["cloned"], entry["step"]) == (worst, best, 4), entry
    assert entry["before"] == {"train.lr": LRS[-1]} and entry["donor_values"] == {"train.lr": LRS[0]}
    new_lr = entry["after"]["train.lr"]
    assert new_lr == pytest.approx(LRS[0] * 1.2) or new_lr == pytest.approx(LRS[0] * 0.8)  # PBT's perturbation
    assert infos[worst]["params"] == {"train.lr": new_lr} and infos[best]["params"] == {"train.lr": LRS[0]}

    # Its restored weights are the donor's checkpoint bit for bit: the copy's files have the donor's checksums, and
    # step 5's loss and gradient norm (computed from the weights at step 4 and step 5's batch, before the learning
    # rate acts) equal the donor's exactly.
    donor_manifest = json.loads((trials[best] / "checkpoints" / "step_000004" / "manifest.json").read_text())
    copy_manifest = json.loads((trials[worst] / "checkpoints" / "step_000004" / "manifest.json").read_text())
    assert copy_manifest["files"] == donor_manifest["files"]
    for key in ("loss", "grad_norm"):
        assert by_step(trials[worst], key)[5] == by_step(trials[best], key)[5], key
    # ... and its next steps use the mutated learning rate, resumed or not (so step 6 differs from the donor's).
    assert by_step(trials[worst], "lr")[3] == pytest.approx(LRS[-1])
    assert [by_step(trials[worst], "lr")[step] for step in (5, 6, 7, 8)] == pytest.approx([new_lr] * 4)
    assert by_step(trials[worst], "loss")[6] != by_step(trials[best], "loss")[6]
    history = [json.loads(line) for line in (trials[worst] / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["changes"] == {"train.lr": {"from": LRS[-1], "to": new_lr}}

    # results.csv and the report name the lineage; every trial completed its 8 steps, each logged once, in order,
    # through the kill (after step 0's evaluation).
    rows = {row["trial"]: row for row in read_results(sweep_dir)}
    assert list(next(iter(rows.values()))) == ["trial", "status", "train.lr", "cloned_from", "best_eval_loss",
                                               "last_eval_loss", "steps", "tokens", "wall_s"]
    assert {name: row["cloned_from"] for name, row in rows.items()} == {
        name: (f"{best}@4" if name == worst else "") for name in trials}
    assert all(row["status"] == "completed" and row["steps"] == "8" for row in rows.values())
    assert f"{best}@4" in (sweep_dir / "report.md").read_text()
    for name in infos:
        steps = [record["step"] for record in read_metrics(trials[name] / "metrics.jsonl")]
        assert steps == sorted(set(steps)) and steps[-8:] == list(range(1, 9)), (name, steps)


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


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_resumed_pbt_scheduler_continues_the_recorded_schedule(
    where: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No Ray (Tune's own controller, which needs none until trials run): what PBT's clock was when the sweep
    stopped is recorded where the sweep lives, and the scheduler Tune restores on --resume (as it was before the first
    trial) takes it back for each trial it adds; a damaged record is refused, naming the file."""
    import pickle

    from ray.train._internal.storage import StorageContext
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.experiment import Trial

    from raysft import storage
    from raysft.errors import RunError
    from raysft.tune.pbt import SCHEDULE_FILE, pbt_scheduler, read_schedule
    from tests.tune.test_sweep_config import pbt_raw

    if where == "s3":
        for key, value in request.getfixturevalue("s3").items():
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("TUNE_MAX_PENDING_TRIALS_PG", "2")  # else Tune asks the (absent) cluster for its CPUs
    home = str(tmp_path / "sweep") if where == "local" else f"s3://raysft-test/pbt-{tmp_path.name}"
    raw = pbt_raw({"train.lr": "loguniform [1e-5, 1e-3]"})
    raw["scheduler"]["synch"] = True
    cfg = parse_sweep(raw)
    scheduler = pbt_scheduler(cfg, "board", home)
    scheduler.set_search_properties(cfg.metric, cfg.mode)  # as Tune does with the sweep's metric
    pickled = pickle.dumps(scheduler)  # what Tune saves before the first trial, and restores on --resume

    def controller() -> tuple[Any, list[Trial]]:
        """Tune's controller with the scheduler as Tune restores it, adding the sweep's two trials."""
        restored = pickle.loads(pickled)
        tune_storage = StorageContext(storage_path=str(tmp_path / "tune"), experiment_dir_name="tune")
        tune = TuneController(scheduler=restored, storage=tune_storage)
        trials = [Trial("run_trial", config={"train.lr": 1e-4}, trial_id=f"0000{n}", stub=True, storage=tune_storage)
                  for n in range(2)]
        for trial in trials:
            tune.add_trial(trial)
        return restored, trials

    first, trials = controller()
    assert read_schedule(storage.join(home, SCHEDULE_FILE)) == {}  # a new sweep: nothing recorded, nothing restored
    for trial in trials:  # both perturbed together at round 2 ...
        first._trial_state[trial].last_perturbation_time = first._trial_state[trial].last_train_time = 2
    first._next_perturbation_sync = 4  # ... the next time at round 4
    first._record()

    resumed, trials = controller()
    assert resumed._next_perturbation_sync == 4
    assert [(resumed._trial_state[t].last_perturbation_time, resumed._trial_state[t].last_train_time)
            for t in trials] == [(2, 2), (2, 2)]

    storage.write_bytes(storage.join(home, SCHEDULE_FILE), b'{"next_sync": 4, "trials": {"00000": {}}}')
    with pytest.raises(RunError, match=f"{SCHEDULE_FILE}: not a PBT schedule raysft wrote"):
        controller()


def test_synchronous_pbt_perturbs_the_waiting_trials_when_the_one_they_wait_for_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No Ray (Tune's own controller): two trials reported round 4 and wait paused for the third, which ends without
    reporting it (it had resumed past that round, or round 4 was its last, never perturbed). Tune's PBT would leave
    them paused for good (the stall); raysft's perturbs them then and lets them run to the next round."""
    from ray.train._internal.storage import StorageContext
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.experiment import Trial

    from raysft.tune.pbt import pbt_scheduler
    from tests.tune.test_sweep_config import pbt_raw

    monkeypatch.setenv("TUNE_MAX_PENDING_TRIALS_PG", "3")  # else Tune asks the (absent) cluster for its CPUs
    raw = pbt_raw({"train.lr": "loguniform [1e-5, 1e-3]"})
    raw["scheduler"].update(synch=True, perturbation_interval=2)
    cfg = parse_sweep(raw)
    scheduler = pbt_scheduler(cfg, "board", str(tmp_path / "sweep"))
    scheduler.set_search_properties(cfg.metric, cfg.mode)
    tune_storage = StorageContext(storage_path=str(tmp_path / "tune"), experiment_dir_name="tune")
    tune = TuneController(scheduler=scheduler, storage=tune_storage)
    waiting = [Trial("run_trial", config={"train.lr": 1e-4}, trial_id=f"0000{n}", stub=True, storage=tune_storage)
               for n in range(2)]
    ended = Trial("run_trial", config={"train.lr": 1e-4}, trial_id="00002", stub=True, storage=tune_storage)
    for trial in [*waiting, ended]:
        tune.add_trial(trial)
    scheduler._next_perturbation_sync = 4  # perturbed together at round 2; next at round 4
    for loss, trial in zip([1.0, 2.0], waiting):
        state = scheduler._trial_state[trial]
        state.last_perturbation_time, state.last_train_time = 2, 4
        state.last_score, state.last_result = -loss, {"eval_round": 4, "eval_loss": loss}
        trial.set_status(Trial.PAUSED)
    tune.stop_trial(ended)  # it ends (a PENDING trial here: Tune removes it from the live trials the same way)

    assert tune.get_live_trials() == set(waiting)
    assert scheduler.choose_trial_to_run(tune) in waiting
    assert [scheduler._trial_state[trial].last_perturbation_time for trial in waiting] == [4, 4]
    assert scheduler._next_perturbation_sync == 6
