"""The data pipeline on a real Ray: sources read by Ray Data, tokenized and packed into Parquet tables on the
cache, and what a training worker holds of them (raysft/data/pipeline.py, raysft/data/stream.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysft.config import Config
from raysft.data.cache import CachedTable, index_written
from raysft.data.packing import apply_length_policy, pack_examples
from raysft.data.cache import MANIFEST as MANIFEST_NAME
from raysft.data.pipeline import prepare_data
from raysft.data.sources import load_examples
from raysft.data.stream import PackedRows
from raysft.data.tokenize import tokenize_example
from raysft.tokenizer import load_tokenizer
from raysft.training.step import EpochOrder
from tests.runs import REPO, SHARED_DATA, tiny_config


def _config(model_dir: Path, tmp_path: Path, sources: list[dict], overrides: list[str] | None = None) -> Config:
    cfg = tiny_config(model_dir, tmp_path / "run", [f"data.cache_dir={tmp_path / 'cache'}", *(overrides or [])])
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={
        "train": [type(cfg.data.train[0]).model_validate(s) for s in sources], "eval": None})})


@pytest.fixture
def two_files(tmp_path: Path) -> Path:
    """60 GSM8K rows split over two JSONL files of a folder (read by two Ray Data read tasks)."""
    lines = (SHARED_DATA / "gsm8k" / "train.jsonl").read_text().splitlines()[:60]
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text("\n".join(lines[:25]) + "\n")
    (folder / "b.jsonl").write_text("\n".join(lines[25:]) + "\n")
    return folder


def test_ray_data_pipeline_equals_packing_in_process(
    ray_session: None, tiny_model_dir: Path, tmp_path: Path, two_files: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inline = [{"prompt": "Say hi.", "response": "Hi!"}, {"prompt": "Count to 3.", "response": "1 2 3"}]
    # A path relative to the driver's working folder, which Ray's read tasks do not share.
    monkeypatch.chdir(tmp_path)
    cfg = _config(tiny_model_dir, tmp_path, [{"path": two_files.name}, {"rows": inline}])
    prepared = prepare_data(cfg)

    tokenizer = load_tokenizer(cfg.model)
    examples = [tokenize_example(e, tokenizer, False) for e in load_examples(cfg.data.train)]
    kept, counts = apply_length_policy(examples, cfg.data.max_seq_len, cfg.data.over_length)
    expected = pack_examples(kept, cfg.data.max_seq_len)  # one pack window: the same best-fit decreasing

    table = prepared.splits["train"]
    got = table.read(0, table.num_rows, ["input_ids", "labels", "example_lengths"]).to_pylist()
    assert [row["input_ids"] for row in got] == [row["input_ids"].tolist() for row in expected]
    assert [row["labels"] for row in got] == [row["labels"].tolist() for row in expected]
    assert [row["example_lengths"] for row in got] == [row["example_lengths"].tolist() for row in expected]
    stats = prepared.stats
    assert stats.rows_read["train"] == 62 and stats.examples_kept["train"] == len(kept)
    assert stats.counts["train"] == {**counts, "invalid_skipped": 0}
    lengths = np.array([len(e["input_ids"]) for e in examples])
    assert stats.token_length_percentiles["train"]["p90"] == int(np.percentile(lengths, 90))
    assert stats.tokens_after_packing["train"] == sum(len(e["input_ids"]) for e in kept)


def test_a_new_max_seq_len_repacks_without_tokenizing_again(
    ray_session: None, tiny_model_dir: Path, tmp_path: Path, two_files: Path
) -> None:
    first = prepare_data(_config(tiny_model_dir, tmp_path, [{"path": str(two_files)}]))
    tokenized_manifest = Path(first.tokenized["train"].location) / MANIFEST_NAME
    written = tokenized_manifest.stat().st_mtime_ns
    again = prepare_data(_config(tiny_model_dir, tmp_path, [{"path": str(two_files)}]))
    assert again.fingerprint == first.fingerprint  # all from the cache
    longer = prepare_data(_config(tiny_model_dir, tmp_path, [{"path": str(two_files)}], ["data.max_seq_len=512"]))
    assert tokenized_manifest.stat().st_mtime_ns == written  # the tokenized table was reused as it was
    assert longer.fingerprint != first.fingerprint
    assert longer.num_rows("train") < first.num_rows("train")
    assert longer.stats.rows_read == first.stats.rows_read


def test_a_worker_holds_a_bounded_number_of_chunks(
    ray_session: None, tiny_model_dir: Path, tmp_path: Path, two_files: Path
) -> None:
    prepared = prepare_data(_config(tiny_model_dir, tmp_path, [{"path": str(two_files)}], ["data.max_seq_len=128"]))
    table = prepared.splits["train"]
    everything = table.read(0, table.num_rows, ["input_ids"]).column("input_ids").to_pylist()
    rows = PackedRows(CachedTable.open(table.location), chunk_rows=4, max_chunks=3)
    order = EpochOrder(len(rows), seed=0, epoch=0, window_rows=8).rows(0, len(rows))
    for start in range(0, len(order), 2):
        step = order[start : start + 2]
        rows.prefetch(order[start + 2 : start + 4])
        batch = rows.batch(step, pad_token_id=0)
        for position, index in enumerate(step):
            assert batch["input_ids"][position, : len(everything[index])].tolist() == everything[index]
        assert len(rows._chunks) <= 3
    rows.close()


def test_an_interrupted_write_is_never_read(tmp_path: Path) -> None:
    location = tmp_path / "packed" / "key"
    (location / "w-123").mkdir(parents=True)
    (location / "w-123" / "part.parquet").write_bytes(b"half a file")
    assert CachedTable.open(str(location)) is None  # no manifest: a write that did not finish
    (location / MANIFEST_NAME).write_text(json.dumps({"files": [], "row_groups": [], "checksums": {}}))
    assert CachedTable.open(str(location)).num_rows == 0


def test_data_preparation_and_model_loading_import_only_what_they_need() -> None:
    # `raysft data` runs without Ray Train; model loading (workers, export, generate) without the data package.
    code = ("import sys, raysft.data.pipeline, raysft.data.read, raysft.data.stream; "
            "assert 'ray.train' not in sys.modules and not any(m.startswith('raysft.training') for m in sys.modules); "
            "[sys.modules.pop(m) for m in list(sys.modules) if m.startswith('raysft')]; "
            "import raysft.model; assert not any(m.startswith('raysft.data') for m in sys.modules), sorted(sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_batch_wider_than_the_chunk_budget_is_still_served(tmp_path: Path) -> None:
    rows = [{"seq": i, "input_ids": [i, i + 1], "labels": [i, i + 1], "example_lengths": [2], "num_tokens": 2,
             "num_trained": 1} for i in range(12)]
    folder = tmp_path / "packed" / "w-1"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "part.parquet", row_group_size=4)
    table = index_written(str(tmp_path / "packed"), str(folder))
    packed = PackedRows(table, chunk_rows=2, max_chunks=1)  # a batch over 3 chunks: none evicted while needed
    batch = packed.batch(np.array([0, 5, 11]), pad_token_id=0)
    assert batch["input_ids"].tolist() == [[0, 1], [5, 6], [11, 12]]
    assert packed.trained_tokens(np.array([0, 5, 11])) == 3
    packed.close()
