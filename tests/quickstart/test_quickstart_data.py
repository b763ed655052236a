"""The quickstart task data and its metric: fast, no model, no Ray."""

from __future__ import annotations

import datetime
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from raysft.quickstart import (
    TASK_KINDS,
    exact_match,
    make_task_rows,
    task_answer,
    task_kind,
    write_quickstart_data,
)


def test_rows_are_deterministic_for_a_seed() -> None:
    assert make_task_rows(60, seed=7) == make_task_rows(60, seed=7)
    assert make_task_rows(60, seed=7) != make_task_rows(60, seed=8)
    # A longer request extends the shorter one: the first rows do not depend on n.
    assert make_task_rows(100, seed=7)[:60] == make_task_rows(60, seed=7)


def test_rows_have_the_prompt_response_schema_and_distinct_prompts() -> None:
    rows = make_task_rows(400, seed=0)
    assert len(rows) == 400
    for row in rows:
        assert set(row) == {"prompt", "response"}
        assert isinstance(row["prompt"], str) and row["prompt"].strip()
        assert isinstance(row["response"], str) and row["response"].strip()
    assert len({row["prompt"] for row in rows}) == len(rows)


def test_kinds_are_mixed_evenly() -> None:
    rows = make_task_rows(10 * len(TASK_KINDS), seed=3)
    kinds = [task_kind(row["prompt"]) for row in rows]
    # Every consecutive block holds each kind once, so any prefix (the train split) is balanced.
    for start in range(0, len(kinds), len(TASK_KINDS)):
        assert sorted(kinds[start : start + len(TASK_KINDS)]) == sorted(TASK_KINDS)
    assert Counter(kinds) == {kind: 10 for kind in TASK_KINDS}


def test_zero_rows_and_negative_n() -> None:
    assert make_task_rows(0, seed=0) == []
    with pytest.raises(ValueError, match="n must be"):
        make_task_rows(-1, seed=0)


def _expected_answer(prompt: str) -> str:
    """An independent solver for each kind, so the generated responses are checked, not trusted."""
    kind = task_kind(prompt)
    if kind == "city":
        sentence = prompt.split("\n", 1)[1]
        from raysft.quickstart.task import _CITIES

        found = [city for city in _CITIES if re.search(rf"\b{city}\b", sentence)]
        assert len(found) == 1, sentence
        return found[0]
    if kind == "inventory":
        listing, question = prompt.removeprefix("Inventory: ").split(". How many ")
        counts = dict(item.split(": ") for item in listing.split(", "))
        return counts[question.removesuffix(" are there?")]
    if kind == "iso_date":
        text = prompt.split(": ", 1)[1]
        return datetime.datetime.strptime(text, "%B %d, %Y").date().isoformat()
    if kind == "snake_case":
        return "_".join(word.lower() for word in prompt.split(": ", 1)[1].split())
    raise AssertionError(kind)


def test_responses_are_the_right_answers_and_survive_task_answer() -> None:
    for row in make_task_rows(200, seed=11):
        assert row["response"] == _expected_answer(row["prompt"])
        assert task_answer(row["response"]) == row["response"]


@pytest.mark.parametrize(
    "decorated",
    ["{a}", " {a} ", "{a}.", "{a}\n", '"{a}"', "'{a}'.", "`{a}`", '"{a}."', "  {a} .\n"],
)
def test_task_answer_forgives_only_form(decorated: str) -> None:
    for row in make_task_rows(20, seed=5):
        assert task_answer(decorated.format(a=row["response"])) == row["response"]


def test_task_answer_keeps_sentences_and_content() -> None:
    assert task_answer("The city mentioned is Lisbon.") == "The city mentioned is Lisbon"
    assert task_answer("Lisbon, Portugal") == "Lisbon, Portugal"
    assert task_answer("lisbon") == "lisbon"  # case is content: no match for "Lisbon"
    assert task_answer("2021-03-05\n\nThis date is in ISO format.") != "2021-03-05"
    assert task_answer("a   b\tc") == "a b c"
    assert task_answer("") == ""
    assert task_answer(".") == ""


def test_exact_match_math() -> None:
    assert exact_match(["Lisbon"], ["Lisbon"]) == 1.0
    assert exact_match(["Lisbon.", "The city is Paris"], ["Lisbon", "Paris"]) == 0.5
    assert exact_match(["7", "8", "9", '"10"'], ["7", "8", "1", "10"]) == 0.75
    assert exact_match(["x", "y", "z"], ["a", "b", "c"]) == 0.0
    assert exact_match(["lisbon"], ["Lisbon"]) == 0.0
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        exact_match(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one"):
        exact_match([], [])


def _read_jsonl(path: Path) -> list[dict[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_write_quickstart_data_writes_disjoint_valid_jsonl(tmp_path: Path) -> None:
    folder = tmp_path / "qs" / "data"  # parents are created
    train_path, eval_path = write_quickstart_data(folder, n_train=48, n_eval=12, seed=4)
    assert (train_path, eval_path) == (folder / "train.jsonl", folder / "eval.jsonl")
    assert sorted(p.name for p in folder.iterdir()) == ["eval.jsonl", "train.jsonl"]  # no temp files left

    train, evals = _read_jsonl(train_path), _read_jsonl(eval_path)
    assert len(train) == 48 and len(evals) == 12
    assert train + evals == make_task_rows(60, seed=4)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    assert train_path.read_text(encoding="utf-8").endswith("\n")

    # Writing again replaces the files with the same content.
    before = train_path.read_bytes(), eval_path.read_bytes()
    write_quickstart_data(folder, n_train=48, n_eval=12, seed=4)
    assert (train_path.read_bytes(), eval_path.read_bytes()) == before


@pytest.mark.parametrize(("n_train", "n_eval"), [(0, 5), (5, 0)])
def test_write_quickstart_data_rejects_empty_splits(tmp_path: Path, n_train: int, n_eval: int) -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        write_quickstart_data(tmp_path, n_train=n_train, n_eval=n_eval, seed=0)
    assert list(tmp_path.iterdir()) == []


def test_task_kind_rejects_other_prompts() -> None:
    with pytest.raises(ValueError, match="Not a quickstart prompt"):
        task_kind("Tell me a joke.")
