"""Benchmark 3 of issue 5: the data path.

Part A, tokenize + pack throughput. For GSM8K train and Code Alpaca (2k), each in a fresh child process:

  raysft     raysft.data.pipeline: read_splits (read + normalize, driver) -> tokenize_splits (Ray Data actor
             pool, data.num_tokenize_workers=2, writes the parquet cache) -> shape_splits (length policy +
             best-fit-decreasing packing), with a fresh, empty data.cache_dir so nothing is cached.
             ray.init (a private local Ray, 2 CPUs) is timed separately and not counted.
  datasets   datasets.load_dataset("json") -> Dataset.map(batched=True, num_proc=2) running raysft's own
             normalize_row + tokenize_example (same chat template, same masks) -> TRL's pack_dataset
             (strategy "bfd", best-fit decreasing). Fresh datasets cache dir, so nothing is cached.

tokens/s = tokens produced by tokenization (before packing) / seconds of read + tokenize + pack. The token totals
of both paths are printed side by side; they must be equal (same semantics).

Part B, how long the training loop waits for data. raysft's loop (raysft/training/loop.py) holds every packed
row in worker memory and builds each micro-batch with `Rows.batch` (-> raysft.data.packing.collate), on the
training thread, with no prefetch. So the "wait" is the time of that host-side batch building. This is
measured in a standalone harness that mimics the loop on the real packed GSM8K rows (not inside a Ray worker):
per optimizer step it does what the loop does for data (trained_tokens, Rows.batch per micro-batch, .to(device),
real_tokens) and then the same forward/backward/optimizer step (TokenLoss, LoRA r=16, AdamW); both parts are
timed. The one-off pull of the packed Ray Dataset into memory (what `read_rows` does through
`iter_batches`) is timed too and reported separately (it happens once per run, before step 1).

Smoke run:
    python benchmarks/data_path.py
Full run:
    python benchmarks/data_path.py --limit 0 --loop-steps 10 --out benchmarks/results/data_path.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C

DATASETS = ("gsm8k", "code_alpaca")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=500, help="rows per dataset; 0 = all (full: 0)")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--num-proc", type=int, default=2, help="datasets.map processes and Ray Data tokenize actors")
    p.add_argument("--loop-steps", type=int, default=3, help="harness steps with the model (full: 10)")
    p.add_argument("--loop-skip", type=int, default=1, help="warm-up harness steps not measured")
    p.add_argument("--data-only-steps", type=int, default=200, help="harness steps of batch building alone")
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=2)
    C.add_run_arguments(p, "data_path")
    p.add_argument("--model-dir", default=None, help="default: raysft.quickstart.smollm2_dir()")
    return p.parse_args(argv)


def source(name: str, data_dir: Path, limit: int) -> dict[str, Any]:
    if name == "gsm8k":
        src = C.gsm8k_source(data_dir, limit or None)  # type: ignore[arg-type]
    else:
        src = {"path": str(data_dir / "code_alpaca" / "code_alpaca_2k.json"), "format": "alpaca",
               "limit": limit or None}
    src["invalid_rows"] = "skip"
    return src


def _config(spec: dict[str, Any], cache_dir: Path) -> Any:
    import raysft

    raw = C.raysft_config(model_dir=spec["model_dir"], train_source=spec["source"], output_dir=Path(spec["workdir"]) / "unused",
                          cache_dir=cache_dir, max_seq_len=spec["max_len"], packing=True, micro=spec["micro"],
                          accum=spec["accum"], steps=1, precision=spec["precision"], num_workers=1, cpus_per_worker=None)
    raw["data"]["num_tokenize_workers"] = spec["num_proc"]
    return raysft.parse_config(raw)


# ------------------------------------------------------------------------------------------ children


def child_raysft(spec: dict[str, Any]) -> dict[str, Any]:
    from raysft.data.labels import IGNORE_INDEX
    from raysft.data.pipeline import read_splits, shape_splits, tokenize_splits
    from raysft.model import load_tokenizer

    ray_init_s = C.start_local_ray(spec["num_proc"])
    cache_dir = Path(tempfile.mkdtemp(prefix="raysft-bench-cache-"))
    try:
        cfg = _config(spec, cache_dir)
        tokenizer = load_tokenizer(cfg.model)
        t0 = time.perf_counter()
        splits = read_splits(cfg.data, tokenizer)
        t1 = time.perf_counter()
        tokens = tokenize_splits(splits, tokenizer, cfg.data)
        t2 = time.perf_counter()
        prepared = shape_splits(tokens, cfg)
        t3 = time.perf_counter()
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    examples = tokens["train"]
    return {"ray_init_s": ray_init_s, "read_s": t1 - t0, "tokenize_s": t2 - t1, "pack_s": t3 - t2,
            "total_s": t3 - t0, "examples": len(examples),
            "tokens": sum(len(e["input_ids"]) for e in examples),
            "trained_labels": sum(int((e["labels"] != IGNORE_INDEX).sum()) for e in examples),
            "packed_rows": len(prepared.rows["train"])}


def child_datasets(spec: dict[str, Any]) -> dict[str, Any]:
    import datasets
    from trl.data_utils import pack_dataset

    from raysft.config import SourceConfig
    from raysft.data.formats import DataError, normalize_row
    from raysft.data.labels import IGNORE_INDEX
    from raysft.data.tokenize import tokenize_example
    from raysft.model import load_tokenizer

    cfg = _config(spec, Path(tempfile.gettempdir()) / "unused")
    tokenizer = load_tokenizer(cfg.model)
    src = SourceConfig.model_validate(spec["source"])
    fmt = src.format

    def tokenize(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"input_ids": [], "labels": []}
        columns = list(batch)
        for i in range(len(batch[columns[0]])):
            row = {c: batch[c][i] for c in columns}
            try:
                example = normalize_row(row, fmt, src, f"row {i}")
            except DataError:
                continue  # invalid_rows: skip, as in the raysft path
            t = tokenize_example(example, tokenizer, False)
            out["input_ids"].append(t["input_ids"])
            out["labels"].append(t["labels"])
        return out

    cache_dir = Path(tempfile.mkdtemp(prefix="datasets-bench-cache-"))
    try:
        t0 = time.perf_counter()
        ds = datasets.load_dataset("json", data_files=str(src.path), split="train", cache_dir=str(cache_dir))
        if src.limit:
            ds = ds.select(range(min(src.limit, len(ds))))
        t1 = time.perf_counter()
        tokenized = ds.map(tokenize, batched=True, batch_size=256, num_proc=spec["num_proc"],
                           remove_columns=ds.column_names)
        t2 = time.perf_counter()
        packed = pack_dataset(tokenized, spec["max_len"], strategy="bfd")
        t3 = time.perf_counter()
        ids = tokenized["input_ids"]
        labels = tokenized["labels"]
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return {"read_s": t1 - t0, "tokenize_s": t2 - t1, "pack_s": t3 - t2, "total_s": t3 - t0,
            "examples": len(ids), "tokens": sum(len(x) for x in ids),
            "trained_labels": sum(sum(1 for v in x if v != IGNORE_INDEX) for x in labels), "packed_rows": len(packed)}


def child_loop(spec: dict[str, Any]) -> dict[str, Any]:
    """The loop's data work vs its step, on the real packed GSM8K rows (see the module docstring)."""
    import numpy as np
    import torch

    torch.set_num_threads(spec["threads"])
    import raysft
    from raysft.model import TokenLoss, apply_lora, load_model
    from raysft.training.loop import Rows
    from raysft.training.step import BatchSchedule, autocast
    from raysft.training.optim import build_optimizer

    ray_init_s = C.start_local_ray(spec["threads"])
    cfg = _config(spec, Path(spec["cache_dir"]))
    tokenizer, prepared = raysft.prepare_data(cfg)
    pad_id = tokenizer.pad_token_id

    # The one-off pull into memory, as read_rows does it (iter_batches of 4096 rows, numpy, then int64 arrays).
    dataset = prepared.ray_datasets()["train"]
    t0 = time.perf_counter()
    columns: dict[str, list[Any]] = {"row_id": [], "input_ids": [], "labels": [], "position_ids": []}
    for batch in dataset.iter_batches(batch_size=4096, batch_format="numpy"):
        for key in columns:
            columns[key].extend(batch[key])
    order = np.argsort(np.asarray(columns["row_id"]), kind="stable")
    rows = Rows(*[[np.asarray(columns[k][i], dtype=np.int64) for i in order] for k in ("input_ids", "labels", "position_ids")])
    read_rows_s = time.perf_counter() - t0

    device = torch.device("cpu")
    schedule = BatchSchedule(len(rows), 1, cfg.train.micro_batch_size, cfg.train.grad_accum_steps, cfg.train.seed)

    def step_batches(step: int) -> tuple[list[dict[str, torch.Tensor]], int, float]:
        t = time.perf_counter()
        step_rows = schedule.step_rows(step)
        trained = rows.trained_tokens(step_rows)
        batches = [{k: v.to(device) for k, v in rows.batch(micro_batch, pad_id).items()}
                   for micro_batch in schedule.micro_batches(step, rank=0)]
        rows.real_tokens(step_rows)
        return batches, trained, time.perf_counter() - t

    data_only = [step_batches(s)[2] for s in range(spec["data_only_steps"])]

    model = apply_lora(load_model(cfg.model, device), cfg.lora, cfg.train.seed)
    loss_module = TokenLoss(model).train()
    optimizer = build_optimizer(model, cfg.train)
    params = [p for p in model.parameters() if p.requires_grad]
    steps = []
    for step in range(spec["loop_steps"]):
        t = time.perf_counter()
        batches, trained, data_s = step_batches(step)
        for batch in batches:
            with autocast(cfg.train.precision, device):
                loss_sum, _ = loss_module(**batch)
            (loss_sum / max(trained, 1)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps.append({"step_s": time.perf_counter() - t, "data_s": data_s})
    return {"ray_init_s": ray_init_s, "read_rows_s": read_rows_s, "packed_rows": len(rows),
            "data_only_step_s": data_only, "steps": steps}


# ------------------------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child_spec:
        C.child_main(args, {"raysft": child_raysft, "datasets": child_datasets, "loop": child_loop})
        return
    import statistics

    from raysft.quickstart import smollm2_dir

    model_dir = args.model_dir or str(smollm2_dir())
    info = C.machine_info()
    workdir = args.resume_workdir or args.workdir / time.strftime("%Y%m%d-%H%M%S")
    script = str(Path(__file__).resolve())
    base = {"model_dir": model_dir, "max_len": args.max_len, "num_proc": args.num_proc, "micro": args.micro,
            "accum": args.accum, "precision": args.precision, "threads": args.threads, "workdir": str(workdir)}
    print(f"data path benchmark -> {workdir}\nmachine: {json.dumps(info)}", flush=True)

    part_a: dict[str, dict[str, Any]] = {}
    for name in args.datasets:
        src = source(name, args.data_dir, args.limit)
        for kind in ("raysft", "datasets"):
            part_a[f"{name}/{kind}"] = C.run_child(script, {**base, "kind": kind, "source": src}, workdir, f"{name}-{kind}",
                                              reuse=bool(args.resume_workdir))
    loop = C.run_child(script, {**base, "kind": "loop", "source": source("gsm8k", args.data_dir, args.limit),
                                "cache_dir": str(workdir / "loop-cache"), "loop_steps": args.loop_steps,
                                "data_only_steps": args.data_only_steps}, workdir, "loop",
                           reuse=bool(args.resume_workdir))

    rows_a, ratio_rows = [], []
    for key, r in part_a.items():
        rows_a.append([key, r["examples"], r["tokens"], r["trained_labels"], r["read_s"], r["tokenize_s"], r["pack_s"],
                       r["total_s"], r["tokens"] / r["total_s"], r.get("ray_init_s"), r["peak_rss_tree_mib"]])
    for name in args.datasets:
        ours, peer = part_a[f"{name}/raysft"], part_a[f"{name}/datasets"]
        ratio_rows.append([name, ours["tokens"] / ours["total_s"], peer["tokens"] / peer["total_s"],
                           (ours["tokens"] / ours["total_s"]) / (peer["tokens"] / peer["total_s"]),
                           "yes" if ours["tokens"] == peer["tokens"] and ours["trained_labels"] == peer["trained_labels"]
                           else f"NO ({ours['tokens']} vs {peer['tokens']})"])
    measured = loop["steps"][args.loop_skip:] or loop["steps"]
    step_s = statistics.median(s["step_s"] for s in measured)
    data_in_loop = statistics.median(s["data_s"] for s in measured)
    data_only = statistics.median(loop["data_only_step_s"])
    loop_rows = [[len(measured), step_s, data_in_loop, data_in_loop / step_s, data_only, data_only / step_s,
                  loop["read_rows_s"], loop["packed_rows"]]]
    markdown = "\n".join([
        f"## Data path (benchmark 3)\n\nlimit={args.limit or 'all'} max_len={args.max_len} num_proc={args.num_proc}\n",
        C.machine_markdown(info), "",
        "Tokenize + pack (tokens/s = tokenized tokens / (read + tokenize + pack) s; ray.init not counted):", "",
        C.markdown_table(["dataset/path", "examples", "tokens", "trained labels", "read s", "tokenize s", "pack s",
                          "total s", "tokens/s", "ray.init s", "peak RSS tree MiB"], rows_a), "",
        C.markdown_table(["dataset", "raysft tok/s", "datasets.map tok/s", "ratio raysft/datasets", "same tokens"],
                         ratio_rows), "",
        f"Training-loop data wait (standalone harness mimicking raysft/training/loop.py on the packed GSM8K rows, "
        f"micro={args.micro} accum={args.accum} {args.precision}; not measured inside a Ray worker; target < 2%):", "",
        C.markdown_table(["steps", "median step s", "data s/step (in loop)", "wait fraction",
                          "data s/step (data only)", "wait fraction (data only)", "one-off read_rows s",
                          "packed rows"], loop_rows), "",
    ])
    print("\n" + markdown, flush=True)
    C.write_outputs(args.out, {"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                               "tokenize_pack": part_a, "loop": loop}, markdown)


if __name__ == "__main__":
    main()
