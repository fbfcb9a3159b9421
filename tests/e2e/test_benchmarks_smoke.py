"""The benchmark harness (issue 5) in its two-second smoke form, so that it cannot rot.

Runs ``python -m benchmarks --smoke`` for real (servers, load clients and publisher as
processes on 127.0.0.1) and checks that every measurement produced a sane JSON line.
No timing is asserted: the numbers depend on the machine and its load. The Redis variant
(a redis-server and two server processes) runs once, on fan-out only, to stay quick.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks._wire import ChunkedDecoder, SseTally, last_event_id, timestamps

from ._redis import redis_server_binary

ROOT = Path(__file__).resolve().parents[2]
WORKLOADS = {
    "sse_starlette": {
        "throughput",
        "fanout",
        "fanout_latency",
        "idle",
        "slow_baseline",
        "slow",
    },
}
WORKLOADS["trio_stream"] = WORKLOADS["sse_starlette"] | {
    "throughput_limited",
    "throughput_limited_ack",
}

pytestmark = pytest.mark.e2e


def run_smoke(tmp_path: Path, servers: str, *options: str) -> tuple[str, list[dict[str, Any]]]:
    argv = [sys.executable, "-m", "benchmarks", "--smoke", "--servers", servers, *options]
    proc = subprocess.run(
        [*argv, "--results-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=380,
        check=False,
    )
    files = list(tmp_path.glob("*.jsonl"))
    assert len(files) == 1, proc.stderr
    records = [json.loads(line) for line in files[0].read_text().splitlines()]
    failures = [(r["workload"], r["server"], r.get("error"), r.get("metrics")) for r in records]
    assert proc.returncode == 0, (proc.stderr[-3000:], failures)
    return proc.stdout, records


def check_records(records: list[dict[str, Any]], server: str) -> None:
    by_name = {(r["workload"], r["server"]): r["metrics"] for r in records}
    assert {w for w, s in by_name if s == server} == WORKLOADS[server]
    assert {w for w, s in by_name if s == "raw_writer"} == {"throughput", "fanout"}
    for record in records:
        assert record["ok"] is True
        assert record["smoke"] is True
        metrics = record["metrics"]
        assert metrics["streams_opened"] == record["params"]["streams"]
        assert metrics["window_seconds"] > 0
        assert metrics["server_cpu_frac"] >= 0
        assert metrics["problems"] == []
    for workload in ("throughput", "fanout"):
        for who in (server, "raw_writer"):
            assert by_name[workload, who]["events"] > 0
        assert by_name[workload, server]["published"] > 0
        assert by_name[workload, server]["server_cpu_us_per_event"] > 0
    for workload in ("fanout_latency", "slow_baseline", "slow"):
        metrics = by_name[workload, server]
        assert metrics["latency_samples"] > 0
        assert 0 < metrics["latency_p50_ms"] <= metrics["latency_p99_ms"]
        assert metrics["delivery_ratio"] > 0
    idle = by_name["idle", server]
    assert isinstance(idle["rss_per_conn_kb"], float | int)
    assert idle["streams_with_heartbeat"] > 0
    for workload in ("slow_baseline", "slow"):
        assert len(by_name[workload, server]["rss_series_kb"]) >= 2
        assert isinstance(by_name[workload, server]["rss_slope_mb_per_min"], float | int)
    if server == "trio_stream":
        assert by_name["throughput_limited_ack", server]["acks"] > 0


@pytest.mark.timeout(400)
def test_benchmarks_smoke_both_servers(tmp_path: Path) -> None:
    """One smoke run of every workload on both servers, side by side, as a real run does."""
    stdout, records = run_smoke(tmp_path, "trio_stream,sse_starlette")
    check_records(records, "trio_stream")
    check_records(records, "sse_starlette")
    assert "| workload | metric | trio_stream | sse-starlette | ratio | target |" in stdout


@pytest.mark.timeout(120)
def test_benchmarks_smoke_redis_two_processes(tmp_path: Path) -> None:
    """Fan-out on the Redis backend: two server processes, each serving half the streams,
    all events published to the first; both halves must receive events through Redis.

    Skipped without redis-server, except under ``CI=true``, where it fails.
    """
    redis_server_binary()
    stdout, records = run_smoke(tmp_path, "trio_stream_redis2", "--only", "fanout", "--no-raw")
    assert [(r["workload"], r["server"]) for r in records] == [("fanout", "trio_stream_redis2")]
    record = records[0]
    metrics = record["metrics"]
    assert record["ok"] is True
    assert metrics["problems"] == []
    assert metrics["streams_opened"] == record["params"]["streams"]
    assert metrics["published"] > 0
    assert metrics["server_processes"] == 2
    assert len(metrics["events_per_s_by_process"]) == 2
    assert all(rate > 0 for rate in metrics["events_per_s_by_process"])
    assert metrics["server_cpu_us_per_event"] > 0
    assert metrics["redis_cpu_frac"] >= 0
    assert "| memory, 1 process | Redis, 1 process | Redis, 2 processes |" in stdout


def test_benchmarks_wire_counts_whatever_the_split() -> None:
    """The load client's parsers give the same answers however the bytes are split."""
    events = [b"retry: 3000\n\n", b": heartbeat\n\n"]
    events += [b"id: e-%d\ndata: %.6f xxxx\n\n" % (i, 1000.5 + i) for i in range(4)]
    events += [b"event: pause\ndata: {}\n\n"]
    for sep in (b"\n", b"\r\n"):
        body = b"".join(events).replace(b"\n", sep)
        raw = b"".join(
            b"%x\r\n%s\r\n" % (len(e), e) for e in (x.replace(b"\n", sep) for x in events)
        )
        raw += b"0\r\n\r\nnext"
        for i in range(len(raw) + 1):
            decoder = ChunkedDecoder()
            assert decoder.feed(raw[:i]) + decoder.feed(raw[i:]) == body
            assert decoder.done
            assert decoder.leftover == b"next"
        for i in range(len(body) + 1):
            tally, times, ids = SseTally(), [], []
            for part in (body[:i], body[i:]):
                lines = tally.feed(part)
                times += timestamps(lines)
                ids.append(last_event_id(lines))
            assert (tally.events, tally.comments, tally.named) == (5, 1, 1)
            assert times == [1000.5 + k for k in range(4)]
            assert ids[-1] == b"e-3" or (ids[-1] is None and ids[0] == b"e-3")
