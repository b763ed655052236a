"""Wiring: config -> data pipeline -> Ray Train TorchTrainer running `train_loop_per_worker`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from transformers import PreTrainedTokenizerBase

from raysft.config import Config, ConfigError, to_yaml
from raysft.data.pipeline import (
    PreparedData,
    read_splits,
    shape_splits,
    stats_json,
    tokenize_splits,
)
from raysft.fileio import write_text_atomically
from raysft.model import load_tokenizer
from raysft.training.checkpoint import list_checkpoints
from raysft.training.loop import FAULT_ENV, train_loop_per_worker


@dataclass(frozen=True)
class RunResult:
    """What a finished `train` run left behind."""

    output_dir: Path
    final_dir: Path
    metrics: dict[str, Any]

    def history(self) -> list[dict[str, Any]]:
        """Every line of metrics.jsonl."""
        return [json.loads(line) for line in (self.output_dir / "metrics.jsonl").read_text().splitlines()]


def ensure_ray(address: str | None) -> None:
    """Join `address` (or RAY_ADDRESS), or start a local Ray; reuse a running session."""
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=True, configure_logging=False)


def checkpoint_root(cfg: Config) -> Path:
    return Path(cfg.scaling.storage_path or cfg.train.output_dir).expanduser().resolve() / "checkpoints"


def _refuse_to_overwrite(cfg: Config) -> None:
    output_dir = Path(cfg.train.output_dir)
    earlier = [p for p in (output_dir / "metrics.jsonl", output_dir / "final") if p.exists()]
    earlier += list_checkpoints(checkpoint_root(cfg))[-1:]
    if earlier and not cfg.train.resume:
        raise ConfigError(
            [f"train.output_dir: {output_dir} already holds a run ({earlier[0].name}); "
             "resume it with --resume (train.resume=true) or choose a new output_dir"]
        )


def scaling_config(cfg: Config) -> ScalingConfig:
    """The Ray Train ScalingConfig of `cfg` (a sweep also sizes its trial concurrency from it)."""
    return ScalingConfig(
        num_workers=cfg.scaling.num_workers,
        use_gpu=cfg.scaling.use_gpu,
        resources_per_worker=cfg.scaling.resources_per_worker,
    )


def prepare_data(cfg: Config) -> tuple[PreTrainedTokenizerBase, PreparedData]:
    """Read, tokenize (on Ray Data, cached) and pack the data of `cfg`. Starts Ray if needed."""
    tokenizer = load_tokenizer(cfg.model)
    splits = read_splits(cfg.data, tokenizer)  # all input errors surface here, before Ray starts
    ensure_ray(cfg.scaling.ray_address)
    return tokenizer, shape_splits(tokenize_splits(splits, tokenizer, cfg.data), cfg)


def train(cfg: Config, callbacks: list[Any] | None = None) -> RunResult:
    """Fine-tune the model of `cfg` on Ray and write the run folder (see README, "Output").

    Example:
        >>> import raysft
        >>> cfg = raysft.load_config("examples/tiny.yaml", ["train.max_steps=5"])  # doctest: +SKIP
        >>> result = raysft.train(cfg)  # doctest: +SKIP
        >>> result.final_dir  # a PEFT adapter folder  # doctest: +SKIP
    """
    _refuse_to_overwrite(cfg)
    tokenizer, prepared = prepare_data(cfg)
    output_dir = Path(cfg.train.output_dir).expanduser().resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(output_dir / "config.yaml", to_yaml(cfg))
    write_text_atomically(output_dir / "data_stats.json", stats_json(prepared.stats))

    storage = Path(cfg.scaling.storage_path or output_dir).expanduser().resolve()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "output_dir": str(output_dir),
            "checkpoint_root": str(checkpoint_root(cfg)),
            "data_fingerprint": prepared.fingerprint,
            "pad_token_id": tokenizer.pad_token_id,
            "has_eval": "eval" in prepared.rows,
            "fault_at_step": os.environ.get(FAULT_ENV),
        },
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(
            name="ray_train",
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            callbacks=callbacks,
        ),
        datasets=prepared.ray_datasets(),
        # Every worker reads every row and takes its own deterministic slice of each global batch:
        # that is what makes N workers equal one worker and resume exact.
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    result = trainer.fit()
    return RunResult(output_dir, output_dir / "final", dict(result.metrics or {}))
