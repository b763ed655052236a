"""The memory planner (`raysft plan`): parameter counts against real models, bytes by hand, the CLI.

No Ray. Models are built on the meta device (no weights) where only counts matter; the activation check runs a
real tiny model forward on CPU and counts what autograd keeps.
"""

from __future__ import annotations

import doctest
import json
import math
import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

import raysft.plan
from raysft.cli import main
from raysft.config import load_config, parse_config
from raysft.data.packing import collate
from raysft.errors import ConfigError
from raysft.model import TokenLoss, apply_lora, load_model
from raysft.plan import (
    Setup,
    activation_bytes,
    adapted_linears,
    autocast_copy_bytes,
    dora_weight_copy_bytes,
    grad_bytes,
    lora_params,
    optimizer_bytes,
    parse_size,
    plan,
    read_model_shape,
    shape_from_config_dict,
    weight_bytes,
)
from tests.tiny import _CONFIGS, TINY_ARCHS

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "plan"
TINY = {"vocab_size": 515, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip


def tiny_config_dict(arch: str) -> dict:
    """A tiny config.json as transformers writes it (only non-default keys), as the planner will read it."""
    config = _CONFIGS[arch](**TINY, **({"head_dim": 16} if arch == "gemma" else {}))
    return json.loads(config.to_json_string(use_diff=True))


def meta_model(raw: dict) -> torch.nn.Module:
    config = AutoConfig.for_model(**raw)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def setup(**changes: object) -> Setup:
    base: dict[str, object] = {
        "weight_bytes": 4, "quantization": "none", "double_quant": True, "precision": "fp32", "optimizer": "adamw",
        "lora": True, "lora_r": 8, "lora_dropout": 0.0, "target_modules": "all-linear", "modules_to_save": (),
        "micro_batch_size": 2, "seq_len": 64, "grad_accum_steps": 1,
    }  # fmt: skip
    return Setup(**{**base, **changes})  # type: ignore[arg-type]


def test_docstring_examples_run() -> None:
    assert doctest.testmod(raysft.plan).failed == 0


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_parameter_count_equals_the_real_model(arch: str) -> None:
    raw = tiny_config_dict(arch)
    model = meta_model(raw)
    assert shape_from_config_dict(raw).num_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("model_type", ["qwen3", "gemma2", "olmo2", "smollm3"])
def test_parameter_count_of_other_families(model_type: str) -> None:
    raw = json.loads(AutoConfig.for_model(model_type, **TINY, head_dim=16, pad_token_id=None).to_json_string(use_diff=True))
    assert shape_from_config_dict(raw).num_params == sum(p.numel() for p in meta_model(raw).parameters())


def test_parameter_count_of_llama3_8b_equals_the_real_model() -> None:
    raw = json.loads((EXAMPLES / "llama3-8b-config.json").read_text())
    shape = shape_from_config_dict(raw)
    assert shape.num_params == sum(p.numel() for p in meta_model(raw).parameters()) == 8_030_261_248


@pytest.mark.parametrize(("arch", "targets"), [
    ("llama", "all-linear"), ("llama", ["q_proj", "v_proj"]), ("llama", ["o_proj", "down_proj", "lm_head"]),
    ("qwen2", "all-linear"), ("gemma", ["gate_proj", "up_proj"]), ("phi", "all-linear"), ("phi", ["dense", "fc2"]),
])  # fmt: skip
@pytest.mark.parametrize("dora", [False, True])
def test_lora_trainable_count_equals_peft(arch: str, targets: str | list[str], dora: bool) -> None:
    raw = tiny_config_dict(arch)
    peft_config = LoraConfig(r=8, target_modules=targets, use_dora=dora, task_type="CAUSAL_LM")
    peft_model = get_peft_model(meta_model(raw), peft_config)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    plan_setup = setup(target_modules=targets if isinstance(targets, str) else tuple(targets), use_dora=dora)
    assert lora_params(shape_from_config_dict(raw), plan_setup) == trainable


def test_bytes_by_hand_for_a_tiny_llama() -> None:
    shape = shape_from_config_dict(tiny_config_dict("llama"))
    p = shape.num_params  # 2 x (4 x 64 x 64 ... ) counted by the test above; here the bytes per parameter
    full = setup(lora=False)
    assert (weight_bytes(shape, full), grad_bytes(shape, full), optimizer_bytes(shape, full)) == (4 * p, 4 * p, 8 * p)
    bf16 = setup(lora=False, weight_bytes=2)
    assert (weight_bytes(shape, bf16), grad_bytes(shape, bf16), optimizer_bytes(shape, bf16)) == (2 * p, 2 * p, 4 * p)

    lora = setup()  # adapters: fp32, whatever the base's dtype
    adapter = lora_params(shape, lora)
    assert adapter == 2 * 8 * ((64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 128) * 2 + (128 + 64))
    assert weight_bytes(shape, lora) == 4 * p + 4 * adapter
    assert (grad_bytes(shape, lora), optimizer_bytes(shape, lora)) == (4 * adapter, 8 * adapter)
    dora = setup(use_dora=True)  # + a magnitude per output feature of every adapted linear, fp32, trained
    magnitudes = 2 * (64 + 32 * 2 + 64 + 128 * 2 + 64)
    trained = adapter + magnitudes
    assert lora_params(shape, dora) == trained
    assert (weight_bytes(shape, dora), grad_bytes(shape, dora), optimizer_bytes(shape, dora)) == (4 * p + 4 * trained, 4 * trained, 8 * trained)

    # QLoRA: decoder linear weights at 4 bits + absmax per 64 (8-bit, + fp32 per 256 absmax); the rest fp32
    qlora = setup(quantization="4bit", weight_bytes=2)
    linear = 2 * (64 * 64 + 64 * 32 * 2 + 64 * 64 + 64 * 128 * 3)
    expected = math.ceil(linear * 0.5 + linear / 64 + linear / 64 / 256 * 4) + (p - linear) * 4 + adapter * 4
    assert weight_bytes(shape, qlora) == expected
    no_double = setup(quantization="4bit", double_quant=False)
    assert weight_bytes(shape, no_double) == math.ceil(linear * 0.5 + linear / 64 * 4) + (p - linear) * 4 + adapter * 4

    # AdamW 8-bit: 2 bytes + 2 fp32 absmax per 256 for tensors of 4096+ elements, fp32 states below that
    eight = setup(lora=False, optimizer="adamw_8bit")
    sizes = [p.numel() for p in meta_model(tiny_config_dict("llama")).parameters()]
    assert optimizer_bytes(shape, eight) == sum(2 * n + 8 * math.ceil(n / 256) if n >= 4096 else 8 * n for n in sizes)
    # Adafactor: rows + columns per matrix, the full vector otherwise
    ada = setup(lora=False, optimizer="adafactor")
    shapes = [tuple(p.shape) for p in meta_model(tiny_config_dict("llama")).parameters()]
    assert optimizer_bytes(shape, ada) == sum(4 * (s[0] + s[1]) if len(s) == 2 else 4 * s[0] for s in shapes)


@pytest.mark.parametrize("method", [{"lora": False}, {}, {"quantization": "4bit"}])
def test_fsdp_shards_weights_grads_and_optimizer_one_over_n(method: dict) -> None:
    shape = shape_from_config_dict(json.loads((EXAMPLES / "llama3-8b-config.json").read_text()))
    chosen = setup(precision="bf16", seq_len=2048, **method)
    single = plan(shape, chosen, "ddp", 1, True)
    for n in (2, 4, 8):
        ddp, fsdp = plan(shape, chosen, "ddp", n, True), plan(shape, chosen, "fsdp", n, True)
        assert fsdp.weights == -(-single.weights // n)
        assert fsdp.grads == -(-single.grads // n)
        assert fsdp.optimizer == -(-single.optimizer // n)
        # not sharded (fsdp's own differ from ddp's: its mixed precision makes the whole forward bf16)
        assert fsdp.activations == plan(shape, chosen, "fsdp", 1, True).activations
        assert ddp.activations == single.activations
        assert ddp.weights == single.weights and ddp.optimizer == single.optimizer  # replicated
        assert ddp.grads == 2 * single.grads  # DDP's bucket copy
    assert plan(shape, chosen, "ddp", 1, True).activations < plan(shape, chosen, "ddp", 1, False).activations


@pytest.mark.parametrize("overrides", [
    {"lora.enabled": False}, {"lora.dropout": 0.05}, {"lora.dropout": 0.0}, {"train.precision": "bf16"},
    {"lora.target_modules": ["q_proj", "v_proj"], "lora.dropout": 0.1},
    {"lora.use_dora": True}, {"lora.use_dora": True, "lora.dropout": 0.0}, {"lora.use_dora": True, "train.precision": "bf16"},
    # use_gpu only passes config's CPU refusal of 4-bit DoRA: a training forward, as here, reads the weights right
    {"lora.use_dora": True, "model.quantization": "4bit", "train.precision": "bf16", "scaling.use_gpu": True},
])  # fmt: skip
def test_activations_equal_what_autograd_keeps(tiny_model_dir: Path, overrides: dict) -> None:
    """The activation formula against a real forward: the bytes of every tensor saved for backward, counted once."""
    raw = {"model": {"name_or_path": str(tiny_model_dir)}, "data": {"train": {"rows": [{"prompt": "a", "response": "b"}]},
           "max_seq_len": 128}, "train": {"micro_batch_size": 2}}  # fmt: skip
    for key, value in overrides.items():
        section, name = key.split(".")
        raw.setdefault(section, {})[name] = value
    cfg = parse_config(raw)
    model = apply_lora(load_model(cfg.model, torch.device("cpu")), cfg.lora, 0)
    loss_module = TokenLoss(model).train()
    ids = torch.randint(3, 500, (2, 128)).tolist()
    batch = collate([{"input_ids": r, "labels": r, "position_ids": list(range(128))} for r in ids], 0)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}
    held: list[torch.Tensor] = []  # so that no storage is freed and its address reused for another within the forward

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() not in params:
            kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            held.append(tensor)
        return tensor

    precision = cfg.train.precision
    with (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
          torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")):
        loss_module(**batch)
    shape, chosen = read_model_shape(cfg), Setup.from_config(cfg)
    predicted = activation_bytes(shape, chosen, "ddp", False, "cpu")
    # Also saved, counted by the planner as temp: autocast's bf16 weight copies, a trained head's fp32 gradient.
    predicted += autocast_copy_bytes(shape, chosen, "ddp", False)
    predicted += 0 if chosen.lora else shape.vocab_size * shape.hidden_size * 4
    predicted += dora_weight_copy_bytes(shape, chosen, "ddp", False)[0]  # temp too: weight-sized, not per token
    if chosen.use_dora:  # saved, and freed again within each linear's forward: the identity PEFT pushes through A, B
        adapted, _ = adapted_linears(shape, chosen)
        width = 2 if chosen.autocast else 4
        predicted += shape.num_layers * sum(lin.d_in * (lin.d_in + chosen.lora_r) * width for lin in adapted)
    assert sum(kept.values()) == pytest.approx(predicted, rel=0.03)


def test_fsdp_refusals_and_cpu_offload(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text(f"model:\n  name_or_path: {tiny_model_dir}\ndata:\n  train:\n    path: x.jsonl\n")
    # A combination `scaling.strategy: fsdp` refuses gets no fsdp rows, and the config's own reason.
    assert main(["plan", str(config), "--gpus", "2", "--set", "train.optimizer=adamw_8bit"]) == 0
    out = capsys.readouterr().out
    assert not re.findall(r"^fsdp +\d", out, re.MULTILINE) and "refuses it for this config" in out and "adamw_8bit" in out

    shape = shape_from_config_dict(json.loads((EXAMPLES / "llama3-8b-config.json").read_text()))
    offload = plan(shape, setup(lora=False, precision="bf16", cpu_offload=True), "fsdp", 8, True)
    on_gpu = plan(shape, setup(lora=False, precision="bf16"), "fsdp", 8, True)
    assert (offload.weights, offload.grads, offload.optimizer, offload.step) == (0, 0, 0, 0)
    assert offload.activations == on_gpu.activations and offload.temp == on_gpu.temp
    assert any("CPU memory" in note for note in offload.notes)


def test_config_reading(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = parse_config({"model": {"name_or_path": str(tiny_model_dir)}, "data": {"train": {"path": "x.jsonl"}}})
    assert read_model_shape(cfg).num_params == sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    hub = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name_or_path": "owner/model"})})
    with pytest.raises(ConfigError, match="--model-config"):
        read_model_shape(hub)
    assert read_model_shape(hub, tiny_model_dir / "config.json") == read_model_shape(cfg).__class__(
        **{**read_model_shape(cfg).__dict__, "source": str(tiny_model_dir / "config.json")})
    (tmp_path / "config.json").write_text(json.dumps({**tiny_config_dict("llama"), "model_type": "mixtral"}))
    with pytest.raises(ConfigError, match="model_type 'mixtral'"):
        read_model_shape(hub, tmp_path)


def test_parse_size() -> None:
    assert parse_size("80GiB") == 80 * 2**30
    assert parse_size("24GB") == 24 * 10**9
    assert parse_size("40G") == parse_size("40 gib") == 40 * 2**30
    assert parse_size("512MiB") == 512 * 2**20
    for bad in ("eighty", "80XB", "", "-1G", "0G"):
        with pytest.raises(ConfigError, match="--gpu-mem"):
            parse_size(bad)


@pytest.mark.parametrize("name", ["llama3-8b-full", "llama3-70b-qlora"])
def test_shipped_plan_examples(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    yaml_path = EXAMPLES / f"{name}.yaml"
    model_config = EXAMPLES / f"{name.split('-')[0]}-{name.split('-')[1]}-config.json"
    assert yaml_path.read_text().startswith(f"# raysft plan examples/plan/{name}.yaml")
    load_config(yaml_path)
    assert main(["plan", str(yaml_path), "--model-config", str(model_config), "--gpu-mem", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "strategy  gpus  ckpt  weights  grads  optim  activ  temp  step  total  fits" in out
    rows = re.findall(r"^(ddp|fsdp) +(\d+) +(yes|no) ", out, re.MULTILINE)
    assert len(rows) == 16 and {gpus for _, gpus, _ in rows} == {"1", "2", "4", "8"}  # x with/without checkpointing
    assert "recommended: " in out


def test_cli(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text(f"model:\n  name_or_path: {tiny_model_dir}\ndata:\n  train:\n    path: x.jsonl\n")
    assert main(["plan", str(config), "--gpus", "1,2", "--gpu-mem", "24GB", "--set", "lora.enabled=false"]) == 0
    out = capsys.readouterr().out
    assert "full fine-tune" in out and "GPU memory 22.4 GiB" in out
    assert re.findall(r"^(ddp|fsdp) +(\d+) ", out, re.MULTILINE) == [("ddp", "1"), ("ddp", "1"), ("ddp", "2"), ("ddp", "2"),
                                                                  ("fsdp", "1"), ("fsdp", "1"), ("fsdp", "2"), ("fsdp", "2")]

    assert main(["plan", str(config), "--gpu-mem", "lots"]) == 2
    err = capsys.readouterr().err
    assert "--gpu-mem" in err and "'lots'" in err and "Traceback" not in err
    assert main(["plan", str(config), "--gpus", "0,2"]) == 2
    assert "--gpus" in capsys.readouterr().err
    assert main(["plan", str(config), "--set", "lora.rank=4"]) == 2
    assert "lora.r" in capsys.readouterr().err  # the config's own errors, as for every subcommand
    hub = tmp_path / "hub.yaml"
    hub.write_text("model:\n  name_or_path: owner/model\ndata:\n  train:\n    path: x.jsonl\n")
    assert main(["plan", str(hub)]) == 2
    assert "--model-config" in capsys.readouterr().err


def test_gpu_mem_needs_a_unit(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="'80' has no unit; write 80GB, 80GiB or 80G"):
        parse_size("80")
    config = tmp_path / "cfg.yaml"
    config.write_text(f"model:\n  name_or_path: {tiny_model_dir}\ndata:\n  train:\n    path: x.jsonl\n")
    assert main(["plan", str(config), "--gpu-mem", "80"]) == 2  # not "nothing fits 80 bytes" and exit 0
    err = capsys.readouterr().err
    assert "--gpu-mem" in err and "no unit" in err and "Traceback" not in err


def test_plan_reads_a_hub_id_from_the_local_hugging_face_cache(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import huggingface_hub.constants

    # The cache's own layout, as `huggingface-cli download owner/tiny config.json` leaves it.
    repo = tmp_path / "hub" / "models--owner--tiny"
    snapshot_dir = repo / "snapshots" / ("0" * 40)
    snapshot_dir.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    (snapshot_dir / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    config = tmp_path / "cfg.yaml"
    config.write_text("model:\n  name_or_path: owner/tiny\ndata:\n  train:\n    path: x.jsonl\n")
    assert main(["plan", str(config), "--gpus", "1"]) == 0
    out = capsys.readouterr().out
    assert "owner/tiny (Hugging Face cache)" in out and "recommended: " in out
    config.write_text("model:\n  name_or_path: owner/not-cached\ndata:\n  train:\n    path: x.jsonl\n")
    assert main(["plan", str(config)]) == 2
    assert "local Hugging Face cache" in capsys.readouterr().err


def test_plan_of_a_sweep_file_points_at_its_base(capsys: pytest.CaptureFixture[str]) -> None:
    sweep = EXAMPLES.parent.parent / "sweeps" / "lora_rank_lr.yaml"
    assert main(["plan", str(sweep)]) == 2
    err = capsys.readouterr().err
    assert "is a sweep file" in err and "raysft plan " in err and "gsm8k_lora.yaml" in err
    assert "unknown key" not in err


@pytest.mark.parametrize("name", ["llama3-8b-full", "llama3-70b-qlora"])
def test_plan_report_fits_100_columns_and_says_why(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    model_config = EXAMPLES / f"{name.rsplit('-', 1)[0]}-config.json"
    assert main(["plan", str(EXAMPLES / f"{name}.yaml"), "--model-config", str(model_config)]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 100
    why = " ".join(out.split("  why: ", 1)[1].split())
    if name == "llama3-8b-full":  # fsdp on 4: ddp cannot hold it, 2 GPUs are only tight, no recompute needed
        assert "ddp needs" in why and "fit only tightly" in why and "no gradient checkpointing" in why
    else:  # ddp on 1 with checkpointing: why ddp, and what it would need without checkpointing
        assert "ddp gathers nothing" in why and "without gradient checkpointing it needs 255.5 GiB" in why


def test_plan_checks_that_the_workers_packed_on_one_gpu_fit_it(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """scaling.gpus_per_worker: 0.25 lets Ray pack 4 workers (e.g. sweep trials) on one GPU; Ray shares out GPUs by
    count, so the plan says whether 4 of them fit its memory, and which share does when they do not."""
    config = tmp_path / "cfg.yaml"
    config.write_text(f"model:\n  name_or_path: {tiny_model_dir}\ndata:\n  train:\n    path: x.jsonl\n"
                      "scaling:\n  use_gpu: true\n  gpus_per_worker: 0.25\n")
    cfg = load_config(config)
    own = plan(read_model_shape(cfg), Setup.from_config(cfg), "ddp", 1, False)
    assert main(["plan", str(config), "--gpus", "1", "--gpu-mem", "80GiB"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert (f"gpu sharing: scaling.gpus_per_worker 0.25 packs up to 4 workers (e.g. sweep trials) on one GPU: 4 x "
            f"{own.total / 2**30:.1f} GiB = {4 * own.total / 2**30:.1f} GiB of 80.0 GiB: fits") in out
    # A GPU that holds two of them, not four: the share that fits.
    two = f"{(2.5 * own.total) / 2**30:.3f}GiB"
    assert main(["plan", str(config), "--gpus", "1", "--gpu-mem", two]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "does not fit; set scaling.gpus_per_worker: 0.5 (packs 2)" in out
    # Whole GPUs per worker (or none) pack nothing: no sharing line.
    assert main(["plan", str(config), "--gpus", "1", "--set", "scaling.gpus_per_worker=1"]) == 0
    assert "gpu sharing" not in capsys.readouterr().out
