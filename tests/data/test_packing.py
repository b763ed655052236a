"""Length policy, best-fit packing, collate, and packed == one-by-one (raysft.data.packing)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from raysft.config import SourceConfig
from raysft.errors import DataError
from raysft.data.packing import (
    apply_length_policy,
    best_fit_decreasing,
    collate,
    pack_examples,
    packing_efficiency,
    unpacked_rows,
)
from raysft.data.sources import load_examples
from raysft.labels import IGNORE_INDEX
from raysft.data.tokenize import tokenize_example
from raysft.ops import PACKED_SDPA, PackedLayout, register_packed_sdpa
from tests.tiny import TINY_ARCHS


def _example(length: int, origin: str = "x", trained_from: int = 0) -> dict[str, Any]:
    ids = [(7 * len(origin) + 13 * i) % 500 + 3 for i in range(length)]
    labels = [IGNORE_INDEX] * trained_from + ids[trained_from:]
    return {"input_ids": ids, "labels": labels, "origin": origin}


def _segments(row: dict[str, Any]) -> list[tuple[int, int]]:
    """(start, end) of each example in a row, read back from the position_ids restarts."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
    return list(zip(starts, [*starts[1:], len(row["position_ids"])], strict=True))


# --- best-fit decreasing ---------------------------------------------------------------------------


def test_best_fit_respects_capacity_and_places_every_item_once() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    bins = best_fit_decreasing(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    # Best fit decreasing stays within 11/9 OPT + 1; OPT >= the total length over the capacity.
    assert len(bins) <= 11 / 9 * (sum(lengths) / 128) + 1


def test_best_fit_is_deterministic_with_ties_by_index() -> None:
    assert best_fit_decreasing([2, 2, 2], 4) == [[0, 1], [2]]
    assert best_fit_decreasing([3, 5, 2, 4], 7) == [[1, 2], [3, 0]]
    # The item goes to the fullest bin it fits: 2 joins the bin with 5 (room 2), not the one with 4.
    assert best_fit_decreasing([5, 4, 2], 7) == [[0, 2], [1]]
    lengths = [random.Random(1).randint(1, 50) for _ in range(200)]
    assert best_fit_decreasing(lengths, 64) == best_fit_decreasing(list(lengths), 64)


def test_best_fit_rejects_items_over_capacity() -> None:
    with pytest.raises(ValueError, match="item 1 has length 9 > capacity 8"):
        best_fit_decreasing([3, 9], 8)


# --- pack / unpack / collate -----------------------------------------------------------------------


def test_pack_and_unpack_preserve_tokens() -> None:
    examples = [_example(n, f"e{i}", trained_from=n // 2) for i, n in enumerate([7, 3, 12, 5, 9, 1, 4])]
    for rows in (pack_examples(examples, 16), unpacked_rows(examples)):
        pieces = []
        for row in rows:
            assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) <= 16
            assert row["num_examples"] == len(_segments(row))
            for start, end in _segments(row):
                assert row["position_ids"][start:end].tolist() == list(range(end - start))
                pieces.append((row["input_ids"][start:end].tolist(), row["labels"][start:end].tolist()))
        expected = [(e["input_ids"], [IGNORE_INDEX, *e["labels"][1:]]) for e in examples]
        assert sorted(pieces) == sorted(expected)
    packed = pack_examples(examples, 16)
    assert len(packed) == 3 and sum(r["num_examples"] for r in packed) == len(examples)
    assert packing_efficiency(packed, 16) == pytest.approx(41 / 48)
    assert packing_efficiency(unpacked_rows(examples), 16) == pytest.approx(41 / (7 * 16))


def test_collate_pads_as_its_own_segment() -> None:
    rows = pack_examples([_example(3, "a"), _example(2, "b")], 8) + unpacked_rows([_example(7, "c")])
    batch = collate(rows, pad_token_id=2)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask, on purpose
    assert all(t.dtype == torch.int64 and t.shape == (2, 7) for t in batch.values())
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 4, 5, 6]]
    assert batch["input_ids"][0, 5:].tolist() == [2, 2]
    assert batch["labels"][0].tolist()[3:] == [IGNORE_INDEX, rows[0]["labels"][4], IGNORE_INDEX, IGNORE_INDEX]


# --- length policy ---------------------------------------------------------------------------------


def test_length_policy_truncate_counts() -> None:
    examples = [
        _example(5, "fits"),
        _example(12, "long"),
        _example(12, "answer-cut-off", trained_from=10),
        _example(4, "nothing-trained", trained_from=4),
    ]
    kept, counts = apply_length_policy(examples, 8, "truncate")
    assert [e["origin"] for e in kept] == ["fits", "long"]
    assert kept[1]["input_ids"] == examples[1]["input_ids"][:8] and kept[1]["labels"] == examples[1]["labels"][:8]
    assert counts == {"over_length_dropped": 0, "truncated": 2, "no_trained_tokens": 2}
    assert len(examples[1]["input_ids"]) == 12  # the input is not modified


def test_length_policy_drop_counts() -> None:
    examples = [_example(5, "fits"), _example(12, "long"), _example(3, "nothing-trained", trained_from=3)]
    kept, counts = apply_length_policy(examples, 8, "drop")
    assert [e["origin"] for e in kept] == ["fits"]
    assert counts == {"over_length_dropped": 1, "truncated": 0, "no_trained_tokens": 1}


