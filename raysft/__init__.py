"""raysft: supervised fine-tuning of LLMs on Ray Data + Ray Train.

    >>> import raysft
    >>> cfg = raysft.load_config("examples/tiny.yaml", ["train.max_steps=10"])  # doctest: +SKIP
    >>> result = raysft.train(cfg)  # doctest: +SKIP
"""

from raysft.config import Config, ConfigError, load_config, parse_config
from raysft.data.formats import DataError
from raysft.infer import chat_generate, load_for_inference, merge_adapter
from raysft.train.trainer import RunResult, prepare_data, train

__all__ = [
    "Config",
    "ConfigError",
    "DataError",
    "RunResult",
    "chat_generate",
    "load_config",
    "load_for_inference",
    "merge_adapter",
    "parse_config",
    "prepare_data",
    "train",
]
