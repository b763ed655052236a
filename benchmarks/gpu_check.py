"""One prepared check of raysft's model, ops and step code on a GPU machine: no Ray, no network, one run.

    python benchmarks/gpu_check.py --out DIR                      # a CUDA machine: about 4 minutes on an H200
    python benchmarks/gpu_check.py --device cpu --tiny --out DIR  # the same code on this CPU in under 2 minutes

On a machine where raysft is not installed (a bare GPU box with torch, transformers and peft), run it from the
checkout with ``PYTHONPATH=.`` and pydantic/PyYAML available; nothing else raysft depends on is imported.

Writes DIR/gpu_check.json (after every section, so a run cut short still leaves what it measured) and
DIR/gpu_check.md. Models are random-initialized Llama-architecture models of SmolLM2-135M and SmolLM2-1.7B
shape (configs below), saved to a scratch folder and loaded back through :func:`raysft.model.load_model`,
the way a run loads them. Everything goes through raysft's own code: ``load_model`` / ``apply_lora`` /
``TokenLoss`` (packed attention and the chunked cross-entropy) and ``train_step`` (the loop's step).

Sections:
1. **Correctness** on the device. (a) ``packed_sdpa`` on packed rows against each example run alone, per
   token; on CUDA in bf16 this is the varlen kernel against plain SDPA, tolerance: max |delta loss|
   <= 0.05 nats, mean <= 0.005 (bf16 keeps 8 bits of mantissa: a 6-nat loss is rounded to ~0.03), fp32:
   max <= 1e-4. (b) The varlen kernel against the per-example SDPA loop on the same q/k/v, outputs and
   gradients. (c) ``linear_cross_entropy`` against ``cross_entropy(head(h).float())``: loss and hidden
   gradient. (d) fp16 with GradScaler: a step whose gradients overflow is skipped (weights unchanged,
   scale halved), the next one with a sane scale is applied. (e) ``train.compile``: compiled decoder layers
   against the same layers eager, loss and LoRA gradients, with no graph break (packed attention traced in).
2. **Throughput**: LoRA r16 on all linear layers, bf16 (fp32 on CPU), the same synthetic examples
   (100-600 tokens, 20-60% prompt) trained two ways: raysft packed into rows of 2048 tokens through
   ``train_step``, and a plain transformers step (``sdpa``, ``model(..., labels=...).loss``) on batches of
   16 examples padded to the batch's longest. Reported: trained tokens/s, the ratio, MFU against the
   measured bf16 matmul rate and against the spec sheet's dense bf16 peak, peak GPU memory. QLoRA (4-bit
   base) when bitsandbytes is importable. Each with its decoder layers compiled (``train.compile``) too.

MFU counts the necessary FLOPs of LoRA training (benchmarks/_common.py ``lora_training_flops``: base forward
and activation gradients, LoRA, causal attention per example, LM head on trained positions only), the same
for both variants, so padding and masked-out work count as waste.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch._dynamo.utils import counters as dynamo_counters

import _common as C  # benchmarks/ is on sys.path when this runs as a script
from raysft.config import LoraConfig, ModelConfig, TrainConfig
from raysft.labels import IGNORE_INDEX, count_trained
from raysft.data.packing import collate, pack_examples
from raysft.model import TokenLoss, apply_lora, load_model
from raysft.ops import PACKED_SDPA, PackedLayout, linear_cross_entropy, packed_sdpa_attention, varlen_kernel
from raysft.training.optim import build_optimizer
from raysft.training.step import train_step

LLAMA_COMMON = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
                "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
# SmolLM2's published shapes (HuggingFaceTB/SmolLM2-135M-Instruct, -1.7B-Instruct config.json).
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "rope_theta": 100000.0},
    "smollm2-1.7b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                     "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 49152, "rope_theta": 130000.0},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "rope_theta": 10000.0},
}
# Dense bf16 tensor-core peaks from the vendors' spec sheets (FLOP/s, without sparsity).
SPEC_BF16_PEAK = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
                  "A10G": 125e12, "L4": 121e12}
LORA_RANK = 16


class Plan:
    """Sizes for one device: the real shapes on CUDA, the tiny one on CPU (same code, smaller numbers)."""

    def __init__(self, device: torch.device, tiny: bool):
        self.device = device
        cuda = device.type == "cuda"
        self.dtype = "bfloat16" if cuda else "float32"
        self.precision = "bf16" if cuda else "fp32"
        self.check_shape = "tiny" if tiny else "smollm2-135m"
        self.throughput_shapes = ["tiny"] if tiny else ["smollm2-135m", "smollm2-1.7b"]
        self.row_tokens = 256 if tiny else 2048
        self.lengths = (20, 120) if tiny else (100, 600)
        self.rows_per_micro_batch = {"tiny": 4, "smollm2-135m": 8, "smollm2-1.7b": 4}
        self.padded_batch = 16
        self.steps = 3 if tiny else 12
        self.warmup_steps = 1 if tiny else 2


# ------------------------------------------------------------------------------------------------ helpers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def synthetic_examples(count: int, lengths: tuple[int, int], vocab: int, seed: int) -> list[dict[str, Any]]:
    """Tokenized examples of uniform random length with a 20-60% prompt (labels IGNORE_INDEX there)."""
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(count):
        n = int(rng.integers(lengths[0], lengths[1] + 1))
        ids = rng.integers(3, vocab, n).tolist()
        prompt = int(n * rng.uniform(0.2, 0.6))
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:], "origin": f"synthetic:{i}"})
    return examples


def save_random_model(shape: str, folder: Path, device: torch.device, dtype: str) -> Path:
    """A random-initialized model of `shape`, saved as a model folder (safetensors) for load_model."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = folder / shape
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        config = LlamaConfig(**LLAMA_COMMON, **SHAPES[shape])
        with torch.device(device):  # initialize on the device: seconds instead of minutes for 1.7B on a CPU
            model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        model.save_pretrained(path, safe_serialization=True)
        del model
        free_memory(device)
    return path


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def lora_model(model_dir: Path, plan: Plan, attention: str, quantization: str = "none",
               checkpointing: bool = False) -> nn.Module:
    cfg = ModelConfig(name_or_path=str(model_dir), dtype=plan.dtype, attn_implementation=attention,  # type: ignore[arg-type]
                      quantization=quantization, gradient_checkpointing=checkpointing)  # type: ignore[arg-type]
    return apply_lora(load_model(cfg, plan.device), LoraConfig(r=LORA_RANK, alpha=32, dropout=0.0), seed=0)


