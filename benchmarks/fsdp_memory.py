"""Per-worker training-state bytes under DDP and FSDP2 (issue: models larger than one GPU).

    python benchmarks/fsdp_memory.py --out benchmarks/results/fsdp_memory.md [--model DIR] [--workers 1 2 4]

For each strategy and worker count, N processes (gloo on this CPU, the same code a GPU run takes with NCCL)
build the model through raysft's own code (`load_model`, `apply_lora`, `TokenLoss`, `raysft.training.fsdp.shard`,
`build_optimizer`), run two optimizer steps with `train_step`, and count, on every rank, the bytes of the tensors
that rank holds: parameters, gradients (measured between backward and the optimizer step) and optimizer state.
Sharded tensors count only their local shard. Full fine-tuning of SmolLM2-135M in fp32 (540 MB of weights) by
default, so the counts are those of a model of a few hundred MB; FSDP's should be close to DDP's / N.

No Ray is started: the workers are plain processes (torch.multiprocessing) joined by a gloo process group,
which is what Ray Train sets up for each worker.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import _common as C  # benchmarks/ is on sys.path when this runs as a script
from raysft.config import parse_config
from raysft.labels import count_trained
from raysft.data.packing import collate
from raysft.model import TokenLoss, apply_lora, load_model
from raysft.training.fsdp import local_tensor, shard
from raysft.training.optim import build_optimizer
from raysft.training.step import train_step


def _bytes(tensors: list[torch.Tensor]) -> int:
    return sum(local_tensor(t).numel() * local_tensor(t).element_size() for t in tensors)


def _worker(rank: int, world: int, spec: dict[str, Any], port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = parse_config(spec["config"])
    model = apply_lora(load_model(cfg.model, torch.device("cpu")), cfg.lora, cfg.train.seed)
    loss_module = TokenLoss(model)
    forward: torch.nn.Module = loss_module
    if spec["strategy"] == "fsdp" and world > 1:
        shard(loss_module, cfg)
    elif world > 1:
        forward = torch.nn.parallel.DistributedDataParallel(loss_module)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, cfg.train)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    generator = torch.Generator().manual_seed(rank)
    gradient_bytes = 0

    def keep_gradient_bytes(_optimizer: Any, *_: Any) -> None:  # between backward and step: grads are full
        nonlocal gradient_bytes
        gradient_bytes = _bytes([p.grad for p in params if p.grad is not None])

    optimizer.register_step_pre_hook(keep_gradient_bytes)
    for _ in range(2):
        ids = torch.randint(3, 1000, (1, spec["seq_len"]), generator=generator).tolist()[0]
        row = {"input_ids": ids, "labels": ids, "position_ids": list(range(len(ids)))}
        batch = collate([row], pad_token_id=0)
        train_step(forward, [batch], count_trained(row["labels"], row["position_ids"]) * world, optimizer, scaler,
                   params, "fp32", 1.0, world)
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    result = {"rank": rank, "parameters": _bytes(list(model.parameters())), "trainable": _bytes(params),
              "gradients": gradient_bytes, "optimizer": _bytes(state)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(spec: dict[str, Any], world: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(world, spec, _free_port(), out), nprocs=world, join=True)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(Path("~/.cache/raysft/models/SmolLM2-135M-Instruct").expanduser()))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--lora", action="store_true", help="LoRA r16 instead of full fine-tuning")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not Path(args.model, "config.json").exists():
        sys.exit(f"no model folder at {args.model}; run `python -m raysft quickstart` once to build SmolLM2-135M there")
    config = {"model": {"name_or_path": args.model}, "data": {"train": {"rows": [{"prompt": "a", "response": "b"}]}},
              "lora": {"enabled": args.lora, "r": 16, "dropout": 0.0}, "train": {"lr": 1e-5}}
    info = C.machine_info()
    rows, payload = [], {"machine": info, "runs": {}}
    baseline: dict[str, float] = {}
    for strategy in ("ddp", "fsdp"):
        for world in args.workers:
            if strategy == "fsdp" and world == 1:
                continue  # one FSDP worker shards nothing: it is the DDP row
            ranks = measure({"config": config, "strategy": strategy, "seq_len": args.seq_len}, world)
            payload["runs"][f"{strategy}-{world}"] = ranks
            worst = {k: max(r[k] for r in ranks) for k in ("parameters", "gradients", "optimizer")}
            total = sum(worst.values())
            if world == 1:
                baseline = {**worst, "total": total}
            rows.append([strategy, world, worst["parameters"] / 2**20, worst["gradients"] / 2**20,
                         worst["optimizer"] / 2**20, total / 2**20, total / baseline["total"], 1 / world])
            print(rows[-1], flush=True)
    markdown = "\n".join([
        f"## Per-worker training state, DDP vs FSDP2 ({'LoRA r16' if args.lora else 'full fine-tune'}, "
        f"{Path(args.model).name}, fp32, gloo on CPU)", "",
        "Command: `python benchmarks/fsdp_memory.py " + " ".join(sys.argv[1:]) + "`", "",
        C.machine_markdown(info), "",
        "Bytes each worker holds (the largest rank), counted from the tensors themselves; sharded tensors count "
        "their local shard. Gradients are counted between backward and the optimizer step.", "",
        C.markdown_table(["strategy", "workers", "parameters MiB", "gradients MiB", "optimizer MiB", "total MiB",
                          "total / 1 worker", "1 / N"], rows)])
    print(markdown)
    C.write_outputs(args.out, payload, markdown)


if __name__ == "__main__":
    main()
