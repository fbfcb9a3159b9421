"""Running one workload against one server: processes, schedule, measurements.

Every process (server, load clients, publisher) is started in its own session with
RLIMIT_NOFILE raised and a parent-death signal, tracked in an ``ExitStack`` and ended by
its own process group id whatever happens (error, timeout, Ctrl-C). Agents are driven by
the protocol of ``benchmarks._wire``: all of them get the same wall-clock schedule, and
the harness samples the server's CPU time and RSS from ``/proc`` at the window's edges.

The Redis variants (``trio_stream_redis1``, ``trio_stream_redis2``) start their own
redis-server (a free loopback port, a temporary directory, no persistence) and one or two
``trio-stream serve --backend redis://…`` processes; the streams are split evenly between
the processes, the publisher publishes to the first, and the server figures add up the
processes (Redis's own CPU is reported apart).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from ._wire import Histogram, raise_nofile_limit

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ("trio_stream", "sse_starlette")
# trio_stream on the Redis backend: server name -> `trio-stream serve` processes, all
# sharing one redis-server started for the measurement.
REDIS_SERVERS = {"trio_stream_redis1": 1, "trio_stream_redis2": 2}
ALL_SERVERS = (*SERVERS, *REDIS_SERVERS)
RAW = "raw_writer"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1
COALESCE_MS = 1.0  # the load client's minimum gap between receives on a stream (no latency)
OTHER_LOAD_WARNING = 0.25  # cores used by other processes that make a measurement suspect

# Limits high enough never to bind (issue 5). The log keeps 2 s of events: the publisher
# runs at most `window` events ahead, far less than that, and the log never fills with
# unexpired events (which would make publishing answer 429 by design).
TRIO_STREAM_OPTIONS = {
    "--rate": "1000000",
    "--burst": "100000",
    "--lag-limit": "1000000",
    "--log-capacity": "2000000",
    "--log-ttl": "2",
    "--log-max-bytes": str(1 << 30),
    "--max-connections": "20000",
    "--max-streams-per-client": "100000",
}
# The slow-consumer workload runs trio_stream with its contract defaults for the log and
# the lag limit (only the rates stay high), except a 5 s TTL: at 50 events/s of 8 KB the
# log then reaches its bound (2 MB) during the warm-up, and the window shows whether
# memory stays bounded, not a log still filling up to its default 30 s.
TRIO_STREAM_SLOW = {
    "--lag-limit": "1000",
    "--log-capacity": "10000",
    "--log-ttl": "5",
    "--log-max-bytes": str(16 << 20),
}
TRIO_STREAM_LIMITS = {"--global-rate": "1000000", "--global-burst": "100000"}


@dataclass(frozen=True)
class Workload:
    """One measured configuration; ``group`` is what ``--only`` selects."""

    name: str
    group: str
    streams: int
    publisher: str = "none"  # "fast", "rate" or "none"
    batch: int = 1
    window: int = 0
    conns: int = 2
    rate: float = 0.0
    size: int = 100
    warmup: float = 1.0
    duration: float = 10.0
    slow: int = 0
    ack: int = 0
    latency: bool = False
    heartbeat: float = 15.0
    rss_interval: float = 0.0  # > 0: sample the server's RSS through the window
    client_procs: int = 1
    servers: tuple[str, ...] = SERVERS
    raw_check: bool = False  # also measure the load client against the raw writer
    trio_options: dict[str, str] = field(default_factory=dict)


def workloads(smoke: bool, client_procs: int) -> list[Workload]:
    """The issue's workloads, or tiny versions of them (about 2 s each) for CI."""
    s = smoke
    many = 50 if s else 1000
    throughput = Workload(
        name="throughput",
        group="throughput",
        streams=1,
        publisher="fast",
        batch=200 if s else 1000,
        window=5_000 if s else 20_000,
        warmup=0.3 if s else 1.0,
        duration=1.5 if s else 10.0,
        raw_check=True,
    )
    fanout = Workload(
        name="fanout",
        group="fanout",
        servers=ALL_SERVERS,
        streams=many,
        publisher="fast",
        batch=10,
        window=300,
        warmup=0.3 if s else 1.0,
        duration=1.5 if s else 10.0,
        client_procs=client_procs,
        raw_check=True,
    )
    # Events of 8 KB at 50/s: a stalled reader's socket buffers (the server's send buffer
    # grows to tcp_wmem's 4 MB here) are full after the 10 s warm-up, so what the window
    # shows is the server's own memory, not the kernel's.
    slow = Workload(
        name="slow_baseline",
        group="slow",
        streams=20 if s else 100,
        publisher="rate",
        rate=50,
        size=8000,
        latency=True,
        warmup=0.3 if s else 10.0,
        duration=2.0 if s else 20.0,
        rss_interval=0.25 if s else 1.0,
        trio_options=TRIO_STREAM_SLOW,
    )
    return [
        throughput,
        replace(
            throughput,
            name="throughput_limited",
            servers=("trio_stream",),
            raw_check=False,
            trio_options=TRIO_STREAM_LIMITS,
        ),
        replace(
            throughput,
            name="throughput_limited_ack",
            servers=("trio_stream",),
            raw_check=False,
            ack=64,
            trio_options=TRIO_STREAM_LIMITS,
        ),
        fanout,
        replace(
            fanout,
            name="fanout_latency",
            publisher="rate",
            rate=5,
            latency=True,
            raw_check=False,
            # The smoke runs the Redis variants once (fan-out), to stay within seconds.
            servers=SERVERS if s else ALL_SERVERS,
        ),
        Workload(
            name="idle",
            group="idle",
            streams=200 if s else 5000,
            heartbeat=0.5 if s else 2.0,
            warmup=0.5 if s else 3.0,
            duration=1.0 if s else 3.0,
            client_procs=client_procs,
        ),
        slow,
        replace(slow, name="slow", slow=2 if s else 10),
    ]


