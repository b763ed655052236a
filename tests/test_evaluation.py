"""eval.generate's scoring on hand-written strings: each built-in metric, extraction and normalizers, user
functions, and the checks made before training. Pure Python: no model, no Ray."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

from raysft import evaluation
from raysft.config import GenerateMetricConfig, parse_config
from raysft.data import prompts
from raysft.errors import ConfigError, RunError
from raysft.evaluation import (
    answer,
    check_functions,
    contains,
    exact_match,
    load_function,
    reference_problems,
    rouge_l,
    rouge_l_f1,
    score_generations,
)
from raysft.labels import IGNORE_INDEX
from tests import metric_functions

GSM8K = r"####\s*(-?[\d,.]+)"


def metric(**fields: object) -> GenerateMetricConfig:
    return GenerateMetricConfig.model_validate(fields)


def test_docstring_examples_run() -> None:
    for module in (evaluation, prompts):
        results = doctest.testmod(module)
        assert results.failed == 0 and results.attempted > 0


def test_exact_match_with_the_gsm8k_extractor_and_number_normalizer() -> None:
    em = metric(type="exact_match", extract=GSM8K, normalize=["number"])
    references = ["She makes 9 * 2 = $18.\n#### 18", "#### 1,000", "#### -3", "#### 2.5"]
    predictions = [
        "9 * 2 = 18\n#### 18.",  # trailing period after the number
        "The total is 1000.\n#### 1000",  # thousands separator in the reference only
        "#### 3",  # wrong sign
        "The answer is 2.5",  # no #### at all: nothing extracted, scored 0
    ]
    assert [answer(p, em) for p in predictions] == ["18", "1000", "3", None]
    assert answer(references[1], em) == "1000"
    assert score_generations(predictions, references, [em]) == {"eval_exact_match": 0.5}
    # Without the extractor the whole texts are compared: none are equal.
    assert score_generations(predictions, references, [metric(type="exact_match")]) == {"eval_exact_match": 0.0}


def test_normalizers_one_by_one() -> None:
    def normalized(text: str, *steps: str) -> str | None:
        return answer(text, metric(type="exact_match", **({"normalize": list(steps)} if steps else {})))

    assert normalized("  Paris \n is  big ") == "Paris is big"  # the default: whitespace
    assert normalized("PARIS", "lower") == "paris"
    assert normalized('"Paris."', "strip_punctuation") == "Paris"
    assert normalized("it's", "strip_punctuation") == "it's"  # only at the ends
    assert normalized("$1,234.50", "number") == "1234.5"
    assert normalized("18.00", "number") == "18"
    assert normalized("-7.", "number") == "-7"
    assert normalized("seven", "number") == "seven"  # not a number: unchanged
    assert normalized("", "whitespace") == ""
    assert normalized(" (A.  B) ", "whitespace", "lower", "strip_punctuation") == "a. b"  # in order


def test_extract_takes_the_first_group_of_the_first_match() -> None:
    assert evaluation.extract("#### 3 and #### 4", GSM8K) == "3"
    assert evaluation.extract("answer: Paris", r"answer: \w+") == "answer: Paris"  # no group: the whole match
    assert evaluation.extract("nothing here", GSM8K) is None
    assert evaluation.extract("as is", None) == "as is"


def test_contains() -> None:
    assert contains(["The capital is Paris.", "I think Lyon", "paris"], ["Paris", "Rome", "Paris"]) == pytest.approx(1 / 3)
    lowered = metric(type="contains", normalize=["lower"])
    assert score_generations(["The capital is PARIS."], ["Paris"], [lowered]) == {"eval_contains": 1.0}
    extracted = metric(type="contains", extract=GSM8K)
    assert score_generations(["no marker, but 18"], ["#### 18"], [extracted]) == {"eval_contains": 0.0}


def test_rouge_l_by_hand() -> None:
    # LCS of "the cat sat on the mat" and "the cat is on the mat" is "the cat on the mat": 5 of 6 words each way.
    assert rouge_l_f1("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # Precision 2/2, recall 2/4: F1 = 2 * 1 * 0.5 / 1.5.
    assert rouge_l_f1("a b", "a x b y") == pytest.approx(2 / 3)
    assert rouge_l_f1("b a", "a b") == pytest.approx(0.5)  # a subsequence keeps order
    assert rouge_l_f1("The CAT!", "the cat") == 1.0  # lowercased words, punctuation is not a word
    assert rouge_l_f1("", "a") == rouge_l_f1("x y", "a b") == 0.0
    assert rouge_l(["the cat sat on the mat", "z"], ["the cat is on the mat", "z"]) == pytest.approx((5 / 6 + 1) / 2)


def test_exact_match_argument_checks() -> None:
    assert exact_match(["a", "b"], ["a", "c"]) == 0.5
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        exact_match(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one"):
        rouge_l([], [])


def test_user_functions_by_name_and_as_callables() -> None:
    predictions, references = ["a", "bb"], ["ccc", "d"]
    by_name = metric(function="tests.metric_functions:reference_length")
    assert by_name.type == "function" and by_name.metric_name == "eval_reference_length"
    assert score_generations(predictions, references, [by_name]) == {"eval_reference_length": 2.0}
    as_dict = metric(function=metric_functions.answer_digest, name="answers")  # Python API: the callable itself
    scores = score_generations(predictions, references, [as_dict])
    assert set(scores) == {"eval_answers_digest", "eval_answers_chars"} and scores["eval_answers_chars"] == 3.0
    assert score_generations(["a", "bx"], references, [as_dict])["eval_answers_digest"] != scores["eval_answers_digest"]
    with pytest.raises(RunError, match=r"eval.generate.metrics.0.function: returned 'high'; expected a finite number"):
        score_generations(predictions, references, [metric(function="tests.metric_functions:not_a_number")])


def test_functions_that_do_not_load_are_named_before_training() -> None:
    problems = check_functions([
        metric(function="tests.metric_functions:reference_length"),
        metric(function="no_such_module_here:f"),
        metric(function="tests.metric_functions:missing"),
        metric(function="tests.metric_functions:hashlib"),
    ])
    assert len(problems) == 3
    assert problems[0].startswith("eval.generate.metrics.1.function: cannot import module 'no_such_module_here'")
    assert problems[1] == "eval.generate.metrics.2.function: module 'tests.metric_functions' has no 'missing'"
    assert problems[2] == "eval.generate.metrics.3.function: tests.metric_functions:hashlib is a module, not a function"
    assert load_function(len, "k") is len


def test_references_a_metric_cannot_score_are_named() -> None:
    em = metric(type="exact_match", extract=GSM8K)
    problems = reference_problems(["#### 4", "no answer", "neither"], ["a.jsonl:1", "a.jsonl:2", "a.jsonl:3"],
                                  [metric(type="rouge_l"), em])
    assert problems == ["eval.generate.metrics.1.extract: extract '####\\\\s*(-?[\\\\d,.]+)' does not match the "
                        "reference of 2 of 3 eval prompts, first a.jsonl:2: 'no answer'"]
    assert reference_problems(["  "], ["a.jsonl:1"], [metric(type="exact_match")])[0].startswith(
        "eval.generate.metrics.0.normalize: nothing is left after normalize")


def test_metric_config_shorthands_names_and_refusals() -> None:
    base = {"model": {"name_or_path": "m"}, "data": {"train": {"path": "x"}, "eval_fraction": 0.1}}
    cfg = parse_config({**base, "eval": {"generate": {"metrics": [
        "exact_match", {"type": "exact_match", "name": "gsm8k", "extract": GSM8K}, {"function": "pkg.mod:score"}]}}})
    assert [m.metric_name for m in cfg.eval.generate.metrics] == ["eval_exact_match", "eval_gsm8k", "eval_score"]
    assert parse_config({**base, "eval": {"generate": {}}}).eval.generate.metrics[0].type == "exact_match"

    def problems(generate: dict, **data: object) -> list[str]:
        with pytest.raises(ConfigError) as err:
            parse_config({**base, "data": {**base["data"], **data}, "eval": {"generate": generate}})
        return err.value.problems

    assert problems({"metrics": ["exact_match", "exact_match"]}) == [
        "eval.generate.metrics: metric names must be distinct and not eval_loss, eval_ppl, eval_token_accuracy: "
        "eval_exact_match (set `name:` on each)"]
    assert problems({"metrics": [{"type": "contains", "name": "loss"}]})[0].endswith("eval_loss (set `name:` on each)")
    assert problems({"metrics": [{"type": "exact_match", "extract": "(("}]})[0].startswith(
        "eval.generate.metrics.0.extract: not a valid regular expression")
    assert problems({"metrics": [{"type": "rouge_l", "function": "a:b"}]}) == [
        "eval.generate.metrics.0: function only applies to type function"]
    assert problems({"metrics": [{"function": "a:b", "extract": "x"}]}) == [
        "eval.generate.metrics.0: extract and normalize apply to the built-in types; a function gets the raw texts"]
    assert problems({"metrics": [{"function": "nocolon"}]})[0].startswith(
        "eval.generate.metrics.0.function: expected module:function")
    assert problems({}, train_on_inputs=True) == [
        "eval.generate finds each prompt as the untrained tokens before the last assistant turn, which "
        "data.train_on_inputs: true trains too; set train_on_inputs: false"]
    assert problems({}, eval_fraction=0.0) == [
        "eval.generate scores answers to eval prompts; set data.eval or data.eval_fraction"]


def test_prompt_and_reference_are_split_at_the_last_trained_turn() -> None:
    ignore = IGNORE_INDEX
    ids = np.arange(10, 20)
    # Two assistant turns (multi-turn): the prompt ends where the last one starts; untrained tail after it.
    labels = np.array([ignore, ignore, 12, 13, ignore, ignore, 16, 17, 18, ignore])
    prompt, reference = prompts.last_turn(ids, labels)
    assert prompt.tolist() == list(range(10, 16)) and reference.tolist() == [16, 17, 18]
    assert prompts.last_turn(ids, np.full(10, ignore)) is None  # nothing trained
    assert prompts.last_turn(ids, ids.copy()) is None  # everything trained (text rows): no prompt
