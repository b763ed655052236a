"""One source of versions: constraints.txt pins what docker/Dockerfile installs, its pins fall inside pyproject's
ranges, and the image keeps to the rules a cluster image needs (non-root, pinned base, small build context).

No image is built here (the machine that tests raysft has no Docker daemon); this checks the Dockerfile's text."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.runs import REPO

DOCKERFILE = REPO / "docker" / "Dockerfile"


def constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    return pins


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def test_constraints_fall_inside_pyprojects_ranges() -> None:
    pins = constraints()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for requirement in map(Requirement, project["dependencies"]):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"constraints.txt pins no {requirement.name} (a dependency in pyproject.toml)"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside pyproject's {requirement}"


def test_dockerfile_installs_the_pinned_versions() -> None:
    pins, steps = constraints(), instructions(DOCKERFILE)
    base = next(args for kind, args in steps if kind == "ARG" and args.startswith("RAY_IMAGE="))
    assert re.fullmatch(r"RAY_IMAGE=rayproject/ray:(\S+)-py311-gpu", base), base
    assert base.split(":")[1].split("-")[0] == pins["ray"], "the base image's Ray is constraints.txt's"
    installs = [args for kind, args in steps if kind == "RUN" and "pip install" in args]
    for command in installs:
        for pinned in re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', command):
            name = canonicalize_name(pinned[0])
            if name in pins:
                assert pins[name] == pinned[1], f"Dockerfile pins {pinned[0]}=={pinned[1]}, constraints.txt {pins[name]}"
        if "flash-attn" not in command:
            assert "-c /home/ray/raysft/constraints.txt" in command, f"unconstrained install: {command}"
    assert f"ray.__version__ == '{pins['ray']}'" in " ".join(installs), "the build checks the image's Ray"
    assert ("COPY", "--chown=ray:users constraints.txt /home/ray/raysft/constraints.txt") in steps


def test_image_runs_as_a_non_root_user() -> None:
    users = [args for kind, args in instructions(DOCKERFILE) if kind == "USER"]
    assert users and users[-1] not in {"root", "0"} and not users[-1].startswith(("root:", "0:"))


def test_build_context_holds_only_what_the_image_copies() -> None:
    ignore = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert ignore[0] == "**", "allow-list: everything else (runs, venvs, caches, .git) stays out"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = {source for kind, args in instructions(DOCKERFILE) if kind == "COPY"
              for source in args.split()[:-1] if not source.startswith("--")}
    assert copied == allowed, (copied, allowed)
    assert all((REPO / name).exists() for name in copied)


def test_gitignore_keeps_environments_out_of_working_dir_uploads() -> None:
    # `ray job submit --working-dir .` skips what .gitignore lists.
    ignored = set((REPO / ".gitignore").read_text().split())
    assert {".venv/", "venv/", "runs/", "__pycache__/", "wandb/"} <= ignored
