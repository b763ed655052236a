"""The learning-rate schedule (raysft.training.optim.lr_at): a pure function of the step, so resume needs no state;
and which AdamW implementation runs where."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from raysft.config import TrainConfig
from raysft.training.optim import build_optimizer, fused_adamw_applies, lr_at


def schedule(lr_schedule: str, warmup: int, total: int, floor: float = 0.0, steps: range | None = None) -> list[float]:
    cfg = TrainConfig(lr=2.0, lr_schedule=lr_schedule, warmup_steps=warmup, min_lr_ratio=floor)
    return [lr_at(step, cfg, total) for step in (steps or range(total + 1))]


@pytest.mark.parametrize("lr_schedule", ["cosine", "linear", "constant"])
def test_warmup_rises_linearly_and_reaches_lr_on_its_last_step(lr_schedule: str) -> None:
    # Step 0 already trains (lr/warmup, not 0); the last warmup step is the full lr.
    assert schedule(lr_schedule, warmup=4, total=20, steps=range(4)) == [0.5, 1.0, 1.5, 2.0]


def test_cosine_decays_from_lr_through_half_to_zero_after_warmup() -> None:
    lrs = schedule("cosine", warmup=2, total=12)
    assert lrs[2] == pytest.approx(2.0)  # decay starts at the full lr
    assert lrs[7] == pytest.approx(1.0)  # halfway through the 10 decay steps: half the lr
    assert lrs[4] == pytest.approx(1.0 + 1.0 * 0.8090169943749475)  # cos(pi * 0.2): not linear
    assert lrs[12] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))


def test_linear_decays_in_equal_steps() -> None:
    lrs = schedule("linear", warmup=0, total=4)
    assert lrs == pytest.approx([2.0, 1.5, 1.0, 0.5, 0.0])


def test_constant_stays_at_lr_after_warmup() -> None:
    assert schedule("constant", warmup=1, total=5) == [2.0] * 6
    assert schedule("constant", warmup=0, total=3, floor=0.5) == [2.0] * 4  # the floor is for decays only


@pytest.mark.parametrize("lr_schedule", ["cosine", "linear"])
def test_decay_ends_at_the_floor_and_stays_there_past_the_last_step(lr_schedule: str) -> None:
    lrs = schedule(lr_schedule, warmup=2, total=10, floor=0.1, steps=range(30))
    assert lrs[10] == pytest.approx(0.2)  # min_lr_ratio * lr
    assert lrs[11:] == pytest.approx([0.2] * 19)  # more steps than planned (epochs rounding up) never go below
    assert min(lrs[2:]) == pytest.approx(0.2)
    halfway = schedule(lr_schedule, warmup=0, total=10, floor=0.1, steps=range(5, 6))[0]
    assert halfway == pytest.approx(0.2 + 1.8 / 2)  # the floor plus half of what lies above it


def test_warmup_as_long_as_the_run_does_not_divide_by_zero() -> None:
    # total_steps == warmup_steps: no decay steps left; the step after warmup is still finite.
    assert schedule("cosine", warmup=3, total=3, steps=range(5)) == pytest.approx([2 / 3, 4 / 3, 2.0, 2.0, 0.0])
    assert schedule("linear", warmup=0, total=0, steps=range(2)) == pytest.approx([2.0, 0.0])


def test_adamw_is_fused_only_when_every_parameter_is_on_cuda() -> None:
    # The fused kernel is what runs on GPUs; CPU parameters (a CPU run, FSDP's CPU offload) keep the default path,
    # and so does a mix (the fused step takes one device).
    cpu = [torch.zeros(2, 2, requires_grad=True), torch.zeros(2, requires_grad=True)]
    assert not fused_adamw_applies(cpu) and not fused_adamw_applies([])
    assert not fused_adamw_applies([*cpu, torch.zeros(2, device="meta")])
    optimizer = build_optimizer(nn.Linear(2, 2), TrainConfig(optimizer="adamw"))
    assert not optimizer.defaults["fused"] and [len(g["params"]) for g in optimizer.param_groups] == [1, 1]
