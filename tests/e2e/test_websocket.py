"""The stream over WebSocket, end to end: hypercorn on 127.0.0.1, real sockets, real clock.

The server side is driven with ``trio-websocket`` as a plain client (and raw ``wsproto``
where a client must misbehave); the client side, `open_websocket_stream`, against the
real server. Two tests drive the ASGI app directly, to force an interleaving or an ASGI
server without the denial extension.
"""

from __future__ import annotations

import json
import secrets
import ssl
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import httpx
import pytest
import trio
import trio.testing
import wsproto
import wsproto.events
from trio_websocket import ConnectionClosed, ConnectionRejected, wrap_client_stream

from trio_stream._asgi import App, AppConfig
from trio_stream._cli import serve_app
from trio_stream._client import HTTPStatusError, StreamReset, StreamResetError
from trio_stream._core._errors import RemoteProtocolError
from trio_stream._core._events import Event
from trio_stream._hub import HubConfig
from trio_stream._pipeline import _lone_exception_unwrapped
from trio_stream._websocket import serve_websocket
from trio_stream._ws_client import open_websocket_stream

from .conftest import Server, open_server

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

    from trio_websocket import WebSocketConnection

pytestmark = pytest.mark.e2e

DEADLINE = 10.0


# -- helpers ----------------------------------------------------------------------------


def ws_url(server: Server, path: str) -> str:
    return "ws" + server.url.removeprefix("http") + path


@asynccontextmanager
async def connect(
    url: str, *, headers: list[tuple[bytes, bytes]] | None = None, queue: int = 1
) -> AsyncIterator[WebSocketConnection]:
    """A plain ``trio-websocket`` client, on a socket the test owns.

    (``open_websocket_url`` leaves its socket open when the server closes first or
    refuses the handshake, and ``filterwarnings = error`` makes that a failure.)
    """
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    resource = parts.path + (f"?{parts.query}" if parts.query else "")
    try:
        with _lone_exception_unwrapped():
            async with trio.open_nursery() as nursery:
                ws = await wrap_client_stream(
                    nursery,
                    stream,
                    parts.netloc,
                    resource,
                    extra_headers=headers or [],
                    message_queue_size=queue,
                )
                try:
                    yield ws
                finally:
                    with trio.move_on_after(1.0) as cleanup:
                        cleanup.shield = True
                        await ws.aclose()
                    nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll the server's state, which has no event to wait on."""
    while not predicate():  # noqa: ASYNC110
        await trio.sleep(0.005)


async def receive_json(ws: WebSocketConnection) -> dict[str, Any]:
    message = await ws.get_message()
    assert isinstance(message, str)
    document = json.loads(message)
    assert isinstance(document, dict)
    return document


async def nothing_within(ws: WebSocketConnection, seconds: float) -> None:
    with trio.move_on_after(seconds):
        message = await ws.get_message()
        pytest.fail(f"unexpected message {message!r}")


async def read_until_closed(ws: WebSocketConnection) -> tuple[list[dict[str, Any]], int]:
    """Every message left, then the close code."""
    messages: list[dict[str, Any]] = []

    async def take_all() -> None:
        while True:
            messages.append(await receive_json(ws))

    with pytest.raises(ConnectionClosed) as closed:
        await take_all()
    reason = closed.value.reason
    assert reason is not None
    return messages, reason.code


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in the exposition")


def as_event(message: dict[str, Any]) -> tuple[str, str | None, str]:
    assert set(message) == {"id", "event", "data"}, message
    return message["id"], message["event"], message["data"]


# -- the server: events, resume, acks ----------------------------------------------------


