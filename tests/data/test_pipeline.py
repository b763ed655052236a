"""The data pipeline's own pieces that need no Ray session (raysft.data.pipeline): the tokenized cache's key,
the length policy / hold-out / packing stage, and the process-wide Ray Data settings."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import ray.data
from transformers import PreTrainedTokenizerBase

from raysft.config import Config, DataConfig, SourceConfig, parse_config
from raysft.data.labels import IGNORE_INDEX
from raysft.data.pipeline import cache_key, quiet_data_context, shape_splits
from raysft.errors import DataError

# --- cache_key: what the tokenized cache is keyed by ----------------------------------------------------


def test_cache_key_covers_the_tokenize_options(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    cfg = DataConfig(train=[SourceConfig(rows=[{"text": "x"}])])
    variants = [{}, {"parse_special_tokens": True}, {"train_on_inputs": True}, {"max_row_chars": 10}]
    keys = {cache_key(cfg.train, tiny_tokenizer, cfg.model_copy(update=change)) for change in variants}
    assert len(keys) == len(variants)
    # max_seq_len only re-applies the length policy and re-packs: the same tokenized cache.
    assert cache_key(cfg.train, tiny_tokenizer, cfg.model_copy(update={"max_seq_len": 64})) in keys


def test_cache_key_follows_file_content_not_its_timestamp(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "one"}\n')
    cfg = DataConfig(train=[SourceConfig(path=str(data))])
    first = cache_key(cfg.train, tiny_tokenizer, cfg)
    data.write_text('{"text": "one"}\n')  # rewritten, same bytes: the cache still holds
    assert cache_key(cfg.train, tiny_tokenizer, cfg) == first
    data.write_text('{"text": "two"}\n')  # edited in place under the same name: a new cache
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


# --- shape_splits: length policy, hold-out, packing, statistics ------------------------------------------


def example(length: int, first: int = 1, trained: bool = True, origin: str = "rows[0]") -> dict[str, Any]:
    ids = list(range(first, first + length))
    return {"input_ids": ids, "labels": ids if trained else [IGNORE_INDEX] * length, "origin": origin}


def config(**data: Any) -> Config:
    return parse_config({"model": {"name_or_path": "m"}, "data": {"train": {"path": "t.jsonl"}, **data}})


def test_shape_splits_applies_the_length_policy_packs_and_counts_what_it_did() -> None:
    train = [example(3), example(6, first=10), example(2, first=20), example(2, first=30, trained=False)]
    prepared = shape_splits({"train": train}, config(max_seq_len=5, over_length="drop"))
    assert [e["input_ids"] for e in prepared.examples["train"]] == [[1, 2, 3], [20, 21]]
    # best-fit decreasing into rows of 5: the 3- and 2-token examples share one row, positions restarting.
    rows = prepared.rows["train"]
    assert [(r["input_ids"], r["position_ids"]) for r in rows] == [([1, 2, 3, 20, 21], [0, 1, 2, 0, 1])]
    stats = prepared.stats
    assert stats.rows_read == {"train": 4} and stats.examples_kept == {"train": 2}
    assert stats.counts["train"] == {"over_length_dropped": 1, "truncated": 0, "no_trained_tokens": 1}
    assert stats.token_length_percentiles["train"]["max"] == 6  # as read, before the length policy
    assert stats.trained_token_fraction["train"] == pytest.approx((2 + 5 + 1) / 13)  # no example's first token
    assert stats.rows_after_packing == {"train": 1} and stats.packing_efficiency == {"train": 1.0}


def test_shape_splits_without_packing_keeps_one_row_per_example_and_truncates() -> None:
    prepared = shape_splits({"train": [example(3), example(7, first=10)]}, config(max_seq_len=4, packing=False))
    assert [r["input_ids"] for r in prepared.rows["train"]] == [[1, 2, 3], [10, 11, 12, 13]]
    assert prepared.stats.counts["train"]["truncated"] == 1


def test_shape_splits_holds_out_eval_by_seed_disjoint_and_reproducible() -> None:
    train = [example(2, first=10 * i, origin=f"rows[{i}]") for i in range(1, 11)]
    cfg = config(eval_fraction=0.3)
    first, again = shape_splits({"train": train}, cfg), shape_splits({"train": train}, cfg)
    held, kept = first.examples["eval"], first.examples["train"]
    assert len(held) == 3 and len(kept) == 7
    assert sorted(e["origin"] for e in held + kept) == sorted(e["origin"] for e in train)
    assert again.examples == first.examples and again.fingerprint == first.fingerprint
    # Given eval data, nothing is held out of train.
    given = shape_splits({"train": train, "eval": [example(2)]}, cfg)
    assert len(given.examples["train"]) == 10 and len(given.examples["eval"]) == 1


def test_shape_splits_fingerprint_changes_with_the_packed_rows() -> None:
    train = [example(3), example(2, first=20)]
    base = shape_splits({"train": train}, config(max_seq_len=5)).fingerprint
    assert shape_splits({"train": train}, config(max_seq_len=5)).fingerprint == base
    assert shape_splits({"train": train}, config(max_seq_len=4)).fingerprint != base  # other rows
    assert shape_splits({"train": [example(3), example(2, first=21)]}, config(max_seq_len=5)).fingerprint != base


def test_shape_splits_with_nothing_left_names_the_split() -> None:
    with pytest.raises(DataError, match=r"^data\.eval: no examples left after the length policy"):
        shape_splits({"train": [example(2)], "eval": [example(9)]}, config(max_seq_len=4, over_length="drop"))


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
