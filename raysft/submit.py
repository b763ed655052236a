"""`raysft submit`: a train run or a sweep sent to a Ray cluster's job server, with what it needs to run there.

* the code: this raysft package as a `py_modules` entry of the job's runtime_env (local changes travel; on the
  cluster it comes first on the path, ahead of the raysft its image holds). The dependencies come from the cluster:
  the image of docker/Dockerfile, or with `install_deps` the pins of constraints.txt, installed per job by Ray;
* the config: resolved here (paths, `--set`, the GPU choice) and written into a small staged working_dir, the only
  folder uploaded (never the user's working folder with its virtual environments, runs and caches);
* the data: a cluster whose every node runs on this machine (a local `ray start --head`) reads local paths as they
  are, as does one whose nodes all mount them (`paths_on_cluster`). For any other, the local files the config names
  are uploaded to storage (`--data-to`, else the run's `scaling.storage_path`) and the submitted config reads them
  there; with no storage they are refused, by key, before anything is submitted;
* the environment: the cluster's Ray must be this machine's (Ray's client and cluster must match);
* GPUs: `scaling.use_gpu` follows the cluster's resources unless the config sets it.
"""

from __future__ import annotations

import asyncio
import glob
import os
import re
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raysft import storage
from raysft.cluster import autoscaler_adds_nodes, dashboard_node_types
from raysft.config import Config, is_uri, load_config, output_base, parse_config
from raysft.errors import ConfigError, RunError
from raysft.run_folder import sweep_storage_location
from raysft.tune.config import SweepConfig

CONSTRAINTS_FILE = Path(__file__).resolve().parents[1] / "constraints.txt"
"""The pinned versions (a source checkout's constraints.txt): what the image and `install_deps` install."""
INPUTS_DIR = "inputs"
"""Where uploaded data go under the storage location: <storage>/inputs/<train-0 | eval-0 ...>/<file or folder>."""


@dataclass(frozen=True)
class ClusterInfo:
    """What a submission needs to know about the cluster behind a job server."""

    address: str
    ray_version: str
    gpus: float
    """GPUs of the nodes alive now."""
    autoscaler: bool
    """An autoscaler that can add nodes (of types not running yet) reports to the cluster."""
    local: bool
    """Every node runs on this machine, so the cluster reads this machine's files."""


@dataclass
class Submission:
    """A submitted job: its id and what `raysft submit` decided for it."""

    job_id: str
    address: str
    use_gpu: bool
    gpu_reason: str
    outputs: str
    uploads: list[tuple[str, str]] = field(default_factory=list)
    """(local path, where the job reads it) for every uploaded data source."""


def connect(address: str | None) -> Any:
    """A JobSubmissionClient for `address` (else RAY_ADDRESS), token auth as the `ray job` CLI does it."""
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError(["--address: no Ray job server given; pass --address http://127.0.0.1:8265 (a local "
                           "`ray start --head`, or the tunnel of `ray dashboard cluster/aws.yaml`) or set RAY_ADDRESS"])
    try:
        return JobSubmissionClient(address)
    except Exception as err:  # Ray raises ConnectionError, RuntimeError or its AuthenticationError here
        raise RunError(f"--address {address}: cannot reach a Ray job server there ({storage.one_line(err)}). "
                       "Is the cluster up and the dashboard port reachable (`ray dashboard CLUSTER.yaml` keeps an SSH "
                       "tunnel on 127.0.0.1:8265)? With token auth, export RAY_AUTH_MODE=token") from None


