"""raysft's console: its own lines (`say`), the step, evaluation and data-stage lines and `raysft data`'s table,
and what it quiets of the libraries it runs (progress bars, deprecation warnings, loggers) unless `--verbose`.

What it quiets of Ray itself (the output Ray forwards from its processes, Ray Train's loggers) is in
raysft/ray_session.py; where metrics are recorded (metrics.jsonl, TensorBoard, W&B, MLflow), in raysft/track.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any

from raysft.config import HIDDEN_METRICS, is_evaluation_metric

CONSOLE_PREFIX = "[raysft] "
VERBOSE_ENV = "RAYSFT_VERBOSE"
"""Set to 1 (what `--verbose` does) to keep what raysft quiets by default: Ray's and Ray Train's info lines,
Ray Data's progress, transformers' progress bars and deprecation warnings."""


def verbose() -> bool:
    """Whether this process runs verbose (RAYSFT_VERBOSE=1)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def say(text: str) -> None:
    """One line of raysft's own on the console (stderr: progress, beside the results a command prints on stdout).

    Written to the stream, not with print(): a Ray Train worker replaces print() with one that writes the
    line and also logs it to its console handler, so every printed line reached the driver twice.
    """
    sys.stderr.write(f"{CONSOLE_PREFIX}{text}\n")
    sys.stderr.flush()


def format_duration(seconds: float) -> str:
    """Seconds as a short duration.

    Example:
        >>> format_duration(5.2), format_duration(65), format_duration(7384)
        ('5s', '1m05s', '2h03m')
    """
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class StepClock:
    """Wall time per step since training (re)started, for the ETA: the average over every step so far, evaluations
    included (they recur), the model load and an evaluation before the first step not (they do not)."""

    def __init__(self, start_step: int) -> None:
        self.start_step, self.started = start_step, time.monotonic()

    def evaluated(self, step: int) -> None:
        if step == self.start_step:
            self.started = time.monotonic()

    def eta(self, step: int, total: int) -> float | None:
        done = step - self.start_step
        return (time.monotonic() - self.started) / done * max(total - step, 0) if done > 0 else None


# The step line shows loss, lr and throughput in this order and form, then the rest of a record (other than
# HIDDEN_METRICS) as `name value`.
def step_line(step: int, total: int, metrics: dict[str, float], eta_s: float | None) -> str:
    """The console line of one logged training step.

    Example:
        >>> step_line(3, 28, {"loss": 1.23456, "lr": 2e-4, "grad_norm": 0.5, "tokens_per_s": 1234.5}, 65.0)
        'step 3/28 (11%)  loss 1.235  lr 2.00e-04  grad_norm 0.5  tokens/s 1,234  eta 1m05s'
    """
    parts = [f"step {step}/{total} ({step / max(total, 1):.0%})"]
    if "loss" in metrics:
        parts.append(f"loss {_fmt(metrics['loss'])}")
    if "lr" in metrics:
        parts.append(f"lr {metrics['lr']:.2e}")
    parts += [f"{name} {_fmt(value)}" for name, value in metrics.items()
              if name not in HIDDEN_METRICS | {"loss", "lr"} and not is_evaluation_metric(name)]
    if "tokens_per_s" in metrics:
        parts.append(f"tokens/s {metrics['tokens_per_s']:,.0f}")
    parts.append(f"eta {format_duration(eta_s)}" if eta_s is not None else "eta ?")
    if metrics.get("skipped"):
        parts.append("(update skipped: non-finite gradients)")
    return "  ".join(parts)


def eval_line(step: int, total: int, metrics: dict[str, float]) -> str:
    """The console line of one evaluation.

    Example:
        >>> eval_line(0, 28, {"eval_loss": 2.0712, "eval_ppl": 7.93})
        'eval at step 0/28  eval_loss 2.071  eval_ppl 7.93'
    """
    shown = "  ".join(f"{name} {_fmt(value)}" for name, value in metrics.items() if is_evaluation_metric(name))
    return f"eval at step {step}/{total}  {shown}"


# What each DataStats count means, as the console and `raysft data` say it (another count shows as its key).
COUNT_LABELS = {
    "invalid_skipped": "skipped (invalid)",
    "over_length_dropped": "dropped (over length)",
    "truncated": "truncated",
    "no_trained_tokens": "dropped (no trained tokens)",
}


def split_line(info: dict[str, Any]) -> str:
    """One split's statistics (a DataStats column) on one line: rows in, what the length policy did, rows out.

    Example:
        >>> split_line({"rows_read": 48, "examples_kept": 44, "rows_after_packing": 12, "packing_efficiency": 0.971,
        ...             "counts": {"over_length_dropped": 4, "truncated": 0}})
        '48 rows read, 4 dropped (over length), 44 examples kept, 12 rows 97.1% full'
    """
    counts = [f"{count:,} {COUNT_LABELS.get(name, name)}" for name, count in info.get("counts", {}).items() if count]
    return ", ".join([f"{info['rows_read']:,} rows read", *counts, f"{info['examples_kept']:,} examples kept",
                      f"{info['rows_after_packing']:,} rows {info['packing_efficiency']:.1%} full"])


