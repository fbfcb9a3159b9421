"""The few HTTP/1.1 and SSE pieces the load client, publisher and raw writer share.

Everything here is deliberately minimal and cheap: the load client must stay several
times faster than the servers it measures on a 2-core machine, so events are counted by
searching bytes in C (``bytes.count``), never by a per-event Python loop.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import resource
import sys
import time
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from collections.abc import Iterator

MAX_HEAD = 64 * 1024
RECEIVE_SIZE = 256 * 1024


class WireError(Exception):
    """The peer sent something this minimal client does not understand."""


def raise_nofile_limit() -> None:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (5,000 streams need it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def read_head(stream: trio.SocketStream, buf: bytes) -> tuple[int, dict[str, str], bytes]:
    """Read an HTTP/1.1 response head; return (status, lower-cased headers, rest)."""
    while b"\r\n\r\n" not in buf:
        if len(buf) > MAX_HEAD:
            raise WireError("response head too large")
        data = await stream.receive_some(RECEIVE_SIZE)
        if not data:
            raise WireError("connection closed before the response head")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError):
        raise WireError(f"bad status line {lines[0]!r}") from None
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, rest


async def read_response(
    stream: trio.SocketStream, buf: bytes
) -> tuple[int, dict[str, str], bytes, bytes]:
    """Read a whole response (Content-Length or chunked); return it and the bytes after it."""
    status, headers, rest = await read_head(stream, buf)
    if "chunked" in headers.get("transfer-encoding", "").lower():
        decoder = ChunkedDecoder()
        parts = [decoder.feed(rest)]
        while not decoder.done:
            data = await stream.receive_some(RECEIVE_SIZE)
            if not data:
                raise WireError("connection closed inside a chunked body")
            parts.append(decoder.feed(data))
        return status, headers, b"".join(parts), decoder.leftover
    length = 0 if status in (204, 304) else int(headers.get("content-length", "0"))
    while len(rest) < length:
        data = await stream.receive_some(RECEIVE_SIZE)
        if not data:
            raise WireError("connection closed inside a body")
        rest += data
    return status, headers, rest[:length], rest[length:]


class KeepAlive:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1 for small request/response pairs.

    A server may close an idle keep-alive connection between requests (hypercorn does
    after ``keep_alive_timeout``): then the connection is reopened and the request sent
    once more, and ``reconnects`` counts it.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.reconnects = 0
        self._stream: trio.SocketStream | None = None
        self._buf = b""

    async def connect(self) -> None:
        if self._stream is None:
            self._stream = await trio.open_tcp_stream("127.0.0.1", self.port)
            self._buf = b""

    async def request(self, data: bytes) -> int:
        """Send one whole request; return the response's status (the body is dropped)."""
        for attempt in range(2):
            await self.connect()
            assert self._stream is not None
            try:
                await self._stream.send_all(data)
                status, headers, _, self._buf = await read_response(self._stream, self._buf)
            except (WireError, trio.BrokenResourceError, OSError):
                await self.aclose()
                if attempt:
                    raise
                self.reconnects += 1
            else:
                if headers.get("connection", "").lower() == "close":
                    await self.aclose()
                return status
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await stream.aclose()


class ChunkedDecoder:
    """Incremental decoder of ``Transfer-Encoding: chunked`` (trailers not supported)."""

    __slots__ = ("_buf", "_last", "_left", "_skip", "done")

    def __init__(self) -> None:
        self._buf = b""
        self._left = 0  # bytes of chunk data still to come
        self._skip = 0  # bytes of CRLF still to skip
        self._last = False  # the zero-size chunk was seen
        self.done = False

    @property
    def leftover(self) -> bytes:
        """Bytes received after the end of the body (only meaningful once ``done``)."""
        return self._buf

    def feed(self, data: bytes) -> bytes:
        """Take raw bytes from the socket, return the body bytes they complete."""
        buf = self._buf + data if self._buf else data
        if self.done:
            self._buf = buf
            return b""
        out: list[bytes] = []
        pos, end = 0, len(buf)
        left, skip = self._left, self._skip
        while pos < end:
            if left:
                take = min(left, end - pos)
                out.append(buf[pos : pos + take])
                pos += take
                left -= take
                if left:
                    break
                skip = 2
                continue
            if skip:
                n = min(skip, end - pos)
                pos += n
                skip -= n
                if skip:
                    break
                if self._last:
                    self.done = True
                    break
                continue
            nl = buf.find(b"\r\n", pos)
            if nl < 0:
                if end - pos > 1024:
                    raise WireError("chunk size line too long")
                break
            try:
                size = int(buf[pos:nl].partition(b";")[0], 16)
            except ValueError:
                raise WireError(f"bad chunk size {buf[pos:nl][:20]!r}") from None
            pos = nl + 2
            if size == 0:
                self._last = True
                skip = 2
            else:
                left = size
        self._buf = buf[pos:]
        self._left, self._skip = left, skip
        return b"".join(out)


