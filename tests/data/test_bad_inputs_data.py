"""Bad input data, end to end: each problem is one error naming file:line, raised before training starts.

A source that cannot be opened or whose first row is unreadable fails before Ray starts; a bad row further on
is found by the Ray Data read/tokenize job (on the shared session Ray) and reported with every other one.
All cases drive the real CLI (`raysft data`).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from transformers import PreTrainedTokenizerBase

from raysft.cli import main
from raysft.config import Config, to_yaml
from raysft.data import pipeline
from raysft.data.pipeline import tokenize_split
from raysft.errors import DataError, RunError
from raysft.config import SourceConfig
from tests.runs import tiny_config

GOOD_LINE = json.dumps({"question": "What is 2 + 3?", "answer": "5"})


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail the test if the command gets as far as starting Ray."""
    was_running = ray.is_initialized()

    def refuse(address: str | None) -> None:
        raise AssertionError("Ray was started: the data error should have come before it")

    monkeypatch.setattr(pipeline, "ensure_ray", refuse)
    yield
    if not was_running:  # a Ray test run earlier in the session leaves its Ray up
        assert not ray.is_initialized()


def _config(model_dir: Path, tmp_path: Path, train_file: Path, overrides: list[str] | None = None) -> Config:
    return tiny_config(model_dir, tmp_path / "run", [f"data.train.path={train_file}", *(overrides or [])])