# --- processes ---


def _child_setup() -> None:
    """In the child before exec: more file descriptors; die with the harness."""
    raise_nofile_limit()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Process:
    """A child in its own session; ``stop()`` ends its process group, politely first."""

    def __init__(self, name: str, argv: list[str], logdir: Path, *, pipes: bool = False) -> None:
        self.name = name
        self.log_path = logdir / f"{name}-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        self._buf = b""
        pipe = subprocess.PIPE if pipes else subprocess.DEVNULL
        self.popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdin=pipe,
            stdout=subprocess.PIPE if pipes else self._log,
            stderr=self._log,
            preexec_fn=_child_setup,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, size: int = 1500) -> str:
        self._log.flush()
        data = self.log_path.read_bytes()[-size:]
        return data.decode("utf-8", "replace")

    def send(self, message: dict[str, Any]) -> None:
        stdin: IO[bytes] | None = self.popen.stdin
        assert stdin is not None
        stdin.write(json.dumps(message).encode() + b"\n")
        stdin.flush()

    def receive(self, deadline: float) -> dict[str, Any]:
        """The next JSON line from the agent's stdout, by ``deadline`` (time.monotonic)."""
        stdout = self.popen.stdout
        assert stdout is not None
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name}: no answer in time\n{self.log_tail()}")
            ready, _, _ = select.select([stdout], [], [], remaining)
            if ready:
                data = os.read(stdout.fileno(), 1 << 20)
                if not data:
                    raise RuntimeError(
                        f"{self.name} exited ({self.popen.wait()}):\n{self.log_tail()}"
                    )
                self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        message: dict[str, Any] = json.loads(line)
        return message

    def stop(self, grace: float = 3.0) -> None:
        try:
            if self.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(grace)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)  # anything the child left behind
            self.popen.wait(5)
        finally:
            for pipe in (self.popen.stdin, self.popen.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
            self._log.close()


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 now (all held at once while chosen)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def redis_server_binary() -> str | None:
    """The path of redis-server, or ``None`` (``./.ci/system-deps`` installs it)."""
    found = shutil.which("redis-server")
    if found is None and os.access("/usr/bin/redis-server", os.X_OK):
        found = "/usr/bin/redis-server"
    return found


def redis_command(port: int, directory: Path) -> list[str]:
    """A redis-server on 127.0.0.1:``port`` that keeps nothing on disk."""
    binary = redis_server_binary()
    if binary is None:
        raise RuntimeError("redis-server is not installed (./.ci/system-deps installs it)")
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)]
    return [*argv, "--save", "", "--appendonly", "no"]