def cluster_info(client: Any) -> ClusterInfo:
    """The Ray version, GPUs, autoscaler and whereabouts of the cluster behind `client`."""
    import ray

    # Ray's SDK has no public call for these; they are the authenticated requests `ray job` and `ray status` make.
    version = _get(client, "/api/version")["ray_version"]
    nodes = _get(client, "/api/v0/nodes?limit=10000&detail=true")["data"]["result"]["result"]
    alive = [node for node in nodes if node.get("state") == "ALIVE"]
    status = _get(client, "/api/cluster_status")["data"]
    here = ray.util.get_node_ip_address()
    return ClusterInfo(
        address=client.get_address(),
        ray_version=version,
        gpus=sum(float((node.get("resources_total") or {}).get("GPU", 0)) for node in alive),
        autoscaler=autoscaler_adds_nodes(dashboard_node_types(status)),
        local=bool(alive) and all(node.get("node_ip") == here for node in alive),
    )


def _get(client: Any, endpoint: str) -> Any:
    response = client._do_request("GET", endpoint)
    if response.status_code != 200:
        raise RunError(f"the job server at {client.get_address()} answered {endpoint} with HTTP {response.status_code}: "
                       f"{response.text[:300]}")
    return response.json()


def version_problem(info: ClusterInfo, client_version: str) -> str | None:
    """Why this machine's Ray cannot drive the cluster's (they differ), with what to do; None when they match."""
    if info.ray_version == client_version:
        return None
    return (f"the cluster at {info.address} runs Ray {info.ray_version}, this machine Ray {client_version}: Ray's "
            f"client and cluster must be the same version. Install the cluster's here (pip install "
            f"'ray[default]=={info.ray_version}'), or run the cluster on the image of docker/Dockerfile, whose Ray is "
            "pinned in constraints.txt with everything else")


def choose_gpu(cfg: Config, info: ClusterInfo, key: str = "scaling.use_gpu") -> tuple[bool, str]:
    """`scaling.use_gpu` for a run on the cluster, and why: the config's when it sets it, else the cluster's."""
    if "use_gpu" in cfg.scaling.model_fields_set:
        if cfg.scaling.use_gpu and info.gpus == 0 and not info.autoscaler:
            raise ConfigError([f"{key}: true, but the cluster at {info.address} has no GPU and no autoscaler to add "
                               f"GPU nodes; submit with --set {key}=false to train on its CPUs, or to a cluster with GPUs"])
        return cfg.scaling.use_gpu, "set in the config"
    if info.gpus > 0:
        return True, f"the cluster has {info.gpus:g} GPU(s)"
    if info.autoscaler:
        raise ConfigError([f"{key}: not set, and the cluster at {info.address} has no GPU now but an autoscaler that "
                           f"may start GPU nodes; say which: --set {key}=true (GPU node types) or --set {key}=false"])
    return False, "the cluster has no GPU"


@dataclass(frozen=True)
class LocalPath:
    """A data source on this machine: its dotted key (as the user spells it), the path, and where it sits."""

    key: str
    path: str
    section: str
    index: int
    field: str


def local_paths(cfg: Config, prefix: str = "") -> list[LocalPath]:
    """The config's data sources that are files or folders on this machine (not URIs, not hub names), by key."""
    found = []
    for section in ("train", "eval"):
        sources = getattr(cfg.data, section) or []
        for index, source in enumerate(sources):
            where = f"{prefix}data.{section}" + (f".{index}" if len(sources) > 1 else "")
            if source.path is not None and not is_uri(source.path):
                found.append(LocalPath(f"{where}.path", source.path, section, index, "path"))
            elif source.hf_dataset is not None and Path(source.hf_dataset).expanduser().exists():
                found.append(LocalPath(f"{where}.hf_dataset", source.hf_dataset, section, index, "hf_dataset"))
    return found


