"""Stopping a run or a sweep on SIGINT (Ctrl-C) or SIGTERM (a preemption notice), with a checkpoint.

The driver's signal handler only records the signal. The driver then asks every worker, through a small Ray actor
(the stop board), to stop at its next step boundary: the workers finish their step, write a checkpoint and return,
and the driver says where the run stopped and how to resume it. Workers that have not returned within
`scaling.stop_grace_s` are not waited for: the run resumes from its newest verified checkpoint instead.

Ray starts each actor (a Ray Train worker among them) in a process group of its own and its own services with
SIGINT blocked, so a Ctrl-C in a terminal reaches the driver alone, which coordinates the stop (measured, Ray 2.60).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import ray
import torch

from raysft.training.step import all_reduce_sum

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_POLL_S = 0.2
T = TypeVar("T")


@ray.remote(num_cpus=0)
class StopBoard:
    """Whether a stop was asked for, and which of a sweep's trials are still stopping."""

    def __init__(self) -> None:
        self._stop = asyncio.Event()
        self._running: set[str] = set()
        self._stopped_at: dict[str, int] = {}

    async def wait(self) -> bool:
        """Returns once a stop is asked for: a worker holds this call's result and checks it without a round trip."""
        await self._stop.wait()
        return True

    async def request(self) -> None:
        self._stop.set()

    async def requested(self) -> bool:
        return self._stop.is_set()

    async def stopped(self, run: str, step: int) -> None:
        """Rank 0 of the run at `run` (its location) stopped on request after `step` steps, checkpointed."""
        self._stopped_at[run] = step

    async def stopped_at(self, run: str) -> int | None:
        return self._stopped_at.get(run)

    async def begin(self, name: str) -> None:
        self._running.add(name)

    async def end(self, name: str) -> None:
        self._running.discard(name)

    async def running(self) -> list[str]:
        return sorted(self._running)


def new_stop_board() -> Any:
    """A stop board for one run or sweep (its handle goes to every worker)."""
    return StopBoard.remote()


class StopCheck:
    """A worker's view of the stop board, checked at each step boundary."""

    def __init__(self, board: Any | None):
        self._board = board
        self._asked = board.wait.remote() if board is not None else None

    def requested(self, world: int, device: torch.device) -> bool:
        """Whether every worker stops here. Collective when `world` > 1: the workers must stop at the same step,
        or the first of them to go on would wait for the others in its next all-reduce forever."""
        asked = self._asked is not None and bool(ray.wait([self._asked], timeout=0)[0])
        if world > 1:
            asked = all_reduce_sum([float(asked)], device)[0] > 0
        return asked

    def stopped(self, run: str, step: int) -> None:
        """Tell the driver (rank 0) that the run at `run` stopped after `step` steps, its checkpoint written."""
        ray.get(self._board.stopped.remote(run, step))


@contextlib.contextmanager
def recorded_signals(on_first: Callable[[int], None] | None = None) -> Iterator[list[int]]:
    """SIGINT and SIGTERM recorded (in arrival order) instead of acted on, while the block runs; `on_first` is
    called (in the main thread, from the handler: it must not block) with the first. The previous handlers (Ray's:
    SIGTERM raises SystemExit mid-call, which ends in a C++ abort) come back after. Off the main thread, where
    Python allows no handler, nothing is recorded."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, frame: Any) -> None:
        received.append(signum)
        if len(received) == 1 and on_first is not None:
            on_first(signum)

    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield received
    finally:
        for signum, action in previous.items():
            signal.signal(signum, action)


@dataclass
class Outcome(Generic[T]):
    """How a run that may be stopped by a signal ended."""

    result: T | None = None
    signum: int | None = None
    """The first SIGINT or SIGTERM received, or None."""
    stopped: bool = True
    """False when a signal came and the run had not returned within the grace period (it may still be running)."""


def run_until_signalled(run: Callable[[], T], board: Any, grace_s: float) -> Outcome[T]:
    """`run()`, on a thread of its own while the main thread waits for SIGINT or SIGTERM. On one, the stop board
    asks the workers to stop, and `run()` gets `grace_s` to return (a second signal ends the wait). Off the main
    thread (a sweep's trial, whose sweep driver handles the signals), `run()` as it is."""
    if threading.current_thread() is not threading.main_thread():
        return Outcome(run())
    returned: list[T] = []
    raised: list[BaseException] = []

    def target() -> None:
        try:
            returned.append(run())
        except BaseException as err:  # re-raised on the main thread, which reports it
            raised.append(err)

    # Ray Train registers its own SIGINT handler (which kills the workers at once) only on the main thread.
    thread = threading.Thread(target=target, name="raysft-run", daemon=True)
    with recorded_signals() as received:
        thread.start()
        while thread.is_alive() and not received:
            thread.join(_POLL_S)
        if received:
            board.request.remote()
            deadline = time.monotonic() + grace_s
            while thread.is_alive() and len(received) < 2 and time.monotonic() < deadline:
                thread.join(_POLL_S)
    if thread.is_alive():
        return Outcome(None, received[0], stopped=False)
    if raised:
        raise raised[0]
    return Outcome(returned[0], received[0] if received else None)


class SweepStopper:
    """The sweep driver's side of a stop: on the first signal, ask every trial to stop, wait (on a thread) until
    each has written its checkpoint or the grace period ends, then end Tune's experiment the way Tune ends one
    (SIGUSR1, its own handler: the experiment's state is saved and unfinished trials continue on --resume)."""

    def __init__(self, board: Any, grace_s: float, stopping: threading.Event):
        self.board, self.grace_s, self.stopping = board, grace_s, stopping
        self.received: list[int] = []
        """The signals received so far (recorded_signals' list): a second one ends the wait."""

    def on_signal(self, signum: int) -> None:
        self.stopping.set()
        threading.Thread(target=self._stop_trials, name="raysft-sweep-stop", daemon=True).start()

    def _stop_trials(self) -> None:
        self.board.request.remote()
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline and len(self.received) < 2 and ray.get(self.board.running.remote()):
            time.sleep(_POLL_S)
        os.kill(os.getpid(), signal.SIGUSR1)
