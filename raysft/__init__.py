"""raysft: supervised fine-tuning of LLMs on Ray Data + Ray Train.

    >>> import raysft
    >>> cfg = raysft.load_config("examples/gsm8k_lora.yaml", ["train.max_steps=10"])  # doctest: +SKIP
    >>> result = raysft.train(cfg)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> defining module. Loaded on first use, so `import raysft` (and every Ray Data actor that
# imports raysft.data) stays fast instead of importing Ray Train, peft and transformers up front.
_EXPORTS = {
    "Config": "raysft.config",
    "ConfigError": "raysft.errors",
    "load_config": "raysft.config",
    "parse_config": "raysft.config",
    "DataError": "raysft.errors",
    "chat_generate": "raysft.infer",
    "load_for_inference": "raysft.infer",
    "merge_adapter": "raysft.infer",
    "RunResult": "raysft.training.trainer",
    "prepare_data": "raysft.data.pipeline",
    "train": "raysft.training.trainer",
    "SweepConfig": "raysft.tune.config",
    "SweepResult": "raysft.tune.report",
    "load_sweep": "raysft.tune.config",
    "sweep": "raysft.tune.sweep",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'raysft' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
