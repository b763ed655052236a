"""The config tree of a train run: pydantic models, one per section, each field's docstring its help text.

(A sweep's config, which holds one of these as its base, is in raysft.tune.config.) Every section rejects unknown
keys; a rule that spans sections is in raysft/config/rules.py, and Config's validator applies it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_serializer,
    field_validator,
    model_validator,
)

from raysft.config.metrics import EVAL_PREFIX, LOSS_METRICS
from raysft.config.paths import is_uri
from raysft.config.rules import CROSS_FIELD, cross_field_problems

DataFormat = Literal["auto", "prompt_response", "prompt_completion", "alpaca", "messages", "sharegpt", "text"]


class Section(BaseModel):
    """Base of every config section, here and in raysft.tune.config (the sweep's)."""

    # Docstrings on fields are the help text; unknown keys are errors, never silently ignored.
    # inf/nan are never a sensible setting (`train.lr: .inf` would turn into NaN losses inside Ray).
    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, validate_assignment=True, allow_inf_nan=False
    )


SectionT = TypeVar("SectionT", bound=BaseModel)


class ModelConfig(Section):
    name_or_path: str
    """Hugging Face hub id, a local model folder, or a folder/file holding a GGUF model."""
    gguf_file: str | None = None
    """GGUF file name inside `name_or_path` (a path ending in .gguf sets this automatically)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the (non-quantized) weights. Keep float32 with bf16 autocast for exact CPU runs."""
    quantization: Literal["none", "4bit", "8bit"] = "none"
    """bitsandbytes quantization of the base weights (4bit = QLoRA)."""
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type."""
    bnb_4bit_double_quant: bool = True
    """Quantize the 4-bit quantization constants too (saves ~0.4 bit/parameter)."""
    attn_implementation: Literal["packed_sdpa", "sdpa", "eager", "flash_attention_2"] = "packed_sdpa"
    """Attention kernel. packed_sdpa: PyTorch SDPA run once per packed example (cost sum of n^2 per row,
    not row_length^2; plain sdpa when generating). sdpa: one SDPA call per row under a block-diagonal
    mask. flash_attention_2 needs CUDA and the flash-attn package."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (non-reentrant, DDP-safe) to save memory."""
    trust_remote_code: bool = False
    """Run model code shipped with the checkpoint. Off unless you trust its author."""
    chat_template: str | None = None
    """Template used when the tokenizer has none: `chatml`, or a Jinja template string (which replaces the
    tokenizer's own). raysft's ChatML renders tools (in the system turn), tool calls (JSON in <tool_call> tags
    inside the assistant turn), tool results (`tool` turns) and reasoning (<think> ahead of the reply)."""
    add_special_tokens: list[str] | None = None
    """Tokens to add to the tokenizer as special tokens (never split; written by the chat template, while data
    spelling them stays text unless `data.parse_special_tokens`). Tokens new to the vocabulary get embedding rows
    (and output-head rows when untied), initialized to the mean of the existing rows; with LoRA only those rows
    are trained besides the adapters and saved in it (PEFT trainable tokens), a full fine-tune trains them as any
    weight. Default (null): the ChatML markers `<|im_start|>`, `<|im_end|>` when the ChatML fallback is used and
    the tokenizer lacks them (else they would be split into several plain tokens); `[]` adds nothing."""

    @field_validator("add_special_tokens")
    @classmethod
    def _tokens_spelled_once(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            blank = [token for token in value if not token.strip()]
            if blank:
                raise ValueError(f"tokens must not be empty or whitespace (got {blank})")
            repeated = sorted({token for token in value if value.count(token) > 1})
            if repeated:
                raise ValueError(f"tokens listed more than once: {repeated}")
        return value


class SourceConfig(Section):
    path: str | None = None
    """A JSON/JSONL/Parquet/CSV file, or a folder or glob of them."""
    hf_dataset: str | None = None
    """A Hugging Face dataset: hub name or a folder written by `save_to_disk`."""
    hf_config: str | None = None
    """Dataset configuration name (hub datasets only)."""
    split: str = "train"
    """Split of `hf_dataset` to read."""
    rows: list[dict[str, Any]] | None = None
    """Rows given inline (Python API): a list of dicts."""
    file_type: Literal["auto", "json", "jsonl", "parquet", "csv"] = "auto"
    """File type; `auto` goes by extension."""
    format: DataFormat = "auto"
    """Row shape; `auto` detects it from the first row's columns."""
    prompt_column: str | None = None
    """Column holding the prompt (prompt_response format), e.g. `question`."""
    response_column: str | None = None
    """Column holding the response (prompt_response format), e.g. `answer`."""
    system_prompt: str | None = None
    """System message prepended to every conversation that has none."""
    limit: int | None = Field(default=None, gt=0)
    """Read at most this many rows."""
    invalid_rows: Literal["raise", "skip"] = "raise"
    """Rows that fail validation (e.g. an empty response): raise naming them, or skip them with a warning."""

    @model_validator(mode="after")
    def _exactly_one_source(self) -> "SourceConfig":
        given = [k for k in ("path", "hf_dataset", "rows") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of path, hf_dataset, rows (got {given or 'none'})")
        return self


class DataConfig(Section):
    train: list[SourceConfig]
    """Training sources (one or a list), concatenated."""
    eval: list[SourceConfig] | None = None
    """Evaluation sources; if absent, `eval_fraction` of train is held out."""
    eval_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Fraction of the training rows held out for evaluation when `eval` is not given."""
    max_seq_len: int = Field(default=1024, gt=0)
    """Maximum tokens per example (and per packed row)."""
    over_length: Literal["drop", "truncate", "raise"] = "truncate"
    """What to do with examples longer than `max_seq_len`; the count is reported."""
    packing: bool = True
    """Pack examples into rows of max_seq_len (best-fit decreasing, position_ids restart per example)."""
    train_on_inputs: bool = False
    """Train on prompt/user tokens too, not only on completions/assistant turns."""
    num_tokenize_workers: int = Field(default=2, gt=0)
    """Most Ray Data actors that tokenize in parallel, started together; fewer for small inputs (one per 2 MiB of
    source files)."""
    cache_dir: str | None = None
    """Where the tokenized and packed data are cached as Parquet (default ~/.cache/raysft/data): a local
    folder, a folder every node mounts, or object storage (`s3://bucket/raysft-cache`); on a cluster of
    several nodes it must be one every node reaches. Keyed by content; `max_seq_len` only re-packs."""
    shuffle_window: int = Field(default=2048, gt=0)
    """Packed rows shuffled together. Each epoch permutes the rows uniformly when they number at most
    this; past it, chunks of 64 rows are permuted and then rows within windows of this many. A worker holds
    about two windows of rows (2 x shuffle_window x max_seq_len x 8 bytes), whatever the dataset's size."""
    parse_special_tokens: bool = False
    """Read special-token spellings inside message text (e.g. a user typing `<|im_end|>`) as the control
    tokens themselves. Off: content is tokenized as plain text, so data cannot forge turn boundaries;
    only the chat template's own markers are control tokens."""
    max_row_chars: int = Field(default=1_000_000, gt=0)
    """Rows with more characters than this (all text fields together) are invalid rows (reported with
    their file:line, or skipped with `invalid_rows: skip`): one giant row must not exhaust a tokenizer."""

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value

    @field_validator("train")
    @classmethod
    def _some_training_data(cls, value: list[SourceConfig]) -> list[SourceConfig]:
        if not value:
            raise ValueError("no training source given; add at least one (path, hf_dataset or rows)")
        return value


class LoraConfig(Section):
    enabled: bool = True
    """LoRA adapters; false means full fine-tuning."""
    r: int = Field(default=16, gt=0)
    """Rank of the update matrices."""
    alpha: float = Field(default=32, gt=0)
    """Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with `use_rslora`)."""
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    """Dropout on the LoRA input."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt, or `all-linear` (every linear layer but the output head)."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter (e.g. `lm_head`, `embed_tokens`)."""
    use_dora: bool = False
    """DoRA (weight-decomposed LoRA, Liu et al. 2024): each adapted layer's weight becomes a magnitude, one trained
    value per output feature (initialized to the base weight's row norms), times a direction that LoRA updates:
    W' = m * (W + scale * BA) / ||W + scale * BA||, the norm per output row and treated as a constant in backward.
    Costs more than LoRA: a magnitude vector per adapted layer (in the adapter and the checkpoints), the norm
    recomputed every forward (a transient the size of the weight), two more outputs of each adapted layer kept for
    backward, and with `dropout` > 0 a second run of the base layer on the dropped-out input, whose weight (cast or,
    on a 4/8-bit base, dequantized) is then kept for backward too: use `dropout: 0` with QDoRA (`raysft plan` counts
    all of it). Works on full-precision and bitsandbytes 4/8-bit bases (4-bit with `scaling.use_gpu` only: on CPU,
    bitsandbytes repacks the weights in a way PEFT's DoRA misreads); `raysft export --merge` folds it into the
    weights like LoRA."""
    use_rslora: bool = False
    """Rank-stabilized LoRA (Kalajdzievski 2023): scale the update by alpha / sqrt(r) instead of alpha / r, so that
    high ranks are not damped. At r > 1 the update is sqrt(r) times larger for the same alpha: lower alpha or
    `train.lr` when switching an existing config."""


class EarlyStoppingConfig(Section):
    metric: str = "eval_loss"
    """Evaluation metric watched: eval_loss, eval_ppl, eval_token_accuracy or an `eval.generate` metric
    (eval_exact_match, ...), the same value on every worker, so every worker stops at the same step."""
    patience: int = Field(default=3, gt=0)
    """Evaluations in a row without an improvement after which the run stops (the step-0 evaluation is the first
    reference point). Counted across --resume and worker restarts (the count is saved in each checkpoint)."""
    min_delta: float = Field(default=0.0, ge=0.0)
    """An evaluation improves only when it beats the best so far by more than this (in the metric's units)."""
    mode: Literal["min", "max"] | None = None
    """Whether lower or higher is better; default from the metric: min for eval_loss and eval_ppl, max for
    eval_token_accuracy and the built-in generation metrics, a function metric's own `mode`."""


class TrainConfig(Section):
    output_dir: str = "runs/raysft"
    """Run folder: config, metrics.jsonl, checkpoints/, final/."""
    seed: int = 0
    """Seed for data order, LoRA init, dropout and NEFTune noise (each micro-batch draws its dropout and noise from
    (seed, step, its place in the step), whichever worker computes it)."""
    micro_batch_size: int = Field(default=4, gt=0)
    """Rows per forward pass per worker."""
    grad_accum_steps: int = Field(default=1, gt=0)
    """Micro-batches per optimizer step per worker, when `global_batch_size` is not set (it sets that default)."""
    global_batch_size: int | None = Field(default=None, gt=0)
    """Rows (packed sequences) per optimizer step, all workers together: what a step's maths depends on. Default:
    scaling.num_workers x micro_batch_size x grad_accum_steps (1 worker in local mode), fixed when the run starts.
    Each step's rows are cut into micro-batches of `micro_batch_size` rows, dealt to the workers in turn, so the
    same rows, learning rate and random draws make the step on any number of workers: a resume may change
    scaling.num_workers (and grad_accum_steps) and trains the same model."""
    max_steps: int | None = Field(default=None, gt=0)
    """Optimizer steps to run; overrides `epochs` when set."""
    epochs: float = Field(default=1.0, gt=0)
    """Passes over the training data (fractions allowed)."""
    lr: float = Field(default=2e-4, gt=0)
    """Peak learning rate."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    warmup_steps: int = Field(default=0, ge=0)
    """Linear warmup steps from 0 to `lr`."""
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    """Floor of the decay as a fraction of `lr`."""
    weight_decay: float = Field(default=0.0, ge=0.0)
    """Decoupled weight decay (not applied to biases and norms)."""
    optimizer: Literal["adamw", "adamw_8bit", "adafactor"] = "adamw"
    """adamw (torch), adamw_8bit (bitsandbytes) or adafactor (torch)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas, each in [0, 1)."""
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    """Clip the global gradient norm to this; null disables clipping."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast dtype. fp16 uses a GradScaler and needs CUDA (`scaling.use_gpu: true`); on CPU use bf16 or fp32."""
    compile: bool = False
    """Compile each decoder layer with `torch.compile` (regional compilation: every layer runs the same compiled
    code, so compile time does not grow with depth). Fuses the elementwise work between the matmuls (norms, RoPE,
    SwiGLU, residual adds, LoRA scaling); attention stays eager. Pays off on GPUs: the first steps (and the first
    evaluation) wait for the compiler, tens of seconds; `eval.generate` runs the layers uncompiled."""
    eval_every: int | None = Field(default=None, gt=0)
    """Evaluate every N steps (and always at the end when there is eval data)."""
    log_every: int = Field(default=1, gt=0)
    """Log training metrics every N steps."""
    checkpoint_every: int | None = Field(default=None, gt=0)
    """Save a resumable checkpoint every N steps."""
    checkpoints_to_keep: int | None = Field(default=2, gt=0)
    """Checkpoints kept (null keeps all): the N best by `checkpoint_score` when the run evaluates
    (`eval_every` and eval data), else the N newest; the newest is always kept, so resume loses nothing."""
    checkpoint_score: str = "eval_loss"
    """Evaluation metric that ranks checkpoints: eval_loss, eval_ppl (lower is better), eval_token_accuracy, or an
    `eval.generate` metric such as eval_exact_match (higher is better unless its `mode` says min); the latest
    evaluation at or before each checkpoint's step."""
    final: Literal["last", "best"] = "last"
    """What final/ holds: the weights of the last step, or those of the checkpoint (or last step) with the best
    `checkpoint_score` (needs `eval_every` and eval data)."""
    early_stopping: EarlyStoppingConfig | None = None
    """Stop the run once `metric` has not improved for `patience` evaluations (needs `eval_every` and eval data);
    e.g. `{metric: eval_loss, patience: 3}`. Null runs to max_steps / epochs."""
    neftune_alpha: float | None = Field(default=None, gt=0)
    """NEFTune (Jain et al. 2023; TRL's `neftune_noise_alpha`): in training forwards only (never in evaluation or
    generation) add uniform noise in [-1, 1] x alpha / sqrt(L x d) to the input embeddings, d the hidden size and
    L the length of the example the token belongs to. A packed row holds several examples: L is each one's own
    length, so an example gets the noise it would get trained alone, whatever it is packed with (the row's length
    would shrink it by up to sqrt(examples per row)). Drawn from torch's RNG like dropout, seeded per micro-batch
    from (seed, step, its place in the step): the same on any number of workers, and on resume. The paper uses 5 to 15; null turns it off."""
    on_nonfinite: Literal["skip", "abort"] = "abort"
    """A NaN/inf loss or gradient: skip that step's update, or stop the run."""
    resume: bool = False
    """Continue from the newest verified checkpoint in output_dir if there is one."""

    @field_validator("betas")
    @classmethod
    def _betas_in_unit_interval(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= beta < 1.0 for beta in value):
            raise ValueError(f"each Adam beta must be in [0, 1) (got {list(value)})")
        return value


class ScalingConfig(Section):
    num_workers: int = Field(default=1, ge=0)
    """Ray Train workers (data-parallel replicas). 0 runs the loop in the driver (Ray Train local mode).
    `{min: 1, max: 4}` makes the run elastic (spot and preemptible capacity): it starts once `min` workers can be
    placed, goes on with fewer when workers' nodes go away and grows back towards `max` when capacity returns, each
    time from the newest checkpoint (set `train.checkpoint_every`). Every step trains the same global batch on
    however many workers it has (`train.global_batch_size`), so the model is the one a fixed-size run trains.
    Written as `num_workers: <max>` and `min_workers: <min>` in the run's config.yaml."""
    min_workers: int | None = Field(default=None, ge=1)
    """The fewest workers an elastic run goes on with (what `num_workers: {min, max}` sets). Null: a fixed size."""
    elastic_resize_interval_s: float = Field(default=60.0, gt=0)
    """How often an elastic run checks for capacity to grow back into (Ray Train's
    `elastic_resize_monitor_interval_s`); growing restarts the workers from the newest checkpoint."""
    use_gpu: bool = False
    """One GPU per worker (or `gpus_per_worker`)."""
    gpus_per_worker: float | None = Field(default=None, gt=0)
    """With `use_gpu: true`, the GPUs each worker takes in Ray's scheduling (default 1; `use_gpu: false` runs on CPUs
    whatever this says). A fraction lets workers of small models share a GPU: 0.25 packs four sweep trials (or runs)
    on each GPU. Ray does not divide the GPU's memory: `raysft plan` checks that the workers packed on one GPU fit it
    together. Above 1, a whole number."""
    resources_per_worker: dict[str, float] | None = None
    """Extra per-worker resources, e.g. {CPU: 4}."""
    max_failures: int | None = Field(default=None, ge=-1)
    """Restarts after a worker failure (-1: unlimited); each resumes from the newest checkpoint. Default: 0, and
    unlimited for an elastic run (a lost node is what it is for)."""
    ray_address: str | None = None
    """Ray cluster to join: its head's host:port (or `ray://host:port`, or `auto`). Unset: RAY_ADDRESS when set, else
    the cluster `ray start` started on this machine when one runs, else a local Ray that raysft starts for the run,
    listening on 127.0.0.1 only. A joined cluster is named in one console line."""
    storage_path: str | None = None
    """Where the run lives: checkpoints (through Ray Train), config.yaml, metrics.jsonl, final/. A local or
    shared (NFS) folder, or object storage (`s3://bucket/path`, `gs://...`) for clusters without a shared
    folder; credentials come from the environment. Default: train.output_dir. With it set, output_dir
    receives a copy of the results when the run ends."""
    resource_wait_s: float = Field(default=600.0, ge=0)
    """On an autoscaling cluster, how long to wait for nodes that can hold the workers before giving up.
    Without an autoscaler a request the cluster cannot hold fails at once."""
    stop_grace_s: float = Field(default=60.0, ge=0)
    """On SIGINT (Ctrl-C) or SIGTERM (a preemption notice), how long the workers get to finish their step and
    write a checkpoint before the run stops without one (it then resumes from its newest checkpoint). Keep it
    under the notice your platform gives (Kubernetes: terminationGracePeriodSeconds, 30 s by default)."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """How workers share the model. `ddp`: each worker holds the whole model, gradients and optimizer state
    (fastest while it fits one device). `fsdp`: PyTorch FSDP2 shards parameters, gradients and optimizer
    state across the workers (each decoder layer, then the rest), so each holds about 1/num_workers of them;
    checkpoints are sharded too (torch.distributed.checkpoint, one file per worker). `raysft plan` says which
    fits."""
    fsdp_cpu_offload: bool = False
    """With `strategy: fsdp`, keep the parameter shards and optimizer state in CPU memory between uses
    (slower; for models whose shards still do not fit the GPUs)."""

    @model_validator(mode="before")
    @classmethod
    def _worker_range(cls, value: Any) -> Any:
        """`num_workers: {min, max}` is the elastic spelling of `num_workers: max` with `min_workers: min`."""
        if not (isinstance(value, dict) and isinstance(value.get("num_workers"), dict)):
            return value
        span = value["num_workers"]
        if set(span) != {"min", "max"} or not all(isinstance(span[k], int) and span[k] >= 1 for k in span):
            raise ValueError(f"{CROSS_FIELD}scaling.num_workers: an elastic range is {{min: M, max: N}} with "
                             f"1 <= M <= N (got {span})")
        return {**value, "num_workers": span["max"], "min_workers": span["min"]}

    @model_validator(mode="after")
    def _elastic_bounds(self) -> "ScalingConfig":
        if self.min_workers is not None and not 1 <= self.min_workers <= self.num_workers:
            raise ValueError(f"{CROSS_FIELD}scaling.min_workers: an elastic run needs 1 <= min_workers "
                             f"({self.min_workers}) <= num_workers ({self.num_workers})")
        return self

    @model_validator(mode="after")
    def _gpu_share(self) -> "ScalingConfig":
        share = self.gpus_per_worker
        if share is None:
            return self
        if share > 1 and share != int(share):
            raise ValueError(f"{CROSS_FIELD}scaling.gpus_per_worker: a worker takes a fraction of one GPU or whole "
                             f"GPUs (got {share:g}); use e.g. 0.5 or 2")
        if "GPU" in (self.resources_per_worker or {}):
            raise ValueError(f"{CROSS_FIELD}scaling.resources_per_worker: GPU is set by scaling.gpus_per_worker; "
                             "remove it from resources_per_worker")
        return self

    @property
    def worker_resources(self) -> dict[str, float] | None:
        """Ray's resources_per_worker: `resources_per_worker` with `gpus_per_worker` as its GPU."""
        if self.gpus_per_worker is None or not self.use_gpu:
            return self.resources_per_worker
        return {**(self.resources_per_worker or {}), "GPU": self.gpus_per_worker}

    @property
    def workers_per_gpu(self) -> int:
        """How many workers Ray may pack on one GPU (1 unless `gpus_per_worker` is a fraction)."""
        share = self.gpus_per_worker or 1.0
        return max(1, int(1.0 / share + 1e-9)) if share < 1 and self.use_gpu else 1

    @property
    def elastic(self) -> bool:
        return self.min_workers is not None and self.min_workers < self.num_workers

    @property
    def restarts(self) -> int:
        """`max_failures` as Ray Train takes it (see its default)."""
        if self.max_failures is not None:
            return self.max_failures
        return -1 if self.elastic else 0


class TrackingConfig(Section):
    console: bool = True
    """Print a line per logged step and per evaluation (rank 0), and per data preparation stage."""
    tensorboard: bool = True
    """Write TensorBoard events to output_dir/tensorboard."""
    wandb: bool = False
    """Log to Weights & Biases (offline when WANDB_API_KEY is not set)."""
    wandb_project: str = "raysft"
    """W&B project."""
    wandb_group: str | None = None
    """W&B group (a sweep sets one per sweep)."""
    run_name: str | None = None
    """Run name shown in trackers (default: the output folder name)."""
    mlflow: bool = False
    """Log to MLflow (`pip install 'raysft[mlflow]'`), from rank 0: one MLflow run per training run (a resume or a
    worker restart continues it), the resolved config as its params, every metrics.jsonl record as metrics at
    its step. The store is MLFLOW_TRACKING_URI when set (a tracking server, Databricks; its credentials, e.g.
    MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD, stay in the environment), else a local SQLite
    store in `mlflow_dir`."""
    mlflow_experiment: str = Field(default="raysft", min_length=1)
    """MLflow experiment the run goes in (created when missing)."""
    mlflow_dir: str | None = None
    """Folder of the local MLflow store (mlflow.db, artifacts/) when MLFLOW_TRACKING_URI is not set; point runs at
    one folder to compare them in one `mlflow ui`. Default: the run folder's mlflow/ (a sweep's trials: the sweep
    folder's). A local or shared folder, not a URI: runs in object storage keep theirs in the run folder."""
    mlflow_parent_run_id: str | None = None
    """Nest the run under this MLflow run (tag mlflow.parentRunId). A sweep sets its own run here for each trial."""

    @field_validator("mlflow_dir")
    @classmethod
    def _local_folder(cls, value: str | None) -> str | None:
        if value is not None and is_uri(value):
            raise ValueError(
                f"{value!r} is a URI; the local MLflow store is a SQLite file in a folder. For a tracking server "
                "set MLFLOW_TRACKING_URI in the environment instead"
            )
        return value


GenerateMetricType = Literal["exact_match", "contains", "rouge_l", "function"]
Normalizer = Literal["whitespace", "lower", "strip_punctuation", "number"]


class GenerateMetricConfig(Section):
    """One task metric of the generated answers, logged as `eval_<name>`. In YAML also just its type
    (`- exact_match`), or `{function: module:function}`."""

    type: GenerateMetricType
    """exact_match: the normalized answers are equal; contains: the normalized reference occurs in the normalized
    prediction; rouge_l: ROUGE-L F1 (longest common subsequence of lowercased alphanumeric words); function: your
    own, see `function`. Each is the mean over the prompts (a function returns its own aggregate)."""
    name: str | None = Field(default=None, pattern=r"^[A-Za-z][A-Za-z0-9_]*$")
    """Logged as `eval_<name>` (in metrics.jsonl, every tracker, and as a sweep or early-stopping metric);
    default: the type, or a function's own name."""
    extract: str | None = None
    """Regular expression applied to the prediction and the reference before comparing (built-in types): the
    answer is its first group (the whole match without groups) at its first match; a prediction it does not
    match scores 0, a reference it does not match is an error named before training. GSM8K's final answer:
    `####\\s*(-?[\\d,.]+)`."""
    normalize: list[Normalizer] = ["whitespace"]
    """Applied in order after `extract` (built-in types): whitespace (trim, collapse runs), lower (case-fold),
    strip_punctuation (at both ends: `"Paris."` -> `Paris`), number (drop `,` and `$`, then a number is written
    canonically: `1,000.00` -> `1000`, `18.` -> `18`)."""
    function: str | Callable[..., Any] | None = None
    """type function: `module:function` importable on every worker (or, from Python, the callable itself),
    called once per evaluation as `function(predictions, references)` with the raw generated and reference
    texts (lists of str, in eval order); returns a number (logged as eval_<name>) or a dict of numbers (each
    logged as eval_<name>_<key>)."""
    mode: Literal["min", "max"] | None = None
    """type function: whether lower or higher is better (default max); built-in types are always max."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"type": value}
        if isinstance(value, dict) and "type" not in value and "function" in value:
            return {**value, "type": "function"}
        return value

    @field_validator("extract")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"not a valid regular expression ({err}): {value!r}") from None
        return value

    @field_validator("function")
    @classmethod
    def _module_colon_name(cls, value: Any) -> Any:
        if isinstance(value, str) and not re.match(r"^[\w.]+:[\w.]+$", value):
            raise ValueError(f"expected module:function, e.g. mypackage.metrics:score (got {value!r})")
        return value

    @field_serializer("function", when_used="json")
    def _function_by_name(self, value: Any) -> Any:
        # config.yaml and the trackers hold data: a callable is written as the name that imports it.
        return value if value is None or isinstance(value, str) else f"{value.__module__}:{value.__qualname__}"

    @model_validator(mode="after")
    def _fields_of_its_type(self) -> "GenerateMetricConfig":
        problems = []
        if self.type == "function":
            if self.function is None:
                problems.append("type function needs `function: module:function`")
            if self.extract is not None or self.normalize != ["whitespace"]:
                problems.append("extract and normalize apply to the built-in types; a function gets the raw texts")
        else:
            problems += [f"{key} only applies to type function" for key in ("function", "mode")
                         if getattr(self, key) is not None]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def metric_name(self) -> str:
        """`eval_<name>`: the key its score is logged under."""
        if self.name:
            return f"{EVAL_PREFIX}{self.name}"
        if self.type != "function":
            return f"{EVAL_PREFIX}{self.type}"
        function = self.function
        name = function.rsplit(":", 1)[1].rsplit(".", 1)[-1] if isinstance(function, str) else function.__name__  # type: ignore[union-attr]
        return f"{EVAL_PREFIX}{name}"

    @property
    def higher_is_better(self) -> bool:
        return self.mode != "min"


class GenerateConfig(Section):
    num_prompts: int = Field(default=50, gt=0, le=5000)
    """The first N examples of the eval split, in data order (the same on every run and worker count): each
    prompt is its conversation up to the last assistant turn, the reference that turn's text."""
    max_new_tokens: int = Field(default=128, gt=0)
    """Tokens generated per prompt at most (greedy; generation also stops at the end-of-turn token)."""
    batch_size: int = Field(default=8, gt=0)
    """Prompts generated together (left-padded, grouped by length). The prompts are split across the workers by
    whole batches, so the same batches are generated with 1 or N workers."""
    metrics: list[GenerateMetricConfig] = Field(default_factory=lambda: [GenerateMetricConfig(type="exact_match")],
                                                min_length=1)
    """Task metrics of the generated answers, each logged as eval_<name>: `exact_match`, `contains`, `rouge_l`,
    or a mapping with `extract`, `normalize`, `name`, or `function: module:function`."""

    @field_validator("metrics")
    @classmethod
    def _distinct_names(cls, value: list[GenerateMetricConfig]) -> list[GenerateMetricConfig]:
        names = [metric.metric_name for metric in value]
        clashes = sorted({name for name in names if names.count(name) > 1 or name in LOSS_METRICS})
        if clashes:
            raise ValueError(f"metric names must be distinct and not {', '.join(LOSS_METRICS)}: {', '.join(clashes)} "
                             "(set `name:` on each)")
        return value


class EvalConfig(Section):
    generate: GenerateConfig | None = None
    """Task metrics from generated answers at every evaluation (step 0, every `train.eval_every` steps, the
    end): greedy chat generation for the first `num_prompts` eval examples on the Ray Train workers, scored
    against the references; e.g. `{num_prompts: 50, max_new_tokens: 200, metrics: [exact_match]}`."""


class Config(Section):
    """A whole training run. See examples/*.yaml."""

    model: ModelConfig
    data: DataConfig
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    tracking: TrackingConfig = TrackingConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _cross_field_needs(self) -> "Config":
        # Checked here, not on a worker: a GPU-only setting on CPU workers would fail after Ray started.
        if problems := cross_field_problems(self):
            raise ValueError(CROSS_FIELD + "\n".join(problems))
        return self