def autocast(plan: Plan) -> Any:
    enabled = plan.precision != "fp32"
    return torch.autocast(plan.device.type, dtype=torch.bfloat16, enabled=enabled)


def close(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    diff = (a.float() - b.float()).abs()
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "rel_norm": float(diff.norm() / b.float().norm().clamp_min(1e-30))}


# ------------------------------------------------------------------------------------------- correctness


def check_packed_equals_unpacked(plan: Plan, model_dir: Path) -> dict[str, Any]:
    """(a) Per-token loss of packed rows vs each example alone, through the model's packed_sdpa."""
    model = load_model(ModelConfig(name_or_path=str(model_dir), dtype=plan.dtype, attn_implementation=PACKED_SDPA),  # type: ignore[arg-type]
                       plan.device, for_training=False).eval()
    vocab = model.config.vocab_size
    examples = synthetic_examples(24, (plan.lengths[0] // 4, plan.lengths[1]), vocab, seed=1)
    rows = pack_examples(examples, plan.row_tokens // 2)
    batch = {k: v.to(plan.device) for k, v in collate(rows, pad_token_id=0).items()}
    with torch.no_grad(), autocast(plan):
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                       packed_layout=PackedLayout(batch["position_ids"])).logits.float()
        packed_loss = nn.functional.cross_entropy(packed[:, :-1].transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
        by_ids = {}
        for example in examples:
            ids = torch.tensor([example["input_ids"]], device=plan.device)
            logits = model(input_ids=ids, use_cache=False).logits.float()
            by_ids[tuple(example["input_ids"])] = nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
    deltas = []
    for r, row in enumerate(rows):
        positions = row["position_ids"]
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        for start, end in zip(starts, starts[1:], strict=False):
            alone = by_ids[tuple(row["input_ids"][start:end])]
            deltas.append((packed_loss[r, start : end - 1] - alone).abs())
    delta = torch.cat(deltas)
    limits = {"max_abs": 0.05, "mean_abs": 0.005} if plan.precision != "fp32" else {"max_abs": 1e-4, "mean_abs": 1e-5}
    result = {"examples": len(deltas), "rows": len(rows), "tokens": int(delta.numel()),
              "max_abs": float(delta.max()), "mean_abs": float(delta.mean()), "limits": limits,
              "mean_loss": float(packed_loss.mean())}
    result["passed"] = len(deltas) == len(examples) and all(result[k] <= v for k, v in limits.items())
    del model
    return result


def check_varlen_kernel(plan: Plan) -> dict[str, Any]:
    """(b) The varlen kernel against the per-example SDPA loop on the same q/k/v: outputs and gradients."""
    kernel = varlen_kernel()
    if plan.device.type != "cuda" or kernel is None:
        return {"skipped": "needs CUDA and a varlen kernel (CPU takes the per-example loop)", "passed": True}
    torch.manual_seed(0)
    heads, kv_heads, head_dim = 8, 2, 64
    lengths = [700, 300, 1000, 48]  # two rows of 1024 with padding spans
    position_ids = torch.tensor([list(range(700)) + list(range(300)) + list(range(24)),
                                 list(range(1000)) + list(range(24))], device=plan.device)
    layout = PackedLayout(position_ids)
    module = nn.Module()
    module.num_key_value_groups = heads // kv_heads  # what transformers' sdpa_attention_forward reads for GQA
    module.is_causal = True
    shape = (2, heads, 1024, head_dim)
    q = torch.randn(shape, device=plan.device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn((2, kv_heads, 1024, head_dim), device=plan.device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn((2, kv_heads, 1024, head_dim), device=plan.device, dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn((2, 1024, heads, head_dim), device=plan.device, dtype=torch.bfloat16)

    def run(fused: bool) -> tuple[torch.Tensor, ...]:
        # The loop runs when the inputs are fp32 (the fused kernels take half precision only).
        inputs = [t if fused else t.float() for t in (q, k, v)]
        out, _ = packed_sdpa_attention(module, *inputs, None, packed_layout=layout, scaling=head_dim**-0.5)
        out.backward(grad_out.to(out.dtype))
        grads = tuple(t.grad.clone() for t in (q, k, v))
        for t in (q, k, v):
            t.grad = None
        return (out.detach(), *grads)

    fused, loop = run(True), run(False)
    parts = {name: close(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), fused, loop, strict=True)}
    return {"kernel": kernel[0], "example_lengths": lengths, **parts,
            "limit_rel_norm": 2e-2, "passed": all(p["rel_norm"] <= 2e-2 for p in parts.values())}


def check_linear_cross_entropy(plan: Plan) -> dict[str, Any]:
    """(c) Chunked cross-entropy against logits-then-cross_entropy: summed loss and hidden gradient."""
    torch.manual_seed(0)
    shape = SHAPES[plan.check_shape]
    dtype = getattr(torch, plan.dtype)
    head = nn.Linear(shape["hidden_size"], shape["vocab_size"], bias=False, device=plan.device, dtype=dtype)
    head.requires_grad_(False)
    tokens = 4096 if plan.device.type == "cuda" else 300
    hidden = torch.randn(tokens, shape["hidden_size"], device=plan.device, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, shape["vocab_size"], (tokens,), device=plan.device)
    reference = nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")
    reference.backward()
    want = hidden.grad.clone()
    hidden.grad = None
    loss, _ = linear_cross_entropy(hidden, head, targets)
    loss.backward()
    result = {"tokens": tokens, "vocab": shape["vocab_size"], "dtype": plan.dtype,
              "loss_rel": float(abs(loss.detach() - reference.detach()) / reference.detach()),
              "grad": close(hidden.grad, want)}
    result["passed"] = result["loss_rel"] <= 1e-3 and result["grad"]["rel_norm"] <= 1e-2
    return result


def check_fp16_overflow_skipped(plan: Plan, model_dir: Path) -> dict[str, Any]:
    """(d) fp16 + GradScaler through train_step: an overflowing step is skipped, a sane one applied."""
    model = apply_lora(load_model(ModelConfig(name_or_path=str(model_dir), dtype="float32"), plan.device),
                       LoraConfig(r=4, dropout=0.0), seed=0)
    forward = TokenLoss(model).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, TrainConfig(lr=1e-3))
    examples = synthetic_examples(8, (20, 60), model.config.vocab_size, seed=2)
    rows = pack_examples(examples, 256)
    batch = {k: v.to(plan.device) for k, v in collate(rows, pad_token_id=0).items()}
    trained = sum(count_trained(r["labels"], r["position_ids"]) for r in rows)

    def step(scaler: torch.amp.GradScaler) -> tuple[bool, bool, float]:
        before = [p.detach().clone() for p in params]
        result = train_step(forward, [batch], trained, optimizer, scaler, params, "fp16", 1.0)
        changed = any(not torch.equal(b, p) for b, p in zip(before, params, strict=True))
        return result.applied, changed, scaler.get_scale()

    overflow = torch.amp.GradScaler(plan.device.type, init_scale=2.0**40)  # 6 nats x 2^40 overflows fp16
    applied, changed, scale_after = step(overflow)
    sane_applied, sane_changed, _ = step(torch.amp.GradScaler(plan.device.type))
    result = {"overflow_step": {"applied": applied, "weights_changed": changed, "scale": [2.0**40, scale_after]},
              "sane_step": {"applied": sane_applied, "weights_changed": sane_changed}}
    result["passed"] = not applied and not changed and scale_after == 2.0**39 and sane_applied and sane_changed
    return result


def check_compiled_equals_eager(plan: Plan, model_dir: Path) -> dict[str, Any]:
    """(e) train.compile: the loss and LoRA gradients of compiled decoder layers against the same model eager."""
    model = lora_model(model_dir, plan, PACKED_SDPA)
    forward = TokenLoss(model).train()
    examples = synthetic_examples(24, plan.lengths, model.config.vocab_size, seed=3)
    batch = {k: v.to(plan.device) for k, v in collate(pack_examples(examples, plan.row_tokens), pad_token_id=0).items()}
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        with autocast(plan):
            loss, _ = forward(**batch)
        loss.backward()
        grads = [p.grad.detach().clone() for p in params]
        model.zero_grad(set_to_none=True)
        return loss.detach().float(), grads

    eager_loss, eager_grads = loss_and_grads()
    forward.compile_layers()
    breaks_before = sum(dynamo_counters["graph_break"].values())
    loss_and_grads()  # compiles
    compiled_loss, compiled_grads = loss_and_grads()
    graph_breaks = sum(dynamo_counters["graph_break"].values()) - breaks_before  # packed attention traced in: 0
    grad_rel = max(float((c - e).float().norm() / e.float().norm().clamp_min(1e-30))
                   for c, e in zip(compiled_grads, eager_grads, strict=True) if e.abs().max() > 0)
    limit = 2e-2 if plan.precision != "fp32" else 1e-4  # bf16: fused kernels round in another order
    result = {"loss_rel": float(abs(compiled_loss - eager_loss) / eager_loss), "max_grad_rel_norm": grad_rel,
              "limit": limit, "graph_breaks": graph_breaks}
    result["passed"] = result["loss_rel"] <= limit and grad_rel <= 5 * limit and graph_breaks == 0
    del model, forward
    torch._dynamo.reset()
    return result


# -------------------------------------------------------------------------------------------- throughput


def time_steps(steps: list[Callable[[], None]], warmup: int, device: torch.device) -> tuple[float, float]:
    """(seconds for all `steps`, seconds of the untimed warm-up before): the first `warmup` steps and the last
    (a smaller last batch is a new shape, which a compiled model would otherwise compile inside the timing)."""
    start = time.perf_counter()
    for run_step in steps[:warmup] + steps[-1:]:
        run_step()
    synchronize(device)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for run_step in steps:
        run_step()
    synchronize(device)
    return time.perf_counter() - start, warmup_s


def packed_variant(plan: Plan, model_dir: Path, examples: list[dict[str, Any]], rows_per_step: int,
                   quantization: str = "none", compiled: bool = False, checkpointing: bool = False,
                   profile_to: Path | None = None) -> dict[str, Any]:
    """raysft: BFD-packed rows through TokenLoss (packed_sdpa, chunked CE) and train_step; ``compiled``: with its
    decoder layers compiled as ``train.compile`` does (the warm-up steps include the compile); ``checkpointing``:
    ``model.gradient_checkpointing``.

    With ``profile_to``, the timed steps run under torch.profiler and the kernels that took the most device
    time are written there (where a step's time goes).
    """
    model = lora_model(model_dir, plan, PACKED_SDPA, quantization, checkpointing)
    forward = TokenLoss(model).train()
    if compiled:
        forward.compile_layers()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, TrainConfig(lr=2e-4))
    scaler = torch.amp.GradScaler(plan.device.type, enabled=False)
    rows = pack_examples(examples, plan.row_tokens)
    step_rows = [rows[i : i + rows_per_step] for i in range(0, len(rows), rows_per_step)]
    losses: list[float] = []

    def make_step(chunk: list[dict[str, Any]]) -> Callable[[], None]:
        batch = {k: v.to(plan.device) for k, v in collate(chunk, pad_token_id=0).items()}
        trained = sum(count_trained(r["labels"], r["position_ids"]) for r in chunk)
        return lambda: losses.append(train_step(forward, [batch], trained, optimizer, scaler, params,
                                                plan.precision, 1.0).loss)

    free_memory(plan.device)
    steps = [make_step(chunk) for chunk in step_rows]
    if profile_to is None:
        seconds, warmup_s = time_steps(steps, plan.warmup_steps, plan.device)
    else:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if plan.device.type == "cuda" else [])
        with profile(activities=activities) as profiler:
            seconds, warmup_s = time_steps(steps, plan.warmup_steps, plan.device)
        sort_by = "self_cuda_time_total" if plan.device.type == "cuda" else "self_cpu_time_total"
        profile_to.write_text(profiler.key_averages().table(sort_by=sort_by, row_limit=40, max_name_column_width=70))
    slots = sum(len(chunk) * max(len(r["input_ids"]) for r in chunk) for chunk in step_rows)
    result = {"seconds": seconds, "warmup_s": warmup_s, "optimizer_steps": len(step_rows), "rows": len(rows),
              "slots": slots, "peak_memory_gib": peak_memory_gib(plan.device), "last_loss": losses[-1]}
    return result  # the model and optimizer go with this frame, before the next variant frees memory


def padded_variant(plan: Plan, model_dir: Path, examples: list[dict[str, Any]]) -> dict[str, Any]:
    """The plain transformers step: sdpa, batches padded to their longest example, loss from labels."""
    model = lora_model(model_dir, plan, "sdpa")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, TrainConfig(lr=2e-4))
    batches = [examples[i : i + plan.padded_batch] for i in range(0, len(examples), plan.padded_batch)]
    losses: list[float] = []

    def make_step(chunk: list[dict[str, Any]]) -> Callable[[], None]:
        width = max(len(e["input_ids"]) for e in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, e in enumerate(chunk):  # right padding, as a data collator for training does
            ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
            labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
            mask[i, : len(e["input_ids"])] = 1
        ids, labels, mask = ids.to(plan.device), labels.to(plan.device), mask.to(plan.device)

        def run_step() -> None:
            with autocast(plan):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))

        return run_step

    free_memory(plan.device)
    seconds, warmup_s = time_steps([make_step(chunk) for chunk in batches], plan.warmup_steps, plan.device)
    slots = sum(len(chunk) * max(len(e["input_ids"]) for e in chunk) for chunk in batches)
    result = {"seconds": seconds, "warmup_s": warmup_s, "optimizer_steps": len(batches), "slots": slots,
              "peak_memory_gib": peak_memory_gib(plan.device), "last_loss": losses[-1]}
    return result


