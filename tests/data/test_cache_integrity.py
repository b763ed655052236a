"""The data cache trusts only what its manifest's checksums vouch for: a flipped bit, a truncated file or a
half-written manifest is named on the console, the entry discarded (raysft's own files only) and built again."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysft.data.cache import MANIFEST, CachedTable, index_written, write_folder
from raysft.data.pipeline import cache_root, prepare_data
from tests.runs import tiny_config


def committed_table(location: Path, rows: int = 40) -> CachedTable:
    """A table written as Ray Data writes one (Parquet files of consecutive keys in a write folder), committed."""
    folder = Path(write_folder(str(location)))
    folder.mkdir(parents=True)
    for part, start in enumerate(range(0, rows, 16)):
        seq = list(range(start, min(start + 16, rows)))
        pq.write_table(pa.table({"seq": pa.array(seq, pa.int64()), "input_ids": pa.array([[s, s + 1] for s in seq])}),
                       folder / f"{part}.parquet", row_group_size=8)
    table = index_written(str(location), str(folder))
    table.commit()
    return table


def flip_a_bit(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest", "old manifest"])
def test_a_damaged_table_is_named_discarded_and_not_opened(
    damage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    location = tmp_path / "cache" / "packed" / "3f2a"
    table = committed_table(location)
    assert CachedTable.open(str(location)) is not None  # verifies as written
    (location / "notes.txt").write_text("a file raysft did not write")
    victim = location / table.files[1]
    manifest = location / MANIFEST
    if damage == "flip":
        flip_a_bit(victim, victim.stat().st_size // 2)  # inside a data page: the Parquet reader would not notice
    elif damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-100])
    elif damage == "delete":
        victim.unlink()
    elif damage == "manifest":
        manifest.write_bytes(manifest.read_bytes()[:50])  # half-written
    else:  # a manifest from before checksums
        recorded = json.loads(manifest.read_text())
        del recorded["checksums"]
        manifest.write_text(json.dumps(recorded))
    capsys.readouterr()
    assert CachedTable.open(str(location)) is None
    [line] = capsys.readouterr().err.splitlines()
    named = str(manifest) if "manifest" in damage else str(victim)
    assert named in line and "discarding this cache entry and building it again" in line
    # The entry is gone (its manifest and write folders); a file the user put beside them stays.
    assert sorted(p.name for p in location.iterdir()) == ["notes.txt"]
    assert CachedTable.open(str(location)) is None


def test_prepare_data_rebuilds_damaged_cache_entries_with_the_same_tokens(
    ray_session: None, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", [f"data.cache_dir={tmp_path / 'cache'}"])
    fresh = prepare_data(cfg)
    tokens = {name: table.read(0, table.num_rows, ["input_ids", "labels"]) for name, table in fresh.splits.items()}
    root = Path(cache_root(cfg.data))
    train, evaluation, tokenized = fresh.splits["train"], fresh.splits["eval"], fresh.tokenized["train"]
    flipped = Path(train.location) / train.files[0]
    truncated = Path(tokenized.location) / tokenized.files[0]
    half_manifest = Path(evaluation.location) / MANIFEST
    flip_a_bit(flipped, flipped.stat().st_size // 2)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    half_manifest.write_bytes(half_manifest.read_bytes()[:40])
    capsys.readouterr()

    again = prepare_data(cfg)
    said = capsys.readouterr().err
    for named in (flipped, truncated, half_manifest):
        assert f"data cache: {named}" in said
    assert said.count("discarding this cache entry") == 3
    assert again.fingerprint == fresh.fingerprint  # a --resume still matches its checkpoints
    for name, table in again.splits.items():
        assert table.read(0, table.num_rows, ["input_ids", "labels"]).equals(tokens[name])
    assert not flipped.exists() and not truncated.exists()  # the damaged files went with their entries
    # The rebuilt entries verify: a third run reads them from the cache, silently.
    capsys.readouterr()
    prepare_data(cfg)
    assert "data cache" not in capsys.readouterr().err
    assert sorted(p.name for p in root.iterdir()) == ["packed", "tokenized"]
