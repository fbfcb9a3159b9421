"""Every example runs as its docstring says, against a real server where it needs one."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from ._processes import START_TIMEOUT, cli_server, read_url, stop

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ._processes import CliServer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

EXAMPLES = Path(__file__).parents[2] / "examples"


def run_example(name: str, *args: str, timeout: float = 60) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliServer]:
    log = tmp_path_factory.mktemp("examples") / "stderr.txt"
    options = ["--rate", "200", "--burst", "50", "--lag-limit", "20", "--retry-ms", "500"]
    with cli_server("serve", options, log) as server:
        yield server


def test_examples_are_all_tested() -> None:
    tested = {
        "pipeline.py",
        "rate_limited_feed.py",
        "resume_client.py",
        "slow_consumer.py",
        "websocket_client.py",
    }
    assert {path.name for path in EXAMPLES.glob("*.py")} <= tested


def test_example_pipeline() -> None:
    out = run_example("pipeline.py")
    assert "batch of" in out
    assert "events in" in out


def test_example_resume_client(serve: CliServer) -> None:
    out = run_example("resume_client.py", "--url", serve.url, "--count", "150")
    assert "missing: 0" in out
    assert "repeated: 0" in out
    assert "in order: True" in out


def test_example_slow_consumer(serve: CliServer) -> None:
    out = run_example("slow_consumer.py", "--url", serve.url, "--count", "40", "--delay", "0.02")
    assert out.strip()


@pytest.mark.skipif(not (EXAMPLES / "websocket_client.py").exists(), reason="not written yet")
def test_example_websocket_client(serve: CliServer) -> None:
    out = run_example("websocket_client.py", "--url", serve.url)
    assert out.strip()


def test_example_rate_limited_feed() -> None:
    argv = [sys.executable, str(EXAMPLES / "rate_limited_feed.py"), "--port", "0"]
    argv += ["--rate", "5", "--burst", "10", "--seconds", "8"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE)
    try:
        url = read_url(process, time.monotonic() + START_TIMEOUT)
        ticks = 0
        started = time.monotonic()
        with httpx.stream("GET", f"{url}/streams/ticker", timeout=10) as response:
            for line in response.iter_lines():
                ticks += line.startswith("event: tick")
                if time.monotonic() - started > 2:
                    break
        # a burst of 10, then 5/s: about 20 in 2 s, far below the 200 published
        assert 10 <= ticks <= 25
        assert process.wait(timeout=20) == 0
    finally:
        stop(process)
