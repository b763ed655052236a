"""Hostile inputs to generate/export/report: every one is a clear error (exit 2, no traceback), and
nothing raysft did not write is ever deleted or overwritten. One real tiny run serves every test."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import raysft
from raysft.config import ModelConfig
from raysft.infer import EXPORT_MARKER, chat_generate, load_for_inference
from raysft.model_source import check_model_source, weights_problems
from raysft.tokenizer import load_tokenizer
from tests.runs import assert_refused, cli, snapshot, tiny_config

# Distinctive, so a prompt rendered with the base model's template (ChatML) cannot pass for it.
TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}BOT: {{ m['content'] }}\n"
    "{% else %}USER: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}BOT: {% endif %}"
)


@pytest.fixture(scope="module")
def run_dir(ray_session: None, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished train run (config.yaml, metrics.jsonl, checkpoints/, final/) trained with TEMPLATE."""
    cfg = tiny_config(tiny_model_dir, tmp_path_factory.mktemp("bad-io") / "run", ["train.max_steps=2"])
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"chat_template": TEMPLATE})})
    return raysft.train(cfg).output_dir


# --- export ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_export_never_touches_a_folder_of_user_files(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str]
) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    before = snapshot(tmp_path, run_dir)
    code, _, err = cli(capsys, "export", run_dir, "--merge", mine, *flags)
    assert_refused(code, err, "--merge", mine, EXPORT_MARKER)
    assert snapshot(tmp_path, run_dir) == before
    assert (mine / "notes.txt").read_text() == "my notes"


@pytest.mark.parametrize("where", ["run", "final", "new_subfolder", "parent", "symlink"])
@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_export_refuses_the_run_folder_inside_or_above_it(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str, flags: list[str]
) -> None:
    (tmp_path / "symlink").symlink_to(run_dir, target_is_directory=True)
    target = {
        "run": run_dir, "final": run_dir / "final", "new_subfolder": run_dir / "merged",
        "parent": run_dir.parent, "symlink": tmp_path / "symlink",
    }[where]
    before = snapshot(run_dir.parent, tmp_path)
    code, _, err = cli(capsys, "export", run_dir, "--merge", target, *flags)
    assert_refused(code, err, "--merge", target, "run folder")
    assert snapshot(run_dir.parent, tmp_path) == before


