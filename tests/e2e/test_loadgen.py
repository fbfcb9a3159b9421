"""``trio-stream loadgen`` for real: a server process, the load generator as a process,
and its report checked against the server's own ``/metrics``; and the example alert
rules against the metric names the server exposes.

The server is fresh for each run, so its counters are the run's (plus the loadgen's
start markers, one per topic).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from trio_stream._cli import _parser
from trio_stream._loadgen import (
    OPTIONS,
    LatencyRecorder,
    LoadgenConfig,
    _consumer_plan,
    histogram_quantile,
)

from ._processes import cli_server
from ._support import Samples, http_client, parse_metrics, publish, sample
from .conftest import open_server

ALERT_RULES = Path(__file__).parents[2] / "examples" / "prometheus-alerts.yml"

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

# Fast consumers keep up easily (2000 events/s each), and the lag limit is above one
# burst, so a scheduling hiccup does not pause them; a consumer that stops acking is
# paused within a second of bursts all the same.
SERVER_OPTIONS = ["--rate", "2000", "--burst", "500", "--lag-limit", "200", "--retry-ms", "300"]
WORKLOAD = [
    "--duration", "3", "--drain", "2",
    "--producers", "2", "--quiet-rate", "20", "--burst-rate", "200",
    "--quiet-seconds", "1", "--burst-seconds", "0.5", "--max-batch", "20",
    "--consumers", "8", "--slow-share", "0.5", "--slow-mode", "mix",
    "--ack-share", "0.5", "--ack-window", "64", "--stop-after", "0.5",
    "--stall-every", "1", "--stall-seconds", "1", "--sample-interval", "0.25",
]  # fmt: skip
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def run_loadgen(url: str, *options: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m trio_stream loadgen URL OPTIONS`` to its end (stdout is not a TTY)."""
    return subprocess.run(
        [sys.executable, "-m", "trio_stream", "loadgen", url, *options],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def scrape(url: str) -> Samples:
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200
    return parse_metrics(response.text)


def wait_for_connections(url: str, count: int, *, within: float = 10) -> Samples:
    """Scrape until ``trio_stream_connections`` is *count*; the last scrape."""
    deadline = time.monotonic() + within
    while True:
        samples = scrape(url)
        if sample(samples, "trio_stream_connections") == count or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def test_loadgen_report_matches_the_server_metrics(tmp_path: Path) -> None:
    """A few seconds of bursty load with every kind of consumer: the fast ones get every
    event exactly once, a consumer that stops acking is paused, and the report's figures
    are the server's."""
    report_path, report_dir = tmp_path / "report.json", tmp_path / "report"
    with cli_server("serve", SERVER_OPTIONS, tmp_path / "server.txt") as server:
        result = run_loadgen(
            server.url,
            *WORKLOAD,
            "--report-json",
            str(report_path),
            "--report-dir",
            str(report_dir),
        )
        samples = wait_for_connections(server.url, 0)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: every consumer that kept up" in result.stdout
    report: dict[str, Any] = json.loads(report_path.read_text())
    assert report["verdict"] == {"ok": True, "problems": [], "warnings": []}
    producers, classes = report["producers"], report["classes"]

    # Publishing: every event the loadgen counted is one the server counted.
    published = producers["published"]
    assert published > 100
    assert producers["errors"] == producers["uncertain"] == producers["rejected_429"] == 0
    markers = producers["markers"]
    assert sample(samples, "trio_stream_events_published_total") == published + markers
    assert report["server"]["delta"]["published"] == published
    assert report["server"]["after"]["published"] == published + markers

    # The consumers that kept up: all of it, once each, in order, identically.
    assert set(classes) == {
        "fast",
        "fast+ack",
        "slow-read",
        "slow-read+ack",
        "slow-stall+ack",
        "slow-stop+ack",
    }
    for name in ("fast", "fast+ack"):
        totals = classes[name]
        assert totals["consumers"] == 2
        assert totals["delivered"] == totals["expected"] == 2 * published, name
        assert totals["dropped"] == totals["behind"] == totals["duplicates"] == 0, name
        assert totals["resets"] == 0, name
        assert totals["exact"] == 2
    fast = [c for c in report["consumers"] if c["must_keep_up"]]
    assert len({c["order_digest"] for c in fast}) == 1
    assert all(c["acks"] > 0 for c in fast if c["class"] == "fast+ack")

    # Slow consumers fell behind; the one that stopped acking was paused by the server.
    stopped = next(c for c in report["consumers"] if c["class"] == "slow-stop+ack")
    assert stopped["stopped"]
    assert stopped["delivered"] + stopped["behind"] == stopped["expected"]
    assert stopped["behind"] > 0
    assert classes["slow-read"]["behind"] > 0
    pauses = sample(samples, "trio_stream_retry_signals_total", kind="pause")
    assert pauses > 0
    assert report["retry_signals"]["server"]["pause"] == pauses
    assert report["retry_signals"]["client"]["pauses"] <= pauses

    # What the server wrote covers what every consumer received; nothing was dropped.
    delivered = sum(c["delivered"] for c in report["consumers"])
    assert sample(samples, "trio_stream_events_sent_total") >= delivered
    assert sample(samples, "trio_stream_events_dropped_total") == 0
    assert report["server"]["delta"]["dropped"] == 0
    assert report["server"]["connections_after"] == 0

    # Latency: measured for every delivered event; acks come after receipt.
    receipt = report["latency_s"]["receipt"]
    for name in ("fast", "fast+ack"):
        assert receipt[name]["count"] == classes[name]["delivered"]
        assert 0 <= receipt[name]["p50"] <= receipt[name]["p99"] <= receipt[name]["max"] < 5
    ack = report["latency_s"]["ack"]["fast+ack"]
    assert ack["count"] > 0
    assert ack["p50"] >= receipt["fast+ack"]["p50"]
    server_ack = sample(samples, "trio_stream_delivery_latency_seconds_count", stage="ack")
    assert report["server"]["delivery_latency_s"]["ack"]["count"] == server_ack > 0

    # Queue depth and saturation were sampled over time; buffer utilization came in acks.
    depths = [p["server"]["queue_depth"]["loadgen-0"] for p in report["timeline"] if "server" in p]
    assert len(depths) >= 8
    assert max(depths) == report["server"]["max_queue_depth"]["loadgen-0"] > 0
    assert max(depths) <= published + markers
    utilization = report["buffer_utilization"]["server"]
    assert utilization["count"] == sample(samples, "trio_stream_client_buffer_utilization_count")
    assert utilization["count"] > 0

    # The files.
    page = (report_dir / "index.html").read_text()
    assert "OK" in page
    if HAVE_MATPLOTLIB:
        for name in ("overview", "throughput", "queue", "latency", "delivery", "signals"):
            assert (report_dir / f"{name}.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        assert page.count('src="data:image/png;base64,') == 7


def test_loadgen_fails_when_a_consumer_that_should_keep_up_loses_events(tmp_path: Path) -> None:
    """Forces real losses: the server lets each client have 20 events/s while the
    producers publish far more, and keeps events for half a second. The fast consumers
    are paused, poll too slowly, and find events expired: the exit status says so."""
    options = ["--rate", "20", "--burst", "5", "--log-ttl", "0.5", "--lag-limit", "30"]
    options += ["--retry-ms", "200"]
    report_path = tmp_path / "report.json"
    with cli_server("serve", options, tmp_path / "server.txt") as server:
        result = run_loadgen(
            server.url,
            "--duration", "2", "--drain", "1", "--quiet-rate", "100", "--burst-rate", "100",
            "--consumers", "2", "--slow-share", "0", "--ack-share", "0",
            "--report-json", str(report_path),
        )  # fmt: skip
        samples = scrape(server.url)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED" in result.stdout
    report = json.loads(report_path.read_text())
    assert not report["verdict"]["ok"]
    assert len(report["verdict"]["problems"]) == 2
    fast = report["classes"]["fast"]
    assert fast["dropped"] + fast["behind"] > 0
    assert fast["delivered"] < fast["expected"]
    # The losses the consumers saw as gaps are losses the server announced and counted.
    assert fast["resets"] > 0
    assert sample(samples, "trio_stream_events_dropped_total") >= fast["dropped"] > 0


def test_loadgen_cannot_run_without_a_server() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        result = run_loadgen(url, "--duration", "1", timeout=30)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "cannot publish" in result.stderr


def test_loadgen_help_documents_every_option() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trio_stream", "loadgen", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    text = " ".join(result.stdout.split())
    for flag, *_ in OPTIONS:
        assert flag in text, flag
    for word in ("--quiet", "url", "Exit status", "default:"):
        assert word in text
    commands = next(action for action in _parser()._actions if action.dest == "command")
    loadgen = commands.choices["loadgen"]  # type: ignore[index]
    for action in loadgen._actions:
        assert action.help, action.dest
        assert len(action.help) > 10, action.dest


def test_consumer_plan_spreads_slow_modes_and_ack_mode() -> None:
    config = LoadgenConfig(url="http://127.0.0.1:1", consumers=8, slow_share=0.5, ack_share=0.25)
    assert _consumer_plan(config) == [
        ("fast", False), ("fast", False), ("fast", False), ("fast", True),
        ("slow-read", False), ("slow-read", True), ("slow-stall", False), ("slow-stop", False),
    ]  # fmt: skip
    only_fast = LoadgenConfig(url="http://127.0.0.1:1", consumers=3, slow_share=0, ack_share=0)
    assert _consumer_plan(only_fast) == [("fast", False)] * 3
    with pytest.raises(ValueError, match="topics must not exceed producers"):
        LoadgenConfig(url="http://127.0.0.1:1", topics=3, producers=2)


def test_latency_recorder_percentiles_are_within_two_percent() -> None:
    recorder = LatencyRecorder()
    values = [i / 1000 for i in range(1, 1001)]  # 1 ms .. 1 s
    for value in values:
        recorder.record(value)
    for q, exact in ((0.5, 0.5), (0.9, 0.9), (0.99, 0.99)):
        estimate = recorder.quantile(q)
        assert estimate is not None
        assert math.isclose(estimate, exact, rel_tol=0.02), (q, estimate)
    summary = recorder.summary()
    assert summary["count"] == 1000
    assert summary["min"] == 0.001
    assert summary["max"] == 1.0
    cdf = recorder.cdf()
    assert cdf[-1] == [1.0, 1.0]
    assert all(a[1] <= b[1] for a, b in itertools.pairwise(cdf))


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    histogram = {"buckets": [[0.1, 50.0], [0.2, 100.0], [math.inf, 100.0]], "count": 100}
    assert histogram_quantile(histogram, 0.5) == pytest.approx(0.1)
    assert histogram_quantile(histogram, 0.75) == pytest.approx(0.15)
    assert histogram_quantile({"buckets": [], "count": 0}, 0.5) is None


async def test_prometheus_alert_rules_use_only_metrics_the_server_exposes() -> None:
    """The example rule file names real families, with the suffixes of their types."""
    # (In the 0.0.4 text format a counter's TYPE line already ends in _total.)
    suffixes = {"histogram": ("_bucket", "_count", "_sum")}
    with trio.fail_after(10):
        async with open_server() as server, http_client(server) as client:
            await publish(client, "t", {"data": "x"})  # so per-topic families have a sample
            text = (await client.get("/metrics")).text
    exposed = {
        name + suffix
        for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE)
        for suffix in suffixes.get(kind, ("",))
    }
    used = set(re.findall(r"\btrio_stream_[a-z_]+", ALERT_RULES.read_text()))
    assert {
        "trio_stream_queue_saturation",
        "trio_stream_events_dropped_total",
        "trio_stream_retry_signals_total",
        "trio_stream_client_buffer_utilization_bucket",
    } <= used
    assert used <= exposed, used - exposed
