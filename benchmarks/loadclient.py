"""The load client: many SSE streams on raw trio sockets, counted cheaply.

Started by the harness as ``python -m benchmarks.loadclient --port P --streams N ...``; it
speaks the agent protocol of ``benchmarks._wire`` (ready line, schedule, result line).

Each stream is one ``GET /streams/{topic}`` with its own client id, a hand-written
HTTP/1.1 request, a chunked-body decoder and an ``SseTally`` that counts events with
``bytes.count``. With ``--latency`` the publication time embedded in each event's data
is read and ``time.time() - t`` recorded, for the events received inside the
measurement window. ``--slow K`` makes the first K streams stop reading after the
response head (with a small receive buffer, so the kernel does not hide the backlog).
With ``--ack N`` each stream asks for ``?ack=N`` and acknowledges over a second
keep-alive connection once half a window is unacknowledged. With ``--shm`` the minimum
event count over the process's reading streams is published in a shared slot every
10 ms; the publisher uses it to stay a bounded number of events ahead. With
``--coalesce-ms M`` a stream receives at most once every M ms: a trio wake-up per receive
is most of the client's cost, and on 2 cores the client's CPU is taken from the server.
With ``--port P1,P2,...`` (server processes sharing a backend) stream i connects to the
(i mod n)-th port, and the events are also counted per port.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from collections import Counter

import trio

from ._wire import (
    RECEIVE_SIZE,
    ChunkedDecoder,
    Histogram,
    KeepAlive,
    SseTally,
    WireError,
    cpu_seconds,
    emit,
    last_event_id,
    raise_nofile_limit,
    read_head,
    shared_slots,
    timestamps,
    trio_deadline,
    wait_schedule,
)

SLOW_RCVBUF = 4096
COALESCE_BELOW = 16 * 1024  # bytes: a receive this small may wait for more (--coalesce-ms)
NOT_READING = 1 << 60


class Shared:
    """What all the streams of this process add to."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.events = 0
        self.events_by_port = [0] * len(args.port)
        self.window = (float("inf"), float("inf"))
        self.latency = Histogram()
        self.errors: Counter[str] = Counter()
        self.pending = args.streams
        self.attempted = trio.Event()

    def attempt_done(self) -> None:
        self.pending -= 1
        if not self.pending:
            self.attempted.set()


