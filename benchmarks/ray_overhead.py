"""Benchmarks 4 and 5 of issue 5: what Ray costs, and how step time scales.

Benchmark 4, Ray overhead. The same raysft run (SmolLM2-135M-Instruct, first --rows GSM8K train examples, LoRA r=16
all-linear, packing on, --steps optimizer steps) through `raysft.train` two ways, each in a fresh child process:

  ray-1w    scaling.num_workers=1, resources_per_worker {CPU: 2}: the loop runs in a Ray Train worker process
            (a RayTrainWorker actor, started by Ray Train's controller actor).
  local     scaling.num_workers=0: Ray Train's local mode runs the very same `train_loop_per_worker` in the
            driver process. This is the "without Ray" baseline: no Train controller/worker actors and no
            worker process, but Ray itself is still running (raysft's data path and its stop board use it),
            so it is "without Ray Train workers", not "without Ray at all".

Both use the same tokenized cache, warmed by a first child, so tokenization is not in either time. Reported: wall
time of `raysft.train(cfg)` (after ray.init; includes data loading, packing, Train start-up, model load, the
steps and saving the adapter), the median step time, and their ratios ray-1w / local (target <= 1.20). The
time of `ray.init` (private local cluster, with its dashboard as raysft's own local Ray has it) is reported
separately.

Start-up stages: each child sets RAYSFT_STARTUP_TRACE (raysft/training/startup.py) before it starts Ray, so the
driver and Ray Train's worker append timestamped marks to one file; the table gives the seconds between marks
from `raysft.train` to the end of the first optimizer step, and the ratio ray-1w / local of that time (target
<= 1.5).

Benchmark 5, scaling shape (Ray Train workers, packing on):
  workers   1 worker x 2 CPUs (micro --micro, accum --accum) vs 2 workers x 1 CPU (micro --micro, accum
            --accum / 2): the same global batch of rows. The machine has 2 cores, so 2 workers share them:
            this measures the cost of DDP (gloo all-reduce, two processes) at a fixed core count, NOT speedup.
  seq_len   step time and tokens/s at data.max_seq_len 256 / 512 / 1024 with the same global batch of rows
            (so a step at 1024 holds about 4x the tokens of a step at 256).

Smoke run:
    python benchmarks/ray_overhead.py
Full run:
    python benchmarks/ray_overhead.py --rows 2000 --steps 20 --skip 2 --out benchmarks/results/ray_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import _common as C


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200, help="first N GSM8K train examples (full: 2000)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run (full: 20)")
    p.add_argument("--skip", type=int, default=2, help="warm-up steps not measured")
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--accum", type=int, default=2, help="must be even (2 workers run accum / 2)")
    p.add_argument("--max-len", type=int, default=512, help="sequence length of benchmark 4 and the workers part")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the private Ray cluster (= of the 1-worker run)")
    p.add_argument("--parts", nargs="+", default=["overhead", "workers", "seq_len"],
                   choices=["overhead", "workers", "seq_len"])
    C.add_run_arguments(p, "ray_overhead")
    p.add_argument("--model-dir", default=None, help="default: raysft.quickstart.smollm2_dir()")
    args = p.parse_args(argv)
    if "workers" in args.parts and args.accum % 2:
        p.error("--accum must be even so that 2 workers keep the same global batch")
    return args


# Start-up stages between `raysft.train` and the end of the first optimizer step: (label, the mark that ends it).
# Marks are written by raysft/training/startup.py in every process of the run (the driver, Ray Train's worker);
# the worker-only stages are absent in local mode, where the loop runs in the driver.
STAGES = [
    ("import raysft.training (driver)", "train"),
    ("driver checks, data from the cache", "checked"),
    ("Ray session, stop board, run config, TorchTrainer", "fit"),
    ("controller, placement group, worker actor scheduled", "process started"),
    ("worker process: Ray worker, actor, process group", "train_loop_per_worker"),
    ("import the training stack", "training stack imported"),
    ("tokenizer", "tokenizer loaded"),
    ("model, LoRA, loss module", "model loaded"),
    ("optimizer, restore, trackers", "restored"),
    ("first optimizer step", "first step done"),
]


def startup_stages(trace: Path) -> dict[str, float]:
    """Seconds per start-up stage, from the run's trace file (first occurrence of each mark)."""
    marks: dict[str, float] = {}
    for line in trace.read_text().splitlines():
        record = json.loads(line)
        marks.setdefault(record["stage"], record["t"])
    stages, previous = {}, marks["raysft.train called"]
    for label, stage in STAGES:
        if stage in marks:
            stages[label] = marks[stage] - previous
            previous = marks[stage]
    stages["total: raysft.train -> first step done"] = marks["first step done"] - marks["raysft.train called"]
    return stages


