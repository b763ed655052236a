"""Shared helpers for the benchmarks: machine facts, child processes with peak-RSS sampling, raysft configs,
metrics.jsonl reading, the matmul bound, the LoRA training FLOP count and result tables.

Not part of the raysft package and not a test: run the scripts next to this file from the repo root.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
"""The project root: children run there and results are written under it. raysft itself is imported from the
install (`pip install -e .`), here, in the children and in their Ray workers; nothing edits sys.path."""
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data"


# ----------------------------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (printed with every table)."""
    import psutil

    cpu = platform.processor() or ""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1]
                break
    except OSError:
        pass
    versions = {}
    for name in ("torch", "transformers", "peft", "trl", "ray", "datasets", "accelerate"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is reported, not fatal
            versions[name] = "not installed"
    try:
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001
        capability = "?"
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "torch_cpu_capability": capability,
        "avx512_bf16": "avx512_bf16" in flags.split(),
        "amx_bf16": "amx_bf16" in flags.split(),
        "load_avg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        **versions,
    }


# ------------------------------------------------------------------------------------ peak RSS sampling


class TreeRSS:
    """Samples the RSS of a process and all its descendants (Ray's raylet, GCS and workers included).

    `peak_total` is the largest sum over the tree seen at one sample; `peak_by_kind` the largest RSS of a
    single process per kind (kind = the process's title, e.g. ``ray::RayTrainWorker...``, or `root`).
    Sampled every `interval` s, so a spike shorter than that can be missed.
    """

    def __init__(self, pid: int, interval: float = 0.25):
        self.pid, self.interval = pid, interval
        self.peak_total = 0
        self.peak_root = 0
        self.peak_by_kind: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            total = 0
            for proc in procs:
                try:
                    rss = proc.memory_info().rss
                    kind = "root" if proc.pid == self.pid else _kind(proc)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                total += rss
                self.peak_by_kind[kind] = max(self.peak_by_kind.get(kind, 0), rss)
                if proc.pid == self.pid:
                    self.peak_root = max(self.peak_root, rss)
            self.peak_total = max(self.peak_total, total)
            self._stop.wait(self.interval)


def _kind(proc: Any) -> str:
    try:
        cmd = proc.cmdline()
    except Exception:  # noqa: BLE001
        cmd = []
    title = cmd[0] if cmd else proc.name()
    if title.startswith("ray::"):
        return title.split()[0].split(".")[0]
    return proc.name()


