"""End to end through the command line, as a user runs it: a fresh process that starts its own Ray."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from tests.runs import REPO, tiny_config


def raysft(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "raysft", *args], cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "RAY_ADDRESS": "local", **(env or {})},  # its own Ray, never a running cluster
    )


def write_config(tmp_path: Path, model_dir: Path, overrides: list[str]) -> Path:
    cfg = tiny_config(model_dir, tmp_path / "run", overrides)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def test_train_export_generate(tiny_model_dir: Path, tmp_path: Path) -> None:
    secret = "wandb-key-that-must-never-be-written-anywhere-0123456789"
    cfg = write_config(tmp_path, tiny_model_dir, ["tracking.tensorboard=true", "tracking.wandb=true",
                                                   "tracking.console=true", "train.checkpoint_every=2"])
    done = raysft("train", str(cfg), "--set", "train.max_steps=4", "--verbose",
                  env={"WANDB_MODE": "offline", "WANDB_API_KEY": secret, "WANDB_SILENT": "true"})
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    output = done.stdout + done.stderr
    [last] = [line for line in output.splitlines() if line.startswith("[raysft] step 4/4 ")]  # once, verbose too
    assert last.startswith("[raysft] step 4/4 (100%)  loss ")
    # --verbose: what is quiet by default is back (test_worker_run_console_... checks the default), Ray Train's
    # line per report (local mode's wording) and Ray's own info lines among it.
    assert "Reported metrics: {'step': 4, 'loss'" in output
    assert "Started a local Ray instance" in output

    # The documented layout.
    assert {"config.yaml", "metrics.jsonl", "data_stats.json", "final", "checkpoints", "tensorboard", "wandb"} <= {
        p.name for p in run.iterdir()
    }
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in (run / "final").iterdir()}
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 4
    assert (run / "checkpoints" / "step_000002" / "manifest.json").exists()

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    PeftModel.from_pretrained(base, str(run / "final"))

    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(losses, rel=1e-5)
    # The offline W&B run log holds every logged loss (as the JSON text W&B stores values in).
    wandb_log = next((run / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
    assert all(json.dumps(loss).encode() in wandb_log for loss in losses)

    # The key reached wandb through the environment only: no file of the run holds it.
    for path in run.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path

    merged = tmp_path / "merged"
    exported = raysft("export", str(run), "--merge", str(merged))
    assert exported.returncode == 0, exported.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == model.config.vocab_size

    generated = raysft("generate", "--model", str(tiny_model_dir), "--adapter", str(run / "final"),
                       "--prompt", "What is 2+2?", "--max-new-tokens", "5")
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert "> What is 2+2?" in generated.stdout


# What Ray, Ray Train and transformers print on their own in a worker run, none of it about the run: quiet
# unless --verbose (each was on the console before raysft quieted it).
RAY_NOISE = (
    "Reporting training result",  # Ray Train, after every ray.train.report
    "TrainController",  # Ray Train's controller: resource requests, worker group start-up, a core_worker notice
    "Setting up process group",
    "Loading weights",  # transformers' tqdm bar, carriage returns and all
    "FutureWarning",
    "PreemptionWatcher",  # Ray core's error-level notice on an actor Ray Train starts (ray-project/ray#53727)
    "Failed to load CPU gemm_4bit_forward",  # bitsandbytes without its optional kernels
    "execution finished",  # Ray Data, per job
    "Started a local Ray instance",
)


def test_worker_run_console_is_one_line_per_step_and_quiet(tiny_model_dir: Path, tmp_path: Path) -> None:
    # A real Ray Train worker (the output crosses Ray's log forwarding), and fresh data (Ray Data jobs run).
    cfg = write_config(tmp_path, tiny_model_dir, [
        "scaling.num_workers=1", "tracking.console=true", "train.max_steps=4", "train.eval_every=2",
        f"data.cache_dir={tmp_path / 'cache'}",
    ])
    done = raysft("train", str(cfg))
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    lines = output.splitlines()
    for step in range(1, 5):
        [line] = [line for line in lines if f"step {step}/4 " in line and "eval" not in line]  # exactly once
        assert line.startswith(f"[raysft] step {step}/4 ({step / 4:.0%})  loss "), line  # no Ray prefix
        assert re.search(r"  tokens/s [\d,]+  eta (\d+s|\d+m\d\ds|\?)$", line), line
    for step in (0, 2, 4):
        [line] = [line for line in lines if line.startswith(f"[raysft] eval at step {step}/4  eval_loss ")]
    assert any(line.startswith("[raysft] data train: ") and "rows read" in line for line in lines)
    assert any(line.startswith("[raysft] data eval: ") and "rows read" in line for line in lines)
    assert [noise for noise in RAY_NOISE if noise in output] == []
    assert "\r" not in output and "\x1b[" not in output  # no bars, no colour codes in a pipe


def table_values(text: str) -> dict[str, list[str]]:
    """`raysft data`'s table: each row's label (two spaces or more end it) and its values, one per split."""
    rows = {}
    for line in text.splitlines()[1:]:
        label, _, values = line.strip().partition("  ")
        rows[label] = values.split()
    return rows


def test_data_command_reports_statistics(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, tiny_model_dir,
                       ["data.max_seq_len=384", "data.over_length=drop", "tracking.console=true"])
    done = raysft("data", str(cfg), "--show", "1", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    stats = json.loads(done.stdout[: done.stdout.index("\n---")])
    assert stats["rows_read"]["train"] == 48
    assert stats["counts"]["train"]["over_length_dropped"] > 0  # many GSM8K rows exceed 384 tiny-BPE tokens
    assert stats["examples_kept"]["train"] > 0
    assert stats["token_length_percentiles"]["train"]["max"] > 384  # measured before the length policy
    assert 0 < stats["packing_efficiency"]["train"] <= 1
    assert "⟦" in done.stdout  # the rendered example marks its trained tokens
    assert "[raysft] data train: " in done.stderr  # a line per stage, beside the machine form on stdout

    # Without --json: the same numbers as a table, one column per split (from the cache now: no Ray).
    table = raysft("data", str(cfg), "--show", "0")
    assert table.returncode == 0, table.stderr[-3000:]
    assert "[raysft] data train: cached, 48 rows read" in table.stderr
    header, *_ = table.stdout.splitlines()
    assert header.split() == ["train", "eval"]
    rows = table_values(table.stdout)
    for split, column in (("train", 0), ("eval", 1)):
        number = lambda label, column=column: int(rows[label][column].replace(",", ""))
        percent = lambda label, column=column: float(rows[label][column].rstrip("%")) / 100
        assert number("rows read") == stats["rows_read"][split]
        assert number("dropped (over length)") == stats["counts"][split]["over_length_dropped"]
        assert number("dropped (no trained tokens)") == stats["counts"][split]["no_trained_tokens"]
        assert number("skipped (invalid)") == stats["counts"][split]["invalid_skipped"]
        assert number("truncated") == stats["counts"][split]["truncated"]
        assert number("examples kept") == stats["examples_kept"][split]
        for name, value in stats["token_length_percentiles"][split].items():
            assert number(f"tokens per example, {name}") == value
        assert percent("trained tokens") == pytest.approx(stats["trained_token_fraction"][split], abs=5e-4)
        assert number("packed rows") == stats["rows_after_packing"][split]
        assert percent("packing efficiency") == pytest.approx(stats["packing_efficiency"][split], abs=5e-4)
        assert number("tokens after packing") == stats["tokens_after_packing"][split]


def test_bad_config_fails_before_ray_with_the_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model: {name_or_path: m}\ndata: {train: {path: x.jsonl}}\ntrain: {learning_rate: 1}\n")
    done = raysft("train", str(path))
    assert done.returncode == 2
    assert "train.learning_rate: unknown key; did you mean 'train.lr'?" in done.stderr
    assert "Started a local Ray instance" not in done.stderr + done.stdout


def test_bad_data_names_file_and_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": \n')
    cfg = write_config(tmp_path, tiny_model_dir, [f"data.train.path={data}", "data.eval=null"])
    done = raysft("train", str(cfg))
    assert done.returncode == 2
    assert f"{data}:2" in done.stderr
    assert not (tmp_path / "run").exists()  # nothing written for a run that never started