def child(spec: dict[str, Any]) -> dict[str, Any]:
    trace = Path(spec["output_dir"] + ".trace.jsonl")
    trace.unlink(missing_ok=True)
    if not spec["warm_only"]:
        from raysft.training.startup import TRACE_ENV

        os.environ[TRACE_ENV] = str(trace)  # before Ray starts: its workers inherit it
    result = C.run_raysft_gsm8k(
        spec, packing=True, num_workers=spec["num_workers"], cpus_per_worker=spec["cpus_per_worker"],
        ray_cpus=spec["cpus"], warm_only=spec["warm_only"], include_dashboard=True,
    )
    if not spec["warm_only"]:
        result["stages"] = startup_stages(trace)
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child_spec:
        Path(args.child_out).write_text(json.dumps(child(json.loads(args.child_spec)), default=str))
        return
    from raysft.quickstart import smollm2_dir

    model_dir = args.model_dir or str(smollm2_dir())
    info = C.machine_info()
    workdir = args.resume_workdir or args.workdir / time.strftime("%Y%m%d-%H%M%S")
    script = str(Path(__file__).resolve())
    print(f"ray overhead benchmark -> {workdir}\nmachine: {json.dumps(info)}", flush=True)
    base = {"model_dir": model_dir, "data_dir": str(args.data_dir), "rows": args.rows, "steps": args.steps,
            "micro": args.micro, "accum": args.accum, "max_len": args.max_len, "precision": args.precision,
            "cpus": args.cpus, "cache_dir": str(workdir / "tokenized-cache"), "warm_only": False,
            "num_workers": 1, "cpus_per_worker": args.cpus}

    def run(label: str, **changes: Any) -> dict[str, Any]:
        raw = C.run_child(script, {**base, **changes, "output_dir": str(workdir / label)}, workdir, label, reuse=bool(args.resume_workdir))
        if "steps" in raw:
            raw["summary"] = C.summarize(raw["steps"], args.skip)
        return raw

    runs: dict[str, dict[str, Any]] = {"warm-cache": run("warm-cache", warm_only=True)}
    runs["ray-1w"] = run("ray-1w")  # benchmark 4's Ray run; also the 1-worker and the max_len point of benchmark 5
    if "overhead" in args.parts:
        runs["local"] = run("local", num_workers=0, cpus_per_worker=None)
    if "workers" in args.parts:
        runs["ray-2w"] = run("ray-2w", num_workers=2, cpus_per_worker=args.cpus / 2, accum=args.accum // 2)
    if "seq_len" in args.parts:
        for seq_len in args.seq_lens:
            if seq_len != args.max_len:
                runs[f"seq{seq_len}"] = run(f"seq{seq_len}", max_len=seq_len)

    def line(label: str, r: dict[str, Any], **extra: Any) -> list[Any]:
        s = r["summary"]
        return [label, *extra.values(), r["train_s"], r["ray_init_s"], s["median_step_s"], s["tokens_per_step"],
                s["all_tokens_per_s"], s["trained_tokens_per_s"], s["pad_fraction"], r["peak_rss_tree_mib"]]

    common = ["train() wall s", "ray.init s", "median step s", "tok/step", "all tok/s", "trained tok/s", "pad frac",
              "peak RSS tree MiB"]
    parts = [f"## Ray overhead (benchmark 4) and scaling shape (benchmark 5)\n\nrows={args.rows} steps={args.steps} "
             f"(first {args.skip} not measured) micro={args.micro} accum={args.accum} precision={args.precision} "
             f"packing on, Ray cluster of {args.cpus} CPUs\n", C.machine_markdown(info), "",
             f"Tokenized-cache warm-up (not counted anywhere): {runs['warm-cache']['prepare_s']:.1f} s", ""]
    if "local" in runs:
        ray1, local = runs["ray-1w"], runs["local"]
        parts += ["Benchmark 4: `raysft.train` with 1 Ray Train worker vs Ray Train local mode (num_workers=0: the "
                  "same loop in the driver process; Ray still runs the data hand-over). Wall time excludes ray.init.", "",
                  C.markdown_table(["run", *common], [line("ray-1w", ray1), line("local (num_workers=0)", local)]), "",
                  C.markdown_table(["ratio ray-1w / local", "value"], [
                      ["train() wall time (target <= 1.20)", ray1["train_s"] / local["train_s"]],
                      ["median step time", ray1["summary"]["median_step_s"] / local["summary"]["median_step_s"]],
                      ["train() wall time minus steps (fixed cost) s, ray-1w",
                       ray1["train_s"] - sum(s["step_s"] for s in ray1["steps"])],
                      ["train() wall time minus steps (fixed cost) s, local",
                       local["train_s"] - sum(s["step_s"] for s in local["steps"])],
                  ]), ""]
        labels = list(dict.fromkeys([*ray1["stages"], *local["stages"]]))
        parts += ["Start-up: where the time goes from `raysft.train` to the end of the first optimizer step "
                  "(marks of raysft/training/startup.py; '-': the stage does not exist in that mode).", "",
                  C.markdown_table(["stage", "ray-1w s", "local s"],
                                   [[label, ray1["stages"].get(label), local["stages"].get(label)]
                                    for label in labels]), "",
                  C.markdown_table(["ratio ray-1w / local", "value"], [
                      ["raysft.train -> first step done (target <= 1.5)",
                       ray1["stages"][labels[-1]] / local["stages"][labels[-1]]]]), ""]
    if "ray-2w" in runs:
        one, two = runs["ray-1w"], runs["ray-2w"]
        parts += ["Benchmark 5a: 1 worker x 2 CPUs vs 2 workers x 1 CPU, same global batch. 2 cores in all: this "
                  "is DDP overhead at a fixed core count, not a speed-up measurement.", "",
                  C.markdown_table(["run", "workers x CPUs", *common], [
                      line("ray-1w", one, w=f"1 x {args.cpus}"), line("ray-2w", two, w=f"2 x {args.cpus / 2:g}")]), "",
                  f"2-worker / 1-worker all-tokens/s: "
                  f"{two['summary']['all_tokens_per_s'] / one['summary']['all_tokens_per_s']:.3f}", ""]
    if "seq_len" in args.parts:
        seq_rows, base_rate = [], None
        for seq_len in sorted(set(args.seq_lens)):
            r = runs["ray-1w"] if seq_len == args.max_len else runs[f"seq{seq_len}"]
            base_rate = base_rate or r["summary"]["median_step_s"] / r["summary"]["tokens_per_step"]
            per_token = r["summary"]["median_step_s"] / r["summary"]["tokens_per_step"]
            seq_rows.append(line(f"seq_len {seq_len}", r, rel=per_token / base_rate))
        parts += ["Benchmark 5b: step time against max_seq_len (packing on, 1 worker, same rows per step); 'step time "
                  "per token vs shortest' > 1 shows the quadratic attention share growing.", "",
                  C.markdown_table(["run", "step time per token vs shortest", *common], seq_rows), ""]
    markdown = "\n".join(parts)
    print("\n" + markdown, flush=True)
    C.write_outputs(args.out, {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "runs": runs},
                    markdown)


if __name__ == "__main__":
    main()
