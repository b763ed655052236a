"""`raysft submit`'s decisions, each made before anything is submitted: Ray versions, the GPU choice, which local
paths a cluster reads and which are uploaded (and the refusals, naming the key and the fix), where outputs go.
The live path (a real `ray start --head`, a moto bucket) is in tests/test_submit_live.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raysft.cli import build_parser
from raysft.cluster import autoscaler_adds_nodes, dashboard_node_types, gcs_node_types
from raysft.config import load_config, output_base, with_absolute_paths
from raysft.errors import ConfigError
from raysft.submit import ClusterInfo, choose_gpu, data_plan, pinned_requirements, sweep_document, version_problem
from raysft.tune.config import load_sweep
from tests.runs import REPO

EXAMPLE = REPO / "examples" / "gsm8k_lora.yaml"
REMOTE_CPU = ClusterInfo(address="http://127.0.0.1:8265", ray_version="2.60.0", gpus=0, autoscaler=False, local=False)
REMOTE_GPU = ClusterInfo(address="http://127.0.0.1:8265", ray_version="2.60.0", gpus=8, autoscaler=False, local=False)
AUTOSCALING = ClusterInfo(address="http://127.0.0.1:8265", ray_version="2.60.0", gpus=0, autoscaler=True, local=False)
LOCAL_HEAD = ClusterInfo(address="http://127.0.0.1:8265", ray_version="2.60.0", gpus=0, autoscaler=False, local=True)


def test_ray_versions_must_match_and_the_fix_is_named() -> None:
    assert version_problem(REMOTE_CPU, "2.60.0") is None
    problem = version_problem(REMOTE_CPU, "2.59.1")
    assert problem is not None
    assert "Ray 2.60.0" in problem and "Ray 2.59.1" in problem and "pip install 'ray[default]==2.60.0'" in problem


def test_use_gpu_follows_the_cluster_unless_set() -> None:
    unset = load_config(EXAMPLE)
    assert choose_gpu(unset, REMOTE_GPU) == (True, "the cluster has 8 GPU(s)")
    assert choose_gpu(unset, REMOTE_CPU) == (False, "the cluster has no GPU")
    set_false = load_config(EXAMPLE, ["scaling.use_gpu=false"])
    assert choose_gpu(set_false, REMOTE_GPU) == (False, "set in the config")
    set_true = load_config(EXAMPLE, ["scaling.use_gpu=true"])
    assert choose_gpu(set_true, AUTOSCALING) == (True, "set in the config")  # GPU nodes may come


def test_gpu_asked_on_a_cpu_cluster_is_refused() -> None:
    with pytest.raises(ConfigError) as err:
        choose_gpu(load_config(EXAMPLE, ["scaling.use_gpu=true"]), REMOTE_CPU, "base.scaling.use_gpu")
    assert err.value.problems == [
        "base.scaling.use_gpu: true, but the cluster at http://127.0.0.1:8265 has no GPU and no autoscaler to add GPU "
        "nodes; submit with --set base.scaling.use_gpu=false to train on its CPUs, or to a cluster with GPUs"]


def test_an_autoscaling_cluster_without_gpus_now_needs_the_choice_said() -> None:
    with pytest.raises(ConfigError) as err:
        choose_gpu(load_config(EXAMPLE), AUTOSCALING)
    assert "--set scaling.use_gpu=true" in str(err.value) and "--set scaling.use_gpu=false" in str(err.value)


def test_local_data_without_storage_to_a_remote_cluster_is_refused_by_key() -> None:
    cfg = load_config(EXAMPLE)
    with pytest.raises(ConfigError) as err:
        data_plan(cfg, REMOTE_CPU)
    problems = err.value.problems
    assert [p.split(":")[0] for p in problems] == ["data.train.path", "data.eval.path"]
    assert all("--data-to s3://" in p and "scaling.storage_path" in p and "--paths-on-cluster" in p for p in problems)


def test_a_local_model_folder_cannot_reach_a_remote_cluster(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    cfg = load_config(EXAMPLE, [f"model.name_or_path={tmp_path}"])
    with pytest.raises(ConfigError) as err:
        data_plan(cfg, REMOTE_CPU, home="s3://bucket/run")
    assert err.value.problems[0].startswith(f"model.name_or_path: {tmp_path} is on this machine")


def test_what_is_uploaded_and_where(tmp_path: Path) -> None:
    cfg = load_config(EXAMPLE)
    assert data_plan(cfg, LOCAL_HEAD) == ([], None)  # a head on this machine reads the files where they are
    assert data_plan(cfg, REMOTE_CPU, paths_on_cluster=True) == ([], None)
    paths, root = data_plan(cfg, REMOTE_CPU, home=str(tmp_path / "run"))
    assert root == str(tmp_path / "run") and [p.key for p in paths] == ["data.train.path", "data.eval.path"]
    paths, root = data_plan(cfg, LOCAL_HEAD, data_to=str(tmp_path / "data"))  # asked for: uploaded even so
    assert root == str(tmp_path / "data") and len(paths) == 2


def test_relative_outputs_of_a_ray_job_land_in_home_not_in_rays_temporary_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_copy = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    job_copy.mkdir(parents=True)
    monkeypatch.chdir(job_copy)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert output_base() == job_copy  # not a job: the working directory, whatever its name
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert output_base() == tmp_path / "home"
    cfg = with_absolute_paths(load_config(EXAMPLE))
    assert cfg.train.output_dir == str(tmp_path / "home" / "runs" / "gsm8k-lora")
    assert cfg.data.train[0].path == str(REPO / "examples" / "data" / "gsm8k_train.jsonl")  # data: as they were


def test_autoscaler_status_tells_a_real_autoscaler_from_the_read_only_monitor() -> None:
    assert not autoscaler_adds_nodes(None) and not autoscaler_adds_nodes({"10.0.0.1": "node_4f2a9c"})
    assert autoscaler_adds_nodes({"10.0.0.1": "node_4f2a9c", "10.0.0.2": "gpu_1x_a10g"})
    # The same report as the GCS keeps it (the trainer reads it there) and as the dashboard serves it (raysft submit).
    assert gcs_node_types('{"autoscaler_report": {"node_type_mapping": {"10.0.0.1": "cpu_pool"}}}') == {
        "10.0.0.1": "cpu_pool"}
    assert dashboard_node_types({"clusterStatus": {"autoscalerReport": {"nodeTypeMapping": {"10.0.0.1": "cpu_pool"}}}}
                                ) == {"10.0.0.1": "cpu_pool"}
    assert gcs_node_types(None) == dashboard_node_types({}) == {}


def test_install_deps_pins_everything_but_ray() -> None:
    pins = pinned_requirements()
    assert any(p.startswith("torch==") for p in pins) and not any(p.lower().startswith("ray") for p in pins)


def test_submit_command_line() -> None:
    args = build_parser().parse_args(["submit", "--sweep", "sweeps/lora_rank_lr.yaml", "--data-to", "s3://b/d",
                                      "--set", "base.train.max_steps=5", "--wait"])
    assert (args.sweep, args.data_to, args.overrides, args.wait, args.address) == (
        True, "s3://b/d", ["base.train.max_steps=5"], True, None)


def test_the_submitted_sweep_reads_back_as_the_same_sweep(tmp_path: Path) -> None:
    sweep = load_sweep(REPO / "sweeps" / "optuna_lr_warmup.yaml", ["num_samples=3"])
    staged = tmp_path / "sweep.yaml"
    staged.write_text(yaml.safe_dump(sweep_document(sweep, sweep.base.model_dump(mode="json"), "/runs/s")))
    again = load_sweep(staged)
    assert again.base == sweep.base and again.space == sweep.space and again.num_samples == 3
    assert again.output_dir == "/runs/s" and again.search_alg == sweep.search_alg
