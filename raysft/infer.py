"""Using a trained run: sample with the chat template, merge an adapter into its base model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from raysft.config import ModelConfig, parse_config, read_yaml
from raysft.model import load_model, load_tokenizer


def load_for_inference(model: ModelConfig, adapter: str | Path | None = None) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Base model (plus a PEFT adapter folder, if given) in eval mode on CPU/GPU, and its tokenizer."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = load_model(model, device, for_training=False)
    tokenizer = load_tokenizer(model)
    loaded = PeftModel.from_pretrained(base, str(adapter)) if adapter else base
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
    tokenizer.padding_side = padding_side
    return [a.strip() for a in answers]


def run_model_config(run_dir: str | Path) -> ModelConfig:
    """The model section a run was trained with (from its saved config.yaml)."""
    return parse_config(read_yaml(Path(run_dir) / "config.yaml"), str(Path(run_dir) / "config.yaml")).model


def merge_adapter(run_dir: str | Path, merged_dir: str | Path) -> Path:
    """Fold the run's LoRA adapter into full-precision base weights and save a plain transformers model.

    Example:
        >>> merge_adapter("runs/tiny", "runs/tiny-merged")  # doctest: +SKIP
    """
    run_dir, merged_dir = Path(run_dir), Path(merged_dir)
    model_cfg = run_model_config(run_dir).model_copy(update={"quantization": "none", "gradient_checkpointing": False})
    model, tokenizer = load_for_inference(model_cfg, run_dir / "final")
    merged: PreTrainedModel = model.merge_and_unload() if isinstance(model, PeftModel) else model
    staging = merged_dir.with_name(f".{merged_dir.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(merged_dir, ignore_errors=True)
    os.replace(staging, merged_dir)
    return merged_dir
