"""Using a trained run: sample with the chat template, merge an adapter into its base model."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch
from peft import PeftModel
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from raysft.config import Config, ModelConfig, absolute_path, parse_config, read_yaml
from raysft.errors import ConfigError
from raysft.fileio import replace_dir_atomically
from raysft.model import load_model
from raysft.model_source import check_model_source
from raysft.run_folder import CONFIG_FILE, FINAL_DIR, SWEEP_FILE
from raysft.tokenizer import load_tokenizer

EXPORT_MARKER = "raysft_export.json"
"""Written into every export folder: the proof that `--overwrite` may replace that folder."""


def check_adapter(adapter: str | Path, key: str = "adapter") -> list[str]:
    """Problems with a PEFT adapter folder ([] when fine), found before anything is loaded."""
    path = Path(adapter)
    if not path.exists():
        return [f"{key}: {str(adapter)!r} does not exist; give a PEFT adapter folder, e.g. RUN/final"]
    if not path.is_dir():
        return [f"{key}: {str(adapter)!r} is a file; give the folder holding adapter_config.json, e.g. RUN/final"]
    if (path / "adapter_config.json").is_file():
        return []
    if (path / FINAL_DIR / "adapter_config.json").is_file():
        hint = f"; the run's adapter is {path / FINAL_DIR}"
    elif (path / "config.json").is_file():
        hint = "; it holds a whole model (a full fine-tune?): pass it as the model, with no adapter"
    else:
        hint = " (a train run's adapter is RUN/final)"
    return [f"{key}: {str(adapter)!r} holds no adapter_config.json, so it is not a PEFT adapter folder{hint}"]


def _tokenizer_source(model: ModelConfig, adapter: str | Path | None) -> ModelConfig:
    """Where to load the tokenizer from: a run saves its own beside the adapter, chat template included,
    and prompts must be rendered as in training, not with the base model's template."""
    if adapter is None or not any((Path(adapter) / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json")):
        return model
    return model.model_copy(update={"name_or_path": str(adapter), "gguf_file": None, "revision": None})


def load_for_inference(model: ModelConfig, adapter: str | Path | None = None) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Base model (plus a PEFT adapter folder, if given) in eval mode on CPU/GPU, and its tokenizer.

    The tokenizer is the one saved in the adapter folder when there is one (a run's RUN/final), and the base
    model's embeddings grow to hold its tokens (a run with `model.add_special_tokens` added some).

    Example:
        >>> model, tokenizer = load_for_inference(ModelConfig(name_or_path="HuggingFaceTB/SmolLM2-135M"), "runs/tiny/final")  # doctest: +SKIP
    """
    problems = check_model_source(model) + (check_adapter(adapter) if adapter is not None else [])
    if problems:
        raise ConfigError(problems)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(_tokenizer_source(model, adapter))
    # A run that added tokens saved them in its tokenizer: the base gets their rows (as in training) before the
    # adapter, which holds their trained values, is loaded onto it.
    base = load_model(model, device, for_training=False, num_tokens=len(tokenizer))
    loaded = PeftModel.from_pretrained(base, str(adapter)) if adapter is not None else base
    return loaded.eval(), tokenizer


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices of the prompts grouped into batches of `batch_size`, shortest first (stable), so that batches
    pad little. A pure function of the lengths: eval.generate splits these batches across workers, so any
    number of workers generates the same batches.

    Example:
        >>> length_batches([5, 2, 9, 2], batch_size=2)
        [[1, 3], [0, 2]]
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


@torch.no_grad()
def generate_batch(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    synced_gpus: bool = False,
) -> list[str]:
    """Continue each prompt (token ids, chat template already applied) and decode what was generated, special
    tokens dropped. Greedy at temperature 0. One batch, left-padded: generation continues at the right edge.

    `synced_gpus`: every worker of the process group keeps running forwards until all are done (transformers'
    own flag), which FSDP needs: each forward gathers sharded weights collectively. `model` is anything with
    transformers' `generate` (a PreTrainedModel, a PeftModel, raysft's TokenLoss).
    """
    device = next(model.parameters()).device
    width = max(len(prompt) for prompt in prompts)
    pad_id = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    eos = {tokenizer.eos_token_id} | set(_as_list(getattr(getattr(model, "generation_config", None), "eos_token_id", None)))
    # Explicit, so that a checkpoint's own generation_config (sampling, penalties) never changes what greedy means.
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=sorted(eos - {None}), use_cache=True,
        **({"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}),
    )
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                            synced_gpus=synced_gpus)
    decoded = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    return [text.strip() for text in decoded]


def _as_list(value: int | list[int] | None) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def chat_generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    batch_size: int = 16,
) -> list[str]:
    """Answer each prompt as a single user turn rendered with the chat template (greedy at temperature 0)."""
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    # The template writes every special token itself; the tokenizer must not add a second BOS.
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    answers = [""] * len(prompts)
    for batch in length_batches([len(ids) for ids in encoded], batch_size):
        for index, text in zip(batch, generate_batch(model, tokenizer, [encoded[i] for i in batch], max_new_tokens,
                                                     temperature)):
            answers[index] = text
    return answers


def run_config(run_dir: str | Path) -> Config:
    """The config a run was trained with (from its saved config.yaml).

    config.yaml summarizes inline rows instead of keeping them (see raysft.config.to_yaml); what reads a run back
    needs its model and adapter settings, not its data, so such a source reads back with no rows."""
    raw = read_yaml(Path(run_dir) / CONFIG_FILE)
    for split in ("train", "eval"):
        for source in (raw.get("data") or {}).get(split) or []:
            if isinstance(source, dict) and isinstance(source.get("rows"), str):
                source["rows"] = []
    return parse_config(raw, str(Path(run_dir) / CONFIG_FILE))


def _run_dir_problem(run_dir: Path) -> str | None:
    if (run_dir / CONFIG_FILE).is_file() and (run_dir / FINAL_DIR).is_dir():
        return None
    if not run_dir.exists():
        why = "does not exist"
    elif not run_dir.is_dir():
        why = "is a file, not a train run folder"
    elif (run_dir / SWEEP_FILE).is_file():
        why = "is a sweep folder; export one of its trials, e.g. RUN_DIR/trials/<name> (`raysft report` names the best)"
    elif (run_dir / CONFIG_FILE).is_file():
        why = "has no final/: its training has not finished (continue it with `raysft train CONFIG --resume`)"
    else:
        why = "is not a train run folder (expected config.yaml and final/ inside)"
    return f"run_dir {run_dir}: {why}"


def _merged_dir_problem(merged_dir: Path, overwrite: bool) -> str | None:
    """Why `merged_dir` may not receive an export, if it may not: only what raysft wrote is ever replaced."""
    if not merged_dir.exists():
        return None
    if not merged_dir.is_dir():
        return f"--merge-to {merged_dir}: is a file; give a new or empty folder"
    present = {p.relative_to(merged_dir).as_posix() for p in merged_dir.rglob("*") if not p.is_dir()}
    if not present:
        return None
    marker = merged_dir / EXPORT_MARKER
    if not marker.is_file():
        return (f"--merge-to {merged_dir}: is not empty and was not written by `raysft export` (no {EXPORT_MARKER}); "
                "raysft never deletes files it did not write, with or without --overwrite: choose a new or empty folder")
    try:
        earlier = json.loads(marker.read_text())
        written = set(earlier["files"]) | {EXPORT_MARKER}
    except (ValueError, KeyError, TypeError):
        return f"--merge-to {merged_dir}: its {EXPORT_MARKER} is unreadable, so raysft cannot tell which files it wrote; choose another folder"
    if not overwrite:
        return (f"--merge-to {merged_dir}: holds an earlier export (of {earlier.get('run_dir')}, at {earlier.get('exported_at')}); "
                "pass --overwrite to replace it, or choose a new folder")
    if present - written:
        return (f"--merge-to {merged_dir}: holds files the earlier export did not write ({', '.join(sorted(present - written))}); "
                "--overwrite replaces only what raysft wrote: move them out first")
    return None


def check_export(run_dir: Path, merged_dir: Path, overwrite: bool) -> list[str]:
    """Problems with exporting `run_dir` into `merged_dir` ([] when fine), found before anything is loaded."""
    problems = [p for p in (_run_dir_problem(run_dir),) if p]
    # Symlinks followed here only: the question is whether both name the same folder on disk.
    run, merged = run_dir.resolve(), merged_dir.resolve()
    if merged == run or run in merged.parents or merged in run.parents:
        # Replacing the folder would take the run's checkpoints and adapter with it, whatever the flags.
        where = "is" if merged == run else "is inside" if run in merged.parents else "holds"
        problems.append(f"--merge-to {merged_dir}: {where} the run folder {run_dir}; export to a folder apart from the run")
    else:
        problems += [p for p in (_merged_dir_problem(merged_dir, overwrite),) if p]
    return problems


def merge_adapter(run_dir: str | Path, merged_dir: str | Path, overwrite: bool = False) -> Path:
    """Fold the run's LoRA adapter into full-precision base weights and save a plain transformers model.

    `merged_dir` must be new or empty, or (with `overwrite`) an earlier export, which is replaced whole.

    Example:
        >>> merge_adapter("runs/tiny", "runs/tiny-merged")  # doctest: +SKIP
    """
    run_dir, merged_dir = Path(run_dir), Path(merged_dir)
    problems = check_export(run_dir, merged_dir, overwrite)
    if problems:
        raise ConfigError(problems)
    cfg = run_config(run_dir)
    if not cfg.lora.enabled:
        raise ConfigError([f"run_dir {run_dir}: is a full fine-tune (lora.enabled: false); its final/ is already "
                           "a plain transformers model: load or copy it as it is"])
    model_cfg = cfg.model.model_copy(update={"quantization": "none", "gradient_checkpointing": False})
    model, tokenizer = load_for_inference(model_cfg, run_dir / FINAL_DIR)
    merged: PreTrainedModel = model.merge_and_unload() if isinstance(model, PeftModel) else model
    merged_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = merged_dir.with_name(f".{merged_dir.name}.{os.getpid()}.staging")
    staging.mkdir()  # a name of our own: never clears anything it finds
    try:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        record = {
            "run_dir": str(absolute_path(run_dir)),
            "adapter": str(absolute_path(run_dir / FINAL_DIR)),
            "base_model": cfg.model.name_or_path,
            "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if not p.is_dir()),
        }
        (staging / EXPORT_MARKER).write_text(json.dumps(record, indent=2) + "\n")
        replace_dir_atomically(staging, merged_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return merged_dir
