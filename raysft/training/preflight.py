"""Everything knowable about a run before Ray starts, checked in the driver and reported together.

The config's own types and cross-field rules are checked when it is loaded (raysft/config/); what needs the
file system or the model's structure is gathered here: folders that must be writable, the model's location, and
the facts raysft/config/rules.py judges the config by (the model's real module names, built on the meta device:
no weights are read; its positions). Data rows are checked when they are read
(raysft/data/), also before Ray starts.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from torch import nn

from raysft.config import Config, ModelConfig, default_cache_root, is_uri
from raysft.config.rules import lora_target_problems, lora_targets, seq_len_problem
from raysft.errors import ConfigError
from raysft.evaluation import check_functions
from raysft.model_source import check_model_source, model_location
from raysft.storage import storage_problem

log = logging.getLogger(__name__)


def writable_folder_problem(folder: Path, key: str) -> str | None:
    """Why `folder` (which may not exist yet) cannot be written, or None; judged by the folder or its
    nearest existing parent, without writing anything (a refused run leaves no trace).

    A read-only mount is read from the file system's flags: permission bits say nothing about it
    (and, for root, nothing at all).
    """
    folder = folder.expanduser()
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        return f"{key}: {folder} cannot be created: {existing} is a file, not a folder"
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        return f"{key}: {folder} is not writable ({existing} is on a read-only file system)"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{key}: {folder} is not writable (no write permission on {existing})"
    return None


def _folder_problems(cfg: Config) -> list[str]:
    problems = []
    cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_root() / "tokenized"
    folders = [(Path(cfg.train.output_dir), "train.output_dir"), (cache, "data.cache_dir")]
    location = cfg.scaling.storage_path
    if location is not None and is_uri(location):
        if (problem := storage_problem(location, "scaling.storage_path")) is not None:
            problems.append(problem)
    elif location is not None:
        folders.append((Path(location), "scaling.storage_path"))
    if cfg.tracking.mlflow and cfg.tracking.mlflow_dir:
        folders.append((Path(cfg.tracking.mlflow_dir), "tracking.mlflow_dir"))
    for folder, key in folders:
        if (problem := writable_folder_problem(folder, key)) is not None:
            problems.append(problem)
    return problems


def _model_config(cfg: ModelConfig):  # -> transformers.PretrainedConfig | None
    """The model's config.json (or GGUF metadata) when it is at hand without a download, else None."""
    from transformers import AutoConfig

    location, kwargs = model_location(cfg)
    try:
        return AutoConfig.from_pretrained(location, local_files_only=True, **kwargs)
    except (OSError, ValueError) as err:
        # A hub id not cached yet: the workers download it; its structure is checked there.
        log.info("model %s not checked before start (%s)", cfg.name_or_path, err)
        return None


def _module_names(model_config, trust_remote_code: bool) -> tuple[set[str], set[str]]:  # noqa: ANN001
    """(every module's dotted name, the last name part of every linear layer), from a meta-device model."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    names = {name for name, _ in model.named_modules() if name}
    linear = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    return names, linear


def _model_problems(cfg: Config) -> list[str]:
    problems = check_model_source(cfg.model, "model.name_or_path")
    if problems:
        return problems
    model_config = _model_config(cfg.model)
    if model_config is None:
        return []
    if (problem := seq_len_problem(cfg, getattr(model_config, "max_position_embeddings", None))) is not None:
        problems.append(problem)
    if lora_targets(cfg):
        problems += lora_target_problems(cfg, *_module_names(model_config, cfg.model.trust_remote_code))
    return problems


def _tracking_problems(cfg: Config) -> list[str]:
    if cfg.tracking.mlflow and importlib.util.find_spec("mlflow") is None:
        return [("tracking.mlflow: the mlflow package is not installed; pip install 'raysft[mlflow]' (or set "
                 "tracking.mlflow: false)")]
    return []


def preflight(cfg: Config) -> None:
    """Raise one ConfigError listing every problem of `cfg` that can be known before Ray starts."""
    problems = _folder_problems(cfg) + _model_problems(cfg) + _tracking_problems(cfg)
    if cfg.eval.generate is not None:  # a metric function that does not import would fail every worker later
        problems += check_functions(cfg.eval.generate.metrics)
    if problems:
        raise ConfigError(problems)