def run_child(script: str, spec: dict[str, Any], workdir: Path, label: str, reuse: bool = False) -> dict[str, Any]:
    """Run `script --child-spec ...` in a fresh Python process and return the JSON it writes.

    A fresh process per variant keeps peak RSS per variant (an allocator never gives memory back to a
    long-lived driver) and keeps Ray/TRL state from leaking between variants. The parent samples the
    child's whole process tree for peak RSS. With `reuse`, a result file left by an earlier run of the same
    workdir is returned instead (to finish an interrupted run, or re-render its tables).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / f"{label}.result.json"
    if reuse and out.exists():
        print(f"--- {label}: reusing {out}", flush=True)
        result = json.loads(out.read_text())
        for key in ("peak_rss_tree_mib", "peak_rss_driver_mib", "peak_rss_train_worker_mib"):
            result.setdefault(key, None)
        return result
    out.unlink(missing_ok=True)
    log = workdir / f"{label}.log"
    cmd = [sys.executable, script, "--child-spec", json.dumps(spec), "--child-out", str(out)]
    print(f"--- {label}: running in a child process (log: {log})", flush=True)
    start = time.perf_counter()
    with log.open("w") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)
        with TreeRSS(proc.pid) as rss:
            code = proc.wait()
    wall = time.perf_counter() - start
    if code != 0 or not out.exists():
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise RuntimeError(f"{label} failed (exit {code}); last lines of {log}:\n{tail}")
    result = json.loads(out.read_text())
    result["child_wall_s"] = wall
    result["peak_rss_tree_mib"] = rss.peak_total / 2**20
    result["peak_rss_driver_mib"] = rss.peak_root / 2**20
    workers = {k: v for k, v in rss.peak_by_kind.items() if "RayTrainWorker" in k}
    result["peak_rss_train_worker_mib"] = max(workers.values()) / 2**20 if workers else None
    result["peak_rss_by_process_kind_mib"] = {k: round(v / 2**20, 1) for k, v in sorted(rss.peak_by_kind.items())}
    out.write_text(json.dumps(result, default=str))  # with the parent's measurements added
    print(f"--- {label}: done in {wall:.1f} s", flush=True)
    return result


def start_local_ray(num_cpus: int, include_dashboard: bool = False) -> float:
    """Start a private local Ray (never attach to another user's cluster); return the seconds it took.

    `include_dashboard`: as raysft's own local Ray (raysft/ray_session.py) has it. Ray Train's placement-group
    cleaner asks the dashboard's state API whether the controller lives, and Ray 2.60 takes an answer without the
    actor for "dead" and removes the running worker group's placement group (seen once without a dashboard).
    """
    import ray

    start = time.perf_counter()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=include_dashboard, log_to_driver=False,
             configure_logging=False)
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------ raysft runs


def raysft_config(
    *,
    model_dir: str,
    train_source: dict[str, Any],
    output_dir: Path,
    cache_dir: Path,
    max_seq_len: int,
    packing: bool,
    micro: int,
    accum: int,
    steps: int,
    precision: str,
    num_workers: int,
    cpus_per_worker: float | None,
    seed: int = 0,
) -> dict[str, Any]:
    """A raysft train config as a plain mapping (validated by raysft.parse_config)."""
    return {
        "model": {"name_or_path": model_dir, "dtype": "float32", "attn_implementation": "packed_sdpa"},
        "data": {"train": [train_source], "max_seq_len": max_seq_len, "packing": packing,
                 "over_length": "truncate", "cache_dir": str(cache_dir)},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "train": {"output_dir": str(output_dir), "seed": seed, "micro_batch_size": micro, "grad_accum_steps": accum,
                  "max_steps": steps, "lr": 2e-4, "lr_schedule": "constant", "warmup_steps": 0,
                  "precision": precision, "log_every": 1, "max_grad_norm": 1.0},
        "scaling": {"num_workers": num_workers,
                    "resources_per_worker": {"CPU": cpus_per_worker} if cpus_per_worker else None},
        "tracking": {"console": False, "tensorboard": False, "wandb": False},
    }


def gsm8k_source(data_dir: Path, rows: int) -> dict[str, Any]:
    return {"path": str(data_dir / "gsm8k" / "train.jsonl"), "format": "prompt_response",
            "prompt_column": "question", "response_column": "answer", "limit": rows}


def raysft_step_stats(output_dir: Path, cfg: Any, world: int) -> dict[str, Any]:
    """Per-step numbers of a finished raysft run: from metrics.jsonl, plus padded slots per step.

    metrics.jsonl gives tokens_per_s (non-pad tokens / interval since the previous log) and the cumulative
    num_tokens, so step time = step's real tokens / tokens_per_s. Padding is not logged, so the run's batches
    are rebuilt here from the same packed rows and the loop's own schedule (`BatchSchedule`), and each
    micro-batch is counted as padded to its longest row, as `collate` does. The rebuilt real-token count is
    checked against metrics.jsonl.
    """
    import raysft
    from raysft.config import global_batch_rows
    from raysft.training.step import BatchSchedule

    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    lines = [m for m in lines if "tokens_per_s" in m]
    previous, steps = 0, []
    for m in lines:
        real = m["num_tokens"] - previous
        previous = m["num_tokens"]
        steps.append({"step": m["step"], "loss": m["loss"], "real_tokens": real, "trained_tokens": m["trained_tokens"],
                      "step_s": real / m["tokens_per_s"]})
    prepared = raysft.prepare_data(cfg)  # a cache hit: same rows as the run trained on
    table = prepared.splits["train"]
    row_lengths = table.read(0, table.num_rows, ["num_tokens"]).column("num_tokens").to_numpy()
    schedule = BatchSchedule(table.num_rows, world, cfg.train.micro_batch_size, global_batch_rows(cfg),
                             cfg.train.seed, cfg.data.shuffle_window)
    for s in steps:
        slots = real = 0
        for rank in range(world):
            for _, micro_batch in schedule.micro_batches(s["step"] - 1, rank):
                lengths = [int(row_lengths[i]) for i in micro_batch]
                slots += len(lengths) * max(lengths)
                real += sum(lengths)
        if real != s["real_tokens"]:
            raise RuntimeError(f"rebuilt step {s['step']} has {real} tokens, metrics.jsonl says {s['real_tokens']}")
        s["slots"] = slots
    lengths = [length for row in table.read(0, table.num_rows, ["example_lengths"]).column("example_lengths").to_pylist()
               for length in row]
    return {"steps": steps, "example_lengths": lengths, "packed_rows": table.num_rows,
            "examples": prepared.stats.examples_kept["train"],
            "packing_efficiency": prepared.stats.packing_efficiency["train"]}


# ------------------------------------------------------------------------------------------ statistics


def summarize(steps: list[dict[str, Any]], skip: int) -> dict[str, Any]:
    """Median step time and token rates over the steps after the first `skip` (warm-up) steps.

    Rates are totals over the measured steps divided by their summed time (not a mean of ratios).
    """
    measured = steps[skip:] if len(steps) > skip else steps
    time_s = sum(s["step_s"] for s in measured)
    real = sum(s["real_tokens"] for s in measured)
    trained = sum(s["trained_tokens"] for s in measured)
    slots = sum(s["slots"] for s in measured)
    return {
        "measured_steps": len(measured),
        "median_step_s": statistics.median(s["step_s"] for s in measured),
        "trained_tokens_per_s": trained / time_s,
        "all_tokens_per_s": real / time_s,
        "pad_fraction": 1 - real / slots if slots else 0.0,
        "tokens_per_step": real / len(measured),
        "trained_tokens_per_step": trained / len(measured),
    }


# --------------------------------------------------------------------------------------- the bound


def matmul_flops(dtype_name: str, sizes: tuple[int, ...], threads: int | None = None, seconds: float = 2.0,
                 device: str = "cpu") -> dict[str, Any]:
    """Best FLOP/s of `torch.matmul` on n x n matrices (2 n^3 FLOPs each), on `device` (`threads` on CPU).

    The measured ceiling that MFU is quoted against: what this machine's matmuls really reach in `dtype`.
    """
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]

    def synchronize() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    per_size = {}
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        torch.matmul(a, b)  # warm-up
        synchronize()
        count, start = 0, time.perf_counter()
        while True:
            for _ in range(10 if device.startswith("cuda") else 1):  # queue a few: no host wait per product
                torch.matmul(a, b)
                count += 1
            synchronize()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds and count >= 2:
                break
        per_size[str(n)] = 2 * n**3 * count / elapsed
    return {"best_flops": max(per_size.values()), "per_size": per_size, "threads": threads, "device": device}


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelShape":
        return cls.from_config(json.loads((Path(model_dir) / "config.json").read_text()))

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> "ModelShape":
        """From a transformers config (as its config.json dict)."""
        head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        return cls(c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"], c["num_attention_heads"],
                   c.get("num_key_value_heads", c["num_attention_heads"]), head_dim, c["vocab_size"])

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of every linear layer of one decoder layer (Llama-style: q k v o gate up down)."""
        d, q, kv, ff = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return [(d, q), (d, kv), (d, kv), (q, d), (d, ff), (d, ff), (ff, d)]


def lora_training_flops(shape: ModelShape, r: int, tokens: int, trained_tokens: int, attn_pairs: float) -> dict[str, float]:
    """Necessary FLOPs of one LoRA training pass (forward + backward) over a batch; matmuls only.

    Notation: L layers, d hidden, P = sum over one layer's linears of in*out (q, k, v, o, gate, up, down),
    T = non-pad tokens, T_tr = trained tokens (tokens whose next-token target is in the loss), V = vocab,
    A = sum over examples of the causal query-key pairs n(n+1)/2 (packed examples attend only within
    themselves, so A is summed per example, not per packed row).

        base forward              2 * L * P * T
        base backward (dX only)   2 * L * P * T      frozen base: no weight gradients
        LoRA (all-linear, rank r) 6 * L * r * sum(in + out) * T
                                  (forward 2, activation gradient 2, weight gradients of A and B 2)
        attention                 12 * L * (H * head_dim) * A
                                  (forward QK^T and PV: 2 matmuls * 2 FLOPs per multiply-add = 4 per pair
                                  per channel; backward dQ, dK, dP, dV: 8; total 12)
        LM head                   4 * V * d * T_tr
                                  (forward 2 and activation gradient 2, only on trained positions: the logits of
                                  other positions are not needed; tied/frozen embedding: no weight gradient)

    Not counted: norms, activations, softmax, RoPE, optimizer (all elementwise), the embedding lookup, and
    work an implementation does without need (padding, masked attention blocks, logits of untrained positions).
    """
    L = shape.layers
    P = sum(i * o for i, o in shape.linears())
    lora_dims = sum(i + o for i, o in shape.linears())
    parts = {
        "base_forward": 2 * L * P * tokens,
        "base_backward_activations": 2 * L * P * tokens,
        "lora": 6 * L * r * lora_dims * tokens,
        "attention": 12 * L * shape.heads * shape.head_dim * attn_pairs,
        "lm_head": 4 * shape.vocab * shape.hidden * trained_tokens,
    }
    parts["total"] = sum(parts.values())
    return parts


def causal_pairs(lengths: list[int]) -> float:
    return float(sum(n * (n + 1) / 2 for n in lengths))


# ----------------------------------------------------------------------------------------------- output


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-2):
                return f"{value:.3g}"
            return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_outputs(out: str | None, payload: dict[str, Any], markdown: str) -> None:
    """Write `<out>` as JSON (any suffix but .md) and `<out stem>.md` with the tables."""
    if not out:
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    json_path = path if path.suffix != ".md" else path.with_suffix(".json")
    md_path = path.with_suffix(".md")
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    md_path.write_text(markdown + "\n")
    print(f"wrote {json_path} and {md_path}")


