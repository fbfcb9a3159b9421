"""A real redis-server for the tests, on a free loopback port, in a temporary directory.

Without redis-server the Redis tests skip, except under ``CI=true``, where they fail:
CI must run them against a real server.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING

import attrs
import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


def redis_server_binary() -> str:
    """The path of redis-server; skips the test (fails it under ``CI=true``) without one."""
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )
    if found is None:
        message = "redis-server is not installed (apt-get install redis-server)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@attrs.define(eq=False)
class RedisServer:
    """A redis-server process that can be stopped and started again on the same port.

    With *persistent*, every write is in an append-only file (fsync always), so a
    stop and start loses nothing.
    """

    binary: str
    directory: Path
    port: int
    persistent: bool = False
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start it; returns once it answers PING."""
        assert self.process is None
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--dir", str(self.directory), "--save", ""]
        if self.persistent:
            argv += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            argv += ["--appendonly", "no"]
        log = (self.directory / "redis.log").open("ab")
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while not _ping(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                output = (self.directory / "redis.log").read_text()
                self.stop()
                raise RuntimeError(f"redis-server did not start: {output[-2000:]}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL)."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT)


@contextmanager
def redis_server(directory: Path, *, persistent: bool = False) -> Iterator[RedisServer]:
    """A running `RedisServer` for the duration of the block."""
    directory.mkdir(parents=True, exist_ok=True)
    server = RedisServer(redis_server_binary(), directory, free_port(), persistent=persistent)
    server.start()
    try:
        yield server
    finally:
        server.stop()
