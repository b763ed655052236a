"""Metric names: what a run logs, and which way each evaluation metric is better (for checkpoint ranking, early
stopping and sweeps). The console, the tracker, the training loop and the sweep take the names from here."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from raysft.config.schema import Config

EVAL_PREFIX = "eval_"
"""Every evaluation metric's name starts with it (eval_loss, eval_exact_match); a training step's never does."""
EVAL_LOSS = "eval_loss"
"""Logged by every evaluation: what marks a metrics record as an evaluation's, and a sweep's default metric."""
LOSS_METRICS: dict[str, Literal["min", "max"]] = {EVAL_LOSS: "min", "eval_ppl": "min", "eval_token_accuracy": "max"}
"""The evaluation metrics every evaluation logs, with whether lower (min) or higher (max) is better."""
HIDDEN_METRICS = {"epoch", "skipped", "num_tokens", "trained_tokens", "tokens_per_s"}
"""Bookkeeping of a step's record (metrics.jsonl keeps it) that the console's step line does not list by name."""


def is_evaluation_metric(name: str) -> bool:
    return name.startswith(EVAL_PREFIX)


def loss_metrics(loss_sum: float, correct: float, tokens: float) -> dict[str, float]:
    """The LOSS_METRICS of one evaluation from its sums over trained tokens (perplexity capped at e^50).

    Example:
        >>> loss_metrics(20.0, 6.0, 10.0)
        {'eval_loss': 2.0, 'eval_ppl': 7.38905609893065, 'eval_token_accuracy': 0.6}
    """
    loss = loss_sum / max(tokens, 1.0)
    return {EVAL_LOSS: loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_token_accuracy": correct / max(tokens, 1.0)}


def metric_mode(cfg: Config, metric: str) -> Literal["min", "max"] | None:
    """Whether lower ("min") or higher ("max") `metric` is better in a run of `cfg`; None when the run does not
    log it. A function metric that returns a dict logs eval_<name>_<key>: any such key has the function's mode.

    Example:
        >>> metric_mode(cfg, "eval_loss"), metric_mode(cfg, "eval_exact_match")  # doctest: +SKIP
        ('min', 'max')
    """
    if metric in LOSS_METRICS:
        return LOSS_METRICS[metric]
    specs = cfg.eval.generate.metrics if cfg.eval.generate else []
    exact = [spec for spec in specs if metric == spec.metric_name]  # before prefixes: eval_exact_match is not eval_exact_*
    found = exact or [spec for spec in specs if spec.type == "function" and metric.startswith(spec.metric_name + "_")]
    return ("max" if found[0].higher_is_better else "min") if found else None


def unknown_metric(cfg: Config, metric: str, run: str = "this run", generate_key: str = "an eval.generate section"
                   ) -> str | None:
    """Why `metric` cannot be watched in a run of `cfg` (it does not log it), naming those it does; None when it can.

    Example:
        >>> unknown_metric(cfg, "accuracy")  # a run without eval.generate  # doctest: +SKIP
        "'accuracy' is not an evaluation metric of this run; choose one of eval_loss, eval_ppl, eval_token_accuracy
        (task metrics such as eval_exact_match come from an eval.generate section)"
    """
    if metric_mode(cfg, metric) is not None:
        return None
    generated = [m.metric_name for m in cfg.eval.generate.metrics] if cfg.eval.generate else []
    hint = "" if generated else f" (task metrics such as eval_exact_match come from {generate_key})"
    return f"{metric!r} is not an evaluation metric of {run}; choose one of {', '.join([*LOSS_METRICS, *generated])}{hint}"
