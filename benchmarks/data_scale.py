"""Data at scale (issue 10): raysft's Ray Data pipeline and streamed workers against datasets.map + TRL packing.

Synthetic prompt/response JSONL with realistic lengths (100-600 SmolLM2 tokens per row, uniform) at each --sizes
row count; SmolLM2's tokenizer with a tiny random Llama (tests/tiny.py shape) so compute is negligible. Per size,
each in a fresh child process (peak RSS per process role sampled by the parent):

  cold-1w   `raysft.train` from an empty data.cache_dir with 1 worker: read + tokenize + pack on Ray Data (timed
            as `raysft.prepare_data` first), then training to the first optimizer step; time from start to
            the first step, object-store peak (sampled), cache size on disk.
  warm-1w   the same, cache warm: time from `raysft.train` start to the first optimizer step.
  warm-2w   warm, 2 workers (each peak RSS).
  peer      datasets.load_dataset("json") + Dataset.map(num_proc=2) running raysft's own normalize_row +
            tokenize_example (same template and masks) + TRL pack_dataset(strategy="bfd"); wall time, tokens/s.

Also, on GSM8K train and Code Alpaca: packing efficiency of raysft's windowed best-fit decreasing (PACK_WINDOW and
smaller windows) against whole-dataset best-fit decreasing.

Smoke run:
    python benchmarks/data_scale.py --sizes 2000
Full run:
    python benchmarks/data_scale.py --sizes 10000 100000 1000000 --out benchmarks/results/data_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import _common as C

WORDS = ("the model reads every token of the prompt and learns to answer with care so that each reply is "
         "short clear and right about numbers dates names places and steps of a plan").split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[2000])
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--parts", nargs="+", default=["scale", "window"], choices=["scale", "window"])
    C.add_run_arguments(p, "data_scale")
    return p.parse_args(argv)


def synthetic_jsonl(path: Path, rows: int, seed: int = 0) -> None:
    """Prompt/response rows whose rendered length is 100-600 tokens (about 1 token per word here)."""
    if path.exists():
        return
    rng = random.Random(seed)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as handle:
        for _ in range(rows):
            total = rng.randint(80, 570)  # + ~20 tokens of template
            prompt_words = rng.randint(10, max(11, total // 3))
            prompt = " ".join(rng.choice(WORDS) for _ in range(prompt_words))
            answer = " ".join(rng.choice(WORDS) for _ in range(total - prompt_words))
            handle.write(json.dumps({"prompt": prompt + "?", "response": answer + "."}) + "\n")
    tmp.rename(path)


def tiny_model(workdir: Path) -> Path:
    """SmolLM2's tokenizer and a 2-layer Llama of hidden 64 for it (random weights)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from raysft.quickstart import smollm2_dir

    path = workdir / "tiny-smollm2"
    if not (path / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def _config(spec: dict[str, Any]) -> Any:
    import raysft

    return raysft.parse_config({
        "model": {"name_or_path": spec["model_dir"]},
        "data": {"train": {"path": spec["data"]}, "max_seq_len": spec["max_len"], "cache_dir": spec["cache_dir"]},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"output_dir": spec["output_dir"], "micro_batch_size": 2, "max_steps": 2, "log_every": 1,
                  "lr": 1e-3},
        "scaling": {"num_workers": spec["workers"], "resources_per_worker": {"CPU": 2 / spec["workers"]}},
        "tracking": {"console": False, "tensorboard": False},
    })


