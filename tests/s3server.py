"""A real S3-compatible server for tests: moto's, on a free loopback port (no network, no mocks)."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import threading
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


class Outage:
    """A loopback TCP proxy in front of a server whose outages a test switches on and off.

    Up, it forwards every connection. Down, it cuts the connections it holds and accepts new ones only to
    close them at once (the client sees a connection reset, as when a server restarts), counting them:
    a test ends an outage once the client has met it a given number of times, never after a guessed delay.
    """

    def __init__(self, endpoint: str):
        host, port = endpoint.removeprefix("http://").split(":")
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._down = False
        self.refused = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def down(self) -> None:
        with self._lock:
            self._down = True
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self._open.clear()

    def up(self) -> None:
        with self._lock:
            self._down = False

    def wait_refused(self, count: int, timeout_s: float) -> None:
        """Until `count` connections met the outage (a safety timeout only: the count is what ends the wait)."""
        deadline = time.monotonic() + timeout_s
        while self.refused < count:
            assert time.monotonic() < deadline, f"only {self.refused} connection(s) met the outage"
            time.sleep(0.05)

    def close(self) -> None:
        self.down()
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self._down:
                    self.refused += 1
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset
                    client.close()
                    continue
                try:
                    server = socket.create_connection(self._upstream)
                except OSError:
                    client.close()
                    continue
                self._open.update((client, server))
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            with self._lock:
                self._open.discard(source)
                self._open.discard(sink)
