"""The client against a hand-driven h11 server over memory streams, on the virtual clock.

Each test plays the server: it accepts the client's connections (made by a
`stream_factory` handing out one end of `trio.testing.memory_stream_pair`), reads the
requests with h11 and writes responses and stream bytes by hand, at chosen virtual
times. The client runs in a task of its own (`Consumer`) that records what it yields.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import socket
from typing import TYPE_CHECKING

import attrs
import h11
import pytest
import trio
import trio.testing
from hypothesis import given, settings, strategies as st

from trio_stream._client import (
    EventStream,
    HTTPStatusError,
    StreamReset,
    StreamResetError,
    open_event_stream,
    publish,
)
from trio_stream._core._errors import LocalProtocolError, RemoteProtocolError, TrioStreamError
from trio_stream._core._events import Event

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

URL = "http://example.test:8000/streams/t"
SSE_HEADERS = [("content-type", "text/event-stream; charset=utf-8"), ("x-client-id", "c1")]


# -- the hand-driven server ----------------------------------------------------------


@attrs.define(eq=False)
class Peer:
    """The server's end of one connection."""

    stream: trio.abc.Stream
    opened_at: float
    conn: h11.Connection = attrs.field(factory=lambda: h11.Connection(h11.SERVER))

    async def _event(self) -> h11.Event:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(bytes(await self.stream.receive_some(65536)))
                continue
            assert isinstance(event, h11.Event)
            return event

    async def request(self) -> Request:
        """The next request on this connection, body included."""
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        head = await self._event()
        assert isinstance(head, h11.Request), head
        body = b""
        while not isinstance(event := await self._event(), h11.EndOfMessage):
            assert isinstance(event, h11.Data)
            body += event.data
        return Request(
            method=head.method.decode(),
            target=head.target.decode(),
            headers={k.decode(): v.decode() for k, v in head.headers},
            body=body,
        )

    async def _send(self, *events: h11.Event) -> None:
        await self.stream.send_all(b"".join(self.conn.send(e) or b"" for e in events))

    async def respond(
        self, status: int, body: object = None, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        """A whole response; *body* is sent as JSON unless it is bytes."""
        raw = (
            body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
        )
        all_headers = [*headers, ("content-length", str(len(raw)))]
        if not isinstance(body, bytes) and body is not None:
            all_headers.append(("content-type", "application/json"))
        await self._send(
            h11.Response(status_code=status, headers=all_headers),
            h11.Data(data=raw),
            h11.EndOfMessage(),
        )

    async def start_sse(self, headers: Sequence[tuple[str, str]] = SSE_HEADERS) -> None:
        await self._send(h11.Response(status_code=200, headers=list(headers)))

    async def sse(self, data: bytes | str) -> None:
        """One chunk of the event stream."""
        await self._send(h11.Data(data=data.encode() if isinstance(data, str) else data))

    async def end(self) -> None:
        await self._send(h11.EndOfMessage())

    async def abort(self) -> None:
        await self.stream.aclose()

    async def wait_closed(self) -> float:
        """Wait for the client to close its end; the time it did."""
        while await self.stream.receive_some(65536):
            pass
        return trio.current_time()


@attrs.frozen(kw_only=True)
class Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


@attrs.define(eq=False)
class Server:
    """Accepts the client's connections; can refuse the next *refuse* of them."""

    refuse: int = 0
    attempts: list[float] = attrs.field(factory=list)
    hosts: list[tuple[str, int]] = attrs.field(factory=list)
    _send: trio.MemorySendChannel[Peer] = attrs.field(init=False)
    _receive: trio.MemoryReceiveChannel[Peer] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[Peer](math.inf)

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        self.attempts.append(trio.current_time())
        self.hosts.append((host, port))
        if self.refuse:
            self.refuse -= 1
            raise ConnectionRefusedError(111, "Connection refused")
        client, server = trio.testing.memory_stream_pair()
        self._send.send_nowait(Peer(server, trio.current_time()))
        return client

    async def accept(self) -> Peer:
        return await self._receive.receive()

    async def stream(
        self, *, last_event_id: str | None = None, path: str = "/streams/t"
    ) -> tuple[Peer, Request]:
        """Accept a stream request, check it, and answer 200 with ``retry: 1000``."""
        peer = await self.accept()
        request = await peer.request()
        assert request.method == "GET"
        assert request.target.split("?")[0] == path
        assert request.headers.get("last-event-id") == last_event_id
        assert request.headers["accept"] == "text/event-stream"
        await peer.start_sse()
        await peer.sse("retry: 1000\n\n")
        return peer, request


@attrs.define(eq=False)
class Consumer:
    """Iterates over an `EventStream` in a task of its own, recording what it gets.

    A paced consumer asks for the next item only when the test allows it
    (`allow`): asking for the next is what marks the previous one done in ack mode.
    """

    events: EventStream
    paced: bool = False
    got: list[Event | StreamReset] = attrs.field(factory=list)
    at: list[float] = attrs.field(factory=list)
    error: BaseException | None = None
    finished: bool = False
    _permits: int = 0
    _permitted: trio.Event = attrs.field(factory=trio.Event)

    def allow(self, n: int = 1) -> None:
        self._permits += n
        self._permitted.set()

    async def run(self) -> None:
        try:
            while True:
                while self.paced and not self._permits:
                    self._permitted = trio.Event()
                    await self._permitted.wait()
                self._permits -= 1
                try:
                    item = await self.events.__anext__()
                except StopAsyncIteration:
                    self.finished = True
                    return
                self.got.append(item)
                self.at.append(trio.current_time())
        except Exception as error:
            self.error = error

    @property
    def data(self) -> list[str]:
        return [i.data if isinstance(i, Event) else f"reset:{i.reason}" for i in self.got]


def sse(*ids: int, prefix: str = "e-") -> str:
    return "".join(f"id: {prefix}{i}\ndata: d{i}\n\n" for i in ids)


@attrs.define(eq=False)
class Session:
    server: Server
    events: EventStream
    consumer: Consumer


@contextlib.asynccontextmanager
async def session(
    url: str = URL, *, paced: bool = False, **kwargs: object
) -> AsyncIterator[Session]:
    """An open stream on a fresh `Server`, no jitter, with a `Consumer` running."""
    server = Server()
    options: dict[str, object] = {"retry_jitter": 0.0}
    options.update(kwargs)
    # On the virtual clock a stuck test would loop through reconnects: fail it instead.
    with trio.fail_after(1000):
        async with open_event_stream(
            url,
            stream_factory=server.connect,
            **options,  # type: ignore[arg-type]
        ) as events:
            consumer = Consumer(events, paced=paced)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(consumer.run)
                yield Session(server, events, consumer)
                nursery.cancel_scope.cancel()


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


def all_tasks() -> set[trio.lowlevel.Task]:
    tasks: set[trio.lowlevel.Task] = set()
    todo = [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        assert task is not None
        tasks.add(task)
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return tasks


# -- streaming -------------------------------------------------------------------------


WIRE_EVENTS = [
    Event(data="a\nb", event="tick", id="e-1"),
    Event(data="\u00fc \U0001f600", id="e-2"),
    Event(data="", event="reset", id="e-3"),  # a published event named like a control one
    Event(data="x" * 300, id="e-4"),
]


def wire_response() -> tuple[bytes, h11.Connection]:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET /streams/t HTTP/1.1\r\nhost: x\r\n\r\n")
    assert isinstance(conn.next_event(), h11.Request)
    assert isinstance(conn.next_event(), h11.EndOfMessage)
    body = [
        "retry: 500\n\n",
        ": heartbeat\n\n",
        "id: e-1\nevent: tick\ndata: a\ndata: b\n\n",
        "id: e-2\r\ndata: \u00fc \U0001f600\r\n\r\n",
        "id: e-3\revent: reset\rdata\r\r",
        f"id: e-4\ndata: {'x' * 300}\n\n",
    ]
    parts = [conn.send(h11.Response(status_code=200, headers=SSE_HEADERS)) or b""]
    parts += [conn.send(h11.Data(data=b.encode())) or b"" for b in body]
    return b"".join(parts), conn


async def check_split_anywhere(cuts: list[int]) -> None:
    wire, _ = wire_response()
    async with session() as s:
        peer = await s.server.accept()
        await peer.request()
        bounds = [0, *sorted(c % (len(wire) + 1) for c in cuts), len(wire)]
        for start, end in itertools.pairwise(bounds):
            if end > start:
                await peer.stream.send_all(wire[start:end])
                await settle()
        await settle()
        assert s.consumer.got == WIRE_EVENTS
        assert s.consumer.error is None
        assert s.events.last_event_id == "e-4"


@pytest.mark.parametrize("size", [1, 2, 3, 5, 64])
async def test_client_decodes_chunks_split_anywhere(autojump_clock: object, size: int) -> None:
    wire, _ = wire_response()
    await check_split_anywhere(list(range(0, len(wire), size)))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=2000), max_size=30))
