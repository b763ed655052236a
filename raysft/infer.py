"""Using a trained run: sample with the chat template, merge an adapter into its base model."""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from raysft.config import Config, ModelConfig, parse_config, read_yaml
from raysft.errors import ConfigError
from raysft.fileio import replace_dir_atomically
from raysft.model import check_model_source, load_model, load_tokenizer

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
    if (path / "final" / "adapter_config.json").is_file():
        hint = f"; the run's adapter is {path / 'final'}"
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


@torch.no_grad()
def chat_generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    batch_size: int = 16,
) -> list[str]:
    """Answer each prompt as a single user turn rendered with the chat template (greedy at temperature 0)."""
    device = next(model.parameters()).device
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths batch with little padding
    answers = [""] * len(texts)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues at the right edge
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            # The template writes every special token itself; the tokenizer must not add a second BOS.
            batch = tokenizer([texts[i] for i in chunk], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            output = model.generate(
                **batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, use_cache=True, **sampling
            )
            decoded = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            for index, text in zip(chunk, decoded):
                answers[index] = text
    finally:
        # The caller's tokenizer is shared (e.g. with training code that pads on the right).
        tokenizer.padding_side = padding_side
    return [a.strip() for a in answers]


def run_config(run_dir: str | Path) -> Config:
    """The config a run was trained with (from its saved config.yaml).

    config.yaml summarizes inline rows instead of keeping them (see raysft.config.to_yaml); what reads a run back
    needs its model and adapter settings, not its data, so such a source reads back with no rows."""
    raw = read_yaml(Path(run_dir) / "config.yaml")
    for split in ("train", "eval"):
        for source in (raw.get("data") or {}).get(split) or []:
            if isinstance(source, dict) and isinstance(source.get("rows"), str):
                source["rows"] = []
    return parse_config(raw, str(Path(run_dir) / "config.yaml"))


def _run_dir_problem(run_dir: Path) -> str | None:
    if (run_dir / "config.yaml").is_file() and (run_dir / "final").is_dir():
        return None
    if not run_dir.exists():
        why = "does not exist"
    elif not run_dir.is_dir():
        why = "is a file, not a train run folder"
    elif (run_dir / "sweep.yaml").is_file():
        why = "is a sweep folder; export one of its trials, e.g. RUN_DIR/trials/<name> (`raysft report` names the best)"
    elif (run_dir / "config.yaml").is_file():
        why = "has no final/: its training has not finished (continue it with `raysft train CONFIG --resume`)"
    else:
        why = "is not a train run folder (expected config.yaml and final/ inside)"
    return f"run_dir {run_dir}: {why}"


def _merged_dir_problem(merged_dir: Path, overwrite: bool) -> str | None:
    """Why `merged_dir` may not receive an export, if it may not: only what raysft wrote is ever replaced."""
    if not merged_dir.exists():
        return None
    if not merged_dir.is_dir():
        return f"--merge {merged_dir}: is a file; give a new or empty folder"
    present = {p.relative_to(merged_dir).as_posix() for p in merged_dir.rglob("*") if not p.is_dir()}
    if not present:
        return None
    marker = merged_dir / EXPORT_MARKER
    if not marker.is_file():
        return (f"--merge {merged_dir}: is not empty and was not written by `raysft export` (no {EXPORT_MARKER}); "
                "raysft never deletes files it did not write, with or without --overwrite: choose a new or empty folder")
    try:
        earlier = json.loads(marker.read_text())
        written = set(earlier["files"]) | {EXPORT_MARKER}
    except (ValueError, KeyError, TypeError):
        return f"--merge {merged_dir}: its {EXPORT_MARKER} is unreadable, so raysft cannot tell which files it wrote; choose another folder"
    if not overwrite:
        return (f"--merge {merged_dir}: holds an earlier export (of {earlier.get('run_dir')}, at {earlier.get('exported_at')}); "
                "pass --overwrite to replace it, or choose a new folder")
    if present - written:
        return (f"--merge {merged_dir}: holds files the earlier export did not write ({', '.join(sorted(present - written))}); "
                "--overwrite replaces only what raysft wrote: move them out first")
    return None


def check_export(run_dir: Path, merged_dir: Path, overwrite: bool) -> list[str]:
    """Problems with exporting `run_dir` into `merged_dir` ([] when fine), found before anything is loaded."""
    problems = [p for p in (_run_dir_problem(run_dir),) if p]
    run, merged = run_dir.resolve(), merged_dir.resolve()
    if merged == run or run in merged.parents or merged in run.parents:
        # Replacing the folder would take the run's checkpoints and adapter with it, whatever the flags.
        where = "is" if merged == run else "is inside" if run in merged.parents else "holds"
        problems.append(f"--merge {merged_dir}: {where} the run folder {run_dir}; export to a folder apart from the run")
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
    model, tokenizer = load_for_inference(model_cfg, run_dir / "final")
    merged: PreTrainedModel = model.merge_and_unload() if isinstance(model, PeftModel) else model
    merged_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = merged_dir.with_name(f".{merged_dir.name}.{os.getpid()}.staging")
    staging.mkdir()  # a name of our own: never clears anything it finds
    try:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        record = {
            "run_dir": str(run_dir.resolve()),
            "adapter": str((run_dir / "final").resolve()),
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
