"""The data pipeline's own pieces that need no Ray session (raysft.data.pipeline): the caches' keys, what a
pack task does to one window (length policy, hold-out, packing), the statistics, and the process-wide Ray
Data settings. tests/data/test_streaming.py runs the whole pipeline on Ray."""

from __future__ import annotations

import copy
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.data
from transformers import PreTrainedTokenizerBase

from raysft.config import DataConfig, SourceConfig
from raysft.data.cache import CachedTable, index_written, write_folder
from raysft.data.pipeline import (
    LengthSummary,
    PackPlan,
    WrittenSoFar,
    cache_key,
    held_out,
    pack_window,
    progress_lines,
    quiet_data_context,
    split_stats,
    split_summary,
    tokenize_actors,
)
from raysft.errors import DataError
from raysft.labels import IGNORE_INDEX, count_trained

# --- cache_key: what the tokenized cache is keyed by ----------------------------------------------------


def test_cache_key_covers_the_tokenize_options(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    cfg = DataConfig(train=[SourceConfig(rows=[{"text": "x"}])])
    variants = [{}, {"parse_special_tokens": True}, {"train_on_inputs": True}, {"max_row_chars": 10}]
    keys = {cache_key(cfg.train, tiny_tokenizer, cfg.model_copy(update=change)) for change in variants}
    assert len(keys) == len(variants)
    # max_seq_len only re-applies the length policy and re-packs: the same tokenized cache.
    assert cache_key(cfg.train, tiny_tokenizer, cfg.model_copy(update={"max_seq_len": 64})) in keys


def test_cache_key_follows_file_changes(tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "one"}\n')
    cfg = DataConfig(train=[SourceConfig(path=str(data))])
    first = cache_key(cfg.train, tiny_tokenizer, cfg)
    assert cache_key(cfg.train, tiny_tokenizer, cfg) == first  # unchanged: the cache holds
    data.write_text('{"text": "two"}\n')  # edited in place under the same name, same size: a new cache
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 1_000_000))
    assert cache_key(cfg.train, tiny_tokenizer, cfg) != first


