"""One prepared check of the path users run, on a GPU machine: a `ray start` head, `raysft train` / `raysft sweep`
through Ray Train GPU workers, no network, one command.

    benchmarks/gpu_ray_check.sh                                          # the device call (unpacks .raydev first)
    python benchmarks/gpu_ray_check.py --out DIR                         # a CUDA machine with Ray: about 7 minutes
    python benchmarks/gpu_ray_check.py --device cpu --tiny --out DIR     # the same code on this CPU, tiny sizes

benchmarks/gpu_check.py measures raysft's model and step code in one process; this one runs the same work as a
user's run does: `ray start --head` (loopback, its own temp dir), then `python -m raysft train CONFIG` (and
`raysft sweep`) against it, with Ray Train workers on the GPU. Models are random-initialized Llama-architecture
models built from configs (gpu_check.SHAPES) with a word-level tokenizer written beside them, so every synthetic
example's token count is known exactly; the data are synthetic chat rows (one user turn, one assistant turn).

Variants (each with its own time budget; DIR/gpu_ray_check.json is rewritten after every one, so a run cut
short still leaves what it measured):

1. ``train_1.7b``: `raysft train` of the SmolLM2-1.7B shape, LoRA r16 all-linear, bf16, `train.compile`, one GPU
   worker, packed rows of 2048 tokens (8 per step where the planner fits them, else 4), `eval.generate` at the end
   (generation on the GPU). Trained tokens/s and
   MFU at steady state (compile warm-up and the last, smaller step left out), against gpu_check's in-process
   compiled step over the same examples, in the same call (``inprocess_1.7b``).
2. ``restart``: a run whose Ray Train worker is SIGKILLed once a checkpoint is stored; Ray Train restarts it
   (scaling.max_failures: 1) and every step's loss equals an uninterrupted run's (fp32, so the comparison is
   tight on the GPU too).
3. ``qlora``: the 1.7B shape quantized to 4 bits (bitsandbytes NF4) through Ray.
4. ``sweep``: `raysft sweep` of 2 small trials that share the one GPU (half a GPU each through
   scaling.gpus_per_worker), both completing, their run times overlapping.
5. ``train_8b``: the Llama-3-8B shape, LoRA r16, sequence 4096, compiled, rows per step as many as the planner
   says fit: trained tokens/s, MFU (measured matmul and spec peak) and `raysft plan`'s predicted peak memory against
   the worker's measured peak (NVML: the process's GPU memory, allocator pool + CUDA context, sampled every 0.1 s).

MFU counts the necessary FLOPs only (benchmarks/_common.py ``lora_training_flops``), as gpu_check does; it is a
fraction of the measured bf16 matmul rate (``mfu``) and of the spec sheet's dense peak (``mfu_spec``); null on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch._dynamo.utils import counters as dynamo_counters

import _common as C  # benchmarks/ is on sys.path when this runs as a script
import gpu_check as G
from raysft.labels import IGNORE_INDEX
from raysft.tokenizer import CHATML_TEMPLATE

REPO = Path(__file__).resolve().parents[1]
LORA_RANK = G.LORA_RANK
# Llama-3-8B's published shape (meta-llama/Meta-Llama-3-8B config.json): the 8B anchor (NVIDIA NeMo
# AutoModel's Llama-3-8B LoRA on one H100: 12,473 tok/s, ~41% of the H100's spec peak).
LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0, "tie_word_embeddings": False}
NEMO_8B_LORA_H100_TOKENS_PER_S = 12_473
NEMO_8B_LORA_SPEC_MFU = 0.41
SPECIALS = ["<|im_start|>", "<|im_end|>", "<pad>", "<unk>"]
ROLES = ["system", "user", "assistant"]
# Every Ray process of the check's head carries this variable (Ray passes the head's environment down to raylets
# and workers): the cleanup and the worker killer find exactly the check's processes by it, never another Ray's.
MARKER = "RAYSFT_GPU_RAY_CHECK"
# In the order they run: the targets first, so that a run cut short still measured them.
VARIANTS = ("train_1.7b", "train_8b", "restart", "sweep", "qlora")


@dataclass
class Sizes:
    """The sizes of one mode: the real shapes on CUDA, tiny ones on CPU (same code, smaller numbers)."""

    cuda: bool
    main_shape: str = "smollm2-1.7b"
    small_shape: str = "smollm2-135m"
    big_shape: str = "llama3-8b"
    seq: int = 2048
    big_seq: int = 4096
    lengths: tuple[int, int] = (100, 600)
    rows_per_step: int = 4
    main_steps: int = 24
    warmup_steps: int = 4
    restart_steps: int = 24
    restart_checkpoint: int = 6
    qlora_steps: int = 10
    sweep_steps: int = 8
    big_steps: int = 10
    words: int = 8000
    compile: bool = True
    """train.compile in the runs that measure speed (on the CPU the tests' budget has no room for compiling)."""
    budgets: dict[str, float] = field(default_factory=lambda: {
        "train_1.7b": 150, "train_8b": 170, "restart": 100, "sweep": 90, "qlora": 70})

    @classmethod
    def for_mode(cls, cuda: bool, tiny: bool) -> "Sizes":
        if not tiny:
            return cls(cuda=cuda)
        return cls(cuda=cuda, main_shape="tiny", small_shape="tiny", big_shape="tiny", seq=256, big_seq=512,
                   lengths=(20, 120), rows_per_step=2, main_steps=5, warmup_steps=1, restart_steps=16,
                   restart_checkpoint=2, qlora_steps=2, sweep_steps=2, big_steps=2, words=400, compile=False,
                   budgets={"train_1.7b": 90, "restart": 90, "qlora": 60, "sweep": 90, "train_8b": 60})


# ------------------------------------------------------------------------------------------ model and data


def save_model(shape: str, folder: Path, device: torch.device, dtype: str, words: int) -> Path:
    """A random-initialized model of `shape` with the word-level tokenizer beside it: a folder `raysft train` loads."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = folder / shape
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        config = LlamaConfig(**{**G.LLAMA_COMMON, **(LLAMA3_8B if shape == "llama3-8b" else G.SHAPES[shape])})
        with torch.device(device):  # initialized on the device: seconds, where an 8B model takes minutes on a CPU
            model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        model.save_pretrained(path, safe_serialization=True)
        del model
        G.free_memory(device)
    if not (path / "tokenizer.json").exists():
        save_word_tokenizer(path, words)
    return path


def save_word_tokenizer(folder: Path, words: int) -> None:
    """One token per word ``w<i>``, the ChatML markers as special tokens and ChatML as the template: a synthetic
    example's token count is its word count plus the template's six tokens, exactly."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + ROLES + [f"w{i}" for i in range(words)])}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # ChatML's newlines vanish: no token of their own
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, eos_token="<|im_end|>", pad_token="<pad>",
                                        unk_token="<unk>")
    tokenizer.add_special_tokens({"extra_special_tokens": ["<|im_start|>"]}, replace_extra_special_tokens=False)
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(folder)