class ObjectStorePeak(threading.Thread):
    """Samples the object store's used bytes (Ray's own accounting) every 0.5 s."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self._done = 0.0, threading.Event()

    def run(self) -> None:
        import ray

        while not self._done.is_set():
            try:
                total = ray.cluster_resources().get("object_store_memory", 0.0)
                self.peak = max(self.peak, total - ray.available_resources().get("object_store_memory", total))
            except Exception:  # noqa: BLE001 - Ray not up yet, or shutting down
                pass
            self._done.wait(0.5)

    def stop(self) -> float:
        self._done.set()
        return self.peak


def _first_step_time(metrics: Path, start: float, done: threading.Event, out: dict[str, float]) -> None:
    while not done.is_set():
        if metrics.exists() and '"step": 1,' in metrics.read_text():
            out["first_step_s"] = time.perf_counter() - start
            return
        time.sleep(0.05)


def run_raysft(spec: dict[str, Any]) -> dict[str, Any]:
    import raysft

    start = time.perf_counter()
    if spec["cold"]:
        shutil.rmtree(spec["cache_dir"], ignore_errors=True)
    shutil.rmtree(spec["output_dir"], ignore_errors=True)
    cfg = _config(spec)
    store = ObjectStorePeak()
    store.start()
    result: dict[str, Any] = {}
    if spec["cold"]:
        prepared = raysft.prepare_data(cfg)
        result["prepare_s"] = time.perf_counter() - start
        result["stats"] = prepared.stats.__dict__
    done, timing = threading.Event(), {}
    watcher = threading.Thread(target=_first_step_time, args=(Path(spec["output_dir"]) / "metrics.jsonl", start, done, timing),
                               daemon=True)
    watcher.start()
    raysft.train(cfg)
    done.set()
    watcher.join()
    result.update(timing, object_store_peak_mib=store.stop() / 2**20, total_s=time.perf_counter() - start)
    result["cache_mib"] = sum(f.stat().st_size for f in Path(spec["cache_dir"]).rglob("*") if f.is_file()) / 2**20
    return result


def run_peer(spec: dict[str, Any]) -> dict[str, Any]:
    import datasets
    import pyarrow.compute as pc
    from trl.data_utils import pack_dataset

    from raysft.config import SourceConfig
    from raysft.data.formats import normalize_row
    from raysft.data.tokenize import tokenize_example
    from raysft.tokenizer import load_tokenizer
    from raysft.config import ModelConfig

    tokenizer = load_tokenizer(ModelConfig(name_or_path=spec["model_dir"]))
    source = SourceConfig(path=spec["data"])
    cache = Path(spec["cache_dir"])
    shutil.rmtree(cache, ignore_errors=True)
    start = time.perf_counter()
    loaded = datasets.load_dataset("json", data_files=spec["data"], split="train", cache_dir=str(cache))

    def tokenize(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"input_ids": [], "labels": []}
        for i, (prompt, response) in enumerate(zip(batch["prompt"], batch["response"])):
            example = normalize_row({"prompt": prompt, "response": response}, "prompt_response", source, f"row {i}")
            tokenized = tokenize_example(example, tokenizer, False)
            length = min(len(tokenized["input_ids"]), spec["max_len"])
            out["input_ids"].append(tokenized["input_ids"][:length])
            out["labels"].append(tokenized["labels"][:length])
        return out

    tokenized = loaded.map(tokenize, batched=True, num_proc=2, remove_columns=loaded.column_names)
    packed = pack_dataset(tokenized, spec["max_len"], strategy="bfd")
    total_s = time.perf_counter() - start
    # Counted from the Arrow column after timing: a Python list of every token would not fit at 1M rows.
    tokens = pc.sum(pc.list_value_length(tokenized.data.table.column("input_ids"))).as_py()
    return {"total_s": total_s, "tokens": tokens, "packed_rows": len(packed)}


def window_efficiency(data_dir: Path, model_dir: str, max_len: int) -> list[list[Any]]:
    """Packing efficiency of best-fit decreasing within windows against the whole dataset, on real data."""
    import numpy as np

    from raysft.config import ModelConfig, SourceConfig
    from raysft.data.packing import best_fit_decreasing
    from raysft.data.pipeline import PACK_WINDOW
    from raysft.data.sources import load_examples
    from raysft.data.tokenize import tokenize_example
    from raysft.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=model_dir))
    rows = []
    for name, path in (("gsm8k", data_dir / "gsm8k" / "train.jsonl"), ("code_alpaca", data_dir / "code_alpaca" / "code_alpaca_2k.json")):
        examples = load_examples([SourceConfig(path=str(path), invalid_rows="skip")])
        lengths = [min(len(tokenize_example(e, tokenizer, False)["input_ids"]), max_len) for e in examples]
        for window in (len(lengths), PACK_WINDOW, 2048, 512):
            bins = sum(len(best_fit_decreasing(lengths[i : i + window], max_len)) for i in range(0, len(lengths), window))
            rows.append([name, len(lengths), "whole" if window == len(lengths) else window,
                         round(sum(lengths) / (bins * max_len), 4), bins])
        whole = rows[-4][3]
        for row in rows[-3:]:
            row.append(round(100 * (whole - row[3]), 3))
        rows[-4].append(0.0)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child_spec:
        C.child_main(args, {"raysft": run_raysft, "peer": run_peer})
        return
    info = C.machine_info()
    workdir = args.resume_workdir or args.workdir / time.strftime("%Y%m%d-%H%M%S")
    workdir.mkdir(parents=True, exist_ok=True)
    script = str(Path(__file__).resolve())
    model_dir = str(tiny_model(args.workdir))
    results: dict[str, Any] = {"machine": info, "sizes": {}}
    md = [f"## Data at scale (issue 10)\n\n{C.machine_markdown(info)}\n"]
    if "scale" in args.parts:
        table = []
        for size in args.sizes:
            data = args.workdir / f"synthetic-{size}.jsonl"
            synthetic_jsonl(data, size)
            base = {"model_dir": model_dir, "data": str(data), "max_len": args.max_len,
                    "cache_dir": str(workdir / f"cache-{size}")}
            runs = {}
            for label, extra in (("cold-1w", {"cold": True, "workers": 1}), ("warm-1w", {"cold": False, "workers": 1}),
                                 ("warm-2w", {"cold": False, "workers": 2})):
                spec = {**base, **extra, "kind": "raysft", "output_dir": str(workdir / f"run-{size}-{label}")}
                runs[label] = C.run_child(script, spec, workdir, f"{size}-{label}", reuse=bool(args.resume_workdir))
            runs["peer"] = C.run_child(script, {**base, "kind": "peer", "cache_dir": str(workdir / f"hf-{size}")},
                                       workdir, f"{size}-peer", reuse=bool(args.resume_workdir))
            results["sizes"][size] = runs
            cold, peer = runs["cold-1w"], runs["peer"]
            tokens = cold["stats"]["tokens_after_packing"]["train"]
            table.append([
                size, tokens, round(cold["prepare_s"], 1), round(tokens / cold["prepare_s"]), round(peer["total_s"], 1),
                round(peer["tokens"] / peer["total_s"]), round((tokens / cold["prepare_s"]) / (peer["tokens"] / peer["total_s"]), 2),
                round(cold["peak_rss_driver_mib"]), round(runs["warm-1w"]["peak_rss_train_worker_mib"] or 0),
                round(runs["warm-2w"]["peak_rss_train_worker_mib"] or 0), round(cold["object_store_peak_mib"]),
                round(cold["cache_mib"], 1), round(cold.get("first_step_s", float("nan")), 1),
                round(runs["warm-1w"].get("first_step_s", float("nan")), 1),
                round(runs["warm-2w"].get("first_step_s", float("nan")), 1), round(peer["peak_rss_tree_mib"]),
            ])
        md.append("Per size (tokens: after truncation to max_len, as trained; RSS peaks in MiB):\n")
        md.append(C.markdown_table(
            ["rows", "tokens", "raysft read+tok+pack s", "raysft tok/s", "peer s", "peer tok/s", "raysft/peer",
             "driver peak (cold)", "worker peak (1w)", "worker peak (2w, max)", "object store peak (cold)",
             "cache MiB", "start->1st step cold s", "warm 1w s", "warm 2w s", "peer tree peak"], table))
    if "window" in args.parts:
        rows = window_efficiency(args.data_dir, model_dir, args.max_len)
        results["window"] = rows
        md.append(f"\nPacking efficiency, best-fit decreasing within windows of N examples vs the whole dataset "
                  f"(max_len {args.max_len}):\n")
        md.append(C.markdown_table(["dataset", "examples", "window", "efficiency", "rows", "loss vs whole (pp)"], rows))
    C.write_outputs(args.out, results, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    main()
