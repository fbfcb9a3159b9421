"""The WebSocket client: the same `EventStream` iterator, over ``trio-websocket``.

`open_websocket_stream` opens ``ws://host/streams/{topic}`` (or, for several topics,
``ws://host/streams?topic=a&topic=b``) and hands out a
`WebSocketEventStream`, which iterates exactly as the Server-Sent Events client's
`EventStream` does (it is one): the events in order and each once, `StreamReset` where
events were lost, reconnection with the last id, and the pause handover to polling over
HTTP. Only the transport differs:

```
WebSocket /streams/t ──> trio-websocket ──> JSON message ──> pending ──> __anext__ ──> caller
   ^  Last-Event-ID          │ {"type": "pause"} / close 1013                    │ done
   └── retry / back-off      └──> GET poll_url (until resume_stream)             └──> acker
                                                                  {"ack": id} in-band <──┘
```

Messages are read in the caller's task, only when it asks for the next event (at most
one more waits in ``trio-websocket``'s queue), so a caller that stops iterating stops
reading the socket and TCP carries the backpressure to the server. Each connection's
``trio-websocket`` context runs in a task of the stream's nursery, which closes it when
the stream drops the connection.
"""

from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Final, cast
from urllib.parse import urlsplit, urlunsplit

import attrs
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from ._client import (
    _USER_AGENT,
    DEFAULT_ACK_INTERVAL,
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_MAX_RETRY_INTERVAL,
    DEFAULT_RETRY_INTERVAL,
    DEFAULT_RETRY_JITTER,
    EventStream,
    StreamReset,
    _delay_ms,
    _json_object,
    _Lost,
    _optional_str,
    _raise_if_certificate_error,
    _Requester,
    _split_url,
    _stream_path,
    _stream_settings,
    _target,
)
from ._core._errors import LocalProtocolError, RemoteProtocolError
from ._core._events import Event
from ._pipeline import _lone_exception_unwrapped

if TYPE_CHECKING:
    import ssl
    from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

    from trio_websocket import CloseReason

__all__ = ["WebSocketEventStream", "open_websocket_stream"]

logger: Final = logging.getLogger("trio_stream")

CLOSE_TIMEOUT: Final = 1.0
"""Seconds the closing handshake may take before the socket is just closed."""

_QUIET_FRACTION: Final = 1 / 3  # of heartbeat_timeout: quiet this long, the client pings
_MESSAGE_QUEUE: Final = 1  # messages trio-websocket reads ahead of the caller
_MAX_MESSAGE: Final = 16 * 1024 * 1024
_REFUSED: Final = frozenset({1002, 1003, 1007, 1008, 1009, 1010})  # "what you sent is wrong"
_WS_HEADERS: Final = frozenset(
    {"connection", "upgrade", "sec-websocket-key", "sec-websocket-version"}
)


