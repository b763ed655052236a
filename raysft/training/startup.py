"""Where a run's start-up goes, for benchmarks/ray_overhead.py: each process appends a timestamped mark at each
stage between `raysft.train` and the first optimizer step, when RAYSFT_STARTUP_TRACE names a file (a local
path every process of the run can write; Ray's workers inherit the variable from the process that started Ray).
Unset, a mark costs one environment lookup. Light (no torch): the driver and the worker's entry point call it.
"""

from __future__ import annotations

import json
import os
import time

TRACE_ENV = "RAYSFT_STARTUP_TRACE"


def mark(stage: str, at: float | None = None) -> None:
    """Append {stage, pid, t} (t: epoch seconds, now unless `at`) to the trace file, if one is set: one short
    append per line, so processes writing at once do not interleave."""
    path = os.environ.get(TRACE_ENV)
    if not path:
        return
    line = json.dumps({"stage": stage, "pid": os.getpid(), "t": time.time() if at is None else at}) + "\n"
    with open(path, "a", encoding="utf-8") as trace:
        trace.write(line)


def mark_process_start() -> None:
    """A mark at the moment this process was created (a Ray worker's: what Ray spent before it ran any of ours)."""
    if os.environ.get(TRACE_ENV):
        import psutil  # a Ray dependency

        mark("process started", at=psutil.Process().create_time())