class SseTally:
    """Counts SSE events and comments in a body, and hands back whole events to read.

    Events are counted as lines starting ``data:`` (the benchmark's events have exactly
    one data line; ``\n`` and ``\r\n`` line endings both work). Only whole events (up to
    the last blank line) are examined: the bytes after it wait for the next feed.
    """

    __slots__ = ("_tail", "comments", "events", "named")

    def __init__(self) -> None:
        self._tail = b"\n"  # every line, even the body's first, then follows a line break
        self.events = 0
        self.comments = 0
        self.named = 0  # events with an ``event:`` line: reset, pause, ...

    def feed(self, body: bytes) -> bytes:
        """Count the events ``body`` completes; return their text (starting with a break)."""
        text = self._tail + body
        cut = max(text.rfind(b"\n\n"), text.rfind(b"\n\r\n")) + 1
        if not cut:
            self._tail = text
            return b""
        self._tail = text[cut:]
        done = text[:cut]
        self.events += done.count(b"\ndata:")
        if b"\n:" in done:
            self.comments += done.count(b"\n:")
        if b"\nevent:" in done:
            self.named += done.count(b"\nevent:")
        return done


def timestamps(lines: bytes) -> list[float]:
    """The publication times leading the ``data:`` lines of whole events."""
    out = []
    pos = lines.find(b"\ndata: ")
    while pos >= 0:
        start = pos + 7
        end = lines.find(b" ", start, start + 32)
        if end > start:
            with contextlib.suppress(ValueError):  # not ours: a reset or pause notice
                out.append(float(lines[start:end]))
        pos = lines.find(b"\ndata: ", start)
    return out


def last_event_id(events: bytes) -> bytes | None:
    """The ``id:`` of the last event in whole events (as ``SseTally.feed`` returns them)."""
    start = events.rfind(b"\nid: ")
    if start < 0:
        return None
    return events[start + 5 : events.index(b"\n", start + 1)].rstrip(b"\r")


class Histogram:
    """A mergeable log-bucketed histogram of durations in seconds (1 % resolution)."""

    SCALE = 100.0  # buckets per factor e

    def __init__(self, counts: dict[int, int] | None = None) -> None:
        self.counts: dict[int, int] = dict(counts or {})

    def add_many(self, values: list[float]) -> None:
        counts, scale, log = self.counts, self.SCALE, math.log
        for value in values:
            key = int(log(max(value, 1e-7)) * scale)
            counts[key] = counts.get(key, 0) + 1

    def merge(self, other: Histogram) -> None:
        for key, n in other.counts.items():
            self.counts[key] = self.counts.get(key, 0) + n

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile (0..1), or None when empty."""
        total = self.total
        if not total:
            return None
        rank = q * (total - 1)
        seen = 0
        for key in sorted(self.counts):
            seen += self.counts[key]
            if seen > rank:
                return math.exp((key + 0.5) / self.SCALE)
        return math.exp((max(self.counts) + 0.5) / self.SCALE)

    def to_json(self) -> dict[str, int]:
        return {str(k): n for k, n in self.counts.items()}

    @classmethod
    def from_json(cls, data: dict[str, int]) -> Histogram:
        return cls({int(k): int(n) for k, n in data.items()})


# --- the agent protocol: how the harness drives the load client and the publisher ---
# An agent prints one JSON line when ready, reads one JSON line (the schedule, wall-clock
# times from time.time()) from stdin, runs, prints one JSON result line and exits.


def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def wait_schedule() -> dict[str, float]:
    """Wait for the harness's schedule; exit quietly if the harness went away."""
    line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
    if not line:
        raise SystemExit(3)
    schedule: dict[str, float] = json.loads(line)
    return schedule


def trio_deadline(wall: float) -> float:
    """Convert a ``time.time()`` instant into a ``trio.current_time()`` deadline."""
    return trio.current_time() + (wall - time.time())


def cpu_seconds() -> float:
    """CPU time (user + system) used so far by this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def shared_slots(path: str) -> Iterator[memoryview | None]:
    """Map the flow-control file (int64 slots, one per load-client process), if any."""
    if not path:
        yield None
        return
    with open(path, "r+b") as file, mmap.mmap(file.fileno(), 0) as shm:
        view = memoryview(shm).cast("q")
        try:
            yield view
        finally:
            view.release()