def throughput(plan: Plan, shape_name: str, folder: Path, matmul_flops: float, spec_peak: float | None,
               profile_dir: Path | None = None) -> dict[str, Any]:
    model_dir = save_random_model(shape_name, folder, plan.device, plan.dtype)
    shape = C.ModelShape.from_dir(model_dir)
    mean_length = sum(plan.lengths) / 2
    count = int(plan.steps * plan.rows_per_micro_batch[shape_name] * plan.row_tokens * 0.98 / mean_length)
    examples = synthetic_examples(count, plan.lengths, shape.vocab, seed=0)
    lengths = [len(e["input_ids"]) for e in examples]
    tokens = sum(lengths)
    trained = sum(count_trained(e["labels"]) for e in examples)
    flops = C.lora_training_flops(shape, LORA_RANK, tokens, trained, C.causal_pairs(lengths))["total"]
    rows_per_step = plan.rows_per_micro_batch[shape_name]
    runs: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("raysft packed", lambda: packed_variant(plan, model_dir, examples, rows_per_step)),
        ("transformers padded", lambda: padded_variant(plan, model_dir, examples)),
        # Twice the rows per step: how much of the gap to the matmul rate is fixed cost per step and per kernel.
        ("raysft packed, 2x rows per step", lambda: packed_variant(plan, model_dir, examples, 2 * rows_per_step)),
        # train.compile: the elementwise work between the matmuls fused (the rest of the gap to the matmul rate).
        ("raysft packed, compiled", lambda: packed_variant(plan, model_dir, examples, rows_per_step, compiled=True)),
        # What large models run with: activations recomputed in backward, around the compiled layers.
        ("raysft packed, compiled, gradient checkpointing",
         lambda: packed_variant(plan, model_dir, examples, rows_per_step, compiled=True, checkpointing=True)),
    ]
    if profile_dir is not None:
        runs.append(("raysft packed, compiled, profiled", lambda: packed_variant(
            plan, model_dir, examples, rows_per_step, compiled=True,
            profile_to=profile_dir / f"profile_compiled_{shape_name}.txt")))
    qlora = plan.device.type == "cuda" and bitsandbytes_available()
    if qlora:
        runs += [("raysft packed QLoRA", lambda: packed_variant(plan, model_dir, examples, rows_per_step, "4bit")),
                 ("raysft packed QLoRA, compiled",
                  lambda: packed_variant(plan, model_dir, examples, rows_per_step, "4bit", compiled=True))]
    variants: dict[str, dict[str, Any]] = {}
    for name, run_variant in runs:
        try:
            v = run_variant()
        except Exception:  # noqa: BLE001 - one variant failing (a compiler error, say) leaves the others measured
            variants[name] = {"error": traceback.format_exc()}
            print(f"[gpu_check] {shape_name} / {name}: error\n{variants[name]['error'][-2000:]}", flush=True)
            continue
        finally:
            torch._dynamo.reset()  # compiled code holds on to the variant's model otherwise
            free_memory(plan.device)
        v["trained_tokens_per_s"] = trained / v["seconds"]
        v["tokens_per_s"] = tokens / v["seconds"]
        v["pad_fraction"] = 1 - tokens / v["slots"]
        v["mfu_measured"] = flops / v["seconds"] / matmul_flops
        v["mfu_spec"] = flops / v["seconds"] / spec_peak if spec_peak else None
        variants[name] = v
        print(f"[gpu_check] {shape_name} / {name}: {v['trained_tokens_per_s']:.0f} trained tok/s, "
              f"MFU {v['mfu_measured']:.3f}, warm-up {v['warmup_s']:.1f} s", flush=True)

    def over(a: str, b: str) -> float | None:
        if "seconds" in variants.get(a, {}) and "seconds" in variants.get(b, {}):
            return variants[b]["seconds"] / variants[a]["seconds"]
        return None

    return {"shape": SHAPES[shape_name], "examples": len(examples), "tokens": tokens, "trained_tokens": trained,
            "necessary_flops": flops, "variants": variants,
            "packed_over_padded": over("raysft packed", "transformers padded"),
            "compiled_over_packed": over("raysft packed, compiled", "raysft packed"),
            "qlora": "run" if qlora else "skipped: bitsandbytes not importable"}


