"""Benchmark 6 of issue 5: sweep efficiency, the same search space under ASHA and under FIFO.

Both sweeps sample the same trials (random search, same seed: Tune's sampler gives both the same
configurations in the same order) over `train.lr` (loguniform) x `lora.r` (choice), each trial a `raysft`
run of --steps steps with an evaluation every --eval-every steps, --concurrent trials at a time, one Ray
Train worker with 1 CPU each. ASHA (grace 1 round, reduction factor --reduction-factor) may stop a trial at
each rung; FIFO runs every trial to the end. Reported: the best final eval loss of a completed trial (what
`raysft sweep` picks as best/), the lowest eval loss any trial logged, the tokens trained by all trials,
the wall time, and ASHA / FIFO ratios. Target: ASHA's best within 2% of FIFO's with <= 40% of its tokens.

The model is the test suite's tiny Llama (2 layers, hidden 64, byte-level BPE of 512 tokens, built locally
by tests/tiny.py), so trials are short and the numbers measure the scheduler, not the model. Each sweep runs
in a fresh child process with its own private local Ray (with the dashboard: Ray Train frees a stopped
trial's placement group through Ray's State API).

Smoke run:
    python benchmarks/sweep_efficiency.py --trials 4 --steps 12
Full run:
    python benchmarks/sweep_efficiency.py --out benchmarks/results/sweep_efficiency.json
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import Any

import _common as C


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=12, help="trials per sweep (num_samples)")
    p.add_argument("--steps", type=int, default=36, help="optimizer steps of a full trial")
    p.add_argument("--eval-every", type=int, default=4, help="steps per eval round (ASHA's time unit)")
    p.add_argument("--reduction-factor", type=float, default=3.0)
    p.add_argument("--concurrent", type=int, default=2, help="trials at once (1 worker x 1 CPU each)")
    p.add_argument("--rows", type=int, default=256, help="first N GSM8K train examples")
    p.add_argument("--eval-rows", type=int, default=32, help="first N GSM8K test examples")
    p.add_argument("--seed", type=int, default=0, help="search seed (which trials are sampled)")
    C.add_run_arguments(p, "sweep_efficiency")
    return p.parse_args(argv)


def sweep_spec(args: argparse.Namespace, model_dir: Path, workdir: Path) -> dict[str, Any]:
    """The sweep both variants run; only the scheduler differs."""
    data = args.data_dir / "gsm8k"
    base = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": {"path": str(data / "train.jsonl"), "limit": args.rows},
                 "eval": {"path": str(data / "test.jsonl"), "limit": args.eval_rows},
                 "max_seq_len": 256, "over_length": "truncate", "cache_dir": str(workdir / "tokenized-cache")},
        "lora": {"alpha": 16, "dropout": 0.0},
        "train": {"micro_batch_size": 4, "grad_accum_steps": 1, "max_steps": args.steps,
                  "eval_every": args.eval_every, "warmup_steps": 2, "log_every": args.eval_every},
        "scaling": {"num_workers": 1, "resources_per_worker": {"CPU": 1}},
        "tracking": {"console": False, "tensorboard": False},
    }
    return {
        "name": "bench-sweep", "base": base, "seed": args.seed, "num_samples": args.trials,
        "max_concurrent_trials": args.concurrent, "search_alg": "random",
        "space": {"train.lr": "loguniform [1e-4, 5e-2]", "lora.r": "choice [2, 4, 8, 16]"},
    }


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import ray

    from raysft.tune.config import parse_sweep
    from raysft.tune.sweep import sweep

    ray.init(address="local", num_cpus=spec["cpus"], include_dashboard=True, log_to_driver=False,
             configure_logging=False)
    cfg = parse_sweep(spec["sweep"])
    start = time.perf_counter()
    sweep(cfg)
    wall = time.perf_counter() - start
    with (Path(spec["sweep"]["output_dir"]) / "results.csv").open() as handle:
        return {"wall_s": wall, "trials": list(csv.DictReader(handle))}


def untrained_eval_loss(sweep_dir: Path) -> float:
    """The step-0 evaluation (before any training step) of the sweep's first trial."""
    lines = (sweep_dir / "trials" / "trial_00000" / "metrics.jsonl").read_text().splitlines()
    return next(entry["eval_loss"] for entry in map(json.loads, lines) if entry["step"] == 0)


