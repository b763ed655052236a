"""Data at scale (issues 10, 27): raysft's Ray Data pipeline against datasets.map(num_proc=2) + TRL's pack_dataset.

Synthetic prompt/response JSONL with realistic lengths (100-600 SmolLM2 tokens per row, uniform) at each --sizes
row count; SmolLM2's tokenizer with a tiny random Llama (tests/tiny.py shape) so compute is negligible. Per size,
each in a fresh child process (peak RSS per process role sampled by the parent):

  cold-1w   `raysft.prepare_data` from an empty data.cache_dir: read + tokenize + pack on Ray Data; then (unless
            --no-train) `raysft.train` with 1 worker to the first optimizer step.
  warm-1w   (--warm) the same, cache warm: time from `raysft.train` start to the first optimizer step.
  warm-2w   (--warm) warm, 2 workers (each peak RSS).
  peer      datasets.load_dataset("json") + Dataset.map(batched=True, num_proc=2) tokenizing as TRL's SFTTrainer
            does prompt/completion rows (the prompt with the generation prompt and prompt + completion rendered by
            apply_chat_template, then each list in one batched fast-tokenizer call; the completion mask from their
            common prefix), + TRL pack_dataset(strategy="bfd"); wall time, tokens/s.

--parts long: tool-calling conversations with reasoning (tests/data/conversations.py, 40-200 messages):
  per-turn cost of the masks in one process, raysft's one rendering against the prefix method and transformers'
  `return_assistant_tokens_mask` (raysft's ChatML with {% generation %} markers: the same masks); and
  --long-rows such rows through raysft.prepare_data against the peer (datasets.map(batched=True, num_proc=2) with
  apply_chat_template(tokenize=True, return_assistant_tokens_mask=True) + pack_dataset).

--parts window: on GSM8K train and Code Alpaca, packing efficiency of raysft's windowed best-fit decreasing
(PACK_WINDOW and smaller windows) against whole-dataset best-fit decreasing.

With --ray-lock FILE, the script holds that flock (a machine shared with other Ray jobs) from the first timed
child to the last, the peer's included (no other job's Ray runs while either side is timed), and not while it
writes the data files or times the masks in process.

Smoke run:
    python benchmarks/data_scale.py --sizes 2000
Full run:
    python benchmarks/data_scale.py --sizes 10000 100000 1000000 --parts scale long --out benchmarks/results/data_scale.json
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import random
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import _common as C

sys.path.insert(0, str(C.REPO))  # the long conversations are the tests' own
from tests.data.conversations import TOOLS, tool_conversation  # noqa: E402

WORDS = ("the model reads every token of the prompt and learns to answer with care so that each reply is "
         "short clear and right about numbers dates names places and steps of a plan").split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[2000])
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--parts", nargs="+", default=["scale", "window"], choices=["scale", "window", "long"])
    p.add_argument("--warm", action=argparse.BooleanOptionalAction, default=True,
                   help="also time warm starts to the first step (1 and 2 workers)")
    p.add_argument("--train", action=argparse.BooleanOptionalAction, default=True,
                   help="cold run: train to the first step after preparing the data")
    p.add_argument("--long-rows", type=int, default=3000, help="rows of 40-200 messages in the long part")
    p.add_argument("--ray-lock", type=Path, default=None,
                   help="hold this flock while the children (raysft and peer) are timed")
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
        "model": {"name_or_path": spec["model_dir"], "chat_template": spec.get("chat_template")},
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
    if spec.get("train", True):
        done, timing = threading.Event(), {}
        watcher = threading.Thread(target=_first_step_time, daemon=True,
                                   args=(Path(spec["output_dir"]) / "metrics.jsonl", start, done, timing))
        watcher.start()
        raysft.train(cfg)
        done.set()
        watcher.join()
        result.update(timing)
    result.update(object_store_peak_mib=store.stop() / 2**20, total_s=time.perf_counter() - start)
    result["cache_mib"] = sum(f.stat().st_size for f in Path(spec["cache_dir"]).rglob("*") if f.is_file()) / 2**20
    return result


def _masked(ids: list[int], trained: list[bool]) -> list[int]:
    return [token if keep else -100 for token, keep in zip(ids, trained)]


def run_peer(spec: dict[str, Any]) -> dict[str, Any]:
    """The single-machine peer: what a TRL user runs, batched (see the module docstring)."""
    import datasets
    import pyarrow.compute as pc
    from trl.data_utils import common_prefix_length, pack_dataset

    from raysft.config import ModelConfig
    from raysft.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=spec["model_dir"],
                                           chat_template=spec.get("generation_template") or spec.get("chat_template")))
    max_len = spec["max_len"]
    cache = Path(spec["cache_dir"])
    shutil.rmtree(cache, ignore_errors=True)
    start = time.perf_counter()
    loaded = datasets.load_dataset("json", data_files=spec["data"], split="train", cache_dir=str(cache))

    def prompt_completion(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        prompts = [[{"role": "user", "content": prompt}] for prompt in batch["prompt"]]
        whole = [prompt + [{"role": "assistant", "content": answer}] for prompt, answer in zip(prompts, batch["response"])]
        prompt_ids = tokenizer(tokenizer.apply_chat_template(prompts, tokenize=False, add_generation_prompt=True),
                               add_special_tokens=False)["input_ids"]
        whole_ids = tokenizer(tokenizer.apply_chat_template(whole, tokenize=False), add_special_tokens=False)["input_ids"]
        out: dict[str, list[Any]] = {"input_ids": [], "labels": []}
        for prompt, ids in zip(prompt_ids, whole_ids):
            prompt_len = common_prefix_length(prompt, ids)
            out["input_ids"].append(ids[:max_len])
            out["labels"].append(([-100] * prompt_len + ids[prompt_len:])[:max_len])
        return out

    def conversations(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        # Every row has the same tools (TOOLS), so one call renders the whole batch.
        encoded = tokenizer.apply_chat_template(batch["messages"], tools=batch["tools"][0], tokenize=True,
                                                return_dict=True, return_assistant_tokens_mask=True)
        return {"input_ids": [ids[:max_len] for ids in encoded["input_ids"]],
                "labels": [_masked(ids, mask)[:max_len] for ids, mask in zip(encoded["input_ids"],
                                                                             encoded["assistant_masks"])]}

    tokenize = conversations if spec.get("generation_template") else prompt_completion
    tokenized = loaded.map(tokenize, batched=True, num_proc=2, remove_columns=loaded.column_names)
    packed = pack_dataset(tokenized, max_len, strategy="bfd")
    total_s = time.perf_counter() - start
    # Counted from the Arrow column after timing: a Python list of every token would not fit at 1M rows.
    tokens = pc.sum(pc.list_value_length(tokenized.data.table.column("input_ids"))).as_py()
    return {"total_s": total_s, "tokens": tokens, "packed_rows": len(packed)}


GENERATION_HEADER = r"{{- '<|im_start|>' + message['role'] + '\n' -}}"
GENERATION_END = r"{{- '<|im_end|>\n' -}}"


def generation_template() -> str:
    """raysft's ChatML with {% generation %} around each assistant turn's body and end-of-turn token: the turns
    raysft trains, marked for transformers' `return_assistant_tokens_mask`."""
    from raysft.tokenizer import CHATML_TEMPLATE

    head, rest = CHATML_TEMPLATE.split(GENERATION_HEADER)
    body, tail = rest.split(GENERATION_END)
    return (head + GENERATION_HEADER + "{%- if message['role'] == 'assistant' -%}{%- generation -%}" + body
            + r"{{- '<|im_end|>' -}}{%- endgeneration -%}{{- '\n' -}}{%- else -%}" + body + GENERATION_END
            + "{%- endif -%}" + tail)


