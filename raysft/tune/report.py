"""Sweep results, read from the sweep folder alone (so `raysft report` works after the cluster is gone).

Writes results.csv (one row per trial), best/ (the best completed trial's adapter and config),
report.png (metric curves per trial; metric vs each swept parameter) and report.md.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from raysft.config import absolute_path
from raysft.errors import RunError
from raysft.fileio import replace_dir_atomically, write_atomically, write_text_atomically
from raysft.run_folder import (
    BEST_DIR,
    CONFIG_FILE,
    FINAL_DIR,
    LINEAGE_FILE,
    METRICS_FILE,
    REPORT_PAGE,
    REPORT_PLOT,
    RESULTS_FILE,
    SWEEP_FILE,
    TRIAL_ERROR_FILE,
    TRIAL_FILE,
    TRIALS_DIR,
    TUNE_DIR,
)
from raysft.track import read_metrics
from raysft.tune.space import parse_domain

STATUSES = ("completed", "stopped_early", "interrupted", "error")


@dataclass(frozen=True)
class TrialSummary:
    """One trial as its folder tells it."""

    name: str
    params: dict[str, Any]
    status: str
    """completed (reached its last step), stopped_early (by the scheduler, or cut off by a killed sweep),
    interrupted (checkpointed when the sweep was stopped by SIGINT/SIGTERM; --resume continues it), error."""
    curve: list[tuple[int, float]]
    """(step, metric) of every evaluation after training began."""
    steps: int
    tokens: int
    wall_s: float
    lineage: tuple[dict[str, Any], ...] = ()
    """PBT: each time the trial continued from another trial's checkpoint (cloned, step, before, after, ...)."""

    @property
    def cloned_from(self) -> str:
        """The lineage in one cell: `trial_00001@20; trial_00003@40` (donor@step)."""
        return "; ".join(f"{entry['cloned']}@{entry['step']}" for entry in self.lineage)

    def best(self, mode: str) -> float | None:
        values = [value for _, value in self.curve]
        return (min(values) if mode == "min" else max(values)) if values else None

    @property
    def last(self) -> float | None:
        return self.curve[-1][1] if self.curve else None


@dataclass(frozen=True)
class SweepResult:
    """What a sweep left behind: every trial, and the best completed one."""

    sweep_dir: Path
    metric: str
    mode: str
    trials: list[TrialSummary]
    best: TrialSummary | None

    @property
    def best_dir(self) -> Path:
        return self.sweep_dir / BEST_DIR


def _read_trial(trial_dir: Path, sweep_dir: Path, metric: str) -> TrialSummary:
    info = json.loads((trial_dir / TRIAL_FILE).read_text())
    metrics_file = trial_dir / METRICS_FILE
    records = read_metrics(metrics_file)  # a trial killed mid-append leaves a torn last line
    if (trial_dir / FINAL_DIR).is_dir():
        status = "completed"
    elif "interrupted" in info:  # written by the stopped sweep, dropped when --resume restarts the trial
        status = "interrupted"
    elif (sweep_dir / TUNE_DIR / trial_dir.name / TRIAL_ERROR_FILE).exists():
        status = "error"
    else:
        status = "stopped_early"
    ended = metrics_file.stat().st_mtime if metrics_file.exists() else info["started"]
    return TrialSummary(
        name=info["name"],
        params=info["params"],
        status=status,
        curve=[(r["step"], r[metric]) for r in records if metric in r and r["step"] > 0],
        steps=max((r["step"] for r in records), default=0),
        tokens=max((int(r["num_tokens"]) for r in records if "num_tokens" in r), default=0),
        wall_s=max(0.0, ended - info["started"]),
        lineage=tuple(info.get("lineage", ())),
    )


def _check_sweep_dir(sweep_dir: Path) -> None:
    if (sweep_dir / SWEEP_FILE).is_file():
        return
    if not sweep_dir.exists():
        why = "does not exist"
    elif not sweep_dir.is_dir():
        why = "is a file"
    elif (sweep_dir / TRIAL_FILE).is_file():
        why = f"is one trial of a sweep; report on the sweep folder {absolute_path(sweep_dir).parent.parent}"
    elif (sweep_dir / CONFIG_FILE).is_file() and (sweep_dir / METRICS_FILE).is_file():
        why = f"looks like a train run, not a sweep; its metrics are in {sweep_dir / METRICS_FILE}"
    else:
        why = "holds no sweep.yaml"
    raise RunError(f"{sweep_dir} is not a sweep folder: it {why}. `raysft report` reads the output_dir of `raysft sweep`.")


def summarize(sweep_dir: str | Path) -> SweepResult:
    """Read every trial of the sweep in `sweep_dir` and pick the best completed one by its final metric."""
    _check_sweep_dir(Path(sweep_dir).expanduser())  # before resolving: errors show the path as given
    sweep_dir = absolute_path(sweep_dir)
    settings = yaml.safe_load((sweep_dir / SWEEP_FILE).read_text())
    metric, mode = settings["metric"], settings["mode"]
    trials = [
        _read_trial(path.parent, sweep_dir, metric) for path in sorted((sweep_dir / TRIALS_DIR).glob(f"*/{TRIAL_FILE}"))
    ]
    # Only a completed trial has a final adapter, and its last evaluation is of exactly that adapter.
    finished = [t for t in trials if t.status == "completed" and t.last is not None]
    sign = 1.0 if mode == "min" else -1.0
    best = min(finished, key=lambda t: sign * float(t.last or 0.0)) if finished else None
    return SweepResult(sweep_dir, metric, mode, trials, best)


