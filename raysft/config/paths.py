"""Locations in a config: local paths made absolute once, in the driver, and URIs (`s3://`, `gs://`) told apart
from paths and left as they are."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from raysft.config.schema import Config


def default_cache_root() -> Path:
    """Where raysft caches models and tokenized data: ``$RAYSFT_CACHE`` or ``~/.cache/raysft``."""
    return Path(os.environ.get("RAYSFT_CACHE", "~/.cache/raysft")).expanduser()


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


def is_uri(location: str) -> bool:
    """True for `s3://...`, `gs://...` and other URIs (a Windows drive letter is not one)."""
    return _SCHEME.match(location) is not None


def uri_scheme(location: str) -> str:
    """The scheme of a URI with its `://` ("" for a local path): what a file system's paths are prefixed with to
    name the same objects as URIs again.

    Example:
        >>> uri_scheme("s3://bucket/data/*.jsonl"), uri_scheme("/data/train.jsonl")
        ('s3://', '')
    """
    found = _SCHEME.match(location)
    return found.group(0) if found else ""


def absolute_path(path: str | Path, base: Path | None = None) -> Path:
    """`path` absolute, `~` expanded, against `base` (else the working directory), symlinks kept as spelled: the
    one way raysft makes a local path absolute (why: raysft/run_folder.py's docstring)."""
    path = Path(path).expanduser()
    return Path(os.path.abspath(path if base is None else base / path))


def _absolute(location: str, base: Path | None = None) -> str:
    return location if is_uri(location) else str(absolute_path(location, base))


def output_base() -> Path:
    """The folder relative output locations (train.output_dir, a sweep's output_dir, data.cache_dir, ...) resolve
    against: the working directory, except in the driver of a Ray job that runs in Ray's temporary copy of its
    working_dir (`ray job submit --working-dir .`, `raysft submit`), which Ray deletes with the session: there, the
    home folder of the node that runs the driver, so `runs/x` is `~/runs/x` on the head node and outlives the job.

    Example:
        >>> output_base()  # in a shell: the working directory  # doctest: +SKIP
        PosixPath('/home/me/raysft')
    """
    cwd = Path.cwd()
    in_job_copy = _RAY_JOB_DRIVER_VARIABLE in os.environ and "runtime_resources" in cwd.parts
    return Path.home() if in_job_copy else cwd


# Ray's job supervisor sets it in every job driver's environment (ray._private.runtime_env.constants).
_RAY_JOB_DRIVER_VARIABLE = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def with_absolute_paths(cfg: Config) -> Config:
    """`cfg` with every local path made absolute, once, in the driver: data and model paths against the current
    directory, output locations against :func:`output_base`.

    Ray Tune runs each trial in a working directory of its own and Ray Train workers may run on
    other nodes, so a relative path means something else there: it must never leave the driver.
    Hub ids (a model or dataset name that is not an existing path) are left as they are.
    """
    raw = cfg.model_dump()  # Python values, not JSON: a metric function given as a callable stays one
    if Path(raw["model"]["name_or_path"]).expanduser().exists():
        raw["model"]["name_or_path"] = _absolute(raw["model"]["name_or_path"])
    for source in [*raw["data"]["train"], *(raw["data"]["eval"] or [])]:
        if source["path"] is not None:
            source["path"] = _absolute(source["path"])
        if source["hf_dataset"] is not None and Path(source["hf_dataset"]).expanduser().exists():
            source["hf_dataset"] = _absolute(source["hf_dataset"])
    for section, key in (("data", "cache_dir"), ("train", "output_dir"), ("scaling", "storage_path"),
                         ("tracking", "mlflow_dir")):
        if raw[section][key] is not None:
            raw[section][key] = _absolute(raw[section][key], output_base())
    return type(cfg).model_validate(raw)