def machine_markdown(info: dict[str, Any]) -> str:
    keys = ("date", "cpu", "logical_cpus", "memory_gib", "torch_cpu_capability", "avx512_bf16", "amx_bf16",
            "load_avg_at_start", "python", "torch", "transformers", "peft", "trl", "ray", "datasets")
    return "\n".join(f"- {k}: {info.get(k)}" for k in keys)


def add_run_arguments(parser: Any, name: str) -> None:
    """The arguments every benchmark script shares: data, work folder, resume, output, child process."""
    import argparse

    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench" / name)
    parser.add_argument("--resume-workdir", type=Path, default=None,
                        help="finish (or re-render) an earlier run: reuse its <variant>.result.json files")
    parser.add_argument("--out", default=None, help="write results JSON here and the markdown tables next to it (.md)")
    parser.add_argument("--child-spec", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)


def child_main(args: Any, runners: dict[str, Callable[[dict[str, Any]], dict[str, Any]]]) -> None:
    """Child-process side of a benchmark: run the variant named by --child-spec, write its result JSON."""
    spec = json.loads(args.child_spec)
    result = runners[spec["kind"]](spec)
    Path(args.child_out).write_text(json.dumps(result, default=str))


def run_raysft_gsm8k(
    spec: dict[str, Any], *, packing: bool, num_workers: int, cpus_per_worker: int, ray_cpus: int, warm_only: bool = False,
    include_dashboard: bool = False,
) -> dict[str, Any]:
    """Child-process side of every raysft run: the spec's GSM8K rows through `raysft.train` on a private Ray.

    With `warm_only`, only fill the tokenized cache (`raysft.prepare_data`) and time that.
    """
    import raysft

    shutil.rmtree(spec["output_dir"], ignore_errors=True)  # a half-finished earlier attempt of this run
    ray_init_s = start_local_ray(ray_cpus, include_dashboard)
    raw = raysft_config(
        model_dir=spec["model_dir"], train_source=gsm8k_source(Path(spec["data_dir"]), spec["rows"]),
        output_dir=Path(spec["output_dir"]), cache_dir=Path(spec["cache_dir"]), max_seq_len=spec["max_len"],
        packing=packing, micro=spec["micro"], accum=spec["accum"], steps=spec["steps"], precision=spec["precision"],
        num_workers=num_workers, cpus_per_worker=cpus_per_worker,
    )
    cfg = raysft.parse_config(raw)
    from raysft.training.startup import mark  # a no-op unless RAYSFT_STARTUP_TRACE is set (ray_overhead.py sets it)

    mark("raysft.train called")
    t0 = time.perf_counter()
    if warm_only:
        raysft.prepare_data(cfg)
        return {"ray_init_s": ray_init_s, "prepare_s": time.perf_counter() - t0}
    raysft.train(cfg)
    train_s = time.perf_counter() - t0
    stats = raysft_step_stats(Path(spec["output_dir"]), cfg, world=max(1, num_workers))
    return {**stats, "ray_init_s": ray_init_s, "train_s": train_s}