@dataclass(frozen=True)
class Example:
    prompt: list[int]
    """Word indices of the user turn."""
    response: list[int]


def synthetic_examples(count: int, lengths: tuple[int, int], words: int, seed: int) -> list[Example]:
    """Examples of uniform random token length (template included) with a 20-60% prompt, as gpu_check draws them."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(count):
        n = int(rng.integers(lengths[0], lengths[1] + 1))
        prompt = max(1, int(n * rng.uniform(0.2, 0.6)) - 3)  # <|im_start|> user ... <|im_end|>
        response = max(1, n - prompt - 6)  # + <|im_start|> assistant ... <|im_end|>
        examples.append(Example(rng.integers(0, words, prompt).tolist(), rng.integers(0, words, response).tolist()))
    return examples


def write_jsonl(path: Path, examples: list[Example]) -> Path:
    def text(indices: list[int]) -> str:
        return " ".join(f"w{i}" for i in indices)

    with path.open("w") as handle:
        for e in examples:
            handle.write(json.dumps({"messages": [{"role": "user", "content": text(e.prompt)},
                                                  {"role": "assistant", "content": text(e.response)}]}) + "\n")
    return path


def token_examples(examples: list[Example]) -> list[dict[str, Any]]:
    """The examples as raysft's tokenizer makes them (ChatML, assistant turn and its end marker trained), for
    gpu_check's in-process step."""
    start, end, user, assistant = 0, 1, len(SPECIALS) + 1, len(SPECIALS) + 2
    offset = len(SPECIALS) + len(ROLES)
    rows = []
    for i, e in enumerate(examples):
        prompt = [start, user, *(offset + w for w in e.prompt), end, start, assistant]
        response = [offset + w for w in e.response] + [end]
        rows.append({"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response,
                     "origin": f"synthetic:{i}"})
    return rows


def token_lengths(examples: list[Example]) -> list[int]:
    return [len(e.prompt) + len(e.response) + 6 for e in examples]


# --------------------------------------------------------------------------------------------- the Ray head


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# The `ray` command of the Ray this Python imports (the carried bundle's on the GPU machine, first on PYTHONPATH).
RAY_COMMAND = [sys.executable, "-c", "from ray.scripts.scripts import main; main()"]