def summarize(trials: list[dict[str, str]]) -> dict[str, Any]:
    completed = [t for t in trials if t["status"] == "completed"]
    return {
        "best_final": min(float(t["last_eval_loss"]) for t in completed),
        "best_any": min(float(t["best_eval_loss"]) for t in trials if t["best_eval_loss"]),
        "tokens": sum(int(t["tokens"]) for t in trials),
        "steps": sum(int(t["steps"]) for t in trials),
        "completed": len(completed),
        "stopped": sum(t["status"] == "stopped_early" for t in trials),
        "errors": sum(t["status"] == "error" for t in trials),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child_spec:
        C.child_main(args, {"sweep": child})
        return
    from tests.tiny import make_model, make_tokenizer

    info = C.machine_info()
    workdir = args.resume_workdir or args.workdir / time.strftime("%Y%m%d-%H%M%S")
    print(f"sweep efficiency benchmark -> {workdir}\nmachine: {json.dumps(info)}", flush=True)
    model_dir = workdir / "tiny-llama"
    if not (model_dir / "config.json").exists():
        make_model("llama", model_dir, make_tokenizer(workdir / "tokenizer"))
    script = str(Path(__file__).resolve())
    runs: dict[str, dict[str, Any]] = {}
    for scheduler in ("asha", "fifo"):
        spec = sweep_spec(args, model_dir, workdir)
        spec["output_dir"] = str(workdir / scheduler)
        spec["scheduler"] = ({"name": "asha", "grace_period": 1, "reduction_factor": args.reduction_factor}
                             if scheduler == "asha" else "fifo")
        raw = C.run_child(script, {"kind": "sweep", "cpus": args.concurrent, "sweep": spec}, workdir, scheduler,
                          reuse=bool(args.resume_workdir))
        runs[scheduler] = {**raw, "summary": summarize(raw["trials"])}

    asha, fifo = runs["asha"]["summary"], runs["fifo"]["summary"]
    # Losses of a tiny random model move little (all trials end within a few % of each other), so the
    # best is also given as the share of FIFO's improvement over the untrained model that ASHA reached.
    untrained = untrained_eval_loss(workdir / "fifo")
    improvement_share = (untrained - asha["best_final"]) / (untrained - fifo["best_final"])
    rows = [[name, s["completed"], s["stopped"], s["errors"], s["best_final"], s["best_any"], s["steps"], s["tokens"],
             runs[name]["wall_s"]] for name, s in (("asha", asha), ("fifo", fifo))]
    trial_rows = [[name, t["trial"], t["train.lr"], t["lora.r"], t["status"], t["steps"], t["last_eval_loss"]]
                  for name in ("asha", "fifo") for t in runs[name]["trials"]]
    markdown = "\n".join([
        (f"## Sweep efficiency (benchmark 6)\n\n{args.trials} trials over train.lr loguniform [1e-4, 5e-2] x "
        f"lora.r choice [2, 4, 8, 16] (random search, seed {args.seed}), {args.steps} steps per full trial, "
        f"eval every {args.eval_every} steps, {args.concurrent} trials at a time, ASHA grace 1 round, reduction "
        f"factor {args.reduction_factor:g}; tiny Llama, GSM8K rows={args.rows}, eval rows={args.eval_rows}\n"),
        C.machine_markdown(info), "",
        C.markdown_table(["scheduler", "completed", "stopped early", "errors", "best final eval loss",
                          "lowest eval loss logged", "steps", "tokens", "wall s"], rows), "",
        C.markdown_table(["ASHA / FIFO", "value", "target"], [
            ["best final eval loss", asha["best_final"] / fifo["best_final"], "<= 1.02"],
            [f"share of FIFO's improvement over the untrained eval loss ({untrained:.4f})", improvement_share, "-"],
            ["tokens trained", asha["tokens"] / fifo["tokens"], "<= 0.40"],
            ["wall time", runs["asha"]["wall_s"] / runs["fifo"]["wall_s"], "-"],
        ]), "",
        "Trials (same sampled configurations in both sweeps):", "",
        C.markdown_table(["sweep", "trial", "train.lr", "lora.r", "status", "steps", "final eval loss"], trial_rows),
    ])
    print("\n" + markdown, flush=True)
    C.write_outputs(args.out, {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "runs": runs},
                    markdown)


if __name__ == "__main__":
    main()
