"""The two hot spots of LoRA training that transformers leaves on the table, written for packed rows.

- ``packed_sdpa``: attention run over each packed example alone instead of over the whole row under a
  block-diagonal mask. A row of k examples costs sum(n_i^2) instead of (sum n_i)^2, and no mask is
  materialized. On CUDA in bf16/fp16 it is one variable-length kernel per layer for the whole batch
  (flash-attn's when that package is installed, else PyTorch's ``torch.nn.attention.varlen``); elsewhere
  (CPU, fp32) it is one SDPA call per example. :func:`register_packed_sdpa` makes it a transformers
  attention implementation, so a model loaded with ``attn_implementation="packed_sdpa"`` uses it; without
  a packed layout (generation) it is plain SDPA.
- ``linear_cross_entropy``: output head + cross-entropy over trained positions, a chunk at a time,
  with the gradient computed while the chunk's logits are still in cache. Vocabulary-sized logits
  are never stored for backward (at vocab 49k, 1,300 trained tokens are 256 MB of fp32 logits,
  plus as much again for log-softmax and its gradient).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

PACKED_SDPA = "packed_sdpa"

Segments = list[list[tuple[int, int]]]
"""Per batch row, the [start, end) spans of its packed examples (padding is a span of its own)."""

VarlenKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, float | None], torch.Tensor]
"""(query, key, value as (tokens, heads, head_dim), cumulative lengths, longest length, scale) -> causal output."""

_HALF_DTYPES = (torch.bfloat16, torch.float16)


def packed_segments(position_ids: torch.Tensor) -> Segments:
    """Example spans of each row, from the restarts of ``position_ids`` at 0.

    Example:
        >>> packed_segments(torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]))
        [[(0, 3), (3, 5)], [(0, 5)]]
    """
    width = position_ids.shape[1]
    segments: Segments = []
    for row in (position_ids == 0).cpu().tolist():  # one host sync per forward, not one per layer
        starts = [0] + [i for i, is_start in enumerate(row) if is_start and i > 0]
        segments.append(list(zip(starts, starts[1:] + [width], strict=True)))
    return segments


class PackedLayout:
    """Where a batch's packed examples start and end: worked out once per forward, read by every layer.

    Each form is computed on first use, so a batch pays only for the kernel that runs it: Python spans
    for the per-example SDPA loop, cumulative lengths (flattened over the batch) for a varlen kernel.
    """

    def __init__(self, position_ids: torch.Tensor):
        self.position_ids = position_ids

    @functools.cached_property
    def segments(self) -> Segments:
        return packed_segments(self.position_ids)

    @functools.cached_property
    def cumulative_lengths(self) -> tuple[torch.Tensor, int]:
        """(cu_seqlens as int32 over the flattened batch, longest example): the varlen kernels' layout.

        Every row starts an example at position 0 (padding restarts at 0 too), so the flattened
        restarts are exactly the example boundaries of the whole batch.

        Example:
            >>> PackedLayout(torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]])).cumulative_lengths
            (tensor([ 0,  3,  5,  9, 10], dtype=torch.int32), 4)
        """
        flat = self.position_ids.reshape(-1)
        starts = torch.nonzero(flat == 0).flatten()
        ends = torch.tensor([flat.numel()], device=flat.device)
        cu_seqlens = torch.cat([starts, ends]).to(torch.int32)
        return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())

    @functools.cached_property
    def longest(self) -> int:
        """Tokens in the longest example (or padding span): positions count up from 0 within each."""
        return int(self.position_ids.max()) + 1

    def prepare_for_compiled_layers(self) -> "PackedLayout":
        """Work out now, outside compiled code, what the layers read (each needs a host sync, which would break a
        compiled layer's graph): the varlen kernel's cumulative lengths on CUDA, the longest example. Returns self.

        Example:
            >>> PackedLayout(torch.tensor([[0, 1, 2, 0, 1]])).prepare_for_compiled_layers().longest
            3
        """
        if self.position_ids.is_cuda:
            _, longest = self.cumulative_lengths
            self.__dict__["longest"] = longest  # the same number (padding spans count as examples): no second sync
            self.varlen  # noqa: B018 - the kernel lookup imports and inspects: not something to trace
        self.longest  # noqa: B018 - computed and cached
        return self

    @functools.cached_property
    def varlen(self) -> tuple[str, VarlenKernel] | None:
        """:func:`varlen_kernel`, looked up once per batch (outside compiled code when prepared)."""
        return varlen_kernel()


@functools.cache
def varlen_kernel() -> tuple[str, VarlenKernel] | None:
    """The causal variable-length attention kernel this install has, by name, or None.

    flash-attn first: a user who installed it chose it (and on Hopper it may be FlashAttention-3);
    else PyTorch's own varlen attention (torch >= 2.10), whose causal switch changed name across releases.
    """
    try:
        from flash_attn import flash_attn_varlen_func

        def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, longest: int,
                  scale: float | None) -> torch.Tensor:
            return flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, softmax_scale=scale, causal=True)

        return "flash_attn.flash_attn_varlen_func", flash
    except ImportError:
        pass
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    causal: dict[str, Any] = {"window_size": (-1, 0)} if "window_size" in parameters else {"is_causal": True}
    native_gqa, native_scale = "enable_gqa" in parameters, "scale" in parameters

    def torch_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, longest: int,
                     scale: float | None) -> torch.Tensor:
        options: dict[str, Any] = dict(causal)
        if k.shape[1] != q.shape[1]:
            if native_gqa:
                options["enable_gqa"] = True
            else:  # older releases: repeat the shared key/value heads
                repeats = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        if native_scale:
            options["scale"] = scale
        elif scale is not None:  # older releases scale by 1/sqrt(head_dim) only: fold the rest into q
            q = q * (scale * q.shape[-1] ** 0.5)
        return varlen_attn(q, k, v, cu, cu, longest, longest, **options)

    return "torch.nn.attention.varlen.varlen_attn", torch_varlen


def _compute_dtype(query: torch.Tensor) -> torch.dtype:
    """The dtype attention runs in: autocast's when it is on (q/k come out of RoPE in fp32 under it)."""
    if torch.is_autocast_enabled(query.device.type):
        return torch.get_autocast_dtype(query.device.type)
    return query.dtype


def _varlen_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: PackedLayout,
    kernel: VarlenKernel, dtype: torch.dtype, scaling: float | None,
) -> torch.Tensor:
    """All examples of the batch in one varlen call; returns (batch, seq, heads, head_dim)."""
    batch, heads, width, head_dim = query.shape

    def tokens_first(t: torch.Tensor) -> torch.Tensor:  # (batch, heads, seq, dim) -> (batch * seq, heads, dim)
        return t.transpose(1, 2).reshape(batch * width, t.shape[1], head_dim).to(dtype)

    cu_seqlens, longest = layout.cumulative_lengths
    out = kernel(tokens_first(query), tokens_first(key), tokens_first(value), cu_seqlens, longest, scaling)
    return out.reshape(batch, width, heads, head_dim)


