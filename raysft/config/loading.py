"""Config in: YAML read (naming file:line on a syntax error), `--set dotted.key=value` overrides, validation into
the typed tree with every problem reported together (did-you-mean for unknown keys); and out: config.yaml."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from raysft.config.rules import CROSS_FIELD
from raysft.config.schema import Config, SectionT
from raysft.errors import ConfigError


def _dotted(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc)


def _section_at(loc: tuple[Any, ...], root: type[BaseModel]) -> type[BaseModel] | None:
    """The model class that owns the last key of `loc` (for did-you-mean)."""
    section: Any = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = section.model_fields.get(part) if isinstance(section, type) and issubclass(section, BaseModel) else None
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = [c for c in candidates for c in [c, *getattr(c, "__args__", ())] if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return None
        section = nested[0]
    return section if isinstance(section, type) and issubclass(section, BaseModel) else None


# Names users bring from transformers/TRL/PEFT/Axolotl configs, mapped to ours.
_FAMILIAR_NAMES = {
    "learning_rate": "lr",
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "per_device_train_batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "grad_accum_steps",
    "num_train_epochs": "epochs",
    "max_length": "max_seq_len",
    "sequence_len": "max_seq_len",
    "lr_scheduler_type": "lr_schedule",
    "model_name_or_path": "name_or_path",
    "neftune_noise_alpha": "neftune_alpha",
}


def _closest(key: str, valid: list[str]) -> str | None:
    familiar = _FAMILIAR_NAMES.get(key)
    if familiar in valid:
        return familiar
    # Below difflib's default cutoff (0.6): a typo in a short key (`rnk` for `r`, 0.5) still finds it.
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return close[0] if close else None


def _describe(error: Any, root: type[BaseModel]) -> str:
    loc = tuple(error["loc"])
    key = _dotted(loc)
    if error["type"] == "extra_forbidden":
        section = _section_at(loc, root)
        suggestion = ""
        if section is not None:
            close = _closest(str(loc[-1]), list(section.model_fields))
            suggestion = f"; did you mean '{_dotted(loc[:-1] + (close,))}'?" if close else ""
            suggestion += f" (valid keys: {', '.join(section.model_fields)})"
        return f"{key}: unknown key{suggestion}"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "value_error":  # our own validators: the message already says what was given
        return message.removeprefix(CROSS_FIELD) if message.startswith(CROSS_FIELD) else f"{key or '<root>'}: {message}"
    given = error.get("input")
    shown = "" if isinstance(given, dict) else f" (got {given!r})"
    return f"{key or '<root>'}: {message}{shown}"


def validate_section(root: type[SectionT], raw: dict[str, Any], source: str | None = None) -> SectionT:
    """Validate a mapping against a config model; raise one ConfigError listing every problem."""
    try:
        return root.model_validate(raw)
    except ValidationError as err:
        described = [_describe(e, root) for e in err.errors()]
        raise ConfigError([line for text in described for line in text.split("\n")], source) from None


def parse_config(raw: dict[str, Any], source: str | None = None) -> Config:
    """Validate a train config mapping; raise one ConfigError listing every problem."""
    return validate_section(Config, raw, source)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` (no dot) as a string; learning rates are written that way, so read it as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml_text(text: str) -> Any:
    """Parse YAML safely, reading exponent numbers such as 1e-4 as floats."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set `raw[a][b][c] = value` for key "a.b.c", creating sections on the way.

    A number indexes a list: "data.train.0.path" is the first training source's path. A section given as one
    mapping where a list is also accepted (`data.train: {path: ...}`) is its list's item 0.
    """
    node: Any = raw
    parts = key.split(".")
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth])
        last = depth == len(parts) - 1
        if isinstance(node, list):
            index = _list_index(node, part, where, key)
            if last:
                node[index] = value
                return
            node = node[index]
            continue
        if not isinstance(node, dict):
            raise ConfigError([f"{key}: '{where}' is not a section (it holds {node!r})"])
        if last:
            node[part] = value
            return
        child = node.setdefault(part, {})
        if isinstance(child, dict) and parts[depth + 1].isdigit() and parts[depth + 1] not in child:
            child = node[part] = [child]  # one mapping standing for a list of one (e.g. a single source)
        node = child


def _list_index(items: list[Any], part: str, where: str, key: str) -> int:
    """`part` as an index into the list at `where`; ConfigError when it is no number or out of range."""
    if not part.isdigit():
        raise ConfigError([f"{key}: '{where}' is a list; index its items by number, e.g. {where}.0.{part}"])
    if int(part) >= len(items):
        raise ConfigError([
            f"{key}: index {part} is out of range: '{where}' holds {len(items)} item(s), numbered from 0; "
            f"to add items, set the whole list (--set '{where}=[...]')"
        ])
    return int(part)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `dotted.key=value` overrides; values are parsed as YAML (so 1e-4, true, [8, 16] work)."""
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {item!r}: expected dotted.key=value")
            continue
        try:
            value = load_yaml_text(text) if text.strip() else None
        except yaml.YAMLError as err:
            problems.append(
                f"--set {key.strip()}: the value {text!r} is not valid YAML ({getattr(err, 'problem', None) or err}); "
                "close its brackets or quotes, or quote the whole value to give it as text"
            )
            continue
        try:
            set_dotted(raw, key.strip(), value)
        except ConfigError as err:
            problems.extend(f"--set {problem}" for problem in err.problems)
    if problems:
        raise ConfigError(problems)
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, naming the file and line on a syntax error."""
    path = Path(path)
    try:
        raw = load_yaml_text(path.read_text())
    except FileNotFoundError:
        raise ConfigError([f"file not found: {path}"]) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError([f"{where}: invalid YAML: {getattr(err, 'problem', err)}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: expected a mapping at the top level"])
    return raw


def resolve_data_paths(raw: dict[str, Any], base: Path) -> None:
    # Paths in a YAML are relative to the YAML's folder, so configs work from any working directory.
    for section in ("train", "eval"):
        sources = raw.get("data", {}).get(section) if isinstance(raw.get("data"), dict) else None
        for src in [sources] if isinstance(sources, dict) else sources or []:
            if isinstance(src, dict) and isinstance(src.get("path"), str) and not Path(src["path"]).is_absolute():
                candidate = base / src["path"]
                if candidate.exists() or any(base.glob(src["path"])):
                    src["path"] = str(candidate)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a train config YAML, apply `--set` overrides, and validate.

    Example:
        >>> cfg = load_config("examples/gsm8k_lora.yaml", ["train.lr=1e-4"])  # doctest: +SKIP
    """
    raw = read_yaml(path)
    resolve_data_paths(raw, Path(path).parent)
    return parse_config(apply_overrides(raw, overrides or []), str(path))


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML. Inline rows are summarized; it holds no secrets by construction."""
    data = cfg.model_dump(mode="json")
    for section in ("train", "eval"):
        for src in data["data"].get(section) or []:
            if src.get("rows") is not None:
                src["rows"] = f"<{len(src['rows'])} inline rows>"
    return yaml.safe_dump(data, sort_keys=False)


def public_tree(cfg: Config) -> dict[str, Any]:
    """The config as config.yaml holds it (inline rows summarized, no secrets), as plain data."""
    return yaml.safe_load(to_yaml(cfg))


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": [{"c": 1}]}}` -> `{"a.b.0.c": 1}`: every leaf under its dotted key."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list) and any(isinstance(item, (dict, list)) for item in tree):
        items = enumerate(tree)
    else:
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat
