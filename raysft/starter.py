"""`raysft init`: a commented starter train config, and a small sample of data in the chosen format to try it on.

The config passes `raysft train CONFIG --check` as written (given a model it can load): every key it sets is
explained beside it, and the keys a first run most often changes are there to edit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, get_args

from raysft.config import is_uri
from raysft.errors import ConfigError

Method = Literal["lora", "qlora", "full"]
StarterFormat = Literal["prompt_response", "prompt_completion", "alpaca", "messages", "sharegpt", "text"]
METHODS: tuple[str, ...] = get_args(Method)
FORMATS: tuple[str, ...] = get_args(StarterFormat)
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SAMPLE_ROWS = 64
"""Enough rows that the sample, packed, holds several optimizer steps of the starter's batch size."""

_COLUMNS = {
    "prompt_response": "    prompt_column: question      # the column with the prompt\n"
                       "    response_column: answer      # the column with the answer (the trained tokens)\n",
    "prompt_completion": "    # columns: prompt, completion (the completion is trained)\n",
    "alpaca": "    # columns: instruction, input (may be empty), output (the output is trained)\n",
    "messages": "    # column: messages, a list of {role, content} turns (every assistant turn is trained;\n"
                "    # tool_calls, tool turns and reasoning_content are understood too)\n",
    "sharegpt": "    # column: conversations, a list of {from: human|gpt|system, value} turns (gpt turns are trained)\n",
    "text": "    # column: text (every token is trained)\n",
}  # fmt: skip

_METHODS = {
    "lora": ("", "lora:\n"
                 "  r: 16                          # adapter rank: 8-64; higher learns more, costs more memory\n"
                 "  alpha: 32                      # the update is scaled by alpha / r\n"
                 "  dropout: 0.05\n"
                 "  target_modules: all-linear     # or a list of module names, e.g. [q_proj, v_proj]\n",
             "2.0e-4"),
    "qlora": ("  quantization: 4bit               # QLoRA: the frozen base in 4-bit NF4 (bitsandbytes)\n",
              "lora:\n"
              "  r: 16                          # adapter rank: 8-64; higher learns more, costs more memory\n"
              "  alpha: 32                      # the update is scaled by alpha / r\n"
              "  dropout: 0.05\n"
              "  target_modules: all-linear     # QLoRA adapts every linear layer\n",
              "2.0e-4"),
    "full": ("", "lora:\n"
                 "  enabled: false                 # a full fine-tune: every weight is trained\n",
             "2.0e-5"),
}  # fmt: skip

_TEMPLATE = """\
# yaml-language-server: $schema=./raysft.schema.json   (run `raysft schema > raysft.schema.json` for completion)
# raysft train {config} --check    every pre-flight check, the data statistics and the memory plan; trains nothing
# raysft train {config}            train (add --resume to continue a stopped run)
# Written by `raysft init --format {format} --method {method}`. Every key: docs/config-reference.md.

model:
  name_or_path: {model}    # hub id or local model folder
{quantization}  # dtype: bfloat16                # halves the weights' memory (keep float32 for exact CPU runs)
  # gradient_checkpointing: true     # recompute activations in backward: less memory, a third more compute

data:
  train:
    path: {data}    # a JSONL/JSON/Parquet/CSV file, a folder or glob of them, or s3://...
    format: {format}
{columns}  eval_fraction: 0.1               # hold out 10% of the rows for evaluation (or set data.eval: {{path: ...}})
  max_seq_len: 512                 # tokens per example; longer ones are truncated (data.over_length)
  packing: true                    # several examples per row, attention kept within each

{lora}
train:
  output_dir: runs/{name}        # the run folder: metrics.jsonl, checkpoints/, final/ (the adapter)
  lr: {lr}
  epochs: 1
  micro_batch_size: 4              # packed rows per forward pass per worker
  grad_accum_steps: 1              # micro-batches per optimizer step
  precision: fp32                  # bf16 on GPUs (and on CPUs with bf16 support)
  # eval_every: 50                 # evaluate every N steps (always at the end)
  # checkpoint_every: 50           # resumable checkpoints (raysft train CONFIG --resume)

scaling:
  num_workers: 1                   # data-parallel Ray Train workers
  use_gpu: false                   # true: one GPU per worker
"""


def _sample_rows(data_format: str) -> list[dict[str, Any]]:
    rows = []
    for i in range(SAMPLE_ROWS):
        a, b = 3 + 7 * i % 89, 5 + 11 * i % 97
        question = f"A shop has {a} apples and receives {b} more. How many apples does it have now?"
        answer = f"It starts with {a} apples and gets {b} more, so it has {a} + {b} = {a + b} apples. #### {a + b}"
        rows.append({
            "prompt_response": {"question": question, "answer": answer},
            "prompt_completion": {"prompt": question, "completion": answer},
            "alpaca": {"instruction": "Solve the word problem.", "input": question, "output": answer},
            "messages": {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]},
            "sharegpt": {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]},
            "text": {"text": f"Question: {question}\nAnswer: {answer}"},
        }[data_format])  # fmt: skip
    return rows


def _write_new(path: Path, text: str, key: str) -> bool:
    """Write `text` to a new file; True when written, False when the same text is already there."""
    if path.exists():
        if path.is_file() and path.read_text() == text:
            return False
        raise ConfigError([f"{key}: {path} already exists; raysft init never overwrites a file: choose another name"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return True


def starter_config(config_path: Path, data_format: str, model: str, method: str, data: str) -> str:
    """The starter config's text (YAML with comments)."""
    quantization, lora, lr = _METHODS[method]
    return _TEMPLATE.format(
        config=config_path, format=data_format, method=method, model=model, quantization=quantization,
        data=data, columns=_COLUMNS[data_format], lora=lora, lr=lr, name=config_path.stem,
    )  # fmt: skip


def write_starter(config_path: Path, data_format: str, model: str = DEFAULT_MODEL, method: str = "lora",
                  data: str | None = None) -> list[Path]:
    """Write a starter config at `config_path` (and, without `data`, sample rows beside it); the paths written.

    Example:
        >>> write_starter(Path("my.yaml"), "messages", method="qlora")  # doctest: +SKIP
        [PosixPath('my.yaml'), PosixPath('data/sample_messages.jsonl')]
    """
    if data_format not in FORMATS or method not in METHODS:
        raise ConfigError([f"--format must be one of {', '.join(FORMATS)} and --method one of {', '.join(METHODS)}"])
    if config_path.exists():
        raise ConfigError([f"--out: {config_path} already exists; raysft init never overwrites a file: choose another name"])
    written = []
    if data is None:
        sample = config_path.parent / "data" / f"sample_{data_format}.jsonl"
        text = "".join(json.dumps(row) + "\n" for row in _sample_rows(data_format))
        if _write_new(sample, text, "sample data"):
            written.append(sample)
        data_in_yaml = os.path.relpath(sample, config_path.parent)
    elif is_uri(data):
        data_in_yaml = data
    else:
        if not Path(data).expanduser().exists():
            raise ConfigError([f"--data: {data} does not exist; give your data file (or leave --data out for a sample)"])
        # Paths in a config are read relative to its folder, so it keeps working from any directory.
        data_in_yaml = os.path.relpath(Path(data).expanduser().resolve(), config_path.parent.resolve())
    _write_new(config_path, starter_config(config_path, data_format, model, method, data_in_yaml), "--out")
    return [config_path, *written]