def data_plan(cfg: Config, info: ClusterInfo, *, prefix: str = "", data_to: str | None = None, home: str | None = None,
              paths_on_cluster: bool = False) -> tuple[list[LocalPath], str | None]:
    """Which local data paths to upload, and where to (None: upload nothing). Raises ConfigError, naming each key
    and the fix, for a local path the cluster cannot read when there is nowhere to upload it.

    `--data-to` always uploads. Otherwise a cluster whose nodes all run on this machine reads local paths as they
    are, as does one whose nodes mount them (`paths_on_cluster`); any other uploads to the run's storage (`home`).
    """
    paths = local_paths(cfg, prefix)
    if data_to is None and (info.local or paths_on_cluster):
        return [], None
    model = cfg.model.name_or_path
    if not (info.local or paths_on_cluster) and Path(model).expanduser().exists():
        raise ConfigError([f"{prefix}model.name_or_path: {model} is on this machine, which the cluster at "
                           f"{info.address} cannot read; give a hub id, or a path every node has (baked into the "
                           "image, or on a shared volume) with --paths-on-cluster"])
    root = data_to or home
    if not paths:
        return [], None
    if root is None:
        raise ConfigError([
            f"{item.key}: {item.path} is on this machine, which the cluster at {info.address} cannot read; upload it "
            f"with --data-to s3://BUCKET/PREFIX, or set {prefix}scaling.storage_path (s3://..., gs://...) and raysft "
            "submit uploads it there; --paths-on-cluster if every node mounts it at this path" for item in paths])
    if (problem := storage.storage_problem(root, "--data-to" if data_to else f"{prefix}scaling.storage_path")):
        raise ConfigError([problem])
    return paths, root


def upload_data(paths: list[LocalPath], root: str) -> dict[LocalPath, str]:
    """Copy each local data path to `root`/inputs/<train-0 | eval-0 ...>/; return where the job reads each."""
    moved = {}
    for item in paths:
        local = Path(item.path).expanduser()
        pattern = glob.has_magic(str(local))
        matches = sorted(glob.glob(str(local))) if pattern else [str(local)] if local.exists() else []
        if not matches:
            raise ConfigError([f"{item.key}: {item.path} does not exist"])
        folder = storage.join(root, INPUTS_DIR, f"{item.section}-{item.index}")  # equal file names never clash
        for match in matches:
            storage.upload(Path(match), storage.join(folder, Path(match).name))
        # A glob becomes the folder of its matches; a file or folder keeps its name (and so its file type).
        moved[item] = folder if pattern else storage.join(folder, local.name)
    return moved


