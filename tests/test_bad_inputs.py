"""A hostile user's battery, kept: every bad config, run folder or cluster request is a clear error naming
its key (exit 2, no traceback), raised before Ray starts where that can be known, and nothing the user
owns is changed. (Bad data files: tests/data/test_bad_inputs_data.py; export/generate/report:
tests/test_bad_inputs_outputs.py.)

The pre-Ray cases come first in this file: they assert that Ray was not started, which only means
something while no earlier test of the session has started it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import yaml

import raysft

from raysft.config import ModelConfig
from raysft.model_source import check_model_source
from raysft.run_folder import CONFIG_FILE, HISTORY_FILE
from tests.runs import REPO, assert_refused, cli, losses, snapshot, tiny_config


def write_config(tmp_path: Path, model_dir: Path, overrides: list[str] | None = None, out: str = "run") -> Path:
    cfg = tiny_config(model_dir, tmp_path / out, overrides)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def refused_before_ray(capsys: pytest.CaptureFixture[str], args: list[str | Path], *named: str | Path) -> str:
    ray_was_up = ray.is_initialized()
    code, _, err = cli(capsys, *args)
    assert_refused(code, err, *named)
    if not ray_was_up:
        assert not ray.is_initialized(), "Ray was started before the error"
    return err


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ("train.lr=.inf", "train.lr"),
        ("train.betas=[2, 3]", "train.betas"),
        ("lora.target_modules=[q_projj]", "lora.target_modules"),
        ("lora.modules_to_save=[lm_headd]", "lora.modules_to_save"),
        ("model.attn_implementation=flash_attention_2", "model.attn_implementation"),
        ("data.max_seq_len=4096", "data.max_seq_len"),  # the tiny model has 512 positions
        ("data.train=[]", "data.train"),
        ("train.precision=fp16", "train.precision"),
        ("model.name_or_path=./no/such/model", "model.name_or_path"),
        ("scaling.storage_path=foo://bucket/run", "scaling.storage_path"),  # object storage: tests/test_storage.py
        ("tracking.mlflow_dir=s3://bucket/mlflow", "tracking.mlflow_dir"),  # a server is MLFLOW_TRACKING_URI
        ("train.learning_rate=1e-4", "did you mean 'train.lr'"),  # handled well before: kept as a case
        ("train.lr=[1,", "--set train.lr: the value '[1,' is not valid YAML"),
        ("model.chat_template='{{ messages.append(1) }}'", "model.chat_template: the template does what Jinja's "
         "sandbox forbids (SecurityError: access to attribute 'append' of 'list' object is unsafe.): the template is at "
         "fault, not the row"),
        ("data.train.3.path=x.jsonl", "--set data.train.3.path: index 3 is out of range"),
        ("train.early_stopping={patience: 2}", "train.early_stopping watches evaluations"),  # no eval_every
        ("train.checkpoint_score=eval_exact_match", "train.checkpoint_score"),  # no eval.generate to log it
        ("eval.generate={metrics: [{function: 'no_such_module_here:score'}]}", "eval.generate.metrics.0.function"),
    ],
)
def test_bad_setting_named_before_ray(
    capsys: pytest.CaptureFixture[str], tiny_model_dir: Path, tmp_path: Path, setting: str, key: str
) -> None:
    cfg = write_config(tmp_path, tiny_model_dir)
    before = snapshot(tmp_path)
    refused_before_ray(capsys, ["train", cfg, "--set", setting], key)
    assert snapshot(tmp_path) == before  # no run folder, no cache entry, nothing


def test_bad_yaml_names_file_and_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  name_or_path: m\ndata: [unclosed\n")
    refused_before_ray(capsys, ["train", path], f"{path}:")


def damaged_copy(model_dir: Path, tmp_path: Path, damage: str) -> tuple[Path, Path]:
    """A copy of the tiny model with its weights file damaged as a cut-short download or a bad disk leaves it."""
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\0" * 8 + data[8:])
    return model, weights


@pytest.mark.parametrize(("damage", "said"), [("truncated", "incomplete metadata"), ("zeroed", "invalid JSON in header")])
def test_damaged_weights_named_before_ray_and_nothing_written(
    capsys: pytest.CaptureFixture[str], tiny_model_dir: Path, tmp_path: Path, damage: str, said: str
) -> None:
    model, weights = damaged_copy(tiny_model_dir, tmp_path, damage)
    cfg = write_config(tmp_path, model)
    before = snapshot(tmp_path)
    refused_before_ray(capsys, ["train", cfg], "model.name_or_path", f"{weights} is not a complete safetensors file",
                       said, "cut short", "Download or copy the model again")
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()  # the rerun after a fix is not blocked
    shutil.copyfile(tiny_model_dir / "model.safetensors", weights)
    assert check_model_source(raysft.load_config(cfg).model) == []


@pytest.mark.parametrize(
    ("changes", "said"),
    [
        ({"model_type": "my_custom_lm", "auto_map": {"AutoConfig": "modeling_my.MyConfig",
                                                     "AutoModelForCausalLM": "modeling_my.MyForCausalLM"}},
         ["model_type 'my_custom_lm' is not one transformers", "auto_map points at code shipped with it "
          "(modeling_my.MyForCausalLM)", "model.trust_remote_code is on (it is off"]),
        ({"model_type": "my_custom_lm"}, ["model_type 'my_custom_lm' is not one transformers"]),
        ({"model_type": "vit"}, ["'vit' model, which is not a causal language model"]),
    ],
)
def test_model_needing_remote_code_refused_before_ray(
    capsys: pytest.CaptureFixture[str], tiny_model_dir: Path, tmp_path: Path, changes: dict[str, object], said: list[str]
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **changes}))
    cfg = write_config(tmp_path, model)
    before = snapshot(tmp_path)
    refused_before_ray(capsys, ["train", cfg], f"model.name_or_path: {model}", *said)
    assert snapshot(tmp_path) == before


def test_auto_map_beside_a_known_model_type_loads_natively(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Many hub checkpoints keep an auto_map from before transformers had the architecture: its own class loads them.
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "modeling_x.X"}}))
    assert check_model_source(ModelConfig(name_or_path=str(model))) == []


def test_output_dir_that_is_a_file(capsys: pytest.CaptureFixture[str], tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "run").write_text("my notes\n")
    refused_before_ray(capsys, ["train", write_config(tmp_path, tiny_model_dir)], "train.output_dir", "is a file")
    assert (tmp_path / "run").read_text() == "my notes\n"


def test_output_dir_holding_files_of_the_user(capsys: pytest.CaptureFixture[str], tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("mine: true\n")
    before = snapshot(tmp_path / "run")
    refused_before_ray(capsys, ["train", write_config(tmp_path, tiny_model_dir)], "train.output_dir", "config.yaml")
    assert snapshot(tmp_path / "run") == before


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder on a read-only bind mount: the one thing root cannot write to."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    done = subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot make a read-only mount here: {done.stderr.strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("key", ["train.output_dir", "data.cache_dir"])
def test_read_only_folder_named(
    capsys: pytest.CaptureFixture[str], tiny_model_dir: Path, tmp_path: Path, read_only_folder: Path, key: str
) -> None:
    cfg = write_config(tmp_path, tiny_model_dir)
    refused_before_ray(capsys, ["train", cfg, "--set", f"{key}={read_only_folder / 'sub'}"], key, "not writable")


def test_sweep_name_cannot_escape_its_folder(capsys: pytest.CaptureFixture[str], tiny_model_dir: Path, tmp_path: Path) -> None:
    base = tiny_config(tiny_model_dir, tmp_path / "unused", ["scaling.num_workers=1", "train.eval_every=2"])
    for name in ("../escaped", "/abs/path"):
        path = tmp_path / "sweep.yaml"
        path.write_text(yaml.safe_dump({"name": name, "base": base.model_dump(mode="json"), "space": {"train.lr": "choice [1e-3, 1e-2]"}}))
        refused_before_ray(capsys, ["sweep", path], "name")
    assert not (tmp_path.parent / "escaped").exists()


def test_sweep_with_missing_base_data_starts_no_trial(capsys: pytest.CaptureFixture[str], tiny_model_dir: Path, tmp_path: Path) -> None:
    base = tiny_config(tiny_model_dir, tmp_path / "unused", ["scaling.num_workers=1", "train.eval_every=2"])
    raw = base.model_dump(mode="json")
    raw["data"]["train"][0]["path"] = str(tmp_path / "missing.jsonl")
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "base": raw, "output_dir": str(tmp_path / "sweep"),
                                    "space": {"train.lr": "choice [1e-3, 1e-2]"}}))
    refused_before_ray(capsys, ["sweep", path], f"{tmp_path / 'missing.jsonl'}")
    assert not (tmp_path / "sweep").exists()


# --- after Ray started: the data decides, or the cluster does -----------------------------------------


@pytest.fixture(scope="module")
def finished_run(ray_session: None, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step run with its checkpoint of step 2 (none is written at the last step)."""
    out = tmp_path_factory.mktemp("bad-run") / "run"
    raysft.train(tiny_config(tiny_model_dir, out, ["train.checkpoint_every=2", "scaling.num_workers=1"]))
    return out


