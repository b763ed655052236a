"""Where the CPU goes while `raysft.prepare_data` tokenizes and packs N synthetic rows (issue 27): every process's
CPU time (user + system, psutil) sampled every 0.25 s and summed by role (driver, tokenize actors, Ray Data's
write and pack tasks, Ray's daemons). A worker that ran several Ray Data operators counts under the last one.
Run on a quiet machine, from an empty cache, with nothing else using Ray:

    python benchmarks/data_cpu_by_process.py 100000
"""
import json
import shutil
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data_scale as D  # noqa: E402

rows = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
work = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("/tmp/raysft-data-cpu")
work.mkdir(exist_ok=True)
data = work / f"synthetic-{rows}.jsonl"
D.synthetic_jsonl(data, rows)
model = D.tiny_model(work)
me = psutil.Process()

seen: dict[int, tuple[str, float]] = {}
base: dict[int, float] = {}
for p in psutil.process_iter():
    try:
        t = p.cpu_times()
        base[p.pid] = t.user + t.system
    except psutil.Error:
        pass
stop = threading.Event()


def role(p: psutil.Process) -> str:
    if p.pid == me.pid:
        return "driver (prepare_data)"
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return "?"
    for key in ("raylet", "gcs_server", "dashboard/agent", "dashboard.py", "runtime_env/agent", "log_monitor",
                "monitor.py", "ray_client_server"):
        if key in cmd:
            return key
    if cmd.startswith("ray::"):
        return cmd.split()[0]
    if "default_worker" in cmd:
        return "ray worker (idle/other)"
    return "other: " + cmd[:60]


def sample() -> None:
    while not stop.is_set():
        for p in psutil.process_iter():
            try:
                t = p.cpu_times()
                name, previous = role(p), seen.get(p.pid)
                if previous and name in ("ray::IDLE", "ray worker (idle/other)"):
                    name = previous[0]  # the role it had while it worked
                seen[p.pid] = (name, t.user + t.system)
            except psutil.Error:
                pass
        time.sleep(0.25)


import raysft  # noqa: E402

spec = {"model_dir": str(model), "data": str(data), "max_len": 1024, "cache_dir": str(work / "cache"),
        "output_dir": str(work / "out"), "workers": 1}
shutil.rmtree(work / "cache", ignore_errors=True)
cfg = D._config(spec)
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
start = time.perf_counter()
raysft.prepare_data(cfg)
wall = time.perf_counter() - start
stop.set()
sampler.join()
by_role: dict[str, float] = defaultdict(float)
for pid, (name, cpu) in seen.items():
    by_role[name] += cpu - base.get(pid, 0.0)
total = sum(by_role.values())
print(json.dumps({"rows": rows, "wall_s": round(wall, 1), "cpu_s_total": round(total, 1)}))
for name, cpu in sorted(by_role.items(), key=lambda kv: -kv[1]):
    if cpu > 0.05:
        print(f"{cpu:8.1f} s  {100 * cpu / total:5.1f}%  {name}")
