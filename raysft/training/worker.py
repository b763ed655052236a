"""What crosses from the driver to the Ray Train workers, and the worker's entry point.

This module is deliberately light (the config, nothing of torch, transformers or peft): Ray Train's
controller actor unpickles the train loop config, so wherever `LoopInputs` lives is imported there.
When it lived in loop.py the controller imported the whole training stack (torch, transformers,
peft, bitsandbytes) before it could start the worker group: 6.7 s on the critical path of every run
and every sweep trial on the 2-core benchmark machine, and a few hundred MB of controller memory.
The training stack is imported by the worker only, inside `train_loop_per_worker`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import sys
from dataclasses import dataclass
from typing import Any

from raysft.config import Config


@dataclass(frozen=True)
class LoopInputs:
    """What the driver hands every worker: the checked config and what it prepared for the run."""

    config: Config
    run_location: str
    """Where the run lives (a local path or a URI): checkpoints/, metrics.jsonl, final/ (run_folder.py)."""
    data_fingerprint: str
    """Hash of the packed rows; a checkpoint made on other data is never resumed."""
    pad_token_id: int
    has_eval: bool
    resume_from: str | None = None
    """The checkpoint the driver chose for --resume when Ray Train has none to give (local mode)."""

    @property
    def checkpoint_root(self) -> str:
        from raysft import storage  # pyarrow.fs: not needed where LoopInputs is only unpickled

        return storage.join(self.run_location, "checkpoints")


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


# glibc's mallopt parameter number for the mmap threshold (malloc.h: M_MMAP_THRESHOLD = -3).
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 4 * 2**20
"""Blocks of this size or more get their own mapping, returned to the OS when freed (an activation of a
micro-batch of 4 x 512 tokens of SmolLM2-135M is 4.7-12 MB)."""


def fix_malloc_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Stop glibc from keeping freed activation memory: True when set (glibc only).

    glibc raises its mmap threshold to the size of every mmapped block freed (up to 32 MB), so after the
    first backward pass a CPU training step's activations (a few MB each) come from the heap, whose freed
    holes the next micro-batch's differently sized tensors cannot reuse. Measured on the throughput
    benchmark's worker step (SmolLM2-135M, LoRA, fp32, 4 packed rows of 512 tokens): peak RSS 8.5 GB with
    the default, 4.5 GB with a fixed 4 MB threshold (the saved activations are 2.5 GB); MALLOC_ARENA_MAX=2
    does not help (8.8 GB), malloc_trim after each step lowers the RSS between steps but not the peak.
    Setting the threshold explicitly also turns glibc's dynamic adjustment off (mallopt(3)). The same as
    the environment variable MALLOC_MMAP_THRESHOLD_, but it works in a process that is already running.
    GPU training keeps its activations in the CUDA caching allocator; this only affects host memory.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point (`loop_config["inputs"]` is the driver's LoopInputs): the training stack is
    imported here, in the worker, after deciding which optional parts it needs."""
    inputs: LoopInputs = loop_config["inputs"]
    if inputs.config.scaling.num_workers > 0:  # a Ray Train worker actor; 0 = local mode, in the driver
        hide_unused_bitsandbytes(inputs.config)
    fix_malloc_mmap_threshold()
    from raysft.training.loop import train_loop_per_worker as run

    run(loop_config)
