"""Benchmarks of issue 5: trio_stream against sse-starlette on uvicorn, side by side.

    python -m benchmarks [--smoke] [--runs 3] [--only throughput,fanout,idle,slow]
                         [--servers trio_stream,sse_starlette,trio_stream_redis1,...]

Each selected workload runs on each server in turn, ``--runs`` times (a fresh server
process every time); every measurement is appended to ``benchmarks/results/<time>.jsonl``
as it completes, and a Markdown table of medians and ratios is printed at the end. The
fan-out workloads also run on trio_stream's Redis backend, with one and with two server
processes (``trio_stream_redis1``, ``trio_stream_redis2``), in a second table beside the
memory backend. The exit status is 1 if any measurement failed or saw a problem.
"""

from __future__ import annotations

import argparse
import datetime
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

from ._harness import (
    ALL_SERVERS,
    OTHER_LOAD_WARNING,
    RAW,
    REDIS_SERVERS,
    SERVERS,
    redis_server_binary,
    run_case,
    wait_for_quiet,
    workloads,
)

GROUPS = ("throughput", "fanout", "idle", "slow")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--smoke", action="store_true", help="tiny and quick (CI)")
    parser.add_argument("--runs", type=int, help="runs per measurement (default 3, smoke 1)")
    parser.add_argument("--only", default=",".join(GROUPS), help="workloads, comma-separated")
    parser.add_argument(
        "--servers",
        help="servers, comma-separated (default: all; the Redis ones only with redis-server)",
    )
    parser.add_argument("--no-raw", action="store_true", help="skip the load-client check")
    parser.add_argument(
        "--client-procs", type=int, default=1, help="load clients for ≥1000 streams"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        help="before each measurement, wait up to this many seconds for other processes to "
        "use < 0.3 cores (default 30, smoke 0)",
    )
    parser.add_argument("--results-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    have_redis = redis_server_binary() is not None
    if args.servers is None:
        args.servers = ",".join(ALL_SERVERS if have_redis else SERVERS)
        if not have_redis:
            print(
                "redis-server not found: the Redis variants are left out "
                "(./.ci/system-deps installs it)",
                file=sys.stderr,
            )
    for option, allowed in (("only", GROUPS), ("servers", ALL_SERVERS)):
        chosen = [x for x in getattr(args, option).split(",") if x]
        if not chosen or set(chosen) - set(allowed):
            parser.error(f"--{option}: choose from {', '.join(allowed)}")
        setattr(args, option, chosen)
    if set(args.servers) & set(REDIS_SERVERS) and not have_redis:
        parser.error("the Redis variants need redis-server (./.ci/system-deps installs it)")
    if args.runs is None:
        args.runs = 1 if args.smoke else 3
    if args.quiet_wait is None:
        args.quiet_wait = 0.0 if args.smoke else 30.0
    return args


def _terminate(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    selected = [w for w in workloads(args.smoke, args.client_procs) if w.group in args.only]
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"{datetime.datetime.now():%Y%m%d-%H%M%S}.jsonl"
    records: list[dict[str, Any]] = []
    connect_timeout = 20.0 if args.smoke else 90.0
    with tempfile.TemporaryDirectory(prefix="bench-") as logdir, path.open("w") as out:
        for run in range(args.runs):
            for workload in selected:
                servers = [s for s in args.servers if s in workload.servers]
                if workload.raw_check and not args.no_raw:
                    servers.append(RAW)
                for server in servers:
                    print(
                        f"run {run + 1}/{args.runs}: {workload.name} on {server}", file=sys.stderr
                    )
                    record: dict[str, Any] = {
                        "time": datetime.datetime.now().isoformat(timespec="seconds"),
                        "run": run,
                        "workload": workload.name,
                        "group": workload.group,
                        "server": server,
                        "smoke": args.smoke,
                        "params": {
                            "streams": workload.streams,
                            "slow": workload.slow,
                            "ack": workload.ack,
                            "publisher": workload.publisher,
                            "batch": workload.batch,
                            "window": workload.window,
                            "rate": workload.rate,
                            "size": workload.size,
                            "duration": workload.duration,
                            "client_procs": workload.client_procs,
                        },
                    }
                    if args.quiet_wait:
                        load = wait_for_quiet(args.quiet_wait)
                        record["load_before"] = round(load, 2)
                    started = time.monotonic()
                    try:
                        metrics = run_case(workload, server, Path(logdir), connect_timeout)
                    except Exception as exc:
                        record.update(ok=False, error=f"{type(exc).__name__}: {exc}"[-4000:])
                        print(f"  failed: {record['error']}", file=sys.stderr)
                    else:
                        record.update(ok=not metrics["problems"], error=None, metrics=metrics)
                        for problem in metrics["problems"]:
                            print(f"  problem: {problem}", file=sys.stderr)
                        for warning in metrics["warnings"]:
                            print(f"  warning: {warning}", file=sys.stderr)
                    record["elapsed_s"] = round(time.monotonic() - started, 1)
                    out.write(json.dumps(record) + "\n")
                    out.flush()
                    records.append(record)
    print(table(records))
    if any(r["server"] in REDIS_SERVERS for r in records):
        print("\n" + backend_table(records))
    print(f"\nresults: {path}")
    return 0 if all(r["ok"] for r in records) else 1


# --- the table ---


def medians(records: list[dict[str, Any]]) -> dict[tuple[str, str, str], float]:
    """Median of every numeric metric over the successful runs, by (workload, server, metric)."""
    values: dict[tuple[str, str, str], list[float]] = {}
    for record in records:
        if not record["ok"]:
            continue
        for metric, value in record["metrics"].items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                key = (record["workload"], record["server"], metric)
                values.setdefault(key, []).append(value)
    return {key: statistics.median(vs) for key, vs in values.items()}


def fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def table(records: list[dict[str, Any]]) -> str:
    m = medians(records)
    params = {r["workload"]: r["params"] for r in records}

    def get(workload: str, server: str, metric: str) -> float | None:
        return m.get((workload, server, metric))

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}x" if a is not None and b else "—"

    streams = {w: p["streams"] for w, p in params.items()}
    slow = params.get("slow", {}).get("slow", 0)
    rate = params.get("fanout_latency", {}).get("rate", 0)
    compared = [  # workload, metric label, metric, target, show the ratio
        ("throughput", "events/s", "events_per_s", "≥ 2.0x", True),
        ("throughput", "server CPU µs/event", "server_cpu_us_per_event", "", True),
        ("throughput", "load client CPU, cores", "client_cpu_frac", "< 0.9 each", False),
        ("fanout", "deliveries/s", "events_per_s", "≥ 2.0x", True),
        ("fanout", "server CPU µs/delivery", "server_cpu_us_per_event", "", True),
        ("fanout", "load client CPU, cores", "client_cpu_frac", "< 0.9 each", False),
        ("fanout_latency", "p50 latency ms", "latency_p50_ms", "", True),
        ("fanout_latency", "p99 latency ms", "latency_p99_ms", "≤ 1.0x", True),
        ("idle", "server RSS KB/connection", "rss_per_conn_kb", "≤ 0.7x", True),
        ("slow_baseline", "fast clients' p99 ms, no slow client", "latency_p99_ms", "", True),
        ("slow", f"fast clients' p99 ms, {slow} slow", "latency_p99_ms", "", True),
        (
            "slow_baseline",
            "server RSS growth MB/min, no slow client",
            "rss_slope_mb_per_min",
            "",
            False,
        ),
        ("slow", f"server RSS growth MB/min, {slow} slow", "rss_slope_mb_per_min", "flat", False),
    ]
    labels = {
        "throughput": "throughput, 1 stream",
        "fanout": f"fan-out, {streams.get('fanout')} streams",
        "fanout_latency": f"fan-out at {fmt(rate)} events/s",
        "idle": f"idle, {streams.get('idle')} streams",
        "slow_baseline": f"slow consumers, {streams.get('slow')} streams",
        "slow": f"slow consumers, {streams.get('slow')} streams",
    }
    lines = [
        "| workload | metric | trio_stream | sse-starlette | ratio | target |",
        "|---|---|---|---|---|---|",
    ]
    for workload, label, metric, target, show_ratio in compared:
        if workload not in params:
            continue
        ours, theirs = get(workload, "trio_stream", metric), get(workload, "sse_starlette", metric)
        shown = ratio(ours, theirs) if show_ratio else ""
        row = [labels[workload], label, fmt(ours), fmt(theirs), shown, target]
        lines.append("| " + " | ".join(row) + " |")
    if "slow" in params and "slow_baseline" in params:
        cells = [
            ratio(get("slow", s, "latency_p99_ms"), get("slow_baseline", s, "latency_p99_ms"))
            for s in SERVERS
        ]
        label = "fast p99 with slow / without"
        lines.append(f"| {labels['slow']} | {label} | {cells[0]} | {cells[1]} | | ≤ 1.2x |")
    plain = get("throughput", "trio_stream", "events_per_s")
    for workload, label in (
        ("throughput_limited", "events/s, global + client buckets"),
        ("throughput_limited_ack", "events/s, buckets + ack=64"),
    ):
        value = get(workload, "trio_stream", "events_per_s")
        if workload in params:
            cost = f"cost {1 - value / plain:.0%}" if value is not None and plain else "—"
            lines.append(f"| throughput, 1 stream | {label} | {fmt(value)} | | {cost} | < 15 % |")
    for workload, label in (("throughput", "events/s"), ("fanout", "deliveries/s")):
        raw = get(workload, RAW, "events_per_s")
        if raw is None:
            continue
        fastest = max(
            (v for s in SERVERS if (v := get(workload, s, "events_per_s")) is not None),
            default=None,
        )
        headroom = f"{raw / fastest:.1f}x fastest" if fastest else "—"
        client = fmt(get(workload, RAW, "client_cpu_frac"))
        lines.append(
            f"| load-client check: raw writer → {labels[workload].split(', ')[1]} | "
            f"{label} (client CPU {client} cores) | {fmt(raw)} | | {headroom} | ≥ 3x |"
        )
    failed = [r for r in records if not r["ok"]]
    runs = len({r["run"] for r in records})
    loads = [r["metrics"]["other_cpu_frac"] for r in records if r["ok"]]
    loaded = [x for x in loads if x > OTHER_LOAD_WARNING]
    lines.append("")
    lines.append(f"Medians of {runs} run(s); {len(failed)} measurement(s) failed or had problems.")
    if loaded:
        lines.append(
            f"{len(loaded)} of {len(loads)} measurements shared the machine with other work "
            f"(up to {max(loaded):.2f} cores used by other processes): treat them with care."
        )
    return "\n".join(lines)


def backend_table(records: list[dict[str, Any]]) -> str:
    """trio_stream's fan-out on the memory backend against Redis, one and two processes."""
    m = medians(records)
    params = {r["workload"]: r["params"] for r in records}
    columns = ("trio_stream", *REDIS_SERVERS)
    rows = [  # workload, metric label, metric
        ("fanout", "deliveries/s", "events_per_s"),
        ("fanout", "trio-stream CPU µs/delivery, all processes", "server_cpu_us_per_event"),
        ("fanout", "trio-stream CPU, cores, all processes", "server_cpu_frac"),
        ("fanout", "redis-server CPU, cores", "redis_cpu_frac"),
        ("fanout", "load client CPU, cores", "client_cpu_frac"),
        ("fanout_latency", "p50 latency ms", "latency_p50_ms"),
        ("fanout_latency", "p99 latency ms", "latency_p99_ms"),
    ]
    lines = [
        "| workload | metric | memory, 1 process | Redis, 1 process | Redis, 2 processes "
        "| 2 processes / memory |",
        "|---|---|---|---|---|---|",
    ]
    for workload, label, metric in rows:
        if workload not in params:
            continue
        streams = params[workload]["streams"]
        name = (
            f"fan-out, {streams} streams"
            if workload == "fanout"
            else f"fan-out at {fmt(params[workload]['rate'])} events/s"
        )
        values = [m.get((workload, server, metric)) for server in columns]
        memory, two = values[0], values[-1]
        shown = f"{two / memory:.2f}x" if two is not None and memory else ""
        if metric == "redis_cpu_frac":
            shown = ""
        lines.append(f"| {name} | {label} | " + " | ".join(map(fmt, values)) + f" | {shown} |")
    lines.append("")
    lines.append(
        "Redis: one redis-server for the measurement; with 2 processes the streams are split "
        "evenly between them and the publisher posts to the first."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; all benchmark processes were stopped", file=sys.stderr)
        sys.exit(130)