def copy_run(finished_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run, symlinks=True)
    return run


def resume_args(tmp_path: Path, model_dir: Path, run: Path, extra: list[str]) -> list[str | Path]:
    cfg = write_config(tmp_path, model_dir, ["train.checkpoint_every=2", "scaling.num_workers=1"], out=run.name)
    return ["train", cfg, "--resume", *[a for setting in extra for a in ("--set", setting)]]


@pytest.mark.parametrize("setting", ["lora.r=8", "train.lr=0.05", "train.seed=3", "data.max_seq_len=128",
                                     "train.micro_batch_size=1"])
def test_resume_refuses_changes_before_writing(
    capsys: pytest.CaptureFixture[str], finished_run: Path, tiny_model_dir: Path, tmp_path: Path, setting: str
) -> None:
    run = copy_run(finished_run, tmp_path)
    before = snapshot(run)
    code, _, err = cli(capsys, *resume_args(tmp_path, tiny_model_dir, run, [setting]))
    assert_refused(code, err, setting.split("=")[0], "set it back")
    assert snapshot(run) == before  # config.yaml, data_stats.json, metrics.jsonl untouched


def test_resume_records_allowed_changes_and_continues_counts(
    capsys: pytest.CaptureFixture[str], finished_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    run = copy_run(finished_run, tmp_path)
    config_before = (run / CONFIG_FILE).read_text()
    # What a crash leaves: a torn last metrics line and a half-written checkpoint folder.
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 5, "lo')
    (run / "checkpoints" / ".staging_step_000004").mkdir()
    code, out, err = cli(capsys, *resume_args(tmp_path, tiny_model_dir, run, ["train.max_steps=6"]))
    assert code == 0, err
    assert (run / CONFIG_FILE).read_text() == config_before  # the config the run started with, kept
    history = [json.loads(line) for line in (run / HISTORY_FILE).read_text().splitlines()]
    assert history[-1]["changes"]["train.max_steps"] == {"from": 4, "to": 6}
    assert set(history[-1]["changes"]) == {"train.max_steps", "train.output_dir"}  # copied here: a moved run
    assert not list((run / "checkpoints").glob(".staging_*"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # all parse
    steps = sorted(losses(records))
    assert steps == [1, 2, 3, 4, 5, 6]
    tokens = [r["num_tokens"] for r in records if "num_tokens" in r]
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)  # counted on from the checkpoint, not from 0


def test_rerun_under_home_relative_output_dir_is_refused(
    capsys: pytest.CaptureFixture[str], finished_run: Path, tiny_model_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    run = copy_run(finished_run, tmp_path)
    cfg = write_config(tmp_path, tiny_model_dir)
    before = snapshot(run)
    code, _, err = cli(capsys, "train", cfg, "--set", "train.output_dir=~/run")
    assert_refused(code, err, "train.output_dir", "--resume")
    assert snapshot(run) == before


def test_batch_larger_than_the_data(capsys: pytest.CaptureFixture[str], ray_session: None, tiny_model_dir: Path, tmp_path: Path) -> None:
    code, _, err = cli(capsys, "train", write_config(tmp_path, tiny_model_dir), "--set", "train.micro_batch_size=4000")
    assert_refused(code, err, "train.micro_batch_size", "lower those or add data")
    assert not (tmp_path / "run").exists()


def test_generate_reference_its_extract_misses(capsys: pytest.CaptureFixture[str], ray_session: None,
                                               tiny_model_dir: Path, tmp_path: Path) -> None:
    # GSM8K references end with "#### N"; this pattern matches none of them: refused once the data is read,
    # naming the metric's key and the first reference's file:line, before training (no run folder).
    generate = "eval.generate={metrics: [rouge_l, {type: exact_match, extract: 'ANSWER: (\\d+)'}]}"
    code, _, err = cli(capsys, "train", write_config(tmp_path, tiny_model_dir), "--set", generate)
    assert_refused(code, err, "eval.generate.metrics.1.extract: extract 'ANSWER: (\\\\d+)' does not match the reference "
                   "of 8 of 8 eval prompts, first", "gsm8k/test.jsonl:1")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("setting", "said"),
    [("scaling.num_workers=4", "no autoscaler"), ("scaling.num_workers=1 scaling.use_gpu=true", "no autoscaler"),
     ("scaling.use_gpu=true", "no CUDA GPU")],  # local mode (num_workers 0) runs on this machine
)
def test_cluster_that_cannot_hold_the_workers_fails_at_once(
    capsys: pytest.CaptureFixture[str], ray_session: None, tiny_model_dir: Path, tmp_path: Path, setting: str, said: str
) -> None:
    started = time.monotonic()
    # resource_wait_s bounds the test should the cluster be taken for an autoscaling one.
    settings = [a for s in setting.split() for a in ("--set", s)]
    code, _, err = cli(capsys, "train", write_config(tmp_path, tiny_model_dir), *settings,
                       "--set", "scaling.resource_wait_s=20")
    assert_refused(code, err, setting.split()[-1].split("=")[0], said)
    assert time.monotonic() - started < 60
    assert not (tmp_path / "run").exists()


# Slow tier: a whole sweep's fixed cost (about 45 s on 2 cores, one trial); CI runs it after the default tier.
@pytest.mark.slow
def test_documented_sweep_with_default_relative_output_dir(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`raysft sweep sweeps/lora_rank_lr.yaml` as the README shows it, from another working directory,
    with the default relative output folder: every trial and best/ land in ./runs/sweeps/<name>."""
    sets = [
        "num_samples=1", f"base.model.name_or_path={tiny_model_dir}",
        "base.data.train.limit=64", "base.data.eval.limit=8", 'space={"lora.r": "choice [2, 4]", "train.lr": "loguniform [1e-3, 1e-2]"}', "base.train.max_steps=2", "base.train.eval_every=1",
        "base.train.checkpoint_every=null", "base.train.micro_batch_size=2", "base.train.grad_accum_steps=1",
        "base.train.precision=fp32", "base.tracking.tensorboard=false",
        f"base.data.cache_dir={tmp_path / 'token-cache'}",
    ]
    command = [sys.executable, "-m", "raysft", "sweep", str(REPO / "sweeps" / "lora_rank_lr.yaml")]
    done = subprocess.run([*command, *[a for s in sets for a in ("--set", s)]], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "RAY_ADDRESS": "local"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sweep_dir = tmp_path / "runs" / "sweeps" / "lora_rank_lr"
    rows = (sweep_dir / "results.csv").read_text().splitlines()[1:]
    assert len(rows) == 1 and ",completed," in rows[0], rows
    assert (sweep_dir / "best" / "adapter_model.safetensors").exists()
    assert "\x1b[" not in done.stdout  # plain lines in logs, no cursor movement
