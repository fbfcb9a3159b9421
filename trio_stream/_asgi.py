"""The ASGI application: the HTTP contract (``CONTRACT.md``) on top of a `Hub`.

Served by hypercorn's trio worker (``trio-stream serve``), or by any ASGI server that
runs on Trio. Every error a request can cause is answered with a 4xx and a JSON body
``{"error": "..."}``; nothing a client sends reaches other clients' streams.
"""

from __future__ import annotations

import hmac
import inspect
import json
import logging
import math
import secrets
from collections.abc import Awaitable, Callable
from functools import partial
from importlib import resources
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import attrs
import trio

from ._auth import (
    AuthRequest,
    ForbiddenError,
    Grant,
    UnauthorizedError,
    parse_cookies,
    seconds_left,
)
from ._core._errors import (
    BatchTooLargeError,
    ClientPausedError,
    IdempotencyKeyReusedError,
    LimitExceededError,
    LocalProtocolError,
    NotSentError,
    RateLimitedError,
    TopicLimitError,
    UnknownClientError,
)
from ._core._events import Event, encode, encode_retry
from ._core._idempotency import MAX_KEY_LENGTH, check_idempotency_key
from ._core._names import check_client_id, check_topic
from ._hub import Hub, HubConfig, PollResult
from ._log import BackendUnavailableError
from ._metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, exposition
from ._several import topic_set

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from ._auth import Action, Authorizer
    from ._connection import Connection
    from ._core._ring import Entry, Gap

__all__ = ["App", "AppConfig"]

logger: Final = logging.getLogger("trio_stream")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_PUBLISH_BODY: Final = 1024 * 1024
MAX_ACK_BODY: Final = 64 * 1024
IDEMPOTENCY_KEY: Final = b"idempotency-key"
DEFAULT_POLL_LIMIT: Final = 100
MAX_POLL_LIMIT: Final = 1000
HEARTBEAT: Final = b":\n\n"
REAUTH: Final = encode(Event(event="reauth", data='{"reason": "expired"}'))
"""What ends a stream whose grant expired: ``event: reauth``, no ``id:``."""
DRAIN_WRITE_TIMEOUT: Final = 1.0
BACKEND_LOAD_TIMEOUT: Final = 5.0
POLL_WAIT: Final = 0.1
"""A poll whose bucket has a token within this many seconds waits for it, not 429.

(A shared bucket's tokens come from Redis a round trip after it first needs them.)
"""
CORS_EXPOSED: Final = b"X-Client-ID, Retry-After, X-Stream-Pause"
CORS_ALLOWED_HEADERS: Final = b"Content-Type, Authorization, X-Client-ID, Last-Event-ID"
BEARER_CHALLENGE: Final = (b"www-authenticate", b'Bearer realm="trio-stream"')


@attrs.frozen(kw_only=True)
class AppConfig:
    """How the application behaves on top of its hub's limits.

    Attributes:
        hub: The hub's limits (rates, logs, timeouts, ...).
        publish_token: When set, publishing needs ``Authorization: Bearer <token>``.
        cors_origins: Origins allowed to stream, poll and ack from a browser (``"*"``
            for any).
        drain_grace_period: Seconds streams get to end cleanly when the server stops.
        demo: Serve the demo page at ``/`` and its settings at ``/demo/config``.
        authorizer: When set, every stream, poll and ack (WebSocket streams included)
            must be allowed by it, and publishing may be (see `Authorizer`):
            ``JWTAuthorizer(secret)`` is what ``--auth-secret`` sets.
    """

    hub: HubConfig = attrs.field(factory=HubConfig)
    publish_token: str | None = None
    cors_origins: tuple[str, ...] = ()
    drain_grace_period: float = 5.0
    demo: bool = False
    authorizer: Authorizer | None = None


