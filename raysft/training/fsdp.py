"""Sharded data parallel with PyTorch FSDP2 (`scaling.strategy: fsdp`).

Each decoder layer is its own FSDP unit (its parameters are gathered just before it runs and freed just
after), then the loss module as the root (embeddings, final norm, output head), so a worker holds about
1/N of the parameters, gradients and optimizer state plus one layer gathered at a time. The root is the
:class:`~raysft.model.TokenLoss` module, not the transformers model, because TokenLoss calls the decoder
and the output head itself: the root's hooks must run around that whole forward.

Gradients are reduce-scattered as averages over workers, as DDP all-reduces them, so the loop's
token-weighted loss needs no change: N FSDP workers == N DDP workers == one worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor

from raysft.config import Config
from raysft.training.step import all_reduce_sum

if TYPE_CHECKING:  # the driver imports this module (through checkpoints) without the model stack
    from raysft.model import TokenLoss

_COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def shard(loss_module: TokenLoss, cfg: Config) -> TokenLoss:
    """Apply FSDP2 in place: every decoder layer, then `loss_module` as the root. Collective (every rank).

    Precision follows `train.precision`: parameters are gathered in the autocast dtype (half the traffic of
    fp32) and gradients reduced in fp32; fp32 runs gather fp32.
    """
    from raysft.model import decoder_layers

    compute = _COMPUTE_DTYPES.get(cfg.train.precision)
    precision = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32 if compute else None)
    offload = CPUOffloadPolicy() if cfg.scaling.fsdp_cpu_offload else OffloadPolicy()
    for layer in decoder_layers(loss_module.model):
        fully_shard(layer, mp_policy=precision, offload_policy=offload)
    fully_shard(loss_module, mp_policy=precision, offload_policy=offload)
    # eval.generate calls the root's generate, not its forward: the root's parameters must be gathered around it too.
    register_fsdp_forward_method(loss_module, "generate")
    return loss_module


def is_sharded(module: nn.Module) -> bool:
    """Whether FSDP sharded `module`'s parameters (the root or any module inside it)."""
    return any(isinstance(p, DTensor) for p in module.parameters())


def gathered_state_dict(model: nn.Module, trained_only: bool) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict of a sharded `model` on rank 0, in CPU memory; empty on other ranks.
    Collective: every rank calls it. What final/ is saved from: a normal adapter or model folder."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trained_only)
    return get_model_state_dict(model, options=options)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded parameter (the tensor itself when not sharded)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def all_finite(params: list[torch.Tensor], device: torch.device) -> bool:
    """Whether every parameter is finite on every rank: the same answer everywhere, since each rank then
    decides alike whether to write a (collective) checkpoint."""
    bad = sum(int((~torch.isfinite(local_tensor(p))).sum()) for p in params)
    (total,) = all_reduce_sum([float(bad)], device)
    return total == 0
