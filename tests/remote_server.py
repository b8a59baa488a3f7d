"""A real S3-compatible server for the tests (moto's standalone server, as s3fs's own suite uses)
on 127.0.0.1 and an ephemeral port, and a byte-counting TCP proxy in front of it.

The server runs in a thread of the test process: a subprocess (a killed save) reaches it over
TCP like any client. Tests get a fresh bucket each; s3fs's instance cache is cleared around every
test, so no filesystem (and no cached listing) leaks from one test into another.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

KEY, SECRET, REGION = "testing", "testing", "us-east-1"


class CountingProxy:
    """A TCP proxy to ``upstream`` that counts the bytes it carries each way (``down``: server
    to client, which is what a read transfers)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.down = self.up = self.connections = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> None:
        with self._lock:
            self.down = self.up = self.connections = 0

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, server, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, "down"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, way: str) -> None:
        try:
            while data := src.recv(1 << 16):
                with self._lock:
                    setattr(self, way, getattr(self, way) + len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()


@dataclass
class S3:
    """The running server: ``endpoint`` (direct), ``proxy`` (counting), and a fresh ``bucket``."""

    endpoint: str
    proxy: CountingProxy
    bucket: str = ""
    env: dict[str, str] = field(default_factory=dict)

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def options(self, *, counted: bool = False, **more: Any) -> dict[str, Any]:
        """storage_options reaching the server directly, or through the counting proxy."""
        endpoint = f"http://127.0.0.1:{self.proxy.port}" if counted else self.endpoint
        return {"key": KEY, "secret": SECRET, "client_kwargs": {"endpoint_url": endpoint}, **more}

    def fs(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(
            key=KEY, secret=SECRET, client_kwargs={"endpoint_url": self.endpoint}, skip_instance_cache=True
        )


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3]:
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL": endpoint,
    }
    proxy = CountingProxy((host, port))
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
            mp.delenv(k, raising=False)
        yield S3(endpoint, proxy, env=env)
    proxy.close()
    server.stop()


@pytest.fixture
def s3(s3_server: S3) -> Iterator[S3]:
    """The server with a new, empty bucket; the AWS_* environment points at it."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.fs().mkdir(bucket)
    s3_server.proxy.reset()
    yield S3(s3_server.endpoint, s3_server.proxy, bucket, s3_server.env)
    s3fs.S3FileSystem.clear_instance_cache()


def subprocess_env(s3: S3) -> dict[str, str]:
    """The environment for a child process talking to the server."""
    return {**os.environ, **s3.env}