def submit(config: str | Path, overrides: list[str] | None = None, *, sweep: bool = False, address: str | None = None,
           data_to: str | None = None, paths_on_cluster: bool = False, install_deps: bool = False,
           resume: bool = False, submission_id: str | None = None) -> Submission:
    """Submit `config` (a train YAML, or a sweep YAML with `sweep`) to the job server at `address`.

    Everything is checked before anything is submitted: the Ray versions, the GPU choice, every local path, the
    storage location. Returns the job's id and what was decided.

    Example:
        >>> job = submit("examples/gsm8k_lora.yaml", ["scaling.storage_path=s3://bucket/runs/gsm8k"],
        ...              address="http://127.0.0.1:8265")  # doctest: +SKIP
        >>> job.job_id, job.outputs  # doctest: +SKIP
        ('raysft-gsm8k_lora-3f2a9c1d', 's3://bucket/runs/gsm8k')
    """
    import ray

    from raysft.config import with_absolute_paths
    from raysft.tune.config import load_sweep

    client = connect(address)
    info = cluster_info(client)
    if (problem := version_problem(info, ray.__version__)) is not None:
        raise RunError(problem)

    sweep_cfg: SweepConfig | None = load_sweep(config, overrides) if sweep else None
    resumed = ["train.resume=true"] if resume else []
    base = sweep_cfg.base if sweep_cfg else load_config(config, [*(overrides or []), *resumed])
    prefix = "base." if sweep_cfg else ""
    use_gpu, gpu_reason = choose_gpu(base, info, f"{prefix}scaling.use_gpu")
    if base.scaling.storage_path is not None and not is_uri(base.scaling.storage_path):
        base = with_absolute_paths(base)  # a local storage path: the cluster's (shared) folder of that name
    # Where the run or the sweep lives on storage, if it does.
    home = sweep_storage_location(base.scaling.storage_path, sweep_cfg.name) if sweep_cfg else base.scaling.storage_path

    paths, root = data_plan(base, info, prefix=prefix, data_to=data_to, home=home, paths_on_cluster=paths_on_cluster)
    moved = upload_data(paths, root) if root is not None else {}

    raw = base.model_dump(mode="json")
    for item, location in moved.items():
        raw["data"][item.section][item.index][item.field] = location
    raw["scaling"]["use_gpu"] = use_gpu
    # The cluster reads this machine's files: every local path absolute, as a run started here would have them.
    # Validated again: the GPU choice may meet a cross-field rule (fp16 needs CUDA), said here, not on the cluster.
    submitted = parse_config(raw, str(config))
    submitted = with_absolute_paths(submitted) if info.local else submitted
    raw = submitted.model_dump(mode="json")
    if sweep_cfg is not None:
        sweep_dir = str(output_base() / sweep_cfg.output_dir) if info.local else str(sweep_cfg.output_dir)
        document = sweep_document(sweep_cfg, raw, sweep_dir)
        file_name, command, local_out = "sweep.yaml", "sweep", sweep_dir
    else:
        document, file_name, command, local_out = raw, "config.yaml", "train", submitted.train.output_dir
    outputs = home or _on_the_head(local_out, info)

    name = re.sub(r"[^A-Za-z0-9_-]", "-", Path(config).stem)
    job_id = submission_id or f"raysft-{name}-{secrets.token_hex(4)}"
    with tempfile.TemporaryDirectory(prefix="raysft-submit-") as staged:
        (Path(staged) / file_name).write_text(yaml.safe_dump(document, sort_keys=False))
        runtime_env: dict[str, Any] = {"working_dir": staged, "py_modules": [str(Path(__file__).parent)],
                                       "excludes": ["__pycache__", "*.pyc"]}
        if install_deps:
            runtime_env["pip"] = {"packages": pinned_requirements(), "pip_check": False}
        entrypoint = f"python -m raysft {command} {file_name}" + (" --resume" if resume else "")
        client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=job_id)
    return Submission(job_id=job_id, address=info.address, use_gpu=use_gpu, gpu_reason=gpu_reason, outputs=outputs,
                      uploads=[(item.path, location) for item, location in moved.items()])


def sweep_document(sweep_cfg: SweepConfig, base: dict[str, Any], output_dir: str) -> dict[str, Any]:
    """The sweep as the job reads it (sweep.yaml in its working_dir): its settings, `output_dir`, the base inline."""
    return {**sweep_cfg.model_dump(mode="json", exclude={"base"}), "output_dir": output_dir, "base": base}


def _on_the_head(output_dir: str, info: ClusterInfo) -> str:
    """Where a run without storage ends up, in words a user can act on."""
    if info.local or Path(output_dir).is_absolute():
        return output_dir + ("" if info.local else " on the node that runs the job's driver (the head)")
    return (f"~/{output_dir} on the node that runs the job's driver (the head); set scaling.storage_path (s3://...) "
            "to keep the run in a bucket")


def pinned_requirements() -> list[str]:
    """constraints.txt's pins, but Ray's (the cluster's own Ray must not be replaced by a job)."""
    if not CONSTRAINTS_FILE.is_file():
        raise ConfigError([f"--install-deps: {CONSTRAINTS_FILE} not found; it ships with a source checkout of raysft"])
    lines = [line.split("#")[0].strip() for line in CONSTRAINTS_FILE.read_text().splitlines()]
    return [line for line in lines if line and not line.lower().startswith("ray==")]


def follow(address: str, job_id: str) -> str:
    """Print the job's logs as they come until it ends; return its final status (SUCCEEDED, FAILED, STOPPED)."""
    client = connect(address)

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    return str(client.get_job_status(job_id))
