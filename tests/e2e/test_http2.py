"""HTTP/2 over TLS end to end: hypercorn with a `trustme` certificate, ALPN ``h2``.

In-process servers (`serve_app` with ``certfile``/``keyfile``) for the httpx tests; the
real command line (``trio-stream serve --certfile ... --keyfile ...``) for Chromium,
which trusts the test CA by ``--ignore-certificate-errors`` (in this test only).
"""

from __future__ import annotations

import ssl
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import attrs
import h2.config
import h2.connection
import h2.events
import httpx
import pytest
import trio
import trustme

from trio_stream._asgi import App, AppConfig
from trio_stream._cli import bound_http2_send_buffers, serve_app
from trio_stream._core._events import Event
from trio_stream._hub import HubConfig

from ._processes import cli_server
from ._support import StreamReader, host_port, parse_blocks, publish_many

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from trio_stream._asgi import Receive, Scope, Send

pytestmark = pytest.mark.e2e

DEADLINE = 20.0
STREAMS = 20


@attrs.frozen
class Certificates:
    ca: trustme.CA
    certfile: Path
    keyfile: Path

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    folder = tmp_path_factory.mktemp("tls")
    certfile, keyfile = folder / "cert.pem", folder / "key.pem"
    certfile.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(keyfile))
    return Certificates(ca, certfile, keyfile)


class RecordingApp(App):
    """The app, noting each HTTP request's protocol version and client address."""

    seen: list[tuple[str, str, tuple[str, int]]]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            client = scope.get("client") or ("", 0)
            self.seen.append((scope["path"], scope["http_version"], tuple(client)))
        await super().__call__(scope, receive, send)


@asynccontextmanager
async def open_tls_server(
    certificates: Certificates, **hub: Any
) -> AsyncIterator[tuple[str, RecordingApp]]:
    settings: dict[str, Any] = {"rate": 1000.0, "burst": 1000, **hub}
    app = RecordingApp(AppConfig(hub=HubConfig(**settings)))
    app.seen = []
    async with trio.open_nursery() as nursery:
        serve = partial(
            serve_app,
            app,
            host="127.0.0.1",
            port=0,
            certfile=str(certificates.certfile),
            keyfile=str(certificates.keyfile),
        )
        urls = await nursery.start(serve)
        yield urls[0], app
        nursery.cancel_scope.cancel()


async def test_twenty_streams_share_one_http2_connection(certificates: Certificates) -> None:
    async with open_tls_server(certificates) as (url, app):
        assert url.startswith("https://")
        async with httpx.AsyncClient(
            base_url=url, http2=True, verify=certificates.client_context(), timeout=DEADLINE
        ) as client:
            with trio.fail_after(DEADLINE):
                health = await client.get("/healthz")
                assert health.http_version == "HTTP/2"
                readers: list[StreamReader] = []
                started = trio.Event()

                async def read(index: int) -> None:
                    params = {"client_id": f"h2-{index}"}
                    async with client.stream("GET", "/streams/h2", params=params) as response:
                        assert response.status_code == 200
                        assert response.http_version == "HTTP/2"
                        assert "connection" not in response.headers
                        assert response.headers["content-type"].startswith("text/event-stream")
                        assert response.headers["x-client-id"] == f"h2-{index}"
                        reader = StreamReader(response)
                        readers.append(reader)
                        if len(readers) == STREAMS:
                            started.set()
                        await reader.run()

                async with trio.open_nursery() as nursery:
                    for index in range(STREAMS):
                        nursery.start_soon(read, index)
                    await started.wait()
                    for reader in readers:  # each has its `retry:` block: it is live
                        await reader.wait_for(lambda r: bool(r.blocks))
                    ids = await publish_many(client, "h2", [f"event {i}" for i in range(50)])
                    for reader in readers:
                        events = await reader.wait_events(len(ids))
                        assert [event.id for event in events] == ids
                        assert [event.data for event in events] == [f"event {i}" for i in range(50)]
                    assert app.hub.statistics().connections == STREAMS
                    nursery.cancel_scope.cancel()
    streams = [entry for entry in app.seen if entry[0] == "/streams/h2"]
    assert len(streams) == STREAMS + 1  # and the publish
    assert {version for _, version, _ in streams} == {"2"}
    assert len({client for _, _, client in app.seen}) == 1, "more than one connection"