@attrs.define(eq=False)
class WebSocketEventStream(EventStream):
    """The events of an open WebSocket stream; made by `open_websocket_stream`.

    Iterate over it (``async for item in events``) as over an `EventStream`: `Event`
    values in order, each once, and a `StreamReset` wherever events were lost. Each
    event is the server's JSON message as an `Event`: ``id``, ``event`` (``None`` for
    unnamed events) and ``data``, and on a stream of several topics ``topic`` (``None``
    on a stream of one), exactly as `EventStream` hands them out.

    What differs from `EventStream`: acknowledgements travel in-band
    (``{"ack": id, "buffer_utilization": u}`` on the socket, not ``POST /ack``); the
    ``pause`` control message, and the server's close with 1013, lead to the same
    polling over HTTP; and a connection is presumed dead when a ping the client sends
    after ``heartbeat_timeout / 3`` quiet seconds is not answered within the rest of
    ``heartbeat_timeout``. A close with 1002, 1003 or 1007-1010 (the server refused what
    the client sent) or a malformed message from the server raises
    `RemoteProtocolError`; every other close is followed by a reconnection.

    One task at a time may iterate.
    """

    _ws_url: str = ""
    _resource: str = "/"
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)
    _ws: WebSocketConnection | None = attrs.field(default=None, init=False)
    _release: trio.Event | None = attrs.field(default=None, init=False)

    # -- the connection --------------------------------------------------------------

    async def _fill(self) -> None:
        if self._state == "polling":
            await self._poll()
        elif self._ws is None:
            await self._connect()
        else:
            await self._read()

    def _handshake_headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"user-agent", _USER_AGENT)]
        if self._client_id is not None:
            headers.append((b"x-client-id", self._client_id.encode()))
        if self._resume_id is not None:
            headers.append((b"last-event-id", self._resume_id.encode()))
        return headers + self._headers

    async def _connect(self) -> None:
        await trio.sleep_until(self._next_attempt_at)
        self._state = "connecting"
        assert self._nursery is not None
        try:
            ws, release = await self._nursery.start(self._hold, self._handshake_headers())
        except ConnectionRejected as refused:
            self._on_refusal(refused.status_code, list(refused.headers), refused.body or b"")
            return
        except _Lost as error:
            self._schedule_retry(error)
            return
        except (HandshakeError, OSError, trio.BrokenResourceError) as error:
            self._schedule_retry(_Lost(f"cannot open the WebSocket: {error!r}"))
            return
        try:
            self._adopt_client_id(list(ws.handshake_headers))
        finally:
            self._ws, self._release = ws, release
        self._stream_last_id = None
        self._failures = 0
        self._connections += 1
        self._state = "streaming"

    async def _hold(
        self,
        headers: list[tuple[bytes, bytes]],
        *,
        task_status: trio.TaskStatus[tuple[WebSocketConnection, trio.Event]],
    ) -> None:
        """Open a connection and keep it until released, then close it.

        The byte stream is the stream's own (``trio-websocket`` does not close a client's
        socket when the server closes first, nor after a refused handshake).
        """
        release = trio.Event()
        started = False
        stream: trio.abc.Stream | None = None
        ready = False
        with trio.move_on_after(self._heartbeat_timeout):
            stream = await self._open_stream(self._origin)
            if isinstance(stream, trio.SSLStream):
                # Here, not in trio-websocket's reader, which would hide a bad certificate.
                try:
                    await stream.do_handshake()
                except trio.BrokenResourceError as error:
                    await trio.aclose_forcefully(stream)
                    _raise_if_certificate_error(error)
                    raise _Lost(f"TLS handshake failed: {error!r}") from error
            ready = True
        if stream is None or not ready:
            if stream is not None:
                await trio.aclose_forcefully(stream)
            raise _Lost(f"connecting took over {self._heartbeat_timeout:g} s")
        try:
            with _lone_exception_unwrapped():
                async with trio.open_nursery() as nursery:  # the connection's reader task
                    ws: WebSocketConnection | None = None
                    with trio.move_on_after(self._heartbeat_timeout):
                        ws = await wrap_client_stream(
                            nursery,
                            # What _default_factory makes; any trio.abc.Stream would do.
                            cast("trio.SocketStream", stream),
                            self._origin.host_header.decode("ascii"),
                            self._resource,
                            extra_headers=headers,
                            message_queue_size=_MESSAGE_QUEUE,
                            max_message_size=_MAX_MESSAGE,
                        )
                    if ws is None:
                        raise _Lost(f"the handshake took over {self._heartbeat_timeout:g} s")
                    started = True
                    task_status.started((ws, release))
                    await release.wait()
                    with trio.move_on_after(CLOSE_TIMEOUT):
                        await ws.aclose()
                    nursery.cancel_scope.cancel()
        except Exception as error:
            if not started:
                raise
            logger.debug("%s: closing the WebSocket: %r", self._ws_url, error)
        finally:
            await trio.aclose_forcefully(stream)

    async def _drop_connection(self) -> None:
        self._ws = None
        release, self._release = self._release, None
        if release is not None:
            release.set()  # the connection's task closes it, in the background
        await trio.lowlevel.checkpoint()

    async def _close_gracefully(self) -> None:
        """Send the closing frame and wait for the server's (bounded by the caller)."""
        ws = self._ws
        if ws is not None:
            await ws.aclose()

    # -- receiving -------------------------------------------------------------------

    async def _read(self) -> None:
        ws = self._ws
        assert ws is not None
        try:
            message = await self._receive(ws)
        except ConnectionClosed as closed:
            await self._drop_connection()
            self._on_close(closed.reason)
            return
        except _Lost as error:
            logger.debug("%s: stream lost (%s)", self._ws_url, error)
            await self._drop_connection()
            self._next_attempt_at = trio.current_time() + self._retry_delay(failures=0)
            return
        if isinstance(message, bytes):
            raise RemoteProtocolError("the server sent a binary WebSocket message")
        if self._accept_message(message):
            await self._drop_connection()

    async def _receive(self, ws: WebSocketConnection) -> str | bytes:
        """The next message; pings the server when it is quiet, `_Lost` if it won't answer."""
        quiet = self._heartbeat_timeout * _QUIET_FRACTION
        with trio.move_on_after(quiet):
            return await ws.get_message()
        dead = False

        async def probe(scope: trio.CancelScope) -> None:
            nonlocal dead
            while True:
                with trio.move_on_after(self._heartbeat_timeout - quiet) as timer:
                    try:
                        await ws.ping()
                    except ConnectionClosed:
                        return  # get_message() says so
                if timer.cancelled_caught:
                    dead = True
                    scope.cancel()
                    return
                await trio.sleep(quiet)

        with _lone_exception_unwrapped():
            async with trio.open_nursery() as nursery:
                # Keep taking messages meanwhile: the pong comes after those before it.
                nursery.start_soon(probe, nursery.cancel_scope)
                message = await ws.get_message()
                nursery.cancel_scope.cancel()
                return message
        assert dead
        raise _Lost(f"no message and no pong for {self._heartbeat_timeout:g} s")

    def _on_close(self, reason: CloseReason | None) -> None:
        """The server closed the connection (after what is received was taken)."""
        code = 1006 if reason is None else reason.code
        text = (reason.reason if reason is not None else None) or ""
        now = trio.current_time()
        logger.debug("%s: closed by the server: %d %s", self._ws_url, code, text)
        if code in _REFUSED:
            raise RemoteProtocolError(f"the server closed the WebSocket stream: {code} {text}")
        if code == 1013:  # try again later, without a pause: a refusal, not a failure
            self._next_attempt_at = now + self._retry_delay(failures=1)
        elif code == 1011:
            self._schedule_retry(_Lost(f"server error: {code} {text}"))
        else:
            self._next_attempt_at = now + self._retry_delay(failures=0)

    def _accept_message(self, text: str) -> bool:
        """Queue an event or act on a control message; True when the stream is over.

        No await in here: the state moves in one step.
        """
        what = "WebSocket message"
        document = _json_object(text, what)
        kind = document.get("type")
        if kind is None:
            event_id = _optional_str(document, "id", what)
            name = _optional_str(document, "event", what)
            data = _optional_str(document, "data", what)
            topic = _optional_str(document, "topic", what)
            if event_id is None or data is None:
                raise RemoteProtocolError(f"malformed {what}: an event needs 'id' and 'data'")
            try:
                event = Event(data=data, event=name, id=event_id, topic=topic)
            except LocalProtocolError as error:
                raise RemoteProtocolError(f"malformed {what}: {error}") from None
            self._stream_last_id = event_id
            if event_id == self._resume_id:
                self._duplicates += 1
                return False
            self._resume_id = event_id
            self._pending.append(event)
            return False
        if kind == "reset":
            self._pending.append(
                StreamReset(
                    reason=_optional_str(document, "reason", what) or "unknown",
                    last_event_id=_optional_str(document, "last_event_id", what),
                    topic=_optional_str(document, "topic", what) or self._topic,
                )
            )
            return False
        if kind == "pause":
            poll_url = _optional_str(document, "poll_url", what)
            if poll_url is None:
                raise RemoteProtocolError(f"malformed {what}: a pause needs 'poll_url'")
            self._start_polling(poll_url, _delay_ms(document, "retry_after_ms", what))
            return True
        logger.debug("%s: ignoring a message of type %r", self._ws_url, kind)
        return False

    # -- acknowledging ---------------------------------------------------------------

    async def _post_ack(self, requester: _Requester, ack_id: str) -> float | None:
        """Acknowledge in-band; ``None``: done with it (sent, or no stream to send it on).

        Without a connection the ack is dropped: the next stream resumes after the last
        event received, and polling acknowledges what it fetched.
        """
        ws = self._ws
        if ws is None:
            return None
        message = json.dumps({"ack": ack_id, "buffer_utilization": self._done_utilization})
        try:
            await ws.send_message(message)
        except ConnectionClosed:
            return None
        self._acks += 1
        self._posted_id = ack_id
        return None


