"""The command line as users run it: ``trio-stream serve|demo`` and hypercorn's own CLI
on ``trio_stream.server:app``, as real processes on 127.0.0.1.

Every process is started with ``--port 0`` (or ``--bind 127.0.0.1:0``), its URL read
from what it prints, and killed on the way out if it is still running.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import pytest
import trio

from ._support import http_client, open_raw, publish_many

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping, Sequence

pytestmark = pytest.mark.e2e

URL = re.compile(rb"http://127\.0\.0\.1:(\d+)")

# The contract's table of options, in its order.
CONTRACT_OPTIONS = [
    "--rate",
    "--burst",
    "--global-rate",
    "--global-burst",
    "--window",
    "--log-capacity",
    "--log-ttl",
    "--log-max-bytes",
    "--max-topics",
    "--lag-limit",
    "--heartbeat",
    "--retry-ms",
    "--idle-timeout",
    "--max-streams-per-client",
    "--max-connections",
    "--publish-token",
    "--cors-origins",
    "--backend",
    "--certfile",
    "--keyfile",
]


def trio_stream_command() -> str:
    """The ``trio-stream`` console script of the environment running the tests."""
    beside = Path(sys.executable).parent / "trio-stream"
    if beside.exists():
        return str(beside)
    found = shutil.which("trio-stream")
    assert found is not None, "trio-stream is not installed (pip install -e .)"
    return found


def environment(**variables: str) -> dict[str, str]:
    """This process's environment without any TRIO_STREAM_* variable, plus *variables*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_STREAM_")}
    env.update(variables)
    return env


@attrs.define(eq=False)
class Running:
    """A server process, its URL and everything it printed so far."""

    process: trio.Process
    url: str
    output: bytearray

    async def stop(self, signum: int = signal.SIGTERM) -> tuple[int, float]:
        """Send *signum*; the exit status and the seconds it took to exit."""
        start = trio.current_time()
        self.process.send_signal(signum)
        status = await self.process.wait()
        return status, trio.current_time() - start


@asynccontextmanager
async def running(argv: Sequence[str], env: Mapping[str, str]) -> AsyncIterator[Running]:
    """Start *argv* and wait until it prints its URL (on stdout or stderr)."""
    process = await trio.lowlevel.open_process(
        list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(env)
    )
    output = bytearray()
    printed = trio.Event()

    async def pump() -> None:
        assert process.stdout is not None
        async for chunk in process.stdout:
            output.extend(chunk)
            if URL.search(output):
                printed.set()
        printed.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump)
            with trio.fail_after(20):
                await printed.wait()
            match = URL.search(output)
            assert match is not None, output.decode(errors="replace")
            assert int(match[1]) != 0
            yield Running(process, match[0].decode(), output)
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


async def test_serve_prints_its_url_and_takes_options_from_flags_and_environment() -> None:
    argv = [trio_stream_command(), "serve", "--port", "0", "--retry-ms", "1234"]
    # A flag wins over its variable; a variable sets an option left at its default.
    env = environment(TRIO_STREAM_RETRY_MS="999", TRIO_STREAM_PUBLISH_TOKEN="tok")
    with trio.fail_after(40):
        async with running(argv, env) as server, http_client(server.url) as client:
            assert b"serve" in server.output
            assert (await client.get("/healthz")).text == "ok"
            async with await open_raw(server.url, "/streams/cli") as stream:
                assert stream.status == 200
                await stream.read_until(lambda body: b"\n\n" in body)
                assert bytes(stream.body) == b"retry: 1234\n\n"
                response = await client.post("/streams/cli", json={"data": "x"})
                assert response.status_code == 401
                headers = {"Authorization": "Bearer tok"}
                response = await client.post("/streams/cli", json={"data": "x"}, headers=headers)
                assert response.status_code == 202
                events = await stream.read_events(1)
                assert events[0].id == response.json()["ids"][0]
            status, took = await server.stop()
            assert status == 0
            assert took < 5.0  # the default grace: nothing held it up


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_stop_signal_ends_streams_with_a_retry_hint_and_exits_0(signum: int) -> None:
    """Two streams, one of whose client stopped reading behind a 1 MB write: the reading
    one gets a final ``retry:`` and its end; the process exits 0 within the grace."""
    grace = 2.0
    argv = [trio_stream_command(), "serve", "--port", "0", "--drain-grace", str(grace)]
    with trio.fail_after(40):
        async with running(argv, environment()) as server, http_client(server.url) as client:
            url = server.url
            async with (
                await open_raw(url, "/streams/s", headers={"X-Client-ID": "a"}) as reading,
                await open_raw(
                    url, "/streams/s", headers={"X-Client-ID": "b"}, rcvbuf=4096
                ) as stuck,
            ):
                assert reading.status == stuck.status == 200
                for _ in range(2):
                    await publish_many(client, "s", ["z" * 250_000] * 2)
                events = await reading.read_events(4)
                assert len(events) == 4
                sent = len(reading.body)
                status, took = await server.stop(signum)
                assert status == 0
                assert took < grace + 1.5
                with trio.fail_after(5):
                    await reading.read_to_end()
                assert reading.ended
                assert bytes(reading.body[sent:]) == b"retry: 3000\n\n"


