"""The console's lines and tables (raysft/console.py). No Ray: the real runs' console is checked in
tests/test_cli.py."""

from __future__ import annotations

import time

import pytest

from raysft.console import StepClock, eval_line, format_duration, split_line, stats_table, step_line


def test_step_line_shows_progress_loss_throughput_and_eta() -> None:
    metrics = {"loss": 1.23456, "lr": 2e-4, "grad_norm": 0.5, "epoch": 0.25, "tokens_per_s": 12345.6,
               "num_tokens": 4096, "trained_tokens": 900, "skipped": 0.0, "aux_loss": 0.125}
    line = step_line(7, 28, metrics, eta_s=125.0)
    assert line == "step 7/28 (25%)  loss 1.235  lr 2.00e-04  grad_norm 0.5  aux_loss 0.125  tokens/s 12,346  eta 2m05s"
    assert step_line(1, 28, {"loss": 2.0}, eta_s=None).endswith("eta ?")  # no step timed yet
    skipped = step_line(3, 28, {"loss": float("nan"), "skipped": 1.0}, 3.0)
    assert skipped.endswith("(update skipped: non-finite gradients)")
    assert eval_line(28, 28, {"loss": 1.0, "eval_loss": 0.51234, "eval_ppl": 1.67}) == \
        "eval at step 28/28  eval_loss 0.5123  eval_ppl 1.67"
    assert [format_duration(s) for s in (0.4, 59.6, 61, 3599, 3600, 90061)] == \
        ["0s", "1m00s", "1m01s", "59m59s", "1h00m", "25h01m"]


def test_eta_counts_steps_since_the_start_but_not_a_first_evaluation() -> None:
    clock = StepClock(start_step=10)  # resumed at step 10: those steps took no time here
    time.sleep(0.3)
    clock.evaluated(10)  # an evaluation before the first step: not a step's time
    assert clock.eta(10, 20) is None
    time.sleep(0.2)
    eta = clock.eta(12, 20)  # 2 steps in ~0.2 s: 8 steps left, ~0.8 s
    assert eta is not None and 0.7 < eta < 1.6, eta
    clock.evaluated(12)  # a later evaluation is part of the run's pace: it does not restart the clock
    assert clock.eta(12, 20) == pytest.approx(eta, rel=0.5)


def test_stats_table_holds_every_number_of_the_statistics() -> None:
    stats = {
        "rows_read": {"train": 12_345, "eval": 80},
        "counts": {"train": {"over_length_dropped": 12, "truncated": 0, "no_trained_tokens": 3, "invalid_skipped": 1},
                   "eval": {"over_length_dropped": 0, "truncated": 0, "no_trained_tokens": 0, "invalid_skipped": 0}},
        "examples_kept": {"train": 12_329, "eval": 80},
        "token_length_percentiles": {"train": {"p50": 210, "p90": 400, "p99": 801, "max": 1900},
                                     "eval": {"p50": 190, "p90": 350, "p99": 500, "max": 510}},
        "trained_token_fraction": {"train": 0.41234, "eval": 0.4},
        "rows_after_packing": {"train": 3_001, "eval": 20},
        "packing_efficiency": {"train": 0.97123, "eval": 0.95},
        "tokens_after_packing": {"train": 1_591_000, "eval": 9_728},
    }
    lines = stats_table(stats).splitlines()
    assert lines[0].split() == ["train", "eval"]
    assert "rows read                         12,345     80" in lines
    assert "  dropped (over length)               12      0" in lines
    assert "tokens per example, p99              801    500" in lines
    assert "trained tokens                     41.2%  40.0%" in lines
    assert "tokens after packing           1,591,000  9,728" in lines
    assert split_line({k: v["train"] for k, v in stats.items()}) == (
        "12,345 rows read, 12 dropped (over length), 3 dropped (no trained tokens), 1 skipped (invalid), "
        "12,329 examples kept, 3,001 rows 97.1% full")
