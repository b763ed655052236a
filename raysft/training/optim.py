"""Optimizers and the learning-rate schedule (a pure function of the step, so resume needs no state)."""

from __future__ import annotations

import math

import torch
from torch import nn

from raysft.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the configured decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else 1.0 - progress
    floor = cfg.min_lr_ratio
    return cfg.lr * (floor + (1.0 - floor) * shape)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, bitsandbytes 8-bit AdamW or Adafactor over the trainable parameters.

    Weight decay skips biases and norm weights (1-D tensors), as is standard for transformers.
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for _, p in trainable if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for _, p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adamw":
        fused = fused_adamw_applies([p for _, p in trainable])
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None)
    if cfg.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=cfg.betas)
    return torch.optim.Adafactor(groups, lr=cfg.lr)


def fused_adamw_applies(params: list[torch.Tensor]) -> bool:
    """Whether AdamW runs as one fused CUDA kernel over all `params`: when every one is on a CUDA device.

    The default (foreach) path launches a few kernels per group of tensors and keeps a state-sized scratch; over the
    336 small LoRA tensors of a 1.7B model its step was 7% of the GPU time of a compiled step on an H200
    (benchmarks/results/gpu_check.md, run 5). Elsewhere (CPU, FSDP's CPU offload) the default path stays.

    Example:
        >>> fused_adamw_applies([torch.zeros(2)])
        False
    """
    return bool(params) and all(p.device.type == "cuda" for p in params)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def set_weight_decay(optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
    """Set the decayed group's weight decay (the 2-D parameters, see build_optimizer): loading an optimizer's state
    brings back the value it was saved with, and a PBT trial continuing another's checkpoint may run with a new one."""
    for group in optimizer.param_groups:
        if any(p.ndim >= 2 for p in group["params"]):
            group["weight_decay"] = weight_decay