class _HTTPError(Exception):
    """An answer other than success, raised from deep inside a handler."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        headers: Sequence[tuple[bytes, bytes]] = (),
        extra: dict[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)
        self.extra = extra or {}


def _retry_after(seconds: float) -> tuple[bytes, bytes]:
    return (b"retry-after", str(max(1, math.ceil(seconds))).encode())


@attrs.define(eq=False)
class _Request:
    scope: Scope
    receive: Receive
    send: Send
    headers: dict[bytes, bytes] = attrs.field(init=False)
    query: list[tuple[str, str]] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.headers = {}
        for name, value in self.scope.get("headers", ()):
            self.headers.setdefault(bytes(name).lower(), bytes(value))
        try:
            raw = bytes(self.scope.get("query_string", b"")).decode("ascii")
            self.query = parse_qsl(raw, keep_blank_values=True, errors="strict")
        except (UnicodeDecodeError, ValueError):
            self.query = []
            raise _HTTPError(400, "the query string is not valid UTF-8") from None

    def header(self, name: bytes) -> str | None:
        value = self.headers.get(name)
        return None if value is None else value.decode("utf-8", "replace")

    def param(self, name: str) -> str | None:
        for key, value in self.query:
            if key == name:
                return value
        return None

    def client_id(self) -> str | None:
        client_id = self.header(b"x-client-id")
        if client_id is None:
            client_id = self.param("client_id")
        if client_id is not None:
            try:
                check_client_id(client_id)
            except LocalProtocolError as error:
                raise _HTTPError(400, str(error)) from None
        return client_id

    async def body(self, limit: int) -> bytes:
        length = self.headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise _HTTPError(413, f"request body over {limit} bytes")
        chunks, size = [], 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise _HTTPError(400, "client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _HTTPError(413, f"request body over {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def json(self, limit: int) -> object:
        raw = await self.body(limit)
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, ValueError) as error:
            raise _HTTPError(400, f"body is not valid JSON: {error}") from None
        except RecursionError:
            raise _HTTPError(400, "body is not acceptable JSON: nested too deeply") from None


@attrs.define(eq=False)
class _SSESink:
    """Frames a connection's writes as Server-Sent Events in ASGI body messages.

    *topics* are the stream's topics, for the ``poll_url`` of a pause; *several* says
    whether it is a stream of several (whose resets and pauses name their topic).
    """

    send: Send
    topics: tuple[str, ...]
    client_id: str
    several: bool = False

    async def _write(self, data: bytes) -> None:
        await self.send({"type": "http.response.body", "body": data, "more_body": True})

    async def send_events(self, entries: Sequence[Entry]) -> None:
        if len(entries) == 1:
            await self._write(entries[0].wire)
        else:
            await self._write(b"".join([entry.wire for entry in entries]))

    async def send_heartbeat(self) -> None:
        await self._write(HEARTBEAT)

    async def send_reset(self, gap: Gap) -> None:
        await self._write(encode(Event(event="reset", data=json.dumps(reset_data(gap)))))

    async def send_pause(
        self, after: str | None, retry_after: float, *, topic: str | None = None
    ) -> None:
        data = pause_data(self.topics, after, self.client_id, retry_after, self.several, topic)
        await self._write(encode(Event(event="pause", data=json.dumps(data))))


def reset_data(gap: Gap) -> dict[str, object]:
    """What a ``reset`` carries: the reason, the id asked for, the topic (several)."""
    data: dict[str, object] = {"reason": gap.reason, "last_event_id": gap.last_event_id}
    if gap.topic is not None:
        data["topic"] = gap.topic
    return data


def pause_data(
    topics: Sequence[str],
    after: str | None,
    client_id: str,
    retry_after: float,
    several: bool,
    topic: str | None,
) -> dict[str, object]:
    """What a ``pause`` carries: where to poll, when; the topic that lagged (several)."""
    url = (
        poll_url_many(topics, after, client_id)
        if several
        else poll_url(topics[0], after, client_id)
    )
    data: dict[str, object] = {"poll_url": url, "retry_after_ms": round(retry_after * 1000)}
    if several and topic is not None:
        data["topic"] = topic
    return data


def _integer(raw: str) -> int | None:
    """The value of a query parameter of ASCII digits (``None`` if it is anything else).

    Values past 10**18 are 10**18: huge is huge, and ``int()`` of thousands of digits
    raises (Python's limit on integer string conversion).
    """
    if not (raw.isascii() and raw.isdigit()):  # str.isdigit() accepts "²" and "٣"
        return None
    digits = raw.lstrip("0") or "0"
    return int(digits) if len(digits) <= 18 else 10**18


def poll_url(topic: str, after: str | None, client_id: str) -> str:
    """The path a paused client polls: ``/streams/{topic}/poll?after=...&client_id=...``."""
    query = f"client_id={quote(client_id, safe='')}"
    if after is not None:
        query = f"after={quote(after, safe='')}&{query}"
    return f"/streams/{quote(topic, safe='')}/poll?{query}"


def poll_url_many(topics: Iterable[str], after: str | None, client_id: str) -> str:
    """The path a client paused on a stream of several topics polls (``/streams/_poll``)."""
    query = [f"topic={quote(topic, safe='')}" for topic in topics]
    if after is not None:
        query.append(f"after={quote(after, safe='')}")
    query.append(f"client_id={quote(client_id, safe='')}")
    return f"/streams/_poll?{'&'.join(query)}"


def _idempotency_key(scope: Scope) -> str | None:
    """The ``Idempotency-Key`` of a publish: 1-128 visible ASCII characters, or none.

    Compared as it is (quotes included, were it sent as a structured-field string).

    Raises:
        _HTTPError: ``400`` for an empty, too long or otherwise bad value, or for the
            header repeated with different values.
    """
    values = {
        bytes(value)
        for name, value in scope.get("headers", ())
        if bytes(name).lower() == IDEMPOTENCY_KEY
    }
    if not values:
        return None
    if len(values) > 1:
        raise _HTTPError(400, "Idempotency-Key is repeated with different values")
    (raw,) = values
    key = raw.decode("ascii", "replace")
    try:
        return check_idempotency_key(key)
    except LocalProtocolError:
        raise _HTTPError(
            400,
            f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} visible ASCII characters "
            f"(0x21-0x7E), got {len(raw)} bytes: {key[:40]!r}",
        ) from None


def _check_events(body: object) -> list[Event]:
    items = body if isinstance(body, list) else [body]
    events = []
    for index, item in enumerate(items):
        where = f"event {index}" if isinstance(body, list) else "the event"
        if not isinstance(item, dict):
            raise _HTTPError(400, f"{where} must be a JSON object with 'data' and 'event'")
        unknown = set(item) - {"data", "event"}
        if unknown:
            raise _HTTPError(400, f"{where} has unknown fields: {sorted(unknown)}")
        data, name = item.get("data"), item.get("event")
        if not isinstance(data, str):
            raise _HTTPError(400, f"{where}: 'data' must be a string")
        if name is not None and not isinstance(name, str):
            raise _HTTPError(400, f"{where}: 'event' must be a string")
        try:
            events.append(Event(data=data, event=name))
        except (LocalProtocolError, ValueError) as error:
            raise _HTTPError(400, f"{where}: {error}") from None
    return events


@attrs.define(eq=False)
class App:
    """The ASGI application serving the contract.

    Args:
        config: Its settings; a default `AppConfig` when omitted.

    Attributes:
        hub: The engine behind it (usable to publish from the same process).
    """

    config: AppConfig = attrs.field(factory=AppConfig)
    hub: Hub = attrs.field(init=False)
    _streams: set[trio.CancelScope] = attrs.field(factory=set, init=False)
    _draining: bool = attrs.field(default=False, init=False)
    _drained: trio.Event = attrs.field(factory=trio.Event, init=False)
    _background: list[Callable[[Hub], Awaitable[object]]] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        self.hub = Hub(self.config.hub)

    def run_in_background(self, task: Callable[[Hub], Awaitable[object]]) -> None:
        """Run ``task(hub)`` for the lifetime of the server (from lifespan startup)."""
        self._background.append(task)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    # -- lifespan and draining -----------------------------------------------------------

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "lifespan.startup":
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.hub.run_housekeeping)
            for task in self._background:
                nursery.start_soon(task, self.hub)
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
            await self.drain()
            nursery.cancel_scope.cancel()
        await send({"type": "lifespan.shutdown.complete"})

    async def drain(self) -> None:
        """End every open stream with a final ``retry`` hint, within the grace period.

        New streams are refused (503) from now on. Returns when all streams have ended
        or the grace period is over.
        """
        self._draining = True
        for scope in list(self._streams):
            scope.cancel()
        if not self._streams:
            self._drained.set()
        with trio.move_on_after(self.config.drain_grace_period):
            await self._drained.wait()

    # -- HTTP ---------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            request = _Request(scope, receive, tracked_send)
            await self._route(request)
        except _HTTPError as error:
            if not started:
                await self._error(scope, tracked_send, error)
        except Exception:
            logger.exception("unexpected error serving %s %s", scope["method"], scope["path"])
            if not started:
                await self._error(scope, tracked_send, _HTTPError(500, "internal error"))

    async def _route(self, request: _Request) -> None:
        method: str = request.scope["method"]
        handlers = self._resource(request)
        allowed = ", ".join([*handlers, "OPTIONS"])
        if method == "OPTIONS":
            await self._preflight(request, allowed)
            return
        handler = handlers.get(method)
        if handler is None:
            raise _HTTPError(405, "method not allowed", headers=[(b"allow", allowed.encode())])
        await handler()

    def _resource(self, request: _Request) -> dict[str, Callable[[], Awaitable[None]]]:
        """The handlers of the request's path, by method.

        Raises:
            _HTTPError: 404 for an unknown path, 400 for an invalid topic.
        """
        path: str = request.scope["path"]
        # Split the path before percent-decoding it: `/streams/a%2Fack` names the topic
        # "a/ack" (invalid), not the ack endpoint of topic "a".
        raw_path = request.scope.get("raw_path")
        if raw_path is None:
            parts = path.split("/")
        else:
            parts = [unquote(part) for part in bytes(raw_path).decode("latin-1").split("/")]
        plain: Callable[[], Awaitable[None]] | None = None
        if path == "/healthz":
            plain = partial(self._healthz, request)
        elif path == "/metrics":
            plain = partial(self._metrics, request)
        elif path == "/static/trio-stream.js":
            plain = partial(
                self._static, request, "trio-stream.js", b"text/javascript; charset=utf-8"
            )
        elif self.config.demo and path == "/":
            plain = partial(self._static, request, "demo.html", b"text/html; charset=utf-8")
        elif self.config.demo and path == "/demo/config":
            plain = partial(self._demo_config, request)
        elif len(parts) == 2 and parts[1] == "streams":
            return {"GET": partial(self._stream_many, request)}
        elif len(parts) >= 3 and parts[1] == "streams" and parts[2].startswith("_"):
            if len(parts) > 3:
                raise _HTTPError(404, f"no such path: {path[:200]}")
            if parts[2] == "_poll":
                return {"GET": partial(self._poll_many, request)}
            if parts[2] == "_ack":
                return {"POST": partial(self._ack_many, request)}
            raise _HTTPError(404, f"no such path: {path[:200]} (topics do not start with '_')")
        elif len(parts) == 3 and parts[1] == "streams" and parts[2]:
            topic = self._topic(parts[2])
            return {
                "GET": partial(self._stream, request, topic),
                "POST": partial(self._publish, request, topic),
            }
        elif len(parts) == 4 and parts[1] == "streams" and parts[3] == "ack":
            return {"POST": partial(self._ack, request, self._topic(parts[2]))}
        elif len(parts) == 4 and parts[1] == "streams" and parts[3] == "poll":
            return {"GET": partial(self._poll, request, self._topic(parts[2]))}
        if plain is None:
            raise _HTTPError(404, f"no such path: {path[:200]}")
        return {"GET": plain, "HEAD": plain}  # `_respond` leaves the body out for HEAD

    async def _healthz(self, request: _Request) -> None:
        """``200 ok``; ``503 degraded: <problem>`` while the backend (Redis) is unavailable."""
        problem = self.hub.health()
        status, body = (200, b"ok") if problem is None else (503, f"degraded: {problem}".encode())
        await self._respond(request, status, body, content_type=b"text/plain; charset=utf-8")

    async def _metrics(self, request: _Request) -> None:
        body = exposition(self.hub)
        await self._respond(request, 200, body, content_type=METRICS_CONTENT_TYPE.encode())

    async def _demo_config(self, request: _Request) -> None:
        cfg = self.config.hub
        settings: dict[str, object] = {
            "rate": cfg.rate,
            "burst": cfg.burst,
            "lag_limit": cfg.lag_limit,
            "window": cfg.window,
            "topic": "demo",
        }
        # With an authorizer, the page must stream as its token's subject: tell it which
        # (its cookie may be out of reach of scripts). No token, no `client_id`.
        try:
            grant = await self._authorize(request, "stream", ("demo",))
        except _HTTPError:
            grant = None
        if grant is not None and grant.client_id is not None:
            settings["client_id"] = grant.client_id
        await self._json(request, 200, settings)

    @staticmethod
    def _topic(name: str) -> str:
        try:
            return check_topic(name)
        except LocalProtocolError as error:
            raise _HTTPError(400, str(error)) from None

    @staticmethod
    def _topics(request: _Request) -> tuple[str, ...]:
        """The ``topic`` parameters of a stream of several, checked and sorted."""
        try:
            return topic_set(value for key, value in request.query if key == "topic")
        except LocalProtocolError as error:
            raise _HTTPError(400, str(error)) from None

    # -- responses ------------------------------------------------------------------------

    def _cors(self, request: _Request) -> list[tuple[bytes, bytes]]:
        origins = self.config.cors_origins
        origin = request.headers.get(b"origin")
        if not origins or origin is None:
            return []
        if "*" in origins:
            return [
                (b"access-control-allow-origin", b"*"),
                (b"access-control-expose-headers", CORS_EXPOSED),
            ]
        if origin.decode("latin-1") in origins:
            return [
                (b"access-control-allow-origin", origin),
                (b"access-control-allow-credentials", b"true"),
                (b"access-control-expose-headers", CORS_EXPOSED),
                (b"vary", b"Origin"),
            ]
        return []

    async def _preflight(self, request: _Request, allowed: str) -> None:
        cors = self._cors(request)
        headers = [(b"allow", allowed.encode())]
        if cors:
            headers += [
                *cors,
                (b"access-control-allow-methods", allowed.encode()),
                (b"access-control-allow-headers", CORS_ALLOWED_HEADERS),
                (b"access-control-max-age", b"600"),
            ]
        await self._respond(request, 204, b"", headers=headers)

    async def _respond(
        self,
        request: _Request,
        status: int,
        body: bytes,
        *,
        content_type: bytes | None = None,
        headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        all_headers = [(b"cache-control", b"no-store"), *headers]
        if content_type is not None:
            all_headers.append((b"content-type", content_type))
        all_headers.append((b"content-length", str(len(body)).encode()))
        await request.send(
            {"type": "http.response.start", "status": status, "headers": all_headers}
        )
        if request.scope.get("method") == "HEAD":
            body = b""
        await request.send({"type": "http.response.body", "body": body})

    async def _json(
        self,
        request: _Request,
        status: int,
        payload: object,
        headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode()
        await self._respond(
            request, status, body, content_type=b"application/json", headers=headers
        )

    async def _error(self, scope: Scope, send: Send, error: _HTTPError) -> None:
        payload = {"error": error.message, **error.extra}
        body = json.dumps(payload).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
            *error.headers,
        ]
        if any(name == b"retry-after" for name, _ in error.headers):
            self.hub.signal("retry_after")
        try:
            request_headers = {bytes(k).lower(): bytes(v) for k, v in scope.get("headers", ())}
            if request_headers.get(b"origin") and self.config.cors_origins:
                fake = _Request.__new__(_Request)
                fake.headers = request_headers
                headers += self._cors(fake)
        except Exception:  # pragma: no cover - CORS on an error is best effort
            pass
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _static(self, request: _Request, name: str, content_type: bytes) -> None:
        body = resources.files("trio_stream").joinpath("static", name).read_bytes()
        await self._respond(request, 200, body, content_type=content_type)

    # -- the endpoints ---------------------------------------------------------------------

    def _ack_window(self, request: _Request) -> int | None:
        raw = request.param("ack")
        if raw is None:
            return None
        if raw == "":
            return self.config.hub.window
        value = _integer(raw)
        if value is None or not 1 <= value <= 10_000:
            raise _HTTPError(400, f"ack must be an integer from 1 to 10000, got {raw[:50]!r}")
        return value

    # -- authorization -------------------------------------------------------------------

    async def _authorize(
        self, request: _Request, action: Action, topics: tuple[str, ...]
    ) -> Grant | None:
        """The grant of *request* from the configured authorizer (``None``: none is set).

        The grant must allow *action* on every one of *topics*, and must not have
        expired. An authorizer that fails with anything else than `UnauthorizedError`
        or `ForbiddenError` is logged, and the request answered ``401`` (fail closed,
        never ``500``).

        Raises:
            _HTTPError: ``401`` with ``WWW-Authenticate: Bearer``, or ``403``.
        """
        authorizer = self.config.authorizer
        if authorizer is None:
            return None
        client = request.scope.get("client")
        asked = AuthRequest(
            action=action,
            topics=topics,
            headers={
                name.decode("latin-1"): value.decode("latin-1")
                for name, value in request.headers.items()
            },
            cookies=self._cookies(request),
            client_address=(str(client[0]), int(client[1])) if client else None,
        )
        try:
            result = authorizer(asked)
            grant = await result if inspect.isawaitable(result) else result
        except UnauthorizedError as error:
            raise _HTTPError(
                401, str(error) or "unauthorized", headers=[BEARER_CHALLENGE]
            ) from None
        except ForbiddenError as error:
            raise _HTTPError(403, str(error) or "forbidden") from None
        except Exception:
            logger.exception("the authorizer failed on %s", request.scope.get("path"))
            grant = None
        if not isinstance(grant, Grant):
            if grant is not None:
                logger.error("the authorizer returned %r, not a Grant", type(grant).__name__)
            raise _HTTPError(401, "the request could not be authorized", headers=[BEARER_CHALLENGE])
        left = seconds_left(grant)
        if left is not None and left <= 0:
            raise _HTTPError(401, "the grant has expired", headers=[BEARER_CHALLENGE])
        allowed = grant.may_publish if action == "publish" else grant.may_read
        for topic in topics:
            if not allowed(topic):
                verb = "publish to" if action == "publish" else "read"
                raise _HTTPError(403, f"this token may not {verb} topic {topic!r}")
        return grant

    def _cookies(self, request: _Request) -> dict[str, str]:
        """The request's cookies, for the authorizer.

        Every ``Cookie`` field counts (HTTP/2 clients split the header in crumbs). A
        WebSocket handshake from a browser page of another origin than the server's, and
        not listed in ``cors_origins``, gets none: browsers send cookies with cross-site
        WebSocket handshakes, and no CORS check would stop that page from reading the
        stream (cross-site WebSocket hijacking). A bearer header still works.
        """
        crumbs = [
            bytes(value).decode("latin-1")
            for name, value in request.scope.get("headers", ())
            if bytes(name).lower() == b"cookie"
        ]
        if not crumbs:
            return {}
        if request.scope.get("type") == "websocket" and not self._same_or_listed_origin(request):
            return {}
        return parse_cookies("; ".join(crumbs))

    def _same_or_listed_origin(self, request: _Request) -> bool:
        origin = request.header(b"origin")
        if origin is None or origin in self.config.cors_origins:
            return True
        try:
            netloc = urlsplit(origin).netloc
        except ValueError:
            return False
        host = request.header(b"host") or request.header(b":authority") or ""
        return bool(netloc) and netloc.lower() == host.lower()

    def _client_id(self, request: _Request, grant: Grant | None) -> str | None:
        """The client id: the grant's identity, else the one the request names.

        Raises:
            _HTTPError: ``400`` for a malformed id, ``403`` for another than the grant's.
        """
        asked = request.client_id()
        if grant is None or grant.client_id is None:
            return asked
        if asked is not None and asked != grant.client_id:
            raise _HTTPError(403, f"this token is for client {grant.client_id!r}, not {asked!r}")
        return grant.client_id

    @staticmethod
    def _expiry(grant: Grant | None) -> float:
        """The trio deadline at which *grant* expires (``inf``: never)."""
        left = None if grant is None else seconds_left(grant)
        return math.inf if left is None else trio.current_time() + left

    # -- the endpoints, continued ----------------------------------------------------------

    def _connect(
        self, request: _Request, topics: tuple[str, ...], grant: Grant | None, *, several: bool
    ) -> Connection:
        """Admit the stream of *topics* the request asks for (one, unless *several*)."""
        if self._draining:
            raise _HTTPError(503, "server is shutting down", headers=[_retry_after(1)])
        ack = self._ack_window(request)
        last_event_id = request.header(b"last-event-id")
        if last_event_id is None:
            last_event_id = request.param("last_event_id")
        client_id = self._client_id(request, grant)
        try:
            if several:
                return self.hub.connect_many(
                    topics, client_id=client_id, last_event_id=last_event_id, ack=ack
                )
            return self.hub.connect(
                topics[0], client_id=client_id, last_event_id=last_event_id, ack=ack
            )
        except ClientPausedError as paused:
            if several:
                url = poll_url_many(topics, paused.after, paused.client_id)
            else:
                url = poll_url(topics[0], paused.after, paused.client_id)
            raise _HTTPError(
                429,
                "paused",
                headers=[_retry_after(paused.retry_after), (b"x-stream-pause", b"true")],
                extra={"poll_url": url},
            ) from None
        except LimitExceededError as error:
            raise _HTTPError(429, str(error), headers=[_retry_after(error.retry_after)]) from None
        except TopicLimitError:
            raise _HTTPError(429, "too many topics") from None
        except LocalProtocolError as error:
            raise _HTTPError(400, str(error)) from None

    async def _loaded(self, connection: Connection) -> None:
        """Wait until the topic's log can place the stream (a Redis log loads first).

        Before the response starts: so a publish made once the stream is open is after
        the point the stream starts from.

        Raises:
            _HTTPError: 503 when the log does not load in time (Redis unavailable).
        """
        logs = [topic.log for topic, _ in connection.places()]
        with trio.move_on_after(BACKEND_LOAD_TIMEOUT):
            for log in logs:
                await log.wait_ready()
        if not all(log.ready for log in logs):
            raise _HTTPError(503, "redis unavailable: try again", headers=[_retry_after(1)])

    async def _stream(self, request: _Request, topic: str) -> None:
        await self._serve_stream(request, (topic,), several=False)

    async def _stream_many(self, request: _Request) -> None:
        await self._serve_stream(request, self._topics(request), several=True)

    async def _serve_stream(
        self, request: _Request, topics: tuple[str, ...], *, several: bool
    ) -> None:
        grant = await self._authorize(request, "stream", topics)
        connection = self._connect(request, topics, grant, several=several)
        expiry = trio.CancelScope(deadline=self._expiry(grant))
        with connection:
            await self._loaded(connection)
            headers = [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"),
                (b"x-client-id", connection.client_id.encode()),
                *self._cors(request),
            ]
            if request.scope.get("http_version") == "1.1":
                headers.append((b"connection", b"keep-alive"))
            send = request.send
            retry = encode_retry(self.config.hub.retry_ms)
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": retry, "more_body": True})
            self.hub.signal("retry_field")
            sink = _SSESink(send, topics, connection.client_id, several)
            with trio.CancelScope() as drain:
                self._streams.add(drain)
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(_watch_disconnect, request.receive, nursery.cancel_scope)
                        with expiry:
                            await connection.run(sink)
                        nursery.cancel_scope.cancel()
                finally:
                    self._streams.discard(drain)
                    if self._draining and not self._streams:
                        self._drained.set()
            if drain.cancelled_caught:
                with trio.move_on_after(DRAIN_WRITE_TIMEOUT) as cleanup:
                    cleanup.shield = True
                    await send({"type": "http.response.body", "body": retry, "more_body": True})
                    self.hub.signal("retry_field")
            elif expiry.cancelled_caught:
                with trio.move_on_after(DRAIN_WRITE_TIMEOUT) as cleanup:
                    cleanup.shield = True
                    await send({"type": "http.response.body", "body": REAUTH, "more_body": True})
        with trio.move_on_after(DRAIN_WRITE_TIMEOUT) as cleanup:
            cleanup.shield = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _publish(self, request: _Request, topic: str) -> None:
        await self._authorize_publish(request, topic)
        key = _idempotency_key(request.scope)
        events = _check_events(await request.json(MAX_PUBLISH_BODY))
        try:
            ids = await self.hub.submit(topic, events, idempotency_key=key)
        except IdempotencyKeyReusedError:
            raise _HTTPError(
                422,
                f"Idempotency-Key {key!r} was already used on topic {topic!r} "
                "with a different body",
            ) from None
        except BackendUnavailableError as error:
            message = str(error)
            if error.maybe_published and key is not None:
                message += ": retry with the same Idempotency-Key"
            raise _HTTPError(503, message, headers=[_retry_after(error.retry_after)]) from None
        except trio.WouldBlock:
            retry_after = self.hub.publish_retry_after(topic)
            raise _HTTPError(
                429,
                f"topic {topic!r} is full: retry later",
                headers=[_retry_after(retry_after)],
            ) from None
        except TopicLimitError:
            raise _HTTPError(429, "too many topics") from None
        except BatchTooLargeError as error:
            raise _HTTPError(413, str(error)) from None
        except LocalProtocolError as error:
            raise _HTTPError(400, str(error)) from None
        headers = [(b"idempotent-replayed", b"true")] if ids.replayed else []
        await self._json(request, 202, {"ids": list(ids)}, headers)

    async def _authorize_publish(self, request: _Request, topic: str) -> None:
        """Publishing is open unless ``publish_token`` is set (the contract).

        With it, the request needs ``Authorization: Bearer <publish_token>``, or, with an
        authorizer too, a grant that may publish to *topic* (for `JWTAuthorizer`: a token
        in the ``Authorization`` header whose ``publish`` claim matches the topic).

        Raises:
            _HTTPError: ``401`` (``WWW-Authenticate: Bearer``) or ``403``.
        """
        token = self.config.publish_token
        if token is None:
            return
        scheme, _, given = (request.header(b"authorization") or "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), token.encode()
        ):
            return
        if self.config.authorizer is not None:
            await self._authorize(request, "publish", (topic,))
            return
        raise _HTTPError(401, "publishing needs a valid bearer token", headers=[BEARER_CHALLENGE])

    async def _ack(self, request: _Request, topic: str) -> None:
        grant = await self._authorize(request, "ack", (topic,))
        client_id, last_event_id, utilization = await self._ack_body(request, grant)
        await self._acked(
            request,
            partial(
                self.hub.ack,
                topic,
                client_id=client_id,
                last_event_id=last_event_id,
                buffer_utilization=utilization,
            ),
            partial(self._forward_ack, topic, client_id, last_event_id, utilization),
        )

    async def _ack_many(self, request: _Request) -> None:
        # The topics are known once the id is (the hub knows the client's topic sets):
        # a grant must then allow every one of them, as for streaming them.
        grant = await self._authorize(request, "ack", ())
        client_id, last_event_id, utilization = await self._ack_body(request, grant)
        if grant is not None:
            for topic in self.hub.topics_of(client_id, last_event_id):
                if not grant.may_read(topic):
                    raise _HTTPError(403, f"this token may not read topic {topic!r}")
        await self._acked(
            request,
            partial(
                self.hub.ack_many,
                client_id=client_id,
                last_event_id=last_event_id,
                buffer_utilization=utilization,
            ),
            partial(self._forward_ack, "", client_id, last_event_id, utilization),
        )

    async def _ack_body(
        self, request: _Request, grant: Grant | None
    ) -> tuple[str, str, float | None]:
        """``client_id``, ``last_event_id`` and ``buffer_utilization`` of an ack's body.

        Raises:
            _HTTPError: ``400``, ``403`` (another client than the grant's) or ``413``.
        """
        body = await request.json(MAX_ACK_BODY)
        if not isinstance(body, dict):
            raise _HTTPError(400, "the body must be a JSON object")
        client_id, last_event_id = body.get("client_id"), body.get("last_event_id")
        utilization = body.get("buffer_utilization")
        if not isinstance(client_id, str):
            raise _HTTPError(400, "'client_id' must be a string")
        if grant is not None and grant.client_id not in (None, client_id):
            raise _HTTPError(
                403, f"this token is for client {grant.client_id!r}, not {client_id[:200]!r}"
            )
        if not isinstance(last_event_id, str):
            raise _HTTPError(400, "'last_event_id' must be a string")
        if utilization is not None and (
            isinstance(utilization, bool) or not isinstance(utilization, int | float)
        ):
            raise _HTTPError(400, "'buffer_utilization' must be a number from 0.0 to 1.0")
        utilization = None if utilization is None else float(utilization)
        try:
            check_client_id(client_id)
        except LocalProtocolError as error:
            raise _HTTPError(400, str(error)) from None
        return client_id, last_event_id, utilization

    async def _acked(
        self,
        request: _Request,
        ack: Callable[[], None],
        forward: Callable[[Exception, int], Awaitable[None]] | None = None,
    ) -> None:
        """Apply *ack* (the hub's); answer ``204``, or the error it raises.

        An ack this process cannot apply (an unknown client, 404; an id not sent, 409)
        goes to *forward* first, if given: its stream may be on another process.
        """
        try:
            ack()
        except UnknownClientError as error:
            if forward is None:
                raise _HTTPError(404, str(error)) from None
            await forward(error, 404)
        except NotSentError as error:
            if forward is None:
                raise _HTTPError(409, str(error)) from None
            await forward(error, 409)
        except ValueError as error:  # LocalProtocolError included
            raise _HTTPError(400, str(error)) from None
        await self._respond(request, 204, b"", headers=self._cors(request))

    async def _forward_ack(
        self,
        topic: str,
        client_id: str,
        last_event_id: str,
        utilization: float | None,
        error: Exception,
        status: int,
    ) -> None:
        """An ack this process cannot apply goes to the processes streaming to the client.

        With a backend (Redis), the stream may be on another process: the ack is
        forwarded there and answered 204. Without one, or when no process streams to
        the client, it is answered *status* (404 or 409), as *error* says.

        Raises:
            _HTTPError: *status*; 503 when the backend cannot be reached.
        """
        if status == 409:  # the hub knew the client: it counted the utilization already
            utilization = None
        backend = self.hub.config.backend
        if backend is not None:
            try:
                if await backend.forward_ack(
                    topic,
                    client_id=client_id,
                    last_event_id=last_event_id,
                    buffer_utilization=utilization,
                ):
                    return
            except BackendUnavailableError as unavailable:
                raise _HTTPError(
                    503, str(unavailable), headers=[_retry_after(unavailable.retry_after)]
                ) from None
        raise _HTTPError(status, str(error)) from None

    async def _poll(self, request: _Request, topic: str) -> None:
        grant = await self._authorize(request, "poll", (topic,))
        await self._polled(request, grant, partial(self.hub.poll, topic))

    async def _poll_many(self, request: _Request) -> None:
        topics = self._topics(request)
        grant = await self._authorize(request, "poll", topics)
        await self._polled(request, grant, partial(self.hub.poll_many, topics))

    async def _polled(
        self, request: _Request, grant: Grant | None, poll: Callable[..., PollResult]
    ) -> None:
        """Answer a poll with what ``poll(client_id=, after=, limit=)`` (the hub's) gives."""
        raw = request.param("limit")
        limit = DEFAULT_POLL_LIMIT
        if raw is not None:
            value = _integer(raw)
            if value is None or value < 1:
                raise _HTTPError(400, f"limit must be a positive integer, got {raw[:50]!r}")
            limit = min(value, MAX_POLL_LIMIT)
        client_id = self._client_id(request, grant) or secrets.token_urlsafe(12)
        poll = partial(poll, client_id=client_id, after=request.param("after"))
        give_up = trio.current_time() + POLL_WAIT
        try:
            while True:
                try:
                    result = poll(limit=limit)
                    break
                except RateLimitedError as error:
                    if trio.current_time() + error.retry_after > give_up:
                        raise
                    await trio.sleep(error.retry_after)
        except LimitExceededError as error:  # RateLimitedError included
            raise _HTTPError(429, str(error), headers=[_retry_after(error.retry_after)]) from None
        except TopicLimitError:
            raise _HTTPError(429, "too many topics") from None
        events = ",".join(entry.json for entry in result.events)
        tail = json.dumps(
            {
                "last_event_id": result.last_event_id,
                "reset": result.reset,
                "resume_stream": result.resume_stream,
            }
        )
        body = f'{{"events": [{events}], {tail[1:]}'.encode()
        await self._respond(
            request,
            200,
            body,
            content_type=b"application/json",
            headers=[(b"x-client-id", client_id.encode()), *self._cors(request)],
        )

    # -- WebSocket ---------------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        from ._websocket import serve_websocket

        await serve_websocket(self, scope, receive, send)


async def _watch_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    """Cancel *scope* when the client goes away (when the server tells us)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return
