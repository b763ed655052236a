"""The quickstart task, generated here (never downloaded), and its metric.

A small suite of instructions, each with one exact answer (:func:`make_task_rows`); the metric is exact
match of the normalized answer (:func:`task_answer`, :func:`exact_match`), measured with greedy decoding
through the chat template (:func:`raysft.infer.chat_generate`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from raysft import evaluation
from raysft.fileio import write_text_atomically

# Measured on SmolLM2-135M-Instruct (greedy, 50 prompts per kind): the base model gets almost
# none of these exactly right. It answers in sentences ("The sentence ... refers to the city of
# Vienna"), misreads ("we need to multiply the number of peaches by ..."), or gets the content
# wrong ("2022-10-23" for October 2, 1995). With LoRA r=16, lr 1e-3, 8 examples a step, exact match
# on the mix goes 0% -> ~80% after 10 steps and 96-98% after 30 (3 seeds), in under two minutes
# of training on 2 CPU cores. Still left out: "who is older?" (the comparison needs ~300 examples
# of its own, and sat at chance in the mix), and sorting / reversing / adding (too slow to learn).

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
    """Fraction of predictions whose :func:`task_answer` equals the reference's (raysft.evaluation's exact
    match, with this task's normalizer).

    Example::

        >>> exact_match(["Lisbon.", "The city is Paris"], ["Lisbon", "Paris"])
        0.5
    """
    return evaluation.exact_match(predictions, references, task_answer)


def write_quickstart_data(folder: Path, n_train: int, n_eval: int, seed: int) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` of the quickstart task into ``folder``.

    Both splits come from one :func:`make_task_rows` call, so no eval prompt is in the train
    split. Each file appears whole (written under a staging name, then renamed into place), eval
    last, so a reader never sees a half-written file.

    Example::

        >>> train, evals = write_quickstart_data(Path("qs-data"), 320, 50, seed=0)  # doctest: +SKIP
    """
    if n_train < 1 or n_eval < 1:
        raise ValueError(f"n_train and n_eval must be >= 1, got {n_train} and {n_eval}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = make_task_rows(n_train + n_eval, seed)
    paths = (folder / "train.jsonl", folder / "eval.jsonl")
    for path, split in zip(paths, (rows[:n_train], rows[n_train:])):
        write_text_atomically(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in split))
    return paths
