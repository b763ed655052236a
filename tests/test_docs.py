"""The docs stay true: every config snippet validates, every `raysft` command line parses, the config reference is
the schema's, the architecture page names every module, and the editor schema accepts every shipped YAML.
No Ray, no model: a few seconds in all."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from raysft.cli import build_parser
from raysft.config import load_yaml_text, parse_config, read_yaml
from raysft.schema import json_schema, markdown_reference
from raysft.tune.config import load_sweep
from tests.runs import REPO

DOCS = REPO / "docs"
PAGES = sorted(DOCS.glob("*.md")) + [REPO / "README.md"]
MARKERS = ("config", "config-fragment", "sweep", "illustrative")
"""What the comment line before a fenced block may say (`<!-- config -->`): how the test checks the block."""
CHECKED_LANGUAGES = ("yaml", "bash", "sh", "python")
"""Blocks a reader may copy and run; each is checked here or marked illustrative (output and diagrams are not)."""
MINIMAL = {"model": {"name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"},
           "data": {"train": {"path": "data/train.jsonl"}, "eval_fraction": 0.1}}  # fmt: skip
"""What a config fragment is merged into: only the two required keys (and eval data, for evaluation metrics)."""


def fenced_blocks(page: Path) -> list[tuple[int, str, str | None, str]]:
    """(line, language, marker, text) of every fenced block of a Markdown page."""
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = re.match(r"^```(\w*)\s*$", lines[i])
        if not opening:
            i += 1
            continue
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = re.fullmatch(r"<!-- (\S+) -->", before)
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        blocks.append((i + 1, opening.group(1), marker.group(1) if marker else None, "\n".join(lines[i + 1:end])))
        i = end + 1
    return blocks


def all_blocks() -> list[tuple[str, str, str | None, str]]:
    return [(f"{page.relative_to(REPO)}:{line}", language, marker, text)
            for page in PAGES for line, language, marker, text in fenced_blocks(page)]  # fmt: skip


def merged(base: dict[str, Any], fragment: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in fragment.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def raysft_commands(text: str) -> list[str]:
    """The `raysft ...` command lines of a block (also after `$ ` and `&&`), each without its comment."""
    commands = []
    for line in text.splitlines():
        for part in line.removeprefix("$ ").split("&&"):
            part = part.strip()
            for prefix in ("python -m raysft ", "raysft "):
                if part.startswith(prefix):
                    command = re.split(r"\s+#\s|\s+(?:>>?|2>|\|)\s", part[len(prefix):])[0]  # no comment, redirection, pipe
                    commands.append(command.strip())
    return commands


def test_every_runnable_block_is_checked_or_marked_illustrative() -> None:
    unchecked = []
    for where, language, marker, text in all_blocks():
        if marker is not None:
            assert marker in MARKERS, f"{where}: unknown marker <!-- {marker} -->; use one of {MARKERS}"
        if language not in CHECKED_LANGUAGES or marker is not None:
            continue
        lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        # A shell block of raysft commands only is checked below (each line parses); anything else is not.
        if not (language in ("bash", "sh") and len(raysft_commands(text)) == len(lines)):
            unchecked.append(f"{where} ({language})")
    assert not unchecked, f"blocks neither checked nor marked <!-- illustrative -->: {unchecked}"


CONFIG_BLOCKS = [(w, m, t) for w, lang, m, t in all_blocks() if lang == "yaml" and m in ("config", "config-fragment")]
SWEEP_BLOCKS = [(w, t) for w, lang, m, t in all_blocks() if lang == "yaml" and m == "sweep"]


@pytest.mark.parametrize("where,marker,text", CONFIG_BLOCKS, ids=[block[0] for block in CONFIG_BLOCKS])
def test_config_snippets_validate(where: str, marker: str, text: str) -> None:
    raw = load_yaml_text(text)
    parse_config(raw if marker == "config" else merged(MINIMAL, raw), where)


@pytest.mark.parametrize("where,text", SWEEP_BLOCKS, ids=[block[0] for block in SWEEP_BLOCKS])
def test_sweep_snippets_validate(where: str, text: str, tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(MINIMAL))
    raw = load_yaml_text(text)
    raw["base"] = "base.yaml"  # the snippet's own base is a file of the repository; its shape is what is checked
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(raw))
    load_sweep(tmp_path / "sweep.yaml")


def test_every_raysft_command_line_parses() -> None:
    parser = build_parser()
    commands = [(where, command) for where, _, _, text in all_blocks() for command in raysft_commands(text)]
    assert len(commands) > 20  # the docs show many; a parsing bug here must not pass by finding none
    for where, command in commands:
        try:
            parser.parse_args(shlex.split(command))
        except SystemExit as exit_:  # argparse exits 0 on --help/--version, 2 on an error
            assert exit_.code == 0, f"{where}: `raysft {command}` does not parse"


def test_config_reference_is_generated_from_the_schema() -> None:
    page = DOCS / "config-reference.md"
    assert page.read_text() == markdown_reference(), (
        "docs/config-reference.md is stale: run `raysft schema --markdown > docs/config-reference.md`")
    for key in ("`model.name_or_path`", "`data.train.prompt_column`", "`train.early_stopping.patience`",
                "`eval.generate.metrics.extract`", "`scheduler.grace_period`"):
        assert key in page.read_text()


def test_architecture_page_names_every_module_and_only_real_ones() -> None:
    page = (DOCS / "architecture.md").read_text()
    table = "\n".join(line for line in page.splitlines() if line.startswith("|"))
    named = set(re.findall(r"raysft/[\w/]+\.py", table))
    modules = set()
    for path in (REPO / "raysft").rglob("*.py"):
        body = ast.parse(path.read_text()).body
        only_a_docstring = len(body) <= 1 and all(isinstance(node, ast.Expr) for node in body)
        if not (path.name == "__init__.py" and only_a_docstring):  # a package's docstring is no module of its own
            modules.add(path.relative_to(REPO).as_posix())
    assert not modules - named, f"docs/architecture.md's table lacks {sorted(modules - named)}"
    assert not {p for p in re.findall(r"raysft/[\w/]+\.py", page) if not (REPO / p).is_file()}, \
        "docs/architecture.md names a module that does not exist"


def test_editor_schema_accepts_every_shipped_yaml_and_rejects_a_typo() -> None:
    train, sweep = json_schema("train"), json_schema("sweep")
    shipped = sorted((REPO / "examples").rglob("*.yaml"))
    assert shipped
    for path in shipped:
        jsonschema.validate(read_yaml(path), train)
    for path in sorted((REPO / "sweeps").glob("*.yaml")):
        jsonschema.validate(read_yaml(path), sweep)
    with pytest.raises(jsonschema.ValidationError, match="rank"):
        jsonschema.validate(merged(MINIMAL, {"lora": {"rank": 8}}), train)
    jsonschema.validate(merged(MINIMAL, {"eval": {"generate": {"metrics": ["exact_match", {"type": "rouge_l"}]}}}), train)


def test_readme_keeps_the_fresh_machine_commands_first() -> None:
    readme = (REPO / "README.md").read_text()
    first_block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    assert "pip install torch==2.13.0 && pip install -e . && raysft quickstart" in first_block
    assert """pip install torch==2.13.0 && pip install -e '.[test]' && python -m pytest -q -m "not slow\"""" in first_block
    assert 'python -m pytest -q -m "not slow"' in (REPO / ".ci" / "run").read_text()
    assert len(readme.splitlines()) <= 250
    for jargon in ("issue 13", "CI machine", "the CI box"):
        assert jargon not in readme