async def test_demo_serves_its_page_and_a_bursty_topic() -> None:
    argv = [trio_stream_command(), "demo", "--port", "0"]
    with trio.fail_after(40):
        async with running(argv, environment()) as server, http_client(server.url) as client:
            page = await client.get("/")
            assert page.status_code == 200
            assert page.headers["content-type"].startswith("text/html")
            script = await client.get("/static/trio-stream.js")
            assert script.status_code == 200
            async with await open_raw(server.url, "/streams/demo") as stream:
                assert stream.status == 200
                await stream.read_events(1)
            status, _ = await server.stop()
            assert status == 0


async def test_hypercorn_serves_the_app_configured_by_environment() -> None:
    argv = [sys.executable, "-m", "hypercorn", "--worker-class", "trio"]
    argv += ["--bind", "127.0.0.1:0", "trio_stream.server:app"]
    env = environment(
        TRIO_STREAM_RETRY_MS="2500",
        TRIO_STREAM_MAX_STREAMS_PER_CLIENT="1",
        TRIO_STREAM_PUBLISH_TOKEN="tok",
    )
    with trio.fail_after(40):
        async with running(argv, env) as server, http_client(server.url) as client:
            async with await open_raw(
                server.url, "/streams/env", headers={"X-Client-ID": "one"}
            ) as stream:
                await stream.read_until(lambda body: b"\n\n" in body)
                assert bytes(stream.body) == b"retry: 2500\n\n"
                response = await client.get("/streams/env", headers={"X-Client-ID": "one"})
                assert response.status_code == 429
            assert (await client.post("/streams/env", json={"data": "x"})).status_code == 401
            await server.stop()


def test_help_lists_every_option_of_the_contract() -> None:
    for command in ("serve", "demo"):
        result = subprocess.run(
            [trio_stream_command(), command, "--help"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
            env=environment(),
        )
        text = result.stdout
        for option in [*CONTRACT_OPTIONS, "--host", "--port", "--drain-grace"]:
            assert re.search(rf"^\s+{re.escape(option)}\b", text, re.MULTILINE), option
        # Each says which variable sets it too.
        for option in CONTRACT_OPTIONS:
            variable = "TRIO_STREAM_" + option[2:].replace("-", "_").upper()
            assert variable in text, variable
    top = subprocess.run(
        [trio_stream_command(), "--help"], capture_output=True, text=True, check=True, timeout=30
    )
    assert "serve" in top.stdout
    assert "demo" in top.stdout


def test_help_lists_auth_secret() -> None:
    result = subprocess.run(
        [trio_stream_command(), "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert "--auth-secret" in result.stdout


@pytest.mark.parametrize(
    ("args", "variables", "mentions"),
    [
        (["--rate", "fast"], {}, "--rate"),
        (["--window", "0"], {}, "--window"),
        ([], {"TRIO_STREAM_RATE": "fast"}, "TRIO_STREAM_RATE"),
        ([], {"TRIO_STREAM_LAG_LIMIT": "-5"}, "TRIO_STREAM_LAG_LIMIT"),
    ],
)
def test_bad_option_values_are_refused(
    args: list[str], variables: dict[str, str], mentions: str
) -> None:
    result = subprocess.run(
        [trio_stream_command(), "serve", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=environment(**variables),
        check=False,
    )
    assert result.returncode != 0
    assert mentions in result.stderr
    assert "Traceback" not in result.stderr