async def test_websocket_events_arrive_as_json_with_ids(server: Server) -> None:
    with trio.fail_after(DEADLINE):
        async with (
            httpx.AsyncClient(base_url=server.url) as http,
            connect(ws_url(server, "/streams/t"), headers=[(b"x-client-id", b"c1")]) as ws,
        ):
            assert (b"x-client-id", b"c1") in ws.handshake_headers
            await wait_until(lambda: server.app.hub.statistics().connections == 1)
            published = [
                {"data": "plain"},
                {"event": "tick", "data": "line 1\nline 2\r\nline 3"},
                {"event": "é", "data": '{"json": "inside"}'},
            ]
            response = await http.post("/streams/t", json=published)
            ids = response.json()["ids"]
            got = [as_event(await receive_json(ws)) for _ in ids]
    assert got == [
        (ids[0], None, "plain"),
        (ids[1], "tick", "line 1\nline 2\r\nline 3"),
        (ids[2], "é", '{"json": "inside"}'),
    ]


async def test_websocket_without_client_id_is_assigned_one(server: Server) -> None:
    with trio.fail_after(DEADLINE):
        async with connect(ws_url(server, "/streams/t")) as ws:
            assigned = dict(ws.handshake_headers)[b"x-client-id"].decode()
            await wait_until(lambda: server.app.hub.statistics().connections == 1)
            assert server.app.hub.client_statistics(assigned).streams == 1


@pytest.mark.parametrize("how", ["header", "query"])
async def test_websocket_resume_delivers_exactly_what_follows(server: Server, how: str) -> None:
    hub = server.app.hub
    ids = hub.publish_nowait("t", [Event(data=str(i)) for i in range(5)])
    path, headers = "/streams/t", []
    if how == "header":
        headers.append((b"last-event-id", ids[1].encode()))
    else:
        path += f"?last_event_id={quote(ids[1])}"
    with trio.fail_after(DEADLINE):
        async with connect(ws_url(server, path), headers=headers) as ws:
            got = [as_event(await receive_json(ws))[0] for _ in ids[2:]]
            more = hub.publish_nowait("t", [Event(data="5")])
            got.append(as_event(await receive_json(ws))[0])
            await nothing_within(ws, 0.2)
    assert got == ids[2:] + more


async def test_websocket_resume_from_an_unknown_id_starts_with_a_reset(server: Server) -> None:
    ids = server.app.hub.publish_nowait("t", [Event(data="a"), Event(data="b")])
    with trio.fail_after(DEADLINE):
        async with connect(ws_url(server, "/streams/t?last_event_id=nope")) as ws:
            reset = await receive_json(ws)
            got = [as_event(await receive_json(ws))[0] for _ in ids]
    assert reset == {"type": "reset", "reason": "unknown", "last_event_id": "nope"}
    assert got == ids


async def test_websocket_acks_in_band_release_the_window(server: Server) -> None:
    hub = server.app.hub
    with trio.fail_after(DEADLINE):
        async with (
            httpx.AsyncClient(base_url=server.url) as http,
            connect(ws_url(server, "/streams/t?ack=3&client_id=w")) as ws,
        ):
            await wait_until(lambda: hub.statistics().connections == 1)
            ids = hub.publish_nowait("t", [Event(data=str(i)) for i in range(7)])
            first = [as_event(await receive_json(ws))[0] for _ in range(3)]
            await nothing_within(ws, 0.3)  # the window is full: nothing until an ack
            await ws.send_message(json.dumps({"ack": ids[1], "buffer_utilization": 0.25}))
            second = [as_event(await receive_json(ws))[0] for _ in range(2)]
            await nothing_within(ws, 0.2)
            await ws.send_message(json.dumps({"ack": ids[0]}))  # stale: changes nothing
            await nothing_within(ws, 0.2)
            await ws.send_message(json.dumps({"ack": ids[4]}))
            third = [as_event(await receive_json(ws))[0] for _ in range(2)]
            metrics = (await http.get("/metrics")).text
    assert first + second + third == ids
    assert metric(metrics, "trio_stream_client_buffer_utilization_count") == 1
    assert metric(metrics, "trio_stream_client_buffer_utilization_sum") == 0.25


