"""The config tree (raysft/config/schema.py): defaults, types and ranges that name their dotted keys, every shipped
example valid."""

from __future__ import annotations

import pytest

from raysft.config import load_config, parse_config
from raysft.errors import ConfigError
from tests.config import MINIMAL
from tests.runs import REPO


def test_defaults_and_single_source_becomes_list() -> None:
    cfg = parse_config(MINIMAL)
    assert cfg.data.train[0].path == "train.jsonl"
    assert cfg.lora.enabled and cfg.lora.target_modules == "all-linear"
    assert cfg.train.precision == "fp32" and cfg.scaling.num_workers == 1


def test_wrong_types_and_ranges_name_their_keys() -> None:
    raw = {**MINIMAL, "train": {"lr": "fast", "micro_batch_size": 0, "precision": "fp8"}}
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    keys = " ".join(err.value.problems)
    for key in ("train.lr", "train.micro_batch_size", "train.precision"):
        assert key in keys


def test_source_needs_exactly_one_origin() -> None:
    with pytest.raises(ConfigError, match="exactly one of path, hf_dataset, rows"):
        parse_config({"model": {"name_or_path": "m"}, "data": {"train": {"path": "a", "hf_dataset": "b"}}})


def test_every_shipped_example_validates() -> None:
    examples = sorted((REPO / "examples").glob("*.yaml"))
    assert examples, "examples/ must ship at least one config"
    for path in examples:
        assert path.read_text().startswith("#"), f"{path} must open with the command that runs it"
        load_config(path)


def test_add_special_tokens_defaults_to_the_fallbacks_needs_and_refuses_blank_or_repeated_tokens() -> None:
    assert parse_config(MINIMAL).model.add_special_tokens is None  # null: the ChatML markers when the fallback needs them
    listed = {**MINIMAL, "model": {"name_or_path": "m", "add_special_tokens": ["<tool_call>", "</tool_call>"]}}
    assert parse_config(listed).model.add_special_tokens == ["<tool_call>", "</tool_call>"]
    with pytest.raises(ConfigError) as err:
        parse_config({**MINIMAL, "model": {"name_or_path": "m", "add_special_tokens": ["<a>", " ", "<a>"]}})
    assert err.value.problems == ["model.add_special_tokens: tokens must not be empty or whitespace (got [' '])"]
    with pytest.raises(ConfigError, match=r"model.add_special_tokens: tokens listed more than once: \['<a>'\]"):
        parse_config({**MINIMAL, "model": {"name_or_path": "m", "add_special_tokens": ["<a>", "<b>", "<a>"]}})