def bitsandbytes_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # noqa: BLE001 - missing or broken on this machine: report it, skip QLoRA
        return False
    return True


# ------------------------------------------------------------------------------------------------ report


def environment(device: torch.device) -> dict[str, Any]:
    import peft
    import transformers

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "transformers": transformers.__version__, "peft": peft.__version__,
                            "device": str(device), "varlen_kernel": (varlen_kernel() or ("none",))[0],
                            "bitsandbytes": bitsandbytes_available()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count, cuda=torch.version.cuda)
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def spec_peak_for(name: str) -> float | None:
    return next((peak for key, peak in SPEC_BF16_PEAK.items() if key in name), None)


def ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "n/a (a variant failed)"


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = ["## GPU check (benchmarks/gpu_check.py)", "", f"command: `{report['command']}`", "",
             *[f"- {k}: {v}" for k, v in env.items()], ""]
    if "matmul" in report:
        m = report["matmul"]
        lines += [f"Measured {m['dtype']} matmul rate: {m['best_flops'] / 1e12:.1f} TFLOP/s "
                  f"(spec-sheet dense peak: {m['spec_peak'] / 1e12:.0f} TFLOP/s)" if m.get("spec_peak") else
                  f"Measured {m['dtype']} matmul rate: {m['best_flops'] / 1e12:.3f} TFLOP/s (no spec peak known)", ""]
    if "correctness" in report:
        lines += ["### Correctness", "", C.markdown_table(["check", "passed", "numbers"], [
            [name, r.get("passed"), json.dumps({k: v for k, v in r.items() if k != "passed"}, default=str)[:300]]
            for name, r in report["correctness"].items()]), ""]
    for shape_name, t in report.get("throughput", {}).items():
        if "error" in t:
            lines += [f"### Throughput, {shape_name}: error", "", "```", t["error"][-1500:], "```", ""]
            continue
        lines += [f"### Throughput, {shape_name} shape: {t['examples']} examples, {t['tokens']} tokens "
                  f"({t['trained_tokens']} trained), LoRA r{LORA_RANK} all-linear", "",
                  C.markdown_table(["variant", "s", "warm-up s", "optimizer steps", "trained tok/s", "all tok/s",
                                    "pad frac", "MFU (measured matmul)", "MFU (spec peak)", "peak GPU GiB", "last loss"],
                                   [[name, v["seconds"], v.get("warmup_s"), v["optimizer_steps"], v["trained_tokens_per_s"],
                                     v["tokens_per_s"], v["pad_fraction"], v["mfu_measured"], v["mfu_spec"],
                                     v["peak_memory_gib"], v["last_loss"]] if "error" not in v else
                                    [name, "error: " + v["error"].strip().splitlines()[-1][:150]] + [""] * 10
                                    for name, v in t["variants"].items()]),
                  "", f"Trained tokens/s, raysft packed / transformers padded: **{ratio(t['packed_over_padded'])}**; "
                  f"compiled / raysft packed: **{ratio(t['compiled_over_packed'])}**; QLoRA: {t['qlora']}", ""]
    lines.append(f"Total wall time: {report.get('wall_s', 0):.0f} s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny model and sizes (the CPU smoke run CI does)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip sections that would start after this")
    parser.add_argument("--profile", action="store_true",
                        help="also profile the compiled packed steps: OUT/profile_compiled_<shape>.txt")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: --device cuda but torch sees no CUDA device; use --device cpu --tiny here")
    started = time.perf_counter()
    device = torch.device(args.device)
    plan = Plan(device, args.tiny or device.type == "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"command": " ".join(["python", *sys.argv]), "environment": environment(device)}

    def save() -> None:
        report["wall_s"] = time.perf_counter() - started
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (args.out / "gpu_check.md").write_text(markdown(report) + "\n")

    def guarded(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """One section: its result, or its error (the rest still runs); skipped past the time budget."""
        if time.perf_counter() - started > args.budget_s:
            return {"skipped": f"past the {args.budget_s:.0f} s budget", "passed": None}
        t0 = time.perf_counter()
        try:
            result = fn()
        except Exception:  # noqa: BLE001 - a failing section is recorded and the check goes on
            result = {"error": traceback.format_exc(), "passed": False}
        result["section_s"] = time.perf_counter() - t0
        outcome = "error" if "error" in result else {True: "passed", False: "FAILED", None: "done"}[result.get("passed")]
        print(f"[gpu_check] {name}: {outcome} ({result['section_s']:.1f} s)", flush=True)
        return result

    with tempfile.TemporaryDirectory(prefix="raysft-gpu-check-") as scratch:
        folder = Path(scratch)
        sizes = (8192,) if device.type == "cuda" else (256,)
        dtype = "bf16" if device.type == "cuda" else "fp32"
        spec_peak = spec_peak_for(report["environment"].get("gpu", "")) if device.type == "cuda" else None
        report["matmul"] = {"dtype": dtype, "spec_peak": spec_peak,
                            **C.matmul_flops(dtype, sizes, seconds=2.0 if device.type == "cuda" else 0.5,
                                             device=args.device)}
        save()
        check_dir = save_random_model(plan.check_shape, folder, device, plan.dtype)
        fp32_dir = save_random_model("tiny", folder / "fp32", device, "float32")
        report["correctness"] = {}
        for name, fn in [("packed_equals_unpacked", lambda: check_packed_equals_unpacked(plan, check_dir)),
                         ("varlen_kernel_equals_loop", lambda: check_varlen_kernel(plan)),
                         ("linear_cross_entropy", lambda: check_linear_cross_entropy(plan)),
                         ("fp16_overflow_step_skipped", lambda: check_fp16_overflow_skipped(plan, fp32_dir)),
                         ("compiled_equals_eager", lambda: check_compiled_equals_eager(plan, check_dir))]:
            report["correctness"][name] = guarded(name, fn)
            save()
        report["throughput"] = {}
        for shape_name in plan.throughput_shapes:
            report["throughput"][shape_name] = guarded(
                f"throughput {shape_name}", lambda s=shape_name: throughput(
                    plan, s, folder, report["matmul"]["best_flops"], spec_peak, args.out if args.profile else None))
            save()
    save()
    print(markdown(report))
    failed = [n for n, r in report["correctness"].items() if r.get("passed") is False]
    failed += [n for n, r in report["throughput"].items() if "error" in r]
    failed += [f"{n} / {v}" for n, r in report["throughput"].items() for v, x in r.get("variants", {}).items()
               if "error" in x]
    if failed:
        sys.exit(f"gpu_check: failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