async def test_websocket_ack_of_an_unsent_event_changes_nothing(server: Server) -> None:
    hub = server.app.hub
    with trio.fail_after(DEADLINE):
        async with connect(ws_url(server, "/streams/t?ack=1")) as ws:
            await wait_until(lambda: hub.statistics().connections == 1)
            ids = hub.publish_nowait("t", [Event(data="a"), Event(data="b")])
            assert as_event(await receive_json(ws))[0] == ids[0]
            await ws.send_message(json.dumps({"ack": ids[1]}))  # well-formed, not sent yet
            await nothing_within(ws, 0.2)  # refused (no credit), and the stream goes on
            await ws.send_message(json.dumps({"ack": ids[0]}))
            assert as_event(await receive_json(ws))[0] == ids[1]


async def test_websocket_ack_racing_its_batch_still_counts() -> None:
    """Drives the ASGI app directly, holding the second message of a batch of four.

    The client acks the first event while the server is still writing the batch: the
    ack must count (the writer records a batch as sent only when all of it is out), so
    with a window of 4 one more event may go.
    """
    app = App(AppConfig(hub=HubConfig(rate=0)))
    to_app, app_receives = trio.open_memory_channel[dict[str, Any]](10)
    app_sends, from_app = trio.open_memory_channel[dict[str, Any]](0)
    scope = {
        "type": "websocket",
        "path": "/streams/t",
        "query_string": b"ack=4&client_id=c",
        "headers": [],
        "extensions": {"websocket.http.response": {}},
    }

    async def next_id() -> str:
        message = await from_app.receive()
        return str(json.loads(message["text"])["id"])

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_websocket, app, scope, app_receives.receive, app_sends.send)
            await to_app.send({"type": "websocket.connect"})
            assert (await from_app.receive())["type"] == "websocket.accept"
            ids = app.hub.publish_nowait("t", [Event(data=str(i)) for i in range(4)])
            assert await next_id() == ids[0]  # the sink now waits to hand over the second
            await to_app.send({"type": "websocket.receive", "text": json.dumps({"ack": ids[0]})})
            await trio.testing.wait_all_tasks_blocked()
            assert [await next_id() for _ in ids[1:]] == ids[1:]
            more = app.hub.publish_nowait("t", [Event(data="4")])
            assert await next_id() == more[0]
            await to_app.send({"type": "websocket.disconnect", "code": 1000})
    assert app.hub.statistics().connections == 0


# -- the server: malformed messages, refusals, pauses, slots ----------------------------


@pytest.mark.parametrize(
    ("message", "code"),
    [
        pytest.param("not json", 1008, id="not-json"),
        pytest.param("[1, 2]", 1008, id="not-an-object"),
        pytest.param("[" * 60_000, 1008, id="too-big"),
        pytest.param('{"ack": 5}', 1008, id="id-not-a-string"),
        pytest.param('{"id": "x"}', 1008, id="no-ack"),
        pytest.param('{"ack": "zzz"}', 1008, id="malformed-id"),
        pytest.param('{"ack": "ID", "buffer_utilization": 2}', 1008, id="utilization-range"),
        pytest.param('{"ack": "ID", "buffer_utilization": "x"}', 1008, id="utilization-type"),
        pytest.param('{"ack": "ID", "buffer_utilization": true}', 1008, id="utilization-bool"),
        pytest.param('{"ack": "ID", "topic": "other"}', 1008, id="other-topic"),
        pytest.param(b"\x00\x01", 1003, id="binary"),
    ],
)
async def test_websocket_malformed_message_closes_only_that_stream(
    server: Server, message: str | bytes, code: int
) -> None:
    hub = server.app.hub
    with trio.fail_after(DEADLINE):
        async with (
            connect(ws_url(server, "/streams/t?client_id=bad&ack=5")) as bad,
            connect(ws_url(server, "/streams/t?client_id=good")) as good,
        ):
            await wait_until(lambda: hub.statistics().connections == 2)
            ids = hub.publish_nowait("t", [Event(data="1")])
            assert as_event(await receive_json(bad))[0] == ids[0]
            assert as_event(await receive_json(good))[0] == ids[0]
            if isinstance(message, str):
                message = message.replace("ID", ids[0])
            await bad.send_message(message)
            left, closed_with = await read_until_closed(bad)
            assert (left, closed_with) == ([], code)
            await wait_until(lambda: hub.statistics().connections == 1)
            more = hub.publish_nowait("t", [Event(data="2")])
            assert as_event(await receive_json(good))[0] == more[0]
    assert hub.client_statistics("bad").paused_topics == ()


