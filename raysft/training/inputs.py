"""What crosses from the driver to the Ray Train workers: one frozen dataclass, `LoopInputs`.

Deliberately light (the config, nothing of torch, transformers or peft): Ray Train's controller actor unpickles
the train loop config, so this module is imported there. When `LoopInputs` lived beside the training loop the
controller imported the whole training stack (torch, transformers, peft, bitsandbytes) before it could start the
worker group: 6.7 s on the critical path of every run and every sweep trial on the 2-core benchmark machine, and
a few hundred MB of controller memory.
"""

from __future__ import annotations

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