def test_export_twice_needs_overwrite_and_replaces_only_its_own_export(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    merged = tmp_path / "merged"
    merged.mkdir()  # an empty folder is a fine target
    before_run = snapshot(run_dir)
    code, out, err = cli(capsys, "export", run_dir, "--merge-to", merged)
    assert code == 0, err
    assert "deprecated" not in err
    record = json.loads((merged / EXPORT_MARKER).read_text())
    assert record["run_dir"] == str(run_dir.resolve()) and "config.json" in record["files"]

    first = snapshot(merged)
    code, _, err = cli(capsys, "export", run_dir, "--merge", merged)
    assert_refused(code, err, "--merge", merged, "--overwrite")
    assert snapshot(merged) == first

    code, _, err = cli(capsys, "export", run_dir, "--merge", merged, "--overwrite")  # the old spelling still works
    assert code == 0, err
    assert "--merge DIR is deprecated; use --merge-to DIR" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no staging or old folder left beside it
    AutoModelForCausalLM.from_pretrained(merged)
    # The export carries the run's tokenizer, chat template included.
    assert AutoTokenizer.from_pretrained(merged).chat_template == TEMPLATE

    # A file the user added to an export is theirs: --overwrite will not take it.
    (merged / "README.md").write_text("my model card")
    second = snapshot(merged)
    code, _, err = cli(capsys, "export", run_dir, "--merge", merged, "--overwrite")
    assert_refused(code, err, "--merge", "README.md")
    assert snapshot(merged) == second
    assert snapshot(run_dir) == before_run


@pytest.mark.parametrize("kind", ["missing", "plain_folder", "model_folder", "unfinished_run", "file"])
def test_export_of_something_that_is_not_a_run(
    run_dir: Path, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    source = tmp_path / "source"
    if kind == "plain_folder":
        source.mkdir()
        (source / "data.txt").write_text("x")
    elif kind == "model_folder":
        source = tiny_model_dir
    elif kind == "unfinished_run":
        source.mkdir()
        shutil.copy2(run_dir / "config.yaml", source / "config.yaml")
    elif kind == "file":
        source.write_text("x")
    code, _, err = cli(capsys, "export", source, "--merge", tmp_path / "out")
    assert_refused(code, err, "run_dir", source)
    assert not (tmp_path / "out").exists()


def test_export_of_a_full_fine_tune_says_what_to_do(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    full = tmp_path / "full"
    shutil.copytree(run_dir / "final", full / "final")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["lora"]["enabled"] = False
    (full / "config.yaml").write_text(yaml.safe_dump(config))
    code, _, err = cli(capsys, "export", full, "--merge", tmp_path / "out")
    assert_refused(code, err, "run_dir", full, "full fine-tune")
    assert not (tmp_path / "out").exists()


# --- generate ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["missing", "file", "run_folder"])
def test_generate_with_a_bad_adapter(
    run_dir: Path, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    adapter = {"missing": tmp_path / "nope", "file": run_dir / "final" / "adapter_config.json", "run_folder": run_dir}[kind]
    code, _, err = cli(capsys, "generate", "--model", tiny_model_dir, "--adapter", adapter, "--prompt", "hi")
    assert_refused(code, err, "--adapter", adapter)
    if kind == "run_folder":
        assert str(run_dir / "final") in err  # points at the adapter inside the run


@pytest.mark.parametrize("model", ["./no/such/dir", "/abs/missing/model", "models/a/b"])
def test_generate_with_a_model_path_that_does_not_exist(
    model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "generate", "--model", model, "--prompt", "hi")
    assert_refused(code, err, "--model", model, "does not exist")


def test_generate_renders_prompts_with_the_runs_chat_template(
    run_dir: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ModelConfig(name_or_path=str(tiny_model_dir))
    assert load_tokenizer(base).chat_template != TEMPLATE  # else this test would prove nothing
    model, tokenizer = load_for_inference(base, run_dir / "final")
    assert tokenizer.chat_template == TEMPLATE
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "USER: hi\nBOT: "
    tokenizer.padding_side = "right"
    assert len(chat_generate(model, tokenizer, ["hi", "what is 2+2?"], max_new_tokens=2)) == 2
    assert tokenizer.padding_side == "right"  # restored after generating left-padded

    code, out, err = cli(capsys, "generate", "--model", tiny_model_dir, "--adapter", run_dir / "final",
                         "--prompt", "hi", "--max-new-tokens", "2")
    assert code == 0, err
    assert "> hi" in out
    # Without --model, the base model is the one the run's config.yaml names: the same answer.
    code, same_out, err = cli(capsys, "generate", "--adapter", run_dir / "final", "--prompt", "hi", "--max-new-tokens", "2")
    assert code == 0, err
    assert same_out == out


def test_generate_without_model_outside_a_run_or_export_without_target(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(run_dir / "final", adapter)  # an adapter with no config.yaml beside it
    code, _, err = cli(capsys, "generate", "--adapter", adapter, "--prompt", "hi")
    assert_refused(code, err, "--model", adapter, "config.yaml")
    code, _, err = cli(capsys, "export", run_dir)
    assert_refused(code, err, "--merge-to")
    code, _, err = cli(capsys, "export", run_dir, "--merge-to", tmp_path / "a", "--merge", tmp_path / "b")
    assert_refused(code, err, "--merge-to", "--merge")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --- report ------------------------------------------------------------------------------------------


def test_report_on_a_train_run_or_a_missing_folder(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(run_dir)
    code, _, err = cli(capsys, "report", run_dir)
    assert_refused(code, err, run_dir, "not a sweep folder", "train run", run_dir / "metrics.jsonl")
    assert snapshot(run_dir) == before

    code, _, err = cli(capsys, "report", tmp_path / "missing")
    assert_refused(code, err, tmp_path / "missing", "does not exist")
    assert not (tmp_path / "missing").exists()


def test_report_tolerates_a_torn_last_metrics_line(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A sweep folder as `raysft sweep` leaves it, built from the real run: one completed trial.
    sweep = tmp_path / "sweep"
    trial = sweep / "trials" / "trial_0"
    shutil.copytree(run_dir / "final", trial / "final")
    shutil.copy2(run_dir / "config.yaml", trial / "config.yaml")
    metrics = (run_dir / "metrics.jsonl").read_text()
    (trial / "metrics.jsonl").write_text(metrics + '{"step": 9, "eval_lo')  # killed mid-append
    (trial / "trial.json").write_text(json.dumps({"name": "trial_0", "params": {"train.lr": 0.01}, "started": 0.0}))
    (sweep / "sweep.yaml").write_text(yaml.safe_dump(
        {"metric": "eval_loss", "mode": "min", "space": {"train.lr": {"loguniform": [1e-4, 1e-1]}}}
    ))
    code, out, err = cli(capsys, "report", sweep)
    assert code == 0, err
    with (sweep / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["trial"], r["status"], r["steps"]) for r in rows] == [("trial_0", "completed", "2")]
    assert (sweep / "best" / "adapter_config.json").is_file()
    assert "best: trial_0" in out
    code, _, err = cli(capsys, "report", sweep)  # again: best/ is replaced whole, nothing left beside it
    assert code == 0, err
    assert (sweep / "best" / "adapter_config.json").is_file()
    assert sorted(p.name for p in sweep.iterdir()) == ["best", "report.md", "report.png", "results.csv", "sweep.yaml", "trials"]


# --- check_model_source ------------------------------------------------------------------------------


def test_check_model_source(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "ggufs").mkdir()
    (tmp_path / "ggufs" / "m.Q4.gguf").write_bytes(b"GGUF")
    (tmp_path / "notes.txt").write_text("x")

    def problems(name: str, gguf_file: str | None = None) -> list[str]:
        return check_model_source(ModelConfig(name_or_path=name, gguf_file=gguf_file), "--model")

    for fine in [str(tiny_model_dir), "owner/name", "gpt2", "ggufs/m.Q4.gguf", str(tmp_path / "ggufs" / "m.Q4.gguf")]:
        assert problems(fine) == [], fine
    assert problems("ggufs", gguf_file="m.Q4.gguf") == []

    for missing in ["./no/such/dir", "/abs/missing", "../missing", "~/missing", "a/b/c", "missing.gguf"]:
        (found,) = problems(missing)
        assert found.startswith("--model: ") and repr(missing) in found and "does not exist" in found, found
    assert "not expanded" in problems("~/missing")[0]
    assert "not a model folder" in problems("empty")[0]
    assert "is a file" in problems("notes.txt")[0]
    assert "m.Q4.gguf" in problems("ggufs")[0]  # names the file to choose
    assert "other.gguf" in problems("ggufs", gguf_file="other.gguf")[0]
    # The default key is the config's, as the train pre-flight reports it.
    assert check_model_source(ModelConfig(name_or_path="./nope"))[0].startswith("model.name_or_path: ")


def test_sharded_weights_each_shard_checked(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    assert weights_problems(model) == [f"{model / 'model-00002-of-00002.safetensors'} is missing (listed in "
                                       "model.safetensors.index.json); copy or download the model again"]
    (model / "model-00002-of-00002.safetensors").write_bytes(b"")  # a download that never began
    (problem,) = check_model_source(ModelConfig(name_or_path=str(model)))
    assert problem.startswith(f"model.name_or_path: {model / 'model-00002-of-00002.safetensors'} is not a complete "
                              "safetensors file (Error while deserializing header: header too small; 0 bytes)")
