"""Early stopping's state (train.early_stopping) without a run: when it stops, which way is better, what a
checkpoint restores. The runs themselves are in test_train.py."""

from __future__ import annotations

import doctest

import pytest

from raysft.config import parse_config
from raysft.errors import RunError
from raysft.training import stopping
from raysft.training.stopping import Patience, patience_of

BASE = {"model": {"name_or_path": "m"}, "data": {"train": {"path": "x"}, "eval_fraction": 0.1},
        "train": {"eval_every": 5}}


def config(early_stopping: dict, **extra: object):  # noqa: ANN201
    return parse_config({**BASE, "train": {**BASE["train"], "early_stopping": early_stopping}, **extra})


def test_docstring_examples_run() -> None:
    results = doctest.testmod(stopping)
    assert results.failed == 0 and results.attempted > 0


def test_stops_after_patience_evaluations_without_improvement() -> None:
    p = Patience("eval_exact_match", higher=True, min_delta=0.0, patience=2).after(0.1, 0)
    p = p.after(0.1, 5)  # equal is not better
    assert p.waited == 1 and not p.exhausted
    p = p.after(0.2, 10)  # better: the count starts again
    assert (p.best, p.best_step, p.waited) == (0.2, 10, 0)
    p = p.after(0.15, 15).after(0.2, 20)
    assert p.exhausted and p.reason(20) == ("early stopping at step 20: eval_exact_match did not improve by more than "
                                           "0 in 2 evaluation(s) (patience 2); best 0.2 at step 10")
    with pytest.raises(RunError, match="train.early_stopping.metric: eval_exact_match is not among"):
        p.after_evaluation({"eval_loss": 1.0}, 25)


def test_direction_follows_the_metric_unless_set() -> None:
    assert not patience_of(config({"metric": "eval_loss"}), None).higher
    assert patience_of(config({"metric": "eval_token_accuracy"}), None).higher
    generate = {"eval": {"generate": {"metrics": ["rouge_l", {"function": "m:errors", "mode": "min"}]}}}
    assert patience_of(config({"metric": "eval_rouge_l"}, **generate), None).higher
    assert not patience_of(config({"metric": "eval_errors"}, **generate), None).higher
    assert not patience_of(config({"metric": "eval_errors_total"}, **generate), None).higher  # a key of its dict
    assert not patience_of(config({"metric": "eval_token_accuracy", "mode": "min"}), None).higher
    assert patience_of(parse_config(BASE), None) is None


def test_a_checkpoint_restores_the_count_unless_the_metric_changed() -> None:
    saved = Patience("eval_loss", higher=False, min_delta=0.0, patience=3).after(2.0, 0).after(2.5, 5).state()
    restored = patience_of(config({"metric": "eval_loss", "patience": 4, "min_delta": 0.1}), saved)
    assert (restored.best, restored.best_step, restored.waited) == (2.0, 0, 1)
    assert (restored.patience, restored.min_delta) == (4, 0.1)  # the settings are the resumed config's
    fresh = patience_of(config({"metric": "eval_ppl"}), saved)
    assert fresh.best is None and fresh.waited == 0