def test_length_policy_raise_names_origin_and_length() -> None:
    with pytest.raises(DataError, match=r"^data.jsonl:7: 12 tokens, more than max_seq_len=8"):
        apply_length_policy([_example(5, "ok"), _example(12, "data.jsonl:7")], 8, "raise")


# --- correctness property 1: a packed batch computes what the examples compute one by one ----------


def _tokenized_examples(tokenizer: PreTrainedTokenizerBase, train_on_inputs: bool = False) -> list[dict[str, Any]]:
    rows = [
        {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
        {"question": "Who are you?", "answer": "I am a helpful assistant."},
        {"question": "Capital of France?", "answer": "Paris."},
        {"question": "Name a prime number below 10.", "answer": "7 is a prime number."},
    ]
    examples = load_examples([SourceConfig(rows=rows)])
    return [tokenize_example(e, tokenizer, train_on_inputs) for e in examples]


def _per_token_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], with_positions: bool = True
) -> torch.Tensor:
    """Cross-entropy of every next-token prediction, [B, T-1], without reduction."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    positions = batch["position_ids"] if with_positions else None
    # packed_sdpa gets its example layout the way TokenLoss hands it over.
    layout = {"packed_layout": PackedLayout(positions)} if positions is not None and (
        model.config._attn_implementation == PACKED_SDPA) else {}
    # On CUDA in bf16, as training runs there: packed_sdpa takes the varlen kernel.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.no_grad(), autocast:
        logits = model(input_ids=batch["input_ids"], position_ids=positions, use_cache=False, **layout).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), batch["input_ids"][:, 1:], reduction="none"
    ).cpu()


def _label_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy over the trained labels, the way a training step counts them."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE_INDEX, reduction="sum"
    )


def _alone(model: torch.nn.Module, example: dict[str, Any], pad_id: int) -> torch.Tensor:
    return _per_token_loss(model, collate(unpacked_rows([example]), pad_id))[0]


# On CUDA, packed_sdpa runs one varlen kernel per layer in bf16; bf16 rounding of a ~6-nat loss is a few
# hundredths, so the tolerance there is bf16's, against the same model run example by example in bf16.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
TOLERANCE = {"cpu": 1e-5, "cuda": 5e-2}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("attention", ["sdpa", PACKED_SDPA])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_packed_batch_equals_examples_one_by_one(
    arch: str, attention: str, device: str, tiny_model_factory: Callable[[str], Path],
    tiny_tokenizer: PreTrainedTokenizerBase,
) -> None:
    torch.manual_seed(0)
    register_packed_sdpa()  # built here directly, not through raysft.model.load_model
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_factory(arch), dtype=torch.float32, attn_implementation=attention
    ).to(device).eval()
    pad_id = tiny_tokenizer.pad_token_id
    examples = _tokenized_examples(tiny_tokenizer)
    lengths = [len(e["input_ids"]) for e in examples]
    capacity = max(lengths) + min(lengths) + 3
    rows = pack_examples(examples, capacity)
    assert any(r["num_examples"] > 1 for r in rows)
    assert len({len(r["input_ids"]) for r in rows}) > 1  # so that collate pads some row
    batch = collate(rows, pad_id)
    packed_loss = _per_token_loss(model, batch)

    members = best_fit_decreasing(lengths, capacity)
    compared = 0
    for row_index, row in enumerate(rows):
        for (start, end), example_index in zip(_segments(row), members[row_index], strict=True):
            # Within an example, every next-token prediction must match the example run alone.
            inside = packed_loss[row_index, start : end - 1]
            alone = _alone(model, examples[example_index], pad_id)
            torch.testing.assert_close(inside, alone, rtol=0, atol=TOLERANCE[device])
            compared += 1
    assert compared == len(examples)
    if device != "cpu":
        return  # the check below needs fp32's precision to have teeth

    # Without the position restarts, attention crosses examples and the losses differ: the check has teeth.
    crossed = _per_token_loss(model, batch, with_positions=False)
    start, end = _segments(rows[0])[1]
    assert (crossed[0, start : end - 1] - packed_loss[0, start : end - 1]).abs().max() > 1e-3


def test_padded_batch_of_unpacked_rows_equals_examples_one_by_one(
    tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    pad_id = tiny_tokenizer.pad_token_id
    short, long = sorted(_tokenized_examples(tiny_tokenizer)[:2], key=lambda e: len(e["input_ids"]))
    assert len(short["input_ids"]) < len(long["input_ids"])
    batch = collate(unpacked_rows([short, long]), pad_id)
    loss = _per_token_loss(model, batch)
    n = len(short["input_ids"])
    torch.testing.assert_close(loss[0, : n - 1], _alone(model, short, pad_id), rtol=0, atol=1e-5)
    torch.testing.assert_close(loss[1], _alone(model, long, pad_id), rtol=0, atol=1e-5)


def test_packed_label_loss_equals_sum_of_examples(
    tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    # Every token trained: an example's first label must not be predicted from the previous example.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    pad_id = tiny_tokenizer.pad_token_id
    examples = _tokenized_examples(tiny_tokenizer, train_on_inputs=True)
    rows = pack_examples(examples, sum(len(e["input_ids"]) for e in examples))
    assert len(rows) == 1
    packed = _label_loss_sum(model, collate(rows, pad_id))
    alone = sum(_label_loss_sum(model, collate(unpacked_rows([e]), pad_id)) for e in examples)
    torch.testing.assert_close(packed, alone, rtol=1e-6, atol=1e-5)
