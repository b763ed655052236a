"""Rules that span config sections, each a pure function of the config (and of facts the caller gathered: the
model's module names, the packed row count, the config a run started with). Config's validator applies
`cross_field_problems`; the driver's checks (raysft/training/preflight.py, run_folder.py, trainer.py) gather the
facts and apply the rest, all before Ray starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from raysft.config.metrics import unknown_metric
from raysft.errors import ConfigError

if TYPE_CHECKING:
    from raysft.config.schema import Config

CROSS_FIELD = "cross-field:"
"""Marks a cross-field validator's message: one or more "dotted.key: problem" lines, reported as they are."""


def cross_field_problems(cfg: Config) -> list[str]:
    """What one section of `cfg` rules out in another (a GPU-only setting on CPU workers, a metric the run does
    not log, ...): one "dotted.key: problem" line each; Config's validator raises them with its other errors."""
    problems = []
    if not cfg.scaling.use_gpu and cfg.train.precision == "fp16":
        problems.append(
            "train.precision: fp16 (with its GradScaler) needs CUDA GPUs (scaling.use_gpu: true); "
            "on CPU use bf16 or fp32"
        )
    if not cfg.scaling.use_gpu and cfg.model.attn_implementation == "flash_attention_2":
        problems.append(
            "model.attn_implementation: flash_attention_2 needs CUDA GPUs (scaling.use_gpu: true) "
            "and the flash-attn package; on CPU use packed_sdpa (the default) or sdpa"
        )
    if cfg.scaling.strategy == "fsdp":
        if cfg.model.quantization == "8bit":
            problems.append(
                "scaling.strategy: fsdp cannot shard bitsandbytes 8-bit weights (their scales are per row, "
                "outside the tensor FSDP splits); use model.quantization: 4bit or none, or strategy: ddp"
            )
        if cfg.train.precision == "fp16":
            problems.append(
                "scaling.strategy: fsdp runs bf16 or fp32 (train.precision); fp16's loss scaling would need "
                "every shard's overflow check agreed across workers. Use train.precision: bf16"
            )
        if cfg.train.optimizer == "adamw_8bit":
            problems.append(
                "scaling.strategy: fsdp does not work with train.optimizer: adamw_8bit (bitsandbytes' 8-bit "
                "states are not sharded tensors); use adamw, or strategy: ddp"
            )
    elif cfg.scaling.fsdp_cpu_offload:
        problems.append("scaling.fsdp_cpu_offload: only applies with scaling.strategy: fsdp")
    if not cfg.lora.enabled:
        problems += [f"lora.{key}: only applies with lora.enabled: true (a full fine-tune has no adapters)"
                     for key in ("use_dora", "use_rslora") if getattr(cfg.lora, key)]
    elif cfg.lora.use_dora and cfg.model.quantization == "4bit" and not cfg.scaling.use_gpu:
        problems.append(
            "lora.use_dora on a 4-bit base (model.quantization: 4bit) needs CUDA GPUs (scaling.use_gpu: true): on CPU "
            "bitsandbytes repacks 4-bit weights for its own kernels in the first evaluation, after which PEFT's DoRA "
            "reads them wrongly; on CPU use model.quantization: none with DoRA"
        )
    has_eval = bool(cfg.data.eval or cfg.data.eval_fraction)
    if cfg.train.final == "best" and not (cfg.train.eval_every and has_eval):
        problems.append(
            "train.final: best picks the weights with the best evaluation; set train.eval_every and eval data "
            "(data.eval or data.eval_fraction), or use final: last"
        )
    return problems + _metric_problems(cfg, has_eval)


def _metric_problems(cfg: Config, has_eval: bool) -> list[str]:
    problems = []
    if (unknown := unknown_metric(cfg, cfg.train.checkpoint_score)) is not None:
        problems.append(f"train.checkpoint_score: {unknown}")
    stopping = cfg.train.early_stopping
    if stopping is not None:
        if not (cfg.train.eval_every and has_eval):
            problems.append("train.early_stopping watches evaluations; set train.eval_every and eval data "
                            "(data.eval or data.eval_fraction), or remove train.early_stopping")
        if (unknown := unknown_metric(cfg, stopping.metric)) is not None:
            problems.append(f"train.early_stopping.metric: {unknown}")
    if cfg.eval.generate is not None:
        if not has_eval:
            problems.append("eval.generate scores answers to eval prompts; set data.eval or data.eval_fraction")
        if cfg.data.train_on_inputs:
            problems.append("eval.generate finds each prompt as the untrained tokens before the last assistant "
                            "turn, which data.train_on_inputs: true trains too; set train_on_inputs: false")
    return problems


def global_batch_rows(cfg: Config) -> int:
    """Rows per optimizer step: `train.global_batch_size`, else its default from the current worker count."""
    train = cfg.train
    return train.global_batch_size or max(1, cfg.scaling.num_workers) * train.micro_batch_size * train.grad_accum_steps