async def test_websocket_refusals_answer_as_the_event_stream() -> None:
    async with (
        open_server(hub={"max_streams_per_client": 1}) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        with trio.fail_after(DEADLINE):
            async with connect(ws_url(server, "/streams/t?client_id=one")):
                await wait_until(lambda: server.app.hub.statistics().connections == 1)
                with pytest.raises(ConnectionRejected) as refused:
                    async with connect(ws_url(server, "/streams/t?client_id=one")):
                        pass
                sse = await http.get("/streams/t", params={"client_id": "one"})
            assert refused.value.status_code == sse.status_code == 429
            headers = dict(refused.value.headers)
            assert headers[b"retry-after"] == sse.headers["retry-after"].encode()
            assert json.loads(refused.value.body or b"") == sse.json()
            for path, status in [
                ("/streams/t?ack=0", 400),
                ("/streams/t?client_id=b%20d", 400),
                ("/streams/bad%20topic", 400),
                ("/streams/a%2Fb", 400),
                ("/elsewhere", 404),
            ]:
                with pytest.raises(ConnectionRejected) as refused:
                    async with connect(ws_url(server, path)):
                        pass
                assert refused.value.status_code == status, path
                assert "error" in json.loads(refused.value.body or b"")


@pytest.mark.parametrize(
    ("query", "hub_options", "code"),
    [
        pytest.param(b"ack=0", {}, 1008, id="400"),
        pytest.param(b"client_id=c", {"max_topics": 1}, 1013, id="429"),
    ],
)
async def test_websocket_refusal_without_the_denial_extension(
    query: bytes, hub_options: dict[str, Any], code: int
) -> None:
    """An ASGI server without ``websocket.http.response``: accept, then close at once."""
    app = App(AppConfig(hub=HubConfig(**hub_options)))
    app.hub.publish_nowait("other", [Event(data="x")])
    scope = {"type": "websocket", "path": "/streams/t", "query_string": query, "headers": []}
    to_app, app_receives = trio.open_memory_channel[dict[str, Any]](10)
    app_sends, from_app = trio.open_memory_channel[dict[str, Any]](10)
    await to_app.send({"type": "websocket.connect"})
    with trio.fail_after(DEADLINE):
        await serve_websocket(app, scope, app_receives.receive, app_sends.send)
    accept, close = from_app.receive_nowait(), from_app.receive_nowait()
    assert accept["type"] == "websocket.accept"
    assert close["type"] == "websocket.close"
    assert close["code"] == code
    assert close["reason"]


async def test_websocket_reader_that_stops_reading_is_paused() -> None:
    """The client stops reading while big events pile up: paused as an SSE reader would be."""
    options = {"lag_limit": 10, "rate": 0, "log_max_bytes": 1 << 28, "poll_interval": 0.05}
    async with (
        open_server(hub=options) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        hub, url = server.app.hub, ws_url(server, "/streams/t?client_id=slow")
        with trio.fail_after(DEADLINE):
            async with connect(url, queue=1) as ws:
                first = hub.publish_nowait("t", [Event(data="first")])
                assert as_event(await receive_json(ws))[0] == first[0]
                big = secrets.token_hex(32 * 1024)  # 64 KiB that don't compress
                published = 0
                while "t" not in hub.client_statistics("slow").paused_topics and published < 400:
                    hub.publish_nowait("t", [Event(data=big)])
                    published += 1
                    await trio.sleep(0.002)
                messages, code = await read_until_closed(ws)  # reading again
            *events, pause = messages
            assert code == 1013
            sent = [as_event(event)[0] for event in events]
            assert 0 < len(sent) < published
            assert pause == {
                "type": "pause",
                "poll_url": f"/streams/t/poll?after={quote(sent[-1])}&client_id=slow",
                "retry_after_ms": 50,
            }
            # The event stream refuses this client too, until it has polled.
            refused = await http.get("/streams/t", params={"client_id": "slow"})
            assert refused.status_code == 429
            assert refused.headers["x-stream-pause"] == "true"
            assert refused.json() == {"error": "paused", "poll_url": pause["poll_url"]}
            # A new WebSocket is told the same at once.
            async with connect(url) as again:
                assert await read_until_closed(again) == ([pause], 1013)
            assert hub.statistics().retry_signals["pause"] == 2
            # Polling to the head unpauses it: the WebSocket is accepted again.
            poll: dict[str, Any] = {"resume_stream": False}
            after = sent[-1]
            while not poll["resume_stream"]:
                answer = await http.get(
                    "/streams/t/poll", params={"after": after, "client_id": "slow", "limit": 1000}
                )
                poll = answer.json()
                after = poll["last_event_id"]
            async with connect(url) as resumed:
                await wait_until(lambda: hub.statistics().connections == 1)
                more = hub.publish_nowait("t", [Event(data="after")])
                assert as_event(await receive_json(resumed))[0] == more[0]


async def test_websocket_sends_are_counted_in_metrics(server: Server) -> None:
    hub = server.app.hub
    with trio.fail_after(DEADLINE):
        async with httpx.AsyncClient(base_url=server.url) as http:
            async with connect(ws_url(server, "/streams/t")) as ws:
                await wait_until(lambda: hub.statistics().connections == 1)
                ids = hub.publish_nowait("t", [Event(data=str(i)) for i in range(5)])
                for _ in ids:
                    await receive_json(ws)
                await wait_until(lambda: hub.statistics().sent == len(ids))
                during = (await http.get("/metrics")).text
            await wait_until(lambda: hub.statistics().connections == 0)
            after = (await http.get("/metrics")).text
    assert metric(during, "trio_stream_events_sent_total") == 5
    assert metric(during, "trio_stream_connections") == 1
    assert metric(during, "trio_stream_client_lag_count") == 5
    assert metric(after, "trio_stream_connections") == 0


async def _open_and_drop(server: Server, path: str) -> None:
    """A WebSocket whose TCP connection just goes away: no closing handshake."""
    host, port = server.url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    client = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    await stream.send_all(client.send(wsproto.events.Request(host=host, target=path)))
    accepted = False
    while not accepted:
        client.receive_data(await stream.receive_some(65536))
        accepted = any(isinstance(e, wsproto.events.AcceptConnection) for e in client.events())
    await trio.testing.wait_all_tasks_blocked(0.05)
    await stream.aclose()


@pytest.mark.parametrize("how", ["close", "drop"])
async def test_websocket_client_leaving_frees_its_slot(how: str) -> None:
    async with open_server(hub={"max_streams_per_client": 1}) as server:
        hub, path = server.app.hub, "/streams/t?client_id=one"
        with trio.fail_after(DEADLINE):
            for _ in range(3):
                if how == "close":
                    async with connect(ws_url(server, path)):
                        await wait_until(lambda: hub.statistics().connections == 1)
                else:
                    await _open_and_drop(server, path)
                await wait_until(lambda: hub.statistics().connections == 0)
            assert hub.client_statistics("one").streams == 0


async def test_websocket_streams_close_with_1001_when_the_server_drains() -> None:
    async with open_server(drain_grace_period=2.0) as server:
        with trio.fail_after(DEADLINE):
            async with connect(ws_url(server, "/streams/t")) as ws:
                await wait_until(lambda: server.app.hub.statistics().connections == 1)
                await server.app.drain()
                assert await read_until_closed(ws) == ([], 1001)
            with pytest.raises(ConnectionRejected) as refused:
                async with connect(ws_url(server, "/streams/t")):
                    pass
            assert refused.value.status_code == 503


# -- the client --------------------------------------------------------------------------


async def publish_when_connected(server: Server, topic: str, events: list[Event]) -> list[str]:
    await wait_until(lambda: server.app.hub.statistics().connections >= 1)
    return server.app.hub.publish_nowait(topic, events)


async def test_client_resumes_without_loss_after_the_server_closes(server: Server) -> None:
    hub, got = server.app.hub, []
    with trio.fail_after(DEADLINE):
        async with open_websocket_stream(
            ws_url(server, "/streams/t"), retry_interval=0.05
        ) as events:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    publish_when_connected, server, "t", [Event(data=str(i)) for i in range(3)]
                )
                async for item in events:
                    assert isinstance(item, Event)
                    got.append(item.data)
                    if len(got) == 2:
                        for stream in list(server.app._streams):  # as a drain does: 1001
                            stream.cancel()
                        await wait_until(lambda: hub.statistics().connections == 0)
                        hub.publish_nowait("t", [Event(data="3"), Event(data="4")])
                    if len(got) == 5:
                        break
            stats = events.statistics()
    assert got == ["0", "1", "2", "3", "4"]
    assert stats.connections == 2
    assert stats.duplicates == 0
    assert stats.client_id is not None
    assert hub.client_statistics(stats.client_id).streams == 0  # the server's own id


async def test_client_ack_mode_acknowledges_in_band(server: Server) -> None:
    with trio.fail_after(DEADLINE):
        async with open_websocket_stream(
            ws_url(server, "/streams/t"), ack=2, ack_interval=0.01
        ) as events:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    publish_when_connected, server, "t", [Event(data=str(i)) for i in range(8)]
                )
                got = []
                async for item in events:
                    assert isinstance(item, Event)
                    got.append(item.data)
                    if len(got) == 8:
                        break
            stats = events.statistics()
    assert got == [str(i) for i in range(8)]  # a window of 2: only acks let them through
    assert stats.acks >= 3
    assert stats.connections == 1


