"""The stream over WebSocket: contract section "GET /streams/{topic} with Upgrade: websocket".

The same `Connection` chain as the Server-Sent Events stream, behind a `Sink` that sends
one JSON text message per event (`Entry.json`, made once per event and shared by every
connection), and a second task in the connection's nursery that reads the client's
in-band acks. How the contract is read where it leaves a choice:

- **Refusals before the handshake** (bad parameters, the stream limits, a server that is
  shutting down) are answered exactly as the event stream answers them: same status,
  ``Retry-After`` and JSON body, sent through the ASGI ``websocket.http.response``
  extension (hypercorn has it). An ASGI server without the extension gets an accepted
  socket closed at once: 1008 for a 4xx, 1013 (try again later) for 429 and 503, with the
  error message as the close reason.
- **A paused client** that opens a new stream is accepted, sent the ``pause`` control
  message and closed with 1013: what a stream that gets paused does, so that every
  client, browsers included (they cannot read a refused handshake), learns its
  ``poll_url`` the same way.
- **Heartbeats.** ASGI has no message to send a ping, so the stream sends nothing when
  idle: WebSocket pings keep the connection alive, sent by the ASGI server when it is
  configured to (hypercorn's ``websocket_ping_interval``) and by clients (the server
  answers each ping with a pong; `open_websocket_stream` pings when the stream is
  quiet). No JSON heartbeat message is invented: every message is an event or one of
  the contract's control messages.
- **Client messages.** ``{"ack": "<event id>", "buffer_utilization": 0.5}`` is handled
  as ``POST /streams/{topic}/ack`` would handle it for this client. What the endpoint
  answers 400 (not JSON, not an object, wrong types, a malformed id, a utilization out
  of range) closes the connection with 1008; a binary message with 1003. What it answers
  409 or 404 (an id this client was not sent, e.g. one of a previous server's epoch)
  changes nothing and does not end the stream, as a refused ack does not end an event
  stream either. Unknown fields are ignored; a ``topic`` field must name this topic.
- **Authorization** (an `AppConfig.authorizer`, e.g. ``--auth-secret``) is checked on
  the handshake as on the event stream: a refusal is the same ``401``/``403`` answer.
  The token comes from the ``Authorization`` header or the ``trio_stream_token``
  cookie; the cookie counts only on a handshake from the server's own origin or one
  listed in ``cors_origins`` (against cross-site WebSocket hijacking). When the grant
  expires, the server sends ``{"type": "reauth", "reason": "expired"}`` and closes
  with 1008.
- **Close codes.** 1013 after a pause; 1001 when the server shuts down; 1000 when the
  stream ended for lack of progress (``idle_timeout``); 1008 and 1003 as above, and
  after ``reauth``; 1011 if the server fails.
"""

from __future__ import annotations

import json
import logging
import math
from typing import TYPE_CHECKING, Final
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
import trio

from ._asgi import _HTTPError, _Request, pause_data, reset_data
from ._core._errors import NotSentError, UnknownClientError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._asgi import App, Message, Receive, Scope, Send
    from ._connection import Connection
    from ._core._ring import Entry, Gap

__all__ = ["serve_websocket"]

logger: Final = logging.getLogger("trio_stream")

MAX_CLIENT_MESSAGE: Final = 64 * 1024
"""Characters a client message may have (an ack is far smaller); more closes with 1008."""

CLOSE_TIMEOUT: Final = 1.0
"""Seconds the closing frame may take to go out."""

NORMAL: Final = 1000
GOING_AWAY: Final = 1001
UNSUPPORTED_DATA: Final = 1003
POLICY_VIOLATION: Final = 1008
INTERNAL_ERROR: Final = 1011
TRY_AGAIN_LATER: Final = 1013

REAUTH_TEXT: Final = '{"type": "reauth", "reason": "expired"}'
_DENIAL: Final = "websocket.http.response"
_MAX_REASON: Final = 123  # bytes a close reason may have (RFC 6455, 5.5)


