"""A sweep scheduler's decisions, delivered to the trials' workers at each evaluation.

Tune carries out a scheduler's STOP by ending the trial's process; its Ray Train controller and workers go only
once Ray tears them down after it. Meanwhile a fast trial trained and evaluated another round: its folder, which
`raysft report` reads, no longer matched results.csv, and compute was spent after the stop. So the sweep records
each decision here as the scheduler makes it, and a trial's workers wait for the decision on every evaluation they
report before they train the next step: a stop takes effect at the next step boundary, and a stopped trial's
folder holds exactly what the scheduler saw.

Light on purpose (Ray only): Ray Train's controller unpickles `TrialGate` with the rest of the loop inputs.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from dataclasses import dataclass

import ray

NAMESPACE = "raysft"
CONTINUE, STOP = "CONTINUE", "STOP"
# How long a worker waits for a decision. Tune decides within a poll or two; a longer wait means the sweep's driver
# is stuck or gone, and then the trial goes on (Tune ends it with its driver).
DECISION_WAIT_S = 600.0


def eval_round(step: int, eval_every: int | None) -> int:
    """How many evaluations a trial has passed at `step` (0 before training): the schedulers' time axis."""
    if step == 0:
        return 0
    return math.ceil(step / eval_every) if eval_every else 1


def board_name(sweep_home: str) -> str:
    """The decision board's name for the sweep living at `sweep_home`: the same across --resume, since Tune
    restores the scheduler (which holds the name) from its own saved state."""
    return f"raysft-decisions-{hashlib.sha256(sweep_home.encode()).hexdigest()[:16]}"


@ray.remote(num_cpus=0)
class DecisionBoard:
    """The scheduler's decision for each (trial, evaluation round), awaited by the trial's rank 0."""

    def __init__(self) -> None:
        self._decided: dict[tuple[str, int], str] = {}
        self._paused: set[str] = set()
        self._changed = asyncio.Condition()

    async def pause(self, trial_id: str) -> None:
        """The scheduler paused the trial (PBT): Tune restarts it later, from a checkpoint."""
        self._paused.add(trial_id)

    async def paused(self, trial_id: str) -> bool:
        return trial_id in self._paused

    async def forget(self, trial_id: str) -> None:
        """A trial (re)starts: a restarted one evaluates rounds again, which its earlier decisions must not answer."""
        self._decided = {key: value for key, value in self._decided.items() if key[0] != trial_id}
        self._paused.discard(trial_id)

    async def record(self, trial_id: str, round_: int, decision: str) -> None:
        async with self._changed:
            self._decided[(trial_id, round_)] = decision
            self._changed.notify_all()

    async def wait(self, trial_id: str, round_: int, timeout_s: float) -> str | None:
        key = (trial_id, round_)
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: key in self._decided), timeout_s)
            except asyncio.TimeoutError:
                return None
            return self._decided[key]


def open_board(name: str) -> ray.actor.ActorHandle:
    """The sweep driver's decision board (kept alive by the handle it holds; it ends with the driver)."""
    return DecisionBoard.options(name=name, namespace=NAMESPACE, get_if_exists=True).remote()


def post_decision(name: str, trial_id: str, round_: int, decision: str) -> None:
    """Post a decision without waiting (the scheduler runs inside Tune's event loop)."""
    ray.get_actor(name, namespace=NAMESPACE).record.remote(trial_id, round_, decision)


def mark_paused(name: str, trial_id: str) -> None:
    """Record that the scheduler paused the trial (posted after its decision, so in order)."""
    ray.get_actor(name, namespace=NAMESPACE).pause.remote(trial_id)


@dataclass(frozen=True)
class TrialGate:
    """What a trial's workers need to hear its scheduler: the board's name and the trial's Tune id."""

    board: str
    trial_id: str

    def decision(self, round_: int, timeout_s: float = DECISION_WAIT_S) -> str:
        """The scheduler's decision on evaluation round `round_` (CONTINUE when the sweep's driver is gone)."""
        try:
            board = ray.get_actor(self.board, namespace=NAMESPACE)
        except ValueError:
            return CONTINUE
        return ray.get(board.wait.remote(self.trial_id, round_, timeout_s)) or CONTINUE

    def restarted(self) -> None:
        """The trial starts (again): forget its earlier decisions."""
        ray.get(ray.get_actor(self.board, namespace=NAMESPACE).forget.remote(self.trial_id))

    def paused(self) -> bool:
        """Whether the scheduler paused the trial (its workers stopped; Tune restarts it later)."""
        try:
            board = ray.get_actor(self.board, namespace=NAMESPACE)
        except ValueError:
            return False
        return ray.get(board.paused.remote(self.trial_id))
