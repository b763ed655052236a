"""Where metrics go: metrics.jsonl (always), console, TensorBoard and W&B. Rank 0 only."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from raysft.config import Config, to_yaml
from raysft.fileio import write_error

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


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
    """Fan one metrics dict out to every enabled sink. W&B runs offline when no API key is set."""

    def __init__(self, cfg: Config, output_dir: Path, total_steps: int):
        self.total_steps = total_steps
        self.console = cfg.tracking.console
        self.metrics_file = (output_dir / METRICS_FILE).open("a", buffering=1)
        self.tensorboard = None
        self.wandb_run = None
        if cfg.tracking.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        if cfg.tracking.wandb:
            import wandb

            # The key is read by wandb from the environment; it never passes through raysft's config or logs.
            self.wandb_run = wandb.init(
                project=cfg.tracking.wandb_project,
                group=cfg.tracking.wandb_group,
                name=cfg.tracking.run_name or output_dir.name,
                dir=str(output_dir),
                # An explicit WANDB_MODE wins; otherwise offline unless there is a key to sync with.
                mode=os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline"),
                config=_public_config(cfg),
                reinit="create_new",
            )

    def log(self, metrics: dict[str, float], step: int) -> None:
        try:
            self.metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
        except OSError as err:  # a full disk: name the file, so the message says what to free
            raise write_error(Path(self.metrics_file.name), err) from err
        if self.tensorboard is not None:
            for name, value in metrics.items():
                self.tensorboard.add_scalar(f"{'eval' if name.startswith('eval_') else 'train'}/{name}", value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        if self.console:
            shown = "  ".join(f"{k} {_fmt(v)}" for k, v in metrics.items() if k not in {"epoch", "skipped"})
            print(f"[raysft] step {step}/{self.total_steps}  {shown}", flush=True)

    def log_text(self, text: str) -> None:
        if self.console:
            print(f"[raysft] {text}", flush=True)

    def close(self) -> None:
        self.metrics_file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _fmt(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _public_config(cfg: Config) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(to_yaml(cfg))