async def test_client_follows_a_pause_through_polling_and_back() -> None:
    options = {"lag_limit": 4, "rate": 100.0, "burst": 2, "poll_interval": 0.02}
    async with open_server(hub=options) as server:
        with trio.fail_after(DEADLINE):
            async with open_websocket_stream(
                ws_url(server, "/streams/t?client_id=p"), retry_interval=0.02
            ) as events:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        publish_when_connected, server, "t", [Event(data=str(i)) for i in range(30)]
                    )
                    got = []
                    async for item in events:
                        assert isinstance(item, Event)
                        got.append(item.data)
                        if len(got) == 30:
                            break
                stats = events.statistics()
    assert got == [str(i) for i in range(30)]
    assert stats.pauses >= 1
    assert stats.polls >= 1
    assert stats.connections >= 2


async def test_client_surfaces_a_reset(server: Server) -> None:
    ids = server.app.hub.publish_nowait("t", [Event(data="kept")])
    url = ws_url(server, "/streams/t")
    with trio.fail_after(DEADLINE):
        async with open_websocket_stream(url, last_event_id="gone") as events:
            reset = await events.__anext__()
            event = await events.__anext__()
        async with open_websocket_stream(url, last_event_id="gone", raise_on_reset=True) as events:
            with pytest.raises(StreamResetError):
                await events.__anext__()
            after_reset = await events.__anext__()
    assert reset == StreamReset(reason="unknown", last_event_id="gone", topic="t")
    assert isinstance(event, Event)
    assert event.id == ids[0]
    assert isinstance(after_reset, Event)
    assert after_reset.data == "kept"


