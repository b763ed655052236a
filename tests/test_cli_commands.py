"""The CLI teaches itself: --version, examples and defaults in every subcommand's help, `init` configs that pass the
checks at once, `schema`, and `train --check` (the one test here that starts Ray)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jsonschema
import pytest

from raysft.cli import build_parser, main
from raysft.config import load_config, with_absolute_paths
from raysft.starter import FORMATS, METHODS
from raysft.training.preflight import preflight
from tests.runs import assert_refused, cli


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("raysft ") and "torch " in out and "ray " in out


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_subcommand_help_has_examples_and_defaults(name: str) -> None:
    text = subcommands()[name].format_help()
    assert f"examples:\n  raysft {name}" in text
    for action in subcommands()[name]._actions:
        unset = action.default is None or action.default is False or action.default == [] or action.default is argparse.SUPPRESS
        if action.option_strings and not unset:
            assert f"(default: {action.default})" in " ".join(text.split()), (name, action.dest)


def test_generate_help_says_greedy_by_default() -> None:
    text = " ".join(subcommands()["generate"].format_help().split())
    assert "0 decodes greedily" in text and "(default: 0.0)" in text and "sample from" not in text


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("method", METHODS)
def test_init_writes_a_config_that_passes_the_preflight_checks(
    data_format: str, method: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "init", "--format", data_format, "--method", method, "--model", tiny_model_dir,
                         "--out", "cfgs/my.yaml")
    assert code == 0, err
    assert "raysft train cfgs/my.yaml --check" in out
    text = Path("cfgs/my.yaml").read_text()
    assert text.startswith("# yaml-language-server: $schema=") and f"format: {data_format}" in text
    cfg = load_config("cfgs/my.yaml")
    assert Path(cfg.data.train[0].path).is_file()  # the sample, found relative to the config's folder
    assert (cfg.lora.enabled, cfg.model.quantization) == {"lora": (True, "none"), "qlora": (True, "4bit"),
                                                          "full": (False, "none")}[method]
    preflight(with_absolute_paths(cfg))  # model, modules, folders, data sources: no Ray


def test_init_never_overwrites(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "my.yaml"
    config.write_text("mine")
    code, _, err = cli(capsys, "init", "--out", config)
    assert_refused(code, err, "--out", config, "never overwrites")
    assert config.read_text() == "mine"
    code, _, err = cli(capsys, "init", "--out", tmp_path / "b.yaml", "--data", tmp_path / "missing.jsonl")
    assert_refused(code, err, "--data", "missing.jsonl")
    assert not (tmp_path / "b.yaml").exists()


def test_schema_is_a_json_schema_of_the_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert {"model", "data", "lora", "train", "scaling", "tracking", "eval"} <= set(schema["properties"])
    assert main(["schema", "--kind", "sweep"]) == 0
    assert "space" in json.loads(capsys.readouterr().out)["properties"]


def test_train_check_runs_every_check_and_trains_nothing(
    ray_session: None, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["init", "--model", str(tiny_model_dir), "--out", "my.yaml"]) == 0
    capsys.readouterr()
    code = main(["train", "my.yaml", "--check", "--gpu-mem", "24GB", "--set", f"data.cache_dir={tmp_path / 'cache'}"])
    out = capsys.readouterr().out
    assert code == 0
    assert "packed rows" in out and "examples kept" in out  # the data statistics
    assert "memory per GPU for 1 worker(s)" in out and "recommended: " in out  # the plan
    assert "check passed" in out
    assert not (tmp_path / "runs").exists()  # no run folder: nothing trained, nothing written there

    # A check fails as the run would, before training: a batch the data cannot fill.
    code = main(["train", "my.yaml", "--check", "--set", "train.micro_batch_size=1000",
                 "--set", f"data.cache_dir={tmp_path / 'cache'}"])
    assert code == 2
    assert "train.micro_batch_size" in capsys.readouterr().err
