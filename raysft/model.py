"""Model loading: HF folder / hub id / GGUF, bitsandbytes quantization, LoRA, gradient checkpointing.

The tokenizer (raysft/tokenizer.py) and where a model is and what its source holds (raysft/model_source.py) live in
light modules of their own, so that a Ray run's driver loads a tokenizer and checks a model without importing this
stack (peft, bitsandbytes, the model code).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.helpers import disable_input_dtype_casting
from peft.utils.other import TrainableTokensWrapper
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from raysft.config import LoraConfig, ModelConfig
from raysft.labels import trained_targets
from raysft.model_source import model_location
from raysft.ops import PACKED_SDPA, PackedLayout, linear_cross_entropy, register_packed_sdpa

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}



# Seed of the rows that resizing the embeddings adds: the same on every worker and at every load, so runs repeat.
_RESIZE_SEED = 0


def resize_embeddings(model: PreTrainedModel, num_tokens: int) -> None:
    """Grow the input embeddings (and an untied output head) to hold `num_tokens` token ids; no-op when they do.

    The new rows are transformers' mean resizing: the mean of the existing rows plus noise at 1e-9 of their
    covariance, drawn from a fixed seed so that every worker and every later load make the same rows.

    Example:
        >>> resize_embeddings(model, len(tokenizer))  # doctest: +SKIP
    """
    if num_tokens <= model.get_input_embeddings().weight.shape[0]:
        return
    device = model.get_input_embeddings().weight.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(_RESIZE_SEED)
        model.resize_token_embeddings(num_tokens, mean_resizing=True)


def load_model(
    cfg: ModelConfig, device: torch.device, for_training: bool = True, num_tokens: int | None = None
) -> PreTrainedModel:
    """Load the base causal LM on `device`, quantized if asked, its embeddings grown to `num_tokens` token ids
    (``len(tokenizer)``) when they hold fewer (:func:`resize_embeddings`): before anything wraps or shards it."""
    location, kwargs = model_location(cfg)
    if cfg.quantization != "none":
        compute = torch.bfloat16 if cfg.dtype == "float32" and device.type == "cuda" else _DTYPES[cfg.dtype]
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=cfg.quantization == "4bit",
            load_in_8bit=cfg.quantization == "8bit",
            bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=cfg.bnb_4bit_double_quant,
            bnb_4bit_compute_dtype=compute,
            # 4-bit weights packed into compute-dtype storage: a tensor FSDP can shard evenly like any other
            # (the uint8 default cannot be mixed with the bf16 tensors of the same layer); no effect on DDP.
            bnb_4bit_quant_storage=compute if cfg.quantization == "4bit" else torch.uint8,
        )
        kwargs["device_map"] = {"": device}
    if cfg.attn_implementation == PACKED_SDPA:
        register_packed_sdpa()
    model = AutoModelForCausalLM.from_pretrained(
        location, dtype=_DTYPES[cfg.dtype], attn_implementation=cfg.attn_implementation, **kwargs
    )
    if cfg.quantization == "none":
        model.to(device)
    if cfg.gguf_file or cfg.name_or_path.endswith(".gguf"):
        # GGUF weights are dequantized on load; the leftover quantizer marker would block save_pretrained.
        model.hf_quantizer = None
    model.config.use_cache = False
    if num_tokens is not None:
        resize_embeddings(model, num_tokens)
    if for_training and cfg.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    if for_training and cfg.gradient_checkpointing:
        # Non-reentrant checkpointing works with DDP and with frozen inputs (LoRA) without input grads hacks.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def apply_lora(model: PreTrainedModel, cfg: LoraConfig, seed: int, new_token_ids: Sequence[int] = ()) -> nn.Module:
    """Wrap `model` with LoRA adapters (or leave every weight trainable for a full fine-tune).

    `new_token_ids` (:func:`raysft.tokenizer.load_tokenizer_and_new_ids`) are rows of the input embeddings and output head that
    did not exist before this run. With LoRA only those rows of the two matrices are trained (PEFT's trainable
    tokens, saved in the adapter; an untied head's rows too), the rest stays frozen.
    """
    if not cfg.enabled:
        model.requires_grad_(True)
        return model
    rows, full_modules = _trainable_token_rows(model, new_token_ids, cfg.modules_to_save or [])
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        modules_to_save=[*(cfg.modules_to_save or []), *full_modules] or None,
        trainable_token_indices=rows,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        task_type="CAUSAL_LM",
    )
    # LoRA A matrices are random: the same seed gives the same init on every worker. Forked, so that the caller's
    # RNG (seeded per rank for dropout and NEFTune noise) goes on as if the init had not drawn from it.
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        return get_peft_model(model, peft_cfg)


def _trainable_token_rows(
    model: PreTrainedModel, token_ids: Sequence[int], modules_to_save: list[str]
) -> tuple[dict[str, list[int]] | None, list[str]]:
    """(PEFT trainable_token_indices for `token_ids`, modules to train in full instead).

    A tied head shares the embedding's rows (PEFT ties its trainable tokens too); an untied head gets its own.
    A head with a bias (Phi) is trained in full instead: PEFT 0.21's trainable tokens leave a Linear's bias out
    of the forward. Modules the user trains in full already (`lora.modules_to_save`) are left to that.
    """
    if not token_ids:
        return None, []
    names = {module: name for name, module in model.named_modules()}
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()

    def saved(name: str) -> bool:  # PEFT's rule for modules_to_save: the name, or a dotted name ending in it
        return any(name == wanted or name.endswith("." + wanted) for wanted in modules_to_save)

    rows: dict[str, list[int]] = {}
    full: list[str] = []
    if not saved(names[embed]):
        rows[names[embed]] = list(token_ids)
    if head is not None and head.weight is not embed.weight and not saved(names[head]):
        if getattr(head, "bias", None) is not None:
            full.append(names[head])
        else:
            rows[names[head]] = list(token_ids)
    return rows or None, full


def add_neftune_noise(model: nn.Module, alpha: float | None) -> nn.Module:
    """NEFTune (`train.neftune_alpha`): noisy input embeddings in training-mode forwards of `model`; returns `model`.

    A forward pre-hook on the decoder rather than a hook on the embedding layer, because the noise's scale needs
    each packed example's length and only the decoder's `position_ids` tell it: in training mode the hook embeds
    `input_ids` itself and hands the decoder `inputs_embeds` + noise; in eval mode (evaluation, generation) it
    does nothing. `alpha` None: `model` is left as it is.

    Example:
        >>> model = add_neftune_noise(apply_lora(load_model(cfg.model, device), cfg.lora, seed), 5.0)  # doctest: +SKIP
    """
    if alpha is None:
        return model

    def noisy_embeddings(
        decoder: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if not decoder.training:
            return None
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = decoder.get_input_embeddings()(args[0] if args else kwargs["input_ids"])
        layout = kwargs.get("packed_layout")  # TokenLoss passes packed_sdpa's, restarts already found
        if layout is None and kwargs.get("position_ids") is not None:
            layout = PackedLayout(kwargs["position_ids"])
        kwargs = {**kwargs, "inputs_embeds": embeds + neftune_noise(embeds, layout, alpha)}
        if args:  # input_ids given by position: the decoder's first parameter
            return (None, *args[1:]), kwargs
        return args, {**kwargs, "input_ids": None}

    causal_lm(model).get_decoder().register_forward_pre_hook(noisy_embeddings, with_kwargs=True)
    return model


def neftune_noise(embeds: torch.Tensor, layout: PackedLayout | None, alpha: float) -> torch.Tensor:
    """NEFTune's noise for `embeds` [batch, positions, d]: uniform in [-1, 1] x alpha / sqrt(L x d), where L is the
    length of the packed example each position belongs to (the row's width without a layout), drawn from torch's
    RNG on `embeds`' device (the one checkpoints save).

    Example (a row packing examples of 2 and 4 tokens, d = 4):
        >>> noise = neftune_noise(torch.zeros(1, 6, 4), PackedLayout(torch.tensor([[0, 1, 0, 1, 2, 3]])), alpha=8.0)
        >>> bool(noise[0, :2].abs().max() <= 8 / (2 * 4) ** 0.5), bool(noise[0, 2:].abs().max() <= 8 / (4 * 4) ** 0.5)
        (True, True)
    """
    batch, width, dim = embeds.shape
    if layout is None:
        lengths = torch.full((batch, width), width, device=embeds.device)
    else:
        cu_seqlens, _ = layout.cumulative_lengths
        spans = cu_seqlens.diff()
        lengths = torch.repeat_interleave(spans, spans).view(batch, width)
    scale = alpha / torch.sqrt(lengths.to(torch.float32) * dim)
    return torch.empty_like(embeds).uniform_(-1.0, 1.0) * scale.unsqueeze(-1).to(embeds.dtype)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a causal LM (inside a PEFT wrapper too): the units FSDP shards and
    train.compile compiles one by one ([] for an architecture that keeps them elsewhere)."""
    layers = getattr(causal_lm(model).get_decoder(), "layers", None)
    return list(layers) if layers is not None else []


COMPILED_VARIANTS_PER_LAYER = 32
"""train.compile: how many compiled variants of a decoder layer may be kept (see TokenLoss.compile_layers)."""


def causal_lm(model: nn.Module) -> PreTrainedModel:
    """The transformers causal LM inside a PEFT wrapper (LoRA layers are injected in place)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model  # type: ignore[return-value]


class TokenLoss(nn.Module):
    """Causal LM whose forward returns the summed cross-entropy over trained tokens only.

    The output head runs only on positions whose next token is trained, so prompts and padding cost
    no vocabulary-sized logits; a plain linear head goes through :func:`linear_cross_entropy`, which
    never keeps those logits for backward either. DDP wraps this module, so gradient sync sees the
    whole forward.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        lm = causal_lm(model)
        self.backbone = lm.get_decoder()
        self.head = lm.get_output_embeddings()
        self.softcap: float | None = getattr(lm.config, "final_logit_softcapping", None)
        self.per_example_attention = lm.config._attn_implementation == PACKED_SDPA
        self.compiled = False
        """Whether compile_layers ran: the packed layout is then worked out before the layers (no sync inside)."""

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (sum of token losses, number of correctly predicted trained tokens)."""
        # No attention_mask and use_cache=False: transformers builds a block-diagonal causal mask from
        # the restarts in position_ids, so packed examples never attend to each other; packed_sdpa
        # goes further and runs attention on each example's own span (one varlen kernel on CUDA).
        layout = {}
        if self.per_example_attention:
            packed = PackedLayout(position_ids)
            layout["packed_layout"] = packed.prepare_for_compiled_layers() if self.compiled else packed
        # PEFT casts each LoRA input to the adapter's dtype (fp32 adapters on a bf16 base): under autocast the
        # matmul casts it straight back, so the cast is a full activation copy per adapted linear for nothing
        # (a fifth of a 1.7B LoRA step's GPU time, benchmarks/results/gpu_check_h100.md). Autocast's own cast
        # of the small adapter weights gives the same numbers.
        with disable_input_dtype_casting(self.model, active=torch.is_autocast_enabled(input_ids.device.type)):
            hidden = self.backbone(
                input_ids=input_ids, position_ids=position_ids, use_cache=False, **layout
            ).last_hidden_state
        trained = trained_targets(labels, position_ids)
        wanted = labels[:, 1:][trained]
        if type(self.head) is nn.Linear:
            return linear_cross_entropy(hidden[:, :-1][trained], self.head, wanted, self.softcap)
        if _is_plain_token_head(self.head):
            # New tokens' rows trained on a plain head: its weight with those rows put in, through the same chunked
            # loss, whose gradient reaches the rows' parameters.
            weights = _HeadWeights(self.head.weight, None)
            return linear_cross_entropy(hidden[:, :-1][trained], weights, wanted, self.softcap)
        # A head wrapped by LoRA, modules_to_save or a quantizer: plain autograd through its forward.
        logits = self.head(hidden[:, :-1][trained]).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        loss_sum = nn.functional.cross_entropy(logits, wanted, reduction="sum")
        # Correct as linear_cross_entropy counts it: the target has the highest logit.
        picked = logits.detach().gather(1, wanted[:, None]).squeeze(1)
        return loss_sum, (picked >= logits.detach().amax(-1)).sum()

    def compile_layers(self) -> None:
        """train.compile: compile each decoder layer's forward in place (regional compilation).

        The layers are instances of one class: dynamo compiles that forward once (twice: the first layer's input
        does not require grad) and every layer reuses the graph with its own parameters as inputs, so compile time
        is one layer's whatever the depth. The forward only, not the module call: the hooks FSDP and gradient
        checkpointing put around each layer stay eager. Packed attention is traced into the layer's graph (the varlen
        kernel on CUDA, a block-diagonal mask elsewhere): one graph per layer call, no graph break.
        """
        layers = decoder_layers(self.model)
        if not layers:
            raise ValueError(f"train.compile: {type(self.backbone).__name__} keeps no `layers` list of decoder "
                             "layers to compile; set train.compile: false")
        # Each variant of a layer call is its own graph: the first layer (input without grad) or the others,
        # training or evaluation, a row-packed batch (block mask) or one example per row (no mask), one row or
        # several; past dynamo's default of 8 the rest would quietly run eager.
        dynamo = torch._dynamo.config
        limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"  # renamed in torch 2.7
        setattr(dynamo, limit, max(getattr(dynamo, limit), COMPILED_VARIANTS_PER_LAYER))
        for layer in layers:
            layer.forward = torch.compile(layer.forward)
        self.compiled = True

    def generate(self, **kwargs: Any) -> torch.Tensor:
        """The wrapped model's `generate` (eval.generate). Reached through this module because under FSDP it is
        the root unit, whose hooks must gather the embeddings and head around the whole generation
        (raysft.training.fsdp registers this method as a forward of the root)."""
        # Compiled layers run eager here: decoding's one-token steps and growing KV cache would recompile them
        # at every new length, for a few hundred forwards an evaluation.
        with torch.compiler.set_stance("force_eager"):
            return self.model.generate(**kwargs)


class _HeadWeights(NamedTuple):
    """An output head's weight and bias, standing in for the nn.Linear that linear_cross_entropy reads."""

    weight: torch.Tensor
    bias: torch.Tensor | None


def _is_plain_token_head(head: nn.Module) -> bool:
    """Whether `head` is PEFT's trainable-tokens wrapper around a bias-free nn.Linear (its `.weight` is then the
    base weight with the trained rows put in, differentiable in those rows)."""
    base = head.original_module if isinstance(head, TrainableTokensWrapper) else None
    return type(base) is nn.Linear and base.bias is None


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the parameters being trained (the adapter for LoRA), detached on CPU."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}
