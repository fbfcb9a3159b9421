"""nginx from the system as a reverse proxy in front of a test server, on 127.0.0.1.

nginx runs in the foreground from a configuration generated into a temporary
directory (``nginx -p PREFIX -c CONF -g 'daemon off;'``): no system file is read or
written. Proxy buffering stays at nginx's default (on), as in most deployments; the
server's ``X-Accel-Buffering: no`` is what turns it off for event streams.

Where nginx is missing the tests are skipped, except under ``CI=true``, where they fail:
CI must run them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING

import attrs
import pytest

from ._support import host_port

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from pathlib import Path

START_TIMEOUT = 10.0  # seconds for nginx to accept connections
STOP_TIMEOUT = 5.0
CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")

# Requests whose path starts with this go through a location that ignores the server's
# X-Accel-Buffering header: the control that shows what the header is for.
IGNORING_ACCEL = "/ignoring-accel"


def find_nginx() -> str | None:
    """The nginx executable, or ``None``."""
    found = shutil.which("nginx")
    if found:
        return found
    return next((path for path in CANDIDATES if os.access(path, os.X_OK)), None)


def require_nginx() -> str:
    """The nginx executable; skips the test without one (fails it under ``CI=true``)."""
    found = find_nginx()
    if found is None:
        message = "nginx is not installed (apt-get install nginx, or make system-deps)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}: CI must run the nginx tests")
        pytest.skip(message)
    return found


@attrs.frozen
class Nginx:
    """A running nginx: its URL, its error log and its process."""

    url: str
    error_log: Path
    process: subprocess.Popen[bytes]

    def errors(self) -> str:
        """What nginx has logged so far."""
        return self.error_log.read_text(errors="replace") if self.error_log.exists() else ""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _location(path: str, upstream: str, read_timeout: float, extra: str = "") -> str:
    return f"""
        location {path} {{
            proxy_pass {upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_read_timeout {read_timeout:g}s;
            {extra}
        }}"""


def config(prefix: Path, port: int, upstream_urls: Sequence[str], *, read_timeout: float) -> str:
    """nginx.conf: one server on 127.0.0.1:*port* balancing over *upstream_urls*.

    Round robin; a server that refuses a connection is skipped for 10 s and the request
    goes to the next (nginx's defaults).
    """
    servers = "".join("server {}:{};".format(*host_port(url)) for url in upstream_urls)
    upstream = "http://upstreams"
    user = "user root;" if os.geteuid() == 0 else ""  # workers may then use the prefix
    locations = _location("/", upstream, read_timeout) + _location(
        f"{IGNORING_ACCEL}/",
        upstream + "/",
        read_timeout,
        "proxy_ignore_headers X-Accel-Buffering;",
    )
    return f"""
{user}
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {prefix}/access.log;
    upstream upstreams {{ {servers} }}
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port};
        {locations}
    }}
}}
"""


def _wait_listening(process: subprocess.Popen[bytes], port: int, error_log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited ({process.returncode}): {error_log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"nginx did not listen in time: {error_log.read_text()}"
                ) from None
            time.sleep(0.05)


@contextmanager
def running_nginx(
    upstream_url: str | Sequence[str], prefix: Path, *, read_timeout: float = 2.0
) -> Iterator[Nginx]:
    """nginx proxying to *upstream_url* (or balancing over several), with
    ``proxy_read_timeout`` *read_timeout*."""
    urls = [upstream_url] if isinstance(upstream_url, str) else list(upstream_url)
    executable = require_nginx()
    prefix.mkdir(parents=True, exist_ok=True)
    error_log = prefix / "error.log"
    for attempt in range(3):  # the free port may be taken before nginx binds it
        port = _free_port()
        conf = prefix / "nginx.conf"
        conf.write_text(config(prefix, port, urls, read_timeout=read_timeout))
        argv = [executable, "-p", str(prefix), "-c", str(conf), "-e", str(error_log)]
        process = subprocess.Popen(
            [*argv, "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            _wait_listening(process, port, error_log)
        except RuntimeError:
            _stop(process)
            if attempt == 2 or "Address already in use" not in error_log.read_text():
                raise
            continue
        break
    try:
        yield Nginx(f"http://127.0.0.1:{port}", error_log, process)
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # fast shutdown: open streams are cut
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)
    if process.stderr is not None:
        process.stderr.close()
