"""The client: a Server-Sent Events stream over ``trio`` and ``h11`` that keeps itself going.

`open_event_stream` opens a stream of one topic (``/streams/{topic}``) or of several
(``/streams?topic=a&topic=b``) and hands out an `EventStream`: an async iterator of the
events, in order, each once, across dropped connections, server restarts, pauses and
polling. Underneath:

```
GET /streams/t ──200──> h11 ──> Decoder ──> pending ──> __anext__ ──> caller
   ^  Last-Event-ID         │ pause / 429 X-Stream-Pause               │ done
   └── retry / back-off     └──> GET poll_url (until resume_stream)    └──> acker ──> POST /ack
```

Reading happens in the caller's task, only when it asks for the next event: a caller
that stops iterating stops reading the socket, and TCP carries the backpressure to the
server. The only task of its own is the acker, in ack mode.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import secrets
import ssl
from collections import deque
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import parse_qsl, quote, unquote, urlencode, urljoin, urlsplit

import attrs
import h11
import trio

from ._core._decoder import Decoder
from ._core._errors import LocalProtocolError, RemoteProtocolError, TrioStreamError
from ._core._events import Event
from ._core._idempotency import Published, check_idempotency_key
from ._core._names import check_client_id, check_event_name
from ._pipeline import _lone_exception_unwrapped

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping

__all__ = [
    "EventStream",
    "EventStreamStatistics",
    "HTTPStatusError",
    "StreamReset",
    "StreamResetError",
    "open_event_stream",
    "publish",
]

logger: Final = logging.getLogger("trio_stream")

DEFAULT_RETRY_INTERVAL: Final = 3.0
"""Seconds before reconnecting until the server has sent a ``retry:`` field."""

DEFAULT_MAX_RETRY_INTERVAL: Final = 30.0
"""Cap on the exponential back-off between failed attempts, in seconds."""

DEFAULT_RETRY_JITTER: Final = 0.25
"""Each delay is lengthened by a random fraction up to this, so clients spread out."""

DEFAULT_HEARTBEAT_TIMEOUT: Final = 45.0
"""Seconds without a byte after which a connection is presumed dead (3x the heartbeat)."""

DEFAULT_ACK_INTERVAL: Final = 0.1
"""Seconds an acknowledgement may wait to be batched with later ones."""

_RECEIVE_SIZE: Final = 65536
_MAX_ERROR_BODY: Final = 64 * 1024
_MAX_POLL_BODY: Final = 64 * 1024 * 1024
_DEFAULT_POLL_LIMIT: Final = 100  # the contract's default `limit` of a poll
_CONTROL_EVENTS: Final = frozenset({"reset", "pause", "reauth"})
_RESERVED_HEADERS: Final = frozenset(
    {"host", "last-event-id", "x-client-id", "content-length", "transfer-encoding"}
)
_USER_AGENT: Final = b"trio-stream"
_UNSAFE: Final = re.compile(r"[\r\n\0]")

# -- values and exceptions -------------------------------------------------------------


@attrs.frozen(kw_only=True)
class StreamReset:
    """Events were lost: the server could not resume right after *last_event_id*.

    The server sends this (``event: reset``) when the id a stream resumed from has left
    its replay log, or was never issued by it (after a server restart, say). The stream
    then goes on from the oldest event the server still holds; the events in between
    are gone. An application that keeps state built from the events should rebuild it.

    Attributes:
        reason: ``"expired"`` (the id was older than what the server retains),
            ``"unknown"`` (another epoch, never issued, malformed), or ``"gap"`` when a
            poll reported the loss without a reason.
        last_event_id: The id the client resumed from.
        topic: The topic the loss is on, when known.
    """

    reason: str
    last_event_id: str | None
    topic: str | None = None


class StreamResetError(TrioStreamError):
    """Raised instead of yielding a `StreamReset`, with ``raise_on_reset=True``.

    The stream stays usable: iterating again goes on after the gap.

    Attributes:
        reset: What was lost.
    """

    def __init__(self, reset: StreamReset) -> None:
        super().__init__(
            f"events after {reset.last_event_id!r} were lost ({reset.reason})"
            + (f" on topic {reset.topic!r}" if reset.topic else "")
        )
        self.reset = reset


class HTTPStatusError(RemoteProtocolError):
    """The server answered with an error status the client cannot get past by retrying.

    Attributes:
        status_code: The HTTP status, e.g. ``404``.
        message: The server's explanation: the ``error`` of its JSON body, or the start
            of the body as text.
        retry_after: The ``Retry-After`` header in seconds, when there was one.
    """

    def __init__(self, status_code: int, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status_code}: {message}" if message else f"HTTP {status_code}")
        self.status_code = status_code
        self.message = message
        self.retry_after = retry_after


@attrs.frozen(kw_only=True)
class EventStreamStatistics:
    """A snapshot of an `EventStream`.

    Attributes:
        client_id: The client id in use (``None`` until the server assigned one).
        state: ``"connecting"``, ``"streaming"``, ``"polling"``, ``"finished"`` (the
            server answered 204) or ``"closed"``.
        last_event_id: The id of the last event handed to the caller.
        resume_id: The id the next request resumes after (the last one received).
        connections: Streams opened (``200`` responses).
        failed_attempts: Consecutive failed attempts since the last success.
        events: Events handed to the caller.
        duplicates: Events dropped because the client had them already.
        resets: `StreamReset` notices handed to the caller.
        pauses: Switches from streaming to polling.
        polls: Polls answered ``200``.
        pending: Events received and not yet handed to the caller.
        acks: Acknowledgements the server accepted.
        last_acked_id: The id of the last of them.
    """

    client_id: str | None
    state: str
    last_event_id: str | None
    resume_id: str | None
    connections: int
    failed_attempts: int
    events: int
    duplicates: int
    resets: int
    pauses: int
    polls: int
    pending: int
    acks: int
    last_acked_id: str | None


class _Lost(Exception):
    """The connection broke, went silent or could not be made: try again later."""


# -- URLs and HTTP -----------------------------------------------------------------------


@attrs.frozen
class _Origin:
    scheme: str
    host: str
    port: int

    @property
    def host_header(self) -> bytes:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        value = host if self.port == default else f"{host}:{self.port}"
        return value.encode("ascii") if value.isascii() else value.encode("idna")


def _split_url(url: str) -> tuple[_Origin, str, list[tuple[str, str]]]:
    """``(origin, path, query)`` of an absolute http(s) URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LocalProtocolError(f"expected an http:// or https:// URL, got {url!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as error:
        raise LocalProtocolError(f"bad port in {url!r}") from error
    query = parse_qsl(parts.query, keep_blank_values=True)
    return _Origin(parts.scheme, parts.hostname, port), parts.path or "/", query


def _target(path: str, query: list[tuple[str, str]]) -> bytes:
    path = quote(path, safe="/%:@!$&'()*+,;=-._~")
    encoded = urlencode(query, quote_via=quote, safe="")
    return (f"{path}?{encoded}" if encoded else path).encode("ascii")


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


def _retry_after(headers: list[tuple[bytes, bytes]]) -> float | None:
    """``Retry-After`` as seconds; ``None`` when missing or an HTTP date."""
    value = _header(headers, b"retry-after")
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _error_message(body: bytes) -> str:
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if isinstance(document, dict) and isinstance(document.get("error"), str):
        return str(document["error"])
    return body[:200].decode("utf-8", "replace").strip()


@attrs.frozen(kw_only=True)
class _Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


async def _default_factory(origin: _Origin, ssl_context: ssl.SSLContext | None) -> trio.abc.Stream:
    if origin.scheme == "https":
        if ssl_context is None:
            ssl_context = ssl.create_default_context()
            ssl_context.set_alpn_protocols(["http/1.1"])  # h11 speaks HTTP/1.1 only
        return await trio.open_ssl_over_tcp_stream(
            origin.host, origin.port, ssl_context=ssl_context, https_compatible=True
        )
    return await trio.open_tcp_stream(origin.host, origin.port)


@attrs.define(eq=False)
class _HTTPConnection:
    """One HTTP/1.1 connection: h11 on a trio stream, every wait bounded by *silence*."""

    stream: trio.abc.Stream
    silence: float
    protocol: h11.Connection = attrs.field(factory=lambda: h11.Connection(h11.CLIENT))
    _eof: bool = False

    async def send(self, *events: h11.Event) -> None:
        data = b"".join(self.protocol.send(event) or b"" for event in events)
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, OSError) as error:
            _raise_if_certificate_error(error)
            raise _Lost(f"connection broke while sending: {error!r}") from error

    async def _receive(self) -> bytes:
        with trio.move_on_after(self.silence):
            try:
                return bytes(await self.stream.receive_some(_RECEIVE_SIZE))
            except (trio.BrokenResourceError, OSError) as error:
                _raise_if_certificate_error(error)
                raise _Lost(f"connection broke: {error!r}") from error
        raise _Lost(f"no bytes for {self.silence:g} s: the connection is presumed dead")

    async def next_event(self) -> h11.Event:
        """The next event from the server; `_Lost` at EOF, silence or breakage."""
        while True:
            try:
                event = self.protocol.next_event()
            except h11.RemoteProtocolError as error:
                if self._eof:
                    raise _Lost(f"connection closed mid-response: {error}") from error
                raise RemoteProtocolError(f"malformed HTTP response: {error}") from error
            if event is h11.NEED_DATA:
                if self._eof:  # pragma: no cover - h11 raises or ends first
                    raise _Lost("connection closed")
                data = await self._receive()
                self._eof = not data
                self.protocol.receive_data(data)
                continue
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                raise _Lost("connection closed")
            assert isinstance(event, h11.Event)
            return event

    async def request(
        self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes = b""
    ) -> h11.Response:
        if body:
            headers = [*headers, (b"content-length", str(len(body)).encode())]
        events: list[h11.Event] = [h11.Request(method=method, target=target, headers=headers)]
        if body:
            events.append(h11.Data(data=body))
        events.append(h11.EndOfMessage())
        await self.send(*events)
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Response):
                return event
            if not isinstance(event, h11.InformationalResponse):  # pragma: no cover
                raise RemoteProtocolError(f"unexpected {type(event).__name__} before response")

    async def body_chunk(self) -> bytes | None:
        """The next piece of the response body; ``None`` at its end."""
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Data):
                return bytes(event.data)
            if isinstance(event, h11.EndOfMessage):
                return None

    async def read_body(self, limit: int) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while (chunk := await self.body_chunk()) is not None:
            size += len(chunk)
            if size > limit:
                raise RemoteProtocolError(f"response body over {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def reusable(self) -> bool:
        return self.protocol.our_state is h11.DONE and self.protocol.their_state is h11.DONE

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


def _raise_if_certificate_error(error: BaseException) -> None:
    cause = error.__cause__ or error
    if isinstance(cause, ssl.SSLCertVerificationError):
        raise RemoteProtocolError(f"TLS certificate verification failed: {cause}") from error


@attrs.define(eq=False)
class _Requester:
    """Makes short requests (acks, polls, publishes), keeping the connection alive."""

    origin: _Origin
    open_stream: Callable[[_Origin], Awaitable[trio.abc.Stream]]
    silence: float
    _idle: _HTTPConnection | None = None

    async def _connect(self) -> _HTTPConnection:
        with trio.move_on_after(self.silence):
            try:
                stream = await self.open_stream(self.origin)
            except OSError as error:
                raise _Lost(
                    f"cannot connect to {self.origin.host}:{self.origin.port}: {error}"
                ) from error
            return _HTTPConnection(stream, self.silence)
        raise _Lost(f"connecting took over {self.silence:g} s")

    async def request(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes = b"",
        *,
        limit: int = _MAX_ERROR_BODY,
    ) -> _Response:
        """Send one request; retried once on a fresh connection if a kept one was stale.

        Raises:
            _Lost: The connection could not be made or broke.
        """
        conn, self._idle = self._idle, None
        reused = conn is not None
        if conn is None:
            conn = await self._connect()
        try:
            response = await conn.request(method, target, headers, body)
            content = await conn.read_body(limit)
        except _Lost:
            await conn.aclose()
            if reused:
                return await self.request(method, target, headers, body, limit=limit)
            raise
        except BaseException:
            await conn.aclose()
            raise
        if conn.reusable():
            conn.protocol.start_next_cycle()
            self._idle = conn
        else:
            await conn.aclose()
        return _Response(status=response.status_code, headers=list(response.headers), body=content)

    async def aclose(self) -> None:
        conn, self._idle = self._idle, None
        if conn is not None:
            await conn.aclose()


# -- the stream --------------------------------------------------------------------------


def _json_object(data: str | bytes, what: str) -> dict[str, object]:
    try:
        document = json.loads(data)
    except ValueError as error:
        raise RemoteProtocolError(f"malformed {what}: {error}") from error
    if not isinstance(document, dict):
        raise RemoteProtocolError(f"malformed {what}: expected a JSON object")
    return document


def _optional_str(document: dict[str, object], key: str, what: str) -> str | None:
    value = document.get(key)
    if value is not None and not isinstance(value, str):
        raise RemoteProtocolError(f"malformed {what}: {key!r} must be a string")
    return value


def _with_topic(event: Event) -> Event:
    """An event of a stream of several topics, its wire name ``<topic>[/<name>]`` split.

    Topics have no ``/``, so the first one ends the topic; the name may hold more.
    """
    if event.event is None:  # pragma: no cover - the server names every event
        return event
    topic, slash, name = event.event.partition("/")
    return attrs.evolve(event, topic=topic, event=name if slash else None)


def _delay_ms(document: dict[str, object], key: str, what: str) -> float | None:
    value = document.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise RemoteProtocolError(f"malformed {what}: {key!r} must be a non-negative number")
    return float(value) / 1000


@attrs.define(eq=False, repr=False)
class EventStream:
    """The events of an open stream; made by `open_event_stream`.

    Iterate over it (``async for item in events``) to receive, in order and each once,
    the `Event` values the server publishes, and a `StreamReset` wherever events were
    lost (unless ``raise_on_reset=True``, which raises `StreamResetError` instead). The
    iteration ends only if the server answers ``204 No Content``; the client reconnects
    after everything else it can get past.

    Each event keeps the fields the server sent: ``id`` (opaque: never parse it),
    ``event`` (``None`` for unnamed events) and ``data``. On a stream of several topics
    (``/streams?topic=a&topic=b``) each event's ``topic`` says which topic it belongs
    to and ``event`` is its own name, as published (the wire's ``event: a/tick`` becomes
    ``topic="a"``, ``event="tick"``; ``event: a`` becomes ``topic="a"``,
    ``event=None``), whether it was streamed or polled; its ``id`` is the stream's
    composite cursor, which resumes every topic at once. On a stream of one topic
    ``topic`` is ``None``.

    One task at a time may iterate.
    """

    _url: str
    _origin: _Origin
    _path: str
    _query: list[tuple[str, str]]
    _topic: str | None
    """The stream's topic, when it has one: what a `StreamReset` names by default."""
    _ack_path: str
    _client_id: str | None
    _resume_id: str | None
    _ack: int | None
    _auto_ack: bool
    _headers: list[tuple[bytes, bytes]]
    _raise_on_reset: bool
    _retry_interval: float
    _max_retry_interval: float
    _retry_jitter: float
    _max_attempts: int | None
    _heartbeat_timeout: float
    _ack_interval: float
    _open_stream: Callable[[_Origin], Awaitable[trio.abc.Stream]]
    _random: random.Random = attrs.field(factory=random.Random)
    _several: bool = False
    """A stream of several topics: events are named ``<topic>[/<name>]`` on the wire."""

    _state: Literal["connecting", "streaming", "polling", "finished", "closed"] = "connecting"
    _pending: deque[Event | StreamReset] = attrs.field(factory=deque)
    _conn: _HTTPConnection | None = None
    _decoder: Decoder | None = None
    _stream_last_id: str | None = None
    _server_retry: float | None = None
    _next_attempt_at: float = -math.inf
    _failures: int = 0
    _poll_url: str | None = None
    _poll_delay: float = 0.0
    _poll_limit: int = 100
    _poll_requester: _Requester | None = None
    _broken: BaseException | None = None
    _receiving: bool = False
    _last_yielded: str | None = None

    # ack state, shared with the acker task
    _unacked: deque[str] = attrs.field(factory=deque)
    _current: str | None = None
    _done_id: str | None = None
    _done_count: int = 0
    _done_utilization: float = 0.0
    _done_since: float | None = None
    _posted_id: str | None = None
    _ack_wakeup: trio.Event = attrs.field(factory=trio.Event)

    # statistics
    _connections: int = 0
    _events: int = 0
    _duplicates: int = 0
    _resets: int = 0
    _pauses: int = 0
    _polls: int = 0
    _acks: int = 0

    def __attrs_post_init__(self) -> None:
        self._last_yielded = self._resume_id

    def __repr__(self) -> str:
        return f"<EventStream {self._url} {self._state}, last event id {self._last_yielded!r}>"

    # -- public ----------------------------------------------------------------------

    @property
    def client_id(self) -> str | None:
        """The client id: the one given, else the one the server assigned; sent as ``X-Client-ID``.

        ``None`` only before the first stream response when none was given.
        """
        return self._client_id

    @property
    def last_event_id(self) -> str | None:
        """The id of the last event handed to the caller.

        Before the first, the ``last_event_id`` the stream was opened with. Pass it as
        ``last_event_id`` to a later `open_event_stream` to go on from there.
        """
        return self._last_yielded

    def statistics(self) -> EventStreamStatistics:
        """A snapshot of the stream's state and counters."""
        return EventStreamStatistics(
            client_id=self._client_id,
            state=self._state,
            last_event_id=self._last_yielded,
            resume_id=self._resume_id,
            connections=self._connections,
            failed_attempts=self._failures,
            events=self._events,
            duplicates=self._duplicates,
            resets=self._resets,
            pauses=self._pauses,
            polls=self._polls,
            pending=len(self._pending),
            acks=self._acks,
            last_acked_id=self._posted_id,
        )

    def ack(self, event: Event | None = None) -> None:
        """Mark *event* (default: the last one handed out) and all before it as done.

        In ack mode the client acknowledges done events to the server, in batches: as
        soon as half the window is done, else ``ack_interval`` seconds after the first of
        them. With ``auto_ack`` (the default) asking for the next event marks the
        previous one done, so calling this is needed only to acknowledge earlier, or
        with ``auto_ack=False``. Acknowledging an event that is not outstanding (done
        already, or not from this stream) does nothing, and so does calling this
        outside ack mode.

        **Backpressure:** in ack mode the server sends at most ``ack`` events beyond the
        last acknowledged one: events not marked done hold the stream back.
        """
        if self._ack is None:
            return
        target = self._current if event is None else event.id
        if target is None or target not in self._unacked:
            return
        count = 0
        while self._unacked:
            count += 1
            if self._unacked.popleft() == target:
                break
        if self._current is not None and self._current not in self._unacked:
            self._current = None
        self._done_id = target
        self._done_utilization = min(1.0, len(self._pending) / self._ack)
        self._done_count += count
        if self._done_since is None:
            self._done_since = trio.current_time()
        self._ack_wakeup.set()

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event | StreamReset:
        """The next event (or reset notice), waiting, reconnecting and polling as needed.

        Raises:
            StopAsyncIteration: The server answered ``204 No Content``: it wants this
                client to stop.
            StreamResetError: Events were lost and ``raise_on_reset`` is set.
            HTTPStatusError: The server refused the stream or a poll with a status
                other than 429 or 5xx (400, 401, 403, 404, ...).
            RemoteProtocolError: The server answered a stream request with something
                other than ``text/event-stream``, or sent a malformed response, stream,
                ``reset``, ``pause`` or poll answer.
            trio.BrokenResourceError: ``max_attempts`` attempts failed in a row, or the
                stream failed earlier with one of the errors above.
            trio.BusyResourceError: Another task is iterating.
            trio.ClosedResourceError: The ``async with`` block has been left.

        **Cancellation:** safe at any point: nothing received is lost, and the next
        call goes on where this one stopped (a half-made connection is closed). With
        ``auto_ack``, the previous event counts as done even so.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._state == "closed":
            raise trio.ClosedResourceError("the event stream is closed")
        if self._broken is not None:
            raise trio.BrokenResourceError("the event stream failed earlier") from self._broken
        if self._receiving:
            raise trio.BusyResourceError("another task is iterating over this event stream")
        if self._auto_ack and self._current is not None:
            self.ack()
        self._receiving = True
        waited = False
        try:
            while not self._pending:
                if self._state == "finished":
                    raise StopAsyncIteration
                waited = True
                await self._fill()
        except (TrioStreamError, trio.BrokenResourceError) as error:
            self._broken = error
            await self._drop_connection()
            raise
        finally:
            self._receiving = False
        item = self._pending.popleft()
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()
        if isinstance(item, StreamReset):
            self._resets += 1
            if self._raise_on_reset:
                raise StreamResetError(item)
            return item
        self._events += 1
        if item.id is not None:
            self._last_yielded = item.id
            if self._ack is not None:
                self._unacked.append(item.id)
                self._current = item.id
        return item

    # -- receiving -------------------------------------------------------------------

    async def _fill(self) -> None:
        if self._state == "polling":
            await self._poll()
        elif self._conn is None:
            await self._connect()
        else:
            await self._read()

    def _retry_delay(self, *, failures: int, at_least: float = 0.0) -> float:
        base = self._retry_interval if self._server_retry is None else self._server_retry
        backed_off = base * 2.0 ** min(max(failures - 1, 0), 62)
        delay = max(base, min(self._max_retry_interval, backed_off), at_least)
        return delay * (1 + self._retry_jitter * self._random.random())

    def _schedule_retry(self, error: BaseException | None, *, at_least: float = 0.0) -> None:
        """Count a failed attempt and set when the next may start (or give up)."""
        self._failures += 1
        if self._max_attempts is not None and self._failures >= self._max_attempts:
            if isinstance(error, HTTPStatusError):
                raise error
            raise trio.BrokenResourceError(
                f"gave up on {self._url} after {self._failures} failed attempts: {error}"
            ) from error
        delay = self._retry_delay(failures=self._failures, at_least=at_least)
        logger.debug("%s: attempt failed (%s), retrying in %.3f s", self._url, error, delay)
        self._next_attempt_at = trio.current_time() + delay

    def _request_headers(self, origin: _Origin | None = None) -> list[tuple[bytes, bytes]]:
        host = (origin or self._origin).host_header
        headers = [(b"host", host), (b"user-agent", _USER_AGENT)]
        if self._client_id is not None:
            headers.append((b"x-client-id", self._client_id.encode()))
        return headers + self._headers

    async def _connect(self) -> None:
        await trio.sleep_until(self._next_attempt_at)
        self._state = "connecting"
        headers = [
            *self._request_headers(),
            (b"accept", b"text/event-stream"),
            (b"cache-control", b"no-cache"),
        ]
        if self._resume_id is not None:
            headers.append((b"last-event-id", self._resume_id.encode()))
        conn: _HTTPConnection | None = None
        body = b""
        try:
            with trio.move_on_after(self._heartbeat_timeout):
                try:
                    stream = await self._open_stream(self._origin)
                except OSError as error:
                    raise _Lost(f"cannot connect: {error}") from error
                conn = _HTTPConnection(stream, self._heartbeat_timeout)
            if conn is None:
                raise _Lost(f"connecting took over {self._heartbeat_timeout:g} s")
            response = await conn.request(b"GET", _target(self._path, self._query), headers)
            status = response.status_code
            if status != 200:
                body = await conn.read_body(_MAX_ERROR_BODY)
        except _Lost as error:
            if conn is not None:
                await conn.aclose()
            self._schedule_retry(error)
            return
        except BaseException:
            if conn is not None:
                await conn.aclose()
            raise
        response_headers = list(response.headers)
        if status == 200:
            content_type = _header(response_headers, b"content-type") or ""
            if content_type.split(";")[0].strip().lower() != "text/event-stream":
                await conn.aclose()
                raise RemoteProtocolError(
                    f"expected a text/event-stream response from {self._url}, "
                    f"got {content_type or 'no content type'!r}"
                )
            self._adopt_client_id(response_headers)
            self._conn = conn
            self._decoder = Decoder()
            self._stream_last_id = None
            self._failures = 0
            self._connections += 1
            self._state = "streaming"
            return
        await conn.aclose()
        self._on_refusal(status, response_headers, body)

    def _adopt_client_id(self, headers: list[tuple[bytes, bytes]]) -> None:
        if self._client_id is not None:
            return
        assigned = _header(headers, b"x-client-id")
        if assigned is None:
            self._client_id = secrets.token_urlsafe(16)
            return
        try:
            self._client_id = check_client_id(assigned)
        except LocalProtocolError as error:
            raise RemoteProtocolError(f"the server assigned a bad client id: {error}") from None

    def _on_refusal(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """A stream request answered with something else than 200."""
        retry_after = _retry_after(headers)
        if status == 204:
            self._state = "finished"
        elif status == 429 and (_header(headers, b"x-stream-pause") or "").lower() == "true":
            document = _json_object(body, "pause response")
            poll_url = _optional_str(document, "poll_url", "pause response")
            if poll_url is None:
                raise RemoteProtocolError("malformed pause response: no 'poll_url'")
            self._failures = 0
            self._start_polling(poll_url, retry_after)
        elif status == 429:
            # The server is fine and says when to come back: not a failure.
            delay = self._retry_delay(failures=1) if retry_after is None else retry_after
            self._next_attempt_at = trio.current_time() + delay
        elif status >= 500:
            self._schedule_retry(
                HTTPStatusError(status, _error_message(body), retry_after=retry_after),
                at_least=retry_after or 0.0,
            )
        else:
            raise HTTPStatusError(status, _error_message(body), retry_after=retry_after)

    async def _read(self) -> None:
        conn, decoder = self._conn, self._decoder
        assert conn is not None
        assert decoder is not None
        try:
            chunk = await conn.body_chunk()
        except _Lost as error:
            logger.debug("%s: stream lost (%s)", self._url, error)
            chunk = None
        if chunk is None:
            # The stream ended or broke: come back after the retry interval.
            self._state = "connecting"
            await self._drop_connection()
            self._next_attempt_at = trio.current_time() + self._retry_delay(failures=0)
            return
        over = self._accept(decoder.feed(chunk))
        if decoder.retry is not None:
            self._server_retry = decoder.retry / 1000
        if over:
            await self._drop_connection()

    def _accept(self, events: list[Event]) -> bool:
        """Queue the decoded *events*, acting on control events; True when the stream is over.

        No await in here: the state moves in one step.
        """
        for event in events:
            fresh = event.id is not None and event.id != self._stream_last_id
            if fresh:
                self._stream_last_id = event.id
            elif event.event in _CONTROL_EVENTS:
                # Control events carry no id line: the last id in force repeats.
                if self._control(event):
                    return True
                continue
            if fresh and event.id == self._resume_id:
                self._duplicates += 1
                continue
            if fresh:
                self._resume_id = event.id
            if self._several:
                event = _with_topic(event)
            self._pending.append(event)
        return False

    def _control(self, event: Event) -> bool:
        """Act on a control event; True when the stream is over."""
        if event.event == "reset":
            document = _json_object(event.data, "reset event")
            self._pending.append(
                StreamReset(
                    reason=_optional_str(document, "reason", "reset event") or "unknown",
                    last_event_id=_optional_str(document, "last_event_id", "reset event"),
                    topic=_optional_str(document, "topic", "reset event") or self._topic,
                )
            )
            return False
        if event.event == "pause":
            document = _json_object(event.data, "pause event")
            poll_url = _optional_str(document, "poll_url", "pause event")
            if poll_url is None:
                raise RemoteProtocolError("malformed pause event: no 'poll_url'")
            self._start_polling(poll_url, _delay_ms(document, "retry_after_ms", "pause event"))
            return True
        # reauth: the server ends the stream; reconnecting tells whether we may go on.
        return False

    def _start_polling(self, poll_url: str, delay: float | None) -> None:
        self._pauses += 1
        self._state = "polling"
        self._poll_url = urljoin(self._url, poll_url)
        try:
            query = _split_url(self._poll_url)[2]
        except LocalProtocolError as error:
            raise RemoteProtocolError(f"bad poll_url {poll_url!r}: {error}") from None
        if self._client_id is None:
            self._client_id = next((v for k, v in query if k == "client_id"), None)
        if delay is None:
            delay = self._retry_delay(failures=0)
        self._poll_delay = delay
        self._next_attempt_at = trio.current_time() + delay
        logger.debug("%s: paused, polling %s in %.3f s", self._url, self._poll_url, delay)

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if self._decoder is not None:
            self._decoder.close()
        if conn is not None:
            await conn.aclose()

    # -- polling ---------------------------------------------------------------------

    async def _poll(self) -> None:
        await trio.sleep_until(self._next_attempt_at)
        assert self._poll_url is not None
        origin, path, query = _split_url(self._poll_url)
        # Poll after the last event received: the client knows best what it has.
        after = self._resume_id
        if after is None:
            after = next((v for k, v in query if k == "after"), None)
        elif any(k == "after" for k, _ in query):
            query = [(k, after if k == "after" else v) for k, v in query]
        else:
            query.append(("after", after))
        if self._ack is not None and not any(k == "limit" for k, _ in query):
            # In ack mode the window bounds the client's buffer: polls too.
            query.append(("limit", str(self._ack)))
        given = next((v for k, v in query if k == "limit"), None)
        self._poll_limit = int(given) if given and given.isdigit() else _DEFAULT_POLL_LIMIT
        requester = self._poll_requester
        if requester is None or requester.origin != origin:
            if requester is not None:
                await requester.aclose()
            requester = self._poll_requester = _Requester(
                origin, self._open_stream, self._heartbeat_timeout
            )
        try:
            response = await requester.request(
                b"GET",
                _target(path, query),
                [*self._request_headers(origin), (b"accept", b"application/json")],
                limit=_MAX_POLL_BODY,
            )
        except _Lost as lost:
            self._schedule_retry(lost)
            return
        retry_after = _retry_after(response.headers)
        if response.status == 429:
            delay = self._retry_delay(failures=1) if retry_after is None else retry_after
            self._next_attempt_at = trio.current_time() + delay
            return
        if response.status >= 500:
            failure = HTTPStatusError(
                response.status, _error_message(response.body), retry_after=retry_after
            )
            self._schedule_retry(failure, at_least=retry_after or 0.0)
            return
        if response.status != 200:
            raise HTTPStatusError(
                response.status, _error_message(response.body), retry_after=retry_after
            )
        self._failures = 0
        self._polls += 1
        self._accept_poll(_json_object(response.body, "poll response"), after)

    def _accept_poll(self, document: dict[str, object], after: str | None) -> None:
        what = "poll response"
        items = document.get("events")
        reset, resume = document.get("reset"), document.get("resume_stream")
        if not isinstance(items, list):
            raise RemoteProtocolError(f"malformed {what}: 'events' must be a list")
        if not isinstance(reset, bool) or not isinstance(resume, bool):
            raise RemoteProtocolError(
                f"malformed {what}: 'reset' and 'resume_stream' must be bools"
            )
        last = _optional_str(document, "last_event_id", what)
        events: list[Event] = []
        for item in items:
            if not isinstance(item, dict):
                raise RemoteProtocolError(f"malformed {what}: each event must be an object")
            event_id = _optional_str(item, "id", what)
            name = _optional_str(item, "event", what)
            data = _optional_str(item, "data", what)
            topic = _optional_str(item, "topic", what)
            if event_id is None or data is None:
                raise RemoteProtocolError(f"malformed {what}: each event needs 'id' and 'data'")
            try:
                events.append(Event(data=data, event=name, id=event_id, topic=topic))
            except LocalProtocolError as error:
                raise RemoteProtocolError(f"malformed {what}: {error}") from None
        if reset:
            self._pending.append(StreamReset(reason="gap", last_event_id=after, topic=self._topic))
        for event in events:
            if event.id == self._resume_id:
                self._duplicates += 1
                continue
            self._resume_id = event.id
            self._pending.append(event)
        if last is not None:
            self._resume_id = last
        now = trio.current_time()
        if resume:
            self._state = "connecting"
            self._poll_url = None
            self._next_attempt_at = now
        elif len(items) >= self._poll_limit:
            # A full page: more is waiting. Poll again as soon as these are consumed
            # rather than after the pause's interval, or a small window never catches up.
            self._next_attempt_at = now
        else:
            self._next_attempt_at = now + self._poll_delay

    # -- acknowledgements ------------------------------------------------------------

    async def _run_acker(self) -> None:
        """Post acknowledgements of done events, batched; runs in the stream's nursery."""
        assert self._ack is not None
        batch = max(1, self._ack // 2)
        requester = _Requester(self._origin, self._open_stream, self._heartbeat_timeout)
        failures = 0
        try:
            while True:
                while self._done_id is None or self._done_since is None:
                    self._ack_wakeup = trio.Event()
                    await self._ack_wakeup.wait()
                deadline = self._done_since + self._ack_interval
                while self._done_count < batch and trio.current_time() < deadline:
                    self._ack_wakeup = trio.Event()
                    with trio.move_on_at(deadline):
                        await self._ack_wakeup.wait()
                ack_id = self._done_id
                self._done_count, self._done_since = 0, None
                delay = await self._post_ack(requester, ack_id)
                if delay is None:
                    failures = 0
                    continue
                # Not delivered: keep it due, try again later (a later ack supersedes it).
                failures += 1
                if self._done_since is None:
                    self._done_since = trio.current_time()
                self._done_count += batch  # no waiting for a batch on the retry
                await trio.sleep(
                    max(delay, min(self._max_retry_interval, self._ack_interval * 2**failures))
                )
        finally:
            with trio.CancelScope(shield=True):
                await requester.aclose()

    async def _post_ack(self, requester: _Requester, ack_id: str) -> float | None:
        """POST one ack; ``None`` when done with it, else seconds to wait before retrying."""
        if self._client_id is None:  # pragma: no cover - known once a stream is open
            return None
        body = json.dumps(
            {
                "client_id": self._client_id,
                "last_event_id": ack_id,
                "buffer_utilization": self._done_utilization,
            }
        ).encode()
        headers = [*self._request_headers(), (b"content-type", b"application/json")]
        try:
            response = await requester.request(b"POST", _target(self._ack_path, []), headers, body)
        except _Lost as error:
            logger.debug("%s: ack of %r failed (%s)", self._url, ack_id, error)
            return 0.0
        if response.status in (200, 202, 204):
            self._acks += 1
            self._posted_id = ack_id
            return None
        retry_after = _retry_after(response.headers)
        message = _error_message(response.body)
        if response.status == 429 or response.status >= 500:
            return retry_after or 0.0
        if response.status in (401, 403):
            raise HTTPStatusError(response.status, message, retry_after=retry_after)
        # 404 (the server forgot this client), 409 (not sent: e.g. the server restarted)
        # or 400 (an id from the server's previous epoch): the stream resumes by
        # Last-Event-ID anyway, so the ack is dropped.
        logger.warning(
            "%s: ack of %r refused: HTTP %d %s", self._url, ack_id, response.status, message
        )
        return None

    async def _aclose(self) -> None:
        self._state = "closed"
        await self._drop_connection()
        if self._poll_requester is not None:
            await self._poll_requester.aclose()


def _check_duration(
    name: str, value: float, *, positive: bool = False, infinite: bool = False
) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or math.isnan(value)
        or (math.isinf(value) and not infinite)
    ):
        raise LocalProtocolError(f"{name} must be a number of seconds, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise LocalProtocolError(
            f"{name} must be {'positive' if positive else '>= 0'}, got {value!r}"
        )
    return float(value)


def _stream_path(path: str, query: list[tuple[str, str]]) -> tuple[str | None, bool, str]:
    """``(topic, several, ack path)`` of a stream URL's path and query.

    ``/streams/{topic}`` is one topic's stream, acknowledged at ``/streams/{topic}/ack``;
    ``/streams?topic=a&topic=b`` (even with one ``topic``) a stream of several,
    acknowledged at ``/streams/_ack``.
    """
    topics = [value for key, value in query if key == "topic"]
    stem = path.rstrip("/")
    if topics:
        return (topics[0] if len(topics) == 1 else None), True, stem + "/_ack"
    return unquote(stem.split("/")[-1]) or None, False, stem + "/ack"


def _stream_settings(
    query: list[tuple[str, str]],
    *,
    client_id: str | None,
    last_event_id: str | None,
    ack: int | None,
    max_attempts: int | None,
    headers: Mapping[str, str] | None,
    retry_interval: float,
    max_retry_interval: float,
    retry_jitter: float,
    heartbeat_timeout: float,
    ack_interval: float,
    stream_factory: Callable[[str, int], Awaitable[trio.abc.Stream]] | None,
    ssl_context: ssl.SSLContext | None,
    reserved_headers: frozenset[str] = frozenset(),
) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """Check the options both clients take (SSE and WebSocket).

    Returns:
        The query with ``ack`` in it, and the `EventStream` arguments the options make.

    Raises:
        LocalProtocolError: An option is not acceptable (the message names it).
    """
    if client_id is not None:
        check_client_id(client_id)
    if last_event_id is not None and _UNSAFE.search(last_event_id):
        raise LocalProtocolError(f"last_event_id must not contain CR, LF or NUL: {last_event_id!r}")
    if ack is not None:
        if isinstance(ack, bool) or not isinstance(ack, int) or not 1 <= ack <= 10_000:
            raise LocalProtocolError(f"ack must be an integer from 1 to 10000, got {ack!r}")
        query = [(key, value) for key, value in query if key != "ack"] + [("ack", str(ack))]
    if max_attempts is not None and (
        isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1
    ):
        raise LocalProtocolError(f"max_attempts must be a positive integer, got {max_attempts!r}")
    extra: list[tuple[bytes, bytes]] = []
    for name, value in (headers or {}).items():
        lowered = name.lower()
        if lowered in _RESERVED_HEADERS or lowered in reserved_headers:
            raise LocalProtocolError(f"the client sets the {name!r} header itself")
        if _UNSAFE.search(name + value):
            raise LocalProtocolError(f"header {name!r} must not contain CR, LF or NUL")
        extra.append((name.encode("ascii"), value.encode("latin-1")))

    async def open_stream(to: _Origin) -> trio.abc.Stream:
        if stream_factory is not None:
            return await stream_factory(to.host, to.port)
        return await _default_factory(to, ssl_context)

    return query, {
        "client_id": client_id,
        "resume_id": last_event_id,
        "ack": ack,
        "headers": extra,
        "max_attempts": max_attempts,
        "retry_interval": _check_duration("retry_interval", retry_interval),
        "max_retry_interval": _check_duration(
            "max_retry_interval", max_retry_interval, infinite=True
        ),
        "retry_jitter": _check_duration("retry_jitter", retry_jitter),
        "heartbeat_timeout": _check_duration(
            "heartbeat_timeout", heartbeat_timeout, positive=True, infinite=True
        ),
        "ack_interval": _check_duration("ack_interval", ack_interval),
        "open_stream": open_stream,
    }


@asynccontextmanager
async def open_event_stream(
    url: str,
    *,
    client_id: str | None = None,
    last_event_id: str | None = None,
    ack: int | None = None,
    auto_ack: bool = True,
    headers: Mapping[str, str] | None = None,
    raise_on_reset: bool = False,
    retry_interval: float = DEFAULT_RETRY_INTERVAL,
    max_retry_interval: float = DEFAULT_MAX_RETRY_INTERVAL,
    retry_jitter: float = DEFAULT_RETRY_JITTER,
    max_attempts: int | None = None,
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
    ack_interval: float = DEFAULT_ACK_INTERVAL,
    ssl_context: ssl.SSLContext | None = None,
    stream_factory: Callable[[str, int], Awaitable[trio.abc.Stream]] | None = None,
) -> AsyncIterator[EventStream]:
    """Open a Server-Sent Events stream and iterate over its events.

    ::

        async with open_event_stream("http://127.0.0.1:8000/streams/prices") as events:
            async for event in events:
                if isinstance(event, StreamReset):
                    ...  # events were lost: resynchronise
                else:
                    print(event.id, event.event, event.data)

    The client connects lazily, at the first iteration, and from then on keeps the
    stream going by itself:

    - **Reconnects** when the stream ends or breaks, after the server's ``retry:``
      interval (else *retry_interval*), sending ``Last-Event-ID`` so the server resumes
      right after the last event received. Failed attempts back off exponentially up to
      *max_retry_interval* (never below the server's interval); each delay is lengthened
      by a random fraction of up to *retry_jitter*. A ``429`` is retried after its
      ``Retry-After``, a 5xx or a refused connection after the back-off.
    - **Never yields an event twice**: an event carrying the id the client resumed from
      is dropped. Ids are opaque; the server's exact resume does the rest.
    - **Surfaces losses**: the server's ``reset`` becomes a `StreamReset` in the
      iteration, or a `StreamResetError` with *raise_on_reset*.
    - **Follows pauses**: on ``event: pause``, or a ``429`` with ``X-Stream-Pause:
      true``, it polls the given ``poll_url`` (after the last id it received, at the
      pace the server asks for, honouring ``429`` + ``Retry-After``), yields the polled
      events through the same iterator and goes back to streaming when the poll says
      ``resume_stream``. The caller sees one ordered stream.
    - **Detects dead connections**: when no byte at all (not even a heartbeat comment)
      arrives for *heartbeat_timeout* seconds, while it is waiting for the server, it
      drops the connection and reconnects.

    Args:
        url: ``http(s)://host[:port]/streams/{topic}``, or ``.../streams?topic=a&topic=b``
            for several topics on one stream (1 to 16; each event's ``topic`` then names
            its topic, and ids are composite cursors over all of them); other query
            parameters are passed on.
        client_id: Sent as ``X-Client-ID``. By default the client adopts the id the
            server assigns on the first stream (the ``sub`` of a JWT, with auth).
        last_event_id: Resume after this id (say, a saved `EventStream.last_event_id`).
        ack: Ack mode with a window of this many events (1-10000): adds ``?ack=N``; the
            server sends at most *ack* events beyond the last acknowledged one.
        auto_ack: In ack mode, asking for the next event marks the previous one done.
            With ``False``, call `EventStream.ack`.
        headers: Extra request headers, e.g. ``Authorization``.
        raise_on_reset: Raise `StreamResetError` instead of yielding `StreamReset`.
        retry_interval: Seconds before reconnecting, until the server sends ``retry:``.
        max_retry_interval: Cap on the back-off between failed attempts.
        retry_jitter: Largest random fraction added to each delay (0 for none).
        max_attempts: Consecutive failed attempts (no connection, broken before a
            response, silence, 5xx) after which iteration raises; ``None`` retries
            for ever. Successes, pauses and ``429`` answers reset or don't count.
        heartbeat_timeout: Seconds without a byte after which a connection, or a
            connection attempt, is given up as dead (`math.inf`: never).
        ack_interval: Seconds a done event may wait to be acknowledged with later ones.
        ssl_context: For ``https`` URLs; by default `ssl.create_default_context`.
        stream_factory: ``await stream_factory(host, port)`` opens the byte stream of
            each connection; by default TCP (`trio.open_tcp_stream`), with TLS for
            ``https``. Tests pass one end of `trio.testing.memory_stream_pair`.

    Yields:
        The `EventStream`.

    Raises:
        LocalProtocolError: A bad URL, client id, ack window or duration, or *headers*
            setting ``Host``, ``Last-Event-ID`` or ``X-Client-ID`` (pass the
            parameters instead).
        HTTPStatusError: In ack mode, the server refused an acknowledgement with 401
            or 403 (other refusals are logged and the acknowledgement dropped: the
            stream resumes by ``Last-Event-ID`` regardless).
        Exception: Errors of the ``async with`` body leave as themselves, not as an
            exception group; see `EventStream.__anext__` for those of the iteration.

    **Backpressure:** the socket is read only while the caller waits for an event, so
    a slow caller slows the server down through TCP. Events already received wait in
    the stream (at most what one read brings, or the *ack* window).

    **Cancellation:** leaving the block in any way closes every connection and
    cancels the acker: no task or socket outlives it. Acknowledgements not yet sent are
    not sent; the server resumes by ``Last-Event-ID`` regardless.
    """
    origin, path, query = _split_url(url)
    topic, several, ack_path = _stream_path(path, query)
    query, settings = _stream_settings(
        query,
        client_id=client_id,
        last_event_id=last_event_id,
        ack=ack,
        max_attempts=max_attempts,
        headers=headers,
        retry_interval=retry_interval,
        max_retry_interval=max_retry_interval,
        retry_jitter=retry_jitter,
        heartbeat_timeout=heartbeat_timeout,
        ack_interval=ack_interval,
        stream_factory=stream_factory,
        ssl_context=ssl_context,
    )
    stream = EventStream(
        url=url,
        origin=origin,
        path=path,
        query=query,
        topic=topic,
        several=several,
        ack_path=ack_path,
        auto_ack=auto_ack,
        raise_on_reset=raise_on_reset,
        **settings,
    )
    with _lone_exception_unwrapped():
        async with trio.open_nursery() as nursery:
            if ack is not None:
                nursery.start_soon(stream._run_acker)
            try:
                yield stream
            finally:
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    await stream._aclose()


async def publish(
    url: str,
    events: Iterable[Event | str],
    *,
    headers: Mapping[str, str] | None = None,
    publish_token: str | None = None,
    idempotency_key: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    stream_factory: Callable[[str, int], Awaitable[trio.abc.Stream]] | None = None,
) -> Published:
    """Publish *events* to a topic with ``POST /streams/{topic}``, all or none.

    Args:
        url: ``http(s)://host[:port]/streams/{topic}``.
        events: `Event` values (``data`` and optionally ``event``; the server assigns
            the ids) or strings (the data of unnamed events).
        headers: Extra request headers.
        publish_token: Sent as ``Authorization: Bearer <token>`` (``--publish-token``).
        idempotency_key: Sent as ``Idempotency-Key`` (1-128 visible ASCII characters):
            a publish whose answer was lost may then be retried with the same key and
            events; within the server's ``--log-ttl``, the retry publishes nothing and
            answers the first publish's ids.
        ssl_context: For ``https`` URLs.
        stream_factory: As for `open_event_stream`.

    Returns:
        The ids the server gave the events, in order (a ``list[str]``); ``replayed`` is
        true when the server answered with those of an earlier publish with
        *idempotency_key* (``Idempotent-Replayed: true``).

    Raises:
        LocalProtocolError: A bad URL or key, or an event with an ``id``, ``retry`` or
            ``topic``.
        HTTPStatusError: The server refused (``429`` when the topic's log is full,
            with ``retry_after``; ``422`` when *idempotency_key* was used for other
            events; ``413``, ``400``, ``401``, ...).
        RemoteProtocolError: The answer was malformed.
        OSError: The connection could not be made.
        trio.BrokenResourceError: The connection broke.

    **Cancellation:** safe; the events may or may not have been published (retry with
    the same *idempotency_key* to publish them once).
    """
    origin, path, query = _split_url(url)
    if idempotency_key is not None:
        check_idempotency_key(idempotency_key)
    items: list[dict[str, str]] = []
    for event in events:
        if isinstance(event, str):
            event = Event(data=event)
        if event.id is not None or event.retry is not None:
            raise LocalProtocolError("published events get their id from the server: no id, retry")
        if event.topic is not None:
            raise LocalProtocolError("the URL names the topic published to: no topic on events")
        item = {"data": event.data}
        if event.event is not None:
            item["event"] = check_event_name(event.event)
        items.append(item)
    request_headers = [
        (b"host", origin.host_header),
        (b"user-agent", _USER_AGENT),
        (b"content-type", b"application/json"),
    ]
    if publish_token is not None:
        request_headers.append((b"authorization", f"Bearer {publish_token}".encode()))
    if idempotency_key is not None:
        request_headers.append((b"idempotency-key", idempotency_key.encode("ascii")))
    for name, value in (headers or {}).items():
        request_headers.append((name.encode("ascii"), value.encode("latin-1")))

    if stream_factory is not None:
        factory = stream_factory
        opened = await factory(origin.host, origin.port)
    else:
        opened = await _default_factory(origin, ssl_context)
    conn = _HTTPConnection(opened, math.inf)
    try:
        response = await conn.request(
            b"POST", _target(path, query), request_headers, json.dumps(items).encode()
        )
        body = await conn.read_body(_MAX_POLL_BODY)
    except _Lost as error:
        raise trio.BrokenResourceError(f"publishing to {url} failed: {error}") from error
    finally:
        await conn.aclose()
    if response.status_code not in (200, 201, 202):
        raise HTTPStatusError(
            response.status_code,
            _error_message(body),
            retry_after=_retry_after(list(response.headers)),
        )
    document = _json_object(body, "publish response")
    ids = document.get("ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise RemoteProtocolError("malformed publish response: 'ids' must be a list of strings")
    replayed = _header(list(response.headers), b"idempotent-replayed")
    return Published(ids, replayed=(replayed or "").strip().lower() == "true")