def long_jsonl(path: Path, rows: int) -> None:
    """Tool-calling conversations of 40-200 messages (uniform), one per line."""
    if path.exists():
        return
    rng = random.Random(1)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as handle:
        for index in range(rows):
            handle.write(json.dumps(tool_conversation(rng.randint(40, 200), seed=index)) + "\n")
    tmp.rename(path)


def mask_cost_per_turn(model_dir: str, lengths: tuple[int, ...] = (4, 16, 40, 80, 200), rows: int = 5,
                       ) -> list[list[Any]]:
    """Per-turn time of the masks on one core, in process: raysft's one rendering (assistant_spans), the prefix
    method it replaces (prefix_assistant_spans), and each tokenized (raysft's tokenize_example against transformers'
    apply_chat_template(tokenize=True, return_assistant_tokens_mask=True) on the same masks)."""
    from raysft.config import ModelConfig, SourceConfig
    from raysft.data.sources import load_examples
    from raysft.data.tokenize import assistant_spans, prefix_assistant_spans, tokenize_example
    from raysft.tokenizer import CHATML_TEMPLATE, load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=model_dir, chat_template=CHATML_TEMPLATE))
    marked = load_tokenizer(ModelConfig(name_or_path=model_dir, chat_template=generation_template()))
    table = []
    for length in lengths:
        examples = load_examples([SourceConfig(rows=[tool_conversation(length, seed) for seed in range(rows)])])
        messages = sum(len(example["messages"]) for example in examples)
        for example in examples:  # the generation template's masks are raysft's
            ours = tokenize_example(example, tokenizer, False)
            theirs = marked.apply_chat_template(example["messages"], tools=example["tools"], tokenize=True,
                                                return_dict=True, return_assistant_tokens_mask=True)
            assert ours["input_ids"] == theirs["input_ids"], "the peer's template renders differently"
            assert ours["labels"] == _masked(theirs["input_ids"], theirs["assistant_masks"]), "masks differ"

        def per_turn(run: Any) -> float:
            times = []
            for _ in range(3):
                started = time.perf_counter()
                for example in examples:
                    run(example)
                times.append(time.perf_counter() - started)
            return min(times) / messages * 1000

        table.append([length, round(messages / rows, 1),
                      per_turn(lambda e: prefix_assistant_spans(e["messages"], tokenizer, e["origin"], e["tools"])),
                      per_turn(lambda e: assistant_spans(e["messages"], tokenizer, e["origin"], e["tools"])),
                      per_turn(lambda e: tokenize_example(e, tokenizer, False)),
                      per_turn(lambda e: marked.apply_chat_template(e["messages"], tools=e["tools"], tokenize=True,
                                                                    return_dict=True, return_assistant_tokens_mask=True))])
    for row in table:
        row += [round(row[3] / table[0][3], 2)]
        row[2:6] = [round(value, 4) for value in row[2:6]]
    return table


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