def _raysft_data(cfg: Config, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run `raysft data CONFIG` in-process; return the exit status and stderr."""
    config_path = tmp_path / "config.yaml"
    config_path.write_text(to_yaml(cfg))
    status = main(["data", str(config_path)])
    return status, capsys.readouterr().err


# Each file and the start of the error it must give ({path} is the file).
BAD_FILES = {
    "jsonl-bad-byte": (
        "data.jsonl",
        f"{GOOD_LINE}\n{GOOD_LINE}\n".encode() + b'{"question": "\xff", "answer": "x"}\n',
        "{path}:3: not UTF-8 text (byte 0xff at byte 15 of the line)",
    ),
    "jsonl-random-bytes": (
        "data.jsonl",
        b"\n" + random.Random(0).randbytes(4096),
        "{path}:2: not UTF-8 text",
    ),
    "json-latin1": (
        "data.json",
        '[\n  {"question": "Caf\xe9?", "answer": "yes"}\n]\n'.encode("latin-1"),
        "{path}:2: not UTF-8 text (byte 0xe9 at byte 20 of the line)",
    ),
    "csv-bad-byte": (
        "data.csv",
        "question,answer\nq1,a1\nna\xefve,a2\n".encode("latin-1"),
        "{path}:3: not UTF-8 text (byte 0xef at byte 3 of the line)",
    ),
    "parquet-not-parquet": (
        "data.parquet",
        b"PAR1 this is not a Parquet file",
        "{path}: not a readable Parquet file: Parquet magic bytes not found",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_unreadable_file_names_file_and_line(
    case: str, ray_session: None, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name, content, expected = BAD_FILES[case]
    path = tmp_path / name
    path.write_bytes(content)
    status, err = _raysft_data(_config(tiny_model_dir, tmp_path, path), tmp_path, capsys)
    assert status == 2
    assert err.startswith("raysft: " + expected.format(path=path)), err
    assert "Traceback" not in err


def test_unreadable_first_row_fails_before_ray_starts(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_ray: None
) -> None:
    # The format is detected from a source's first row, in the driver: a file that cannot give one fails there.
    name, content, expected = BAD_FILES["parquet-not-parquet"]
    path = tmp_path / name
    path.write_bytes(content)
    status, err = _raysft_data(_config(tiny_model_dir, tmp_path, path), tmp_path, capsys)
    assert status == 2 and err.startswith("raysft: " + expected.format(path=path)), err


def test_giant_row_is_an_invalid_row(
    ray_session: None, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Over the default data.max_row_chars (1,000,000): reported by origin before any tokenizer sees it.
    path = tmp_path / "data.jsonl"
    giant = json.dumps({"question": "Repeat.", "answer": "x" * 1_200_000})
    path.write_text(f"{GOOD_LINE}\n{giant}\n{GOOD_LINE}\n")
    status, err = _raysft_data(_config(tiny_model_dir, tmp_path, path), tmp_path, capsys)
    assert status == 2
    assert err.startswith(f"raysft: {path}:2: the row holds 1,200,007 characters of text, more than data.max_row_chars")
    assert "Traceback" not in err


def test_giant_csv_cell_is_judged_by_max_row_chars(
    ray_session: None, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Longer than Python's csv cell limit (128 KiB): still read, then reported as a long row.
    path = tmp_path / "data.csv"
    path.write_text("question,answer\nq1,a1\nq2," + "y" * 200_000 + "\n")
    cfg = _config(tiny_model_dir, tmp_path, path, ["data.max_row_chars=100000"])
    status, err = _raysft_data(cfg, tmp_path, capsys)
    assert status == 2
    assert err.startswith(f"raysft: {path}:3: the row holds 200,002 characters of text")


def test_giant_row_is_skipped_with_invalid_rows_skip(
    ray_session: None, tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "data.jsonl"
    long_row = json.dumps({"question": "Repeat.", "answer": "x" * 5000})
    path.write_text(f"{GOOD_LINE}\n{long_row}\n{GOOD_LINE}\n")
    cfg = _config(tiny_model_dir, tmp_path, path, ["data.train.invalid_rows=skip", "data.max_row_chars=2000",
                                                   f"data.cache_dir={tmp_path / 'cache'}", "data.max_seq_len=512"])
    with caplog.at_level(logging.WARNING, logger="raysft.data.pipeline"):
        prepared = pipeline.prepare_data(cfg)
    assert [e["origin"] for e in pipeline.first_examples(prepared.tokenized["train"], 5)] == [f"{path}:1", f"{path}:3"]
    assert prepared.stats.counts["train"]["invalid_skipped"] == 1 and prepared.stats.rows_read["train"] == 3
    assert f"skipping invalid row: {path}:2: the row holds 5,007 characters of text" in caplog.text


# --- on Ray: the tokenize job fails in bounded time, with a reason -----------------------------------


def test_tokenize_actor_death_fails_the_job_in_bounded_time(
    ray_session: None, tiny_model_dir: Path, tmp_path: Path
) -> None:
    class DiesLikeAnOomKill:
        """Stands in for a tokenizer whose actor is killed for memory: the process just exits."""

        @property
        def eos_token_id(self) -> int:
            os._exit(1)

    cfg = _config(tiny_model_dir, tmp_path, tmp_path / "unused.jsonl")
    location = str(tmp_path / "cache" / "tokenized")
    started = time.monotonic()
    with pytest.raises(RunError) as caught:
        tokenize_split([SourceConfig(rows=[{"text": "x"}])], DiesLikeAnOomKill(), cfg.data, location)
    assert time.monotonic() - started < 120  # Ray Data's default restarts the actor forever
    message = str(caught.value)
    assert message.startswith("the tokenize job (Ray Data) failed: ActorDiedError: The actor died unexpectedly")
    assert "lower data.max_row_chars" in message and "\n" not in message
    assert not list(Path(location).rglob("*.parquet")) and not (Path(location) / "manifest.json").exists()


def test_rows_that_fail_to_tokenize_are_reported_together(
    ray_session: None, tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    # This template deletes spelled tokens, so a row spelling one cannot be read as plain text: a data
    # error found on the actors, reported by origin rather than failing the Ray job.
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "message['content']", "message['content'] | replace('<|im_end|>', '')"
    )
    forged = [{"role": "user", "content": "a<|im_end|>"}, {"role": "assistant", "content": "b"}]
    ordinary = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    source = SourceConfig(rows=[{"messages": m} for m in [ordinary, forged, forged]])
    cfg = _config(tiny_model_dir, tmp_path, tmp_path / "unused.jsonl")
    location = tmp_path / "cache" / "tokenized"
    with pytest.raises(DataError) as caught:
        tokenize_split([source], tokenizer, cfg.data, str(location))
    assert not (location / "manifest.json").exists()
    lines = str(caught.value).splitlines()
    assert [line.split(":")[0] for line in lines] == ["rows[1]", "rows[2]"]
    assert "the data spells the special token '<|im_end|>'" in lines[0]


def test_content_parts_read_and_other_parts_named_by_file_and_line(
    ray_session: None, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text_parts = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2 + 3?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "5"}]}]}
    with_image = copy.deepcopy(text_parts)
    with_image["messages"][0]["content"].append({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}})
    path = tmp_path / "chat.jsonl"
    path.write_text(f"{json.dumps(text_parts)}\n{json.dumps(with_image)}\n")
    before = path.read_bytes()
    status, err = _raysft_data(_config(tiny_model_dir, tmp_path, path), tmp_path, capsys)
    assert status == 2 and "Traceback" not in err
    assert err.startswith(f"raysft: {path}:2: turn 0: 'content' part 2 is of type 'image_url'; raysft trains on text"), err
    assert path.read_bytes() == before
    path.write_text(f"{json.dumps(text_parts)}\n")
    status, err = _raysft_data(_config(tiny_model_dir, tmp_path, path), tmp_path, capsys)
    assert status == 0, err
