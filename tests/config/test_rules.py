"""Rules that span config sections (raysft/config/rules.py), refused before Ray starts with their keys named."""

from __future__ import annotations

import pytest

from raysft.config import check_batch_fits, flatten, parse_config, public_tree
from raysft.config.rules import check_resume_changes, lora_target_problems, seq_len_problem
from raysft.errors import ConfigError
from tests.config import MINIMAL


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


def test_the_data_must_hold_one_global_batch() -> None:
    cfg = parse_config({**MINIMAL, "train": {"micro_batch_size": 2, "grad_accum_steps": 3},
                        "scaling": {"num_workers": 2}})
    check_batch_fits(cfg, 12)  # 2 workers x 2 rows x 3 micro-batches: exactly one step
    with pytest.raises(ConfigError) as err:
        check_batch_fits(cfg, 11)
    assert err.value.problems == [
        "train.global_batch_size: the training data packs into 11 row(s), but one optimizer step needs 12 "
        "(train.global_batch_size, by default scaling.num_workers x train.micro_batch_size x train.grad_accum_steps "
        "= 2 x 2 x 3); lower those or add data"]


def test_the_model_bounds_seq_len_and_names_lora_targets() -> None:
    cfg = parse_config({**MINIMAL, "data": {**MINIMAL["data"], "max_seq_len": 4096},
                        "lora": {"target_modules": ["q_proj", "qq_proj"], "modules_to_save": ["lm_head"]}})
    assert seq_len_problem(cfg, None) is None and seq_len_problem(cfg, 4096) is None  # unknown, or enough
    assert seq_len_problem(cfg, 2048) == ("data.max_seq_len: 4096 is beyond the 2048 positions the model was built "
                                          "for (max_position_embeddings); lower it")
    names = {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "lm_head"}
    assert lora_target_problems(cfg, names, {"q_proj", "v_proj", "lm_head"}) == [
        "lora.target_modules: 'qq_proj' matches no module of some/model (its linear layers: lm_head, q_proj, v_proj; "
        "or use target_modules: all-linear)"]
    full = parse_config({**MINIMAL, "lora": {"enabled": False, "target_modules": ["qq_proj"]}})
    assert lora_target_problems(full, names, set()) == []  # no adapters, nothing to find


def test_a_resume_may_change_how_long_and_how_visibly_not_what_a_step_computes() -> None:
    before = flatten(public_tree(parse_config(MINIMAL)))
    longer = flatten(public_tree(parse_config({**MINIMAL, "train": {"max_steps": 50, "early_stopping": None},
                                               "tracking": {"run_name": "longer"}})))
    assert check_resume_changes(before, longer, "runs/x") == {
        "train.max_steps": {"from": before["train.max_steps"], "to": 50},
        "tracking.run_name": {"from": None, "to": "longer"}}
    other = flatten(public_tree(parse_config({**MINIMAL, "train": {"lr": 0.5, "max_steps": 50}})))
    with pytest.raises(ConfigError) as err:
        check_resume_changes(before, other, "runs/x")
    assert err.value.problems == [
        f"train.lr: the run in runs/x was started with {before['train.lr']!r}, not 0.5; a resume continues the same "
        "training, so this cannot change (set it back, or start a new train.output_dir)"]
