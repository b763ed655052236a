"""The start-up trace (raysft/training/startup.py): marks land in the named file, in order, and nowhere when unset."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from raysft.training.startup import TRACE_ENV, mark, mark_process_start


def test_marks_are_appended_in_order_with_this_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv(TRACE_ENV, str(trace))
    mark("train")
    mark_process_start()
    mark("checked")
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    assert [r["stage"] for r in records] == ["train", "process started", "checked"]
    assert {r["pid"] for r in records} == {os.getpid()}
    assert records[1]["t"] <= records[0]["t"] <= records[2]["t"]  # the process began before its first mark


def test_no_trace_without_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRACE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    mark("train")
    mark_process_start()
    assert list(tmp_path.iterdir()) == []