class Stream:
    """One SSE stream; ``run`` connects, then receives until cancelled or closed."""

    def __init__(self, shared: Shared, index: int) -> None:
        args = shared.args
        self.shared = shared
        self.client_id = f"{args.client_prefix}{index}"
        self.port_index = index % len(args.port)
        self.port: int = args.port[self.port_index]
        self.slow = index < args.slow
        self.tally = SseTally()
        self.open = False
        self.closed_early = False
        self.acks = 0
        self.ack_reconnects = 0
        self.last_id: bytes | None = None
        self.unacked = 0
        self.ack_wakeup = trio.Event()

    async def _connect(self) -> trio.SocketStream:
        port = self.port
        if not self.slow:
            return await trio.open_tcp_stream("127.0.0.1", port)
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF)
            await sock.connect(("127.0.0.1", port))
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)

    async def run(self, limiter: trio.CapacityLimiter) -> None:
        args, shared = self.shared.args, self.shared
        query = f"?ack={args.ack}" if args.ack else ""
        request = (
            f"GET /streams/{args.topic}{query} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"X-Client-ID: {self.client_id}\r\nAccept: text/event-stream\r\n\r\n"
        ).encode()
        stream = None
        try:
            async with limiter:
                with trio.fail_after(args.connect_timeout):
                    stream = await self._connect()
                    await stream.send_all(request)
                    status, headers, rest = await read_head(stream, b"")
        except (OSError, WireError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            shared.errors[f"connect: {type(exc).__name__}"] += 1
            shared.attempt_done()
            if stream is not None:
                await stream.aclose()
            return
        async with stream:
            if status != 200:
                shared.errors[f"status {status}"] += 1
                shared.attempt_done()
                return
            self.open = True
            shared.attempt_done()
            chunked = "chunked" in headers.get("transfer-encoding", "").lower()
            try:
                if self.slow:
                    await trio.sleep_forever()
                elif args.ack:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._ack_loop)
                        await self._receive(stream, rest, chunked)
                        nursery.cancel_scope.cancel()
                else:
                    await self._receive(stream, rest, chunked)
            except* (OSError, WireError, trio.BrokenResourceError) as group:
                shared.errors[f"stream: {type(group.exceptions[0]).__name__}"] += 1
            finally:
                self.open = False
            self.closed_early = True

    async def _receive(self, stream: trio.SocketStream, data: bytes, chunked: bool) -> None:
        shared, tally = self.shared, self.tally
        decoder = ChunkedDecoder() if chunked else None
        latency = shared.args.latency
        ack = shared.args.ack
        ack_every = max(1, ack // 2)
        coalesce = shared.args.coalesce_ms / 1000
        received_at = trio.current_time()
        while True:
            body = decoder.feed(data) if decoder is not None else data
            if body:
                before = tally.events
                lines = tally.feed(body)
                n = tally.events - before
                if n:
                    shared.events += n
                    shared.events_by_port[self.port_index] += n
                    if latency:
                        now = time.time()
                        start, end = shared.window
                        if start <= now < end:
                            shared.latency.add_many([now - t for t in timestamps(lines)])
                    if ack:
                        event_id = last_event_id(lines)
                        if event_id is not None:
                            self.last_id = event_id
                            self.unacked += n
                            if self.unacked >= ack_every:
                                self.ack_wakeup.set()
            if decoder is not None and decoder.done:
                return
            if coalesce and len(data) < COALESCE_BELOW:
                # A wake-up per receive is most of this client's CPU (trio: 25-40 µs here):
                # when small pieces come faster than this, let them gather in the socket.
                # A big piece means we are behind: read on at once, never throttle.
                await trio.sleep_until(received_at + coalesce)
            data = await stream.receive_some(RECEIVE_SIZE)
            received_at = trio.current_time()
            if not data:
                return

    async def _ack_loop(self) -> None:
        args = self.shared.args
        head = (
            f"POST /streams/{args.topic}/ack HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            "Content-Type: application/json\r\nContent-Length: "
        ).encode()
        conn = KeepAlive(self.port)  # acks go to the process that sent the events
        try:
            while True:
                await self.ack_wakeup.wait()
                self.ack_wakeup = trio.Event()
                if self.last_id is None:
                    continue
                self.unacked = 0
                body = json.dumps(
                    {"client_id": self.client_id, "last_event_id": self.last_id.decode()}
                ).encode()
                status = await conn.request(head + b"%d\r\n\r\n" % len(body) + body)
                self.acks += 1
                if status != 204:
                    self.shared.errors[f"ack status {status}"] += 1
        finally:
            self.ack_reconnects = conn.reconnects
            with trio.CancelScope(shield=True):
                await conn.aclose()


async def report_minimum(streams: list[Stream], path: str, slot: int) -> None:
    """Publish the smallest event count of this process's reading streams, every 10 ms."""
    with shared_slots(path) as view:
        assert view is not None
        while True:
            counts = [s.tally.events for s in streams if s.open and not s.slow]
            view[slot] = min(counts) if counts else NOT_READING
            await trio.sleep(0.01)


async def main(args: argparse.Namespace) -> None:
    shared = Shared(args)
    streams = [Stream(shared, i) for i in range(args.streams)]
    limiter = trio.CapacityLimiter(args.connect_concurrency)
    async with trio.open_nursery() as nursery:
        for stream in streams:
            nursery.start_soon(stream.run, limiter)
        with trio.move_on_after(args.connect_timeout + 5):
            await shared.attempted.wait()
        opened = sum(s.open for s in streams)
        emit({"type": "ready", "open": opened, "errors": dict(shared.errors)})
        schedule = await wait_schedule()
        shared.window = (schedule["window_start"], schedule["window_end"])
        if args.shm:
            nursery.start_soon(report_minimum, streams, args.shm, args.slot)

        await trio.sleep_until(trio_deadline(schedule["window_start"]))
        events0, cpu0, time0 = shared.events, cpu_seconds(), time.time()
        by_port0 = list(shared.events_by_port)
        await trio.sleep_until(trio_deadline(schedule["window_end"]))
        events1, cpu1, time1 = shared.events, cpu_seconds(), time.time()
        by_port1 = list(shared.events_by_port)
        await trio.sleep_until(trio_deadline(schedule["stop_at"]))
        reading = [s for s in streams if not s.slow]
        result = {
            "type": "result",
            "streams": args.streams,
            "opened": opened,
            "open_at_end": sum(s.open for s in reading),
            "closed_early": sum(s.closed_early for s in reading),
            "errors": dict(shared.errors),
            "window_events": events1 - events0,
            "window_events_by_port": [b - a for a, b in zip(by_port0, by_port1, strict=True)],
            "window_seconds": time1 - time0,
            "cpu_seconds": cpu1 - cpu0,
            "latency": shared.latency.to_json(),
            "streams_with_comments": sum(s.tally.comments > 0 for s in reading),
            "named_events": sum(s.tally.named for s in reading),
            "acks": sum(s.acks for s in reading),
            "ack_reconnects": sum(s.ack_reconnects for s in reading),
        }
        nursery.cancel_scope.cancel()
    emit(result)


def _ports(text: str) -> list[int]:
    try:
        ports = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not ports: {text!r}") from None
    if not all(0 < port < 65536 for port in ports):
        raise argparse.ArgumentTypeError(f"not ports: {text!r}")
    return ports


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loadclient")
    parser.add_argument(
        "--port",
        type=_ports,
        required=True,
        help="the server's port, or ports separated by commas (stream i: the (i mod n)-th)",
    )
    parser.add_argument("--topic", default="bench")
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--slow", type=int, default=0, help="streams that stop reading")
    parser.add_argument("--ack", type=int, default=0, help="ask for ?ack=N and acknowledge")
    parser.add_argument("--latency", action="store_true", help="record publication→receipt")
    parser.add_argument(
        "--coalesce-ms",
        type=float,
        default=0.0,
        help="receive at most once per this many ms on a stream (0: at once)",
    )
    parser.add_argument("--client-prefix", default="c")
    parser.add_argument("--shm", default="", help="file of int64 slots for flow control")
    parser.add_argument("--slot", type=int, default=0)
    parser.add_argument("--connect-concurrency", type=int, default=64)
    parser.add_argument("--connect-timeout", type=float, default=60.0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    raise_nofile_limit()
    arguments = parse_args()
    try:
        trio.run(main, arguments)
    except KeyboardInterrupt:
        os._exit(130)
