"""Where metrics go: metrics.jsonl (always), TensorBoard, W&B and MLflow (raysft/mlflow_run.py), and the console's
step and evaluation lines (raysft/console.py). Rank 0 only.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from raysft.config import Config, flatten, is_evaluation_metric, public_tree
from raysft.console import StepClock, eval_line, say, step_line
from raysft.fileio import write_error
from raysft.mlflow_run import MlflowRun, open_mlflow_run
from raysft.run_folder import METRICS_FILE, MLFLOW_DIR, TENSORBOARD_DIR

log = logging.getLogger(__name__)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every record of a metrics.jsonl ([] when there is none yet).

    A line that does not parse is what a crash or a full disk leaves while appending (a torn last
    line): it is dropped with a warning, never trusted and never fatal, so the run stays resumable.
    """
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or "step" not in record:
            log.warning("%s:%d: dropping a partial or damaged metrics line (%.60r)", path, number, line)
            continue
        records.append(record)
    return records


class Tracker:
    """Fan one metrics dict out to every enabled sink. W&B runs offline when no API key is set.

    `output_dir` is where rank 0 writes (the run folder, or a scratch copy of one in object storage);
    `location` is the run folder itself (a path or a URI), where the MLflow run's id is recorded.
    """

    def __init__(self, cfg: Config, output_dir: Path, total_steps: int, location: str, start_step: int = 0):
        self.total_steps = total_steps
        self.console = cfg.tracking.console
        self.clock = StepClock(start_step)
        self.metrics_file = (output_dir / METRICS_FILE).open("a", buffering=1)
        self.tensorboard = None
        self.wandb_run = None
        self.mlflow: MlflowRun | None = None
        run_name = cfg.tracking.run_name or Path(cfg.train.output_dir).name
        if cfg.tracking.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(output_dir / TENSORBOARD_DIR))
        if cfg.tracking.wandb:
            import wandb

            # The key is read by wandb from the environment; it never passes through raysft's config or logs.
            self.wandb_run = wandb.init(
                project=cfg.tracking.wandb_project,
                group=cfg.tracking.wandb_group,
                name=run_name,
                dir=str(output_dir),
                # An explicit WANDB_MODE wins; otherwise offline unless there is a key to sync with.
                mode=os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline"),
                config=public_tree(cfg),
                reinit="create_new",
            )
        if cfg.tracking.mlflow:
            # Found again through mlflow_run.json by a --resume and a Ray Train worker restart: one run, continued.
            self.mlflow = open_mlflow_run(cfg.tracking, location, output_dir / MLFLOW_DIR, run_name,
                                          params=flatten(public_tree(cfg)))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.record(metrics, step)
        trained = any(not is_evaluation_metric(name) for name in metrics)
        eta = self.clock.eta(step, self.total_steps) if trained else None
        if not trained:
            self.clock.evaluated(step)  # an evaluation before any step: its time is not a step's
        if self.console:
            if trained:
                say(step_line(step, self.total_steps, metrics, eta))
            if any(is_evaluation_metric(name) for name in metrics):
                say(eval_line(step, self.total_steps, metrics))

    def record(self, metrics: dict[str, float], step: int) -> None:
        """Write one record to metrics.jsonl and every tracker, without a console line (log() adds it for steps and
        evaluations; an event such as an elastic resize is said with log_text)."""
        try:
            self.metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
        except OSError as err:  # a full disk: name the file, so the message says what to free
            raise write_error(Path(self.metrics_file.name), err) from err
        if self.tensorboard is not None:
            for name, value in metrics.items():
                self.tensorboard.add_scalar(f"{'eval' if is_evaluation_metric(name) else 'train'}/{name}", value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        if self.mlflow is not None:
            self.mlflow.log(metrics, step)

    def log_text(self, text: str) -> None:
        if self.console:
            say(text)

    def close(self, mlflow_status: str = "FINISHED") -> None:
        """Flush and close every sink; the MLflow run ends as `mlflow_status` (KILLED: stopped by a sweep's scheduler)."""
        self.metrics_file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.mlflow is not None:
            self.mlflow.end(mlflow_status)
