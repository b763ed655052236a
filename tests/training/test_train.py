"""The training loop on a real local Ray with real tiny transformers models.

DESIGN.md correctness properties 2 (token-weighted accumulation and workers), 4 (resume) and 5 (LoRA).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from torch._dynamo.utils import counters as dynamo_counters
from transformers import AutoModelForCausalLM, AutoTokenizer

import raysft
from raysft.config import GenerateMetricConfig, ModelConfig, parse_config
from raysft.errors import ConfigError
from raysft.evaluation import score_generations
from raysft.infer import load_for_inference
from raysft.model import load_model
from raysft.training.checkpoint import checkpoint_names, verify
from raysft.training.step import EpochOrder
from tests import metric_functions
from tests.runs import (
    GENERATE_WITH_DIGEST,
    WorkerKiller,
    generation_scores,
    kill_workers_after_checkpoint,
    losses,
    step_seconds,
    tiny_config,
)

pytestmark = pytest.mark.usefixtures("ray_session")


def run(model_dir: Path, out: Path, overrides: list[str] | None = None) -> raysft.RunResult:
    return raysft.train(tiny_config(model_dir, out, overrides))


def assert_learned(result: raysft.RunResult) -> None:
    """Finite training losses, and the same eval set scores better after training than before."""
    assert all(np.isfinite(list(losses(result.history()).values())))
    evals = [e["eval_loss"] for e in result.history() if "eval_loss" in e]
    assert len(evals) == 2 and evals[1] < evals[0]


def test_grad_accumulation_equals_one_big_batch(tiny_model_dir: Path, tmp_path: Path) -> None:
    big = run(tiny_model_dir, tmp_path / "big", ["train.micro_batch_size=4", "train.grad_accum_steps=1"])
    accum = run(tiny_model_dir, tmp_path / "accum", ["train.micro_batch_size=1", "train.grad_accum_steps=4"])
    assert losses(big.history()).keys() == {1, 2, 3, 4}
    for step, loss in losses(big.history()).items():
        assert losses(accum.history())[step] == pytest.approx(loss, abs=1e-5)
    a = load_file(str(big.final_dir / "adapter_model.safetensors"))
    b = load_file(str(accum.final_dir / "adapter_model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)


def test_two_workers_equal_one_worker(tiny_model_dir: Path, tmp_path: Path) -> None:
    # A shuffle window of 8 rows: the workers stream the epoch window by window (raysft/data/stream.py).
    # eval.generate: 8 prompts in batches of 3, so the two workers generate 2 and 1 batches.
    one = run(tiny_model_dir, tmp_path / "one", ["scaling.num_workers=1", "train.grad_accum_steps=2", "data.shuffle_window=8",
                                                 "train.eval_every=4", GENERATE_WITH_DIGEST])
    # The two DDP workers also compile their decoder layers (train.compile): the same numbers as one eager worker.
    two = run(tiny_model_dir, tmp_path / "two", ["scaling.num_workers=2", "train.grad_accum_steps=1", "data.shuffle_window=8",
                                                 "train.eval_every=4", GENERATE_WITH_DIGEST, "train.compile=true"])
    for step, loss in losses(one.history()).items():
        assert losses(two.history())[step] == pytest.approx(loss, abs=1e-5)
    evals_one = [e["eval_loss"] for e in one.history() if "eval_loss" in e]
    evals_two = [e["eval_loss"] for e in two.history() if "eval_loss" in e]
    assert evals_two == pytest.approx(evals_one, abs=1e-5) and len(evals_one) == 2  # steps 0 and 4
    assert generation_scores(two) == generation_scores(one)  # the same answers to the same prompts, in order
    assert all(scores["eval_answers_chars"] > 0 for scores in generation_scores(one).values())


def test_a_run_resumed_on_another_number_of_workers_trains_the_same_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    # DESIGN.md property 7: 3 workers -> 2 -> 1 (in the driver) train what one worker trains. A global batch of 3 rows
    # in micro-batches of 1: on 2 workers one of them runs a filler. Dropout on: every micro-batch draws its mask from
    # (seed, step, place), whichever worker computes it. A constant learning rate, so that the parts and the whole
    # run share one schedule. Half a CPU per worker: 3 workers on the session's 2 CPUs.
    common = ["train.micro_batch_size=1", "train.global_batch_size=3", "lora.dropout=0.1", "train.lr_schedule=constant",
              "train.checkpoint_every=2", "train.checkpoints_to_keep=null", "data.shuffle_window=8",
              "scaling.resources_per_worker={CPU: 0.5}"]
    straight = run(tiny_model_dir, tmp_path / "straight", [*common, "scaling.num_workers=0", "train.max_steps=6"])
    expected = losses(straight.history())
    out = tmp_path / "resized"
    parts = [(3, 3), (2, 5), (0, 6)]  # (workers, max_steps): checkpoints at steps 2 and 4 are where each part goes on
    for index, (workers, steps) in enumerate(parts):
        result = run(tiny_model_dir, out, [*common, f"scaling.num_workers={workers}", f"train.max_steps={steps}",
                                           f"train.resume={str(index > 0).lower()}"])
        got = losses(result.history())
        assert sorted(got) == list(range(1, steps + 1))
        assert all(got[step] == pytest.approx(expected[step], abs=1e-5) for step in got), (workers, got, expected)
    # Each resize said and recorded at the step it continued from.
    resizes = [(r["step"], r["resized_from"], r["workers"]) for r in result.history() if "resized_from" in r]
    assert resizes == [(2, 3.0, 2.0), (4, 2.0, 1.0)] and all(r["seconds_lost"] > 0 for r in result.history()
                                                              if "resized_from" in r)
    changes = [json.loads(line)["changes"] for line in (out / "config_history.jsonl").read_text().splitlines()]
    assert [c["scaling.num_workers"] for c in changes] == [{"from": 3, "to": 2}, {"from": 2, "to": 0}]
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["global_batch_size"] == 3
    a = load_file(str(straight.final_dir / "adapter_model.safetensors"))
    b = load_file(str(result.final_dir / "adapter_model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)


def test_a_resume_keeps_the_global_batch_it_started_with(tiny_model_dir: Path, tmp_path: Path) -> None:
    # The default global batch (workers x micro x accumulation) is fixed when the run starts: resumed on 2 workers,
    # each step still trains the 2 rows it trained on 1 (not 4), and changing the global batch itself is refused.
    out = tmp_path / "run"
    run(tiny_model_dir, out, ["scaling.num_workers=0", "train.checkpoint_every=2", "train.max_steps=3"])
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        run(tiny_model_dir, out, ["train.global_batch_size=4", "train.max_steps=4", "train.resume=true"])
    resumed = run(tiny_model_dir, out, ["scaling.num_workers=2", "train.max_steps=4", "train.resume=true"])
    assert [r["trained_tokens"] > 0 for r in resumed.history() if r["step"] == 4] == [True]
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["global_batch_size"] == 2


def test_resume_continues_exactly(tiny_model_dir: Path, tmp_path: Path) -> None:
    # A real worker process (not local mode), killed from outside once step 4's checkpoint is stored; the run
    # is long enough that it is still training then, wherever exactly the kill lands.
    # Windows of 8 rows, and 24 steps of 2 rows cross into a second epoch: the streamed order resumes exactly.
    common = ["scaling.num_workers=1", "train.max_steps=24", "train.checkpoint_every=2", "train.checkpoints_to_keep=2",
              "data.shuffle_window=8"]
    straight = run(tiny_model_dir, tmp_path / "straight", common)
    # Not held to Ray Train's default controller poll: the worker holds one unread report and the controller takes
    # one per poll, so at Ray's 2 s every logged step took 2 s (43 s for steps 2-24). raysft polls every 0.1 s.
    seconds = [s for step, s in step_seconds(straight.history()).items() if step > 1]  # step 1 includes start-up
    assert sum(seconds) < len(seconds) * 2.0 / 2, seconds

    interrupted = tmp_path / "interrupted"
    kill_workers_after_checkpoint(lambda: run(tiny_model_dir, interrupted, common), interrupted, step=4)
    kept = checkpoint_names(str(interrupted / "checkpoints"))
    assert len(kept) == 2 and "step_000024" not in kept  # the two newest, from before the kill

    with pytest.raises(ConfigError, match="--resume"):
        run(tiny_model_dir, interrupted, common)  # never silently restarts over an earlier run
    resumed = run(tiny_model_dir, interrupted, [*common, "train.resume=true"])

    expected, got = losses(straight.history()), losses(resumed.history())
    assert sorted(got) == sorted(expected) == list(range(1, 25))  # no step lost or logged twice
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-5)


def test_worker_killed_mid_run_restarts_from_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    common = ["scaling.num_workers=1", "train.max_steps=16", "train.checkpoint_every=2"]
    straight = run(tiny_model_dir, tmp_path / "straight", common)
    recovered_dir = tmp_path / "recovered"
    # Step 4's checkpoint stored means step 2's is registered: the restart resumes from a checkpoint.
    with WorkerKiller(lambda: (recovered_dir / "checkpoints" / "step_000004" / "manifest.json").exists()) as killer:
        recovered = run(tiny_model_dir, recovered_dir, [*common, "scaling.max_failures=1"])
    assert killer.killed  # the worker really died once, and Ray Train restarted it from the checkpoint
    for step, loss in losses(straight.history()).items():
        assert losses(recovered.history())[step] == pytest.approx(loss, abs=1e-5)


def test_damaged_checkpoints_of_a_ray_train_run_are_set_aside_and_it_resumes(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # With Ray Train workers, Ray's own record of the run's checkpoints (checkpoint_manager_snapshot.json) hands
    # the newest back to the workers, and refuses to start when one it lists was removed, advising to delete them
    # all. raysft sets the damaged newest aside, drops it and the one removed by hand from Ray's record, and goes on.
    out, common = tmp_path / "run", ["scaling.num_workers=1", "train.checkpoint_every=1", "train.checkpoints_to_keep=null"]
    first_losses = losses(run(tiny_model_dir, out, common).history())  # 4 steps: checkpoints at steps 1, 2 and 3
    root = out / "checkpoints"
    (root / "step_000003" / "rng.pt").unlink()
    shutil.rmtree(root / "step_000001")  # what the old advice told users to do
    capsys.readouterr()
    resumed = run(tiny_model_dir, out, [*common, "train.max_steps=5", "train.resume=true"])
    err = capsys.readouterr().err
    assert f"checkpoint step_000003 is damaged (rng.pt is missing); kept as {root / 'damaged_step_000003'}" in err
    assert "checkpoint step_000001 is no longer in" in err and "Traceback" not in err
    # It continued from step 2, the newest checkpoint that verifies: step 3 was trained again, identically.
    assert sorted(losses(resumed.history())) == [1, 2, 3, 4, 5]
    assert losses(resumed.history())[3] == pytest.approx(first_losses[3], abs=1e-5)
    assert (root / "damaged_step_000003" / "manifest.json").is_file()  # set aside, not deleted
    assert verify(root / "step_000003") and verify(root / "step_000004")


def test_checkpoint_with_broken_manifest_is_not_resumed(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = run(tiny_model_dir, out, ["train.checkpoint_every=1"])  # checkpoints at steps 2 and 3 are kept
    first_losses = losses(first.history())  # read now: history() rereads the folder the resume rewrites
    root = out / "checkpoints"
    newest, previous = root / "step_000003", root / "step_000002"
    (newest / "optimizer.pt").write_bytes(b"torn write")
    assert not verify(newest) and verify(previous)
    resumed = run(tiny_model_dir, out, ["train.checkpoint_every=1", "train.max_steps=5", "train.resume=true"])
    # It continued from step 2, the newest checkpoint that verifies: step 3 was trained again, identically.
    assert sorted(losses(resumed.history())) == [1, 2, 3, 4, 5]
    assert losses(resumed.history())[3] == pytest.approx(first_losses[3], abs=1e-5)


def test_lora_keeps_base_weights_and_merge_matches(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = run(tiny_model_dir, tmp_path / "run")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    ids = torch.randint(0, base.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = base(ids).logits
    adapted = PeftModel.from_pretrained(base, str(result.final_dir)).eval()
    for name, tensor in adapted.get_base_model().state_dict().items():
        if "lora_" not in name:
            key = name.replace("base_layer.", "")
            torch.testing.assert_close(tensor, original[key], atol=0, rtol=0)

    merged_dir = raysft.merge_adapter(result.output_dir, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(base_logits, adapted(ids).logits)  # the adapter did learn something


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma", "phi"])
def test_lora_on_each_architecture(tiny_model_factory, arch: str, tmp_path: Path) -> None:
    result = run(tiny_model_factory(arch), tmp_path / arch, ["train.max_steps=3", "train.eval_every=3"])
    assert_learned(result)
    assert (result.final_dir / "adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.quantization=4bit", "train.precision=bf16"],
        ["train.optimizer=adamw_8bit"],
        ["train.optimizer=adafactor"],
        ["train.precision=bf16", "model.gradient_checkpointing=true"],
        ["lora.enabled=false", "train.lr=1e-3"],
    ],
    ids=["qlora-4bit", "adamw-8bit", "adafactor", "bf16-gradckpt", "full-finetune"],
)
def test_training_variants(tiny_model_dir: Path, tmp_path: Path, overrides: list[str]) -> None:
    result = run(tiny_model_dir, tmp_path / "run", ["train.max_steps=3", "train.eval_every=3", *overrides])
    assert_learned(result)
    weights = "model.safetensors" if "lora.enabled=false" in overrides else "adapter_model.safetensors"
    assert (result.final_dir / weights).exists()


def test_compiled_layers_train_evaluate_and_generate_like_eager_ones(tiny_model_dir: Path, tmp_path: Path) -> None:
    """train.compile: the same losses, evaluations and generated answers as the eager run (fp32 on CPU), with
    gradient checkpointing wrapped around the compiled layers."""
    common = ["train.eval_every=2", GENERATE_WITH_DIGEST]
    eager = run(tiny_model_dir, tmp_path / "eager", common)
    graphs_before = dynamo_counters["stats"]["unique_graphs"]
    compiled = run(tiny_model_dir, tmp_path / "compiled", [*common, "train.compile=true", "model.gradient_checkpointing=true"])
    assert dynamo_counters["stats"]["unique_graphs"] > graphs_before  # local mode: the layers compiled in this process
    assert losses(compiled.history()).keys() == {1, 2, 3, 4}
    for step, loss in losses(eager.history()).items():
        assert losses(compiled.history())[step] == pytest.approx(loss, abs=1e-4)
    evals = {e["step"]: e["eval_loss"] for e in eager.history() if "eval_loss" in e}
    assert {e["step"]: e["eval_loss"] for e in compiled.history() if "eval_loss" in e} == pytest.approx(evals, abs=1e-4)
    assert generation_scores(compiled) == generation_scores(eager)  # generation runs the layers eager: same answers


def test_nonfinite_loss_aborts_or_skips(tiny_model_dir: Path, tmp_path: Path) -> None:
    explode = ["train.lr=1e30", "train.max_grad_norm=null", "train.warmup_steps=0", "train.max_steps=4"]
    with pytest.raises(Exception, match="non-finite"):
        run(tiny_model_dir, tmp_path / "abort", explode)
    skipped = run(tiny_model_dir, tmp_path / "skip", [*explode, "train.on_nonfinite=skip", "train.checkpoint_every=1"])
    flags = [e["skipped"] for e in skipped.history() if "skipped" in e]
    assert flags[0] == 0.0 and 1.0 in flags
    for name in checkpoint_names(str(tmp_path / "skip" / "checkpoints")):
        tensors = load_file(str(tmp_path / "skip" / "checkpoints" / name / "trainable.safetensors"))
        assert all(torch.isfinite(t).all() for t in tensors.values())


@pytest.mark.parametrize("window", [2048, 8])
def test_epoch_order_is_a_permutation_that_changes_per_epoch(window: int) -> None:
    first, again, second = (EpochOrder(50, 3, epoch, window).rows(0, 50).tolist() for epoch in (0, 0, 1))
    assert sorted(first) == list(range(50))
    assert first == again and first != second


def test_windowed_order_is_computed_from_any_position_and_keeps_rows_in_their_window() -> None:
    order = EpochOrder(1000, seed=1, epoch=2, window_rows=128)
    whole = order.rows(0, 1000)
    assert (np.concatenate([EpochOrder(1000, 1, 2, 128).rows(start, start + 7) for start in range(0, 1000, 7)])
            == whole).all()  # a resume at any step computes the same rows without the ones before
    for index in range(len(order._windows)):  # each window is whole chunks of 64 consecutive rows
        rows = order.window(index)
        assert set(rows // 64) == {int(c) for c in order._windows[index]}


def test_metrics_file_has_the_documented_fields(tiny_model_dir: Path, tmp_path: Path, shared_data: Path) -> None:
    generate = ("eval.generate={num_prompts: 6, max_new_tokens: 8, metrics: [exact_match, contains, rouge_l, "
                "{type: exact_match, name: answer, extract: '####\\s*(-?[\\d,.]+)', normalize: [number]}]}")
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", ["train.eval_every=2", generate])
    # Python API: a metric function given as the callable itself.
    cfg.eval.generate.metrics = [*cfg.eval.generate.metrics,
                                 GenerateMetricConfig(type="function", function=metric_functions.reference_length)]
    result = raysft.train(cfg)
    history = result.history()
    train_entries = [e for e in history if "loss" in e]
    eval_entries = [e for e in history if "eval_loss" in e]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "num_tokens"} <= set(train_entries[0])
    assert [e["step"] for e in eval_entries] == [0, 2, 4]
    task_metrics = {"eval_exact_match", "eval_contains", "eval_rouge_l", "eval_answer", "eval_reference_length"}
    for entry in eval_entries:
        assert {"eval_loss", "eval_ppl", "eval_token_accuracy", *task_metrics} <= set(entry)
        assert all(0.0 <= entry[name] <= 1.0 for name in task_metrics - {"eval_reference_length"})
    assert eval_entries[-1]["eval_loss"] < eval_entries[0]["eval_loss"]
    assert not any(name in e for e in train_entries if "eval_loss" not in e for name in task_metrics)
    saved = json.loads((result.output_dir / "data_stats.json").read_text())
    assert saved["rows_read"]["train"] == 48

    # The prompts are the first 6 eval rows in order, each reference its row's answer; every logged score is the
    # score of the answers generations.jsonl records.
    rows = [json.loads(line) for line in (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:6]]
    generated = [json.loads(line) for line in (result.output_dir / "generations.jsonl").read_text().splitlines()]
    assert [g["step"] for g in generated] == [0] * 6 + [2] * 6 + [4] * 6
    for entry in eval_entries:
        at_step = [g for g in generated if g["step"] == entry["step"]]
        assert [g["origin"].rsplit(":", 1)[1] for g in at_step] == ["1", "2", "3", "4", "5", "6"]
        assert [g["reference"] for g in at_step] == [row["answer"] for row in rows]
        assert all(row["question"] in g["prompt"] and g["prompt"].endswith("<|im_start|>assistant\n")
                   for row, g in zip(rows, at_step))
        rescored = score_generations([g["prediction"] for g in at_step], [g["reference"] for g in at_step],
                                     cfg.eval.generate.metrics)
        assert rescored == {name: entry[name] for name in task_metrics}
    assert eval_entries[0]["eval_reference_length"] == sum(len(row["answer"]) for row in rows) / 6
    written = yaml.safe_load((result.output_dir / "config.yaml").read_text())["eval"]["generate"]["metrics"][-1]
    assert written["function"] == "tests.metric_functions:reference_length"  # written as the name that imports it


@pytest.mark.parametrize("workers", [0, 1], ids=["local-mode", "ray-train-worker"])
def test_keeps_the_best_checkpoints_and_exports_the_best(tiny_model_dir: Path, tmp_path: Path, workers: int) -> None:
    # lr 0.2 overshoots after step 1: the best evaluation is not the last one.
    result = run(tiny_model_dir, tmp_path / "run", [
        f"scaling.num_workers={workers}", "train.max_steps=6", "train.eval_every=1", "train.checkpoint_every=1",
        "train.checkpoints_to_keep=2", "train.lr=0.2", "train.warmup_steps=0", "train.final=best"])
    evals = {e["step"]: e["eval_loss"] for e in result.history() if "eval_loss" in e and e["step"] > 0}
    best_step = min(evals, key=evals.__getitem__)
    assert best_step < 6, evals  # the test means something only when the last step is not the best
    checkpointed = [1, 2, 3, 4, 5]  # none at the last step
    best_two = sorted(checkpointed, key=evals.__getitem__)[:2]
    kept = {int(name.split("_")[1]) for name in checkpoint_names(str(tmp_path / "run" / "checkpoints"))}
    assert kept == set(best_two) | {5}  # the 2 best by eval_loss, and the newest
    final = load_file(str(result.final_dir / "adapter_model.safetensors"))
    best = load_file(str(tmp_path / "run" / "checkpoints" / f"step_{best_step:06d}" / "trainable.safetensors"))
    assert len(final) == len(best)
    for name, tensor in best.items():
        # PEFT saves an adapter without its adapter name ("default").
        torch.testing.assert_close(final[name.replace(".default.weight", ".weight")], tensor, atol=0, rtol=0)


def test_dora_rslora_neftune_run_resumes_exactly_and_exports(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The new settings reach the workers, NEFTune's noise resumes exactly (its RNG is in the checkpoint), and the
    DoRA + rsLoRA adapter loads and merges like any other (DESIGN.md properties 4 and 5)."""
    common = ["lora.use_dora=true", "lora.use_rslora=true", "train.neftune_alpha=5", "train.checkpoint_every=2"]
    out = tmp_path / "run"
    expected = losses(run(tiny_model_dir, out, common).history())  # 4 steps, a checkpoint after step 2; read now,
    resumed = run(tiny_model_dir, out, [*common, "train.resume=true"])  # as this rewrites steps 3 and 4 in the folder
    got = losses(resumed.history())
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):  # noisy forwards: equal only if the noise is drawn again from the restored RNG state
        assert got[step] == pytest.approx(expected[step], abs=1e-5)

    config = json.loads((resumed.final_dir / "adapter_config.json").read_text())
    assert config["use_dora"] and config["use_rslora"]
    assert any("lora_magnitude_vector" in name for name in load_file(str(resumed.final_dir / "adapter_model.safetensors")))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, base.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = base(ids).logits
    adapted = PeftModel.from_pretrained(base, str(resumed.final_dir)).eval()
    merged = AutoModelForCausalLM.from_pretrained(raysft.merge_adapter(out, tmp_path / "merged"), dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(base_logits, adapted(ids).logits)


def tool_rows(count: int) -> list[dict[str, Any]]:
    """OpenAI-format tool conversations: a call with reasoning, its result, the answer."""
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    cities = ["Paris", "Lyon", "Rome", "Oslo"]
    rows = []
    for index in range(count):
        city, degrees = cities[index % len(cities)], 10 + index
        rows.append({"tools": json.dumps([tool]), "messages": [
            {"role": "user", "content": f"What is the weather in {city}?"},
            {"role": "assistant", "content": None, "reasoning_content": f"I need the weather in {city}.",
             "tool_calls": [{"id": f"call_{index}", "type": "function",
                             "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]},
            {"role": "tool", "tool_call_id": f"call_{index}", "content": f"{degrees} C, sunny"},
            {"role": "assistant", "content": f"It is {degrees} C and sunny in {city}."},
        ]})
    return rows


def test_base_model_trains_on_tool_calls_with_new_chatml_tokens(tiny_base_model_dir: Path, tmp_path: Path) -> None:
    """A base model (no chat template, no ChatML markers) on tool-call data: raysft's ChatML with its markers added
    as special tokens, the data tokenized with them on Ray Data, their new rows trained and saved in the adapter
    (not whole matrices); the run's final/ loads with raysft's inference path and merges like any adapter."""
    raw = tiny_config(tiny_base_model_dir, tmp_path / "run", ["train.max_steps=3"]).model_dump(mode="json")
    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in tool_rows(16)))
    raw["data"].update(train=[{"path": str(data)}], eval=None, max_seq_len=512)
    result = raysft.train(parse_config(raw))

    tokenizer = AutoTokenizer.from_pretrained(result.final_dir)
    assert [tokenizer.encode(marker, add_special_tokens=False) for marker in ("<|im_start|>", "<|im_end|>")] == [[512], [513]]
    config = json.loads((result.final_dir / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"model.embed_tokens": [512, 513], "lm_head": [512, 513]}
    saved = load_file(str(result.final_dir / "adapter_model.safetensors"))
    assert not any(t.shape[0] == 514 for t in saved.values())
    # The embedding rows train only where the tokens are inputs: the packed data holds the new ids.
    initial = load_model(ModelConfig(name_or_path=str(tiny_base_model_dir)), torch.device("cpu"), num_tokens=514)
    trained_rows = saved["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    assert (trained_rows - initial.get_input_embeddings().weight[512:]).abs().amax(-1).min() > 1e-4

    adapted, loaded_tokenizer = load_for_inference(ModelConfig(name_or_path=str(tiny_base_model_dir)), result.final_dir)
    merged = AutoModelForCausalLM.from_pretrained(raysft.merge_adapter(result.output_dir, tmp_path / "merged")).eval()
    ids = torch.tensor([loaded_tokenizer.apply_chat_template(tool_rows(1)[0]["messages"][:1], add_generation_prompt=True,
                                                             tools=json.loads(tool_rows(1)[0]["tools"]))["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(initial(ids).logits, adapted(ids).logits)


def test_early_stopping_stops_when_eval_loss_rises_and_exports_the_best(tiny_model_dir: Path, tmp_path: Path) -> None:
    # lr 0.2 overshoots after step 1 (as in the test above): eval loss soon stops improving.
    result = run(tiny_model_dir, tmp_path / "run", [
        "train.max_steps=12", "train.eval_every=1", "train.checkpoint_every=1", "train.lr=0.2", "train.warmup_steps=0",
        "train.final=best", "train.early_stopping={metric: eval_loss, patience: 2}"])
    history = result.history()
    evals = {e["step"]: e["eval_loss"] for e in history if "eval_loss" in e}
    # The rule: stop at the evaluation that is the second in a row not below the best so far (step 0's included).
    best, waited, expected = float("inf"), 0, None
    for step in sorted(evals):
        best, waited = (evals[step], 0) if evals[step] < best else (best, waited + 1)
        if waited == 2:
            expected = step
            break
    assert expected is not None and expected < 12, evals
    assert max(evals) == expected and history[-1]["step"] == expected  # nothing trained or logged after it
    assert history[-1]["early_stopped"] == 1.0 and not any("early_stopped" in e for e in history[:-1])
    # final: best exports the best checkpoint's weights (checkpoints at every step up to the stop).
    best_step = min(range(1, expected + 1), key=evals.__getitem__)
    final = load_file(str(result.final_dir / "adapter_model.safetensors"))
    best_weights = load_file(str(tmp_path / "run" / "checkpoints" / f"step_{best_step:06d}" / "trainable.safetensors"))
    for name, tensor in best_weights.items():
        torch.testing.assert_close(final[name.replace(".default.weight", ".weight")], tensor, atol=0, rtol=0)


def test_early_stopping_counts_on_after_resume(tiny_model_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    # min_delta 100: no evaluation improves on step 0's, so every evaluation adds one to the count.
    common = ["train.eval_every=1", "train.checkpoint_every=1", "train.early_stopping={patience: 3, min_delta: 100}"]
    out = tmp_path / "run"
    first = run(tiny_model_dir, out, [*common, "train.max_steps=3"])  # the count reaches 3 at the run's own end
    assert [e["step"] for e in first.history() if "eval_loss" in e] == [0, 1, 2, 3]
    assert not any("early_stopped" in e for e in first.history())
    capsys.readouterr()
    # Resumed from step 2's checkpoint, which holds the count (2): step 3's evaluation is the third without an
    # improvement. A count started afresh at the resume would run on to step 6.
    resumed = run(tiny_model_dir, out, [*common, "train.max_steps=10", "train.resume=true", "tracking.console=true"])
    history = resumed.history()
    assert history[-1]["step"] == 3 and history[-1]["early_stopped"] == 1.0
    assert [e["step"] for e in history if "eval_loss" in e] == [0, 1, 2, 3]
    captured = capsys.readouterr()
    printed = captured.out + captured.err  # raysft's progress lines go to stderr
    assert "early stopping continues: eval_loss best" in printed and "at step 0, 2 evaluation(s) without" in printed
    assert "[raysft] early stopping at step 3: eval_loss did not improve by more than 100 in 3 evaluation(s) " \
           "(patience 3); best " in printed
    assert (resumed.final_dir / "adapter_model.safetensors").exists()
