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
    name: Literal["asha", "fifo", "pbt", "pb2"] = "asha"
    """asha stops trials that trail at each rung; fifo runs every trial to the end; pbt (Population Based Training)
    and pb2 (its Bayesian-optimization variant) restart trailing trials from a leading trial's newest checkpoint
    with mutated `hyperparam_mutations` values."""
    grace_period: int = Field(default=1, gt=0)
    """Eval rounds every trial runs before ASHA may stop it (an eval round = `train.eval_every` steps)."""
    reduction_factor: float = Field(default=2.0, gt=1.0)
    """At each ASHA rung only the best 1/reduction_factor of trials go on."""
    max_rounds: int | None = Field(default=None, gt=0)
    """Eval rounds of a full trial (ASHA's max_t); default: base max_steps / eval_every."""
    perturbation_interval: int = Field(default=1, gt=0)
    """pbt/pb2: eval rounds between a trial's exploit/explore decisions."""
    hyperparam_mutations: dict[str, Any] | None = None
    """pbt/pb2: dotted config key -> domain (same syntax as `space`) a trailing trial's value is mutated within, e.g.
    `train.lr: loguniform [1e-5, 1e-3]`; pb2 takes `uniform`/`loguniform` bounds. Only values a restart can change
    (the optimizer's and the schedule's) may be mutated."""
    quantile_fraction: float = Field(default=0.25, gt=0.0, le=0.5)
    """pbt/pb2: the bottom fraction of trials that clone the top fraction at a perturbation."""
    resample_probability: float = Field(default=0.25, ge=0.0, le=1.0)
    """pbt: chance that a mutated value is drawn anew from its domain instead of perturbed (x0.8 / x1.2)."""
    synch: bool = False
    """pbt/pb2: perturb all trials together once every one reached the interval (default: each as it reaches it)."""


class SweepConfig(Section):
    """A hyperparameter sweep: a base train config, a search space over its fields, and how to search."""

    base: Config
    """The train config every trial starts from: a path to a train YAML, or the config inline."""
    space: dict[str, Any] = Field(default_factory=dict)
    """Dotted config key -> search domain, e.g. `lora.r: choice [8, 16, 32]` or `train.lr: {loguniform: [1e-5, 1e-3]}`
    (required, except with a pbt/pb2 scheduler, whose `hyperparam_mutations` domains also give the starting values)."""
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
    if cfg.scheduler.name in ("pbt", "pb2"):
        problems += pbt_problems(cfg)
    domains: dict[str, Domain] = {}
    try:
        if cfg.space or cfg.scheduler.name not in ("pbt", "pb2"):  # PBT may only mutate, from its mutation domains
            domains = parse_space(cfg.space, cfg.base.model_dump(mode="json"), cfg.search_alg)
    except ConfigError as err:
        problems += err.problems
    if problems:
        raise ConfigError(problems, source)
    return domains


# What a trial restarted from another trial's checkpoint may run with differently: the optimizer's and the learning
# rate schedule's settings (applied from the next step: the schedule is a pure function of the step, and the weight
# decay is set again after the optimizer state loads) and the regularizers rebuilt with the model. Anything else is
# fixed by the checkpoint (the adapter's shape, the model, the packed data, the batch) or is not a hyperparameter.
MUTABLE_MID_RUN = (
    "train.lr",
    "train.lr_schedule",
    "train.warmup_steps",
    "train.min_lr_ratio",
    "train.weight_decay",
    "train.max_grad_norm",
    "train.neftune_alpha",
    "lora.dropout",
)
PB2_FORMS = ("uniform", "loguniform", "quniform", "qloguniform", "randint", "qrandint")


def pbt_problems(cfg: SweepConfig) -> list[str]:
    """What a pbt/pb2 sweep needs beyond its types, each problem naming its key."""
    scheduler, train, name = cfg.scheduler, cfg.base.train, cfg.scheduler.name
    problems = []
    if not train.eval_every:
        problems.append(f"base.train.eval_every: {name} compares trials at evaluations; set eval_every (e.g. 10)")
    elif not train.checkpoint_every or train.eval_every % train.checkpoint_every:
        problems.append(f"base.train.checkpoint_every: {name} clones a leading trial's checkpoint at an evaluation, so "
                        f"every evaluation needs one; set checkpoint_every to eval_every ({train.eval_every}) or a "
                        "divisor of it")
    if cfg.search_alg == "optuna":
        problems.append(f"search_alg: {name} takes random or grid search (Tune's PBT cannot follow a searcher's "
                        "suggestions); use random")
    mutations = scheduler.hyperparam_mutations or {}
    if not mutations:
        problems.append(f"scheduler.hyperparam_mutations: {name} needs at least one `dotted.key: domain` to mutate, "
                        "e.g. `train.lr: loguniform [1e-5, 1e-3]`")
    base_raw = cfg.base.model_dump(mode="json")
    for key, spec in mutations.items():
        where = f"scheduler.hyperparam_mutations.{key}"
        if key not in MUTABLE_MID_RUN:
            problems.append(f"{where}: cannot change mid-run: a trial that continues from another trial's checkpoint "
                            "keeps its model, adapter shape, data and batch; mutate only " + ", ".join(MUTABLE_MID_RUN))
            continue
        try:
            (domain,) = parse_space({key: spec}, base_raw, "random").values()
        except ConfigError as err:
            problems += [problem.replace("space.", "scheduler.hyperparam_mutations.", 1) for problem in err.problems]
            continue
        if domain.form == "grid":
            problems.append(f"{where}: grid is not a mutation; use choice")
        elif name == "pb2" and domain.form not in PB2_FORMS:
            problems.append(f"{where}: pb2 mutates within bounds; give `uniform [low, high]` or `loguniform [low, "
                            f"high]` (got {domain.form})")
    return problems


def mutation_domains(cfg: SweepConfig) -> dict[str, Domain]:
    """The checked domains of `scheduler.hyperparam_mutations` (none unless the scheduler is pbt or pb2)."""
    if cfg.scheduler.name not in ("pbt", "pb2"):
        return {}
    return parse_space(cfg.scheduler.hyperparam_mutations or {}, cfg.base.model_dump(mode="json"), "random")


def sweep_yaml(cfg: SweepConfig) -> str:
    """The resolved sweep as YAML, base inline (inline rows summarized as in a run's config.yaml)."""
    data = cfg.model_dump(mode="json", exclude={"base"})
    return yaml.safe_dump({"base": yaml.safe_load(to_yaml(cfg.base)), **data}, sort_keys=False)
