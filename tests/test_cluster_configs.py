"""Every config in cluster/ is checked offline, the way its consumer checks it, and each check can fail.

- Launcher YAMLs (AWS, GCP): `ray up` runs `prepare_config` (merge the provider's defaults.yaml, merge setup
  commands, fill per-type worker bounds) and then `validate_config` (ray-schema.json plus cross-field checks).
  Between the two it asks the cloud for instance resources (AWS, needs credentials); every node type here
  declares `resources` itself, so that step adds nothing and is skipped.
- The local fake_multinode YAML: its provider ships no defaults.yaml in the wheel, and the (v1) autoscaler
  started by `ray start --autoscaling-config` reads the file as it is and runs `validate_config` on it; the
  test does exactly that, then builds the real provider the autoscaler builds.
- Node types: the autoscaler's own bin-packing (`ResourceDemandScheduler`) picks the node type a demand
  starts, with no cloud (a fake_multinode provider holding only the head).
- KubeRay manifests: jsonschema against the CRDs' openAPIV3Schema in ../shared/schemas/kuberay, with unknown
  fields rejected as `kubectl apply` does by default (the CRD schemas leave them open; the API server would
  drop them silently, which hides typos).

No Ray cluster is started.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.runs import REPO

CLUSTER = REPO / "cluster"
LAUNCHER = ["aws.yaml", "gcp.yaml"]
LOCAL = "local-autoscaling.yaml"
KUBERAY = {"kuberay-raycluster.yaml": "ray.io_rayclusters.yaml", "kuberay-rayjob.yaml": "ray.io_rayjobs.yaml"}

# The commands each file's opening comment must give.
COMMANDS = {
    "aws.yaml": ["docker build -f docker/Dockerfile", "ray up cluster/aws.yaml", "ray attach cluster/aws.yaml",
                 "ray down cluster/aws.yaml", "raysft submit examples/gsm8k_lora.yaml --address http://127.0.0.1:8265",
                 "ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m raysft",
                 "--set scaling.use_gpu=true", "--set base.scaling.use_gpu=true"],
    "gcp.yaml": ["docker build -f docker/Dockerfile", "ray up cluster/gcp.yaml", "ray attach cluster/gcp.yaml",
                 "ray down cluster/gcp.yaml", "raysft submit examples/gsm8k_lora.yaml --address http://127.0.0.1:8265",
                 "ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m raysft",
                 "--set scaling.use_gpu=true", "--set base.scaling.use_gpu=true"],
    LOCAL: ["RAY_FAKE_CLUSTER=1 ray start --head", "--autoscaling-config=cluster/local-autoscaling.yaml"],
    "kuberay-raycluster.yaml": ["kubectl apply -f cluster/kuberay-raycluster.yaml", "raysft submit --sweep",
                                "ray job submit", "--set base.scaling.use_gpu=true"],
    "kuberay-rayjob.yaml": ["kubectl apply -f cluster/kuberay-rayjob.yaml"],
}


def _pyproject_version() -> str:
    return re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)  # type: ignore[union-attr]


RAYSFT_IMAGE = f"REPLACE_ME/raysft:{_pyproject_version()}"
"""The image of docker/Dockerfile every cluster config runs (REPLACE_ME: the user's registry)."""


def load(name: str) -> Any:
    return yaml.safe_load((CLUSTER / name).read_text())


def launcher_config(name: str) -> dict[str, Any]:
    """The config as `ray up` validates it."""
    return prepare_config(load(name))


# ---------------------------------------------------------------------------------------------- headers


def test_every_file_in_cluster_is_checked_here() -> None:
    shipped = {p.name for p in CLUSTER.iterdir() if p.suffix in (".yaml", ".yml")}
    assert shipped == set(COMMANDS), "add new cluster/ files to COMMANDS and to a validation test"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_file_opens_with_the_commands_that_use_it(name: str) -> None:
    lines = (CLUSTER / name).read_text().splitlines()
    header_lines: list[str] = []
    for line in lines:
        if not line.startswith("#"):
            break
        header_lines.append(line)
    assert header_lines, f"{name} must open with a comment block"
    header = "\n".join(header_lines)
    for command in COMMANDS[name]:
        assert command in header, f"{name}: opening comment lacks {command!r}"


# ----------------------------------------------------------------------------------- launcher (ray up)


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_passes_rays_validator(name: str) -> None:
    validate_config(launcher_config(name))


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_layout(name: str) -> None:
    cfg = launcher_config(name)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head must not take training or tokenization work"
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert all(t["min_workers"] == 0 for t in workers.values()), "every pool scales from zero"
    gpus = sorted(t["resources"].get("GPU", 0) for t in workers.values())
    assert 1 in gpus and 8 in gpus, "a 1-GPU and an 8-GPU node type"
    assert 0 in gpus, "a CPU pool for Ray Data"
    assert 0 < cfg["idle_timeout_minutes"] <= 30
    # Token auth on every Ray process and the token on every node.
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token ray start" in c for c in starts if "ray start" in c)
    assert sum("ray start" in c for c in starts) == 2
    assert any(remote.endswith("/.ray/auth_token") for remote in cfg["file_mounts"])
    assert "--dashboard-host=0.0.0.0" not in " ".join(starts), "keep the dashboard off the network"
    # Every node runs raysft's image (docker/Dockerfile: pinned torch, Ray, raysft); nothing unpinned is installed.
    assert cfg["docker"]["image"] == RAYSFT_IMAGE
    assert not {"head_image", "worker_image"} & set(cfg["docker"]), "one image for every node"
    assert all("docker" not in t for t in types.values()), "no node type runs another image"
    for commands in (cfg["head_setup_commands"], cfg["worker_setup_commands"]):
        assert not any("pip install torch" in c or "raysft" in c for c in commands)


def _plan(cfg: dict[str, Any], demands: list[dict[str, float]], monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Node types the autoscaler launches for `demands` on a cluster holding only the head."""
    from ray.autoscaler._private.fake_multi_node.node_provider import (
        FAKE_HEAD_NODE_TYPE,
        FakeMultiNodeProvider,
    )
    from ray.autoscaler._private.node_provider_availability_tracker import (
        NodeAvailabilitySummary,
    )
    from ray.autoscaler._private.resource_demand_scheduler import (
        ResourceDemandScheduler,
    )

    monkeypatch.setenv("RAY_FAKE_CLUSTER", "1")
    types = dict(cfg["available_node_types"])
    # The fake provider tags its head with a fixed type name; GCP's names cannot contain dots.
    head = types.pop(cfg["head_node_type"])
    types[FAKE_HEAD_NODE_TYPE] = head
    provider = FakeMultiNodeProvider({"type": "fake_multinode"}, cfg["cluster_name"])
    scheduler = ResourceDemandScheduler(
        provider, types, cfg["max_workers"], FAKE_HEAD_NODE_TYPE, cfg["upscaling_speed"]
    )
    nodes = provider.non_terminated_nodes({})
    head_free = {nodes[0]: dict(head["resources"])}
    to_launch, _ = scheduler.get_nodes_to_launch(
        nodes, {}, demands, head_free, [], copy.deepcopy(head_free), [], NodeAvailabilitySummary(node_availabilities={})
    )
    return dict(to_launch)


@pytest.mark.parametrize("name", LAUNCHER)
def test_autoscaler_picks_the_matching_pool(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = launcher_config(name)
    types = cfg["available_node_types"]

    def gpus(plan: dict[str, int]) -> list[int]:
        return [types[t]["resources"].get("GPU", 0) for t in plan]

    # A 1-GPU trial starts a 1-GPU node, an 8-GPU run an 8-GPU node, tokenization a CPU node (never a GPU one).
    assert gpus(_plan(cfg, [{"CPU": 1, "GPU": 1}], monkeypatch)) == [1]
    assert gpus(_plan(cfg, [{"GPU": 1}] * 8, monkeypatch)) == [8]
    assert gpus(_plan(cfg, [{"CPU": 1}] * 8, monkeypatch)) == [0]
    # The head's {"CPU": 0} really keeps work off it: one CPU task already needs a worker.
    assert _plan(cfg, [{"CPU": 1}], monkeypatch)


# --------------------------------------------------------------------------------- launcher, must fail


def test_validator_rejects_a_wrong_resource_type() -> None:
    cfg = launcher_config("aws.yaml")
    cfg["available_node_types"]["gpu_1x_a10g"]["resources"]["GPU"] = "1"
    with pytest.raises(jsonschema.ValidationError, match="'1' is not of type 'integer'"):
        validate_config(cfg)


def test_validator_rejects_an_unknown_key() -> None:
    cfg = launcher_config("gcp.yaml")
    cfg["idle_timeout"] = 5  # a typo of idle_timeout_minutes
    with pytest.raises(jsonschema.ValidationError, match="idle_timeout"):
        validate_config(cfg)


def test_validator_rejects_a_missing_head_type() -> None:
    cfg = launcher_config("aws.yaml")
    cfg["head_node_type"] = "ray.head.gpu"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(cfg)


# ------------------------------------------------------------------------------ local fake_multinode


def test_local_autoscaling_config_passes_rays_validator(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.autoscaler._private.fake_multi_node.node_provider import (
        FAKE_HEAD_NODE_TYPE,
        FakeMultiNodeProvider,
    )
    from ray.autoscaler._private.providers import _get_node_provider

    cfg = load(LOCAL)
    validate_config(cfg)  # what the running autoscaler does with the file (StandardAutoscaler.reset)
    # Fields the v1 autoscaler indexes directly (it fills no defaults for this file).
    for key in ("file_mounts", "cluster_synced_files", "worker_setup_commands", "worker_start_ray_commands",
                "auth", "idle_timeout_minutes", "max_workers", "cluster_name"):
        assert key in cfg, key
    assert cfg["head_node_type"] == FAKE_HEAD_NODE_TYPE, "the fake provider registers its head under this name"
    monkeypatch.setenv("RAY_FAKE_CLUSTER", "1")
    provider = _get_node_provider(cfg["provider"], cfg["cluster_name"], use_cache=False)
    assert isinstance(provider, FakeMultiNodeProvider)


def test_local_autoscaling_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load(LOCAL)
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    [worker] = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert worker["resources"]["CPU"] == 1 and worker["max_workers"] == 2 and cfg["max_workers"] == 2
    assert 0 < cfg["idle_timeout_minutes"] <= 1
    # Two waiting 1-CPU trials start two nodes; more work never starts a third.
    assert _plan({**cfg, "upscaling_speed": 1.0}, [{"CPU": 1}] * 2, monkeypatch) == {"ray.worker.cpu": 2}
    assert _plan({**cfg, "upscaling_speed": 1.0}, [{"CPU": 1}] * 5, monkeypatch) == {"ray.worker.cpu": 2}


# -------------------------------------------------------------------------------------------- KubeRay


@pytest.fixture(scope="session")
def crd_dir() -> Path:
    # ../shared/schemas/kuberay next to the project root: read in place, never copied into the project.
    path = REPO.parent / "shared" / "schemas" / "kuberay"
    if not path.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {path}")
    return path


def _strict(schema: Any) -> Any:
    """The schema with unknown fields rejected wherever the CRD lists an object's fields."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def crd_validator(crd_dir: Path, crd_file: str) -> tuple[jsonschema.protocols.Validator, dict[str, Any]]:
    # The CRDs are ~10k lines: parse each once, with libyaml when it is there.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((crd_dir / crd_file).read_text(), Loader=loader)
    [version] = [v for v in crd["spec"]["versions"] if v.get("storage")]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls.check_schema(schema)
    ident = {"apiVersion": f"{crd['spec']['group']}/{version['name']}", "kind": crd["spec"]["names"]["kind"]}
    return cls(schema), ident


def errors(validator: jsonschema.protocols.Validator, doc: Any) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]


@pytest.mark.parametrize("name", sorted(KUBERAY))
def test_kuberay_manifest_matches_crd(name: str, crd_dir: Path) -> None:
    validator, ident = crd_validator(crd_dir, KUBERAY[name])
    docs = [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]
    assert len(docs) == 1
    [doc] = docs
    assert {k: doc[k] for k in ident} == ident
    assert errors(validator, doc) == []


def _cluster_spec(name: str) -> dict[str, Any]:
    doc = load(name)
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def _containers(spec: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        for container in group["template"]["spec"]["containers"]:
            yield group, container


@pytest.mark.parametrize("name", sorted(KUBERAY))
def test_kuberay_layout(name: str) -> None:
    spec = _cluster_spec(name)
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2"
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", "never expose the head"
    gpu_counts = []
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 and group["replicas"] == 0 and group["maxReplicas"] >= 1
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpu_counts.append(int(limits.get("nvidia.com/gpu", 0)))
    assert sorted(gpu_counts) == [0, 1, 8]
    # Every Ray pod runs raysft's image and mounts the optional shared volume (data, local copies of results).
    assert {container["image"] for _, container in _containers(spec)} == {RAYSFT_IMAGE}
    for _, container in _containers(spec):
        assert "/mnt/shared" in [m["mountPath"] for m in container.get("volumeMounts", [])]
    # Secrets come from Kubernetes Secrets, never as literal values.
    for _, container in _containers(spec):
        for env in container.get("env", []):
            if re.search("KEY|TOKEN|SECRET|PASSWORD", env["name"]):
                assert "value" not in env and "secretKeyRef" in env["valueFrom"], env["name"]


def test_rayjob_runs_the_sweep_and_cleans_up() -> None:
    spec = load("kuberay-rayjob.yaml")["spec"]
    # The sweep the image ships (docker/Dockerfile copies sweeps/ there), on the GPU pods it asks for.
    assert spec["entrypoint"].startswith("python -m raysft sweep /home/ray/raysft/sweeps/lora_rank_lr.yaml")
    assert "--set base.scaling.use_gpu=true" in spec["entrypoint"]
    assert "COPY --chown=ray:users sweeps /home/ray/raysft/sweeps" in (REPO / "docker" / "Dockerfile").read_text()
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    # No runtime_env: the environment is the image's, and secrets must never be written into the CR.
    assert "runtimeEnvYAML" not in spec


# --------------------------------------------------------------------------------- KubeRay, must fail


def _worker_group(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    return spec["workerGroupSpecs"][0]


def _typo_or_bad_enum(doc: dict[str, Any]) -> None:
    if doc["kind"] == "RayJob":
        doc["spec"]["shutdownAfterJobFinish"] = True  # the real field ends in "Finishes"
    else:
        doc["spec"]["authOptions"]["mode"] = "password"


BREAKAGES = {
    "wrong-type": (lambda d: _worker_group(d).update(minReplicas="zero"), "'zero' is not of type 'integer'"),
    "missing-required": (lambda d: _worker_group(d).pop("template"), "'template' is a required property"),
    "unknown-field": (lambda d: _worker_group(d).update(minReplica=0), "'minReplica' was unexpected"),
    "int-start-param": (
        lambda d: _worker_group(d)["rayStartParams"].update({"num-cpus": 0}),
        "0 is not of type 'string'",
    ),
    "typo-or-enum": (_typo_or_bad_enum, "'shutdownAfterJobFinish' was unexpected|'password' is not one of"),
}


@pytest.mark.parametrize("name", sorted(KUBERAY))
@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_kuberay_validation_catches_a_broken_manifest(name: str, breakage: str, crd_dir: Path) -> None:
    mutate, expected = BREAKAGES[breakage]
    validator, _ = crd_validator(crd_dir, KUBERAY[name])
    doc = copy.deepcopy(load(name))
    mutate(doc)
    found = errors(validator, doc)
    assert found and any(re.search(expected, e) for e in found), found
