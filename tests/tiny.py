"""Tiny real tokenizer and models for tests, built locally with no download."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    PhiConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from raysft.tokenizer import CHATML_TEMPLATE

SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<pad>"]
BASE_SPECIAL_TOKENS = ["<|endoftext|>", "<pad>"]
"""A base model's tokenizer: an end-of-text token, no ChatML markers (and no chat template)."""

# Enough variety (prose, digits, code, chat words) for a 512-token BPE to split anything into
# short pieces; byte-level fallback covers every other character.
FIXTURE_TEXT = """\
Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.
How many clips did Natalia sell altogether in April and May? Natalia sold 48/2 = 24 clips in May.
Natalia sold 48+24 = 72 clips altogether in April and May. #### 72
Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.
How much did she earn? Weng earns 12/60 = $0.2 per minute. Working 50 minutes, she earned $10.

Who are you? I am a helpful assistant, a language model trained to answer questions.
Have a nice day! You too! What is the capital of France? The capital of France is Paris.
The user asks and the assistant answers. The system prompt says: you are concise and kind.

def fibonacci(n: int) -> list[int]:
    values = [0, 1]
    for i in range(2, n):
        values.append(values[i - 1] + values[i - 2])
    return values[:n]

for (let i = 0; i < items.length; i++) { console.log(items[i]); }
SELECT name, count(*) FROM users WHERE age >= 18 GROUP BY name ORDER BY 2 DESC;
0 1 2 3 4 5 6 7 8 9 10 11 12 100 256 512 1024 3.14159 -7 1e-5 x = y * 2 + z / 3
"""

TINY_ARCHS = ("llama", "mistral", "qwen2", "gemma", "phi")

_CONFIGS: dict[str, Callable[..., PretrainedConfig]] = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "gemma": GemmaConfig,
    "phi": PhiConfig,
}


def make_tokenizer(
    path: Path,
    special_tokens: list[str] = SPECIAL_TOKENS,
    eos_token: str = "<|im_end|>",
    chat_template: str | None = CHATML_TEMPLATE,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (vocab 512) on FIXTURE_TEXT, with ChatML tokens and template by default; save it."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    # trim_offsets=False: offsets then cover each token's bytes exactly, leading space included.
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(FIXTURE_TEXT.splitlines(keepends=True), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos_token, pad_token="<pad>")
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(path)
    return tokenizer


def make_base_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """A base model's tokenizer (BASE_SPECIAL_TOKENS, EOS `<|endoftext|>`, no chat template), saved in `path`."""
    return make_tokenizer(path, BASE_SPECIAL_TOKENS, "<|endoftext|>", None)


def make_model(arch: str, path: Path, tokenizer: PreTrainedTokenizerBase, **overrides: object) -> Path:
    """Save a randomly initialised 2-layer model of `arch` (seed 0) and the tokenizer into `path`; `overrides`
    overrides the model config (e.g. tie_word_embeddings=True)."""
    if arch not in _CONFIGS:
        raise ValueError(f"unknown tiny arch {arch!r}; expected one of {TINY_ARCHS}")
    config = _CONFIGS[arch](
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **({"head_dim": 16} if arch == "gemma" else {}),  # Gemma's default head_dim (256) ignores hidden_size
        **overrides,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
