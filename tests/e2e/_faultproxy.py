"""A fault-injecting TCP proxy on trio, for chaos tests on 127.0.0.1.

Each accepted connection gets its own connection to the target and two pumps (client
to server, "up"; server to client, "down"). A pump is a reader and a writer linked by a
small bounded channel, so the proxy holds at most a few chunks per direction and a
stalled side stalls the other: TCP backpressure goes through it, as through a real
middlebox. The faults, all adjustable while it runs (`Faults`):

- ``latency``: every chunk is delivered this many seconds after it was read, both ways;
- ``bandwidth``: bytes per second, per connection and direction;
- a *cut* after ``cut_after`` bytes went down a connection, made inside an event (the
  cut falls in the middle of the next ``data:`` line), on the next ``cuts`` connections
  that get that far:
  - ``"reset"``: what was before the cut is delivered, then both sockets are reset (RST);
  - ``"half-open"``: forwarding stops both ways and nothing is closed, as when a peer
    or a NAT entry vanishes; the sockets are held until `FaultProxy.release_held`;
  - ``"pause"``: forwarding stops both ways for ``pause_for`` seconds, then goes on.
"""

from __future__ import annotations

import math
import socket
import struct
from contextlib import asynccontextmanager, suppress
from functools import partial
from typing import TYPE_CHECKING, Literal

import attrs
import trio

from ._support import host_port

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

CHUNK = 16384
CHANNEL_CHUNKS = 4  # chunks a direction may hold between its reader and its writer
BANDWIDTH_SLICE = 0.02  # seconds of bandwidth written at a time

Cut = Literal["reset", "half-open", "pause"]


@attrs.define(eq=False)
class Faults:
    """What the proxy does to what it forwards; change it at any time."""

    latency: float = 0.0
    bandwidth: float | None = None
    cut: Cut | None = None
    cut_after: int = 0
    cuts: int = 0
    """Connections still to cut (each cut counts one down)."""
    pause_for: float = 1.0


@attrs.define(eq=False)
class ProxyStatistics:
    """What the proxy did so far."""

    accepted: int = 0
    active: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    resets: int = 0
    half_open: int = 0
    pauses: int = 0
    cuts_mid_event: int = 0


@attrs.define(eq=False)
class _Link:
    """One proxied connection."""

    client: trio.SocketStream
    upstream: trio.SocketStream
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    paused_until: float = -math.inf
    down: int = 0
    cut_pending: bool = True


def _reset(stream: trio.SocketStream) -> None:
    """Close *stream* with an RST instead of a FIN."""
    sock = stream.socket
    with suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@attrs.define(eq=False)
class FaultProxy:
    """The proxy: its URL, its faults (mutable) and its statistics."""

    target: tuple[str, int]
    faults: Faults
    url: str = ""
    statistics: ProxyStatistics = attrs.field(factory=ProxyStatistics)
    _held: list[_Link] = attrs.field(factory=list)

    async def release_held(self) -> None:
        """Close the half-open connections held so far (a FIN each way)."""
        held, self._held = self._held, []
        for link in held:
            await trio.aclose_forcefully(link.client)
            await trio.aclose_forcefully(link.upstream)

    @property
    def held(self) -> int:
        """Half-open connections held now."""
        return len(self._held)

    async def handle(self, client: trio.SocketStream) -> None:
        """Proxy one accepted connection until either side ends or a fault ends it."""
        stats = self.statistics
        stats.accepted += 1
        try:
            upstream = await trio.open_tcp_stream(*self.target)
        except OSError:
            await trio.aclose_forcefully(client)
            return
        link = _Link(client, upstream)
        stats.active += 1
        held = False
        try:
            with link.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, link, client, upstream, "up")
                    nursery.start_soon(self._pump, link, upstream, client, "down")
            held = link in self._held
        finally:
            stats.active -= 1
            if not held:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(client)
                    await trio.aclose_forcefully(upstream)

    async def _pump(
        self,
        link: _Link,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        direction: Literal["up", "down"],
    ) -> None:
        send, receive = trio.open_memory_channel[tuple[float, bytes]](CHANNEL_CHUNKS)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read, source, send)
            await self._write(link, receive, sink, direction)
            nursery.cancel_scope.cancel()

    async def _read(
        self, source: trio.SocketStream, chunks: trio.MemorySendChannel[tuple[float, bytes]]
    ) -> None:
        async with chunks:
            while True:
                try:
                    data = await source.receive_some(CHUNK)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    data = b""
                if not data:
                    return
                await chunks.send((trio.current_time() + self.faults.latency, data))

    async def _write(
        self,
        link: _Link,
        chunks: trio.MemoryReceiveChannel[tuple[float, bytes]],
        sink: trio.SocketStream,
        direction: Literal["up", "down"],
    ) -> None:
        async with chunks:
            async for due, data in chunks:
                await trio.sleep_until(max(due, link.paused_until))
                if direction == "down" and link.cut_pending and self.faults.cut is not None:
                    data = await self._maybe_cut(link, data, sink)
                try:
                    await self._send(link, sink, data, direction)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    break
        # The source ended: pass the end on (half-close), as TCP would.
        try:
            await sink.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            link.scope.cancel()

    async def _send(
        self, link: _Link, sink: trio.SocketStream, data: bytes, direction: Literal["up", "down"]
    ) -> None:
        while data:
            await trio.sleep_until(link.paused_until)
            bandwidth = self.faults.bandwidth
            size = len(data) if not bandwidth else max(1, int(bandwidth * BANDWIDTH_SLICE))
            piece, data = data[:size], data[size:]
            await sink.send_all(piece)
            if direction == "down":
                link.down += len(piece)
                self.statistics.bytes_down += len(piece)
            else:
                self.statistics.bytes_up += len(piece)
            if bandwidth:
                await trio.sleep(len(piece) / bandwidth)

    async def _maybe_cut(self, link: _Link, data: bytes, sink: trio.SocketStream) -> bytes:
        """Apply the cut if this chunk crosses ``cut_after``; what is left to send."""
        faults = self.faults
        start = max(0, faults.cut_after - link.down)
        if start >= len(data) or faults.cuts <= 0:
            return data
        at = data.find(b"data:", start)
        if at < 0:
            return data  # no event starts in this chunk: look in the next one
        at += 3  # inside "data:": mid-event for sure
        faults.cuts -= 1
        link.cut_pending = False
        self.statistics.cuts_mid_event += 1
        await self._send(link, sink, data[:at], "down")
        if faults.cut == "reset":
            self.statistics.resets += 1
            _reset(link.client)
            _reset(link.upstream)
            link.scope.cancel()
            await trio.sleep_forever()
        if faults.cut == "half-open":
            self.statistics.half_open += 1
            self._held.append(link)
            link.scope.cancel()  # the pumps stop; the sockets stay open
            await trio.sleep_forever()
        self.statistics.pauses += 1
        link.paused_until = trio.current_time() + faults.pause_for
        return data[at:]


@asynccontextmanager
async def open_fault_proxy(
    target_url: str, faults: Faults | None = None
) -> AsyncIterator[FaultProxy]:
    """A `FaultProxy` to the server of *target_url*, listening on 127.0.0.1, for the block.

    Leaving the block closes every connection, held ones included.
    """
    proxy = FaultProxy(host_port(target_url), faults or Faults())
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, proxy.handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        proxy.url = f"http://127.0.0.1:{port}"
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await proxy.release_held()