def test_cache_key_sees_a_file_added_to_a_folder_source(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n')
    cfg = DataConfig(train=[SourceConfig(path=str(tmp_path))])
    before = cache_key(cfg.train, tiny_tokenizer, cfg)
    (tmp_path / "b.jsonl").write_text('{"text": "two"}\n')
    assert cache_key(cfg.train, tiny_tokenizer, cfg) != before


def test_cache_key_covers_inline_rows_source_options_and_the_tokenizer(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    cfg = DataConfig(train=[SourceConfig(rows=[{"text": "x"}])])
    key = cache_key(cfg.train, tiny_tokenizer, cfg)
    assert cache_key([SourceConfig(rows=[{"text": "y"}])], tiny_tokenizer, cfg) != key
    assert cache_key([SourceConfig(rows=[{"text": "x"}], limit=1)], tiny_tokenizer, cfg) != key
    retemplated = copy.deepcopy(tiny_tokenizer)
    retemplated.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert cache_key(cfg.train, retemplated, cfg) != key
    assert cache_key(cfg.train, tiny_tokenizer, cfg) == key  # and nothing else moves it


def test_tokenize_actors_follow_the_input_size(tmp_path: Path) -> None:
    # Fixed-size pools, their actors started together: one per 2 MiB of input, at most the configured number; a
    # `limit` reads only the start of a big file; a hub dataset's size is not known before it loads: all of them.
    small, big = tmp_path / "small.jsonl", tmp_path / "big.jsonl"
    small.write_text('{"text": "one"}\n')
    big.write_bytes(b'{"text": "%s"}\n' % (b"x" * (5 << 20)))
    assert tokenize_actors([SourceConfig(path=str(small))], most=4) == 1
    assert tokenize_actors([SourceConfig(path=str(big))], most=4) == 3
    assert tokenize_actors([SourceConfig(path=str(big))], most=2) == 2
    assert tokenize_actors([SourceConfig(path=str(big), limit=10)], most=4) == 1
    assert tokenize_actors([SourceConfig(rows=[{"text": "x"}])], most=4) == 1
    assert tokenize_actors([SourceConfig(rows=[{"text": "x"}]), SourceConfig(hf_dataset="org/name")], most=4) == 4


# --- packing a window and the split's statistics (no Ray: the functions the Ray Data tasks run) -------------


def example(length: int, first: int = 1, trained: bool = True) -> tuple[list[int], list[int]]:
    ids = list(range(first, first + length))
    return ids, ids if trained else [IGNORE_INDEX] * length


def tokenized_table(folder: Path, examples: list[tuple[list[int], list[int]]], errors: int = 0) -> CachedTable:
    """A committed tokenized table as the tokenize job writes it (plus `errors` skipped invalid rows)."""
    rows = [{"seq": i, "origin": f"rows[{i}]", "input_ids": ids, "labels": labels, "num_tokens": len(ids),
             "num_trained": count_trained(labels), "error": None, "skippable": False}
            for i, (ids, labels) in enumerate(examples)]
    rows += [{"seq": len(rows) + i, "origin": "bad", "input_ids": [], "labels": [], "num_tokens": 0,
              "num_trained": 0, "error": "bad row", "skippable": True} for i in range(errors)]
    return write_table(folder, pa.Table.from_pylist(rows))


def write_table(location: Path, table: pa.Table) -> CachedTable:
    folder = Path(write_folder(str(location)))
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "part.parquet", row_group_size=2)
    written = index_written(str(location), str(folder))
    written.commit()
    return written


def packed(tmp_path: Path, tokenized: CachedTable, plan: PackPlan) -> tuple[CachedTable, dict[str, Any]]:
    window = {"window": 0, "start": 0, "stop": tokenized.num_rows}
    table = write_table(tmp_path / f"packed-{plan.name}", pack_window(window, tokenized, plan))
    return table, split_stats(split_summary(tokenized, plan), plan, table)


def plan(name: str = "train", max_seq_len: int = 5, over_length: str = "truncate", packing: bool = True,
         holdout: tuple[float, int, bool] | None = None) -> PackPlan:
    return PackPlan(name, "train", "key", holdout, max_seq_len, over_length, packing)


def test_pack_window_applies_the_length_policy_packs_and_counts_what_it_did(tmp_path: Path) -> None:
    train = [example(3), example(6, first=10), example(2, first=20), example(2, first=30, trained=False)]
    tokenized = tokenized_table(tmp_path / "tok", train, errors=1)
    table, stats = packed(tmp_path, tokenized, plan(over_length="drop"))
    rows = table.read(0, table.num_rows, ["input_ids", "example_lengths"]).to_pylist()
    # best-fit decreasing into rows of 5: the 3- and 2-token examples share one row, each example its own
    # positions (example_lengths), the 6-token one dropped and the untrained one left out.
    assert rows == [{"input_ids": [1, 2, 3, 20, 21], "example_lengths": [3, 2]}]
    assert stats["rows_read"] == 5 and stats["examples_kept"] == 2
    assert stats["counts"] == {"over_length_dropped": 1, "truncated": 0, "no_trained_tokens": 1, "invalid_skipped": 1}
    assert stats["token_length_percentiles"]["max"] == 6  # as read, before the length policy
    assert stats["trained_token_fraction"] == pytest.approx((2 + 5 + 1) / 13)  # no example's first token
    assert stats["rows_after_packing"] == 1 and stats["packing_efficiency"] == 1.0


def test_pack_window_without_packing_keeps_one_row_per_example_and_truncates(tmp_path: Path) -> None:
    tokenized = tokenized_table(tmp_path / "tok", [example(3), example(7, first=10)])
    table, stats = packed(tmp_path, tokenized, plan(max_seq_len=4, packing=False))
    assert table.read(0, 2, ["input_ids"]).column("input_ids").to_pylist() == [[1, 2, 3], [10, 11, 12, 13]]
    assert stats["counts"]["truncated"] == 1


def test_length_percentiles_are_numpys_from_a_histogram() -> None:
    lengths = np.random.default_rng(0).integers(1, 900, size=1001)
    summary = LengthSummary()
    summary.add(lengths[:500], np.zeros(500, dtype=np.int64))
    summary.add(lengths[500:], np.zeros(501, dtype=np.int64))
    assert summary.percentiles() == {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)} | {
        "max": int(lengths.max())}


def test_hold_out_is_disjoint_reproducible_and_near_the_fraction(tmp_path: Path) -> None:
    tokenized = tokenized_table(tmp_path / "tok", [example(2, first=10 * i) for i in range(1, 201)])
    held = plan("eval", max_seq_len=2, packing=False, holdout=(0.3, 7, True))
    kept = plan("train", max_seq_len=2, packing=False, holdout=(0.3, 7, False))
    eval_rows, _ = packed(tmp_path, tokenized, held)
    train_rows, _ = packed(tmp_path, tokenized, kept)
    firsts = lambda table: {row[0] for row in table.read(0, table.num_rows, ["input_ids"]).column("input_ids").to_pylist()}
    assert firsts(eval_rows).isdisjoint(firsts(train_rows))
    assert len(firsts(eval_rows) | firsts(train_rows)) == 200
    assert 40 <= eval_rows.num_rows <= 80  # 60 expected
    assert (held_out(np.arange(200), 0.3, 7) == held_out(np.arange(200), 0.3, 7)).all()
    assert (held_out(np.arange(200), 0.3, 7) != held_out(np.arange(200), 0.3, 8)).any()  # the seed decides