def packed_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    packed_layout: PackedLayout | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention over each packed example alone; the whole row under ``attention_mask`` otherwise.

    Query/key/value are (batch, heads, seq, head_dim); returns (batch, seq, heads, head_dim) like every
    transformers attention function. The fallback covers generation (a KV cache, padding masks) and a
    sliding window shorter than an example, which per-example causal attention would not apply.
    """
    window = kwargs.get("sliding_window")
    if packed_layout is None or query.shape[2] != key.shape[2] or (window is not None and packed_layout.longest > window):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    kernel = packed_layout.varlen if query.is_cuda else None
    dtype = _compute_dtype(query)
    # The fused kernels take half precision only and have no dropout; fp32 and dropout take the loop.
    if kernel is not None and dtype in _HALF_DTYPES and query.shape[-1] <= 256 and not (dropout and module.training):
        # Inside a compiled layer (train.compile) the kernel is a custom op traced into the layer's graph; the layout
        # was worked out before the layers ran (PackedLayout.prepare_for_compiled_layers), so nothing here syncs.
        return _varlen_attention(query, key, value, packed_layout, kernel[1], dtype, scaling), None
    if torch.compiler.is_compiling():
        # The loop below specializes on every span length (a new graph for nearly every batch): compiled layers
        # take the block-diagonal mask instead, the same attention with no data-dependent shape.
        return _block_causal_attention(module, query, key, value, packed_layout, dropout, scaling, **kwargs), None
    rows = []
    for row, spans in enumerate(packed_layout.segments):
        pieces = [
            sdpa_attention_forward(
                module, query[row : row + 1, :, start:end], key[row : row + 1, :, start:end],
                value[row : row + 1, :, start:end], None, dropout=dropout, scaling=scaling, is_causal=True, **kwargs,
            )[0]
            for start, end in spans
        ]
        rows.append(torch.cat(pieces, dim=1))
    return torch.cat(rows, dim=0), None


def _block_causal_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: PackedLayout,
    dropout: float, scaling: float | None, **kwargs: Any,
) -> torch.Tensor:
    """Each packed example attending to its own earlier positions, as one SDPA call under a block-diagonal causal
    mask made from ``position_ids`` (tensor operations only, so a compiled layer traces it into its one graph)."""
    example = (layout.position_ids == 0).cumsum(dim=-1)  # (batch, seq): the example each position belongs to
    width = example.shape[-1]
    causal = torch.ones(width, width, dtype=torch.bool, device=query.device).tril()
    mask = (example[:, :, None] == example[:, None, :]) & causal
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, mask[:, None], dropout=dropout, scaling=scaling,
                                  is_causal=False, **kwargs)[0]


def register_packed_sdpa() -> None:
    """Make ``attn_implementation="packed_sdpa"`` known to transformers; call it before loading such a model.

    Idempotent. Explicit rather than done at import, so that importing raysft changes nothing in
    transformers' process-wide registry; :func:`raysft.model.load_model` calls it.

    Example:
        >>> register_packed_sdpa()
        >>> AttentionInterface._global_mapping[PACKED_SDPA] is packed_sdpa_attention
        True
    """
    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    # The mask function is plain SDPA's, so generation and unpacked batches behave exactly as with "sdpa".
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)


def _cross_entropy_chunks(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    softcap: float | None, chunk_size: int, grad_hidden: bool, grad_weight: bool, grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Summed CE of ``hidden @ weight.T (+ bias)``, the count of correct positions, and the asked-for gradients.

    The loss is a sum, so d(loss)/d(logits) = softmax - one_hot is known as soon as a chunk's logits
    are: it is made in place in the logits buffer and multiplied out at once. Logits are fp32 one
    chunk at a time; the matmuls run in the weight's dtype (or autocast's). A position counts as
    correct when its target has the highest logit.
    """
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
    d_hidden = torch.empty_like(hidden) if grad_hidden else None
    d_weight = torch.zeros_like(weight, dtype=torch.float32) if grad_weight else None
    d_bias = torch.zeros_like(bias, dtype=torch.float32) if grad_bias and bias is not None else None
    for start in range(0, hidden.shape[0], chunk_size):
        chunk, wanted = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        logits = nn.functional.linear(chunk, weight, bias).float()
        capped = None
        if softcap:
            capped = torch.tanh(logits / softcap)
            logits = capped * softcap
        picked = logits.gather(1, wanted[:, None]).squeeze(1)
        top = logits.amax(dim=-1)
        correct += (picked >= top).sum()  # the target has the highest logit
        # exp(logits - top) in place: one buffer and two passes, where logsumexp + softmax take four.
        exps = logits.sub_(top[:, None]).exp_()
        total = exps.sum(dim=-1)
        loss_sum += (top + total.log() - picked).sum()
        if d_hidden is None and d_weight is None and d_bias is None:
            continue
        grad_logits = exps.mul_(total.reciprocal()[:, None])  # softmax
        grad_logits[torch.arange(len(wanted), device=wanted.device), wanted] -= 1.0
        if capped is not None:
            grad_logits.mul_(1.0 - capped * capped)
        if d_bias is not None:
            d_bias += grad_logits.sum(0)
        grad_logits = grad_logits.to(weight.dtype)
        if d_hidden is not None:
            d_hidden[start : start + chunk_size] = grad_logits @ weight
        if d_weight is not None:
            d_weight += grad_logits.T @ chunk.to(weight.dtype)
    return loss_sum, correct, d_hidden, d_weight, d_bias