def test_client_decodes_chunks_split_at_random(cuts: list[int]) -> None:
    trio.run(check_split_anywhere, cuts, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_client_request_headers_and_adopted_client_id(autojump_clock: object) -> None:
    async with session(headers={"Authorization": "Bearer x"}) as s:
        _, request = await s.server.stream()
        assert s.server.hosts == [("example.test", 8000)]
        assert request.target == "/streams/t"
        assert request.headers["host"] == "example.test:8000"
        assert request.headers["authorization"] == "Bearer x"
        assert request.headers["cache-control"] == "no-cache"
        assert "x-client-id" not in request.headers
        await settle()
        assert s.events.client_id == "c1"  # from the response
        assert s.events.statistics().state == "streaming"


async def test_client_reconnects_with_last_event_id_after_retry(autojump_clock: object) -> None:
    """A dropped connection: back after exactly ``retry``, resuming, no duplicate."""
    async with session(client_id="me") as s:
        peer, request = await s.server.stream()
        assert request.headers["x-client-id"] == "me"
        await peer.sse(sse(1, 2))
        await settle()
        assert s.consumer.data == ["d1", "d2"]
        dropped = trio.current_time()
        await peer.abort()

        peer, request = await s.server.stream(last_event_id="e-2")
        assert peer.opened_at - dropped == pytest.approx(1.0, abs=1e-9)  # retry: 1000
        assert request.headers["x-client-id"] == "me"
        await peer.sse(sse(2, 3))  # a server replaying the resume point: dropped
        await peer.sse("retry: 2500\n\n")
        await settle()
        assert s.consumer.data == ["d1", "d2", "d3"]
        ended = trio.current_time()
        await peer.end()  # a clean end (a draining server) is followed the same way

        peer, _ = await s.server.stream(last_event_id="e-3")
        assert peer.opened_at - ended == pytest.approx(2.5, abs=1e-9)
        stats = s.events.statistics()
        assert (stats.connections, stats.duplicates, stats.events) == (3, 1, 3)
        assert stats.failed_attempts == 0


async def test_client_retry_jitter_is_bounded(autojump_clock: object) -> None:
    delays = []
    async with session(retry_jitter=0.25) as s:
        peer, _ = await s.server.stream()
        for _ in range(12):
            dropped = trio.current_time()
            await settle()
            await peer.abort()
            peer = await s.server.accept()
            delays.append(peer.opened_at - dropped)
            await peer.request()
            await peer.start_sse()
            await peer.sse("retry: 1000\n\n")
    assert all(1.0 <= d <= 1.25 for d in delays), delays
    assert len(set(delays)) > 1


async def test_client_backs_off_exponentially_up_to_the_cap(autojump_clock: object) -> None:
    async with session(retry_interval=1.0, max_retry_interval=5.0) as s:
        s.server.refuse = 4
        await s.server.stream()
        times = s.server.attempts
        assert [b - a for a, b in itertools.pairwise(times)] == [1.0, 2.0, 4.0, 5.0]
        assert s.events.statistics().failed_attempts == 0


async def test_client_gives_up_after_max_attempts(autojump_clock: object) -> None:
    server = Server(refuse=100)
    async with open_event_stream(
        URL, stream_factory=server.connect, retry_interval=1.0, retry_jitter=0, max_attempts=3
    ) as events:
        with pytest.raises(trio.BrokenResourceError, match="after 3 failed attempts") as caught:
            await events.__anext__()
        assert isinstance(caught.value.__cause__, Exception)
        assert server.attempts == [0.0, 1.0, 3.0]
        with pytest.raises(trio.BrokenResourceError, match="failed earlier"):
            await events.__anext__()


async def test_client_honours_retry_after_on_429(autojump_clock: object) -> None:
    async with session(retry_interval=1.0) as s:
        peer = await s.server.accept()
        await peer.request()
        await peer.respond(429, {"error": "too many streams"}, [("retry-after", "7")])
        refused = trio.current_time()
        peer, _ = await s.server.stream()
        assert peer.opened_at - refused == 7.0
        assert s.events.statistics().failed_attempts == 0


async def test_client_retries_server_errors_with_back_off(autojump_clock: object) -> None:
    async with session(retry_interval=1.0) as s:
        peer = await s.server.accept()
        await peer.request()
        await peer.respond(503, {"error": "shutting down"}, [("retry-after", "4")])
        peer = await s.server.accept()
        assert peer.opened_at == 4.0
        await peer.request()
        await peer.respond(502, b"bad gateway")
        peer, _ = await s.server.stream()
        assert peer.opened_at == 4.0 + 2.0  # second failure: twice the interval
        await settle()
        assert s.consumer.error is None


async def test_client_stops_on_204(autojump_clock: object) -> None:
    async with session() as s:
        peer = await s.server.accept()
        await peer.request()
        await peer.respond(204)
        await settle()
        assert s.consumer.finished
        assert s.consumer.got == []
        assert s.events.statistics().state == "finished"


# -- dead connections ----------------------------------------------------------------


async def test_client_detects_a_silent_connection(autojump_clock: object) -> None:
    """Heartbeats keep the connection; ``heartbeat_timeout`` of silence ends it."""
    async with session(heartbeat_timeout=10.0) as s:
        peer, _ = await s.server.stream()
        await peer.sse(sse(1))
        await trio.sleep(9.0)
        await peer.sse(":\n\n")
        last_bytes = trio.current_time()
        closed = await peer.wait_closed()
        assert closed - last_bytes == 10.0
        peer, _ = await s.server.stream(last_event_id="e-1")
        assert peer.opened_at - closed == 1.0
        await peer.sse(sse(2))
        await settle()
        assert s.consumer.data == ["d1", "d2"]


async def test_client_gives_up_on_a_server_that_never_answers(autojump_clock: object) -> None:
    async with session(heartbeat_timeout=5.0, retry_interval=1.0) as s:
        peer = await s.server.accept()
        await peer.request()
        closed = await peer.wait_closed()
        assert closed == 5.0
        peer, _ = await s.server.stream()
        assert peer.opened_at == 6.0


# -- resets ----------------------------------------------------------------------------


RESET = 'event: reset\ndata: {"reason": "expired", "last_event_id": "e-1"}\n\n'


async def test_client_yields_resets(autojump_clock: object) -> None:
    async with session(last_event_id="e-1") as s:
        peer, _ = await s.server.stream(last_event_id="e-1")
        await peer.sse(RESET + sse(50))
        await settle()
        assert s.consumer.got == [
            StreamReset(reason="expired", last_event_id="e-1", topic="t"),
            Event(data="d50", id="e-50"),
        ]
        assert s.events.statistics().resets == 1


async def test_client_raises_resets_when_asked(autojump_clock: object) -> None:
    server = Server()

    async def serve() -> None:
        peer, _ = await server.stream(last_event_id="e-1")
        await peer.sse(RESET + sse(50))

    async with (
        open_event_stream(
            URL, stream_factory=server.connect, last_event_id="e-1", raise_on_reset=True
        ) as events,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(serve)
        with pytest.raises(StreamResetError) as caught:
            await events.__anext__()
        assert caught.value.reset == StreamReset(reason="expired", last_event_id="e-1", topic="t")
        assert isinstance(caught.value, TrioStreamError)
        assert await events.__anext__() == Event(data="d50", id="e-50")


# -- pauses and polling --------------------------------------------------------------


def poll_answer(*ids: int, resume: bool, reset: bool = False) -> dict[str, object]:
    events = [{"id": f"e-{i}", "event": None, "data": f"d{i}"} for i in ids]
    return {
        "events": events,
        "last_event_id": f"e-{ids[-1]}" if ids else None,
        "reset": reset,
        "resume_stream": resume,
    }


async def test_client_polls_when_paused_at_connect(autojump_clock: object) -> None:
    """429 + X-Stream-Pause: poll under Retry-After (and its own 429s), then stream."""
    async with session(last_event_id="e-5") as s:
        peer = await s.server.accept()
        request = await peer.request()
        assert request.headers["last-event-id"] == "e-5"
        await peer.respond(
            429,
            {"error": "paused", "poll_url": "/streams/t/poll?after=e-5&client_id=c1"},
            [("retry-after", "2"), ("x-stream-pause", "true")],
        )
        paused = trio.current_time()

        poller = await s.server.accept()
        poll = await poller.request()
        assert trio.current_time() - paused == 2.0
        assert (poll.method, poll.target) == ("GET", "/streams/t/poll?after=e-5&client_id=c1")
        assert poll.headers["x-client-id"] == "c1"  # adopted from the poll URL
        await poller.respond(200, poll_answer(6, 7, resume=False))

        poll = await poller.request()  # the same connection, kept alive
        assert trio.current_time() - paused == 4.0
        assert poll.target == "/streams/t/poll?after=e-7&client_id=c1"
        await poller.respond(429, {"error": "rate limit"}, [("retry-after", "3")])

        poll = await poller.request()
        assert trio.current_time() - paused == 7.0
        assert poll.target == "/streams/t/poll?after=e-7&client_id=c1"
        await poller.respond(200, poll_answer(7, 8, resume=True))  # e-7 again: dropped

        peer, request = await s.server.stream(last_event_id="e-8")
        assert trio.current_time() - paused == 7.0
        assert request.headers["x-client-id"] == "c1"
        await peer.sse(sse(9))
        await settle()
        assert s.consumer.data == ["d6", "d7", "d8", "d9"]
        stats = s.events.statistics()
        assert (stats.pauses, stats.polls, stats.duplicates) == (1, 2, 1)
        assert stats.state == "streaming"


async def test_client_polls_again_at_once_after_a_full_page(autojump_clock: object) -> None:
    """In ack mode a poll asks for a window's worth: a full page means more is waiting."""
    async with session(ack=2, last_event_id="e-0") as s:
        peer = await s.server.accept()
        await peer.request()
        await peer.respond(
            429,
            {"error": "paused", "poll_url": "/streams/t/poll?after=e-0&client_id=c1"},
            [("retry-after", "2"), ("x-stream-pause", "true")],
        )
        paused = trio.current_time()
        poller = await s.server.accept()
        poll = await poller.request()
        assert trio.current_time() - paused == 2.0
        assert poll.target == "/streams/t/poll?after=e-0&client_id=c1&limit=2"
        await poller.respond(200, poll_answer(1, 2, resume=False))  # full: 2 of 2
        poll = await poller.request()
        assert trio.current_time() - paused == 2.0  # at once, not 2 s later
        await poller.respond(200, poll_answer(3, resume=False))  # not full: wait
        poll = await poller.request()
        assert trio.current_time() - paused == 4.0
        assert poll.target == "/streams/t/poll?after=e-3&client_id=c1&limit=2"


async def test_client_follows_a_pause_event_mid_stream(autojump_clock: object) -> None:
    """``event: pause`` after some events: poll, then stream, nothing lost or doubled."""
    async with session() as s:
        peer, _ = await s.server.stream()
        pause = json.dumps(
            {"poll_url": "/streams/t/poll?after=e-1&client_id=c1", "retry_after_ms": 1500}
        )
        # The server's "after" lags behind what the client got: the client polls after e-2.
        await peer.sse(sse(1, 2) + f"event: pause\ndata: {pause}\n\n")
        paused = trio.current_time()
        assert await peer.wait_closed() == paused  # the client hangs up at once

        poller = await s.server.accept()
        poll = await poller.request()
        assert trio.current_time() - paused == 1.5
        assert poll.target == "/streams/t/poll?after=e-2&client_id=c1"
        await poller.respond(200, poll_answer(3, 4, resume=False, reset=True))
        poll = await poller.request()
        assert trio.current_time() - paused == 3.0
        assert poll.target == "/streams/t/poll?after=e-4&client_id=c1"
        await poller.respond(200, poll_answer(resume=True))

        peer, _ = await s.server.stream(last_event_id="e-4")
        await peer.sse(sse(5))
        await settle()
        assert s.consumer.data == ["d1", "d2", "reset:gap", "d3", "d4", "d5"]
        assert s.consumer.got[2] == StreamReset(reason="gap", last_event_id="e-2", topic="t")


async def test_client_polls_after_the_last_event_it_received(autojump_clock: object) -> None:
    async with session(client_id="me") as s:
        peer, _ = await s.server.stream()
        pause = json.dumps({"poll_url": "/streams/t/poll?client_id=me", "retry_after_ms": 0})
        await peer.sse(sse(1) + f"event: pause\ndata: {pause}\n\n")
        poller = await s.server.accept()
        poll = await poller.request()
        assert poll.target == "/streams/t/poll?client_id=me&after=e-1"
        await poller.respond(200, poll_answer(2, resume=False))
        poll = await poller.request()
        assert poll.target == "/streams/t/poll?client_id=me&after=e-2"


async def test_client_several_topics(autojump_clock: object) -> None:
    """Composite ids; ``<topic>/<name>`` on the wire, ``topic`` and ``event`` apart for
    the caller, streamed or polled alike; acks to ``_ack``."""
    url = "http://example.test:8000/streams?topic=a&topic=b"
    async with session(url, ack=2, paced=True) as s:
        s.consumer.allow(2)
        peer, request = await s.server.stream(path="/streams")
        assert request.target == "/streams?topic=a&topic=b&ack=2"
        pause = json.dumps(
            {"poll_url": "/streams/_poll?topic=a&topic=b&after=c2&client_id=c1", "topic": "b"}
        )
        await peer.sse(
            "id: c1\nevent: a\ndata: x\n\nid: c2\nevent: b/tick\ndata: y\n\n"
            f"event: pause\ndata: {pause}\n\n"
        )
        acker = await s.server.accept()
        ack = await acker.request()
        assert (ack.method, ack.target) == ("POST", "/streams/_ack")
        assert ack.json() == {"client_id": "c1", "last_event_id": "c1", "buffer_utilization": 0.5}
        await acker.respond(204)

        s.consumer.allow(3)
        poller = await s.server.accept()
        poll = await poller.request()
        assert poll.target == "/streams/_poll?topic=a&topic=b&after=c2&client_id=c1&limit=2"
        answer = {
            "events": [
                {"id": "c3", "event": None, "data": "z", "topic": "a"},
                {"id": "c4", "event": "tick", "data": "w", "topic": "b"},
            ],
            "last_event_id": "c4",
            "reset": False,
            "resume_stream": True,
        }
        await poller.respond(200, answer)
        await s.server.stream(last_event_id="c4", path="/streams")
        await settle()
        assert [(e.topic, e.event, e.data) for e in s.consumer.got if isinstance(e, Event)] == [
            ("a", None, "x"),
            ("b", "tick", "y"),
            ("a", None, "z"),
            ("b", "tick", "w"),
        ]


async def test_client_several_topics_splits_wire_names(autojump_clock: object) -> None:
    """The first ``/`` ends the topic; a topic named like a control event is data."""
    url = "http://example.test:8000/streams?topic=reset&topic=b"
    async with session(url) as s:
        peer, _ = await s.server.stream(path="/streams")
        reset = json.dumps({"reason": "expired", "last_event_id": "c0", "topic": "b"})
        await peer.sse(
            f"event: reset\ndata: {reset}\n\n"
            "id: c1\nevent: reset\ndata: r\n\n"
            "id: c2\nevent: b/x/y\ndata: s\n\n"
            "id: c3\nevent: reset/pause\ndata: t\n\n"
        )
        await settle()
        assert s.consumer.got == [
            StreamReset(reason="expired", last_event_id="c0", topic="b"),
            Event(data="r", id="c1", topic="reset"),
            Event(data="s", event="x/y", id="c2", topic="b"),
            Event(data="t", event="pause", id="c3", topic="reset"),
        ]


async def test_client_one_topic_has_no_topic_and_keeps_names(autojump_clock: object) -> None:
    """On ``/streams/{topic}`` events are as the server framed them: ``topic`` is None."""
    async with session() as s:
        peer, _ = await s.server.stream()
        await peer.sse("id: e-1\nevent: a/b\ndata: x\n\n")
        await settle()
        assert s.consumer.got == [Event(data="x", event="a/b", id="e-1")]


# -- acks ------------------------------------------------------------------------------


async def test_client_acks_in_batches(autojump_clock: object) -> None:
    """Half the window done: ack at once; fewer: ``ack_interval`` later."""
    async with session(ack=4, ack_interval=0.1, paced=True) as s:
        s.consumer.allow(1)
        peer, request = await s.server.stream()
        assert request.target == "/streams/t?ack=4"
        await peer.sse(sse(1, 2, 3, 4))
        await settle()
        s.consumer.allow(1)  # e-1 done
        await settle()
        s.consumer.allow(1)  # e-2 done: half the window
        started = trio.current_time()
        acker = await s.server.accept()
        ack = await acker.request()
        assert trio.current_time() == started
        assert (ack.method, ack.target) == ("POST", "/streams/t/ack")
        assert ack.headers["content-type"] == "application/json"
        # buffer_utilization: e-3 and e-4 were waiting, of a window of 4
        assert ack.json() == {"client_id": "c1", "last_event_id": "e-2", "buffer_utilization": 0.5}
        await acker.respond(204)

        s.consumer.allow(1)  # e-3 done, alone
        ack = await acker.request()  # kept alive
        assert trio.current_time() - started == pytest.approx(0.1, abs=1e-9)
        assert ack.json() == {
            "client_id": "c1",
            "last_event_id": "e-3",
            "buffer_utilization": 0.25,
        }
        await acker.respond(204)
        await settle()
        assert s.consumer.data == ["d1", "d2", "d3", "d4"]
        stats = s.events.statistics()
        assert (stats.acks, stats.last_acked_id) == (2, "e-3")


async def test_client_explicit_acks(autojump_clock: object) -> None:
    async with session(ack=4, auto_ack=False, ack_interval=0.5) as s:
        peer, _ = await s.server.stream()
        await peer.sse(sse(1, 2, 3, 4))
        await settle()
        assert s.consumer.data == ["d1", "d2", "d3", "d4"]
        with trio.move_on_after(5.0) as waited:
            await s.server.accept()
        assert waited.cancelled_caught  # nothing is done: nothing acked

        third = s.consumer.got[2]
        assert isinstance(third, Event)
        s.events.ack(third)  # e-3 and all before it
        acker = await s.server.accept()
        ack = await acker.request()
        assert ack.json() == {"client_id": "c1", "last_event_id": "e-3", "buffer_utilization": 0.0}
        await acker.respond(204)
        acked = trio.current_time()

        got = s.consumer.got[1]
        assert isinstance(got, Event)
        s.events.ack(got)  # done already: nothing happens
        s.events.ack()  # the last one handed out
        ack = await acker.request()
        assert trio.current_time() - acked == 0.5
        assert ack.json()["last_event_id"] == "e-4"  # type: ignore[index]
        await acker.respond(204)


async def test_client_ack_failures_are_retried_or_dropped(autojump_clock: object) -> None:
    async with session(ack=1, ack_interval=0.1, paced=True) as s:
        s.consumer.allow(2)
        peer, _ = await s.server.stream()
        await peer.sse(sse(1, 2))
        acker = await s.server.accept()
        ack = await acker.request()
        await acker.respond(503, {"error": "busy"}, [("retry-after", "2")])
        failed = trio.current_time()
        ack = await acker.request()
        assert trio.current_time() - failed == 2.0
        assert ack.json()["last_event_id"] == "e-1"  # type: ignore[index]
        await acker.respond(409, {"error": "not sent"})  # dropped, no retry
        s.consumer.allow(1)
        ack = await acker.request()
        assert ack.json()["last_event_id"] == "e-2"  # type: ignore[index]
        await acker.respond(204)
        await settle()
        assert s.events.statistics().acks == 1


# -- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "message"), [(400, "ack must be an integer"), (403, "forbidden"), (404, "nope")]
)
async def test_client_raises_http_errors_with_the_message(
    autojump_clock: object, status: int, message: str
) -> None:
    async with session() as s:
        peer = await s.server.accept()
        await peer.request()
        await peer.respond(status, {"error": message})
        await settle()
        error = s.consumer.error
        assert isinstance(error, HTTPStatusError)
        assert isinstance(error, RemoteProtocolError)
        assert (error.status_code, error.message) == (status, message)
        assert str(error) == f"HTTP {status}: {message}"
        assert len(s.server.attempts) == 1
        with pytest.raises(trio.BrokenResourceError):
            await s.events.__anext__()


async def test_client_rejects_a_response_that_is_not_an_event_stream(
    autojump_clock: object,
) -> None:
    async with session() as s:
        peer = await s.server.accept()
        await peer.request()
        await peer.respond(200, b"<html></html>", [("content-type", "text/html")])
        await settle()
        assert isinstance(s.consumer.error, RemoteProtocolError)
        assert "text/event-stream" in str(s.consumer.error)
        assert "text/html" in str(s.consumer.error)
        await peer.wait_closed()


@pytest.mark.parametrize(
    ("garbage", "complaint"),
    [
        (b"zz\r\nnot a chunk\r\n", "malformed HTTP response"),
        ("event: pause\ndata: {not json\n\n", "malformed pause event"),
        ('event: pause\ndata: {"retry_after_ms": 5}\n\n', "no 'poll_url'"),
        ("event: reset\ndata: []\n\n", "malformed reset event"),
        (f"data: {'x' * (1024 * 1024 + 1)}\n\n", "line longer than"),
    ],
)
async def test_client_rejects_a_malformed_stream(
    autojump_clock: object, garbage: bytes | str, complaint: str
) -> None:
    async with session() as s:
        peer, _ = await s.server.stream()
        if isinstance(garbage, bytes):
            await peer.stream.send_all(garbage)  # below HTTP framing
        else:
            await peer.sse(garbage)
        await settle()
        assert isinstance(s.consumer.error, RemoteProtocolError)
        assert complaint in str(s.consumer.error)
        await peer.wait_closed()


async def test_client_rejects_a_malformed_poll_answer(autojump_clock: object) -> None:
    async with session() as s:
        peer = await s.server.accept()
        await peer.request()
        await peer.respond(
            429, {"poll_url": "/streams/t/poll?client_id=c1"}, [("x-stream-pause", "true")]
        )
        poller = await s.server.accept()
        await poller.request()
        await poller.respond(200, {"events": "nope", "reset": False, "resume_stream": False})
        await settle()
        assert isinstance(s.consumer.error, RemoteProtocolError)
        assert "malformed poll response" in str(s.consumer.error)


async def test_client_checks_its_arguments() -> None:
    for kwargs, complaint in [
        ({"ack": 0}, "ack must be"),
        ({"client_id": "no spaces"}, "invalid client id"),
        ({"headers": {"Last-Event-ID": "x"}}, "sets the 'Last-Event-ID'"),
        ({"heartbeat_timeout": 0}, "heartbeat_timeout must be positive"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"last_event_id": "a\nb"}, "last_event_id must not"),
        ({"headers": {"X-Trace": "a\r\nb"}}, "must not contain"),
    ]:
        with pytest.raises(LocalProtocolError, match=complaint):
            async with open_event_stream(URL, **kwargs):  # type: ignore[arg-type]
                pass  # pragma: no cover
    with pytest.raises(LocalProtocolError, match="http"):
        async with open_event_stream("ftp://example.test/streams/t"):
            pass  # pragma: no cover