def test_pack_plan_key_changes_with_what_shapes_the_rows() -> None:
    base = plan().key
    assert plan().key == base
    assert {plan(max_seq_len=4).key, plan(over_length="drop").key, plan(packing=False).key,
            plan(holdout=(0.1, 0, False)).key} .isdisjoint({base})


def test_nothing_left_after_the_length_policy_names_the_split(tmp_path: Path) -> None:
    tokenized = tokenized_table(tmp_path / "tok", [example(9)])
    with pytest.raises(DataError, match=r"^data\.eval: no examples left after the length policy"):
        packed(tmp_path, tokenized, plan("eval", max_seq_len=4, over_length="drop"))


# --- process-wide Ray Data settings ------------------------------------------------------------------------


def test_quiet_data_context_restores_the_process_wide_settings() -> None:
    context = ray.data.DataContext.get_current()
    before = (context.execution_options.preserve_order, context.enable_progress_bars, context.print_on_execution_start)
    with pytest.raises(KeyError), quiet_data_context(preserve_order=True) as inside:
        assert inside is context
        assert (context.execution_options.preserve_order, context.enable_progress_bars) == (True, False)
        assert context.print_on_execution_start is False
        raise KeyError("the job failed")  # the settings come back on the way out of a failed job too
    after = (context.execution_options.preserve_order, context.enable_progress_bars, context.print_on_execution_start)
    assert after == before


def test_quiet_data_context_keeps_ray_datas_console_to_warnings_unless_verbose() -> None:
    def record(level: int, message: str) -> logging.LogRecord:
        return logging.LogRecord("ray.data._internal.execution.streaming_executor", level, __file__, 1, message, None,
                                 None)

    finished, notice = record(logging.INFO, "Dataset dataset_1 execution finished"), record(
        logging.WARNING, "Progress bars disabled. To enable, set ...")  # raysft turned them off itself
    real = record(logging.WARNING, "Warning: The Ray cluster currently does not have any available CPUs")
    # Ray Data's console handler(s): what prints Ray Data's lines on the driver's console.
    consoles = [h for h in logging.getLogger("ray.data").handlers if type(h).__name__ == "PlainRayHandler"]
    assert consoles
    shown = lambda r: all(handler.filter(r) for handler in consoles)
    with quiet_data_context():
        assert not shown(finished) and not shown(notice) and shown(real)
    with quiet_data_context(verbose_run=True) as context:
        assert context.enable_progress_bars is True and shown(finished)
    assert shown(finished) and shown(notice)  # outside raysft's jobs: Ray Data's console as it was


# --- progress of a running job: what its folder holds so far -------------------------------------------------


def test_written_so_far_counts_finished_files_rows_and_pack_windows(tmp_path: Path) -> None:
    location = tmp_path / "packed"
    folder = Path(write_folder(str(location)))
    folder.mkdir(parents=True)
    progress = WrittenSoFar(str(folder))
    assert (progress.poll().rows, progress.windows) == (0, set())  # nothing written yet
    for window, rows in ((0, 5), (2, 3)):  # as pack tasks write them: keys window << 32 | row
        seq = pa.array([(window << 32) + row for row in range(rows)], pa.int64())
        pq.write_table(pa.table({"seq": seq, "num_tokens": pa.array([4] * rows)}), folder / f"{window}.parquet",
                       row_group_size=2)
    (folder / "9.parquet").write_bytes(b"PAR1 a file still being written: no footer yet")
    assert (progress.poll().rows, progress.windows) == (8, {0, 2})
    assert (progress.poll().rows, progress.windows) == (8, {0, 2})  # each finished file counted once


def test_progress_lines_say_how_far_a_long_job_is(capsys: pytest.CaptureFixture[str]) -> None:
    calls = iter([RuntimeError("storage did not answer"), "data train: tokenizing, 4,096 rows done"])

    def describe() -> str:
        answer = next(calls, "data train: tokenizing, 8,192 rows done")
        if isinstance(answer, Exception):
            raise answer
        return answer

    err, deadline = "", time.monotonic() + 30
    with progress_lines(describe, every_s=0.1):
        while err.count("\n") < 2 and time.monotonic() < deadline:  # however slow the machine, two lines
            time.sleep(0.05)
            err += capsys.readouterr().err
    lines = (err + capsys.readouterr().err).splitlines()
    assert lines[0].startswith("[raysft] data train: tokenizing, 4,096 rows done (")  # the failed look skipped
    assert lines[1].startswith("[raysft] data train: tokenizing, 8,192 rows done (")
    assert all(re.fullmatch(r"\[raysft\] data train: tokenizing, [\d,]+ rows done \(\d+s\)", line) for line in lines)
    with progress_lines(describe, every_s=10):  # a job shorter than the interval says nothing of its own
        pass
    assert capsys.readouterr().err == ""
