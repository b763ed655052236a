"""GPU memory planner (`raysft plan`): per-GPU bytes of a train config under ddp and fsdp, from config.json alone.

No weights are read and nothing runs: the model's shape comes from its ``config.json`` (or a GGUF file's
metadata), and every number below is counted from that shape and the train config.

What is counted, per GPU (P = parameters, P_t = trainable parameters, n = micro_batch_size x max_seq_len tokens):

- **weights**: P x bytes of ``model.dtype``. QLoRA (``model.quantization: 4bit``): the decoder's linear layers at
  0.5 byte/param + quantization constants (one absmax per 64 weights: 1 byte with double quantization plus an
  fp32 per 256 of those, else 4 bytes), everything else (embeddings, head, norms, biases) fp32, because
  ``prepare_model_for_kbit_training`` upcasts it; 8bit: 1 byte/param + an fp32 scale per output row. LoRA
  adapters (``r x (in + out)`` per adapted linear, + ``out`` for DoRA's magnitude) are fp32 (PEFT keeps adapters
  fp32 on a half-precision base).
- **grads**: P_t x the trainable parameters' bytes; ddp with N > 1 keeps a second copy in its buckets
  (``gradient_as_bucket_view`` is off in ``ray.train.torch.prepare_model``).
- **optimizer**: ``adamw`` 2 states per trainable param in its dtype (8 bytes fp32); ``adamw_8bit`` 2 bytes +
  blockwise absmax (2 x 4 bytes per 256), fp32 states for tensors under 4096 elements (bitsandbytes'
  ``min_8bit_size``); ``adafactor`` factored: rows + columns per matrix, a full variance for vectors.
- **activations**: what autograd keeps for backward, summed tensor by tensor for a Llama-style block
  (:func:`layer_activation_bytes` lists each one) x L layers, plus one chunk of the output head (raysft's loss
  never keeps vocabulary-sized logits for backward, raysft/ops.py). With gradient checkpointing: each layer's
  input (n x hidden in the stream dtype) plus one layer's full set (recomputed in backward). Every position is
  assumed trained (an upper bound: prompts cost no head chunk).
- **temp** (forward/backward transients): the loss's vocabulary-sized chunk (two fp32 chunks of 1024 positions
  meet when the next is made); backward's working set (3 x n x intermediate: gradients of one block's MLP);
  bf16 copies of fp32 weights that autocast keeps for backward; a trained head's fp32 gradient made in forward
  and its scaled copy (full fine-tune); under fsdp the all-gathered parameters of the root (embeddings, head,
  final norm) and of two decoder layers (the current one and the prefetched one), and one layer's unsharded
  gradients before reduce-scatter; DoRA's weight norm, recomputed in every forward, at its largest linear.
- **step**: the optimizer step's scratch, once backward has freed the activations (none for AdamW on CUDA, which
  raysft runs fused and in place; on CPU two of one parameter).
- **overhead**: a fixed 1 GiB for the CUDA context, cuBLAS workspaces and NCCL buffers (measured contexts are
  0.5-0.9 GiB on H100s with torch 2.x); 0 on CPU.

fsdp divides weights, grads and optimizer state by N (the frozen base of LoRA/QLoRA too); activations and
temp do not shrink with N. The total is the larger of two moments of a step, plus weights, optimizer and
overhead: the start of backward (activations + temp + the grads alive then: all of them from the second
micro-batch of an accumulating step on, else only ddp's buckets, as raysft sets gradients to None after each
step) and the optimizer step (grads + step).
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from raysft.config import Config, parse_config
from raysft.errors import ConfigError

GiB = 1024**3
CUDA_OVERHEAD_BYTES = 1 * GiB
"""CUDA context + cuBLAS workspace + NCCL buffers per GPU (an assumption, stated in the table's footer)."""
HEAD_CHUNK = 1024
"""Positions per chunk of raysft's chunked cross-entropy (raysft.ops.linear_cross_entropy's default)."""
DEFAULT_GPUS = (1, 2, 4, 8)
REPORT_WIDTH = 100
"""Columns the report fits in (the table is narrower; prose lines are wrapped to this)."""

Strategy = Literal["ddp", "fsdp"]
Device = Literal["cuda", "cpu"]

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo2", "smollm3")
_SUPPORTED = (*_LLAMA_LIKE, "phi")


# --------------------------------------------------------------------------------------------- model shape


@dataclass(frozen=True)
class Linear:
    """One linear layer of a decoder block: its name (as LoRA's target_modules sees it) and shape."""

    name: str
    d_in: int
    d_out: int
    bias: bool
    group: str
    """Which tensor it reads: linears of one group share their input (q/k/v read the same normed hidden)."""

    @property
    def params(self) -> int:
        return self.d_in * self.d_out + (self.d_out if self.bias else 0)


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs from a model's config.json."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    norms_per_layer: int = 2
    norm_bias: bool = False
    head_bias: bool = False
    source: str = ""

    @property
    def linears(self) -> tuple[Linear, ...]:
        """The linear layers of one decoder block."""
        h, q, kv, inter = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.intermediate_size
        if self.model_type == "phi":  # parallel attention + MLP, one LayerNorm, biases everywhere
            return (
                Linear("q_proj", h, q, True, "attn_in"), Linear("k_proj", h, kv, True, "attn_in"),
                Linear("v_proj", h, kv, True, "attn_in"), Linear("dense", q, h, True, "o_in"),
                Linear("fc1", h, inter, True, "attn_in"), Linear("fc2", inter, h, True, "down_in"),
            )  # fmt: skip
        ab = self.attention_bias
        return (
            Linear("q_proj", h, q, ab, "attn_in"), Linear("k_proj", h, kv, ab, "attn_in"),
            Linear("v_proj", h, kv, ab, "attn_in"), Linear("o_proj", q, h, self.o_bias, "o_in"),
            Linear("gate_proj", h, inter, self.mlp_bias, "mlp_in"), Linear("up_proj", h, inter, self.mlp_bias, "mlp_in"),
            Linear("down_proj", inter, h, self.mlp_bias, "down_in"),
        )  # fmt: skip

    @property
    def norm_params(self) -> int:
        """Norm parameters of one block."""
        per_norm = self.hidden_size * (2 if self.norm_bias else 1)
        return self.norms_per_layer * per_norm + sum(self.qk_norm_sizes)

    @property
    def qk_norm_sizes(self) -> tuple[int, ...]:
        """Weights of the q and k norms: Qwen3 normalizes each head, OLMo2 the whole q and k projections."""
        if not self.qk_norm:
            return ()
        if self.model_type == "olmo2":
            return (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim)
        return (self.head_dim, self.head_dim)

    @property
    def layer_params(self) -> int:
        return sum(lin.params for lin in self.linears) + self.norm_params

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head_params(self) -> int:
        """The output head's own parameters (0 when tied to the embeddings)."""
        if self.tie_word_embeddings:
            return 0
        return self.vocab_size * self.hidden_size + (self.vocab_size if self.head_bias else 0)

    @property
    def final_norm_params(self) -> int:
        return self.hidden_size * (2 if self.norm_bias else 1)

    @property
    def root_params(self) -> int:
        """Parameters outside the decoder blocks: embeddings, final norm, head."""
        return self.embedding_params + self.final_norm_params + self.head_params

    @property
    def num_params(self) -> int:
        """Every parameter, tied ones counted once (what ``sum(p.numel() for p in model.parameters())`` gives)."""
        return self.num_layers * self.layer_params + self.root_params


def shape_from_config_dict(raw: dict[str, Any], source: str = "config.json") -> ModelShape:
    """The shape of a causal LM from its config.json contents (transformers' defaults where a key is absent).

    Example:
        >>> shape = shape_from_config_dict({"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
        ...     "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        ...     "num_key_value_heads": 8})
        >>> shape.num_params
        8030261248
    """
    model_type = raw.get("model_type")
    if model_type not in _SUPPORTED:
        raise ConfigError([
            f"{source}: model_type {model_type!r} is not one the planner knows ({', '.join(_SUPPORTED)}); "
            "its formulas assume a Llama-style dense decoder (or Phi)"
        ])  # fmt: skip
    needed = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [key for key in needed if not isinstance(raw.get(key), int)]
    if missing:
        raise ConfigError([f"{source}: missing or non-integer {', '.join(missing)}"])
    heads = raw["num_attention_heads"]
    kv_heads = raw.get("num_key_value_heads") or heads
    head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
    # transformers' per-architecture defaults (config classes), for keys a config.json may leave out.
    tie_default = model_type in ("gemma", "gemma2")
    common: dict[str, Any] = {
        "model_type": model_type, "vocab_size": raw["vocab_size"], "hidden_size": raw["hidden_size"],
        "intermediate_size": raw["intermediate_size"], "num_layers": raw["num_hidden_layers"], "num_heads": heads,
        "num_kv_heads": kv_heads, "head_dim": head_dim,
        "tie_word_embeddings": bool(raw.get("tie_word_embeddings", tie_default)), "source": source,
    }  # fmt: skip
    if model_type == "phi":
        return ModelShape(**common, attention_bias=True, o_bias=True, mlp_bias=True, norms_per_layer=1,
                          norm_bias=True, head_bias=True, qk_norm=bool(raw.get("qk_layernorm", False)))  # fmt: skip
    bias = bool(raw.get("attention_bias", False))
    return ModelShape(
        **common,
        attention_bias=bias or model_type == "qwen2",  # Qwen2's q/k/v always carry a bias, o_proj never
        o_bias=bias and model_type != "qwen2",
        mlp_bias=bool(raw.get("mlp_bias", False)),
        qk_norm=model_type in ("qwen3", "olmo2"),
        norms_per_layer=4 if model_type == "gemma2" else 2,
    )


def read_model_shape(cfg: Config, model_config: str | Path | None = None) -> ModelShape:
    """Read the shape of ``cfg.model`` from its config.json, a GGUF file's metadata, or ``model_config``."""
    if model_config is not None:
        path = Path(model_config)
        if path.is_dir():
            path = path / "config.json"
        return shape_from_config_dict(_read_json(path, "--model-config"), str(path))
    name = cfg.model.name_or_path
    location = Path(name).expanduser()
    gguf = cfg.model.gguf_file or (location.name if name.endswith(".gguf") else None)
    if gguf is not None:
        folder = location.parent if name.endswith(".gguf") else location
        return _shape_from_gguf(folder, gguf)
    if location.is_dir():
        if not (location / "config.json").is_file():
            raise ConfigError([f"model.name_or_path: {name!r} holds no config.json; pass --model-config PATH"])
        return shape_from_config_dict(_read_json(location / "config.json", "model.name_or_path"), str(location / "config.json"))
    cached = _hub_cached_config(name, cfg.model.revision)
    if cached is not None:
        return shape_from_config_dict(_read_json(cached, "model.name_or_path"), f"{name} (Hugging Face cache)")
    raise ConfigError([
        f"model.name_or_path: {name!r} is neither a local folder nor in the local Hugging Face cache; download "
        f"its config.json (huggingface-cli download {name} config.json) or pass --model-config PATH"
    ])  # fmt: skip


def _hub_cached_config(repo_id: str, revision: str | None) -> Path | None:
    """The config.json of a hub model already in the local Hugging Face cache (HF_HOME / HF_HUB_CACHE), or None.

    Only the cache is read, never the network: planning stays offline and instant.
    """
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except ValueError:  # not a valid repo id (e.g. a path that does not exist)
        return None
    return Path(found) if isinstance(found, str) else None


def _read_json(path: Path, key: str) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError([f"{key}: file not found: {path}"]) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError([f"{key}: {path} is not valid JSON ({err})"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{key}: {path} holds no JSON object"])
    return raw


def _shape_from_gguf(folder: Path, gguf_file: str) -> ModelShape:
    # transformers reads only the GGUF header here (metadata, no tensor data).
    if not (folder / gguf_file).is_file():
        raise ConfigError([f"model.name_or_path: GGUF file {str(folder / gguf_file)!r} not found"])
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(folder), gguf_file=gguf_file)
    except Exception as err:  # noqa: BLE001 - any reader failure is the same advice
        raise ConfigError([
            f"model.name_or_path: cannot read the model shape from {gguf_file} ({type(err).__name__}: {err}); "
            "pass the model's config.json with --model-config PATH"
        ]) from None  # fmt: skip
    return shape_from_config_dict(config.to_dict(), f"{folder / gguf_file} (GGUF metadata)")


# --------------------------------------------------------------------------------------------- training setup


@dataclass(frozen=True)
class Setup:
    """The parts of a train config that decide memory, in the planner's terms."""

    weight_bytes: int
    """Bytes per stored (non-quantized) weight: model.dtype."""
    quantization: Literal["none", "4bit", "8bit"]
    double_quant: bool
    precision: Literal["fp32", "bf16", "fp16"]
    optimizer: Literal["adamw", "adamw_8bit", "adafactor"]
    lora: bool
    lora_r: int
    lora_dropout: float
    target_modules: tuple[str, ...] | Literal["all-linear"]
    modules_to_save: tuple[str, ...]
    micro_batch_size: int
    seq_len: int
    grad_accum_steps: int
    strategy: Strategy = "ddp"
    """The config's own choice (its row is marked in the report)."""
    gradient_checkpointing: bool = False
    workers: int = 1
    cpu_offload: bool = False
    """scaling.fsdp_cpu_offload: fsdp keeps the shards (weights, grads, optimizer state) in CPU memory."""
    use_dora: bool = False
    """lora.use_dora: a trained magnitude per output feature of each adapted linear, and more kept for backward."""

    @classmethod
    def from_config(cls, cfg: Config) -> Setup:
        targets = cfg.lora.target_modules
        return cls(
            weight_bytes=_DTYPE_BYTES[cfg.model.dtype], quantization=cfg.model.quantization,
            double_quant=cfg.model.bnb_4bit_double_quant, precision=cfg.train.precision,
            optimizer=cfg.train.optimizer, lora=cfg.lora.enabled, lora_r=cfg.lora.r, lora_dropout=cfg.lora.dropout,
            target_modules=targets if isinstance(targets, str) else tuple(targets),
            modules_to_save=tuple(cfg.lora.modules_to_save or ()), micro_batch_size=cfg.train.micro_batch_size,
            seq_len=cfg.data.max_seq_len, grad_accum_steps=cfg.train.grad_accum_steps,
            # scaling.strategy arrives with FSDP training (issue 12); a config without it is ddp.
            strategy=getattr(cfg.scaling, "strategy", "ddp"), gradient_checkpointing=cfg.model.gradient_checkpointing,
            workers=max(1, cfg.scaling.num_workers), cpu_offload=getattr(cfg.scaling, "fsdp_cpu_offload", False),
            use_dora=cfg.lora.use_dora,
        )  # fmt: skip

    @property
    def quantized(self) -> bool:
        return self.quantization != "none"

    @property
    def autocast(self) -> bool:
        return self.precision != "fp32"

    @property
    def tokens(self) -> int:
        return self.micro_batch_size * self.seq_len


def adapted_linears(shape: ModelShape, setup: Setup) -> tuple[tuple[Linear, ...], bool]:
    """(the decoder linears that carry LoRA adapters, whether the output head does too).

    Matching follows PEFT: a target is a module-name suffix; ``all-linear`` is every linear but the head.
    """
    if not setup.lora:
        return (), False
    names = {lin.name for lin in shape.linears}
    if setup.target_modules == "all-linear":
        return shape.linears, False
    unknown = [t for t in setup.target_modules if t.split(".")[-1] not in names | {"lm_head"}]
    if unknown:
        raise ConfigError([
            f"lora.target_modules: {', '.join(map(repr, unknown))} names no linear layer the planner knows for "
            f"{shape.model_type} (known: {', '.join(sorted(names))}, lm_head)"
        ])  # fmt: skip
    wanted = {t.split(".")[-1] for t in setup.target_modules}
    return tuple(lin for lin in shape.linears if lin.name in wanted), "lm_head" in wanted


def lora_params(shape: ModelShape, setup: Setup) -> int:
    """Trainable adapter parameters: r x (in + out) per adapted linear, + out for DoRA's magnitude vector (what
    PEFT's trainable count reports).

    Example:
        >>> shape = shape_from_config_dict({"model_type": "llama", "vocab_size": 100, "hidden_size": 64,
        ...     "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2})
        >>> setup = Setup(4, "none", True, "fp32", "adamw", True, 8, 0.0, ("q_proj", "v_proj"), (), 1, 16, 1)
        >>> lora_params(shape, setup)  # 2 layers x 8 x ((64 + 64) + (64 + 32))
        3584
    """
    linears, head = adapted_linears(shape, setup)
    magnitude = 1 if setup.use_dora else 0
    per_layer = sum(setup.lora_r * (lin.d_in + lin.d_out) + magnitude * lin.d_out for lin in linears)
    head_params = setup.lora_r * (shape.hidden_size + shape.vocab_size) + magnitude * shape.vocab_size
    return shape.num_layers * per_layer + (head_params if head else 0)


def _saved_modules(shape: ModelShape, setup: Setup) -> tuple[int, int, bool]:
    """(params of modules_to_save copies, of which in the layers, whether the head is one): trained in full."""
    wanted = {m.split(".")[-1] for m in setup.modules_to_save} if setup.lora else set()
    layer = sum(lin.params for lin in shape.linears if lin.name in wanted)
    root = (shape.embedding_params if "embed_tokens" in wanted else 0)
    head = "lm_head" in wanted
    if head:
        root += shape.vocab_size * shape.hidden_size + (shape.vocab_size if shape.head_bias else 0)
    return shape.num_layers * layer + root, shape.num_layers * layer, head


# --------------------------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class Estimate:
    """Per-GPU bytes of one (strategy, N, checkpointing) choice."""

    strategy: Strategy
    gpus: int
    checkpointing: bool
    weights: int
    grads: int
    optimizer: int
    activations: int
    temp: int
    """Forward/backward transients: the loss's head chunk, autocast weight copies, fsdp's gathered layers."""
    step: int
    """The optimizer step's scratch, allocated after backward has freed the activations."""
    overhead: int
    grads_held: int = 0
    """Of ``grads``, what is alive while the activations are: all of them from the second micro-batch of an
    accumulating step on, else only ddp's buckets (gradients are set to None after each step)."""
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def total(self) -> int:
        """The step's peak: backward's start (activations held) or the optimizer step (all grads), the larger."""
        steady = self.weights + self.optimizer + self.overhead
        return steady + max(self.activations + self.temp + self.grads_held, self.grads + self.step)


@dataclass(frozen=True)
class Counts:
    """Parameter counts of a (model, config) pair."""

    total: int
    """Every base-model parameter."""
    trainable: int
    quantized: int
    """Parameters stored 4/8-bit (the decoder's linear weights under QLoRA)."""
    adapter: int


def param_counts(shape: ModelShape, setup: Setup) -> Counts:
    """Base, trainable, quantized and adapter parameter counts."""
    adapter = lora_params(shape, setup)
    saved, _, _ = _saved_modules(shape, setup)
    quantized = shape.num_layers * sum(lin.d_in * lin.d_out for lin in shape.linears) if setup.quantized else 0
    trainable = adapter + saved if setup.lora else shape.num_params
    return Counts(total=shape.num_params, trainable=trainable, quantized=quantized, adapter=adapter)


def _quant_bytes(setup: Setup, params: int) -> float:
    if setup.quantization == "4bit":
        # absmax per 64 weights: fp32, or 8-bit with one fp32 per 256 absmax values (double quantization)
        constants = (1 + 4 / 256) / 64 if setup.double_quant else 4 / 64
        return params * (0.5 + constants)
    return params * 1.0  # 8bit; its per-row fp32 scales are added by the caller


def weight_bytes(shape: ModelShape, setup: Setup) -> int:
    """Bytes of every stored weight on one replica (unsharded)."""
    counts = param_counts(shape, setup)
    saved, _, _ = _saved_modules(shape, setup)
    extra = counts.adapter * 4 + saved * setup.weight_bytes  # adapters fp32; saved modules are copies
    if not setup.quantized:
        return shape.num_params * setup.weight_bytes + extra
    rest = shape.num_params - counts.quantized  # upcast to fp32 by prepare_model_for_kbit_training
    quant = _quant_bytes(setup, counts.quantized)
    if setup.quantization == "8bit":
        quant += shape.num_layers * sum(lin.d_out for lin in shape.linears) * 4
    return math.ceil(quant) + rest * 4 + extra


def _trainable_tensors(shape: ModelShape, setup: Setup) -> list[tuple[int, int, int]]:
    """(rows, cols, bytes per element) of every trainable tensor (cols 1 for vectors), for optimizer sizes."""
    tensors: list[tuple[int, int, int]] = []
    if setup.lora:
        linears, head = adapted_linears(shape, setup)
        magnitude = 1 if setup.use_dora else 0  # DoRA's vector: one per output feature
        for lin in linears:
            tensors += [(setup.lora_r, lin.d_in, 4), (lin.d_out, setup.lora_r, 4)] * shape.num_layers
            tensors += [(lin.d_out, 1, 4)] * shape.num_layers * magnitude
        if head:
            tensors += [(setup.lora_r, shape.hidden_size, 4), (shape.vocab_size, setup.lora_r, 4)]
            tensors += [(shape.vocab_size, 1, 4)] * magnitude
        wanted = {m.split(".")[-1] for m in setup.modules_to_save}
        for lin in shape.linears:
            if lin.name in wanted:
                tensors += [(lin.d_out, lin.d_in, setup.weight_bytes)] * shape.num_layers
        if "embed_tokens" in wanted:
            tensors.append((shape.vocab_size, shape.hidden_size, setup.weight_bytes))
        if "lm_head" in wanted:
            tensors.append((shape.vocab_size, shape.hidden_size, setup.weight_bytes))
        return tensors
    wb = setup.weight_bytes
    for lin in shape.linears:
        tensors += [(lin.d_out, lin.d_in, wb)] * shape.num_layers
        if lin.bias:
            tensors += [(lin.d_out, 1, wb)] * shape.num_layers
    per_norm = [(shape.hidden_size, 1, wb)] * (2 if shape.norm_bias else 1)
    tensors += per_norm * (shape.norms_per_layer * shape.num_layers + 1)
    tensors += [(size, 1, wb) for size in shape.qk_norm_sizes] * shape.num_layers
    tensors.append((shape.vocab_size, shape.hidden_size, wb))
    if not shape.tie_word_embeddings:
        tensors.append((shape.vocab_size, shape.hidden_size, wb))
        if shape.head_bias:
            tensors.append((shape.vocab_size, 1, wb))
    return tensors


def optimizer_bytes(shape: ModelShape, setup: Setup) -> int:
    """Optimizer state of every trainable parameter (unsharded)."""
    total = 0
    for rows, cols, nbytes in _trainable_tensors(shape, setup):
        numel = rows * cols
        if setup.optimizer == "adamw":
            total += 2 * numel * nbytes  # exp_avg, exp_avg_sq: zeros_like(param)
        elif setup.optimizer == "adamw_8bit":
            total += 2 * numel + 2 * 4 * math.ceil(numel / 256) if numel >= 4096 else 2 * numel * 4
        else:  # torch Adafactor: row and column factors for matrices, a full variance for vectors
            total += (rows + cols) * nbytes if cols > 1 else numel * nbytes
    return total


def grad_bytes(shape: ModelShape, setup: Setup) -> int:
    """Gradients of the trainable parameters (unsharded, one copy)."""
    return sum(rows * cols * nbytes for rows, cols, nbytes in _trainable_tensors(shape, setup))


@dataclass(frozen=True)
class Dtypes:
    """Bytes per element of the activation tensors (see :func:`layer_activation_bytes`)."""

    stream: int
    """The residual stream and norm outputs: model.dtype, fp32 when quantized (norms/embeddings upcast)."""
    compute: int
    """Matmul inputs and attention: 2 under bf16/fp16 autocast or a half-precision model, else 4."""
    outputs: int
    """Linear outputs (MLP internals): compute's, but the stream's for bitsandbytes layers (they cast back)."""


def activation_dtypes(setup: Setup, strategy: Strategy) -> Dtypes:
    # FSDP's mixed precision casts the parameters themselves to bf16/fp16: the whole forward is half precision.
    half_params = setup.weight_bytes == 2 or (strategy == "fsdp" and setup.autocast)
    stream = 4 if setup.quantized else (2 if half_params else 4)
    compute = 2 if setup.autocast or (half_params and not setup.quantized) else 4
    return Dtypes(stream=stream, compute=compute, outputs=stream if setup.quantized else compute)


def layer_activation_bytes(shape: ModelShape, setup: Setup, strategy: Strategy = "ddp",
                           device: Device = "cuda") -> dict[str, int]:
    """Bytes autograd keeps for backward per token in one decoder block, tensor by tensor.

    Llama-style block: x -> RMSNorm -> q/k/v -> RoPE -> SDPA -> o -> +x -> RMSNorm -> gate/up -> act*up -> down -> +.

    - each RMSNorm keeps its input upcast to fp32 (4 x hidden) and, when its weight trains, the normalized
      hidden (stream dtype) for the weight's gradient;
    - a trained linear keeps its input; a frozen one keeps nothing (bitsandbytes 4-bit keeps only its packed
      weight); linears of one group share the input, but autocast casts it once per linear when the stream is
      wider than the compute dtype;
    - a LoRA adapter with dropout keeps its dropped-out input (compute dtype under autocast, else input dtype)
      and its mask per input element (bool on CUDA, 1 byte; on CPU ATen's dropout keeps a mask in the input's
      dtype), plus lora_A's r outputs; without dropout, the input itself;
    - SDPA keeps q, k, v and its output (compute dtype; GQA native, k/v not repeated) and a fp32 logsumexp
      per head; the MLP keeps gate and up outputs and the activation (the product is down's input);
    - DoRA's output, (m / ||W + s BA|| - 1) x base + m / ||W + s BA|| x s x lora, keeps both of each adapted
      linear's outputs for the magnitude's gradient: the base output (run again on the dropped-out input, in the
      compute dtype, when dropout > 0) and the adapter's.
    """
    dt = activation_dtypes(setup, strategy)
    h, q, kv = shape.hidden_size, shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    adapted, _ = adapted_linears(shape, setup)
    adapted_names = {lin.name for lin in adapted}
    saved_names = {m.split(".")[-1] for m in setup.modules_to_save} if setup.lora else set()
    full = not setup.lora
    group_dtype = {"attn_in": dt.stream, "mlp_in": dt.stream, "o_in": dt.compute, "down_in": dt.outputs}

    kept: dict[str, int] = {}
    kept["norms"] = shape.norms_per_layer * (4 * h + (dt.stream * h if full else 0))
    inputs = 0
    for group, in_dtype in group_dtype.items():
        members = [lin for lin in shape.linears if lin.group == group]
        if not members:
            continue
        d_in = members[0].d_in
        casts_per_linear = setup.autocast and in_dtype > 2 and strategy == "ddp"
        keepers = 0  # linears that keep the group's input (trained base weight, or an adapter without dropout)
        for lin in members:
            base_trains = full or lin.name in saved_names
            if base_trains:
                keepers += 1
            if lin.name in adapted_names:
                if setup.lora_dropout > 0:
                    lora_in = 2 if setup.autocast else in_dtype
                    inputs += d_in * (lora_in + (1 if device == "cuda" else in_dtype))
                else:
                    keepers += 1
                inputs += setup.lora_r * (2 if setup.autocast else 4)
        if keepers:
            width = 2 if setup.autocast and strategy == "ddp" else in_dtype
            inputs += d_in * width * (keepers if casts_per_linear else 1)
    kept["linear inputs"] = inputs
    kept["attention"] = dt.compute * (2 * q + 2 * kv) + 4 * shape.num_heads
    if shape.model_type == "phi":
        # fc1's output and the GELU's intermediates (approximate: Phi's tanh GELU is a composite of several ops)
        kept["mlp"] = 2 * dt.outputs * shape.intermediate_size
    else:
        kept["mlp"] = 3 * dt.outputs * shape.intermediate_size  # gate out (act input), act out, up out
    if setup.use_dora:
        base_out = dt.compute if setup.lora_dropout > 0 else dt.outputs
        kept["dora"] = sum(lin.d_out for lin in adapted) * (base_out + (2 if setup.autocast else 4))
    return kept


def activation_bytes(shape: ModelShape, setup: Setup, strategy: Strategy, checkpointing: bool,
                     device: Device = "cuda") -> int:
    """Bytes kept for backward over the whole micro-batch (all layers, the final norm and the loss)."""
    dt = activation_dtypes(setup, strategy)
    n, h = setup.tokens, shape.hidden_size
    per_layer = sum(layer_activation_bytes(shape, setup, strategy, device).values())
    if checkpointing:
        layers = shape.num_layers * dt.stream * h + per_layer  # each layer's input + one recomputed layer
    else:
        layers = shape.num_layers * per_layer - _first_layer_savings(shape, setup, device)
    final_norm = 4 * h + (dt.stream * h if not setup.lora else 0)
    loss = dt.stream * h  # linear_cross_entropy keeps d(loss)/d(hidden), hidden-sized, for backward
    rope = 2 * 4 * shape.head_dim  # cos and sin, shared by every layer
    return n * (layers + final_norm + loss + rope)


def _first_layer_savings(shape: ModelShape, setup: Setup, device: Device) -> int:
    """Per token, what the first block does not keep when nothing before it trains (LoRA, frozen embeddings).

    Its input then needs no gradient: the first norm keeps nothing, and the adapters reading the norm's output
    keep no dropout mask (``x * mask`` saves the mask only for x's gradient).
    """
    trained_embeddings = "embed_tokens" in {m.split(".")[-1] for m in setup.modules_to_save}
    if not setup.lora or trained_embeddings:
        return 0
    saved = 4 * shape.hidden_size
    if setup.lora_dropout > 0:
        mask = 1 if device == "cuda" else activation_dtypes(setup, "ddp").stream
        adapted, _ = adapted_linears(shape, setup)
        saved += sum(lin.d_in * mask for lin in adapted if lin.group == "attn_in")
    return saved


def head_chunk_bytes(shape: ModelShape, setup: Setup, strategy: Strategy) -> int:
    """Peak bytes of the loss's vocabulary-sized buffers: two fp32 chunks meet when the next one is made."""
    n = setup.tokens
    _, lora_head = adapted_linears(shape, setup)
    _, _, saved_head = _saved_modules(shape, setup)
    if lora_head or saved_head:
        # A wrapped head goes through plain autograd: full logits (fp32) and their softmax are kept; with DoRA, the
        # base and adapter outputs too (see layer_activation_bytes).
        dora = (activation_dtypes(setup, strategy).compute + (2 if setup.autocast else 4)) if setup.use_dora and lora_head else 0
        return n * shape.vocab_size * (4 * 2 + dora)
    chunk = min(n, HEAD_CHUNK)
    half = activation_dtypes(setup, strategy).compute == 2
    per_position = 4 * (2 if n > HEAD_CHUNK else 1) + (2 if half else 0)  # + the half-precision matmul output
    return chunk * shape.vocab_size * per_position


def autocast_copy_bytes(shape: ModelShape, setup: Setup, strategy: Strategy, checkpointing: bool) -> int:
    """bf16 copies of fp32 decoder weights (and adapters) that autocast makes and keeps for backward (ddp only:
    fsdp's mixed precision gathers bf16 weights instead). Frozen weights' copies are saved per layer, so
    checkpointing keeps one layer's; trainable ones sit in autocast's cache until the forward ends."""
    if not setup.autocast or strategy != "ddp" or setup.quantized or setup.weight_bytes != 4:
        return 0
    layer_linear = sum(lin.d_in * lin.d_out for lin in shape.linears)
    layers = shape.num_layers if (not setup.lora or not checkpointing) else 1
    return 2 * (layers * layer_linear + lora_params(shape, setup))


def dora_weight_copy_bytes(shape: ModelShape, setup: Setup, strategy: Strategy, checkpointing: bool) -> tuple[int, int]:
    """(bytes, bytes per weight) of the adapted weights DoRA keeps for backward when ``lora.dropout`` > 0.

    With dropout PEFT's DoRA runs each adapted linear's base weight a second time, on the dropped-out input, as
    ``F.linear(x, W)`` on the weight cast (or dequantized) to the input's dtype, and autograd keeps that weight for
    the input's gradient: a copy per adapted linear whenever it is not the parameter itself (a 4/8-bit base, an
    fp32 base under bf16 autocast, a half-precision base under fp32 adapters), except where the input needs no
    gradient (the first block's attention inputs, LoRA). Checkpointing keeps one block's. Without dropout DoRA
    reuses the base output and keeps none.
    """
    if not setup.use_dora or setup.lora_dropout == 0:
        return 0, 0
    if setup.quantized:
        per_weight = 2 if setup.autocast else 4  # dequantized, cast to the input: bf16 under autocast, else fp32
    elif setup.autocast:
        per_weight = 2 if setup.weight_bytes == 4 and strategy == "ddp" else 0  # fsdp gathers bf16 weights itself
    else:
        per_weight = 4 if setup.weight_bytes == 2 else 0  # cast up to the fp32 adapters' input
    adapted, _ = adapted_linears(shape, setup)
    layer = sum(lin.d_in * lin.d_out for lin in adapted)
    first = layer - sum(lin.d_in * lin.d_out for lin in adapted if lin.group == "attn_in")
    layers = layer if checkpointing else first + (shape.num_layers - 1) * layer
    return per_weight * layers, per_weight


def dora_norm_bytes(shape: ModelShape, setup: Setup) -> int:
    """DoRA's weight norm, recomputed in every forward, at its largest adapted linear: PEFT gets BA by pushing an
    in x in identity (fp32) through the adapter (in x r, then in x out), then forms s BA and W + s BA (out x in)
    and their row norms. Transient: freed before the next linear runs (the norm is a constant to backward)."""
    adapted, head = adapted_linears(shape, setup)
    sizes = [(lin.d_in, lin.d_out) for lin in adapted] + ([(shape.hidden_size, shape.vocab_size)] if head else [])
    if not setup.use_dora or not sizes:
        return 0
    return max(4 * d_in * (d_in + setup.lora_r + 3 * d_out) for d_in, d_out in sizes)


def transient_bytes(shape: ModelShape, setup: Setup, strategy: Strategy, gpus: int, checkpointing: bool,
                    device: Device = "cuda") -> tuple[int, int, list[str]]:
    """(forward/backward transients, the optimizer step's scratch, a note per part)."""
    notes: list[str] = []
    total = head_chunk_bytes(shape, setup, strategy)
    # Backward's working set: the gradients of one block's MLP intermediates (of the product, then of the
    # activation and up outputs) are alive together while that block's activations are still held.
    total += 3 * setup.tokens * shape.intermediate_size * activation_dtypes(setup, strategy).outputs
    full = not setup.lora
    wb = setup.weight_bytes
    layer_linear = sum(lin.d_in * lin.d_out for lin in shape.linears)
    head_weights = shape.vocab_size * shape.hidden_size
    if full:
        # The head's fp32 gradient, made in forward by linear_cross_entropy, and its scaled copy in the weight's
        # dtype: both alive at backward's first node, the copy then becomes the head's .grad.
        total += head_weights * (4 + wb)
    copies = autocast_copy_bytes(shape, setup, strategy, checkpointing)
    if copies:
        total += copies + 2 * head_weights  # + the head's, cast for the loss's matmuls
        notes.append("autocast keeps bf16 copies of the fp32 weights for backward: use model.dtype: bfloat16 to drop them")
    if setup.quantized:
        total += layer_linear // len(shape.linears) * 2 * 2  # a dequantized weight (compute dtype), in and out of a matmul
    dora_copies, per_weight = dora_weight_copy_bytes(shape, setup, strategy, checkpointing)
    if dora_copies:
        total += dora_copies
        notes.append(f"DoRA with lora.dropout > 0 keeps a {per_weight}-byte copy of each adapted weight for backward: "
                     "lora.dropout: 0 drops them")
    total += dora_norm_bytes(shape, setup)
    trainable = _trainable_tensors(shape, setup)
    step = 0
    # On CUDA AdamW is fused (raysft.training.optim.fused_adamw_applies): it updates in place, no scratch.
    if setup.optimizer == "adamw" and device != "cuda":
        # single-tensor AdamW on CPU: sqrt(exp_avg_sq) and its quotient, one parameter at a time
        step = 2 * max(r * c * b for r, c, b in trainable)
    if strategy == "fsdp":
        gather_bytes = 2 if setup.autocast else wb
        if setup.quantized:
            layer_gathered = int(_quant_bytes(setup, layer_linear)) + shape.norm_params * 4
        else:
            layer_gathered = shape.layer_params * gather_bytes
        root = shape.root_params * (4 if setup.quantized else gather_bytes)
        total += root + 2 * layer_gathered
        if full:  # one layer's unsharded grads before reduce-scatter, and their fp32 copy to reduce in
            total += shape.layer_params * (gather_bytes + (4 if setup.autocast else 0))
    return total, step, notes


def plan(shape: ModelShape, setup: Setup, strategy: Strategy, gpus: int, checkpointing: bool,
         device: Device = "cuda") -> Estimate:
    """Per-GPU memory of one training setup.

    Example (Llama-3-8B, full fine-tune in bf16 with AdamW, 2048 tokens, checkpointing):
        >>> shape = shape_from_config_dict({"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
        ...     "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        ...     "num_key_value_heads": 8})
        >>> setup = Setup(2, "none", True, "bf16", "adamw", False, 16, 0.0, "all-linear", (), 1, 2048, 1)
        >>> ddp, fsdp = plan(shape, setup, "ddp", 8, True), plan(shape, setup, "fsdp", 8, True)
        >>> fsdp.optimizer * 8 == ddp.optimizer == 4 * shape.num_params  # two bf16 states per parameter
        True
    """
    shard = gpus if strategy == "fsdp" else 1
    grads = _ceil_div(grad_bytes(shape, setup), shard)
    buckets = grads if strategy == "ddp" and gpus > 1 else 0  # DDP's gradient buckets: a second, lasting copy
    held = grads + buckets if setup.grad_accum_steps > 1 else buckets
    temp, step, notes = transient_bytes(shape, setup, strategy, gpus, checkpointing, device)
    weights, optimizer = _ceil_div(weight_bytes(shape, setup), shard), _ceil_div(optimizer_bytes(shape, setup), shard)
    if strategy == "fsdp" and setup.cpu_offload:
        # The shards live in CPU memory and the optimizer steps there; the GPU holds what is gathered.
        notes.append(f"fsdp_cpu_offload: {_gib(weights + grads + optimizer)} GiB per worker of shards in CPU memory")
        weights = grads = held = optimizer = step = 0
    return Estimate(
        strategy=strategy, gpus=gpus, checkpointing=checkpointing,
        weights=weights, grads=grads + buckets, grads_held=held, optimizer=optimizer,
        activations=activation_bytes(shape, setup, strategy, checkpointing, device), temp=temp, step=step,
        overhead=CUDA_OVERHEAD_BYTES if device == "cuda" else 0, notes=tuple(notes),
    )  # fmt: skip


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def plan_table(shape: ModelShape, setup: Setup, gpus: tuple[int, ...] = DEFAULT_GPUS,
               strategies: tuple[Strategy, ...] = ("ddp", "fsdp")) -> list[Estimate]:
    """Every (strategy, N, checkpointing) row."""
    return [plan(shape, setup, s, n, ckpt) for s in strategies for n in gpus for ckpt in (False, True)]


# --------------------------------------------------------------------------------------------- the report


def parse_size(text: str, key: str = "--gpu-mem") -> int:
    """Bytes in a size such as ``80GiB``, ``24GB``, ``40G`` or ``512MiB``; the unit is required.

    ``GiB``/``MiB`` are powers of 1024; ``GB``/``MB`` powers of 1000 (as GPU vendors quote them); a bare ``G``
    or ``M`` is read as GiB/MiB, as nvidia-smi shows memory. A number without a unit is refused: ``80`` would
    otherwise be 80 bytes, and nothing fits.

    Example:
        >>> parse_size("80GiB"), parse_size("24GB"), parse_size("40G")
        (85899345920, 24000000000, 42949672960)
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ConfigError([f"{key}: {text!r} is not a size; write e.g. 80GiB, 24GB or 40G"])
    if match.group(2) is None:
        raise ConfigError([f"{key}: {text!r} has no unit; write {match.group(1)}GB, {match.group(1)}GiB or "
                           f"{match.group(1)}G (G means GiB)"])
    number, unit = float(match.group(1)), match.group(2).upper()
    powers = {"K": 1, "M": 2, "G": 3, "T": 4}
    if unit == "B":
        value = number
    else:
        base = 1000 if unit.endswith("B") and "I" not in unit else 1024
        value = number * base ** powers[unit[0]]
    if value <= 0:
        raise ConfigError([f"{key}: {text!r} must be more than 0 bytes"])
    return int(value)


def parse_gpus(text: str, key: str = "--gpus") -> tuple[int, ...]:
    """``1,2,4,8`` -> (1, 2, 4, 8)."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise ConfigError([f"{key}: {text!r} is not a comma-separated list of GPU counts (e.g. 1,2,4,8)"])
    return values


def _gib(nbytes: int) -> str:
    return f"{nbytes / GiB:.1f}"


def fits(estimate: Estimate, gpu_mem: int) -> str:
    """``yes``, ``tight`` (over 90% of the GPU: allocator fragmentation may tip it over) or ``no``."""
    return _fit(estimate.total, gpu_mem)


def _fit(total: int, gpu_mem: int) -> str:
    if total > gpu_mem:
        return "no"
    return "tight" if total > 0.9 * gpu_mem else "yes"


def recommend(rows: list[Estimate], gpu_mem: int) -> str:
    """The recommendation and why: the fewest GPUs that fit, preferring ddp, then no checkpointing at equal N."""
    fitting = [r for r in rows if fits(r, gpu_mem) == "yes"] or [r for r in rows if fits(r, gpu_mem) == "tight"]
    if not fitting:
        best = min(rows, key=lambda r: r.total)
        return _wrap(f"nothing fits {_gib(gpu_mem)} GiB per GPU; the smallest is {best.strategy} x{best.gpus} "
                     f"{'with' if best.checkpointing else 'without'} checkpointing at {_gib(best.total)} GiB: add "
                     "GPUs (--gpus), quantize (model.quantization: 4bit), use LoRA, or shorten data.max_seq_len")
    best = min(fitting, key=lambda r: (r.gpus, r.strategy != "ddp", r.checkpointing))
    tight = " (tight)" if fits(best, gpu_mem) == "tight" else ""
    return "\n".join([
        f"recommended: {best.strategy} on {best.gpus} GPU(s){tight}, {_gib(best.total)} GiB per GPU",
        _wrap(f"set: scaling.strategy: {best.strategy}, scaling.num_workers: {best.gpus}, "
              f"model.gradient_checkpointing: {str(best.checkpointing).lower()}", "  "),
        _wrap("why: " + "; ".join(_reasons(best, rows, gpu_mem)), "  "),
    ])  # fmt: skip


def _reasons(best: Estimate, rows: list[Estimate], gpu_mem: int) -> list[str]:
    """What rules out each cheaper choice than ``best``, in the order the recommendation weighs them."""
    reasons = []
    fewer = [r for r in rows if r.gpus < best.gpus]
    if fewer:
        smallest = min(fewer, key=lambda r: r.total)
        verdict = "fit only tightly" if fits(smallest, gpu_mem) == "tight" else "do not fit"
        reasons.append(f"fewer GPUs {verdict} (at best {_gib(smallest.total)} GiB, {smallest.strategy} on "
                       f"{smallest.gpus})")
    if best.strategy == "fsdp":
        ddp = [r.total for r in rows if r.strategy == "ddp" and r.gpus == best.gpus]
        if ddp:
            reasons.append(f"ddp needs {_gib(min(ddp))} GiB on every GPU (each holds the whole model, its gradients "
                           "and optimizer state); fsdp shards them 1/N")
    else:
        reasons.append("ddp gathers nothing between layers: the fastest when the whole step fits one GPU")
    if best.checkpointing:
        without = [r.total for r in rows if (r.strategy, r.gpus, r.checkpointing) == (best.strategy, best.gpus, False)]
        if without:
            reasons.append(f"without gradient checkpointing it needs {_gib(without[0])} GiB; checkpointing keeps "
                           "only each layer's input and recomputes the rest in backward (about a third more compute)")
    else:
        reasons.append("no gradient checkpointing: nothing recomputed in backward")
    if fits(best, gpu_mem) == "tight":
        reasons.append("nothing fits with 10% to spare: allocator fragmentation may tip a tight plan over")
    return reasons


def _wrap(text: str, indent: str = "") -> str:
    return textwrap.fill(text, REPORT_WIDTH, initial_indent=indent, subsequent_indent=indent + "  ",
                         break_on_hyphens=False)


def format_table(shape: ModelShape, setup: Setup, rows: list[Estimate], gpu_mem: int) -> str:
    """The `raysft plan` report: a header, one row per estimate, the assumptions, the recommendation."""
    counts = param_counts(shape, setup)
    method = ("QLoRA" if setup.quantization == "4bit" else "LoRA (8-bit base)" if setup.quantized else "LoRA") if setup.lora else "full fine-tune"
    method += " with DoRA" if setup.lora and setup.use_dora else ""
    lines = [
        f"model: {shape.model_type}, {_count(counts.total)} params, {shape.num_layers} layers, hidden "
        f"{shape.hidden_size}, vocab {shape.vocab_size}",
        _wrap(f"       from {shape.source}"),
        f"setup: {method}, {counts.trainable:,} trainable params, precision {setup.precision}, {setup.optimizer}",
        f"       weights {_dtype_name(setup)}",
        f"       micro_batch_size {setup.micro_batch_size} x max_seq_len {setup.seq_len} = {setup.tokens:,} tokens "
        "per micro-batch",
        f"per-GPU memory in GiB (GPU memory {_gib(gpu_mem)} GiB):",
        "",
    ]
    header = ("strategy", "gpus", "ckpt", "weights", "grads", "optim", "activ", "temp", "step", "total", "fits")
    body = [
        (r.strategy, str(r.gpus), "yes" if r.checkpointing else "no", _gib(r.weights), _gib(r.grads),
         _gib(r.optimizer), _gib(r.activations), _gib(r.temp), _gib(r.step), _gib(r.total), fits(r, gpu_mem))
        for r in rows
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    for row in [header, *body]:
        cells = (cell.ljust(w) if i in (0, len(header) - 1) else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        lines.append("  ".join(cells).rstrip())
    for i, r in enumerate(rows):  # the config's own setting
        if (r.strategy, r.gpus, r.checkpointing) == (setup.strategy, setup.workers, setup.gradient_checkpointing):
            lines[len(lines) - len(rows) + i] += "   <- this config"
    notes = sorted({note for r in rows for note in r.notes})
    lines += [
        "",
        _wrap(f"total = weights + optim + max(activ + temp + grads alive in backward, grads + step) + "
              f"{_gib(CUDA_OVERHEAD_BYTES)} GiB CUDA context/NCCL (assumed); all grads are alive in backward when "
              "grad_accum_steps > 1, else ddp's buckets. activ: kept for backward, every position trained; temp: "
              "logit chunks, backward's working set, autocast copies, fsdp's gathered root + 2 layers; step: the "
              "optimizer's scratch (after backward; none for fused AdamW on CUDA). fsdp shards weights, grads and "
              "optim 1/N; ddp grads at N > 1 include DDP's bucket copy. tight: over 90%."),
        *(_wrap(f"note: {note}") for note in notes),
        recommend(rows, gpu_mem),
    ]
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _dtype_name(setup: Setup) -> str:
    if setup.quantized:  # prepare_model_for_kbit_training upcasts everything it does not quantize
        return f"{setup.quantization} (bitsandbytes) + float32 embeddings/head/norms"
    return {4: "float32", 2: "bfloat16/float16"}[setup.weight_bytes]



def plan_report(cfg: Config, gpu_mem: str = "80GiB", gpus: str = "1,2,4,8", model_config: str | None = None) -> str:
    """The `raysft plan` report for a loaded config; ``gpu_mem``/``gpus`` as typed on the command line.

    Example:
        >>> from raysft.config import load_config
        >>> print(plan_report(load_config("examples/plan/llama3-8b-full.yaml"), "80GiB", "8"))  # doctest: +SKIP
    """
    memory, counts = parse_size(gpu_mem, "--gpu-mem"), parse_gpus(gpus, "--gpus")
    shape, setup = read_model_shape(cfg, model_config), Setup.from_config(cfg)
    refused = fsdp_refusal(cfg)
    rows = plan_table(shape, setup, counts, ("ddp",) if refused else ("ddp", "fsdp"))
    report = format_table(shape, setup, rows, memory)
    if refused:
        report += "\n" + _wrap("fsdp rows left out, raysft refuses it for this config: " + refused)
    if cfg.scaling.workers_per_gpu > 1:
        own = plan(shape, setup, setup.strategy, setup.workers, setup.gradient_checkpointing)
        report += "\n" + gpu_sharing(own, cfg.scaling.gpus_per_worker or 1.0, cfg.scaling.workers_per_gpu, memory)
    return report


def gpu_sharing(per_worker: Estimate, share: float, packed: int, gpu_mem: int) -> str:
    """Whether the workers Ray packs on one GPU (`scaling.gpus_per_worker: share` < 1: `packed` of them, e.g. the
    trials of a sweep) fit its memory together: Ray shares out GPUs by count, not by memory. Each worker is its own
    process, with its own weights, optimizer state, activations and CUDA context."""
    together = packed * per_worker.total
    head = (f"gpu sharing: scaling.gpus_per_worker {share:g} packs up to {packed} workers (e.g. sweep trials) on one "
            f"GPU: {packed} x {_gib(per_worker.total)} GiB = {_gib(together)} GiB of {_gib(gpu_mem)} GiB")
    verdict = _fit(together, gpu_mem)
    if verdict == "yes":
        return _wrap(f"{head}: fits")
    most = gpu_mem // per_worker.total if per_worker.total else 0
    advice = (f"set scaling.gpus_per_worker: {1 / most:.4g} (packs {most})" if most >= 1 else
              "one worker alone does not fit one GPU")
    return _wrap(f"{head}: {'tight (over 90%)' if verdict == 'tight' else 'does not fit'}; {advice}")


def fsdp_refusal(cfg: Config) -> str | None:
    """Why ``scaling.strategy: fsdp`` would be refused for this config (the config's own check), or None."""
    if "strategy" not in type(cfg.scaling).model_fields:
        return None  # a raysft without fsdp training: plan it anyway
    raw = cfg.model_dump(mode="json")
    raw["scaling"]["strategy"] = "fsdp"
    try:
        parse_config(raw)
    except ConfigError as err:
        return "; ".join(err.problems)
    return None
