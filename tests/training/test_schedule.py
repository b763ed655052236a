"""Which rows each step trains on and who computes them (raysft.training.step.BatchSchedule), without Ray:
DESIGN.md property 7, worker-count invariance."""

from __future__ import annotations

import numpy as np
import pytest

from raysft.training.step import BatchSchedule


@pytest.mark.parametrize("global_batch, micro", [(4, 1), (6, 2), (7, 2), (3, 4)])
def test_every_worker_count_deals_the_same_micro_batches_with_the_same_seeds(global_batch: int, micro: int) -> None:
    one = BatchSchedule(num_rows=40, world_size=1, micro_batch_size=micro, global_batch=global_batch, seed=3)
    for step in (0, 5, 9):  # 9: the second epoch
        reference = {j: (rows.tolist(), one.micro_batch_seed(step, j)) for j, rows in one.micro_batches(step, 0)}
        assert sorted(r for rows, _ in reference.values() for r in rows) == sorted(one.step_rows(step).tolist())
        for world in (1, 2, 3, 5):
            schedule = BatchSchedule(num_rows=40, world_size=world, micro_batch_size=micro, global_batch=global_batch,
                                     seed=3)
            dealt = {j: (rows.tolist(), schedule.micro_batch_seed(step, j))
                     for rank in range(world) for j, rows in schedule.micro_batches(step, rank)}
            assert dealt == reference  # the same micro-batches, rows and random draws, whoever computes them
            # Every worker runs as many passes (its own, then zero-weight fillers): the collectives stay in step.
            passes = {len(schedule.micro_batches(step, rank)) + schedule.fillers(rank) for rank in range(world)}
            assert passes == {schedule.micro_batches_per_worker}


def test_micro_batch_seeds_differ_by_step_and_place() -> None:
    schedule = BatchSchedule(num_rows=40, world_size=2, micro_batch_size=1, global_batch=4, seed=0)
    seeds = [schedule.micro_batch_seed(step, j) for step in range(5) for j in range(4)]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**63 for s in seeds)
    assert BatchSchedule(40, 2, 1, 4, seed=1).micro_batch_seed(0, 0) != seeds[0]


def test_a_global_batch_larger_than_the_data_is_refused() -> None:
    with pytest.raises(ValueError, match="train.global_batch_size"):
        BatchSchedule(num_rows=3, world_size=1, micro_batch_size=1, global_batch=4, seed=0)
    assert np.array_equal(BatchSchedule(4, 1, 1, 4, seed=0).step_rows(1), BatchSchedule(4, 3, 2, 4, seed=0).step_rows(1))
