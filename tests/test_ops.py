"""Per-example attention and the chunked linear cross-entropy (raysft.ops) against what they replace."""

from __future__ import annotations

import copy
import doctest
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

import raysft.ops
from raysft.config import LoraConfig, ModelConfig
from raysft.data.packing import collate, pack_examples
from raysft.model import TokenLoss, apply_lora, decoder_layers, load_model
from raysft.ops import PackedLayout, linear_cross_entropy, packed_segments
from tests.data.test_packing import _tokenized_examples
from tests.tiny import TINY_ARCHS


def test_docstring_examples_run() -> None:
    assert doctest.testmod(raysft.ops).failed == 0


def _reference(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, softcap: float | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    loss = nn.functional.cross_entropy(logits, targets, reduction="sum")
    return loss, (logits.detach().argmax(-1) == targets).sum()


def _grads(tensors: list[torch.Tensor]) -> list[torch.Tensor | None]:
    grads = [t.grad.clone() if t.grad is not None else None for t in tensors]
    for t in tensors:
        t.grad = None
    return grads


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("head_trained", [False, True])
def test_linear_cross_entropy_equals_head_then_cross_entropy(bias: bool, softcap: float | None, head_trained: bool) -> None:
    torch.manual_seed(0)
    head = nn.Linear(16, 97, bias=bias)
    head.requires_grad_(head_trained)
    hidden = torch.randn(11, 16, requires_grad=True)
    targets = torch.randint(0, 97, (11,))
    leaves = [hidden, *head.parameters()]

    expected_loss, expected_correct = _reference(hidden, head, targets, softcap)
    (expected_loss * 0.5).backward()  # a non-unit upstream gradient, as the loop's normalization gives
    expected_grads = _grads(leaves)
    loss, correct = linear_cross_entropy(hidden, head, targets, softcap, chunk_size=4)  # 11 = 4 + 4 + 3
    (loss * 0.5).backward()
    grads = _grads(leaves)

    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-5)
    assert int(correct) == int(expected_correct)
    assert (grads[1] is None) == (not head_trained)
    for got, want in zip(grads, expected_grads, strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_without_grad_and_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    head = nn.Linear(32, 200, bias=False)
    hidden, targets = torch.randn(20, 32, requires_grad=True), torch.randint(0, 200, (20,))
    expected, _ = _reference(hidden, head, targets, None)
    with torch.no_grad():
        loss, _ = linear_cross_entropy(hidden, head, targets, chunk_size=7)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-5)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_bf16, _ = _reference(hidden, head, targets, None)
        loss_bf16, _ = linear_cross_entropy(hidden, head, targets, chunk_size=7)
    expected_bf16.backward()
    (want,) = _grads([hidden])
    loss_bf16.backward()
    (got,) = _grads([hidden])
    assert got is not None and want is not None and got.dtype == hidden.dtype
    torch.testing.assert_close(loss_bf16, expected_bf16, rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)


def test_packed_segments_include_padding_as_a_span() -> None:
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8], "position_ids": [0, 1, 0, 1]},
            {"input_ids": [9], "labels": [9], "position_ids": [0]}]
    assert packed_segments(collate(rows, pad_token_id=0)["position_ids"]) == [[(0, 2), (2, 4)], [(0, 1), (1, 4)]]