class _BadMessage(Exception):
    """A client message the stream cannot take: close with *code*."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@attrs.define(eq=False)
class _WebSocketSink:
    """Frames a connection's writes as WebSocket text messages (ASGI ``websocket.send``).

    While `send_events` is between its first and last message, `sending` is true: an
    ack of an event already out can reach the server before the writer records the
    batch as sent (`written` is set, and a new event made, when that has happened).
    """

    send: Send
    topics: tuple[str, ...]
    client_id: str
    several: bool = False
    sending: bool = False
    written: trio.Event = attrs.field(factory=trio.Event)

    async def _text(self, text: str) -> None:
        await self.send({"type": "websocket.send", "text": text})

    async def send_events(self, entries: Sequence[Entry]) -> None:
        """One message per event, ``{"id", "event", "data"}``, in order."""
        self.sending = True
        try:
            for entry in entries:
                await self._text(entry.json)
        finally:
            # No await between here and the writer recording the batch as sent.
            self.sending = False
            self.written.set()
            self.written = trio.Event()

    async def send_heartbeat(self) -> None:
        """Nothing: pings keep a WebSocket alive, and ASGI cannot send them."""
        await trio.lowlevel.checkpoint()

    async def send_reset(self, gap: Gap) -> None:
        """``{"type": "reset", "reason": ..., "last_event_id": ...}`` (and ``"topic"``)."""
        await self._text(json.dumps({"type": "reset", **reset_data(gap)}, ensure_ascii=False))

    async def send_pause(
        self, after: str | None, retry_after: float, *, topic: str | None = None
    ) -> None:
        """``{"type": "pause", "poll_url": ..., "retry_after_ms": ...}``; the caller closes."""
        data = pause_data(self.topics, after, self.client_id, retry_after, self.several, topic)
        await self._text(json.dumps({"type": "pause", **data}, ensure_ascii=False))


def _pause_text(url: str, retry_after: float) -> str:
    return json.dumps(
        {"type": "pause", "poll_url": url, "retry_after_ms": round(retry_after * 1000)},
        ensure_ascii=False,
    )


def _reason(text: str) -> str:
    """*text* cut to what a close frame can carry, on a character boundary."""
    return text.encode()[:_MAX_REASON].decode("utf-8", "ignore")


def _topics_of(app: App, request: _Request) -> tuple[tuple[str, ...], bool]:
    """The topics of ``/streams/{topic}`` or ``/streams?topic=a&topic=b``, and whether
    it is the latter (a stream of several); the path is split as `App` splits it."""
    scope = request.scope
    path: str = scope.get("path", "")
    raw_path = scope.get("raw_path")
    if raw_path is None:
        parts = path.split("/")
    else:  # before percent-decoding: `/streams/a%2Fb` names the topic "a/b" (invalid)
        parts = [unquote(part) for part in bytes(raw_path).decode("latin-1").split("/")]
    if len(parts) == 2 and parts[1] == "streams":
        return app._topics(request), True
    if len(parts) == 3 and parts[1] == "streams" and parts[2] and not parts[2].startswith("_"):
        return (app._topic(parts[2]),), False
    raise _HTTPError(
        404,
        f"no WebSocket stream at {path[:200]}: use /streams/{{topic}} or /streams?topic=...",
    )


def _parse_ack(text: str, topics: tuple[str, ...]) -> tuple[str, float | None]:
    """The event id and utilization of an ack message.

    Raises:
        _BadMessage: It is not one.
    """
    if len(text) > MAX_CLIENT_MESSAGE:
        raise _BadMessage(POLICY_VIOLATION, f"message over {MAX_CLIENT_MESSAGE} characters")
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        raise _BadMessage(POLICY_VIOLATION, "message is not valid JSON") from None
    if not isinstance(body, dict):
        raise _BadMessage(POLICY_VIOLATION, 'expected {"ack": "<event id>"}')
    event_id, utilization = body.get("ack"), body.get("buffer_utilization")
    if not isinstance(event_id, str):
        raise _BadMessage(POLICY_VIOLATION, "'ack' must be an event id (a string)")
    if utilization is not None and (
        isinstance(utilization, bool) or not isinstance(utilization, int | float)
    ):
        raise _BadMessage(POLICY_VIOLATION, "'buffer_utilization' must be a number 0.0-1.0")
    if "topic" in body and body["topic"] not in topics:
        raise _BadMessage(POLICY_VIOLATION, f"this stream carries topics {list(topics)!r} only")
    return event_id, None if utilization is None else float(utilization)


@attrs.define(eq=False)
class _Session:
    """One accepted WebSocket stream: the chain writing, the client's acks read."""

    app: App
    connection: Connection
    topics: tuple[str, ...]
    several: bool
    receive: Receive
    send: Send
    sink: _WebSocketSink
    expires: float = math.inf
    """The trio deadline at which the client's grant expires."""
    close: tuple[int, str] | None = None
    """The closing frame to send, once decided (the first reason wins)."""
    gone: bool = False
    """The client went away: nothing more can be sent."""

    def _end(self, scope: trio.CancelScope, code: int, reason: str) -> None:
        if self.close is None:
            self.close = (code, reason)
        scope.cancel()

    async def run(self) -> None:
        app, connection = self.app, self.connection
        with trio.CancelScope() as drain:
            app._streams.add(drain)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read_client, nursery.cancel_scope)
                    with trio.CancelScope(deadline=self.expires) as expiry:
                        await connection.run(self.sink)
                    if expiry.cancelled_caught:
                        self._end(nursery.cancel_scope, POLICY_VIOLATION, "token expired")
                        await self._reauth()
                    elif connection.state == "paused":
                        self._end(nursery.cancel_scope, TRY_AGAIN_LATER, "paused: poll poll_url")
                    else:
                        self._end(nursery.cancel_scope, NORMAL, "no progress: idle timeout")
            finally:
                app._streams.discard(drain)
                if app._draining and not app._streams:
                    app._drained.set()
        if drain.cancelled_caught and self.close is None:
            self.close = (GOING_AWAY, "server shutting down")
        if self.close is not None and not self.gone:
            await _close(self.send, *self.close)

    async def _reauth(self) -> None:
        with trio.move_on_after(CLOSE_TIMEOUT) as cleanup:
            cleanup.shield = True
            await self.send({"type": "websocket.send", "text": REAUTH_TEXT})

    async def _read_client(self, scope: trio.CancelScope) -> None:
        """Take the client's messages until it leaves or sends one the stream can't take."""
        while True:
            message: Message = await self.receive()
            kind = message["type"]
            if kind == "websocket.disconnect":
                self.gone = True
                self.connection.close()  # its place is free at once
                scope.cancel()
                return
            if kind != "websocket.receive":
                continue
            text = message.get("text")
            try:
                if text is None:
                    raise _BadMessage(UNSUPPORTED_DATA, "binary messages are not supported")
                await self._ack(*_parse_ack(text, self.topics))
            except _BadMessage as bad:
                # Free the place at once, even if a write to this client never completes.
                self.connection.close()
                self._end(scope, bad.code, _reason(bad.reason))
                return

    async def _ack(self, event_id: str, utilization: float | None) -> None:
        """As ``POST /ack`` for this client; waits out a batch still being written."""
        hub, connection, sink = self.app.hub, self.connection, self.sink
        for attempt in range(2):
            try:
                if self.several:
                    hub.ack_many(
                        client_id=connection.client_id,
                        last_event_id=event_id,
                        buffer_utilization=utilization,
                    )
                else:
                    hub.ack(
                        self.topics[0],
                        client_id=connection.client_id,
                        last_event_id=event_id,
                        buffer_utilization=utilization,
                    )
            except (NotSentError, UnknownClientError) as error:
                if attempt == 0 and sink.sending:
                    # The event may be out already, its batch not yet recorded as sent.
                    utilization = None  # observed once in the metrics, not twice
                    await sink.written.wait()
                    continue
                logger.debug("WebSocket ack refused (stream goes on): %s", error)
            except ValueError as error:  # LocalProtocolError included
                raise _BadMessage(POLICY_VIOLATION, str(error)) from None
            return