def wait_redis(redis: Process, port: int, timeout: float) -> None:
    """Return once the redis-server answers PING."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if redis.popen.poll() is not None:
            raise RuntimeError(f"redis-server exited:\n{redis.log_tail()}")
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock,
        ):
            sock.sendall(b"PING\r\n")
            if sock.recv(64).startswith(b"+PONG"):
                return
        time.sleep(0.05)
    raise TimeoutError(f"redis-server not answering after {timeout} s\n{redis.log_tail()}")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_cpu_seconds() -> float:
    """CPU time spent busy by the whole machine (all cores) so far, from /proc/stat."""
    with open("/proc/stat") as file:
        fields = [int(x) for x in file.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


def wait_for_quiet(max_wait: float, threshold: float = 0.3) -> float:
    """Wait (up to ``max_wait`` s) for a second in which other processes use < ``threshold``
    cores; return the last second's load."""
    deadline = time.monotonic() + max_wait
    while True:
        before = machine_cpu_seconds()
        time.sleep(1.0)
        load = machine_cpu_seconds() - before
        if load < threshold or time.monotonic() >= deadline:
            return load


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def http_get(port: int, path: str, timeout: float = 2.0) -> bytes:
    """Send a GET and return what arrives first (enough for a status line)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Client-ID: warmup\r\n\r\n".encode()
        )
        return sock.recv(65536)


def wait_healthy(server: Process, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.popen.poll() is not None:
            raise RuntimeError(f"{server.name} exited:\n{server.log_tail()}")
        with contextlib.suppress(OSError):
            if http_get(port, "/healthz", 1.0).startswith(b"HTTP/1.1 200"):
                return
        time.sleep(0.1)
    raise TimeoutError(f"{server.name} not healthy after {timeout} s\n{server.log_tail()}")


def trio_stream_command() -> list[str]:
    """``trio-stream`` from this environment; ``BENCH_TRIO_STREAM`` (a command line) overrides."""
    if override := os.environ.get("BENCH_TRIO_STREAM"):
        return shlex.split(override)
    script = Path(sys.executable).parent / "trio-stream"
    if script.exists():
        return [str(script)]
    found = shutil.which("trio-stream")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from trio_stream._cli import main; sys.exit(main())"]


def server_command(
    server: str, port: int, workload: Workload, *, backend: str | None = None
) -> list[str]:
    where = ["--host", "127.0.0.1", "--port", str(port)]
    if server == "trio_stream" or server in REDIS_SERVERS:
        options = {**TRIO_STREAM_OPTIONS, "--heartbeat": str(workload.heartbeat)}
        options.update(workload.trio_options)
        if backend is not None:
            options["--backend"] = backend
        return [*trio_stream_command(), "serve", *where, *(x for kv in options.items() for x in kv)]
    if server == "sse_starlette":
        module = ["-m", "benchmarks.reference_starlette", "--heartbeat", str(workload.heartbeat)]
        return [sys.executable, *module, *where]
    if server == RAW:
        module = ["-m", "benchmarks.raw_writer", "--streams", str(workload.streams)]
        return [sys.executable, *module, "--size", str(workload.size), *where]
    raise ValueError(f"unknown server {server!r}")


# --- one measurement ---


def client_commands(
    workload: Workload, ports: list[int], shm: str, timeout: float
) -> list[list[str]]:
    """The load-client processes' command lines: streams (and slow ones) split evenly.

    With several ``ports`` (server processes), each client spreads its streams over them.
    """
    port = ",".join(map(str, ports))
    commands = []
    per_proc = -(-workload.streams // workload.client_procs)
    slow_left = workload.slow
    for i in range(workload.client_procs):
        streams = min(per_proc, workload.streams - i * per_proc)
        slow = min(slow_left, streams)
        slow_left -= slow
        argv = [sys.executable, "-m", "benchmarks.loadclient", "--port", str(port)]
        argv += ["--streams", str(streams), "--slow", str(slow), "--ack", str(workload.ack)]
        argv += ["--client-prefix", f"p{i}-", "--connect-timeout", str(timeout)]
        # Latency and ack runs read at once (a wait would delay the answer the server
        # waits for); the others let small pieces gather for up to 1 ms.
        if workload.latency:
            argv += ["--latency"]
        elif not workload.ack:
            argv += ["--coalesce-ms", str(COALESCE_MS)]
        argv += ["--shm", shm, "--slot", str(i)] if shm else []
        commands.append(argv)
    return commands


def publisher_command(workload: Workload, port: int, shm: str) -> list[str]:
    argv = [sys.executable, "-m", "benchmarks.publisher", "--port", str(port)]
    argv += ["--mode", workload.publisher, "--batch", str(workload.batch)]
    argv += ["--window", str(workload.window), "--conns", str(workload.conns)]
    argv += ["--rate", str(workload.rate), "--size", str(workload.size)]
    return argv + (["--shm", shm] if shm else [])


def run_case(
    workload: Workload, server: str, logdir: Path, connect_timeout: float
) -> dict[str, Any]:
    """Run ``workload`` once against a fresh ``server``; return the metrics.

    Every process started here is stopped before this returns or raises.
    """
    with contextlib.ExitStack() as stack:

        def start(name: str, argv: list[str], *, pipes: bool = False) -> Process:
            process = Process(name, argv, logdir, pipes=pipes)
            stack.callback(process.stop)
            return process

        processes = REDIS_SERVERS.get(server, 1)
        *ports, redis_port = free_ports(processes + 1)
        watched: list[Process] = []  # whose logs an error shows
        try:
            redis: Process | None = None
            backend: str | None = None
            if server in REDIS_SERVERS:
                directory = Path(tempfile.mkdtemp(prefix="redis-", dir=logdir))
                redis = start("redis-server", redis_command(redis_port, directory))
                watched.append(redis)
                wait_redis(redis, redis_port, 10.0)
                backend = f"redis://127.0.0.1:{redis_port}/0"
            srvs = []
            for i, port in enumerate(ports):
                argv = server_command(server, port, workload, backend=backend)
                srvs.append(start(server if processes == 1 else f"{server}-{i}", argv))
            watched[:0] = srvs
            for srv, port in zip(srvs, ports, strict=True):
                wait_healthy(srv, port, 30.0)
                if server != RAW:  # touch the stream path once before measuring
                    with contextlib.suppress(OSError):
                        http_get(port, "/streams/warmup")
            time.sleep(0.2)
            rss_before = sum(rss_kb(srv.pid) for srv in srvs)

            shm = ""
            if workload.publisher == "fast":  # the clients' flow-control slots
                fd, shm = tempfile.mkstemp(prefix="slots-", dir=logdir)
                os.write(fd, bytes(8 * workload.client_procs))
                os.close(fd)
            commands = client_commands(workload, ports, shm, connect_timeout)
            clients = [start(f"client{i}", argv, pipes=True) for i, argv in enumerate(commands)]
            ready_by = time.monotonic() + connect_timeout + 15
            readies = [client.receive(ready_by) for client in clients]
            publishers = []
            if workload.publisher != "none" and server != RAW:
                # With several processes, all publishing goes to the first.
                argv = publisher_command(workload, ports[0], shm)
                publishers.append(start("publisher", argv, pipes=True))
                publishers[0].receive(time.monotonic() + 15)
            pids = [srv.pid for srv in srvs]
            redis_pid = None if redis is None else redis.pid
            return measure(workload, pids, redis_pid, clients, publishers, readies, rss_before)
        except Exception as exc:
            logs = "".join(f"\n--- {p.name} log:\n{p.log_tail(1000)}" for p in watched)
            raise RuntimeError(f"{exc}{logs}") from exc
    raise AssertionError("unreachable")  # for mypy: an ExitStack may swallow exceptions


def measure(
    workload: Workload,
    pids: list[int],
    redis_pid: int | None,
    clients: list[Process],
    publishers: list[Process],
    readies: list[dict[str, Any]],
    rss_before: int,
) -> dict[str, Any]:
    """Send the schedule to the agents, sample the server, collect the reports.

    The server's CPU time and RSS are the sums over its processes (``pids``); Redis's
    CPU time (``redis_pid``) is measured apart.
    """

    def server_cpu() -> float:
        return sum(cpu_seconds(pid) for pid in pids)

    def redis_cpu() -> float:
        return 0.0 if redis_pid is None else cpu_seconds(redis_pid)

    def rss() -> int:
        return sum(rss_kb(pid) for pid in pids)

    start_at = time.time() + 0.3
    window_start = start_at + workload.warmup
    window_end = window_start + workload.duration
    schedule = {
        "start_at": start_at,
        "window_start": window_start,
        "window_end": window_end,
        "stop_at": window_end + 0.1,
    }
    for agent in clients + publishers:
        agent.send(schedule)

    time.sleep(max(0.0, window_start - time.time()))
    cpu0, redis0, machine0, t0 = server_cpu(), redis_cpu(), machine_cpu_seconds(), time.time()
    series = [(0.0, rss())]
    while workload.rss_interval and time.time() + workload.rss_interval < window_end:
        time.sleep(workload.rss_interval)
        series.append((round(time.time() - t0, 3), rss()))
    time.sleep(max(0.0, window_end - time.time()))
    cpu1, redis1, machine1, t1 = server_cpu(), redis_cpu(), machine_cpu_seconds(), time.time()
    series.append((round(t1 - t0, 3), rss()))

    done_by = time.monotonic() + 30
    return summarize(
        workload,
        readies,
        [client.receive(done_by) for client in clients],
        [publisher.receive(done_by) for publisher in publishers],
        server_cpu=cpu1 - cpu0,
        redis_cpu=None if redis_pid is None else redis1 - redis0,
        server_processes=len(pids),
        machine_cpu=machine1 - machine0,
        seconds=t1 - t0,
        rss_before=rss_before,
        rss_series=series,
    )


def summarize(
    workload: Workload,
    readies: list[dict[str, Any]],
    results: list[dict[str, Any]],
    published: list[dict[str, Any]],
    *,
    server_cpu: float,
    redis_cpu: float | None,
    server_processes: int,
    machine_cpu: float,
    seconds: float,
    rss_before: int,
    rss_series: list[tuple[float, int]],
) -> dict[str, Any]:
    """Metrics from the agents' reports and the server samples.

    ``problems`` make the measurement invalid; ``warnings`` only qualify it.
    """
    problems: list[str] = []
    warnings: list[str] = []
    opened = sum(r["opened"] for r in results)
    if opened < workload.streams:
        errors: dict[str, int] = {}
        for r in readies:
            for key, n in r["errors"].items():
                errors[key] = errors.get(key, 0) + n
        problems.append(f"{workload.streams - opened} streams did not open: {errors}")
    closed = sum(r["closed_early"] for r in results)
    if closed:
        problems.append(f"{closed} reading streams closed early")
    events = sum(r["window_events"] for r in results)
    window = statistics.mean(r["window_seconds"] for r in results)
    metrics: dict[str, Any] = {
        "streams_opened": opened,
        "window_seconds": round(window, 3),
        "events": events,
        "events_per_s": round(events / window, 1),
        "server_cpu_frac": round(server_cpu / seconds, 3),
        "client_cpu_frac": round(sum(r["cpu_seconds"] for r in results) / window, 3),
        "named_events": sum(r["named_events"] for r in results),
    }
    if events:
        metrics["server_cpu_us_per_event"] = round(server_cpu / events * 1e6, 2)
    if server_processes > 1:
        metrics["server_processes"] = server_processes
        columns = zip(*(r["window_events_by_port"] for r in results), strict=True)
        metrics["events_per_s_by_process"] = [round(sum(c) / window, 1) for c in columns]
    if redis_cpu is not None:
        metrics["redis_cpu_frac"] = round(redis_cpu / seconds, 3)
        if events:
            metrics["redis_cpu_us_per_event"] = round(redis_cpu / events * 1e6, 2)
    if workload.ack:
        metrics["acks"] = sum(r["acks"] for r in results)
        metrics["ack_reconnects"] = sum(r["ack_reconnects"] for r in results)
        if metrics["ack_reconnects"]:
            warnings.append(f"ack connections reconnected {metrics['ack_reconnects']} times")
    ours = server_cpu + (redis_cpu or 0.0) + sum(r["cpu_seconds"] for r in results + published)
    metrics["other_cpu_frac"] = round(max(0.0, machine_cpu - ours) / seconds, 3)
    if metrics["other_cpu_frac"] > OTHER_LOAD_WARNING:
        warnings.append(
            f"other processes used {metrics['other_cpu_frac']:.2f} cores during the window"
        )
    for report in published:
        metrics["published"] = report["published"]
        metrics["publish_posts"] = report["posts"]
        metrics["publish_rejected"] = report["rejected"]
        metrics["publish_reconnects"] = report["reconnects"]
        metrics["publisher_cpu_frac"] = round(report["cpu_seconds"] / window, 3)
        if report["errors"]:
            problems.append(f"publisher errors: {report['errors']}")
        if report["reconnects"]:
            warnings.append(f"the publisher reconnected {report['reconnects']} times")
    if workload.publisher == "rate":
        reading = workload.streams - workload.slow
        expected = workload.rate * window * reading
        metrics["delivery_ratio"] = round(events / expected, 3) if expected else None
    if workload.latency:
        histogram = Histogram()
        for r in results:
            histogram.merge(Histogram.from_json(r["latency"]))
        metrics["latency_samples"] = histogram.total
        for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
            value = histogram.quantile(q)
            metrics[f"latency_{name}_ms"] = None if value is None else round(value * 1e3, 3)
    rss_end = rss_series[-1][1]
    metrics["rss_before_kb"] = rss_before
    metrics["rss_end_kb"] = rss_end
    if workload.group == "idle":
        metrics["rss_per_conn_kb"] = round((rss_end - rss_before) / max(opened, 1), 2)
        with_heartbeat = sum(r["streams_with_comments"] for r in results)
        metrics["streams_with_heartbeat"] = with_heartbeat
        if not with_heartbeat:
            problems.append("no stream saw a heartbeat")
        elif with_heartbeat < opened:
            warnings.append(f"only {with_heartbeat} of {opened} streams saw a heartbeat")
    if workload.rss_interval:
        metrics["rss_series_kb"] = rss_series
        metrics["rss_growth_mb"] = round((rss_end - rss_series[0][1]) / 1024, 2)
        metrics["rss_slope_mb_per_min"] = round(_slope(rss_series) * 60 / 1024, 2)
    metrics["problems"] = problems
    metrics["warnings"] = warnings
    return metrics


def _slope(series: list[tuple[float, int]]) -> float:
    """Least-squares slope of (seconds, KB) points, in KB/s."""
    if len(series) < 2:
        return 0.0
    xs = [float(x) for x, _ in series]
    ys = [float(y) for _, y in series]
    return statistics.linear_regression(xs, ys).slope