def _urls(url: str) -> tuple[str, str]:
    """``(ws_url, http_url)`` of a ``ws(s)://`` or ``http(s)://`` URL."""
    parts = urlsplit(url)
    schemes = {"ws": "http", "wss": "https", "http": "http", "https": "https"}
    if parts.scheme not in schemes:
        raise LocalProtocolError(f"expected a ws://, wss://, http:// or https:// URL, got {url!r}")
    http = schemes[parts.scheme]
    ws = "wss" if http == "https" else "ws"
    return urlunsplit(parts._replace(scheme=ws)), urlunsplit(parts._replace(scheme=http))


@asynccontextmanager
async def open_websocket_stream(
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
) -> AsyncIterator[WebSocketEventStream]:
    """Open a stream over WebSocket and iterate over its events.

    ::

        async with open_websocket_stream("ws://127.0.0.1:8000/streams/prices") as events:
            async for event in events:
                if isinstance(event, StreamReset):
                    ...  # events were lost: resynchronise
                else:
                    print(event.id, event.event, event.data)

    The same client as `open_event_stream`, over WebSocket: it connects at the first
    iteration, reconnects after a close or a broken connection (after *retry_interval*,
    backing off on failures), sending ``Last-Event-ID`` and ``X-Client-ID`` in the
    handshake so the server resumes right after the last event received; surfaces
    losses as `StreamReset`; on a ``pause`` polls ``poll_url`` over HTTP and yields the
    polled events until the poll says ``resume_stream``, then streams again. A refused
    handshake is handled as the event stream's refused request (``429`` waits for
    ``Retry-After``, other 4xx raise `HTTPStatusError`).

    Args:
        url: ``ws(s)://host[:port]/streams/{topic}``, or
            ``.../streams?topic=a&topic=b`` for several topics on one stream (each
            event's ``topic`` then names its topic); ``http(s)://`` is taken to mean
            the same; other query parameters are passed on.
        client_id: Sent as ``X-Client-ID``; by default the client adopts the id the
            server assigns (its ``X-Client-ID`` handshake header).
        last_event_id: Resume after this id.
        ack: Ack mode with a window of this many events (1-10000): adds ``?ack=N``; the
            server sends at most *ack* events beyond the last acknowledged one, and the
            client acknowledges in-band, in batches (see `EventStream.ack`).
        auto_ack: In ack mode, asking for the next event marks the previous one done.
        headers: Extra handshake headers, e.g. ``Authorization``.
        raise_on_reset: Raise `StreamResetError` instead of yielding `StreamReset`.
        retry_interval: Seconds before reconnecting.
        max_retry_interval: Cap on the back-off between failed attempts.
        retry_jitter: Largest random fraction added to each delay (0 for none).
        max_attempts: Consecutive failed attempts after which iteration raises;
            ``None`` retries for ever.
        heartbeat_timeout: After a third of this without a message the client pings;
            a connection whose pong does not come within the rest is presumed dead. Also
            bounds the opening handshake.
        ack_interval: Seconds a done event may wait to be acknowledged with later ones.
        ssl_context: For ``wss`` URLs (and the polls over ``https``).
        stream_factory: ``await stream_factory(host, port)`` opens the byte stream of
            each connection, WebSocket or HTTP (polls); by default TCP, with TLS for
            ``wss``.

    Yields:
        The `WebSocketEventStream`.

    Raises:
        LocalProtocolError: A bad URL, client id, ack window or duration, or *headers*
            setting ones the client sets itself.
        Exception: Errors of the ``async with`` body leave as themselves, not as an
            exception group; see `EventStream.__anext__` for those of the iteration.

    **Backpressure:** the socket is read only while the caller waits for an event; at
    most one message waits in the client beyond the one being handled.

    **Cancellation:** leaving the block closes the connection (the closing handshake
    gets `CLOSE_TIMEOUT` seconds) and cancels the acker: no task or socket outlives it.
    """
    ws_url, http_url = _urls(url)
    origin, path, query = _split_url(http_url)
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
        reserved_headers=_WS_HEADERS,
    )
    resource = _target(path, query).decode("ascii")
    ws_url = urlunsplit(urlsplit(ws_url)._replace(path="", query="", fragment="")) + resource

    stream = WebSocketEventStream(
        url=http_url,
        origin=origin,
        path=path,
        query=query,
        topic=topic,
        several=several,
        ack_path=ack_path,  # unused: acks travel in-band
        auto_ack=auto_ack,
        raise_on_reset=raise_on_reset,
        ws_url=ws_url,
        resource=resource,
        **settings,
    )
    with _lone_exception_unwrapped():
        async with trio.open_nursery() as nursery:
            stream._nursery = nursery
            if ack is not None:
                nursery.start_soon(stream._run_acker)
            try:
                yield stream
            finally:
                with trio.move_on_after(CLOSE_TIMEOUT) as cleanup:
                    cleanup.shield = True
                    await stream._close_gracefully()
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    await stream._aclose()
