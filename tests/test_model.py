"""LoRA variants (DoRA, rsLoRA), NEFTune and new special tokens on a real tiny model, in process (no Ray).

Each property is checked where it shows: DoRA's magnitude parameters and what a step does to them, rsLoRA's
scale in the layers' forward, NEFTune's noise as the decoder receives it (measured, against the formula) and
that it exists in training forwards only; new tokens' rows from their mean init through training, saving, loading and
merging. The loop's wiring and exact resume with noise: tests/training/test_train.py.
"""

from __future__ import annotations

import doctest
import pickle
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

import raysft.model
from raysft.config import DataConfig, LoraConfig, ModelConfig, SourceConfig, TrainConfig, to_yaml
from raysft.data.pipeline import cache_key
from raysft.infer import chat_generate, load_for_inference, merge_adapter
from raysft.labels import trained_targets
from raysft.data.packing import collate
from raysft.model import TokenLoss, add_neftune_noise, apply_lora, causal_lm, load_model
from raysft.tokenizer import CHATML_TEMPLATE, load_tokenizer, load_tokenizer_and_new_ids
from raysft.training.recipe import save_final
from raysft.training.optim import build_optimizer
from raysft.training.step import train_step
from tests.runs import tiny_config
from tests.tiny import make_base_tokenizer, make_model

CPU = torch.device("cpu")
HIDDEN = 64  # tests/tiny.py


def build(model_dir: Path, quantization: str = "none", **lora: object) -> nn.Module:
    """The tiny model with adapters, r 4, alpha 8, no dropout (so forwards compare exactly) unless `lora` says."""
    base = load_model(ModelConfig(name_or_path=str(model_dir), quantization=quantization), CPU)  # type: ignore[arg-type]
    return apply_lora(base, LoraConfig(**{"r": 4, "alpha": 8, "dropout": 0.0, **lora}), seed=0)  # type: ignore[arg-type]


