"""scaling.strategy: fsdp (FSDP2 on gloo) on a real local Ray with a real tiny model.

The same numbers as data parallel (DESIGN.md property 2: N workers == 1 worker), sharded checkpoints that
resume exactly (property 4), and a final/ that transformers and PEFT load like any other.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import raysft
from raysft.errors import ConfigError
from raysft.training.checkpoint import MANIFEST, checkpoint_names, verify
from tests.runs import GENERATE_WITH_DIGEST, generation_scores, kill_workers_after_checkpoint, losses, tiny_config

pytestmark = pytest.mark.usefixtures("ray_session")
# eval_every=2: evaluations at steps 0, 2 and 4, each with every rank running the same number of forwards.
ONE_WORKER = ["scaling.num_workers=1", "train.grad_accum_steps=2", "train.eval_every=2"]
TWO_SHARDED = ["scaling.num_workers=2", "scaling.strategy=fsdp", "train.grad_accum_steps=1", "train.eval_every=2"]


def run(model_dir: Path, out: Path, overrides: list[str]) -> raysft.RunResult:
    return raysft.train(tiny_config(model_dir, out, overrides))


def evals(result: raysft.RunResult) -> list[float]:
    return [e["eval_loss"] for e in result.history() if "eval_loss" in e]


def assert_same_run(got: raysft.RunResult, expected: raysft.RunResult) -> None:
    assert losses(got.history()).keys() == losses(expected.history()).keys() == {1, 2, 3, 4}
    for step, loss in losses(expected.history()).items():
        assert losses(got.history())[step] == pytest.approx(loss, abs=1e-5)
    assert evals(got) == pytest.approx(evals(expected), abs=1e-5) and len(evals(got)) == 3


def test_two_fsdp_workers_equal_one_worker_lora(tiny_model_dir: Path, tmp_path: Path) -> None:
    # eval.generate under FSDP: every forward gathers shards, so both ranks step together (synced_gpus) through
    # the 3 batches of 8 prompts (rank 1 runs a stand-in batch) and must give one worker's answers.
    # The sharded run also compiles its decoder layers (train.compile inside FSDP's per-layer hooks): same numbers.
    one = run(tiny_model_dir, tmp_path / "one", [*ONE_WORKER, GENERATE_WITH_DIGEST])
    two = run(tiny_model_dir, tmp_path / "two", [*TWO_SHARDED, GENERATE_WITH_DIGEST, "train.compile=true"])
    assert_same_run(two, one)
    assert generation_scores(two) == generation_scores(one) and len(generation_scores(one)) == 3
    # final/ is a plain PEFT adapter gathered from the shards, with the weights one worker trained.
    a = load_file(str(one.final_dir / "adapter_model.safetensors"))
    b = load_file(str(two.final_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    PeftModel.from_pretrained(base, str(two.final_dir))  # loads as any adapter does


@pytest.mark.slow
def test_two_fsdp_workers_equal_one_worker_full_fine_tune(tiny_model_dir: Path, tmp_path: Path) -> None:
    full = ["lora.enabled=false", "train.lr=1e-3"]
    one = run(tiny_model_dir, tmp_path / "one", [*ONE_WORKER, *full])
    two = run(tiny_model_dir, tmp_path / "two", [*TWO_SHARDED, *full])
    assert_same_run(two, one)
    a = AutoModelForCausalLM.from_pretrained(one.final_dir, dtype=torch.float32).state_dict()
    b = AutoModelForCausalLM.from_pretrained(two.final_dir, dtype=torch.float32).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[name], base[name]) for name in a)  # every weight was trainable, and moved
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_fsdp_resumes_exactly_from_sharded_checkpoints(tiny_model_dir: Path, tmp_path: Path) -> None:
    common = [*TWO_SHARDED, "train.max_steps=16", "train.checkpoint_every=2", "train.checkpoints_to_keep=2"]
    straight = run(tiny_model_dir, tmp_path / "straight", common)

    interrupted = tmp_path / "interrupted"
    kill_workers_after_checkpoint(lambda: run(tiny_model_dir, interrupted, common), interrupted, step=4)
    checkpoint = interrupted / "checkpoints" / checkpoint_names(str(interrupted / "checkpoints"))[-1]
    # Both ranks wrote their own shard; Ray Train merged the two folders into one checkpoint.
    assert {p.name for p in (checkpoint / "sharded").iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    assert json.loads((checkpoint / MANIFEST).read_text())["ranks"] == 2
    assert verify(checkpoint)
    shard = checkpoint / "sharded" / "__1_0.distcp"
    intact = shard.read_bytes()
    shard.write_bytes(intact[:-1] + bytes([intact[-1] ^ 1]))  # the other rank's shard, one bit flipped...
    assert not verify(checkpoint)  # ...is caught by that rank's own manifest
    shard.write_bytes(intact)
    assert verify(checkpoint)

    with pytest.raises(ConfigError, match="scaling.strategy"):
        run(tiny_model_dir, interrupted, [*common, "train.resume=true", "scaling.strategy=ddp"])
    resumed = run(tiny_model_dir, interrupted, [*common, "train.resume=true"])
    expected, got = losses(straight.history()), losses(resumed.history())
    assert sorted(got) == sorted(expected) == list(range(1, 17))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-5)


@pytest.mark.slow  # three runs, two of them sharded: about a minute on 2 cores
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_fsdp_checkpoints_resume_on_another_number_of_workers(tiny_model_dir: Path, tmp_path: Path, lora: bool) -> None:
    # DESIGN.md property 7 with shards: written by 2 FSDP ranks, continued by 1 (still sharded: an elastic run's
    # checkpoints stay in one format) and then whole in the driver; the same losses as one unsharded run.
    common = ["train.micro_batch_size=1", "train.global_batch_size=2", "train.lr_schedule=constant",
              "train.checkpoint_every=2", "train.checkpoints_to_keep=null", "scaling.strategy=fsdp",
              *([] if lora else ["lora.enabled=false", "train.lr=1e-3"])]
    straight = run(tiny_model_dir, tmp_path / "straight", [*common, "scaling.num_workers=0", "train.max_steps=6"])
    out = tmp_path / "resized"
    run(tiny_model_dir, out, [*common, "scaling.num_workers=2", "train.max_steps=3"])  # checkpoint at step 2
    run(tiny_model_dir, out, [*common, "scaling.num_workers=1", "train.max_steps=5", "train.resume=true"])
    newest = out / "checkpoints" / "step_000004"
    assert json.loads((newest / MANIFEST).read_text())["ranks"] == 1 and (newest / "sharded").is_dir()
    resumed = run(tiny_model_dir, out, [*common, "scaling.num_workers=0", "train.max_steps=6", "train.resume=true"])
    expected, got = losses(straight.history()), losses(resumed.history())
    assert sorted(got) == list(range(1, 7))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-5), step


def test_fsdp_refuses_what_it_cannot_shard(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="adamw_8bit"):
        tiny_config(tiny_model_dir, tmp_path / "x", [*TWO_SHARDED, "train.optimizer=adamw_8bit"])
    with pytest.raises(ConfigError, match="fsdp_cpu_offload: only applies"):
        tiny_config(tiny_model_dir, tmp_path / "x", ["scaling.fsdp_cpu_offload=true"])


@pytest.mark.slow
def test_fsdp_trains_new_tokens_as_one_worker_does(tiny_base_model_dir: Path, tmp_path: Path) -> None:
    """A base model whose tokenizer gets the ChatML markers: the embeddings are grown before sharding, and the new
    rows (PEFT trainable tokens in the sharded root) train on 2 workers as on 1."""
    one = run(tiny_base_model_dir, tmp_path / "one", ONE_WORKER)
    two = run(tiny_base_model_dir, tmp_path / "two", TWO_SHARDED)
    assert_same_run(two, one)
    a = load_file(str(one.final_dir / "adapter_model.safetensors"))
    b = load_file(str(two.final_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any("trainable_tokens_delta" in name for name in a)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-4, msg=name)