def test_packed_layout_flattens_examples_and_padding_over_the_batch() -> None:
    """The varlen kernels' layout: the same spans as the per-example loop, numbered across the batch."""
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8], "position_ids": [0, 1, 0, 1]},
            {"input_ids": [9], "labels": [9], "position_ids": [0]}]
    layout = PackedLayout(collate(rows, pad_token_id=0)["position_ids"])
    cu_seqlens, longest = layout.cumulative_lengths
    flattened = [start + row * 4 for row, spans in enumerate(layout.segments) for start, _ in spans]
    assert cu_seqlens.tolist() == [*flattened, 8] == [0, 2, 4, 5, 8]
    assert cu_seqlens.dtype == torch.int32 and longest == layout.longest == 3


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_token_loss_with_packed_sdpa_equals_masked_sdpa(
    arch: str, tiny_model_factory: Callable[[str], Path], tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    """Same loss, accuracy and LoRA gradients as one SDPA call per row under the block-diagonal mask."""
    examples = _tokenized_examples(tiny_tokenizer)
    lengths = [len(e["input_ids"]) for e in examples]
    batch = collate(pack_examples(examples, max(lengths) + min(lengths) + 3), tiny_tokenizer.pad_token_id)
    assert max(len(row) for row in packed_segments(batch["position_ids"])) > 1

    results = {}
    for attention in ("sdpa", "packed_sdpa"):
        model_cfg = ModelConfig(name_or_path=str(tiny_model_factory(arch)), attn_implementation=attention)
        model = apply_lora(load_model(model_cfg, torch.device("cpu")), LoraConfig(r=4, dropout=0.0), seed=0)
        loss_module = TokenLoss(model)
        assert loss_module.per_example_attention == (attention == "packed_sdpa")
        loss, correct = loss_module(**batch)
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
        results[attention] = (loss.detach(), int(correct), grads)

    (masked_loss, masked_correct, masked_grads), (loss, correct, grads) = results["sdpa"], results["packed_sdpa"]
    torch.testing.assert_close(loss, masked_loss, rtol=1e-6, atol=1e-5)
    assert correct == masked_correct
    assert grads.keys() == masked_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, masked_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_sdpa_generates_like_sdpa(tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    """Without packed segments (generation, left-padded batches) it is plain SDPA with its mask."""
    tokenizer = copy.deepcopy(tiny_tokenizer)  # the fixture is session-wide: change a copy
    tokenizer.padding_side = "left"
    prompts = tokenizer(["The capital of France", "Who"], return_tensors="pt", padding=True)
    outputs = {}
    for attention in ("sdpa", "packed_sdpa"):
        model = load_model(ModelConfig(name_or_path=str(tiny_model_dir), attn_implementation=attention),
                           torch.device("cpu"), for_training=False).eval()
        model.config.use_cache = True
        outputs[attention] = model.generate(**prompts, max_new_tokens=8, do_sample=False,
                                            pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(outputs["sdpa"], outputs["packed_sdpa"])


def test_token_loss_with_a_wrapped_head_equals_the_linear_path(
    tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    """A head PEFT wraps (modules_to_save) takes plain autograd; it must count loss and accuracy the same."""
    examples = _tokenized_examples(tiny_tokenizer)
    batch = collate(pack_examples(examples, sum(len(e["input_ids"]) for e in examples)), tiny_tokenizer.pad_token_id)
    results = {}
    for modules_to_save in (None, ["lm_head"]):
        base = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), torch.device("cpu"))
        model = apply_lora(base, LoraConfig(r=4, dropout=0.0, modules_to_save=modules_to_save), seed=0)
        loss_module = TokenLoss(model)
        assert (type(loss_module.head) is nn.Linear) == (modules_to_save is None)
        loss, correct = loss_module(**batch)
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad and "lora_" in name}
        results[bool(modules_to_save)] = (loss.detach(), int(correct), grads)

    (linear_loss, linear_correct, linear_grads), (loss, correct, grads) = results[False], results[True]
    torch.testing.assert_close(loss, linear_loss, rtol=1e-6, atol=1e-5)
    assert correct == linear_correct
    assert grads.keys() == linear_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, linear_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def _packed_batch(lengths: list[int], row_tokens: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    examples = [{"input_ids": torch.randint(3, 500, (n,), generator=generator).tolist(),
                 "labels": torch.randint(3, 500, (n,), generator=generator).tolist()} for n in lengths]
    return collate(pack_examples(examples, row_tokens), pad_token_id=0)


def test_a_compiled_decoder_layer_traces_packed_attention_in_one_graph(tiny_model_dir: Path) -> None:
    """train.compile: packed attention is part of each layer's graph (no graph break around it), its numbers are the
    eager per-example loop's, and batches packed differently reuse the graphs instead of compiling new ones."""
    from torch._dynamo.utils import counters

    model = apply_lora(load_model(ModelConfig(name_or_path=str(tiny_model_dir)), torch.device("cpu")),
                       LoraConfig(r=4, dropout=0.0), seed=0)
    loss_module = TokenLoss(model)
    batch = _packed_batch([5, 9, 13, 7, 3, 11], 24, seed=0)
    assert max(len(spans) for spans in packed_segments(batch["position_ids"])) > 2  # examples and padding per row
    eager_loss, _ = loss_module(**batch)
    eager_loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    eager_grads = [p.grad.clone() for p in trained]
    model.zero_grad(set_to_none=True)

    torch._dynamo.reset()
    for layer in decoder_layers(model):  # as TokenLoss.compile_layers does, with dynamo's eager backend (no codegen:
        layer.forward = torch.compile(layer.forward, backend="eager")  # the graphs are dynamo's all the same)
    loss_module.compiled = True
    breaks, graphs = sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]
    loss, _ = loss_module(**batch)
    loss.backward()
    # One graph for the first layer's call (its input does not require grad), one for the others', no break.
    assert (sum(counters["graph_break"].values()) - breaks, counters["stats"]["unique_graphs"] - graphs) == (0, 2)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-5)
    for grad, eager_grad in zip([p.grad for p in trained], eager_grads, strict=True):
        torch.testing.assert_close(grad, eager_grad, rtol=1e-4, atol=1e-6)
    for seed, lengths in enumerate([[4, 6, 20, 2, 9], [12, 12, 3, 17, 5, 1]], start=1):
        loss_module(**_packed_batch(lengths, 32, seed))
    # Once more each when the sizes first change (dynamo makes them dynamic); the last batch reuses those graphs.
    assert counters["stats"]["unique_graphs"] - graphs == 4 and sum(counters["graph_break"].values()) == breaks
    torch._dynamo.reset()


def test_the_varlen_kernel_call_traces_into_one_graph_with_its_backward() -> None:
    """The CUDA path of compiled layers: torch's varlen attention is a custom op with a shape function, so dynamo
    traces the call, forward and backward, in one graph (fullgraph) from a layout prepared before the layers. Meta
    tensors stand for CUDA ones here: the op's shape function runs, no kernel (benchmarks/gpu_check.py runs it)."""
    found = raysft.ops.varlen_kernel()
    if found is None or not found[0].startswith("torch."):
        pytest.skip("this torch has no torch.nn.attention.varlen")
    layout = PackedLayout(torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5, 0, 1]]))
    cu_seqlens, longest = layout.cumulative_lengths
    layout.__dict__["cumulative_lengths"] = (cu_seqlens.to("meta"), longest)  # as prepared on the GPU
    q, k, v = (torch.randn(2, heads, 8, 16, device="meta", dtype=torch.bfloat16, requires_grad=True)
               for heads in (8, 2, 2))  # grouped-query attention: 4 query heads per key/value head
    attend = torch.compile(raysft.ops._varlen_attention, backend="aot_eager", fullgraph=True)
    out = attend(q, k, v, layout, layout.varlen[1], torch.bfloat16, 0.25)
    out.sum().backward()
    assert out.shape == (2, 8, 8, 16) and q.grad.shape == q.shape and k.grad.shape == k.shape
    torch._dynamo.reset()
