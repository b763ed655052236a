"""Early stopping (`train.early_stopping`): when a run stops for want of improvement, as a pure state.

The watched metric is the same on every rank (eval loss is all-reduced, generation scores are sent from
rank 0), so every rank updates an identical `Patience` and stops at the same step without a collective of its
own. The state goes into each checkpoint, so a --resume or a worker restart counts on from where the
checkpoint was (the evaluations after it are done again, identically).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from raysft.config import Config, metric_mode
from raysft.errors import RunError


@dataclass(frozen=True)
class Patience:
    """The best value of the watched metric so far and the evaluations since it last improved.

    Example:
        >>> p = Patience("eval_loss", higher=False, min_delta=0.1, patience=2)
        >>> p = p.after(2.0, step=0).after(1.95, step=10).after(1.7, step=20)  # 1.95: not better by > 0.1
        >>> p.best, p.best_step, p.waited, p.exhausted
        (1.7, 20, 0, False)
        >>> p.after(1.8, step=30).after(1.65, step=40).exhausted
        True
    """

    metric: str
    higher: bool
    min_delta: float
    patience: int
    best: float | None = None
    best_step: int | None = None
    waited: int = 0
    """Evaluations since the best one."""

    def improves(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best + self.min_delta if self.higher else value < self.best - self.min_delta

    def after(self, value: float, step: int) -> "Patience":
        """The state after an evaluation at `step` gave `value`."""
        if self.improves(value):
            return replace(self, best=value, best_step=step, waited=0)
        return replace(self, waited=self.waited + 1)

    def after_evaluation(self, scores: dict[str, float], step: int) -> "Patience":
        """:meth:`after` with the watched metric taken from an evaluation's scores."""
        if self.metric not in scores:
            raise RunError(f"train.early_stopping.metric: {self.metric} is not among this evaluation's metrics "
                           f"({', '.join(sorted(scores))})")
        return self.after(scores[self.metric], step)

    @property
    def exhausted(self) -> bool:
        return self.waited >= self.patience

    def reason(self, step: int) -> str:
        """The one line a run that stops at `step` prints and logs."""
        return (f"early stopping at step {step}: {self.metric} did not improve by more than {self.min_delta:g} in "
                f"{self.waited} evaluation(s) (patience {self.patience}); best {self.best:.6g} at step {self.best_step}")

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps."""
        return asdict(self)


def patience_of(cfg: Config, saved: dict[str, Any] | None) -> Patience | None:
    """The run's early-stopping state: continued from a checkpoint's `saved` state when it watched the same
    metric the same way, else fresh (None when the run has no early stopping). The settings (patience,
    min_delta) are always the config's: a resume may change them."""
    settings = cfg.train.early_stopping
    if settings is None:
        return None
    mode = settings.mode or metric_mode(cfg, settings.metric)
    fresh = Patience(settings.metric, higher=mode == "max", min_delta=settings.min_delta, patience=settings.patience)
    if saved and saved.get("metric") == fresh.metric and saved.get("higher") == fresh.higher:
        return replace(fresh, best=saved["best"], best_step=saved["best_step"], waited=saved["waited"])
    return fresh