# The layers docs/architecture.md describes ("Imports point one way"), lowest first.
LAYERS = [
    ("raysft.errors", "raysft.labels", "raysft.ops", "raysft.training.step", "raysft.cluster"),
    ("raysft.config", "raysft.fileio", "raysft.chat_template"),
    ("raysft.storage", "raysft.run_folder", "raysft.console", "raysft.ray_session", "raysft.track", "raysft.mlflow_run",
     "raysft.model", "raysft.model_source", "raysft.tokenizer", "raysft.evaluation", "raysft.infer", "raysft.plan",
     "raysft.starter"),
    ("raysft.data",),
    ("raysft.training",),
    ("raysft.tune",),
    ("raysft.cli", "raysft.schema", "raysft.submit", "raysft.quickstart", "raysft.__main__", "raysft"),
]


def layer_of(module: str) -> int:
    # The longest matching prefix decides (raysft.training.step sits below the rest of raysft.training).
    matches = [(len(prefix), i) for i, layer in enumerate(LAYERS) for prefix in layer
               if module == prefix or (prefix != "raysft" and module.startswith(prefix + "."))]
    assert matches, f"{module} is in no layer: add it to LAYERS and to docs/architecture.md's import rule"
    return max(matches)[1]


def test_imports_point_one_way_as_the_architecture_page_says() -> None:
    upward = []
    for path in sorted((REPO / "raysft").rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):  # imports inside functions count too
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("raysft"):
                targets = [f"{node.module}.{alias.name}" if node.module == "raysft" else node.module for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names if alias.name.startswith("raysft")]
            else:
                continue
            upward += [f"{module} imports {target}" for target in targets if layer_of(target) > layer_of(module)]
    assert not upward, upward
