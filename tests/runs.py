"""Small train configs for tests: a tiny real model, a slice of real data, fast settings."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from raysft.config import Config, apply_overrides, parse_config

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def tiny_config(model_dir: Path, output_dir: Path, overrides: list[str] | None = None, rows: int = 48) -> Config:
    """GSM8K rows on a tiny model, 4 steps, fp32, local mode, no dropout (so runs compare exactly)."""
    raw: dict[str, Any] = {
        "model": {"name_or_path": str(model_dir)},
        "data": {
            "train": {"path": str(SHARED_DATA / "gsm8k" / "train.jsonl"), "limit": rows},
            "eval": {"path": str(SHARED_DATA / "gsm8k" / "test.jsonl"), "limit": 8},
            "max_seq_len": 256,
            # The cache is keyed by content, so sharing it across tests (and sessions) is safe.
            "cache_dir": str(Path(tempfile.gettempdir()) / "raysft-test-token-cache"),
        },
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {
            "output_dir": str(output_dir),
            "micro_batch_size": 2,
            "grad_accum_steps": 1,
            "max_steps": 4,
            "lr": 1e-2,
            "warmup_steps": 1,
        },
        "scaling": {"num_workers": 0},
        "tracking": {"console": False, "tensorboard": False},
    }
    return parse_config(apply_overrides(raw, overrides or []))


def losses(history: list[dict[str, Any]]) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}
