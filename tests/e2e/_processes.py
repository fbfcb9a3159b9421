"""Servers run as the real command line, in subprocesses on 127.0.0.1."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

START_TIMEOUT = 15.0  # seconds for a server subprocess to print its URL
STOP_TIMEOUT = 10.0  # seconds for it to exit after SIGTERM, before SIGKILL


@attrs.frozen
class CliServer:
    """A running ``trio-stream`` process and the URL it printed."""

    url: str
    process: subprocess.Popen[bytes]


def read_url(process: subprocess.Popen[bytes], deadline: float) -> str:
    """The URL the server prints once listening (read without blocking past *deadline*)."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    seen = b""
    while b"\n" not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the server printed no URL in time: {seen!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"the server exited ({process.wait()}) after {seen!r}")
            seen += chunk
    match = re.search(rb"listening on (https?://127\.0\.0\.1:\d+)", seen)
    if match is None:
        raise RuntimeError(f"unexpected first line from the server: {seen!r}")
    return match.group(1).decode()


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it does not exit within `STOP_TIMEOUT`."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)
    if process.stdout is not None:
        process.stdout.close()


@contextmanager
def cli_server(command: str, options: list[str], stderr_path: Path) -> Iterator[CliServer]:
    """``python -m trio_stream COMMAND --port 0 OPTIONS`` for the duration of the block."""
    argv = [sys.executable, "-m", "trio_stream", command, "--host", "127.0.0.1", "--port", "0"]
    argv += ["--drain-grace", "1", *options]
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr)
        try:
            try:
                url = read_url(process, time.monotonic() + START_TIMEOUT)
            except (TimeoutError, RuntimeError) as error:
                raise RuntimeError(f"{error}; stderr: {stderr_path.read_text()!r}") from None
            yield CliServer(url, process)
        finally:
            stop(process)
