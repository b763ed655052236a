"""The train and sweep configs described for editors and for people, from the pydantic models alone.

`raysft schema` prints the JSON Schema (for the YAML language server: completion and checking as you type);
`raysft schema --markdown` prints the config reference page of the docs (docs/config-reference.md), every
field with its type, default and docstring. Nothing here is written by hand, so neither can go stale: a test
compares the committed page with this output.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import PydanticOmit, core_schema, to_jsonable_python

from raysft.config import Config

SchemaKind = Literal["train", "sweep"]


class _DataOnlySchema(GenerateJsonSchema):
    """JSON Schema of what a YAML file can hold: a Python callable (an `eval.generate` metric function given from
    the Python API) has no YAML spelling, so that branch of its union is left out."""

    def callable_schema(self, schema: core_schema.CallableSchema) -> JsonSchemaValue:
        raise PydanticOmit


def _root(kind: SchemaKind) -> type[BaseModel]:
    if kind == "sweep":
        from raysft.tune.config import SweepConfig  # raysft.config imports nothing from raysft.tune

        return SweepConfig
    return Config


def json_schema(kind: SchemaKind = "train") -> dict[str, Any]:
    """The JSON Schema of a train config (or of a sweep file), as pydantic describes the models.

    Examples:
        >>> schema = json_schema()
        >>> "lora" in schema["properties"] and schema["$defs"]["LoraConfig"]["additionalProperties"]
        False
    """
    schema = _root(kind).model_json_schema(schema_generator=_DataOnlySchema)
    _accept_shorthands(schema["$defs"])
    if kind == "sweep":  # what raysft.tune.config.load_sweep reads before the model sees it
        base = schema["properties"]["base"]
        base["anyOf"] = [{"type": "string", "description": "a train YAML, relative to this file"}, {"$ref": base.pop("$ref")}]
        schema["properties"]["base_overrides"] = {
            "type": "array", "items": {"type": "string"},
            "description": "dotted.key=value edits of the base for this sweep, e.g. train.eval_every=50",
        }
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = f"raysft {kind} config"
    return schema


def _accept_shorthands(defs: dict[str, Any]) -> None:
    """Spellings the models' before-validators accept, which pydantic's schema cannot see: one data source
    instead of a list, a metric or a scheduler by its name alone (`- exact_match`, `scheduler: fifo`)."""
    data = defs["DataConfig"]["properties"]
    for split in ("train", "eval"):
        data[split] = {"anyOf": [{"$ref": "#/$defs/SourceConfig"}, data[split]],
                       **{k: data[split][k] for k in ("description", "default") if k in data[split]}}
    for name, by_name in (("GenerateMetricConfig", "type"), ("SchedulerConfig", "name")):
        if name in defs:
            names = [n for n in defs[name]["properties"][by_name]["enum"] if n != "function"]
            defs[name] = {"anyOf": [{"type": "string", "enum": names}, defs[name]]}


def _sections(model: type[BaseModel]) -> list[type[BaseModel]]:
    return [arg for arg in _flat_args(model) if isinstance(arg, type) and issubclass(arg, BaseModel)]


def _flat_args(annotation: Any) -> list[Any]:
    args = typing.get_args(annotation)
    if not args:
        return [annotation]
    return [leaf for arg in args for leaf in _flat_args(arg)]


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return " \\| ".join(json.dumps(arg) for arg in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(arg) for arg in args)
    if origin in (list, tuple):
        inner = ", ".join(_type_name(arg) for arg in args if arg is not Ellipsis)
        return f"{origin.__name__}[{inner}]"
    if origin is dict:
        return f"dict[{', '.join(_type_name(arg) for arg in args)}]"
    if origin is not None and "Callable" in str(origin):
        return "Python callable"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    if annotation is typing.Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(its defaults)"
    return f"`{json.dumps(to_jsonable_python(value))}`"


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


def _section_table(model: type[BaseModel], prefix: str, lines: list[str]) -> None:
    lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    nested: list[tuple[str, type[BaseModel]]] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        sections = _sections(field.annotation)
        kind = _type_name(field.annotation)
        if sections:
            many = typing.get_origin(field.annotation) is list or "list[" in kind
            kind = f"[section{' list' if many else ''}](#{_anchor(key)})"
            if sections[0] is not Config:  # a sweep's base is the whole train config, documented above
                nested.append((key, sections[0]))
            else:
                kind = "train config (a path, or inline)"
        lines.append(f"| `{key}` | {kind} | {_default(field)} | {_one_line(field.description)} |")
    lines.append("")
    for key, section in nested:
        lines += [f"### `{key}`", ""]
        if section.__doc__ and not section.__doc__.startswith(("Base of", "A Pydantic")):
            lines += [_one_line(section.__doc__), ""]
        _section_table(section, key, lines)


def _anchor(key: str) -> str:
    return key.replace(".", "")


def markdown_reference() -> str:
    """The config reference page: every field of a train config and of a sweep file, generated."""
    from raysft.tune.config import SweepConfig

    lines = [
        "# Config reference",
        "",
        "<!-- Generated by `raysft schema --markdown > docs/config-reference.md`; do not edit by hand. -->",
        "",
        "Every key of a train config and of a sweep file, with its type, default and meaning. Set any of them in",
        "the YAML file or with `--set dotted.key=value`. Unknown keys are errors that suggest the closest valid",
        "one. `raysft schema` prints the same as a JSON Schema, for editor completion.",
        "",
        "## Train config",
        "",
    ]
    for name, field in Config.model_fields.items():
        section = _sections(field.annotation)[0]
        lines += [f"### `{name}`", ""]
        if field.description:
            lines += [_one_line(field.description), ""]
        _section_table(section, name, lines)
    lines += ["## Sweep file", "", _one_line(SweepConfig.__doc__), ""]
    _section_table(SweepConfig, "", lines)
    return "\n".join(lines).rstrip() + "\n"
