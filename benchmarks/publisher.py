"""The publisher: JSON batches POSTed over keep-alive connections on raw trio sockets.

Started by the harness as ``python -m benchmarks.publisher --port P --mode fast|rate ...``;
speaks the agent protocol of ``benchmarks._wire``. Every event's data is
``"<time.time()> xxx…"``, ``--size`` characters long, so the load client can measure
publication→receipt latency.

- ``--mode fast``: ``--conns`` connections each POST ``--batch`` events as soon as the
  previous answer arrives, but never more than ``--window`` events ahead of the slowest
  reading stream (read from the load clients' shared slots, ``--shm``). The lead keeps
  every stream's backlog non-empty, so the server is never starved, without letting the
  reference server's unbounded queues grow for the whole run.
- ``--mode rate``: one connection publishes ``--rate`` events per second on a fixed
  schedule (one event per POST; if it falls behind, the events due go in one batch).

A ``429`` (log full) is counted and retried after 10 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter

import trio

from ._wire import (
    KeepAlive,
    cpu_seconds,
    emit,
    raise_nofile_limit,
    shared_slots,
    trio_deadline,
    wait_schedule,
)

MAX_ERRORS = 50


class Publisher:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.head = (
            f"POST /streams/{args.topic} HTTP/1.1\r\nHost: 127.0.0.1:{args.port}\r\n"
            "Content-Type: application/json\r\nContent-Length: "
        ).encode()
        self.filler = "x" * max(0, args.size - 18)
        self.published = 0
        self.in_flight = 0
        self.posts = 0
        self.rejected = 0
        self.errors: Counter[str] = Counter()

    def body(self, n: int) -> bytes:
        item = json.dumps({"data": f"{time.time():.6f} {self.filler}"}, separators=(",", ":"))
        return ("[" + ",".join([item] * n) + "]").encode()

    async def post(self, conn: KeepAlive, n: int) -> None:
        """Publish ``n`` events (counting a refusal or an error, then pausing 10 ms)."""
        body = self.body(n)
        self.in_flight += n
        try:
            status = await conn.request(self.head + b"%d\r\n\r\n" % len(body) + body)
        finally:
            self.in_flight -= n
        self.posts += 1
        if 200 <= status < 300:
            self.published += n
            return
        if status == 429:
            self.rejected += 1
        else:
            self.errors[f"status {status}"] += 1
            if sum(self.errors.values()) > MAX_ERRORS:
                raise RuntimeError(f"publisher: too many errors {dict(self.errors)}")
        await trio.sleep(0.01)

    async def fast(self, conn: KeepAlive, slots: memoryview | None) -> None:
        batch, window = self.args.batch, self.args.window
        while True:
            if slots is not None:
                # The slots are written by other processes: polling is the only way.
                while self.published + self.in_flight + batch - min(slots) > window:  # noqa: ASYNC110
                    await trio.sleep(0.001)
            await self.post(conn, batch)

    async def fixed_rate(self, conn: KeepAlive, start: float) -> None:
        rate = self.args.rate
        while True:
            due = int((trio.current_time() - start) * rate) + 1 - self.published
            if due <= 0:
                await trio.sleep_until(start + self.published / rate)
                continue
            await self.post(conn, min(due, 1000))


async def main(args: argparse.Namespace) -> None:
    publisher = Publisher(args)
    count = args.conns if args.mode == "fast" else 1
    conns = [KeepAlive(args.port) for _ in range(count)]
    for conn in conns:
        await conn.connect()
    emit({"type": "ready"})
    schedule = await wait_schedule()
    start = trio_deadline(schedule["start_at"])
    with shared_slots(args.shm) as slots:
        await trio.sleep_until(start)
        cpu0 = cpu_seconds()
        with trio.move_on_at(trio_deadline(schedule["stop_at"])):
            async with trio.open_nursery() as nursery:
                for conn in conns:
                    if args.mode == "fast":
                        nursery.start_soon(publisher.fast, conn, slots)
                    else:
                        nursery.start_soon(publisher.fixed_rate, conn, start)
        cpu1 = cpu_seconds()
    for conn in conns:
        await conn.aclose()
    emit(
        {
            "type": "result",
            "published": publisher.published,
            "posts": publisher.posts,
            "rejected": publisher.rejected,
            "reconnects": sum(conn.reconnects for conn in conns),
            "errors": dict(publisher.errors),
            "cpu_seconds": cpu1 - cpu0,
        }
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.publisher")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--topic", default="bench")
    parser.add_argument("--mode", choices=["fast", "rate"], default="fast")
    parser.add_argument("--batch", type=int, default=100, help="events per POST (fast)")
    parser.add_argument("--window", type=int, default=10_000, help="max lead in events (fast)")
    parser.add_argument("--conns", type=int, default=2, help="connections (fast)")
    parser.add_argument("--rate", type=float, default=5.0, help="events per second (rate)")
    parser.add_argument("--size", type=int, default=100, help="characters of data per event")
    parser.add_argument("--shm", default="", help="the load clients' flow-control slots")
    return parser.parse_args(argv)


if __name__ == "__main__":
    raise_nofile_limit()
    arguments = parse_args()
    try:
        trio.run(main, arguments)
    except KeyboardInterrupt:
        os._exit(130)
