"""The sweep config: a base train config, a search space over its fields, and how to search.

Loaded and checked by raysft.tune.sweep (`load_sweep`); the search-space forms are in raysft.tune.space.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from raysft.config import Config, Section


class SchedulerConfig(Section):
    name: Literal["asha", "fifo"] = "asha"
    """asha stops trials that trail at each rung; fifo runs every trial to the end."""
    grace_period: int = Field(default=1, gt=0)
    """Eval rounds every trial runs before ASHA may stop it (an eval round = `train.eval_every` steps)."""
    reduction_factor: float = Field(default=2.0, gt=1.0)
    """At each ASHA rung only the best 1/reduction_factor of trials go on."""
    max_rounds: int | None = Field(default=None, gt=0)
    """Eval rounds of a full trial (ASHA's max_t); default: base max_steps / eval_every."""


SweepMetric = Literal["eval_loss", "eval_ppl", "eval_token_accuracy"]


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
    metric: SweepMetric = "eval_loss"
    """Evaluation metric that ranks trials and drives early stopping."""
    mode: Literal["min", "max"] | None = None
    """Whether lower or higher `metric` is better (default: max for accuracy, min otherwise)."""
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

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler_by_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _defaults(self) -> "SweepConfig":
        if self.mode is None:
            self.mode = "max" if self.metric == "eval_token_accuracy" else "min"
        if self.output_dir is None:
            self.output_dir = f"runs/sweeps/{self.name}"
        return self
