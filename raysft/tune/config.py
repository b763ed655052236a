"""The sweep config: a base train config, a search space over its fields, and how to search; loaded from
YAML and checked here (`load_sweep`), before any Ray resource starts. The search-space forms are in
raysft.tune.space; running a sweep on Ray Tune is raysft.tune.sweep.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationInfo, field_validator, model_validator

from raysft.config import (
    Config,
    Section,
    apply_overrides,
    metric_mode,
    read_yaml,
    resolve_data_paths,
    to_yaml,
    unknown_metric,
    validate_section,
)
from raysft.errors import ConfigError
from raysft.tune.space import Domain, parse_space


class SchedulerConfig(Section):
    name: Literal["asha", "fifo"] = "asha"
    """asha stops trials that trail at each rung; fifo runs every trial to the end."""
    grace_period: int = Field(default=1, gt=0)
    """Eval rounds every trial runs before ASHA may stop it (an eval round = `train.eval_every` steps)."""
    reduction_factor: float = Field(default=2.0, gt=1.0)
    """At each ASHA rung only the best 1/reduction_factor of trials go on."""
    max_rounds: int | None = Field(default=None, gt=0)
    """Eval rounds of a full trial (ASHA's max_t); default: base max_steps / eval_every."""


class SweepConfig(Section):
    """A hyperparameter sweep: a base train config, a search space over its fields, and how to search."""

    base: Config
    """The train config every trial starts from: a path to a train YAML, or the config inline."""
    space: dict[str, Any]
    """Dotted config key -> search domain, e.g. `lora.r: choice [8, 16, 32]` or `train.lr: {loguniform: [1e-5, 1e-3]}`."""
    name: str = Field(default="sweep", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Sweep name: the default output folder name and the W&B group. Letters, digits, `_`, `.`, `-`
    (it becomes a folder name, so no `/` and no leading `.`)."""
    output_dir: str | None = None
    """Sweep folder: trials/, tune/, results.csv, best/, report.png (default runs/sweeps/<name>)."""
    metric: str = "eval_loss"
    """Evaluation metric that ranks trials and drives early stopping: eval_loss, eval_ppl, eval_token_accuracy, or a
    task metric of the base's `eval.generate` section (eval_exact_match, ...)."""
    mode: Literal["min", "max"] | None = None
    """Whether lower or higher `metric` is better (default: from the metric: min for eval_loss and eval_ppl, max for
    accuracy and the generation metrics)."""
    num_samples: int | None = Field(default=None, gt=0)
    """Trials to sample (each grid point is repeated this often); default 8, or 1 for a pure grid."""
    max_concurrent_trials: int | None = Field(default=None, gt=0)
    """Trials running at once; default: as many as the cluster's resources hold (each trial's workers)."""
    scheduler: SchedulerConfig = SchedulerConfig()
    """Early stopping: `asha` (default) or `fifo`, or a mapping with ASHA's settings."""
    search_alg: Literal["random", "grid", "optuna"] = "random"
    """random: sample each domain (grid forms enumerated); grid: enumerate every choice; optuna: TPE."""
    seed: int = 0
    """Seed of the search (which configurations are sampled)."""

    @field_validator("metric")
    @classmethod
    def _logged_by_the_base(cls, value: str, info: ValidationInfo) -> str:
        base = info.data.get("base")  # absent when the base itself is invalid: reported on its own
        unknown = unknown_metric(base, value, "the base config", "base.eval.generate") if base is not None else None
        if unknown is not None:
            raise ValueError(unknown)
        return value

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler_by_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _defaults(self) -> "SweepConfig":
        if self.mode is None:  # `metric` is one the base logs (checked above), so it has a mode
            self.mode = metric_mode(self.base, self.metric) or "min"
        if self.output_dir is None:
            self.output_dir = f"runs/sweeps/{self.name}"
        return self


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """Load a sweep YAML (its `base` a train YAML path or inline), apply `--set` overrides, and check it all.

    The YAML's optional `base_overrides` (a list of ``dotted.key=value``) adjust the base for this sweep;
    `--set` reaches the base config through `base.`, e.g. ``base.train.max_steps=20``.

    Example:
        >>> cfg = load_sweep("sweeps/lora_rank_lr.yaml", ["num_samples=4"])  # doctest: +SKIP
    """
    path = Path(path)
    raw = read_yaml(path)
    base = raw.get("base")
    if isinstance(base, str):
        base_path = Path(base) if Path(base).is_absolute() else path.parent / base
        raw["base"] = read_yaml(base_path)
        resolve_data_paths(raw["base"], base_path.parent)
    elif isinstance(base, dict):
        resolve_data_paths(base, path.parent)
    else:
        raise ConfigError(["base: expected a train YAML path or an inline train config"], str(path))
    base_overrides = raw.pop("base_overrides", None) or []
    if not isinstance(base_overrides, list):
        raise ConfigError(["base_overrides: expected a list of dotted.key=value for the base config"], str(path))
    apply_overrides(raw["base"], [str(item) for item in base_overrides])
    return parse_sweep(apply_overrides(raw, overrides or []), str(path))


def parse_sweep(raw: dict[str, Any], source: str | None = None) -> SweepConfig:
    """Validate a sweep mapping (base inline): sweep keys, the base config, and every search domain."""
    cfg = validate_section(SweepConfig, raw, source)
    check_sweep(cfg, source)
    return cfg


def check_sweep(cfg: SweepConfig, source: str | None = None) -> dict[str, Domain]:
    """What a sweep needs beyond its types (eval data, workers, eval rounds) and its checked search domains;
    one ConfigError lists every problem."""
    problems = []
    data, train = cfg.base.data, cfg.base.train
    if not data.eval and data.eval_fraction == 0:
        problems.append(f"base.data: the sweep metric {cfg.metric} needs eval data; set data.eval or data.eval_fraction")
    if cfg.base.scaling.num_workers < 1:
        problems.append("base.scaling.num_workers: a sweep trial runs Ray Train workers; set it to 1 or more")
    if cfg.scheduler.name == "asha" and not train.eval_every:
        problems.append("base.train.eval_every: ASHA compares trials at evaluations; set eval_every (e.g. 10)")
    domains: dict[str, Domain] = {}
    try:
        domains = parse_space(cfg.space, cfg.base.model_dump(mode="json"), cfg.search_alg)
    except ConfigError as err:
        problems += err.problems
    if problems:
        raise ConfigError(problems, source)
    return domains


def sweep_yaml(cfg: SweepConfig) -> str:
    """The resolved sweep as YAML, base inline (inline rows summarized as in a run's config.yaml)."""
    data = cfg.model_dump(mode="json", exclude={"base"})
    return yaml.safe_dump({"base": yaml.safe_load(to_yaml(cfg.base)), **data}, sort_keys=False)
