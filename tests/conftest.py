"""Shared fixtures: one real local Ray per session, a tiny tokenizer, tiny models, the shared data."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tests.runs import SHARED_DATA
from tests.s3server import BUCKET, s3_env, start_moto
from tests.tiny import make_base_tokenizer, make_model, make_tokenizer


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: needs the SmolLM2-135M model or runs for minutes")
    config.addinivalue_line("markers", "cluster: starts and stops a real `ray start` cluster (owns the machine's Ray)")


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    import ray

    from raysft.ray_session import ensure_ray, environment

    # A fresh local Ray of our own (RAY_ADDRESS=local: never a `ray start` cluster running on the machine), started
    # as raysft starts one: its processes know its address, so Ray Train's placement-group cleaner, which asks the
    # State API whether a run's controller is gone, finds this Ray even while a test's `ray start` cluster or a
    # subprocess's own Ray runs beside it (otherwise: "Found multiple active Ray instances", and stopped trials
    # keep their CPUs).
    with environment(RAY_ADDRESS="local"):
        ensure_ray(None)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    # Loaded back from disk, as the pipeline's workers load it. Shared by every test: change a copy.deepcopy.
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def _tokenizer_settings(tokenizer: PreTrainedTokenizerBase) -> tuple[object, ...]:
    return (tokenizer.chat_template, tokenizer.padding_side, tokenizer.truncation_side, tokenizer.model_max_length,
            str(tokenizer.special_tokens_map), len(tokenizer))


@pytest.fixture(autouse=True)
def _session_tokenizer_unchanged(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that changes the session's tokenizer would change what every later test sees: fail it."""
    if "tiny_tokenizer" not in request.fixturenames:
        yield
        return
    tokenizer = request.getfixturevalue("tiny_tokenizer")
    before = _tokenizer_settings(tokenizer)
    yield
    assert _tokenizer_settings(tokenizer) == before, "this test changed the session-wide tiny_tokenizer; change a copy"


@pytest.fixture(scope="session")
def tiny_model_factory(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: PreTrainedTokenizerBase
) -> Callable[[str], Path]:
    built: dict[str, Path] = {}

    def factory(arch: str) -> Path:
        if arch not in built:
            built[arch] = make_model(arch, tmp_path_factory.mktemp(f"model-{arch}"), tiny_tokenizer)
        return built[arch]

    return factory


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_factory: Callable[[str], Path]) -> Path:
    return tiny_model_factory("llama")


@pytest.fixture(scope="session")
def tiny_base_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (untied head) whose tokenizer, like a base model's, has no chat template and no ChatML markers."""
    path = tmp_path_factory.mktemp("base-model")
    return make_model("llama", path, make_base_tokenizer(path))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def s3() -> Iterator[dict[str, str]]:
    """A running S3 server with one bucket; yields the environment that reaches it."""
    import boto3

    server, endpoint = start_moto()
    env = s3_env(endpoint)
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
    yield env
    server.kill()
    server.wait()