@pytest.mark.parametrize(
    ("path", "status"), [("/streams/t?ack=zero", 400), ("/streams/bad%20topic", 400)]
)
async def test_client_raises_when_the_handshake_is_refused(
    server: Server, path: str, status: int
) -> None:
    with trio.fail_after(DEADLINE):
        async with open_websocket_stream(ws_url(server, path)) as events:
            with pytest.raises(HTTPStatusError) as refused:
                await events.__anext__()
    assert refused.value.status_code == status


async def test_client_reconnects_when_pings_go_unanswered() -> None:
    """A server that accepts the WebSocket, then never reads nor answers again."""
    connections = 0

    async def silent_server(stream: trio.SocketStream) -> None:
        nonlocal connections
        server = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
        while True:
            server.receive_data(await stream.receive_some(65536))
            if any(isinstance(e, wsproto.events.Request) for e in server.events()):
                break
        await stream.send_all(server.send(wsproto.events.AcceptConnection()))
        connections += 1
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, host="127.0.0.1"), silent_server, 0)
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(DEADLINE):
            async with (
                open_websocket_stream(
                    f"ws://127.0.0.1:{port}/streams/t", heartbeat_timeout=0.3, retry_interval=0.01
                ) as events,
                trio.open_nursery() as reading,
            ):
                reading.start_soon(events.__anext__)
                await wait_until(lambda: connections >= 2)
                reading.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