def derived_global_batch(flat: dict[str, Any]) -> int:
    """global_batch_rows of a flattened config (config.yaml as read back): runs started before
    train.global_batch_size existed derived it from their worker count."""
    return max(1, flat["scaling.num_workers"]) * flat["train.micro_batch_size"] * flat["train.grad_accum_steps"]


def check_batch_fits(cfg: Config, num_rows: int) -> None:
    """One optimizer step needs a global batch of rows; say which keys to lower when the data is smaller."""
    global_batch = global_batch_rows(cfg)
    if num_rows < global_batch:
        raise ConfigError([
            f"train.global_batch_size: the training data packs into {num_rows} row(s), but one optimizer step needs "
            f"{global_batch} (train.global_batch_size, by default scaling.num_workers x train.micro_batch_size x "
            f"train.grad_accum_steps = {max(1, cfg.scaling.num_workers)} x {cfg.train.micro_batch_size} x "
            f"{cfg.train.grad_accum_steps}); lower those or add data"
        ])


# --- what the model allows (facts from its config.json and a meta-device build, gathered by preflight) --------


def seq_len_problem(cfg: Config, positions: int | None) -> str | None:
    """data.max_seq_len against the `positions` the model was built for (max_position_embeddings), if known."""
    if positions and cfg.data.max_seq_len > positions:
        return (f"data.max_seq_len: {cfg.data.max_seq_len} is beyond the {positions} positions the model was built "
                "for (max_position_embeddings); lower it")
    return None


def lora_targets(cfg: Config) -> list[tuple[str, str]]:
    """(key, module name) of every module LoRA must find by name: its targets (unless all-linear) and
    modules_to_save; [] without LoRA."""
    if not cfg.lora.enabled:
        return []
    targets = [] if cfg.lora.target_modules == "all-linear" else cfg.lora.target_modules
    saved = cfg.lora.modules_to_save or []
    return [("lora.target_modules", t) for t in targets] + [("lora.modules_to_save", m) for m in saved]


def lora_target_problems(cfg: Config, names: set[str], linear: set[str]) -> list[str]:
    """Each of `lora_targets` that matches none of the model's module `names` (`linear`: its linear layers' names)."""
    return [f"{key}: '{target}' matches no module of {cfg.model.name_or_path} (its linear layers: "
            f"{', '.join(sorted(linear))}; or use target_modules: all-linear)"
            for key, target in lora_targets(cfg) if not _matches(target, names)]


def _matches(target: str, names: set[str]) -> bool:
    # PEFT's rule for a list of names: a module matches when its dotted name is, or ends with, the target.
    return any(name == target or name.endswith("." + target) for name in names)


# --- what a resume may change -------------------------------------------------------------------------------

# Settings a resume may change: they decide how long the run goes on and what it reports, not what a
# step computes. A dotted prefix allows the whole section.
RESUMABLE_CHANGES = (
    "train.max_steps",
    "train.epochs",
    "train.eval_every",
    "train.log_every",
    "train.checkpoint_every",
    "train.checkpoints_to_keep",
    "train.checkpoint_score",
    "train.final",
    "train.early_stopping",  # None, or the section's keys below
    "train.early_stopping.",
    "train.on_nonfinite",
    "train.output_dir",  # the run folder was moved: where it is, not what it computes
    "scaling.num_workers",  # the global batch is fixed when the run starts: only who computes each step changes
    "train.grad_accum_steps",  # ... and how each worker cuts its share
    "scaling.max_failures",
    "scaling.ray_address",
    "scaling.resource_wait_s",
    "scaling.stop_grace_s",
    "data.num_tokenize_workers",
    "data.cache_dir",
    "tracking.",
    "eval.",  # generating answers to score them changes no step
)


def may_change_on_resume(key: str) -> bool:
    return any(key == allowed or (allowed.endswith(".") and key.startswith(allowed)) for allowed in RESUMABLE_CHANGES)


def changes_between(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every setting `after` changes against `before` (both flattened configs): {key: {from, to}}."""
    return {
        key: {"from": before.get(key), "to": after.get(key)}
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key) and key != "train.resume"  # resuming is the mode, not a setting
    }


def check_resume_changes(before: dict[str, Any], after: dict[str, Any], location: str) -> dict[str, dict[str, Any]]:
    """The settings `after` changes against `before` (both flattened configs: the run at `location` as it last
    ran, and the resume's); ConfigError naming each one a resume may not change."""
    changed = changes_between(before, after)
    refused = [key for key in changed if not may_change_on_resume(key)]
    if refused:
        raise ConfigError(
            [f"{key}: the run in {location} was started with {changed[key]['from']!r}, not {changed[key]['to']!r}; "
             "a resume continues the same training, so this cannot change (set it back, or start a new "
             "train.output_dir)" for key in refused]
        )
    return changed