def packed_batch(rows: list[list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """One packed row per list of example lengths (position_ids restart per example), random tokens."""
    generator = torch.Generator().manual_seed(seed)
    packed = []
    for lengths in rows:
        ids = torch.randint(3, 500, (sum(lengths),), generator=generator).tolist()
        packed.append({"input_ids": ids, "labels": ids, "position_ids": [p for n in lengths for p in range(n)]})
    return collate(packed, pad_token_id=0)


BATCH = [[40, 24], [64]]


def train(model: nn.Module, steps: int, lr: float = 1e-2) -> list[float]:
    """`steps` optimizer steps of the loop's own train_step on one packed batch: the losses."""
    return train_on(model, packed_batch(BATCH), steps, lr)


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return causal_lm(model)(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits


def lora_layers(model: nn.Module) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def test_docstring_examples_run() -> None:
    assert doctest.testmod(raysft.model).failed == 0


# --------------------------------------------------------------------------------------------- DoRA


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_dora_trains_a_magnitude_per_adapted_linear_and_keeps_the_base(tiny_model_dir: Path, quantization: str) -> None:
    # Training-mode forwards: on CPU an eval forward repacks 4-bit weights (see the test below).
    plain = build(tiny_model_dir, quantization).train()
    dora = build(tiny_model_dir, quantization, use_dora=True).train()
    layers = lora_layers(dora)
    assert len(layers) == 2 * 7  # all-linear on 2 Llama blocks
    magnitudes = {n: p for n, p in dora.named_parameters() if "lora_magnitude_vector" in n}
    assert len(magnitudes) == len(layers) and all(p.requires_grad for p in magnitudes.values())
    for layer in layers:
        # One value per output feature, starting at the row norms of the (dequantized) base weight: DoRA starts as
        # a no-op, which it is only if the 4-bit weight was dequantized right.
        assert layer.lora_magnitude_vector["default"].weight.shape == (layer.out_features,)
    batch = packed_batch(BATCH)
    torch.testing.assert_close(logits(dora, batch), logits(plain, batch), atol=1e-5, rtol=1e-5)

    before = {n: p.detach().clone() for n, p in dora.named_parameters()}
    train(dora, steps=2)
    for name, param in dora.named_parameters():
        if "lora_magnitude_vector" in name or "lora_B" in name:
            assert not torch.equal(param, before[name]), f"{name} did not train"
        elif "lora_" not in name:  # bit for bit (packed 4-bit weights stored as floats may read as NaN)
            assert torch.equal(param.detach().view(torch.uint8), before[name].view(torch.uint8)), f"{name} changed"


def test_why_4bit_dora_is_refused_on_cpu(tiny_model_dir: Path) -> None:
    """config.py refuses lora.use_dora on a 4-bit base without GPUs. When this fails, bitsandbytes or PEFT changed
    (no CPU repacking, or DoRA reading the repacked weights right): the refusal can go."""
    plain, dora = build(tiny_model_dir, "4bit").eval(), build(tiny_model_dir, "4bit", use_dora=True).eval()
    batch = packed_batch(BATCH)
    expected, got = logits(plain, batch), logits(dora, batch)  # inference: bitsandbytes repacks for its CPU kernel
    first = lora_layers(dora)[0].get_base_layer().weight
    if not getattr(first.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU's bitsandbytes does not repack 4-bit weights (no AVX512-BF16)")
    # DoRA at init is a no-op (previous test), but its weight norm now comes from misread weights.
    assert (got - expected).abs().max() > 1e-2


def test_dora_steps_differ_from_plain_lora(tiny_model_dir: Path) -> None:
    plain, dora = train(build(tiny_model_dir), steps=3), train(build(tiny_model_dir, use_dora=True), steps=3)
    assert plain[0] == pytest.approx(dora[0], abs=1e-6)  # both start as the base model
    assert all(abs(a - b) > 1e-4 for a, b in zip(plain[1:], dora[1:]))


# --------------------------------------------------------------------------------------------- rsLoRA


def test_rslora_scales_the_update_by_alpha_over_sqrt_r(tiny_model_dir: Path) -> None:
    plain, rs = build(tiny_model_dir, r=16, alpha=8), build(tiny_model_dir, r=16, alpha=8, use_rslora=True)
    assert all(layer.scaling["default"] == 8 / 16 for layer in lora_layers(plain))
    assert all(layer.scaling["default"] == 8 / 16**0.5 for layer in lora_layers(rs))
    # The scale the forward applies: with B non-zero, output - base output == alpha / sqrt(r) x B A x.
    layer = causal_lm(rs).model.layers[0].self_attn.q_proj
    with torch.no_grad():
        torch.nn.init.normal_(layer.lora_B["default"].weight)
        x = torch.randn(3, HIDDEN)
        delta = layer(x) - layer.base_layer(x)
        update = layer.lora_B["default"](layer.lora_A["default"](x))
    torch.testing.assert_close(delta, 8 / 16**0.5 * update, atol=1e-5, rtol=1e-5)


def test_rslora_steps_differ_from_plain_lora(tiny_model_dir: Path) -> None:
    plain = train(build(tiny_model_dir, r=16, alpha=8), steps=3)
    rs = train(build(tiny_model_dir, r=16, alpha=8, use_rslora=True), steps=3)
    assert plain[0] == pytest.approx(rs[0], abs=1e-6)  # B starts at 0: both are the base model
    # Adam's first update is the same for both (it is scale-free); the forward then scales it 4x more (sqrt(16)).
    assert all(abs(a - b) > 1e-4 for a, b in zip(plain[1:], rs[1:]))


# --------------------------------------------------------------------------------------------- NEFTune


def decoder_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The embeddings the decoder's layers receive for `batch` (a training forward; NEFTune's hook runs first)."""
    seen: list[torch.Tensor] = []
    decoder = causal_lm(model).get_decoder()
    handle = decoder.register_forward_pre_hook(lambda _m, _a, kwargs: seen.append(kwargs["inputs_embeds"]), with_kwargs=True)
    try:
        logits(model, batch)
    finally:
        handle.remove()
    return seen[0]


def test_neftune_noise_has_the_documented_magnitude_per_packed_example(tiny_model_dir: Path) -> None:
    alpha = 5.0
    model = add_neftune_noise(build(tiny_model_dir), alpha).train()
    batch = packed_batch([[96, 32], [128]])
    clean = causal_lm(model).get_input_embeddings()(batch["input_ids"]).detach()
    torch.manual_seed(0)
    noise = decoder_inputs(model, batch) - clean
    # Uniform in [-a, a], a = alpha / sqrt(L x d), L the token's own example: its std is a / sqrt(3).
    for row, start, length in [(0, 0, 96), (0, 96, 32), (1, 0, 128)]:
        bound = alpha / (length * HIDDEN) ** 0.5
        span = noise[row, start : start + length]
        assert span.abs().max() <= bound * (1 + 1e-6) and span.abs().max() > 0.95 * bound
        assert span.std().item() == pytest.approx(bound / 3**0.5, rel=0.05)
    # Not the row's length: the 32-token example gets twice the noise it would get as a quarter of a 128-token row.
    assert noise[0, 96:].std() > 1.8 * noise[1].std()


def test_neftune_changes_training_forwards_only(tiny_model_dir: Path) -> None:
    model = build(tiny_model_dir)
    batch = packed_batch(BATCH)
    clean = logits(model.train(), batch)
    add_neftune_noise(model, 5.0)
    noisy = logits(model, batch)
    assert (noisy - clean).abs().max() > 1e-3
    assert not torch.equal(noisy, logits(model, batch))  # fresh noise every forward
    model.eval()  # evaluation and generation
    torch.testing.assert_close(logits(model, batch), clean, atol=0, rtol=0)
    prompt = batch["input_ids"][:1, :8]
    generated = causal_lm(model).generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, causal_lm(build(tiny_model_dir).eval()).generate(prompt, max_new_tokens=6,
                                                                                  do_sample=False, pad_token_id=0))


def test_neftune_noise_follows_the_seed_and_the_saved_rng_state(tiny_model_dir: Path) -> None:
    model = add_neftune_noise(build(tiny_model_dir), 5.0).train()
    batch = packed_batch(BATCH)

    def noise_after(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return decoder_inputs(model, batch)

    assert torch.equal(noise_after(0), noise_after(0))
    assert not torch.equal(noise_after(0), noise_after(1))  # the loop seeds each worker with seed + rank
    # Checkpoints save torch's RNG state (checkpoint.py, rng.pt): restoring it repeats the noise exactly.
    noise_after(0)
    state = torch.get_rng_state()
    expected = decoder_inputs(model, batch)
    torch.set_rng_state(state)
    assert torch.equal(decoder_inputs(model, batch), expected)


def test_apply_lora_leaves_the_callers_rng_alone(tiny_model_dir: Path) -> None:
    """LoRA init draws from a fork seeded by `seed`, so each worker's dropout and noise stream stays its own."""
    torch.manual_seed(1)
    before = torch.get_rng_state()
    first = build(tiny_model_dir)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(2)
    second = build(tiny_model_dir)
    a = {n: p for n, p in first.named_parameters() if "lora_A" in n}
    b = {n: p for n, p in second.named_parameters() if "lora_A" in n}
    assert a and all(torch.equal(a[n], b[n]) for n in a)  # the same init whatever the caller's RNG


def test_a_short_run_with_neftune_trains_differently(tiny_model_dir: Path) -> None:
    torch.manual_seed(0)
    plain = train(build(tiny_model_dir), steps=3)
    torch.manual_seed(0)
    noisy = train(add_neftune_noise(build(tiny_model_dir), 5.0), steps=3)
    assert all(abs(a - b) > 1e-4 for a, b in zip(plain, noisy))  # step 1 too: its forward is noisy


# --------------------------------------------------------------------------------------------- new special tokens

MARKERS = ["<|im_start|>", "<|im_end|>"]
NEW_IDS = [512, 513]  # the tiny base tokenizer holds 512 tokens


def base_config(model_dir: Path, **changes: object) -> ModelConfig:
    return ModelConfig(name_or_path=str(model_dir), **changes)  # type: ignore[arg-type]


def with_new_tokens(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`batch` with the new tokens as inputs and as targets, at positions of every example."""
    batch = {k: v.clone() for k, v in batch.items()}
    batch["input_ids"][:, 5::7] = NEW_IDS[0]
    batch["input_ids"][:, 9::11] = NEW_IDS[1]
    batch["labels"] = batch["input_ids"].clone()
    return batch


@pytest.fixture(scope="module")
def base_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny base models whose tokenizer has no chat template and no ChatML markers: Llama with an untied head (and
    tied), Qwen2, Gemma (tied, scaled embeddings) and Phi (a head with a bias)."""
    built = {}
    for name, arch, overrides in [("llama", "llama", {}), ("llama-tied", "llama", {"tie_word_embeddings": True}),
                                  ("qwen2", "qwen2", {}), ("gemma", "gemma", {}), ("phi", "phi", {})]:
        path = tmp_path_factory.mktemp(f"base-{name}")
        built[name] = make_model(arch, path, make_base_tokenizer(path), **overrides)
    return built


def test_chatml_fallback_adds_its_markers_as_special_tokens(tiny_base_model_dir: Path, tiny_tokenizer_dir: Path) -> None:
    plain = AutoTokenizer.from_pretrained(tiny_base_model_dir)
    assert plain.chat_template is None and len(plain.encode("<|im_start|>", add_special_tokens=False)) > 1

    tokenizer, new_ids = load_tokenizer_and_new_ids(base_config(tiny_base_model_dir))
    assert tokenizer.chat_template == CHATML_TEMPLATE and new_ids == NEW_IDS and len(tokenizer) == 514
    assert [tokenizer.encode(marker, add_special_tokens=False) for marker in MARKERS] == [[512], [513]]
    assert all(tokenizer.added_tokens_decoder[i].special for i in NEW_IDS)  # template-only: data spelling them is text
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)["input_ids"]
    assert rendered.count(512) == 2 and rendered.count(513) == 1
    assert tokenizer.decode(rendered, skip_special_tokens=True) == "user\nHi\nassistant\n"
    # The Ray Data actors get the tokenizer pickled: the added tokens travel with it.
    assert pickle.loads(pickle.dumps(tokenizer)).encode("<|im_end|>", add_special_tokens=False) == [513]

    none, no_ids = load_tokenizer_and_new_ids(base_config(tiny_base_model_dir, add_special_tokens=[]))
    assert no_ids == [] and len(none) == 512 and len(none.encode("<|im_start|>", add_special_tokens=False)) > 1
    listed, listed_ids = load_tokenizer_and_new_ids(
        base_config(tiny_base_model_dir, add_special_tokens=["<tool_call>", "</tool_call>", "<|endoftext|>"]))
    assert listed_ids == NEW_IDS and listed.convert_tokens_to_ids(["<tool_call>", "</tool_call>"]) == NEW_IDS
    # A tokenizer holding the markers already (and its own template) gets nothing.
    assert load_tokenizer_and_new_ids(base_config(tiny_tokenizer_dir))[1] == []


def test_added_tokens_change_the_data_cache_key(tiny_base_model_dir: Path) -> None:
    data = DataConfig(train=[SourceConfig(rows=[{"question": "Q", "answer": "A"}])])
    keys = {cache_key(data.train, load_tokenizer(base_config(tiny_base_model_dir, add_special_tokens=tokens)), data)
            for tokens in ([], ["<a>"], ["<b>"])}
    assert len(keys) == 3


def test_new_rows_are_the_mean_of_the_others_and_the_same_at_every_load(base_models: dict[str, Path]) -> None:
    cfg = base_config(base_models["llama"])
    plain = load_model(cfg, CPU)
    grown, again = load_model(cfg, CPU, num_tokens=514), load_model(cfg, CPU, num_tokens=514)
    assert grown.config.vocab_size == 514
    for get in (lambda m: m.get_input_embeddings().weight, lambda m: m.get_output_embeddings().weight):
        old, new = get(plain).detach(), get(grown).detach()
        assert new.shape == (514, HIDDEN)
        assert torch.equal(new[:512], old)
        # transformers' mean resizing: the mean, plus noise at 1e-9 of the rows' covariance.
        torch.testing.assert_close(new[512:], old.mean(0).expand(2, -1), atol=1e-4, rtol=0)
        assert torch.equal(get(again).detach(), new)  # seeded: every worker and every later load agree
    assert load_model(cfg, CPU, num_tokens=300).get_input_embeddings().weight.shape[0] == 512  # never shrinks
    full = apply_lora(load_model(cfg, CPU, num_tokens=514), LoraConfig(enabled=False), seed=0)
    assert full.get_input_embeddings().weight.requires_grad  # a full fine-tune trains the new rows with the rest


@pytest.mark.parametrize("name", ["llama", "llama-tied", "qwen2", "gemma", "phi"])
def test_lora_trains_only_the_new_rows_and_keeps_the_base(base_models: dict[str, Path], name: str) -> None:
    tokenizer, new_ids = load_tokenizer_and_new_ids(base_config(base_models[name]))
    base = load_model(base_config(base_models[name]), CPU, num_tokens=len(tokenizer))
    if base.get_output_embeddings().bias is not None:  # initialized to zeros: make leaving it out show
        torch.nn.init.normal_(base.get_output_embeddings().bias)
    batch = with_new_tokens(packed_batch(BATCH))
    expected = logits(base.eval(), batch)
    model = apply_lora(base.train(), LoraConfig(r=4, alpha=8, dropout=0.0), seed=0, new_token_ids=new_ids)
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-6, rtol=0)  # LoRA and new rows start as a no-op
    lm = causal_lm(model)
    trained = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    if name == "phi":  # its head has a bias, which PEFT's trainable tokens would drop: the head is trained whole
        assert any("lm_head.modules_to_save" in n for n in trained)
    assert any("embed_tokens.token_adapter.trainable_tokens_delta" in n for n in trained)
    assert all("trainable_tokens_delta" in n or "modules_to_save" in n for n in trained)

    # The loss through the chunked head (the new rows put in) equals plain cross-entropy over the model's logits.
    loss_module = TokenLoss(model)
    loss_sum, _ = loss_module(**batch)
    mask = trained_targets(batch["labels"], batch["position_ids"])
    full = lm(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[:, :-1][mask]
    reference = nn.functional.cross_entropy(full.float(), batch["labels"][:, 1:][mask], reduction="sum")
    torch.testing.assert_close(loss_sum, reference, atol=1e-4, rtol=1e-5)

    embed_before = lm.get_input_embeddings().weight.detach().clone()
    head_before = lm.get_output_embeddings().weight.detach().clone()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train_on(model, batch, steps=3)
    embed, head = lm.get_input_embeddings().weight.detach(), lm.get_output_embeddings().weight.detach()
    assert not torch.equal(embed[NEW_IDS], embed_before[NEW_IDS]) and not torch.equal(head[NEW_IDS], head_before[NEW_IDS])
    assert torch.equal(embed[:512], embed_before[:512])  # every row that existed before, bit for bit
    if name != "phi":
        assert torch.equal(head[:512], head_before[:512])
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), f"{n} changed"


def train_on(model: nn.Module, batch: dict[str, torch.Tensor], steps: int, lr: float = 1e-2) -> list[float]:
    """`steps` optimizer steps of the loop's own train_step on `batch`: the losses."""
    loss_module = TokenLoss(model).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, TrainConfig(lr=lr))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    tokens = int(trained_targets(batch["labels"], batch["position_ids"]).sum())
    return [train_step(loss_module, [batch], tokens, optimizer, scaler, params, "fp32", 1.0).loss for _ in range(steps)]


def test_saved_adapter_and_tokenizer_load_generate_and_merge_as_trained(
    tiny_base_model_dir: Path, tmp_path: Path
) -> None:
    """final/ as the training loop writes it (its own save_final), read back by `raysft generate`'s loader
    and by `raysft export --merge`: the same logits as the model in training, the new tokens single tokens."""
    cfg = tiny_config(tiny_base_model_dir, tmp_path / "run", ["lora.r=4", "lora.alpha=8"])
    tokenizer, new_ids = load_tokenizer_and_new_ids(cfg.model)
    model = apply_lora(load_model(cfg.model, CPU, num_tokens=len(tokenizer)), cfg.lora, seed=0, new_token_ids=new_ids)
    batch = with_new_tokens(packed_batch(BATCH))
    train_on(model, batch, steps=2)
    expected = logits(model.eval(), batch)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(to_yaml(cfg))
    save_final(model, tokenizer, str(tmp_path / "run"), None)

    final = tmp_path / "run" / "final"
    saved = load_file(str(final / "adapter_model.safetensors"))
    assert not any(t.shape[0] == 514 for t in saved.values())  # the new rows only, never whole matrices
    assert {n for n in saved if "trainable_tokens" in n} == {
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta",
        "base_model.model.lm_head.token_adapter.trainable_tokens_delta"}
    loaded, loaded_tokenizer = load_for_inference(cfg.model, final)
    assert loaded_tokenizer.encode("<|im_start|>assistant", add_special_tokens=False)[0] == 512
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-6, rtol=0)

    merged_dir = merge_adapter(tmp_path / "run", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert merged.config.vocab_size == 514 and len(AutoTokenizer.from_pretrained(merged_dir)) == 514
    torch.testing.assert_close(logits(merged, batch), expected, atol=1e-5, rtol=0)
    prompts = ["Who are you?", "What is 2+2?"]
    assert chat_generate(loaded, loaded_tokenizer, prompts, max_new_tokens=8) == \
        chat_generate(merged, loaded_tokenizer, prompts, max_new_tokens=8)