# -- cancellation ----------------------------------------------------------------------


async def test_client_cancellation_leaves_no_task_or_socket(autojump_clock: object) -> None:
    before = all_tasks()
    server = Server()
    peers: list[Peer] = []

    async def serve() -> None:
        peer, _ = await server.stream()
        peers.append(peer)
        await peer.sse(sse(1, 2))

    with trio.move_on_after(5.0) as scope:
        async with (
            open_event_stream(URL, stream_factory=server.connect, ack=1) as events,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(serve)
            async for _ in events:
                pass
    assert scope.cancelled_caught
    assert all_tasks() == before
    with trio.fail_after(1):
        await peers[0].wait_closed()
        acker = await server.accept()  # the acker's connection, closed too
        await acker.wait_closed()
    with pytest.raises(trio.ClosedResourceError):
        await events.__anext__()


async def test_client_cancelled_while_connecting_closes_the_socket(
    autojump_clock: object,
) -> None:
    server = Server()
    async with open_event_stream(URL, stream_factory=server.connect, retry_jitter=0) as events:
        with trio.move_on_after(2.0):
            await events.__anext__()  # the server reads the request and never answers
        peer = await server.accept()
        with trio.fail_after(1):
            assert await peer.wait_closed() == 2.0
        # The next call goes on: a new attempt at once.
        async with trio.open_nursery() as nursery:

            async def serve() -> None:
                peer, _ = await server.stream()
                await peer.sse(sse(1))

            nursery.start_soon(serve)
            assert await events.__anext__() == Event(data="d1", id="e-1")
        assert server.attempts == [0.0, 2.0]


async def test_client_body_exceptions_leave_unwrapped(autojump_clock: object) -> None:
    server = Server()
    with pytest.raises(KeyError):
        async with open_event_stream(URL, stream_factory=server.connect, ack=3):
            raise KeyError("boom")


async def test_client_one_task_at_a_time(autojump_clock: object) -> None:
    async with session() as s:
        await s.server.accept()
        await settle()
        with pytest.raises(trio.BusyResourceError):
            await s.events.__anext__()


async def test_client_ack_outside_ack_mode_does_nothing(autojump_clock: object) -> None:
    async with session() as s:
        peer, _ = await s.server.stream()
        await peer.sse(sse(1))
        await settle()
        s.events.ack()
        with trio.move_on_after(1.0) as waited:
            await s.server.accept()
        assert waited.cancelled_caught


# -- publish ---------------------------------------------------------------------------


async def test_publish_posts_a_batch(autojump_clock: object) -> None:
    server = Server()
    async with trio.open_nursery() as nursery:

        async def serve() -> None:
            peer = await server.accept()
            request = await peer.request()
            assert (request.method, request.target) == ("POST", "/streams/t")
            assert request.headers["authorization"] == "Bearer tok"
            assert request.json() == [{"data": "a"}, {"data": "b\nc", "event": "x"}]
            await peer.respond(202, {"ids": ["e-1", "e-2"]})

        nursery.start_soon(serve)
        ids = await publish(
            URL,
            ["a", Event(data="b\nc", event="x")],
            publish_token="tok",
            stream_factory=server.connect,
        )
    assert ids == ["e-1", "e-2"]


async def test_publish_errors(autojump_clock: object) -> None:
    server = Server()
    async with trio.open_nursery() as nursery:

        async def serve() -> None:
            peer = await server.accept()
            await peer.request()
            await peer.respond(429, {"error": "topic 't' is full"}, [("retry-after", "2")])

        nursery.start_soon(serve)
        with pytest.raises(HTTPStatusError) as caught:
            await publish(URL, ["a"], stream_factory=server.connect)
    assert (caught.value.status_code, caught.value.retry_after) == (429, 2.0)
    assert caught.value.message == "topic 't' is full"
    with pytest.raises(LocalProtocolError, match="id"):
        await publish(URL, [Event(data="a", id="1")], stream_factory=server.connect)
    with pytest.raises(LocalProtocolError, match="topic"):
        await publish(URL, [Event(data="a", topic="t")], stream_factory=server.connect)


# -- end to end: the real app over hypercorn, real sockets, the real clock -------------


@contextlib.asynccontextmanager
async def real_server(**hub: object) -> AsyncIterator[str]:
    """`trio_stream`'s app served on a free loopback port; yields the base URL."""
    from trio_stream._asgi import App, AppConfig
    from trio_stream._cli import serve_app
    from trio_stream._hub import HubConfig

    settings: dict[str, object] = {"rate": 10_000.0, "burst": 1000, "retry_ms": 50}
    settings.update(hub)
    app = App(AppConfig(hub=HubConfig(**settings)))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(functools.partial(serve_app, app, host="127.0.0.1", port=0))
        yield urls[0]
        nursery.cancel_scope.cancel()


@pytest.mark.e2e
async def test_client_end_to_end_resumes_after_a_cut_connection() -> None:
    sockets: list[trio.SocketStream] = []

    async def connect(host: str, port: int) -> trio.abc.Stream:
        stream = await trio.open_tcp_stream(host, port)
        sockets.append(stream)
        return stream

    with trio.fail_after(10):
        async with real_server() as base:
            url = f"{base}/streams/t"
            (start,) = await publish(url, ["start"])
            published = await publish(url, [f"m{i}" for i in range(50)])
            got: list[str | None] = []
            async with open_event_stream(
                url, last_event_id=start, stream_factory=connect
            ) as events:
                async for event in events:
                    assert isinstance(event, Event)
                    got.append(event.id)
                    if len(got) == 20:
                        sockets[-1].socket.shutdown(socket.SHUT_RDWR)  # a network failure
                        published += await publish(url, [f"n{i}" for i in range(50)])
                    if len(got) == 100:
                        break
                stats = events.statistics()
    assert got == published
    assert (stats.connections, stats.duplicates) == (2, 0)


@pytest.mark.e2e
async def test_client_end_to_end_pause_poll_resume_in_ack_mode() -> None:
    """A lag limit of 10 and 60 events waiting: paused at once, polls, streams again."""
    with trio.fail_after(10):
        async with real_server(lag_limit=10, poll_interval=0.02) as base:
            url = f"{base}/streams/t"
            (start,) = await publish(url, ["start"])
            published = await publish(url, [f"m{i}" for i in range(60)])
            got: list[str | None] = []
            async with open_event_stream(url, ack=4, last_event_id=start) as events:
                async for event in events:
                    assert isinstance(event, Event)
                    got.append(event.id)
                    assert events.statistics().pending < 4
                    if len(got) == 60:
                        break
                stats = events.statistics()
    assert got == published
    assert stats.pauses >= 1
    assert stats.polls >= 1


@pytest.mark.e2e
async def test_client_end_to_end_errors() -> None:
    with trio.fail_after(10):
        async with real_server() as base:
            for path, status in [("/streams/no%20spaces", 400), ("/nowhere", 404)]:
                async with open_event_stream(base + path) as events:
                    with pytest.raises(HTTPStatusError) as caught:
                        await events.__anext__()
                assert caught.value.status_code == status
                assert caught.value.message
            async with open_event_stream(base + "/healthz") as events:
                with pytest.raises(RemoteProtocolError, match="text/event-stream"):
                    await events.__anext__()
