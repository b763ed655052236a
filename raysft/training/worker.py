"""The Ray Train entry point, `train_loop_per_worker`: the one function every worker (and the driver, in local
mode) runs. It runs the recipe (raysft/training/recipe.py).

This module is deliberately light (the config, nothing of torch, transformers or peft) because the driver and
Ray Train's controller import it to pickle and unpickle the function; the training stack is imported by the
worker only, inside `train_loop_per_worker`, after deciding which optional parts it needs. What the driver
hands over is `LoopInputs` (raysft/training/inputs.py), re-exported here.
"""

from __future__ import annotations

import sys
from typing import Any

from raysft.config import Config
from raysft.training.inputs import LoopInputs
from raysft.training.startup import mark, mark_process_start

__all__ = ["LoopInputs", "hide_unused_bitsandbytes", "train_loop_per_worker", "uses_bitsandbytes"]


def uses_bitsandbytes(cfg: Config) -> bool:
    """Whether the run needs bitsandbytes: quantized base weights (QLoRA) or its 8-bit optimizer."""
    return cfg.model.quantization != "none" or cfg.train.optimizer == "adamw_8bit"


def hide_unused_bitsandbytes(cfg: Config) -> bool:
    """In a process that runs only this run, make an installed bitsandbytes invisible when the run does not
    use it; True when hidden.

    peft 0.21 imports bitsandbytes eagerly (peft/helpers.py), and bitsandbytes calls `torch.compile` on
    its kernels at import, which loads torch._inductor: about 2 s of every worker's start and 45 MB of
    its memory, for nothing unless the run quantizes. A `None` entry in `sys.modules` is Python's own
    "not installed" (the import raises ImportError, `importlib.util.find_spec` returns None), which
    peft and transformers already handle as bitsandbytes being absent. Only for a Ray Train worker
    process: it runs this run alone and exits with it, whereas a driver (local mode, a sweep) may later
    run a config that quantizes.
    """
    if uses_bitsandbytes(cfg) or "bitsandbytes" in sys.modules:
        return False
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]
    return True


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point (`loop_config["inputs"]` is the driver's LoopInputs): the worker's optional stacks
    chosen, the training stack imported, the tokenizer loaded once for the whole recipe, the recipe run."""
    inputs: LoopInputs = loop_config["inputs"]
    if inputs.config.scaling.num_workers > 0:  # a Ray Train worker actor; 0 = local mode, in the driver
        mark_process_start()
        mark("train_loop_per_worker")
        hide_unused_bitsandbytes(inputs.config)
        from raysft.ray_session import quiet_worker  # light: the training stack is not imported yet

        quiet_worker(inputs.verbose)
    from raysft.tokenizer import load_tokenizer_and_new_ids
    from raysft.training.recipe import run

    mark("training stack imported")
    # The tokenizer the data were tokenized with (model.add_special_tokens included), loaded once per process.
    tokenizer, new_token_ids = load_tokenizer_and_new_ids(inputs.config.model)
    mark("tokenizer loaded")
    run(inputs, tokenizer, new_token_ids)