class _LinearCrossEntropy(torch.autograd.Function):
    """Autograd wrapper of :func:`_cross_entropy_chunks`: gradients made in forward, scaled in backward.

    What is kept for backward is hidden-sized (and weight-sized only when the head itself is trained),
    never vocabulary-sized.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
        targets: torch.Tensor, softcap: float | None, chunk_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        loss_sum, correct, d_hidden, d_weight, d_bias = _cross_entropy_chunks(
            hidden, weight, bias, targets, softcap, chunk_size, *ctx.needs_input_grad[:3]
        )
        ctx.save_for_backward(d_hidden, d_weight, d_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(correct)
        return loss_sum, correct

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_correct: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        d_hidden, d_weight, d_bias = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes

        def scaled(grad: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
            return None if grad is None else (grad * grad_loss).to(dtype)

        return scaled(d_hidden, hidden_dtype), scaled(d_weight, weight_dtype), scaled(d_bias, weight_dtype), None, None, None


class LinearHead(Protocol):
    """What linear_cross_entropy reads of an output head: an nn.Linear, or any weight and bias standing in for one."""

    @property
    def weight(self) -> torch.Tensor: ...

    @property
    def bias(self) -> torch.Tensor | None: ...


def linear_cross_entropy(
    hidden: torch.Tensor, head: LinearHead, targets: torch.Tensor, softcap: float | None = None, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, count of positions whose target has the highest logit) of ``head(hidden)``.

    Equal to ``cross_entropy(head(hidden).float(), targets, reduction="sum")`` and its gradients, at a
    chunk of ``chunk_size`` positions' logits in memory at a time.

    Example:
        >>> head = nn.Linear(8, 32, bias=False)
        >>> hidden, targets = torch.randn(5, 8), torch.tensor([1, 2, 3, 4, 5])
        >>> loss, _ = linear_cross_entropy(hidden, head, targets, chunk_size=2)
        >>> torch.allclose(loss, nn.functional.cross_entropy(head(hidden), targets, reduction="sum"))
        True
    """
    if torch.is_grad_enabled():
        return _LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, softcap, chunk_size)
    loss_sum, correct, *_ = _cross_entropy_chunks(
        hidden, head.weight, head.bias, targets, softcap, chunk_size, False, False, False
    )
    return loss_sum, correct