@contextlib.contextmanager
def ray_lock(path: Path | None) -> Any:
    """Hold the machine's Ray lock (flock on `path`) while the block runs; nothing without a path."""
    if path is None:
        yield
        return
    with path.open("a") as handle:
        print(f"--- waiting for {path}", flush=True)
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def data_worker_peak(result: dict[str, Any]) -> float:
    """The largest RSS of a Ray worker that is not a training worker (read, tokenize and pack tasks and actors)."""
    kinds = result.get("peak_rss_by_process_kind_mib", {})
    return max((mib for kind, mib in kinds.items() if kind.startswith("ray::") and "Train" not in kind), default=0.0)


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
    reuse = bool(args.resume_workdir)
    results: dict[str, Any] = {"machine": info, "sizes": {}, "argv": sys.argv[1:]}
    md = [f"## Data at scale (issues 10, 27)\n\n{C.machine_markdown(info)}\n"]

    def raysft_child(spec: dict[str, Any], label: str) -> dict[str, Any]:
        load = os.getloadavg()
        result = C.run_child(script, {**spec, "kind": "raysft"}, workdir, label, reuse=reuse)
        result.setdefault("load_avg_at_start", load)
        return result

    def peer_child(spec: dict[str, Any], label: str) -> dict[str, Any]:
        load = os.getloadavg()
        result = C.run_child(script, {**spec, "kind": "peer"}, workdir, label, reuse=reuse)
        result.setdefault("load_avg_at_start", load)
        return result

    if "long" in args.parts:
        rows = mask_cost_per_turn(model_dir)
        results["mask_cost_per_turn"] = rows
        md.append("Masks on tool-calling conversations with reasoning, one core, in process (ms per message; the "
                  "generation template's masks checked equal to raysft's on every row):\n")
        md.append(C.markdown_table(
            ["messages asked", "messages (mean)", "prefix method (reference) ms/msg", "one rendering ms/msg",
             "raysft tokenize_example ms/msg", "transformers return_assistant_tokens_mask ms/msg",
             "one rendering per msg / at 4"], rows))
    for size in args.sizes if "scale" in args.parts else ():
        synthetic_jsonl(args.workdir / f"synthetic-{size}.jsonl", size)
    if "long" in args.parts:
        long_jsonl(args.workdir / f"long-{args.long_rows}.jsonl", args.long_rows)
    # The peer runs under the lock as well: no other job's Ray on the machine while either side is timed.
    held = contextlib.ExitStack()
    held.enter_context(ray_lock(args.ray_lock if {"long", "scale"} & set(args.parts) else None))
    if "long" in args.parts:
        data = args.workdir / f"long-{args.long_rows}.jsonl"
        from raysft.tokenizer import CHATML_TEMPLATE

        base = {"model_dir": model_dir, "data": str(data), "max_len": 16384, "chat_template": CHATML_TEMPLATE}
        ours = raysft_child({**base, "cold": True, "train": False, "workers": 1, "cache_dir": str(workdir / "cache-long"),
                             "output_dir": str(workdir / "run-long")}, "long-raysft")
        peer = peer_child({**base, "cache_dir": str(workdir / "hf-long"), "generation_template": generation_template()},
                          "long-peer")
        results["long"] = {"raysft": ours, "peer": peer}
        tokens = ours["stats"]["tokens_after_packing"]["train"]
        ours_rate, peer_rate = tokens / ours["prepare_s"], peer["tokens"] / peer["total_s"]
        md.append(f"\n{args.long_rows} rows of 40-200 messages (max_len 16384), read + tokenize + mask + pack:\n")
        md.append(C.markdown_table(
            ["rows", "tokens", "raysft s", "raysft tok/s", "peer s", "peer tok/s", "raysft/peer", "load avg (raysft, peer)"],
            [[args.long_rows, tokens, round(ours["prepare_s"], 1), round(ours_rate), round(peer["total_s"], 1),
              round(peer_rate), round(ours_rate / peer_rate, 2),
              f"{ours['load_avg_at_start'][0]:.1f}, {peer['load_avg_at_start'][0]:.1f}"]]))
    if "scale" in args.parts:
        table = []
        for size in args.sizes:
            data = args.workdir / f"synthetic-{size}.jsonl"
            base = {"model_dir": model_dir, "data": str(data), "max_len": args.max_len,
                    "cache_dir": str(workdir / f"cache-{size}")}
            variants = [("cold-1w", {"cold": True, "workers": 1, "train": args.train})]
            if args.warm:
                variants += [("warm-1w", {"cold": False, "workers": 1}), ("warm-2w", {"cold": False, "workers": 2})]
            runs = {label: raysft_child({**base, **extra, "output_dir": str(workdir / f"run-{size}-{label}")},
                                        f"{size}-{label}") for label, extra in variants}
            runs["peer"] = peer_child({**base, "cache_dir": str(workdir / f"hf-{size}")}, f"{size}-peer")
            results["sizes"][size] = runs
            cold, peer = runs["cold-1w"], runs["peer"]
            warm1, warm2 = runs.get("warm-1w", {}), runs.get("warm-2w", {})
            tokens = cold["stats"]["tokens_after_packing"]["train"]
            table.append([
                size, tokens, round(cold["prepare_s"], 1), round(tokens / cold["prepare_s"]), round(peer["total_s"], 1),
                round(peer["tokens"] / peer["total_s"]), round((tokens / cold["prepare_s"]) / (peer["tokens"] / peer["total_s"]), 2),
                round(cold["peak_rss_driver_mib"]), round(data_worker_peak(cold)),
                round(cold["peak_rss_train_worker_mib"] or 0), round(warm2.get("peak_rss_train_worker_mib") or 0),
                round(cold["object_store_peak_mib"]), round(cold["cache_mib"], 1),
                round(cold["cache_mib"] * 2**20 / tokens, 2), round(cold.get("first_step_s", float("nan")), 1),
                round(warm1.get("first_step_s", float("nan")), 1), round(warm2.get("first_step_s", float("nan")), 1),
                round(peer["peak_rss_tree_mib"]), f"{cold['load_avg_at_start'][0]:.1f}, {peer['load_avg_at_start'][0]:.1f}",
            ])
        md.append("Per size (tokens: after truncation to max_len, as trained; RSS peaks in MiB):\n")
        md.append(C.markdown_table(
            ["rows", "tokens", "raysft read+tok+pack s", "raysft tok/s", "peer s", "peer tok/s", "raysft/peer",
             "driver peak (cold)", "data worker peak (cold)", "train worker peak (cold 1w)", "train worker peak (2w, max)",
             "object store peak (cold)", "cache MiB", "cache bytes/token", "start->1st step cold s", "warm 1w s",
             "warm 2w s", "peer tree peak", "load avg (raysft, peer)"], table))
    held.close()
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
