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


def test_gpus_per_worker_is_the_ray_resource_of_train_workers_and_sweep_trials() -> None:
    from raysft.training.trainer import scaling_config
    from raysft.tune.sweep import default_max_concurrent

    raw = {"model": {"name_or_path": "m"}, "data": {"train": {"path": "x.jsonl"}},
           "scaling": {"use_gpu": True, "gpus_per_worker": 0.25, "resources_per_worker": {"CPU": 2}}}
    cfg = parse_config(raw)
    ray_scaling = scaling_config(cfg)
    assert ray_scaling.use_gpu and ray_scaling.resources_per_worker == {"CPU": 2, "GPU": 0.25}
    assert ray_scaling.total_resources == {"CPU": 2.0, "GPU": 0.25}
    assert cfg.scaling.workers_per_gpu == 4
    # A sweep runs as many trials at once as the cluster's GPUs hold at that share (CPUs permitting).
    assert default_max_concurrent(cfg, {"CPU": 16.0, "GPU": 2.0}) == 8
    assert default_max_concurrent(cfg, {"CPU": 6.0, "GPU": 2.0}) == 3
    # use_gpu: false is the CPU switch: no GPU is asked for, whatever the share says.
    on_cpu = parse_config({**raw, "scaling": {**raw["scaling"], "use_gpu": False}})
    assert scaling_config(on_cpu).resources_per_worker == {"CPU": 2} and on_cpu.scaling.workers_per_gpu == 1
    for scaling, message in [
        ({"use_gpu": True, "gpus_per_worker": 1.5}, "scaling.gpus_per_worker: a worker takes a fraction of one GPU"),
        ({"use_gpu": True, "gpus_per_worker": 0}, "scaling.gpus_per_worker"),
        ({"use_gpu": True, "gpus_per_worker": 0.5, "resources_per_worker": {"GPU": 1}},
         "scaling.resources_per_worker: GPU is set by scaling.gpus_per_worker"),
    ]:
        with pytest.raises(ConfigError) as err:
            parse_config({**raw, "scaling": scaling})
        assert any(problem.startswith(message) for problem in err.value.problems), err.value.problems
