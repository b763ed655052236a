"""Benchmarks 1 and 2 of issue 5: LoRA training throughput, raysft vs TRL SFTTrainer, and the machine's bound.

Same model (SmolLM2-135M-Instruct, float32 weights), same data (the first --rows GSM8K train examples, rendered
with the model's chat template: user = question, assistant = answer; loss on the answer only, end-of-turn
token included), same LoRA (r=16, alpha=32, dropout 0, all-linear), same max length, same micro-batch x
grad-accum, same optimizer (AdamW, lr 2e-4 constant, clip 1.0), no gradient checkpointing, SDPA attention (TRL:
transformers' "sdpa"; raysft: its default "packed_sdpa", SDPA per packed example), one worker with --threads
CPU threads. Per precision, four variants run one after the other:

  trl-nopack     SFTTrainer, prompt/completion dataset (completion-only loss), packing=False: padded batches
  trl-pack       SFTTrainer, packing=True (TRL's default strategy "bfd": best-fit decreasing into rows of
                 max_length; TRL then forces padding_free=True: each micro-batch is flattened into one row of
                 micro x max_length tokens with position_ids restarting per example and no attention mask)
  raysft-nopack  raysft.train, data.packing=false: one example per row, micro-batches padded to their longest row
  raysft-pack    raysft.train, data.packing=true (best-fit decreasing, position_ids restart per example)

raysft runs through its public API (`raysft.parse_config` + `raysft.train`) on a private local Ray
(`ray.init(address="local")`), scaling.num_workers=1 with resources_per_worker {CPU: --threads}; Ray sets the
worker's OMP threads from that. TRL runs in its own process with torch.set_num_threads(--threads).

Each variant runs in a fresh child process, so peak RSS is per variant. Peak RSS is sampled (psutil, every
0.25 s) over the child's whole process tree: for raysft that includes the Ray processes the child starts (GCS,
raylet, the Train controller and the RayTrainWorker); the train worker's own peak is shown separately.

Step time: TRL, time between successive `on_step_end` callbacks (the first from `on_train_begin`); raysft,
the step's non-pad tokens / its tokens_per_s in metrics.jsonl (both cover data loading, forward, backward,
optimizer and logging of one optimizer step). The first --skip steps are warm-up and not measured.
Token counts: TRL, counted in a wrapper around its data collator (trained = labels[:, 1:] != -100, non-pad =
attention_mask sum, or every token when padding-free); raysft, from metrics.jsonl, padding rebuilt from the
packed rows and the loop's row order (see _common.raysft_step_stats).

Smoke run (a few minutes on 2 cores; numbers mean nothing on a busy machine):
    python benchmarks/throughput.py
Full run (issue 5; an estimated 2-4 h on 2 idle cores with both precisions, about 1 h with fp32 alone):
    python benchmarks/throughput.py --rows 2000 --steps 20 --skip 2 --precisions fp32 bf16 \
        --out benchmarks/results/throughput.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C

VARIANTS = ("trl-nopack", "trl-pack", "raysft-nopack", "raysft-pack")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200, help="first N GSM8K train examples (full: 2000)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per variant (full: 20)")
    p.add_argument("--skip", type=int, default=2, help="warm-up steps not measured")
    p.add_argument("--micro", type=int, default=4, help="micro-batch size (rows)")
    p.add_argument("--accum", type=int, default=2, help="gradient accumulation steps")
    p.add_argument("--max-len", type=int, default=512, help="max sequence length (and packed row length)")
    p.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                   help="bf16 = float32 weights + bf16 autocast, as in the issue (full: fp32 bf16)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--threads", type=int, default=2, help="CPU threads for training and for the matmul bound")
    p.add_argument("--matmul-sizes", type=int, nargs="+", default=[1024, 2048], help="fp32 matmul sizes n")
    p.add_argument("--bf16-matmul-sizes", type=int, nargs="+", default=[512, 1024],
                   help="bf16 matmul sizes (without bf16 matrix units one 2048^3 bf16 matmul takes about a minute)")
    p.add_argument("--matmul-seconds", type=float, default=2.0, help="time per size and dtype")
    C.add_run_arguments(p, "throughput")
    p.add_argument("--model-dir", default=None, help="default: raysft.quickstart.smollm2_dir()")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ children


def child_trl(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"])
    import peft
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    with open(spec["data"]) as handle:
        rows = [json.loads(line) for line, _ in zip(handle, range(spec["rows"]))]
    dataset = Dataset.from_list([
        {"prompt": [{"role": "user", "content": r["question"]}],
         "completion": [{"role": "assistant", "content": r["answer"]}]} for r in rows
    ])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    args = SFTConfig(
        output_dir=spec["output_dir"], max_steps=spec["steps"], per_device_train_batch_size=spec["micro"],
        gradient_accumulation_steps=spec["accum"], learning_rate=2e-4, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", seed=0,
        bf16=spec["precision"] == "bf16", fp16=False, use_cpu=True,
        gradient_checkpointing=False,  # TRL's default is True; raysft's is False: compare like with like
        max_length=spec["max_len"], packing=spec["packing"], completion_only_loss=True,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
    )
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    t0 = time.perf_counter()
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    prep_s = time.perf_counter() - t0

    micro_stats: list[dict[str, int]] = []
    collator = trainer.data_collator

    def counting_collator(examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collator(examples)
        ids, labels = batch["input_ids"], batch["labels"]
        real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(ids.numel())
        micro_stats.append({"real": real, "slots": int(ids.numel()), "trained": int((labels[:, 1:] != -100).sum())})
        return batch

    trainer.data_collator = counting_collator
    step_ends: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            step_ends.append(time.perf_counter())

        def on_step_end(self, *a: Any, **k: Any) -> None:
            step_ends.append(time.perf_counter())

        def on_log(self, _args: Any, _state: Any, _control: Any, logs: dict[str, float] | None = None, **k: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    trainer.add_callback(Clock())
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0

    # Micro-batches are consumed in collate order; the dataloader may run ahead by one, so slice by position.
    accum, steps = spec["accum"], []
    for k in range(len(step_ends) - 1):
        chunk = micro_stats[k * accum : (k + 1) * accum]
        steps.append({"step": k + 1, "step_s": step_ends[k + 1] - step_ends[k],
                      "real_tokens": sum(c["real"] for c in chunk), "slots": sum(c["slots"] for c in chunk),
                      "trained_tokens": sum(c["trained"] for c in chunk),
                      "loss": losses[k] if k < len(losses) else None})
    lengths = [len(x) for x in trainer.train_dataset["input_ids"]]
    example_lengths = ([n for x in trainer.train_dataset["seq_lengths"] for n in x]
                       if "seq_lengths" in trainer.train_dataset.column_names else lengths)
    return {"steps": steps, "prep_s": prep_s, "train_s": train_s, "example_lengths": example_lengths,
            "examples": len(example_lengths), "rows_after_prep": len(lengths),
            "padding_free": bool(trainer.padding_free), "torch_threads": torch.get_num_threads()}


def child_raysft(spec: dict[str, Any]) -> dict[str, Any]:
    return C.run_raysft_gsm8k(
        spec, packing=spec["packing"], num_workers=1, cpus_per_worker=spec["threads"], ray_cpus=spec["threads"]
    )


def child_matmul(spec: dict[str, Any]) -> dict[str, Any]:
    return {"fp32": C.matmul_flops("fp32", tuple(spec["sizes"]), spec["threads"], spec["seconds"]),
            "bf16": C.matmul_flops("bf16", tuple(spec["bf16_sizes"]), spec["threads"], spec["seconds"])}


# ------------------------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child_spec:
        C.child_main(args, {"trl": child_trl, "raysft": child_raysft, "matmul": child_matmul})
        return
    from raysft.quickstart import smollm2_dir

    model_dir = args.model_dir or str(smollm2_dir())
    data = args.data_dir / "gsm8k" / "train.jsonl"
    if not data.exists():
        sys.exit(f"GSM8K not found at {data}; pass --data-dir")
    info = C.machine_info()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = args.resume_workdir or args.workdir / stamp
    script = str(Path(__file__).resolve())
    print(f"throughput benchmark -> {workdir}\nmachine: {json.dumps(info)}", flush=True)

    matmul = C.run_child(script, {"kind": "matmul", "sizes": args.matmul_sizes, "bf16_sizes": args.bf16_matmul_sizes,
                                  "threads": args.threads,
                                  "seconds": args.matmul_seconds}, workdir, "matmul",
                         reuse=bool(args.resume_workdir))
    shape = C.ModelShape.from_dir(model_dir)
    results: dict[str, dict[str, Any]] = {}
    for precision in args.precisions:
        for variant in args.variants:
            label = f"{variant}-{precision}"
            spec = {"kind": variant.split("-")[0], "model_dir": model_dir, "data": str(data),
                    "data_dir": str(args.data_dir), "rows": args.rows, "steps": args.steps, "micro": args.micro,
                    "accum": args.accum, "max_len": args.max_len, "precision": precision,
                    "packing": variant.endswith("-pack"), "threads": args.threads,
                    "output_dir": str(workdir / label), "cache_dir": str(workdir / "tokenized-cache")}
            raw = C.run_child(script, spec, workdir, label, reuse=bool(args.resume_workdir))
            summary = C.summarize(raw["steps"], args.skip)
            measured = raw["steps"][args.skip:] or raw["steps"]
            # FLOPs of the measured steps: attention pairs scale with the step's tokens (mean pairs per token).
            pairs_per_token = C.causal_pairs(raw["example_lengths"]) / sum(raw["example_lengths"])
            tokens = sum(s["real_tokens"] for s in measured)
            trained = sum(s["trained_tokens"] for s in measured)
            flops = C.lora_training_flops(shape, 16, tokens, trained, pairs_per_token * tokens)
            time_s = sum(s["step_s"] for s in measured)
            summary["achieved_flops"] = flops["total"] / time_s
            summary["flops_breakdown_per_token"] = {k: v / tokens for k, v in flops.items()}
            summary["fraction_of_matmul"] = summary["achieved_flops"] / matmul[precision]["best_flops"]
            results[label] = {"variant": variant, "precision": precision, **summary, "raw": raw}

    markdown = report(args, info, matmul, results)
    print("\n" + markdown, flush=True)
    C.write_outputs(args.out, {"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                               "matmul": matmul, "results": results}, markdown)


def memory_by_role(results: dict[str, Any]) -> list[str]:
    """Peak RSS of each process role of the raysft runs, against TRL's single process with the same packing."""
    rows = []
    for r in results.values():
        if not r["variant"].startswith("raysft"):
            continue
        raw = r["raw"]
        by_kind = raw.get("peak_rss_by_process_kind_mib") or {}
        controller = max((v for k, v in by_kind.items() if "TrainController" in k), default=None)
        other = sum(v for k, v in by_kind.items() if k != "root" and "RayTrainWorker" not in k and "TrainController" not in k)
        trl = results.get(f"trl-{r['variant'].split('-', 1)[1]}-{r['precision']}")
        trl_peak = trl["raw"]["peak_rss_tree_mib"] if trl else None
        worker = raw["peak_rss_train_worker_mib"]
        rows.append([r["variant"], r["precision"], raw["peak_rss_tree_mib"], raw["peak_rss_driver_mib"], worker,
                     controller, other, trl_peak, worker / trl_peak if trl_peak else None,
                     raw["peak_rss_tree_mib"] / trl_peak if trl_peak else None])
    if not rows:
        return []
    return ["Peak RSS by process role (MiB; sampled every 0.25 s). driver = the benchmark child that calls ray.init and "
            "raysft.train; other Ray = the sum of each other process's own peak (GCS, raylet, agents, Ray Train's and "
            "Ray Data's helper actors, idle workers), so it over-counts processes that peak at different times. TRL "
            "runs in one process; it is compared with the raysft variant of the same packing (same tokens per step).", "",
            C.markdown_table(["variant", "precision", "tree", "driver", "train worker", "Train controller",
                              "other Ray", "TRL peak (same packing)", "train worker / TRL", "tree / TRL"], rows), ""]