async def _close(send: Send, code: int, reason: str = "") -> None:
    with trio.move_on_after(CLOSE_TIMEOUT) as cleanup:
        cleanup.shield = True
        await send({"type": "websocket.close", "code": code, "reason": reason})


async def _accept(send: Send, client_id: str) -> None:
    await send({"type": "websocket.accept", "headers": [(b"x-client-id", client_id.encode())]})


async def _refuse(app: App, scope: Scope, send: Send, error: _HTTPError) -> None:
    """Answer a refused handshake as the event stream would refuse the request."""
    if _DENIAL in scope.get("extensions", {}):

        async def denial(message: Message) -> None:
            await send({**message, "type": f"websocket.{message['type']}"})

        await app._error(scope, denial, error)
        return
    if error.status in (429, 503):
        code = TRY_AGAIN_LATER
    else:
        code = INTERNAL_ERROR if error.status >= 500 else POLICY_VIOLATION
    await send({"type": "websocket.accept"})
    await _close(send, code, _reason(error.message))


async def serve_websocket(app: App, scope: Scope, receive: Receive, send: Send) -> None:
    """Serve one WebSocket scope of *app*: the stream of ``/streams/{topic}``.

    Admission, identity, query parameters (``ack``, ``last_event_id``, ``client_id``)
    and limits are those of the event stream (`App`'s own checks); see the module
    docstring for the messages and close codes.

    Cancellation: safe; the stream's place in the hub is released.
    Backpressure: the chain writes a message only when the previous one was taken by
    the ASGI server, which takes it only when the socket does: a client that stops
    reading falls behind and is paused like an event-stream client.
    """
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    accepted = False
    request: _Request | None = None
    try:
        try:
            request = _Request(scope, receive, send)
            topics, several = _topics_of(app, request)
            grant = await app._authorize(request, "stream", topics)
            connection = app._connect(request, topics, grant, several=several)
        except _HTTPError as error:
            url = error.extra.get("poll_url") if error.status == 429 else None
            if isinstance(url, str) and request is not None:
                accepted = True
                await _refuse_paused(app, send, _paused_client(url), url)
            else:
                await _refuse(app, scope, send, error)
            return
        with connection:
            try:
                await app._loaded(connection)  # a remote (Redis) log places the stream first
            except _HTTPError as error:
                await _refuse(app, scope, send, error)
                return
            accepted = True
            await _accept(send, connection.client_id)
            sink = _WebSocketSink(send, topics, connection.client_id, several)
            session = _Session(
                app, connection, topics, several, receive, send, sink, app._expiry(grant)
            )
            await session.run()
    except Exception:
        logger.exception("unexpected error serving WebSocket %s", scope.get("path"))
        if accepted:
            await _close(send, INTERNAL_ERROR, "internal error")
        else:
            await _refuse(app, scope, send, _HTTPError(500, "internal error"))


def _paused_client(url: str) -> str:
    """The client id in a poll URL (the one the hub paused)."""
    return parse_qs(urlsplit(url).query).get("client_id", [""])[0]


async def _refuse_paused(app: App, send: Send, client_id: str, url: str) -> None:
    """A paused client's new stream: accepted, told to poll, closed with 1013."""
    await _accept(send, client_id)
    await send({"type": "websocket.send", "text": _pause_text(url, app.config.hub.poll_interval)})
    app.hub.signal("pause")
    await _close(send, TRY_AGAIN_LATER, "paused: poll poll_url")
