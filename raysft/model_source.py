"""Where a model is (`model_location`) and what its source holds (`check_model_source`), checked before anything
is loaded. Light (no torch, no peft): the driver's pre-flight checks and the tokenizer's loading use it before Ray
starts, and a Ray run's driver never imports the model stack.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from raysft.config import ModelConfig


def model_location(cfg: ModelConfig) -> tuple[str, dict[str, object]]:
    """Folder/id to load from and the keyword arguments shared by model and tokenizer."""
    location, gguf_file = cfg.name_or_path, cfg.gguf_file
    if location.endswith(".gguf") and gguf_file is None:
        location, gguf_file = str(Path(location).parent), Path(location).name
    kwargs: dict[str, object] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    return location, kwargs


def check_model_source(
    cfg: ModelConfig, key: str = "model.name_or_path", trust_key: str = "model.trust_remote_code"
) -> list[str]:
    """Problems with where `cfg` says the model is ([] when fine), found before anything is loaded.

    A local path must exist and hold a model that loads (:func:`check_model_folder`); a hub id ('owner/name',
    or a legacy bare name like 'gpt2') cannot be checked offline, so it passes. `trust_key` is how the user
    turns on `trust_remote_code` (named in the advice).

    Example:
        >>> check_model_source(ModelConfig(name_or_path="./no/such/dir"))  # doctest: +ELLIPSIS
        ["model.name_or_path: './no/such/dir' does not exist ..."]
    """
    name = cfg.name_or_path
    path = Path(name)
    if not path.exists():
        parts = name.split("/")
        could_be_hub_id = len(parts) <= 2 and "\\" not in name and all(p and p not in (".", "..") for p in parts)
        # Anything that cannot be a hub id is a path the user meant, so its absence is the problem.
        if path.is_absolute() or name.startswith(("./", "../", "~")) or name.endswith(".gguf") or not could_be_hub_id:
            # raysft passes the name to transformers as written, so a '~' is never expanded.
            tilde = "; '~' is not expanded, write the full path" if name.startswith("~") else ""
            return [f"{key}: {name!r} does not exist (looked for {path.absolute()}{tilde}); "
                    "give an existing model folder, a .gguf file, or a hub id like 'owner/name'"]
        return []
    if path.is_file():
        if name.endswith(".gguf"):
            return []
        return [f"{key}: {name!r} is a file; give a model folder (with config.json), a .gguf file, or a hub id"]
    if cfg.gguf_file is not None:
        if not (path / cfg.gguf_file).is_file():
            return [f"{key}: the GGUF file {cfg.gguf_file!r} (gguf_file) is not inside the folder {name!r}"]
        return []
    if (path / "config.json").is_file():
        return check_model_folder(path, cfg.trust_remote_code, key, trust_key)
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if ggufs:
        # transformers loads a GGUF only when told which file; it never picks one from a folder.
        return [f"{key}: {name!r} holds no config.json but GGUF file(s) {', '.join(ggufs)}; "
                "point at the .gguf file itself or set gguf_file"]
    return [f"{key}: {name!r} is not a model folder (no config.json and no .gguf file inside)"]


def check_model_folder(
    folder: Path, trust_remote_code: bool, key: str = "model.name_or_path", trust_key: str = "model.trust_remote_code"
) -> list[str]:
    """Problems a model folder (one with config.json) would raise only once loaded on a worker: a config.json that
    is no JSON, an architecture that needs code shipped with the model while `trust_remote_code` is off, and
    damaged weights. Reads config.json and the safetensors headers only.

    Example:
        >>> check_model_folder(Path("model-with-a-truncated-download"), trust_remote_code=False)  # doctest: +SKIP
        ["model.name_or_path: .../model.safetensors is not a complete safetensors file (...); ..."]
    """
    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return [f"{key}: {config_file} cannot be read as JSON ({err}); copy or download the model again"]
    if not isinstance(config, dict):
        return [f"{key}: {config_file} holds no JSON object; copy or download the model again"]
    problems = [] if trust_remote_code else _remote_code_problems(config, folder, key, trust_key)
    return problems + [f"{key}: {problem}" for problem in weights_problems(folder)]


def _remote_code_problems(config: dict[str, Any], folder: Path, key: str, trust_key: str) -> list[str]:
    """Why transformers could load this model only by running code shipped with it ([] when its own code loads it).

    transformers uses its own class whenever it knows the model_type as a causal LM, auto_map or not; it runs the
    checkpoint's code only for what it does not know (see AutoConfig / AutoModelForCausalLM.from_pretrained).
    """
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return []
    remote = (config.get("auto_map") or {}).get("AutoModelForCausalLM") if isinstance(config.get("auto_map"), dict) else None
    if model_type in CONFIG_MAPPING_NAMES and remote is None:
        return [f"{key}: {folder} holds a {model_type!r} model, which is not a causal language model (transformers has "
                "no AutoModelForCausalLM class for it); raysft fine-tunes causal LMs: give one of those"]
    known = (f"its model_type {model_type!r} is not one transformers {transformers.__version__} knows"
             if model_type else "its config.json names no model_type")
    shipped = f", and config.json's auto_map points at code shipped with it ({remote})" if remote else ""
    return [
        f"{key}: {folder} needs Python code shipped with the model to load: {known}{shipped}. raysft runs no such "
        f"code unless {trust_key} is on (it is off: the code would run with your permissions on every node). Use a "
        "model transformers supports natively (a newer transformers may: pip install -U transformers), or, if you "
        f"have read that code and trust its author, turn on {trust_key}"
    ]


def weights_problems(folder: Path) -> list[str]:
    """Each safetensors weights file of `folder` that transformers would load and that is missing, unreadable or
    cut short (its header's tensors do not cover the file exactly), named with what to do. Reads headers only.

    Example:
        >>> weights_problems(Path("model-dir"))  # a download that stopped half-way  # doctest: +SKIP
        ['model-dir/model.safetensors is not a complete safetensors file (...); ...']
    """
    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            shards = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
            return [f"{index_file} is not a readable shard index ({type(err).__name__}: {err}); copy or download the "
                    "model again"]
        files = [folder / shard for shard in shards]
    else:
        files = [folder / "model.safetensors"] if (folder / "model.safetensors").exists() else []
    problems = []
    for file in files:
        if not file.is_file():
            problems.append(f"{file} is missing (listed in {index_file.name}); copy or download the model again")
            continue
        try:
            with safe_open(str(file), "pt"):  # parses the header and checks its tensors cover the file exactly
                pass
        except (SafetensorError, OSError) as err:
            problems.append(
                f"{file} is not a complete safetensors file ({err}; {file.stat().st_size:,} bytes): a download or "
                "copy was most likely cut short. Download or copy the model again (the file's size must match its "
                "source's), then rerun the same command"
            )
    return problems