def stats_table(stats: dict[str, dict[str, Any]]) -> str:
    """DataStats (as data_stats.json holds it) as a table, one column per split.

    Example:
        >>> print(stats_table({"rows_read": {"train": 48}, "counts": {"train": {"truncated": 3}},
        ...                    "examples_kept": {"train": 48}, "token_length_percentiles": {"train": {"p50": 210}},
        ...                    "trained_token_fraction": {"train": 0.4123}, "rows_after_packing": {"train": 12},
        ...                    "packing_efficiency": {"train": 0.97}, "tokens_after_packing": {"train": 2980}}))
                                 train
        rows read                   48
          truncated                  3
        examples kept               48
        tokens per example, p50    210
        trained tokens           41.2%
        packed rows                 12
        packing efficiency       97.0%
        tokens after packing     2,980
    """
    splits = list(stats.get("rows_read", {}))
    rows: list[tuple[str, list[str]]] = []

    def add(label: str, values: dict[str, Any], form: str = "{:,}") -> None:
        rows.append((label, [form.format(values[split]) if split in values else "-" for split in splits]))

    add("rows read", stats.get("rows_read", {}))
    count_names = list(dict.fromkeys(name for split in splits for name in stats.get("counts", {}).get(split, {})))
    for name in count_names:
        add(f"  {COUNT_LABELS.get(name, name)}", {split: stats["counts"][split].get(name, 0) for split in splits})
    add("examples kept", stats.get("examples_kept", {}))
    percentiles = stats.get("token_length_percentiles", {})
    for name in dict.fromkeys(name for split in splits for name in percentiles.get(split, {})):
        add(f"tokens per example, {name}",
            {split: percentiles[split][name] for split in splits if name in percentiles.get(split, {})})
    add("trained tokens", stats.get("trained_token_fraction", {}), "{:.1%}")
    add("packed rows", stats.get("rows_after_packing", {}))
    add("packing efficiency", stats.get("packing_efficiency", {}), "{:.1%}")
    add("tokens after packing", stats.get("tokens_after_packing", {}))
    label_width = max(len(label) for label, _ in rows)
    widths = [max(len(split), *(len(values[i]) for _, values in rows)) + 2 for i, split in enumerate(splits)]
    lines = [" " * label_width + "".join(split.rjust(width) for split, width in zip(splits, widths))]
    lines += [label.ljust(label_width) + "".join(value.rjust(width) for value, width in zip(values, widths))
              for label, values in rows]
    return "\n".join(line.rstrip() for line in lines)


def interactive() -> bool:
    """Whether both output streams are terminals: elsewhere (a file, a pipe, `ray job logs`) a progress bar's
    carriage returns pile up as one endless line, so no bars."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def set_progress_bars(on: bool) -> None:
    """transformers' and the Hugging Face hub's tqdm bars ("Loading weights", downloads) on or off in this process
    (a transformers imported later takes the hub's setting)."""
    import huggingface_hub.utils

    if on:
        huggingface_hub.utils.enable_progress_bars()
    else:
        huggingface_hub.utils.disable_progress_bars()
    if "transformers" in sys.modules:
        import transformers.utils.logging

        (transformers.utils.logging.enable_progress_bar if on else transformers.utils.logging.disable_progress_bar)()


def _progress_bars_on() -> bool:
    import huggingface_hub.utils

    if "transformers" in sys.modules:
        import transformers.utils.logging

        return transformers.utils.logging.is_progress_bar_enabled()
    return not huggingface_hub.utils.are_progress_bars_disabled()


def hide_deprecations() -> None:
    """Deprecation notices of the libraries raysft calls (FutureWarning, DeprecationWarning, Ray's
    RayDeprecationWarning) concern raysft's code, which pins and tests those versions, not a user's run."""
    if "ray" in sys.modules:  # Ray adds its own filter for its deprecations when imported: ours go in front
        import ray.util.annotations  # noqa: F401
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


_quiet_console = False  # inside console_mode, not verbose


def after_ray_import() -> None:
    """Ray adds a filter of its own for its deprecation warnings when first imported, in front of raysft's: a
    quiet console puts its own back in front (ensure_ray calls this once Ray is imported)."""
    if _quiet_console:
        hide_deprecations()


# Loggers whose notices say nothing a user of raysft can act on: bitsandbytes on CPUs without its optional
# `kernels` package ("Failed to load CPU gemm_4bit_forward"), which falls back to its own CPU code.
QUIET_LOGGERS = {"bitsandbytes": logging.ERROR}


@contextlib.contextmanager
def console_mode(verbose_run: bool) -> Iterator[None]:
    """The console of a raysft command, for as long as it runs (the previous settings come back after, so a
    command run in-process, as tests do, leaves nothing behind).

    Quiet (the default): transformers' progress bars, deprecation warnings, and the notices of QUIET_LOGGERS
    off here; Ray, Ray Train and Ray Data keep to warnings, in this process and the ones Ray starts
    (`train_log_level`, `quiet_worker`, `filter_worker_logs`, raysft.ray_session's `ensure_ray` and
    `quiet_data_context`). Verbose (`--verbose`, RAYSFT_VERBOSE=1): all of it as the libraries print it, except
    progress bars when the output is not a terminal.
    """
    names = (VERBOSE_ENV, "RAY_COLOR_PREFIX")
    saved_env = {name: os.environ.get(name) for name in names}
    saved_levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    bars_were_on = _progress_bars_on()
    os.environ[VERBOSE_ENV] = "1" if verbose_run else "0"
    if not interactive():
        # Ray colours each forwarded line's "(name pid=...)" prefix with escape codes, also into files and pipes.
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    global _quiet_console
    try:
        with warnings.catch_warnings():
            if not verbose_run or not interactive():
                set_progress_bars(False)
            if not verbose_run:
                _quiet_console = True
                hide_deprecations()
                for name, level in QUIET_LOGGERS.items():
                    logging.getLogger(name).setLevel(level)
            yield
    finally:
        _quiet_console = False
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)
        set_progress_bars(bars_were_on)



def _fmt(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
