"""Config in and out (raysft/config/loading.py): YAML, --set overrides, every problem at once with did-you-mean,
config.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raysft.config import apply_overrides, load_config, parse_config, to_yaml
from raysft.errors import ConfigError
from tests.config import MINIMAL


def write(tmp_path: Path, raw: dict | str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


def test_unknown_key_suggests_the_closest_valid_one() -> None:
    raw = {**MINIMAL, "train": {"learning_rate": 1e-4}, "lora": {"rank": 8}}
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    text = str(err.value)
    assert "train.learning_rate: unknown key" in text
    assert "lora.rank: unknown key" in text
    assert "did you mean 'lora.r'" in text
    assert len(err.value.problems) == 2  # every problem at once, not the first one only


def test_nested_unknown_key_in_a_source_list() -> None:
    raw = {"model": {"name_or_path": "m"}, "data": {"train": [{"path": "a.jsonl", "colums": "x"}]}}
    with pytest.raises(ConfigError, match=r"data\.train\.0\.colums: unknown key"):
        parse_config(raw)


def test_overrides_parse_yaml_values(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text("{}\n")
    cfg = load_config(write(tmp_path, MINIMAL), ["train.lr=1e-4", "lora.r=32", "lora.target_modules=[q_proj, v_proj]"])
    assert cfg.train.lr == 1e-4 and cfg.lora.r == 32 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    # Relative data paths resolve against the YAML's folder.
    assert Path(cfg.data.train[0].path) == tmp_path / "train.jsonl"


def test_override_errors() -> None:
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError) as err:  # the YAML parser's own error would be a traceback
        apply_overrides({}, ["train.lr=[1,", "model.chat_template='{{ x"])
    assert err.value.problems == [
        "--set train.lr: the value '[1,' is not valid YAML (expected the node content, but found '<stream end>'); "
        "close its brackets or quotes, or quote the whole value to give it as text",
        "--set model.chat_template: the value \"'{{ x\" is not valid YAML (found unexpected end of stream); "
        "close its brackets or quotes, or quote the whole value to give it as text",
    ]
    with pytest.raises(ConfigError, match="train.lr.x: unknown key|is not a section"):
        parse_config(apply_overrides({**MINIMAL, "train": {"lr": 1.0}}, ["train.lr.x=1"]))


def test_bad_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  name_or_path: m\ndata: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+: invalid YAML"):
        load_config(path)


def test_saved_config_round_trips_and_summarizes_inline_rows() -> None:
    cfg = parse_config(MINIMAL)
    assert parse_config(yaml.safe_load(to_yaml(cfg))) == cfg
    inline = parse_config({"model": {"name_or_path": "m"}, "data": {"train": {"rows": [{"text": "a"}] * 3}}})
    assert "<3 inline rows>" in to_yaml(inline)


def test_a_run_trained_on_inline_rows_reads_back_for_export(tmp_path: Path) -> None:
    from raysft.infer import run_config

    inline = parse_config({"model": {"name_or_path": "m"}, "lora": {"r": 4},
                           "data": {"train": {"rows": [{"text": "a"}] * 3}, "eval": {"rows": [{"text": "b"}]}}})
    (tmp_path / "config.yaml").write_text(to_yaml(inline))
    again = run_config(tmp_path)
    assert again.model == inline.model and again.lora == inline.lora
    assert again.data.train[0].rows == [] and again.data.eval[0].rows == []


def test_override_indexes_a_list_of_sources() -> None:
    two = {**MINIMAL, "data": {"train": [{"path": "a.jsonl"}, {"path": "b.jsonl", "limit": 5}]}}
    cfg = parse_config(apply_overrides(two, ["data.train.1.limit=7", "data.train.0.format=alpaca"]))
    assert [(s.path, s.limit, s.format) for s in cfg.data.train] == [("a.jsonl", None, "alpaca"), ("b.jsonl", 7, "auto")]
    # One source written as a mapping is the list's item 0.
    one = parse_config(apply_overrides({**MINIMAL, "data": {"train": {"path": "a.jsonl"}}}, ["data.train.0.limit=3"]))
    assert one.data.train[0].limit == 3
    betas = parse_config(apply_overrides({**MINIMAL, "train": {"betas": [0.9, 0.99]}}, ["train.betas.1=0.95"]))
    assert betas.train.betas == (0.9, 0.95)


@pytest.mark.parametrize(
    ("setting", "problem"),
    [
        ("data.train.2.path=c.jsonl", "--set data.train.2.path: index 2 is out of range: 'data.train' holds 1 item(s), "
                                      "numbered from 0; to add items, set the whole list (--set 'data.train=[...]')"),
        ("data.train.path=c.jsonl", "--set data.train.path: 'data.train' is a list; index its items by number, "
                                    "e.g. data.train.0.path"),
    ],
)
def test_override_list_index_errors(setting: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        apply_overrides({**MINIMAL, "data": {"train": [{"path": "a.jsonl"}]}}, [setting])
    assert err.value.problems == [problem]
