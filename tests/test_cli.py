"""End to end through the command line, as a user runs it: a fresh process that starts its own Ray."""

from __future__ import annotations

import json
import os
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
    done = raysft("train", str(cfg), "--set", "train.max_steps=4",
                  env={"WANDB_MODE": "offline", "WANDB_API_KEY": secret, "WANDB_SILENT": "true"})
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    assert "[raysft] step 4/4" in done.stdout + done.stderr

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


def test_data_command_reports_statistics(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, tiny_model_dir, ["data.max_seq_len=384", "data.over_length=drop", "data.eval=null"])
    done = raysft("data", str(cfg), "--show", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    stats = json.loads(done.stdout[: done.stdout.index("\n---")])
    assert stats["rows_read"]["train"] == 48
    assert stats["counts"]["train"]["over_length_dropped"] > 0  # many GSM8K rows exceed 384 tiny-BPE tokens
    assert stats["examples_kept"]["train"] > 0
    assert stats["token_length_percentiles"]["train"]["max"] > 384  # measured before the length policy
    assert 0 < stats["packing_efficiency"]["train"] <= 1
    assert "⟦" in done.stdout  # the rendered example marks its trained tokens


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