def results_csv(result: SweepResult, keys: list[str], pbt: bool = False) -> str:
    """results.csv; a PBT sweep's has a `cloned_from` column (donor@step of each exploit, see lineage.jsonl)."""
    out = io.StringIO()
    writer = csv.writer(out)
    lineage = ["cloned_from"] if pbt else []
    writer.writerow(["trial", "status", *keys, *lineage, f"best_{result.metric}", f"last_{result.metric}", "steps",
                     "tokens", "wall_s"])
    for t in result.trials:
        cloned = [t.cloned_from] if pbt else []
        writer.writerow([t.name, t.status, *(t.params.get(k) for k in keys), *cloned, t.best(result.mode), t.last,
                         t.steps, t.tokens, round(t.wall_s, 1)])
    return out.getvalue()


def lineage_lines(result: SweepResult) -> str:
    """lineage.jsonl: every exploit of the sweep in time order, each naming the trial that continued."""
    entries = sorted(({"trial": t.name, **entry} for t in result.trials for entry in t.lineage),
                     key=lambda entry: entry.get("time", 0.0))
    return "".join(json.dumps(entry) + "\n" for entry in entries)


def _copy_best(result: SweepResult) -> None:
    """best/ = the best trial's final adapter + its config and metrics; replaced whole, never half-written."""
    if result.best is None:
        return
    trial_dir = result.sweep_dir / TRIALS_DIR / result.best.name
    staging = result.sweep_dir / ".best.tmp"
    shutil.rmtree(staging, ignore_errors=True)  # what a killed report left; raysft's own name
    shutil.copytree(trial_dir / FINAL_DIR, staging)
    for name in (CONFIG_FILE, METRICS_FILE, TRIAL_FILE):
        shutil.copy2(trial_dir / name, staging / name)
    replace_dir_atomically(staging, result.best_dir)


def _plot(result: SweepResult, space: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    keys = list(space)
    fig, axes = plt.subplots(1, 1 + len(keys), figsize=(5 * (1 + len(keys)), 4), squeeze=False)
    curves = axes[0][0]
    for t in result.trials:
        if t.curve:
            steps, values = zip(*t.curve)
            curves.plot(steps, values, marker=".", linestyle="-" if t.status == "completed" else ":", label=t.name)
    curves.set(title=f"{result.metric} per trial (dotted: stopped early)", xlabel="step", ylabel=result.metric)
    if curves.lines:  # a legend of no curve is a warning
        curves.legend(fontsize="x-small")
    for ax, key in zip(axes[0][1:], keys):
        domain, _ = parse_domain(key, space[key])
        points = [(t.params.get(key), t.best(result.mode)) for t in result.trials if t.best(result.mode) is not None]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x, _ in points)
        if numeric:
            ax.scatter([x for x, _ in points], [y for _, y in points])
            if domain is not None and domain.form.endswith("loguniform"):
                ax.set_xscale("log")
        else:
            labels = sorted({str(x) for x, _ in points})
            ax.scatter([labels.index(str(x)) for x, _ in points], [y for _, y in points])
            ax.set_xticks(range(len(labels)), labels)
        ax.set(title=f"best {result.metric} vs {key}", xlabel=key, ylabel=result.metric)
    fig.tight_layout()
    write_atomically(path, lambda staging: fig.savefig(staging, dpi=100, format="png"))
    plt.close(fig)


def _markdown(result: SweepResult, keys: list[str], pbt: bool = False) -> str:
    def show(value: float | None) -> str:
        return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"

    lines = [f"# Sweep {result.sweep_dir.name}", ""]
    counts = {s: sum(t.status == s for t in result.trials) for s in STATUSES}
    lines.append(f"{len(result.trials)} trials: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + ".")
    if result.best is not None:
        params = ", ".join(f"`{k}={v}`" for k, v in result.best.params.items())
        lines.append(f"Best ({result.mode} {result.metric}): **{result.best.name}** with {params}: "
                     f"{result.metric} {show(result.best.last)}; adapter and config in `best/`.")
    lines += ["", "![report](report.png)", ""]
    lineage = ["cloned from (trial@step)"] if pbt else []
    lines.append("| " + " | ".join(["trial", "status", *keys, *lineage]) +
                 f" | best {result.metric} | last {result.metric} | steps | tokens | wall s |")
    lines.append("|" + "---|" * (len(keys) + len(lineage) + 7))
    for t in result.trials:
        cells = [t.name, t.status, *(str(t.params.get(k)) for k in keys), *([t.cloned_from] if pbt else []),
                 show(t.best(result.mode)), show(t.last), str(t.steps), str(t.tokens), f"{t.wall_s:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(sweep_dir: str | Path) -> SweepResult:
    """(Re)write results.csv, best/, report.png and report.md of the sweep in `sweep_dir`.

    Example:
        >>> from raysft.tune.report import write_report
        >>> write_report("runs/sweeps/lora_rank_lr").best  # doctest: +SKIP
    """
    result = summarize(sweep_dir)
    settings = yaml.safe_load((result.sweep_dir / SWEEP_FILE).read_text())
    space = settings["space"]
    mutated = settings.get("scheduler", {}).get("hyperparam_mutations") or {}
    keys = [*space, *(key for key in mutated if key not in space)]
    space = {**space, **{key: mutated[key] for key in keys if key not in space}}
    pbt = settings.get("scheduler", {}).get("name") in ("pbt", "pb2")
    write_text_atomically(result.sweep_dir / RESULTS_FILE, results_csv(result, keys, pbt))
    if pbt:
        write_text_atomically(result.sweep_dir / LINEAGE_FILE, lineage_lines(result))
    _copy_best(result)
    _plot(result, space, result.sweep_dir / REPORT_PLOT)
    write_text_atomically(result.sweep_dir / REPORT_PAGE, _markdown(result, keys, pbt))
    return result