def report(args: argparse.Namespace, info: dict[str, Any], matmul: dict[str, Any], results: dict[str, Any]) -> str:
    headers = ["variant", "precision", "median step s", "trained tok/s", "all tok/s", "pad frac", "tok/step",
               "peak RSS tree MiB", "peak RSS trainer MiB", "achieved GFLOP/s", "of matmul", "final loss"]
    rows = []
    for r in results.values():
        raw = r["raw"]
        trainer_rss = raw["peak_rss_train_worker_mib"] if r["variant"].startswith("raysft") else raw["peak_rss_driver_mib"]
        last_loss = next((s["loss"] for s in reversed(raw["steps"]) if s.get("loss") is not None), None)
        rows.append([r["variant"], r["precision"], r["median_step_s"], r["trained_tokens_per_s"],
                     r["all_tokens_per_s"], r["pad_fraction"], r["tokens_per_step"], raw["peak_rss_tree_mib"],
                     trainer_rss, r["achieved_flops"] / 1e9, r["fraction_of_matmul"], last_loss])
    parts = [
        f"## Throughput (benchmark 1) and bound (benchmark 2)\n\nrows={args.rows} steps={args.steps} "
        f"(first {args.skip} not measured) micro={args.micro} accum={args.accum} max_len={args.max_len} "
        f"threads={args.threads}\n",
        C.machine_markdown(info), "",
        C.markdown_table(headers, rows), "",
    ]
    parts += memory_by_role(results)
    ratio_rows = []
    for precision in args.precisions:
        trl = [r for r in results.values() if r["precision"] == precision and r["variant"].startswith("trl")]
        ours = [r for r in results.values() if r["precision"] == precision and r["variant"].startswith("raysft")]
        if not trl or not ours:
            continue
        best_trl = max(trl, key=lambda r: r["trained_tokens_per_s"])
        for r in ours:
            ratio_rows.append([r["variant"], precision, best_trl["variant"],
                               r["trained_tokens_per_s"] / best_trl["trained_tokens_per_s"],
                               r["all_tokens_per_s"] / best_trl["all_tokens_per_s"],
                               best_trl["median_step_s"] and r["median_step_s"] / best_trl["median_step_s"]])
    if ratio_rows:
        parts += ["Ratios, raysft / TRL best (best = highest trained tokens/s at that precision; target >= 4x):", "",
                  C.markdown_table(["raysft variant", "precision", "TRL best", "trained tok/s ratio",
                                    "all tok/s ratio", "median step time ratio"], ratio_rows), ""]
    mm_rows = [[p, m["best_flops"] / 1e9, ", ".join(f"{n}: {v / 1e9:.1f}" for n, v in m["per_size"].items()), m["threads"]]
               for p, m in matmul.items() if p in ("fp32", "bf16")]
    parts += ["Machine bound: torch.matmul of n x n matrices (best over sizes):", "",
              C.markdown_table(["dtype", "best GFLOP/s", "per size GFLOP/s", "threads"], mm_rows), "",
              "Achieved FLOP/s counts the necessary matmul FLOPs of LoRA training (see "
              "_common.lora_training_flops: base forward + activation-gradient backward, LoRA forward/backward/"
              "weight-gradients, causal attention within each example, LM head on trained positions) over the "
              "measured steps' time; 'of matmul' divides by the matmul rate of the run's precision (target >= 0.6).",
              ""]
    return "\n".join(parts)


if __name__ == "__main__":
    main()
