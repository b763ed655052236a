"""The typed config: YAML, --set overrides, and errors that name the dotted key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raysft.config import (
    ConfigError,
    apply_overrides,
    load_config,
    parse_config,
    to_yaml,
)
from tests.runs import REPO

MINIMAL = {"model": {"name_or_path": "some/model"}, "data": {"train": {"path": "train.jsonl"}}}


def write(tmp_path: Path, raw: dict | str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


def test_defaults_and_single_source_becomes_list() -> None:
    cfg = parse_config(MINIMAL)
    assert cfg.data.train[0].path == "train.jsonl"
    assert cfg.lora.enabled and cfg.lora.target_modules == "all-linear"
    assert cfg.train.precision == "fp32" and cfg.scaling.num_workers == 1


def test_unknown_key_suggests_the_closest_valid_one() -> None:
    raw = {**MINIMAL, "train": {"learning_rate": 1e-4}, "lora": {"rank": 8}}
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    text = str(err.value)
    assert "train.learning_rate: unknown key" in text
    assert "lora.rank: unknown key" in text
    assert "did you mean 'lora.r'" in text
    assert len(err.value.problems) == 2  # every problem at once, not the first one only


def test_wrong_types_and_ranges_name_their_keys() -> None:
    raw = {**MINIMAL, "train": {"lr": "fast", "micro_batch_size": 0, "precision": "fp8"}}
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    keys = " ".join(err.value.problems)
    for key in ("train.lr", "train.micro_batch_size", "train.precision"):
        assert key in keys


def test_nested_unknown_key_in_a_source_list() -> None:
    raw = {"model": {"name_or_path": "m"}, "data": {"train": [{"path": "a.jsonl", "colums": "x"}]}}
    with pytest.raises(ConfigError, match=r"data\.train\.0\.colums: unknown key"):
        parse_config(raw)


def test_source_needs_exactly_one_origin() -> None:
    with pytest.raises(ConfigError, match="exactly one of path, hf_dataset, rows"):
        parse_config({"model": {"name_or_path": "m"}, "data": {"train": {"path": "a", "hf_dataset": "b"}}})


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


def test_every_shipped_example_validates() -> None:
    examples = sorted((REPO / "examples").glob("*.yaml"))
    assert examples, "examples/ must ship at least one config"
    for path in examples:
        assert path.read_text().startswith("#"), f"{path} must open with the command that runs it"
        load_config(path)


def test_lora_variants_and_neftune_default_off_and_their_refusals() -> None:
    cfg = parse_config(MINIMAL)
    assert not cfg.lora.use_dora and not cfg.lora.use_rslora and cfg.train.neftune_alpha is None
    on = parse_config({**MINIMAL, "lora": {"use_dora": True, "use_rslora": True}, "train": {"neftune_alpha": 5}})
    assert on.lora.use_dora and on.lora.use_rslora and on.train.neftune_alpha == 5.0

    with pytest.raises(ConfigError) as err:  # meaningless without adapters: both named, together
        parse_config({**MINIMAL, "lora": {"enabled": False, "use_dora": True, "use_rslora": True}})
    assert err.value.problems == [
        "lora.use_dora: only applies with lora.enabled: true (a full fine-tune has no adapters)",
        "lora.use_rslora: only applies with lora.enabled: true (a full fine-tune has no adapters)",
    ]
    qdora = {**MINIMAL, "model": {"name_or_path": "m", "quantization": "4bit"}, "lora": {"use_dora": True}}
    with pytest.raises(ConfigError, match=r"lora.use_dora on a 4-bit base .* needs CUDA GPUs \(scaling.use_gpu: true\)"):
        parse_config(qdora)
    assert parse_config({**qdora, "scaling": {"use_gpu": True}}).lora.use_dora  # the GPU path is allowed
    with pytest.raises(ConfigError, match=r"train.neftune_alpha: Input should be greater than 0"):
        parse_config({**MINIMAL, "train": {"neftune_alpha": 0}})
    with pytest.raises(ConfigError, match=r"did you mean 'train.neftune_alpha'"):  # TRL's name
        parse_config({**MINIMAL, "train": {"neftune_noise_alpha": 5}})


def test_add_special_tokens_defaults_to_the_fallbacks_needs_and_refuses_blank_or_repeated_tokens() -> None:
    assert parse_config(MINIMAL).model.add_special_tokens is None  # null: the ChatML markers when the fallback needs them
    listed = {**MINIMAL, "model": {"name_or_path": "m", "add_special_tokens": ["<tool_call>", "</tool_call>"]}}
    assert parse_config(listed).model.add_special_tokens == ["<tool_call>", "</tool_call>"]
    with pytest.raises(ConfigError) as err:
        parse_config({**MINIMAL, "model": {"name_or_path": "m", "add_special_tokens": ["<a>", " ", "<a>"]}})
    assert err.value.problems == ["model.add_special_tokens: tokens must not be empty or whitespace (got [' '])"]
    with pytest.raises(ConfigError, match=r"model.add_special_tokens: tokens listed more than once: \['<a>'\]"):
        parse_config({**MINIMAL, "model": {"name_or_path": "m", "add_special_tokens": ["<a>", "<b>", "<a>"]}})


def test_early_stopping_and_checkpoint_score_name_an_evaluation_metric() -> None:
    evaluating = {**MINIMAL, "data": {**MINIMAL["data"], "eval_fraction": 0.1}}
    with pytest.raises(ConfigError) as err:  # no train.eval_every, no eval data: refused before Ray starts
        parse_config({**MINIMAL, "train": {"early_stopping": {"metric": "eval_loss"}}})
    assert err.value.problems == [
        "train.early_stopping watches evaluations; set train.eval_every and eval data (data.eval or "
        "data.eval_fraction), or remove train.early_stopping"]
    with pytest.raises(ConfigError) as err:
        parse_config({**evaluating, "train": {"eval_every": 5, "checkpoint_score": "eval_exact_match",
                                              "early_stopping": {"metric": "eval_exact_match"}}})
    assert err.value.problems == [
        f"train.{key}: 'eval_exact_match' is not an evaluation metric of this run; choose one of eval_loss, eval_ppl, "
        "eval_token_accuracy (task metrics such as eval_exact_match come from an eval.generate section)"
        for key in ("checkpoint_score", "early_stopping.metric")]
    cfg = parse_config({**evaluating, "train": {"eval_every": 5, "checkpoint_score": "eval_exact_match", "final": "best",
                                                "early_stopping": {"metric": "eval_exact_match", "patience": 2}},
                        "eval": {"generate": {"metrics": ["exact_match"]}}})
    assert cfg.train.early_stopping.patience == 2 and cfg.train.checkpoint_score == "eval_exact_match"
    with pytest.raises(ConfigError, match=r"train.early_stopping.patiense: unknown key; did you mean "
                                          r"'train.early_stopping.patience'"):
        parse_config({**evaluating, "train": {"eval_every": 5, "early_stopping": {"patiense": 2}}})


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