class RayHead:
    """`ray start --head` on 127.0.0.1 with its own --temp-dir; on exit exactly its processes are killed (never
    `ray stop`, which stops every Ray on the machine)."""

    def __init__(self, num_cpus: int, num_gpus: int, env: dict[str, str]):
        self.num_cpus, self.num_gpus, self.base_env = num_cpus, num_gpus, env
        # Short: Ray's socket paths live under it and a Unix socket path is limited to 107 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rgc-", dir="/tmp"))
        # Ray 2.60's head asks every client for a token: one made for this head, in its temp dir (~/.ray untouched).
        token_file = self.temp_dir / "auth_token"
        token_file.write_text(secrets.token_hex(32))
        self.env = {**env, MARKER: str(self.temp_dir), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN_PATH": str(token_file)}
        self.address = ""
        self.start_s = 0.0

    def __enter__(self) -> "RayHead":
        started = time.perf_counter()
        port = free_port()
        done = subprocess.run(
            [*RAY_COMMAND, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
             f"--temp-dir={self.temp_dir}", f"--num-cpus={self.num_cpus}", f"--num-gpus={self.num_gpus}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
             "--disable-usage-stats"],
            cwd=REPO, env=self.env, capture_output=True, text=True, timeout=180, check=False)
        if done.returncode != 0:
            self.kill()
            raise RuntimeError(f"ray start --head failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        self.address = f"127.0.0.1:{port}"
        self.start_s = time.perf_counter() - started
        return self

    def processes(self) -> list[Any]:
        import psutil

        found = {}
        for proc in psutil.process_iter():
            if proc.pid == os.getpid():
                continue
            try:
                if str(self.temp_dir) in " ".join(proc.cmdline()) or proc.environ().get(MARKER) == str(self.temp_dir):
                    found[proc.pid] = proc
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return list(found.values())

    def kill(self) -> None:
        import psutil

        for _ in range(3):
            procs = self.processes()
            if not procs:
                break
            for proc in procs:
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(procs, timeout=10)
        subprocess.run(["rm", "-rf", str(self.temp_dir)], check=False)

    def __exit__(self, *_: object) -> None:
        self.kill()

    def train_workers(self) -> list[Any]:
        """This head's Ray Train worker processes (Ray titles each actor's process after its class)."""
        workers = []
        for proc in self.processes():
            try:
                if any("RayTrainWorker" in part for part in proc.cmdline()):
                    workers.append(proc)
            except Exception:  # noqa: BLE001 - gone meanwhile
                continue
        return workers


class GpuSampler(threading.Thread):
    """Every 0.1 s, the GPU memory of each process but this one (NVML): the peak of the largest and of all together,
    and the most processes on the GPU at once. Nothing on a machine without NVML."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_process_bytes = 0
        self.peak_total_bytes = 0
        self.most_processes = 0
        self.baseline_device_bytes = 0
        self.peak_device_bytes = 0
        self._halt = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml: Any = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.baseline_device_bytes = pynvml.nvmlDeviceGetMemoryInfo(self._handle).used  # this process's context
        except Exception:  # noqa: BLE001 - no NVML (CPU machine): nothing sampled
            self._nvml = None

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def run(self) -> None:
        while self._nvml is not None and not self._halt.is_set():
            try:
                procs = [p for p in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle) if p.pid != os.getpid()]
            except Exception:  # noqa: BLE001 - a transient NVML error: sample again
                procs = []
            used = [p.usedGpuMemory or 0 for p in procs]
            try:  # the whole device too: where a VM does not tell memory per process
                self.peak_device_bytes = max(self.peak_device_bytes, self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
            except Exception:  # noqa: BLE001
                pass
            self.peak_process_bytes = max([self.peak_process_bytes, *used])
            self.peak_total_bytes = max(self.peak_total_bytes, sum(used))
            self.most_processes = max(self.most_processes, len(procs))
            time.sleep(0.1)

    def __enter__(self) -> "GpuSampler":
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._halt.set()
        self.join()

    def result(self) -> dict[str, Any]:
        if not self.available:
            return {"nvml": False}
        return {"nvml": True, "peak_process_gib": self.peak_process_bytes / 2**30,
                "peak_all_processes_gib": self.peak_total_bytes / 2**30, "most_gpu_processes": self.most_processes,
                "peak_device_over_baseline_gib": (self.peak_device_bytes - self.baseline_device_bytes) / 2**30}


class WorkerKiller(threading.Thread):
    """SIGKILL the head's Ray Train workers once `ready()` holds: a worker lost as an OOM kill or a lost node loses
    it, from outside the training code."""

    def __init__(self, head: RayHead, ready: Callable[[], bool]):
        super().__init__(daemon=True)
        self.head, self.ready = head, ready
        self.killed: list[int] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set() and not self.killed:
            if self.ready():
                for proc in self.head.train_workers():
                    try:
                        proc.kill()
                        self.killed.append(proc.pid)
                    except Exception:  # noqa: BLE001 - gone meanwhile
                        pass
            time.sleep(0.05)

    def __enter__(self) -> "WorkerKiller":
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._halt.set()
        self.join()


# ------------------------------------------------------------------------------------------------ the runs


@dataclass
class Check:
    """What every variant shares: sizes, scratch folder, the head, the report and the clock."""

    sizes: Sizes
    device: torch.device
    scratch: Path
    out: Path
    head: RayHead
    matmul_flops: float
    spec_peak: float | None
    deadline: float
    logs: dict[str, str] = field(default_factory=dict)

    @property
    def dtype(self) -> str:
        return "bfloat16" if self.sizes.cuda else "float32"

    @property
    def precision(self) -> str:
        return "bf16" if self.sizes.cuda else "fp32"

    def budget(self, name: str) -> float:
        return max(1.0, min(self.sizes.budgets[name], self.deadline - time.perf_counter()))

    def config(self, name: str, model_dir: Path, data_path: Path, steps: int, **sections: dict[str, Any]) -> dict[str, Any]:
        """A train config for this head, with the sections given merged over the common ones."""
        raw: dict[str, Any] = {
            "model": {"name_or_path": str(model_dir), "dtype": self.dtype},
            "data": {"train": {"path": str(data_path)}, "max_seq_len": self.sizes.seq,
                     "cache_dir": str(self.scratch / "token-cache"), "shuffle_window": 64},
            "lora": {"r": LORA_RANK, "alpha": 32, "dropout": 0.0},
            "train": {"output_dir": str(self.scratch / "runs" / name), "micro_batch_size": self.sizes.rows_per_step,
                      "max_steps": steps, "lr": 2e-4, "warmup_steps": 0, "precision": self.precision},
            "scaling": {"num_workers": 1, "use_gpu": self.sizes.cuda, "ray_address": self.head.address},
            "tracking": {"console": True, "tensorboard": False},
        }
        for section, values in sections.items():
            raw.setdefault(section, {}).update(values)
        return raw

    def write_config(self, name: str, raw: dict[str, Any]) -> Path:
        path = self.scratch / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    def raysft(self, name: str, args: list[str], timeout_s: float) -> dict[str, Any]:
        """`python -m raysft ARGS` against the head, as a user types it; its output to a log kept in the report."""
        log = self.scratch / f"{name}.log"
        started = time.perf_counter()
        with log.open("w") as handle:
            process = subprocess.Popen([sys.executable, "-m", "raysft", *args], cwd=REPO, env=self.head.env,
                                       stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                code = None
        text = log.read_text(errors="replace")
        self.logs[name] = text
        return {"exit": code, "timed_out": code is None, "wall_s": time.perf_counter() - started,
                "log_tail": text[-2500:] if code != 0 else text[-600:]}


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line
    return records


def step_records(records: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The training step records by step (the last of each step: a restarted run logs some steps again)."""
    return {r["step"]: r for r in records if "loss" in r}


def steady_state(check: Check, run_dir: Path, shape: C.ModelShape, lengths: list[int], skip: int) -> dict[str, Any]:
    """Trained tokens/s and MFU over the steps after `skip` (compile warm-up), the last one left out (a smaller
    batch, another compiled shape). Each step's time is its tokens over its tokens/s, as the loop measured it."""
    steps = step_records(read_metrics(run_dir))
    ordered = sorted(steps)
    seen, times, tokens, trained = 0, [], 0, 0
    for step in ordered:
        r = steps[step]
        real = int(r["num_tokens"]) - seen
        seen = int(r["num_tokens"])
        if skip < step < ordered[-1]:
            times.append(real / r["tokens_per_s"])
            tokens += real
            trained += int(r["trained_tokens"])
    if not times:
        return {"steady_steps": 0}
    seconds = sum(times)
    pairs_per_token = C.causal_pairs(lengths) / sum(lengths)
    flops = C.lora_training_flops(shape, LORA_RANK, tokens, trained, pairs_per_token * tokens)["total"]
    result = {"steady_steps": len(times), "steady_s": seconds, "step_s_median": float(np.median(times)),
              "tokens_per_s": tokens / seconds, "trained_tokens_per_s": trained / seconds,
              "last_loss": steps[ordered[-1]]["loss"], "steps_logged": ordered}
    result.update(mfu_fields(check, flops, seconds))
    return result


def mfu_fields(check: Check, flops: float, seconds: float) -> dict[str, Any]:
    if not check.sizes.cuda:
        return {"mfu": None, "mfu_spec": None}
    return {"mfu": flops / seconds / check.matmul_flops,
            "mfu_spec": flops / seconds / check.spec_peak if check.spec_peak else None}


def planned_peak(check: Check, raw: dict[str, Any]) -> Any:
    """`raysft plan`'s estimate for the config `raw` on one GPU (its own setting of gradient checkpointing)."""
    from raysft.config import parse_config
    from raysft.plan import Setup, plan, read_model_shape

    cfg = parse_config(raw)
    return plan(read_model_shape(cfg), Setup.from_config(cfg), "ddp", 1, cfg.model.gradient_checkpointing,
                "cuda" if check.sizes.cuda else "cpu")


def most_rows_that_fit(check: Check, make: Callable[[int, bool], dict[str, Any]], rows: tuple[int, ...],
                       default: tuple[int, bool]) -> tuple[int, bool]:
    """(rows per step, gradient checkpointing): the most rows `raysft plan` fits in 90% of the GPU, without
    checkpointing first (it recomputes a third more); `default` on the CPU. More rows per step spread the step's
    fixed host costs over more tokens (gpu_check.md: the compiled 1.7B step was host-bound at 4 rows)."""
    if not check.sizes.cuda:
        return default
    memory = torch.cuda.get_device_properties(0).total_memory
    for checkpointing in (False, True):
        for count in rows:
            if planned_peak(check, make(count, checkpointing)).total <= 0.9 * memory:
                return count, checkpointing
    return min(rows), True


def variant_train_main(check: Check, report: dict[str, Any]) -> dict[str, Any]:
    """`raysft train` of the main shape, compiled, with eval.generate at the end; then gpu_check's in-process step
    over the same examples."""
    s = check.sizes
    model_dir = save_model(s.main_shape, check.scratch / "models", check.device, check.dtype, s.words)
    data, evals = check.scratch / "main.jsonl", check.scratch / "main_eval.jsonl"

    def make(rows: int, checkpointing: bool) -> dict[str, Any]:
        return check.config("train_1.7b", model_dir, data, s.main_steps,
                            data={"eval": {"path": str(evals)}}, model={"gradient_checkpointing": checkpointing},
                            train={"compile": s.compile, "micro_batch_size": rows},
                            eval={"generate": {"num_prompts": 8, "max_new_tokens": 16, "batch_size": 8,
                                               "metrics": ["exact_match"]}})

    rows, checkpointing = most_rows_that_fit(check, make, (8, 4), (s.rows_per_step, False))
    raw = make(rows, checkpointing)
    count = int(s.main_steps * rows * s.seq * 0.97 / (sum(s.lengths) / 2))
    examples = synthetic_examples(count, s.lengths, s.words, seed=0)
    write_jsonl(data, examples)
    write_jsonl(evals, synthetic_examples(8, s.lengths, s.words, seed=1))
    result = check.raysft("train_1.7b", ["train", str(check.write_config("train_1.7b", raw))], check.budget("train_1.7b"))
    run_dir = Path(raw["train"]["output_dir"])
    shape = C.ModelShape.from_dir(model_dir)
    result.update(steady_state(check, run_dir, shape, token_lengths(examples), s.warmup_steps))
    evaluations = [r for r in read_metrics(run_dir) if "eval_loss" in r]
    generations = run_dir / "generations.jsonl"
    result["eval_generate"] = {"evaluations": len(evaluations),
                               "generations_file": generations.exists(),
                               "metrics": {k: v for k, v in (evaluations[-1] if evaluations else {}).items()
                                           if k.startswith("eval_")}}
    result.update(rows_per_step=rows, gradient_checkpointing=checkpointing,
                  planner_peak_gib=planned_peak(check, raw).total / 2**30)
    result["passed"] = (result["exit"] == 0 and result.get("steady_steps", 0) > 0 and bool(evaluations)
                        and generations.exists() and (run_dir / "final" / "adapter_model.safetensors").exists())
    report["variants"]["train_1.7b"] = result
    # gpu_check's compiled in-process step over the same examples, in this process (the Ray worker is gone).
    report["variants"]["inprocess_1.7b"] = guarded(
        "inprocess_1.7b", lambda: inprocess_step(check, model_dir, examples, shape, rows), check)
    inproc = report["variants"]["inprocess_1.7b"]
    if result.get("trained_tokens_per_s") and inproc.get("trained_tokens_per_s"):
        result["through_ray_over_inprocess"] = result["trained_tokens_per_s"] / inproc["trained_tokens_per_s"]
    return result


def inprocess_step(check: Check, model_dir: Path, examples: list[Example], shape: C.ModelShape,
                   rows_per_step: int) -> dict[str, Any]:
    plan = G.Plan(check.device, tiny=not check.sizes.cuda)
    plan.row_tokens, plan.warmup_steps = check.sizes.seq, check.sizes.warmup_steps
    rows = token_examples(examples)
    lengths = [len(r["input_ids"]) for r in rows]
    tokens, trained = sum(lengths), sum(sum(1 for x in r["labels"] if x != IGNORE_INDEX) for r in rows)
    breaks_before = sum(dynamo_counters["graph_break"].values())
    graphs_before = dynamo_counters["stats"]["unique_graphs"]
    try:
        v = G.packed_variant(plan, model_dir, rows, rows_per_step, compiled=check.sizes.compile)
        # Packed attention traced into each layer's graph: no break; a few graphs for the whole run, not per batch.
        v["graph_breaks"] = sum(dynamo_counters["graph_break"].values()) - breaks_before
        v["compiled_graphs"] = dynamo_counters["stats"]["unique_graphs"] - graphs_before
    finally:
        torch._dynamo.reset()
        G.free_memory(check.device)
    flops = C.lora_training_flops(shape, LORA_RANK, tokens, trained, C.causal_pairs(lengths))["total"]
    v.update(trained_tokens_per_s=trained / v["seconds"], tokens_per_s=tokens / v["seconds"],
             **mfu_fields(check, flops, v["seconds"]), passed=True)
    return v


def variant_restart(check: Check, report: dict[str, Any]) -> dict[str, Any]:
    """A worker killed after a checkpoint; Ray Train restarts it; the losses equal an uninterrupted run's."""
    s = check.sizes
    # fp32 weights and steps: the two runs' losses compare to 1e-4 on the GPU as on the CPU.
    model_dir = save_model(s.small_shape, check.scratch / "models-fp32", check.device, "float32", s.words)
    count = int(s.restart_steps * 2 * s.seq * 0.97 / (sum(s.lengths) / 2))
    data = write_jsonl(check.scratch / "restart.jsonl", synthetic_examples(count, s.lengths, s.words, seed=2))
    # 2 rows per step: fp32 takes the per-example attention loop, the slow path; what is checked is the restart.
    common = {"model": {"dtype": "float32"}, "train": {"precision": "fp32", "checkpoint_every": s.restart_checkpoint,
                                                       "micro_batch_size": 2}}
    runs = {}
    for name, extra in (("restart_straight", {}), ("restart_killed", {"max_failures": 1})):
        raw = check.config(name, model_dir, data, s.restart_steps, model=common["model"], train=common["train"],
                           scaling=extra)
        path = check.write_config(name, raw)
        # The second checkpoint stored means the first is registered with Ray Train: the restart resumes from one.
        second = 2 * s.restart_checkpoint
        stored = Path(raw["train"]["output_dir"]) / "checkpoints" / f"step_{second:06d}" / "manifest.json"
        if name == "restart_killed":
            with WorkerKiller(check.head, stored.exists) as killer:
                runs[name] = check.raysft(name, ["train", str(path)], check.budget("restart") / 2)
            runs[name]["killed_pids"] = killer.killed
        else:
            runs[name] = check.raysft(name, ["train", str(path)], check.budget("restart") / 2)
        runs[name]["losses"] = {step: r["loss"] for step, r in step_records(read_metrics(Path(raw["train"]["output_dir"]))).items()}
    straight, killed = runs["restart_straight"]["losses"], runs["restart_killed"]["losses"]
    deltas = [abs(killed[k] - straight[k]) for k in straight if k in killed]
    result = {"runs": {k: {key: v for key, v in r.items() if key != "losses"} for k, r in runs.items()},
              "killed": bool(runs["restart_killed"]["killed_pids"]), "steps_straight": len(straight),
              "steps_after_restart": sorted(killed) == list(range(1, s.restart_steps + 1)),
              "max_abs_loss_delta": max(deltas) if deltas else None, "limit": 1e-4}
    result["passed"] = (all(r["exit"] == 0 for r in runs.values()) and result["killed"]
                        and result["steps_after_restart"] and len(deltas) == s.restart_steps
                        and max(deltas) <= 1e-4)
    return result


def variant_qlora(check: Check, report: dict[str, Any]) -> dict[str, Any]:
    """QLoRA (4-bit NF4 base) of the main shape through Ray."""
    if not G.bitsandbytes_available():
        return {"skipped": "bitsandbytes is not importable (carry it: benchmarks/gpu_ray_check.sh)", "passed": None}
    s = check.sizes
    model_dir = save_model(s.main_shape, check.scratch / "models", check.device, check.dtype, s.words)
    examples = synthetic_examples(int(s.qlora_steps * s.rows_per_step * s.seq * 0.97 / (sum(s.lengths) / 2)),
                                  s.lengths, s.words, seed=3)
    data = write_jsonl(check.scratch / "qlora.jsonl", examples)
    raw = check.config("qlora", model_dir, data, s.qlora_steps, model={"quantization": "4bit"},
                       train={"precision": "bf16"})
    result = check.raysft("qlora", ["train", str(check.write_config("qlora", raw))], check.budget("qlora"))
    run_dir = Path(raw["train"]["output_dir"])
    result.update(steady_state(check, run_dir, C.ModelShape.from_dir(model_dir), token_lengths(examples), 1))
    result["passed"] = result["exit"] == 0 and (run_dir / "final" / "adapter_model.safetensors").exists()
    return result


def variant_sweep(check: Check, report: dict[str, Any]) -> dict[str, Any]:
    """`raysft sweep` of 2 trials sharing the one GPU (half a GPU per worker), both completing, overlapping."""
    s = check.sizes
    model_dir = save_model(s.small_shape, check.scratch / "models", check.device, check.dtype, s.words)
    count = int(s.sweep_steps * s.rows_per_step * s.seq * 0.97 / (sum(s.lengths) / 2))
    data = write_jsonl(check.scratch / "sweep.jsonl", synthetic_examples(count, s.lengths, s.words, seed=4))
    evals = write_jsonl(check.scratch / "sweep_eval.jsonl", synthetic_examples(4, s.lengths, s.words, seed=5))
    # Half a GPU per worker (scaling.gpus_per_worker, checked by `raysft plan`); on the CPU half a CPU per trial.
    share = ({"gpus_per_worker": 0.5, "resources_per_worker": {"CPU": 1}} if s.cuda
             else {"resources_per_worker": {"CPU": 0.5}})
    base = check.config("sweep_base", model_dir, data, s.sweep_steps, data={"eval": {"path": str(evals)}},
                        train={"eval_every": s.sweep_steps}, scaling=share)
    base["tracking"]["console"] = False
    base_path = check.write_config("sweep_base", base)
    sweep_dir = check.scratch / "runs" / "sweep"
    sweep = {"name": "gpu_share", "base": str(base_path), "output_dir": str(sweep_dir),
             "space": {"train.lr": "choice [1e-4, 3e-4]"}, "metric": "eval_loss", "mode": "min",
             "search_alg": "grid", "max_concurrent_trials": 2, "scheduler": {"name": "fifo"}}
    path = check.scratch / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    with GpuSampler() as sampler:
        result = check.raysft("sweep", ["sweep", str(path)], check.budget("sweep"))
    trials = []
    for info in sorted(p for p in sweep_dir.glob("**/trial.json") if p.parent.name.startswith("trial_")):  # not best/
        trial_dir = info.parent
        started = json.loads(info.read_text())["started"]
        metrics = trial_dir / "metrics.jsonl"
        ended = metrics.stat().st_mtime if metrics.exists() else started
        trials.append({"name": trial_dir.name, "completed": (trial_dir / "final").is_dir(),
                       "started": started, "ended": ended})
    overlap = (max(0.0, min(t["ended"] for t in trials) - max(t["started"] for t in trials))
               if len(trials) >= 2 else 0.0)
    result.update(trials=trials, overlap_s=overlap, gpu=sampler.result(), scaling=share)
    sharing = not sampler.available or sampler.most_processes >= 2  # both trials' workers on the GPU at once
    result["passed"] = (result["exit"] == 0 and len(trials) == 2 and all(t["completed"] for t in trials)
                        and overlap > 0 and sharing)
    return result


def variant_train_8b(check: Check, report: dict[str, Any]) -> dict[str, Any]:
    """The 8B shape at sequence 4096: tok/s, MFU and the planner's peak memory against the measured one."""
    s = check.sizes
    model_dir = save_model(s.big_shape, check.scratch / "models", check.device, check.dtype, s.words)

    def make(rows: int, checkpointing: bool) -> dict[str, Any]:
        return check.config("train_8b", model_dir, check.scratch / "big.jsonl", s.big_steps,
                            data={"max_seq_len": s.big_seq}, train={"micro_batch_size": rows, "compile": s.compile},
                            model={"gradient_checkpointing": checkpointing})

    rows, checkpointing = most_rows_that_fit(check, make, (4, 3, 2, 1), (1, False))
    raw = make(rows, checkpointing)
    estimate = planned_peak(check, raw)
    lengths = (max(s.lengths[0], s.big_seq // 16), s.big_seq // 2)  # longer examples, as long-context data has
    examples = synthetic_examples(int(s.big_steps * rows * s.big_seq * 0.97 / (sum(lengths) / 2)), lengths, s.words, 6)
    write_jsonl(check.scratch / "big.jsonl", examples)
    with GpuSampler() as sampler:
        result = check.raysft("train_8b", ["train", str(check.write_config("train_8b", raw))], check.budget("train_8b"))
    run_dir = Path(raw["train"]["output_dir"])
    result.update(steady_state(check, run_dir, C.ModelShape.from_dir(model_dir), token_lengths(examples),
                               min(s.warmup_steps, s.big_steps - 2)))
    measured = sampler.result()
    result.update(rows_per_step=rows, seq=s.big_seq, gradient_checkpointing=checkpointing,
                  planner_peak_gib=estimate.total / 2**30, measured=measured,
                  nemo_anchor={"tokens_per_s_h100": NEMO_8B_LORA_H100_TOKENS_PER_S, "spec_mfu": NEMO_8B_LORA_SPEC_MFU})
    # The worker's own peak; where NVML tells no per-process memory, the device's rise over this process's baseline.
    peak = measured.get("peak_process_gib") or measured.get("peak_device_over_baseline_gib")
    if peak:
        result["measured_peak_gib"] = peak
        result["planner_over_measured"] = result["planner_peak_gib"] / peak
    result["passed"] = result["exit"] == 0 and result.get("steady_steps", 0) > 0
    return result


RUNNERS: dict[str, Callable[[Check, dict[str, Any]], dict[str, Any]]] = {
    "train_1.7b": variant_train_main, "restart": variant_restart, "qlora": variant_qlora,
    "sweep": variant_sweep, "train_8b": variant_train_8b,
}


def guarded(name: str, fn: Callable[[], dict[str, Any]], check: Check) -> dict[str, Any]:
    """One variant: its result, or its error (the rest still run); skipped when the time is up."""
    if time.perf_counter() > check.deadline - 5:
        return {"skipped": "past the time budget", "passed": None}
    started = time.perf_counter()
    try:
        result = fn()
    except Exception:  # noqa: BLE001 - a failing variant is recorded and the check goes on
        result = {"error": traceback.format_exc(), "passed": False}
    result["variant_s"] = time.perf_counter() - started
    result.setdefault("mfu", None)  # every variant has one: a fraction where it measured training speed on a GPU
    outcome = "error" if "error" in result else {True: "passed", False: "FAILED", None: "skipped"}[result.get("passed")]
    print(f"[gpu_ray_check] {name}: {outcome} ({result['variant_s']:.1f} s)", flush=True)
    return result


# ------------------------------------------------------------------------------------------------ report


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.{digits}f}"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = ["## GPU check through Ray (benchmarks/gpu_ray_check.py)", "", f"command: `{report['command']}`", "",
             *[f"- {k}: {v}" for k, v in env.items()], f"- through_ray: {report['through_ray']}",
             f"- ray head: {report.get('ray', {})}", ""]
    if "matmul" in report:
        m = report["matmul"]
        lines += [f"Measured {m['dtype']} matmul: {m['best_flops'] / 1e12:.1f} TFLOP/s; spec peak: "
                  f"{(m['spec_peak'] or 0) / 1e12:.0f} TFLOP/s", ""]
    rows = []
    for name, v in report["variants"].items():
        status = "error" if "error" in v else v.get("skipped") and "skipped" or {True: "passed", False: "FAILED"}.get(v.get("passed"), "-")
        rows.append([name, status, fmt(v.get("trained_tokens_per_s")), fmt(v.get("tokens_per_s")), fmt(v.get("mfu")),
                     fmt(v.get("mfu_spec")), fmt(v.get("planner_peak_gib"), 1),
                     fmt(v.get("measured_peak_gib"), 1), fmt(v.get("variant_s"), 0)])
    lines += [C.markdown_table(["variant", "status", "trained tok/s", "all tok/s", "MFU (measured matmul)",
                                "MFU (spec)", "planner peak GiB", "measured peak GiB", "s"], rows), ""]
    main = report["variants"].get("train_1.7b", {})
    if main.get("through_ray_over_inprocess"):
        lines.append(f"Through Ray / in-process trained tok/s: **{main['through_ray_over_inprocess']:.3f}** (target >= 0.95)")
    restart = report["variants"].get("restart", {})
    if "max_abs_loss_delta" in restart:
        lines.append(f"Restart: killed {restart['killed']}, every step logged {restart['steps_after_restart']}, "
                     f"max |delta loss| {restart['max_abs_loss_delta']}")
    sweep = report["variants"].get("sweep", {})
    if "trials" in sweep:
        lines.append(f"Sweep: {sum(t['completed'] for t in sweep['trials'])}/{len(sweep['trials'])} trials completed, "
                     f"{sweep['overlap_s']:.1f} s overlapping, GPU: {sweep['gpu']}")
    for name, v in report["variants"].items():
        if "error" in v:
            lines += ["", f"### {name}: error", "", "```", v["error"][-1500:], "```"]
        elif v.get("passed") is False:
            lines += ["", f"### {name}: failed", "", "```", str(v.get("log_tail") or v)[-1500:], "```"]
    lines += ["", f"Total wall time: {report.get('wall_s', 0):.0f} s"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_ray_check.json and gpu_ray_check.md")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny models and sizes (the CPU run the tests do)")
    parser.add_argument("--budget-s", type=float, default=430.0, help="no variant starts after this; each is cut to it")
    parser.add_argument("--only", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_ray_check: --device cuda but torch sees no CUDA device; use --device cpu --tiny here")
    wanted = [v for v in args.only.split(",") if v]
    unknown = sorted(set(wanted) - set(VARIANTS))
    if unknown:
        sys.exit(f"gpu_ray_check: --only: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    started = time.perf_counter()
    device = torch.device(args.device)
    sizes = Sizes.for_mode(device.type == "cuda", args.tiny or device.type == "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"command": " ".join(["python", *sys.argv]), "through_ray": True,
                              "environment": G.environment(device), "variants": {}}
    import ray

    report["environment"]["ray"] = ray.__version__

    def save() -> None:
        report["wall_s"] = time.perf_counter() - started
        (args.out / "gpu_ray_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (args.out / "gpu_ray_check.md").write_text(markdown(report) + "\n")

    spec_peak = G.spec_peak_for(report["environment"].get("gpu", "")) if sizes.cuda else None
    dtype = "bf16" if sizes.cuda else "fp32"
    report["matmul"] = {"dtype": dtype, "spec_peak": spec_peak,
                        **C.matmul_flops(dtype, (8192,) if sizes.cuda else (256,), seconds=2.0 if sizes.cuda else 0.3,
                                         device=args.device)}
    save()
    # The check's own head only: no RAY_ADDRESS (or other Ray setting) of the calling shell leaks into the runs.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONUNBUFFERED"] = "1"
    with tempfile.TemporaryDirectory(prefix="raysft-gpu-ray-check-") as scratch:
        env["RAYSFT_CACHE"] = str(Path(scratch) / "cache")  # nothing of the check lands in the user's cache
        cpus = os.cpu_count() or 2
        with RayHead(num_cpus=min(cpus, 8) if sizes.cuda else 2, num_gpus=1 if sizes.cuda else 0, env=env) as head:
            report["ray"] = {"address": head.address, "start_s": head.start_s, "temp_dir": str(head.temp_dir)}
            check = Check(sizes, device, Path(scratch), args.out, head, report["matmul"]["best_flops"], spec_peak,
                          deadline=started + args.budget_s)
            save()
            for name in wanted:
                report["variants"][name] = guarded(name, lambda n=name: RUNNERS[n](check, report), check)
                save()
    save()
    print(markdown(report))
    failed = [n for n, v in report["variants"].items() if v.get("passed") is False]
    if failed:
        sys.exit(f"gpu_ray_check: failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