async def test_client_leaving_frees_the_server_slot() -> None:
    async with open_server(hub={"max_streams_per_client": 1}) as server:
        hub = server.app.hub
        with trio.fail_after(DEADLINE):
            for _ in range(2):
                url = ws_url(server, "/streams/t?client_id=one")
                async with open_websocket_stream(url) as ev, trio.open_nursery() as nursery:
                    nursery.start_soon(publish_when_connected, server, "t", [Event(data="x")])
                    assert isinstance(await ev.__anext__(), Event)
                await wait_until(lambda: hub.statistics().connections == 0)


async def test_client_over_tls(tmp_path: Path) -> None:
    """``wss://``: events with a trusted certificate; a clear error with an untrusted one."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    app = App(AppConfig(hub=HubConfig(rate=0)))
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(
            partial(
                serve_app,
                app,
                host="127.0.0.1",
                port=0,
                certfile=str(certfile),
                keyfile=str(keyfile),
            )
        )
        url = "wss" + urls[0].removeprefix("https") + "/streams/t"
        server = Server(urls[0], app)
        with trio.fail_after(DEADLINE):
            async with open_websocket_stream(url, ssl_context=trusted) as events:
                nursery.start_soon(publish_when_connected, server, "t", [Event(data="secret")])
                event = await events.__anext__()
            async with open_websocket_stream(url) as events:  # the system's trust store
                with pytest.raises(RemoteProtocolError, match="certificate"):
                    await events.__anext__()
        nursery.cancel_scope.cancel()
    assert isinstance(event, Event)
    assert event.data == "secret"


async def test_client_retries_a_handshake_that_gets_no_answer() -> None:
    attempts = 0

    async def mute_server(stream: trio.SocketStream) -> None:
        nonlocal attempts
        attempts += 1
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, host="127.0.0.1"), mute_server, 0)
        port = listeners[0].socket.getsockname()[1]
        url = f"ws://127.0.0.1:{port}/streams/t"
        with trio.fail_after(DEADLINE):
            async with open_websocket_stream(
                url, heartbeat_timeout=0.1, retry_interval=0.01, max_attempts=3
            ) as events:
                with pytest.raises(trio.BrokenResourceError, match="3 failed attempts"):
                    await events.__anext__()
        nursery.cancel_scope.cancel()
    assert attempts == 3


async def test_client_gives_up_after_max_attempts_when_nobody_listens() -> None:
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        url = f"ws://127.0.0.1:{port}/streams/t"
        with trio.fail_after(DEADLINE):
            async with open_websocket_stream(url, retry_interval=0.01, max_attempts=2) as events:
                with pytest.raises(trio.BrokenResourceError, match="2 failed attempts"):
                    await events.__anext__()
