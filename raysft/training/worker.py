"""What crosses from the driver to the Ray Train workers, and the worker's entry point.

This module is deliberately light (the config, nothing of torch, transformers or peft): Ray Train's
controller actor unpickles the train loop config, so wherever `LoopInputs` lives is imported there.
When it lived in loop.py the controller imported the whole training stack (torch, transformers,
peft, bitsandbytes) before it could start the worker group: 6.7 s on the critical path of every run
and every sweep trial on the 2-core benchmark machine, and a few hundred MB of controller memory.
The training stack is imported by the worker only, inside `train_loop_per_worker`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from raysft.config import Config
from raysft.data.cache import CachedTable
from raysft.evaluation import GenerationSet
from raysft.training.decisions import TrialGate


@dataclass(frozen=True)
class LoopInputs:
    """What the driver hands every worker: the checked config and what it prepared for the run."""

    config: Config
    run_location: str
    """Where the run lives (a local path or a URI): checkpoints/, metrics.jsonl, final/ (run_folder.py)."""
    data_fingerprint: str
    """Key of the packed rows; a checkpoint made on other data is never resumed."""
    pad_token_id: int
    train_data: CachedTable
    """The packed training rows (a Parquet table on the cache location, read by every worker)."""
    eval_data: CachedTable | None = None
    resume_from: str | None = None
    """The checkpoint the driver chose for --resume when Ray Train has none to give (local mode)."""
    verbose: bool = False
    """The driver's console mode (raysft.console.verbose): a worker quiets its libraries unless it is set."""
    generation: GenerationSet | None = None
    """eval.generate's prompts and references (raysft/data/prompts.py), or None."""
    gate: TrialGate | None = None
    """A sweep trial's line to its scheduler, heard after every evaluation (None outside a stopping sweep)."""
    stop_board: Any = None
    """The driver's stop board (raysft/training/interrupt.py): asks the workers to checkpoint and stop."""

    @property
    def has_eval(self) -> bool:
        return self.eval_data is not None

    @property
    def checkpoint_root(self) -> str:
        from raysft.run_folder import checkpoint_root  # pyarrow.fs: not needed where LoopInputs is only unpickled

        return checkpoint_root(self.run_location)


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
    """Ray Train entry point (`loop_config["inputs"]` is the driver's LoopInputs): the training stack is
    imported here, in the worker, after deciding which optional parts it needs."""
    inputs: LoopInputs = loop_config["inputs"]
    if inputs.config.scaling.num_workers > 0:  # a Ray Train worker actor; 0 = local mode, in the driver
        hide_unused_bitsandbytes(inputs.config)
        from raysft.ray_session import quiet_worker  # light: the training stack is not imported yet

        quiet_worker(inputs.verbose)
    from raysft.training.loop import train_loop_per_worker as run

    run(loop_config)
