"""A real S3-compatible server for tests: moto's, on a free loopback port (no network, no mocks)."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest

BUCKET = "raysft-test"


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_moto(extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    server = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)], env={**os.environ, **(extra_env or {})},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, endpoint
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.skip("moto_server did not start (pip install 'moto[server]')")
            time.sleep(0.2)


def s3_env(endpoint: str) -> dict[str, str]:
    # Dummy keys for the local server; AWS_EC2_METADATA_DISABLED keeps the SDK from probing a cloud.
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