async def test_unread_http2_stream_is_paused_without_holding_up_its_neighbour(
    certificates: Certificates,
) -> None:
    """A hand-driven h2 client never acknowledges one stream's data.

    HTTP/2 flow control closes that stream's window (64 KiB) while the connection's
    window (raised by the client) stays open: hypercorn's writes to that stream wait,
    the stream falls behind and is paused, as a stalled TCP socket would make it. The
    other stream on the same connection gets every event meanwhile.
    """
    async with open_tls_server(certificates, lag_limit=50, rate=0.0) as (url, app):
        context = certificates.client_context()
        context.set_alpn_protocols(["h2"])
        host, port = host_port(url)
        tcp = await trio.open_tcp_stream(host, port)
        async with trio.SSLStream(tcp, context, server_hostname=host) as tls:
            with trio.fail_after(DEADLINE):
                await tls.do_handshake()
                assert tls.selected_alpn_protocol() == "h2"
                conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
                conn.initiate_connection()
                conn.increment_flow_control_window(2**24)  # the connection's, not a stream's
                ids = {}
                for name in ("slow", "fast"):
                    ids[name] = stream_id = conn.get_next_available_stream_id()
                    conn.send_headers(
                        stream_id,
                        [
                            (":method", "GET"),
                            (":scheme", "https"),
                            (":authority", f"{host}:{port}"),
                            (":path", f"/streams/fc?client_id={name}"),
                        ],
                        end_stream=True,
                    )
                await tls.send_all(conn.data_to_send())
                bodies = dict.fromkeys(ids.values(), b"")
                statuses: dict[int, str] = {}

                def fast_events() -> int:
                    blocks, _ = parse_blocks(bodies[ids["fast"]])
                    return sum(block.data is not None for block in blocks)

                async def receive() -> None:
                    data = await tls.receive_some(65536)
                    assert data, "the server closed the connection"
                    for event in conn.receive_data(data):
                        if isinstance(event, h2.events.ResponseReceived):
                            headers = {bytes(k): bytes(v) for k, v in event.headers}
                            statuses[event.stream_id] = headers[b":status"].decode()
                        elif isinstance(event, h2.events.DataReceived):
                            bodies[event.stream_id] += event.data
                            if event.stream_id == ids["fast"]:
                                conn.acknowledge_received_data(
                                    event.flow_controlled_length, event.stream_id
                                )
                    await tls.send_all(conn.data_to_send())

                while len(statuses) < 2 or not all(bodies.values()):
                    await receive()
                assert statuses == {ids["slow"]: "200", ids["fast"]: "200"}
                payload = "x" * 1000
                total = 0
                for _ in range(40):  # 400 events of 1 kB: six times the slow window
                    published = app.hub.publish_nowait(
                        "fc", [Event(data=payload) for _ in range(10)]
                    )
                    total += len(published)
                    while fast_events() < total:
                        await receive()
                assert app.hub.client_statistics("slow").paused_topics == ("fc",)
                assert app.hub.client_statistics("fast").paused_topics == ()
                assert len(bodies[ids["slow"]]) <= 2**16 + 1000
                conn.close_connection()
                await tls.send_all(conn.data_to_send())


async def test_http11_over_tls_keeps_its_connection_header(certificates: Certificates) -> None:
    async with (
        open_tls_server(certificates) as (url, _),
        httpx.AsyncClient(
            base_url=url, http2=False, verify=certificates.client_context(), timeout=DEADLINE
        ) as client,
    ):
        with trio.fail_after(DEADLINE):
            async with client.stream("GET", "/streams/h1") as response:
                assert response.http_version == "HTTP/1.1"
                assert response.status_code == 200
                assert response.headers["connection"] == "keep-alive"


def test_chromium_streams_over_https_with_http2(certificates: Certificates, tmp_path: Path) -> None:
    from .test_browser import CHROMIUM, CHROMIUM_ARGS, _unavailable

    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} is not installed")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed")
    options = ["--certfile", str(certificates.certfile), "--keyfile", str(certificates.keyfile)]
    options += ["--rate", "1000", "--burst", "1000"]
    with (
        cli_server("serve", options, tmp_path / "stderr.txt") as server,
        sync_playwright() as playwright,
    ):
        assert server.url.startswith("https://")
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[*CHROMIUM_ARGS, "--ignore-certificate-errors"],
            headless=True,
            timeout=30_000,
        )
        try:
            context = browser.new_context(ignore_https_errors=True)
            context.set_default_timeout(15_000)
            page = context.new_page()
            page.goto(f"{server.url}/healthz")
            protocol: Any = page.evaluate(
                "() => performance.getEntriesByType('navigation')[0].nextHopProtocol"
            )
            assert protocol == "h2"
            page.add_script_tag(url="/static/trio-stream.js")
            page.evaluate(
                """() => {
                  window.seen = [];
                  window.streams = ["a", "b", "c", "d", "e", "f", "g", "h"].map((name) =>
                    TrioStream.open({topic: "https-" + name}, {
                      onEvent: (ev) => { window.seen.push(name + ":" + ev.data); },
                    }));
                }"""
            )
            # Eight streams at once: more than HTTP/1.1's six connections per origin allow.
            page.wait_for_function("() => window.streams.every((s) => s.state === 'open')")
            for name in "abcdefgh":
                response = httpx.post(
                    f"{server.url}/streams/https-{name}",
                    json=[{"data": "1"}, {"data": "2"}],
                    verify=certificates.client_context(),
                    timeout=5,
                )
                assert response.status_code == 202, response.text
            page.wait_for_function("() => window.seen.length >= 16")
            seen = page.evaluate("() => window.seen")
            assert sorted(seen) == sorted(f"{n}:{d}" for n in "abcdefgh" for d in "12")
            page.evaluate("() => window.streams.forEach((s) => s.close())")
            context.close()
        finally:
            browser.close()


def test_bounding_hypercorns_http2_buffers_is_idempotent() -> None:
    from hypercorn.protocol import h2 as hypercorn_h2

    bound_http2_send_buffers()
    patched = hypercorn_h2.StreamBuffer
    bound_http2_send_buffers()
    assert hypercorn_h2.StreamBuffer is patched
    assert getattr(patched, "_trio_stream_bounded", False)
