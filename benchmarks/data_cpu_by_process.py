"""Where the CPU goes while `raysft.prepare_data` tokenizes and packs N synthetic rows (issue 27): every process's
CPU time (user + system, psutil) sampled every 0.25 s and summed by role (driver, tokenize actors, Ray Data's
write and pack tasks, Ray's daemons). A worker that ran several Ray Data operators counts under the last one.
The rows and the model are those of data_scale.py's scale part. Run on a quiet machine, from an empty cache, with
nothing else using Ray:

    python benchmarks/data_cpu_by_process.py --rows 100000
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil

import _common as C
import data_scale

# Ray's own processes, named by a part of their command line.
RAY_DAEMONS = ("raylet", "gcs_server", "dashboard/agent", "dashboard.py", "runtime_env/agent", "log_monitor",
               "monitor.py", "ray_client_server")
IDLE_ROLES = ("ray::IDLE", "ray worker (idle/other)")


def role(process: psutil.Process, driver_pid: int) -> str:
    """What a process is to the job, from its command line (Ray names a busy worker after its task or actor)."""
    if process.pid == driver_pid:
        return "driver (prepare_data)"
    cmd = " ".join(process.cmdline())
    daemon = next((key for key in RAY_DAEMONS if key in cmd), None)
    if daemon:
        return daemon
    if cmd.startswith("ray::"):
        return cmd.split()[0]
    return "ray worker (idle/other)" if "default_worker" in cmd else "other: " + cmd[:60]


class CpuByProcess(threading.Thread):
    """Samples every process's CPU seconds until stopped; `by_role()` sums what each role used since the start."""

    def __init__(self, interval_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.interval_s, self.driver_pid, self._done = interval_s, psutil.Process().pid, threading.Event()
        self.at_start = {pid: cpu for pid, (_, cpu) in self._sample({}).items()}
        self.last: dict[int, tuple[str, float]] = {}

    def _sample(self, previous: dict[int, tuple[str, float]]) -> dict[int, tuple[str, float]]:
        out = dict(previous)
        for process in psutil.process_iter():
            try:
                times, name = process.cpu_times(), role(process, self.driver_pid)
            except psutil.Error:  # exited between the listing and the look
                continue
            if name in IDLE_ROLES and process.pid in previous:
                name = previous[process.pid][0]  # the role it had while it worked
            out[process.pid] = (name, times.user + times.system)
        return out

    def run(self) -> None:
        while not self._done.is_set():
            self.last = self._sample(self.last)
            time.sleep(self.interval_s)

    def by_role(self) -> dict[str, float]:
        self._done.set()
        self.join()
        totals: dict[str, float] = defaultdict(float)
        for pid, (name, cpu) in self.last.items():
            totals[name] += cpu - self.at_start.get(pid, 0.0)
        return dict(sorted(totals.items(), key=lambda item: -item[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/raysft-data-cpu"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = args.workdir / f"synthetic-{args.rows}.jsonl"
    data_scale.synthetic_jsonl(data, args.rows)
    spec = {"model_dir": str(data_scale.tiny_model(args.workdir)), "data": str(data), "max_len": 1024,
            "cache_dir": str(args.workdir / "cache"), "output_dir": str(args.workdir / "out"), "workers": 1}
    shutil.rmtree(spec["cache_dir"], ignore_errors=True)
    import raysft

    cfg = data_scale._config(spec)
    print(f"machine: {json.dumps(C.machine_info())}", flush=True)
    sampler = CpuByProcess()
    sampler.start()
    started = time.perf_counter()
    raysft.prepare_data(cfg)
    wall = time.perf_counter() - started
    totals = sampler.by_role()
    everything = sum(totals.values())
    print(json.dumps({"rows": args.rows, "wall_s": round(wall, 1), "cpu_s_total": round(everything, 1)}))
    for name, cpu in totals.items():
        if cpu > 0.05:
            print(f"{cpu:8.1f} s  {100 * cpu / everything:5.1f}%  {name}")


if __name__ == "__main__":
    main()
