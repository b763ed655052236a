"""Sweep YAML and search spaces: every domain form, and bad input named by its YAML key before anything runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from ray import tune

from raysft.config import load_yaml_text
from raysft.errors import ConfigError
from raysft.tune.config import load_sweep, parse_sweep
from raysft.tune.space import Domain, parse_space, to_param_space
from raysft.tune.sweep import (
    default_max_concurrent,
    eval_round,
    is_evaluation,
    trial_config,
    tune_result,
)
from tests.runs import REPO

BASE: dict[str, Any] = {
    "model": {"name_or_path": "some/model"},
    "data": {"train": {"path": "train.jsonl"}, "eval_fraction": 0.1},
    "train": {"max_steps": 20, "eval_every": 5},
}
SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))


def sweep_raw(**changes: Any) -> dict[str, Any]:
    return {"base": yaml.safe_load(yaml.safe_dump(BASE)), "space": {"lora.r": "choice [8, 16]"}, **changes}


def problems_of(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_sweep(raw)
    return err.value.problems


def test_every_domain_form_in_both_spellings() -> None:
    space = {
        "lora.r": "choice [8, 16, 32]",
        "lora.alpha": {"grid": [16, 32]},
        "lora.dropout": "uniform [0.0, 0.2]",
        "train.warmup_steps": "randint [0, 10]",
        "train.lr": "loguniform [1e-5, 5e-4]",
        "train.weight_decay": {"quniform": [0.0, 0.1, 0.01]},
        "train.min_lr_ratio": "qloguniform [0.01, 0.5, 0.01]",
        "data.max_seq_len": {"qrandint": [128, 1024, 128]},
    }
    domains = parse_space(space, BASE, "random")
    assert domains["lora.r"] == Domain("choice", (8, 16, 32))
    assert domains["train.lr"] == Domain("loguniform", (1e-5, 5e-4))  # 1e-5 without a dot is a float here
    param_space = to_param_space(domains, "random")
    assert param_space["lora.alpha"] == {"grid_search": [16, 32]}
    assert isinstance(param_space["train.lr"], tune.search.sample.Float)
    assert isinstance(param_space["lora.r"], tune.search.sample.Categorical)
    # search_alg grid enumerates choices too
    assert to_param_space(parse_space({"lora.r": "choice [8, 16]"}, BASE, "grid"), "grid") == {
        "lora.r": {"grid_search": [8, 16]}
    }


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        ({"lora.rank": "choice [8, 16]"}, "space.lora.rank: unknown key; did you mean 'lora.r'?"),
        ({"lora.rnk": "choice [8, 16]"}, "space.lora.rnk: unknown key; did you mean 'lora.r'?"),  # a short key's typo
        ({"data.train.0.limt": "choice [8, 16]"}, "space.data.train.0.limt: unknown key; did you mean "
                                                  "'data.train.0.limit'?"),
        ({"data.train.1.limit": "choice [8, 16]"}, "space.data.train.1.limit: index 1 is out of range: 'data.train' "
                                                   "holds 1 item(s)"),
        ({"lora.r": "choice []"}, "space.lora.r: empty choice"),
        ({"train.lr": "uniform [1e-3, 1e-4]"}, "space.train.lr: uniform needs low < high"),
        ({"train.lr": "loguniform [0, 1e-3]"}, "space.train.lr: loguniform needs low > 0"),
        ({"train.lr": "normal [0, 1]"}, "space.train.lr: unknown form 'normal'"),
        ({"train.lr": "uniform [1e-4]"}, "space.train.lr: uniform takes [low, high] numbers"),
        ({"train.lr": 0.1}, "space.train.lr: expected one of choice"),
        ({"lora.r": "choice [8, -4]"}, "space.lora.r: Input should be greater than 0 (got -4) (value -4)"),
        ({"lora.dropout": "uniform [0.0, 1.5]"}, "space.lora.dropout: Input should be less than 1"),
        ({"train.precision": "choice [bf16, fp8]"}, "space.train.precision: Input should be 'fp32', 'bf16' or 'fp16'"),
        ({}, "space: empty"),
    ],
)
def test_bad_spaces_name_the_yaml_key(space: dict[str, Any], expected: str) -> None:
    problems = problems_of(sweep_raw(space=space))
    assert any(p.startswith(expected) for p in problems), problems


def test_bad_sweep_settings_are_all_reported_together() -> None:
    raw = sweep_raw(scheduler="hyperband", metric="accuracy", num_sampels=4)
    problems = problems_of(raw)
    assert any(p.startswith("scheduler.name: Input should be 'asha', 'fifo', 'pbt' or 'pb2'") for p in problems)
    assert any(p.startswith("metric: 'accuracy' is not an evaluation metric of the base config; choose one of "
                            "eval_loss, eval_ppl, eval_token_accuracy") for p in problems)
    assert any(p.startswith("num_sampels: unknown key; did you mean 'num_samples'?") for p in problems)


def test_sweep_needs_eval_data_workers_and_eval_rounds_for_asha() -> None:
    raw = sweep_raw()
    raw["base"]["data"].pop("eval_fraction")
    raw["base"]["train"].pop("eval_every")
    raw["base"]["scaling"] = {"num_workers": 0}
    problems = problems_of(raw)
    assert any(p.startswith("base.data: the sweep metric eval_loss needs eval data") for p in problems)
    assert any(p.startswith("base.scaling.num_workers:") for p in problems)
    assert any(p.startswith("base.train.eval_every: ASHA compares trials at evaluations") for p in problems)


def test_generation_metrics_are_sweep_metrics() -> None:
    raw = sweep_raw(metric="eval_exact_match")
    assert problems_of(raw) == [
        "metric: 'eval_exact_match' is not an evaluation metric of the base config; choose one of eval_loss, eval_ppl, "
        "eval_token_accuracy (task metrics such as eval_exact_match come from base.eval.generate)"]
    raw["base"]["eval"] = {"generate": {"metrics": [{"type": "exact_match", "extract": r"####\s*(\S+)"}, "rouge_l"]}}
    cfg = parse_sweep(raw)
    assert cfg.metric == "eval_exact_match" and cfg.mode == "max"  # higher is better, without saying so
    assert parse_sweep({**raw, "metric": "eval_rouge_l", "mode": "min"}).mode == "min"  # unless said


def test_search_alg_restrictions() -> None:
    assert "space.lora.r: optuna does not take grid; use choice" in problems_of(
        sweep_raw(search_alg="optuna", space={"lora.r": "grid [8, 16]"})
    )
    assert "space.train.lr: search_alg grid needs choice or grid (got loguniform)" in problems_of(
        sweep_raw(search_alg="grid", space={"train.lr": "loguniform [1e-5, 1e-3]"})
    )


def test_base_by_path_with_overrides_and_set(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    (tmp_path / "s.yaml").write_text(
        "# raysft sweep s.yaml\nbase: base.yaml\nbase_overrides: [train.max_steps=40]\n"
        "space:\n  train.lr: loguniform [1e-5, 1e-3]\n"
    )
    cfg = load_sweep(tmp_path / "s.yaml", ["num_samples=3", "base.train.eval_every=10"])
    assert cfg.base.train.max_steps == 40 and cfg.base.train.eval_every == 10 and cfg.num_samples == 3
    assert cfg.base.data.train[0].path == str(tmp_path / "train.jsonl")  # relative to the base YAML's folder
    assert cfg.mode == "min" and cfg.output_dir == "runs/sweeps/sweep"


def test_bad_base_names_base_keys(tmp_path: Path) -> None:
    raw = sweep_raw()
    raw["base"]["train"]["learning_rate"] = 1e-4
    assert any(p.startswith("base.train.learning_rate: unknown key; did you mean 'base.train.lr'?") for p in problems_of(raw))


def test_trial_config_sets_values_and_writes_into_the_sweep_folder(tmp_path: Path) -> None:
    cfg = parse_sweep(sweep_raw(name="s1", output_dir=str(tmp_path)))
    trial = trial_config(cfg, {"lora.r": 32, "train.lr": 3e-4, "data.train.0.limit": 64}, "trial_00002")
    assert trial.lora.r == 32 and trial.train.lr == 3e-4 and trial.data.train[0].limit == 64  # a list item by index
    assert Path(trial.train.output_dir) == tmp_path.resolve() / "trials" / "trial_00002"
    assert trial.train.resume and trial.tracking.wandb_group == "s1" and trial.tracking.run_name == "trial_00002"


def test_eval_rounds_and_tune_results() -> None:
    assert [eval_round(s, 5) for s in (0, 5, 10, 12)] == [0, 1, 2, 3]
    assert eval_round(7, None) == 1
    assert not is_evaluation({"step": 3, "loss": 1.0}) and is_evaluation({"step": 3, "eval_loss": 2.0})
    assert tune_result({"step": 10, "eval_loss": 2.0}, 5) == {"step": 10, "eval_loss": 2.0, "eval_round": 2}


def test_default_concurrency_fits_each_trials_workers() -> None:
    cfg = parse_sweep(sweep_raw())
    two_cpu_workers = cfg.base.model_copy(update={"scaling": cfg.base.scaling.model_copy(update={"num_workers": 2})})
    assert default_max_concurrent(cfg.base, {"CPU": 8.0}) == 8
    assert default_max_concurrent(two_cpu_workers, {"CPU": 8.0}) == 4
    gpu = cfg.base.model_copy(update={"scaling": cfg.base.scaling.model_copy(update={"use_gpu": True})})
    assert default_max_concurrent(gpu, {"CPU": 64.0, "GPU": 3.0}) == 3
    assert default_max_concurrent(gpu, {"CPU": 64.0}) == 1  # an autoscaling cluster may have no GPU yet


def test_exponent_numbers_are_floats() -> None:
    assert load_yaml_text("a: 1e-4\nb: [3E+2, 7, .5]") == {"a": 1e-4, "b": [300.0, 7, 0.5]}


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_every_shipped_sweep_loads_and_names_its_command(path: Path) -> None:
    assert path.read_text().startswith(f"# raysft sweep sweeps/{path.name}")
    cfg = load_sweep(path)
    assert cfg.space and cfg.base.data.train


def test_sweeps_folder_is_not_empty() -> None:
    assert len(SWEEPS) >= 3


def pbt_raw(mutations: dict[str, Any], name: str = "pbt", **changes: Any) -> dict[str, Any]:
    raw = sweep_raw(scheduler={"name": name, "hyperparam_mutations": mutations}, **changes)
    raw["base"]["train"]["checkpoint_every"] = 5
    return raw


def test_pbt_takes_mutations_in_space_syntax_and_samples_them_when_the_space_does_not() -> None:
    cfg = parse_sweep(pbt_raw({"train.lr": "loguniform [1e-5, 1e-3]", "lora.dropout": {"choice": [0.0, 0.1]}},
                              space={}))
    assert cfg.scheduler.name == "pbt" and cfg.space == {}
    from raysft.tune.config import mutation_domains

    assert mutation_domains(cfg) == {"train.lr": Domain("loguniform", (1e-5, 1e-3)),
                                     "lora.dropout": Domain("choice", (0.0, 0.1))}
    from raysft.tune.pbt import pbt_scheduler

    scheduler = pbt_scheduler(cfg, "board", "/sweeps/pbt")
    assert scheduler._perturbation_interval == 1 and scheduler._time_attr == "eval_round"
    assert isinstance(scheduler._hyperparam_mutations["train.lr"], tune.search.sample.Float)
    assert scheduler.last_round == 4  # max_steps 20 / eval_every 5: the last evaluation is not perturbed
    pb2 = pbt_scheduler(parse_sweep(pbt_raw({"train.lr": "loguniform [1e-5, 1e-3]"}, name="pb2")), "board", "/pb2")
    assert pb2._hyperparam_bounds == {"train.lr": [1e-5, 1e-3]}


@pytest.mark.parametrize("key", ["lora.r", "lora.target_modules", "data.max_seq_len", "model.name_or_path",
                                 "train.micro_batch_size", "train.seed", "train.max_steps"])
def test_pbt_refuses_to_mutate_what_cannot_change_mid_run_naming_the_key(key: str) -> None:
    problems = problems_of(pbt_raw({key: "choice [8, 16]"}))
    assert len(problems) == 1 and problems[0].startswith(f"scheduler.hyperparam_mutations.{key}: cannot change mid-run")
    assert "train.lr" in problems[0]  # ... and it says what may be mutated


def test_pbt_refusals_name_their_keys_before_anything_runs() -> None:
    raw = pbt_raw({"train.lr": "loguniform [0, 1e-3]", "train.weight_decay": "grid [0.0, 0.1]"}, search_alg="optuna")
    raw["base"]["train"]["checkpoint_every"] = 3  # not a divisor of eval_every 5
    problems = problems_of(raw)
    assert any(p.startswith("scheduler.hyperparam_mutations.train.lr: loguniform needs low > 0") for p in problems)
    assert "scheduler.hyperparam_mutations.train.weight_decay: grid is not a mutation; use choice" in problems
    assert any(p.startswith("base.train.checkpoint_every: pbt clones") for p in problems)
    assert any(p.startswith("search_alg: pbt takes random or grid search") for p in problems)
    assert problems_of(sweep_raw(scheduler="pbt"))[-1].startswith("scheduler.hyperparam_mutations: pbt needs")
    assert any(p.startswith("scheduler.hyperparam_mutations.train.lr: pb2 mutates within bounds")
               for p in problems_of(pbt_raw({"train.lr": "choice [1e-4, 1e-3]"}, name="pb2")))
