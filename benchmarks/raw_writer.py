"""A raw trio socket SSE writer: the load client's calibration target.

``python -m benchmarks.raw_writer --port P`` answers any GET (except ``/healthz``) with a
minimal HTTP/1.1 chunked ``text/event-stream`` response and then writes events as fast
as the socket takes them. Each event is its own chunk (as sse-starlette on uvicorn sends
them), so the client does its worst-case per-event work, and ``--events-per-write``
events go in one ``send_all``, so the writer itself costs almost nothing: whatever rate
the load client reaches here is the load client's ceiling, not a server's. Streaming
starts once ``--streams`` streams are open, so that the first streams' flood does not
starve the load client's connection set-up.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from functools import partial

import trio

from ._wire import raise_nofile_limit

HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
    b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
)
HEALTHZ = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


def timestamp() -> bytes:
    return b"%.6f" % time.time()


def make_block(events: int, size: int) -> tuple[bytes, bytes]:
    """``events`` chunks, one event of ``size`` characters of data each; and the placeholder."""
    placeholder = b"T" * len(timestamp())
    filler = b"x" * max(0, size - len(placeholder) - 1)
    parts = []
    for i in range(events):
        payload = b"id: %d\ndata: %s %s\n\n" % (i, placeholder, filler)
        parts.append(b"%x\r\n%s\r\n" % (len(payload), payload))
    return b"".join(parts), placeholder


class Gate:
    """Opens once ``expected`` streams have started."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.opened = trio.Event()

    def arrived(self) -> None:
        self.expected -= 1
        if self.expected <= 0:
            self.opened.set()


async def handle(
    stream: trio.SocketStream, *, block: bytes, placeholder: bytes, gate: Gate
) -> None:
    buf = b""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        while b"\r\n\r\n" not in buf:
            data = await stream.receive_some(65536)
            if not data:
                return
            buf += data
        if buf.startswith(b"GET /healthz"):
            await stream.send_all(HEALTHZ)
            return
        await stream.send_all(HEAD + b"6\r\n: ok\n\n\r\n")
        gate.arrived()
        await gate.opened.wait()
        while True:
            await stream.send_all(block.replace(placeholder, timestamp()))


async def main(args: argparse.Namespace) -> None:
    block, placeholder = make_block(args.events_per_write, args.size)
    handler = partial(handle, block=block, placeholder=placeholder, gate=Gate(args.streams))
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(trio.serve_tcp, host=args.host, backlog=4096), handler, args.port
        )
        print(f"raw writer listening on http://{args.host}:{args.port}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.raw_writer")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--streams", type=int, default=1, help="streams to wait for")
    parser.add_argument("--events-per-write", type=int, default=64)
    parser.add_argument("--size", type=int, default=100, help="characters of data per event")
    return parser.parse_args(argv)


if __name__ == "__main__":
    raise_nofile_limit()
    arguments = parse_args()
    try:
        trio.run(main, arguments)
    except KeyboardInterrupt:
        os._exit(0)
