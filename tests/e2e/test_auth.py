"""Authorization end to end: JWTs (``--auth-secret``) and the authorizer hook.

Hypercorn on 127.0.0.1 serving an `App` with an authorizer, real sockets, the real clock
(the expiry tests wait ~2 s of it: a JWT's ``exp`` is wall-clock time). Every endpoint
is refused for every kind of bad token; a browser streams with the token in its cookie.
"""

from __future__ import annotations

import base64
import json
import logging
import sys
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import httpx
import jwt
import pytest
import trio
import trio.lowlevel
from cryptography.hazmat.primitives.asymmetric import rsa
from trio_websocket import ConnectionRejected

from trio_stream._auth import (
    AuthRequest,
    ForbiddenError,
    Grant,
    JWTAuthorizer,
    UnauthorizedError,
    parse_cookies,
)
from trio_stream._cli import app_from_env, build_app
from trio_stream._client import HTTPStatusError, open_event_stream
from trio_stream._core._errors import LocalProtocolError
from trio_stream._core._events import Event

from ._processes import cli_server
from ._support import http_client, open_reader, publish, wait_until
from .conftest import Server, open_server
from .test_websocket import connect, read_until_closed, ws_url

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator
    from contextlib import AbstractAsyncContextManager
    from pathlib import Path

    from playwright.sync_api import Browser

pytestmark = pytest.mark.e2e

DEADLINE = 10.0
SECRET = "e2e-auth-secret-" + "0123456789abcdef" * 4  # long enough for HS512 too
PUBLISH_TOKEN = "e2e-publish-token"
COOKIE = "trio_stream_token"


def make_token(
    sub: str = "alice",
    topics: list[str] | None = None,
    *,
    publish: list[str] | None = None,
    expires_in: float = 300.0,
    key: Any = SECRET,
    algorithm: str = "HS256",
) -> str:
    """A JWT with the contract's claims (``topics`` defaults to ``["news"]``)."""
    claims: dict[str, Any] = {
        "sub": sub,
        "topics": ["news"] if topics is None else topics,
        "exp": int(time.time() + expires_in),
    }
    if publish is not None:
        claims["publish"] = publish
    return jwt.encode(claims, key, algorithm=algorithm)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token() -> str:
    """``alg: none``, built by hand (PyJWT will not sign it with a key)."""
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = _b64(json.dumps({"sub": "alice", "topics": ["news"]}).encode())
    return f"{header}.{payload}."


def rs256_token() -> str:
    """Well signed, but with RS256: the server only takes HS256."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return make_token(key=key, algorithm="RS256")


BAD_TOKENS: dict[str, Callable[[], str | None]] = {
    "missing": lambda: None,
    "garbage": lambda: "not-a-jwt",
    "forged": lambda: make_token(key="another-secret-" + "fedcba9876543210" * 4),
    "expired": lambda: make_token(expires_in=-60),
    "alg-none": unsigned_token,
    "hs512": lambda: make_token(algorithm="HS512"),
    "rs256": rs256_token,
    "bad-sub": lambda: make_token(sub="not a client id"),
}


def bearer(token: str | None) -> dict[str, str]:
    return {} if token is None else {"Authorization": f"Bearer {token}"}


def auth_server(**options: Any) -> AbstractAsyncContextManager[Server]:
    """A server checking JWTs signed with `SECRET` (publishing open unless a token is set)."""
    options.setdefault("authorizer", JWTAuthorizer(SECRET))
    return open_server(**options)


def assert_unauthorized(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].lower().startswith("bearer")
    assert response.headers["content-type"] == "application/json"
    assert isinstance(response.json()["error"], str)


def assert_forbidden(response: httpx.Response) -> None:
    assert response.status_code == 403, response.text
    assert response.headers["content-type"] == "application/json"
    assert isinstance(response.json()["error"], str)


async def ack_request(
    client: httpx.AsyncClient, token: str | None, client_id: str = "alice", topic: str = "news"
) -> httpx.Response:
    body = {"client_id": client_id, "last_event_id": "x", "buffer_utilization": 0.0}
    return await client.post(f"/streams/{topic}/ack", json=body, headers=bearer(token))


async def ws_refusal(server: Server, path: str, headers: dict[str, str]) -> ConnectionRejected:
    encoded = [(name.encode(), value.encode()) for name, value in headers.items()]
    with pytest.raises(ConnectionRejected) as refused:
        async with connect(ws_url(server, path), headers=encoded):
            pass
    return refused.value


# -- 401 and 403 on every endpoint ----------------------------------------------------------


@pytest.mark.parametrize("kind", list(BAD_TOKENS))
async def test_bad_tokens_are_401_on_every_endpoint(kind: str) -> None:
    token = BAD_TOKENS[kind]()
    async with auth_server(publish_token=PUBLISH_TOKEN) as server, http_client(server) as client:
        with trio.fail_after(DEADLINE):
            assert_unauthorized(await client.get("/streams/news", headers=bearer(token)))
            assert_unauthorized(await client.get("/streams/news/poll", headers=bearer(token)))
            assert_unauthorized(await ack_request(client, token))
            published = await client.post(
                "/streams/news", json={"data": "x"}, headers=bearer(token)
            )
            assert_unauthorized(published)
            if token is not None:  # the same token in the cookie
                client.cookies.set(COOKIE, token)
                assert_unauthorized(await client.get("/streams/news"))
                assert_unauthorized(await client.get("/streams/news/poll"))
                assert_unauthorized(await ack_request(client, None))
                client.cookies.clear()
            refused = await ws_refusal(server, "/streams/news", bearer(token))
            assert refused.status_code == 401
            assert dict(refused.headers)[b"www-authenticate"].lower().startswith(b"bearer")
            assert "error" in json.loads(refused.body or b"")
            assert server.app.hub.statistics().connections == 0


async def test_token_for_another_topic_is_403_on_every_endpoint() -> None:
    token = make_token(topics=["sports", "news.local"], publish=["sports"])
    async with auth_server(publish_token=PUBLISH_TOKEN) as server, http_client(server) as client:
        with trio.fail_after(DEADLINE):
            assert_forbidden(await client.get("/streams/news", headers=bearer(token)))
            assert_forbidden(await client.get("/streams/news/poll", headers=bearer(token)))
            assert_forbidden(await ack_request(client, token))
            published = await client.post(
                "/streams/news", json={"data": "x"}, headers=bearer(token)
            )
            assert_forbidden(published)
            refused = await ws_refusal(server, "/streams/news", bearer(token))
            assert refused.status_code == 403
            assert "error" in json.loads(refused.body or b"")


async def test_publish_needs_the_publish_token_or_a_publish_claim() -> None:
    reader_only = make_token(topics=["news"])
    publisher = make_token(topics=[], publish=["news*"])
    async with auth_server(publish_token=PUBLISH_TOKEN) as server, http_client(server) as client:
        with trio.fail_after(DEADLINE):
            event = {"data": "x"}
            assert_unauthorized(await client.post("/streams/news", json=event))
            assert_forbidden(
                await client.post("/streams/news", json=event, headers=bearer(reader_only))
            )
            for credential in (PUBLISH_TOKEN, publisher):
                response = await client.post(
                    "/streams/news.flash", json=event, headers=bearer(credential)
                )
                assert response.status_code == 202, response.text
            # A cookie may read, never publish (a cross-site form would carry it too).
            client.cookies.set(COOKIE, publisher)
            assert_forbidden(await client.post("/streams/news", json=event))


async def test_publishing_stays_open_without_a_publish_token() -> None:
    """The contract leaves publishing to ``--publish-token``: unset, anyone publishes."""
    async with auth_server() as server, http_client(server) as client:
        assert await publish(client, "news", {"data": "x"})


# -- what a good token does --------------------------------------------------------------


async def test_token_streams_polls_and_acks_as_its_subject() -> None:
    token = make_token(sub="alice", topics=["news"])
    async with auth_server() as server, http_client(server, headers=bearer(token)) as client:
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                reader = await open_reader(nursery, client, "/streams/news", params={"ack": "2"})
                assert reader.response.headers["x-client-id"] == "alice"
                ids = await publish(client, "news", [{"data": "1"}, {"data": "2"}])
                events = await reader.wait_events(2)
                assert [event.id for event in events] == ids
                response = await client.post(
                    "/streams/news/ack", json={"client_id": "alice", "last_event_id": ids[1]}
                )
                assert response.status_code == 204, response.text
                polled = await client.get("/streams/news/poll")
                assert polled.status_code == 200, polled.text
                assert polled.headers["x-client-id"] == "alice"
                assert [event["id"] for event in polled.json()["events"]] == ids
                nursery.cancel_scope.cancel()


async def test_prefix_grant_reads_the_topics_under_it_only() -> None:
    token = make_token(sub="alice", topics=["user.alice.*", "lobby"])
    async with auth_server() as server, http_client(server, headers=bearer(token)) as client:
        with trio.fail_after(DEADLINE):
            for topic in ("user.alice.orders", "user.alice.", "lobby"):
                polled = await client.get(f"/streams/{topic}/poll")
                assert polled.status_code == 200, (topic, polled.text)
            for topic in ("user.bob.orders", "user.alice", "user.alic", "lobby2", "Lobby"):
                assert_forbidden(await client.get(f"/streams/{topic}/poll"))
            async with trio.open_nursery() as nursery:
                reader = await open_reader(nursery, client, "/streams/user.alice.orders")
                ids = await publish(client, "user.alice.orders", {"data": "order 1"})
                assert [event.id for event in await reader.wait_events(1)] == ids
                nursery.cancel_scope.cancel()
            assert_forbidden(await client.get("/streams/user.bob.orders"))


async def test_another_client_id_than_the_subject_is_403() -> None:
    token = make_token(sub="alice")
    async with auth_server() as server, http_client(server, headers=bearer(token)) as client:
        with trio.fail_after(DEADLINE):
            impostor = {"X-Client-ID": "bob"}
            assert_forbidden(await client.get("/streams/news", headers=impostor))
            assert_forbidden(await client.get("/streams/news", params={"client_id": "bob"}))
            assert_forbidden(await client.get("/streams/news/poll", headers=impostor))
            assert_forbidden(await client.get("/streams/news/poll?client_id=bob"))
            assert_forbidden(await ack_request(client, token, client_id="bob"))
            refused = await ws_refusal(server, "/streams/news?client_id=bob", bearer(token))
            assert refused.status_code == 403
            # Naming itself is fine.
            polled = await client.get("/streams/news/poll", headers={"X-Client-ID": "alice"})
            assert polled.status_code == 200
            assert polled.headers["x-client-id"] == "alice"


async def test_cookie_token_streams_and_polls() -> None:
    token = make_token(sub="carol", topics=["news"])
    async with auth_server() as server, http_client(server) as client:
        with trio.fail_after(DEADLINE):
            headers = {"Cookie": f"theme=dark; {COOKIE}={token}; other=1"}
            polled = await client.get("/streams/news/poll", headers=headers)
            assert polled.status_code == 200, polled.text
            assert polled.headers["x-client-id"] == "carol"
            async with trio.open_nursery() as nursery:
                reader = await open_reader(nursery, client, "/streams/news", headers=headers)
                ids = await publish(client, "news", {"data": "hi"})
                assert [event.id for event in await reader.wait_events(1)] == ids
                nursery.cancel_scope.cancel()


async def test_websocket_cookie_counts_from_the_same_origin_only() -> None:
    token = make_token(sub="dave", topics=["news"])
    cookie = f"{COOKIE}={token}"
    async with auth_server(cors_origins=("https://app.example",)) as server:
        host = server.url.removeprefix("http://")
        with trio.fail_after(DEADLINE):
            for origin in (None, f"http://{host}", "https://app.example"):
                headers = {"Cookie": cookie} | ({} if origin is None else {"Origin": origin})
                encoded = [(k.encode(), v.encode()) for k, v in headers.items()]
                async with connect(ws_url(server, "/streams/news"), headers=encoded):
                    pass
            # Another site's page: the browser sends the cookie, which must not count.
            refused = await ws_refusal(
                server, "/streams/news", {"Cookie": cookie, "Origin": "https://evil.example"}
            )
            assert refused.status_code == 401
            # A bearer header (which no page can set on a WebSocket) still does.
            async with connect(
                ws_url(server, "/streams/news"),
                headers=[
                    (b"authorization", f"Bearer {token}".encode()),
                    (b"origin", b"https://evil.example"),
                ],
            ):
                pass


# -- expiry -------------------------------------------------------------------------------


def _expiring_token(seconds: float) -> tuple[str, float]:
    """A token expiring at the next whole second at least *seconds* away; and that time."""
    expires = float(int(time.time() + seconds) + 1)
    claims = {"sub": "erin", "topics": ["news"], "exp": int(expires)}
    return jwt.encode(claims, SECRET, algorithm="HS256"), expires


async def test_open_stream_ends_with_reauth_at_expiry() -> None:
    token, expires = _expiring_token(1.0)
    async with auth_server() as server, http_client(server, headers=bearer(token)) as client:
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                reader = await open_reader(nursery, client, "/streams/news")
                ids = await publish(client, "news", {"data": "before"})
                assert [event.id for event in await reader.wait_events(1)] == ids
                await reader.wait_for(lambda r: r.ended)
            ended_at = time.time()
            last = reader.blocks[-1]
            assert last.event == "reauth"
            assert last.id is None
            assert last.json() == {"reason": "expired"}
            assert expires - 0.1 <= ended_at <= expires + 1.5
            # The same token is now refused.
            assert_unauthorized(await client.get("/streams/news"))
            assert server.app.hub.statistics().connections == 0


async def test_open_websocket_gets_reauth_and_1008_at_expiry() -> None:
    token, expires = _expiring_token(1.0)
    async with auth_server() as server:
        with trio.fail_after(DEADLINE):
            headers = [(b"authorization", f"Bearer {token}".encode())]
            async with connect(ws_url(server, "/streams/news"), headers=headers) as ws:
                messages, code = await read_until_closed(ws)
            assert time.time() >= expires - 0.1
            assert messages == [{"type": "reauth", "reason": "expired"}]
            assert code == 1008


async def test_python_client_streams_with_a_token_until_it_expires() -> None:
    """`open_event_stream` with the bearer header: events, then ``reauth``, then 401."""
    token, expires = _expiring_token(1.0)
    async with auth_server() as server, http_client(server) as client:
        with trio.fail_after(DEADLINE):
            received: list[str] = []

            async def publish_soon() -> None:
                await wait_until(lambda: server.app.hub.statistics().connections == 1)
                await publish(client, "news", {"data": "hello"})

            async def consume() -> None:
                async with open_event_stream(
                    f"{server.url}/streams/news",
                    headers=bearer(token),
                    client_id="erin",
                    retry_interval=0.05,
                ) as events:
                    async for event in events:
                        assert isinstance(event, Event)
                        received.append(event.data)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(publish_soon)
                with pytest.raises(HTTPStatusError) as refused:
                    await consume()
            assert received == ["hello"]
            assert refused.value.status_code == 401
            assert time.time() >= expires - 0.1


# -- the hook -----------------------------------------------------------------------------


def _grant_for(request: AuthRequest) -> Grant:
    if request.headers.get("x-api-key") != "k1":
        raise UnauthorizedError("no api key")
    if request.cookies.get("session") == "banned":
        raise ForbiddenError("banned")
    assert request.client_address is not None
    assert request.client_address[0] == "127.0.0.1"
    return Grant(client_id="svc", read=("jobs.*",), publish=("jobs.*",))


async def _async_grant_for(request: AuthRequest) -> Grant:
    await trio.lowlevel.checkpoint()
    return _grant_for(request)


@pytest.mark.parametrize("hook", [_grant_for, _async_grant_for], ids=["sync", "async"])
async def test_custom_authorizer_hook(hook: Callable[[AuthRequest], Any]) -> None:
    seen: list[AuthRequest] = []

    def recording(request: AuthRequest) -> Grant | Awaitable[Grant]:
        seen.append(request)
        result: Grant | Awaitable[Grant] = hook(request)
        return result

    async with (
        auth_server(authorizer=recording, publish_token="p") as server,
        http_client(server) as client,
    ):
        with trio.fail_after(DEADLINE):
            key = {"X-API-Key": "k1"}
            assert_unauthorized(await client.get("/streams/jobs.a/poll"))
            assert_forbidden(
                await client.get(
                    "/streams/jobs.a/poll", headers={**key, "Cookie": "session=banned"}
                )
            )
            assert_forbidden(await client.get("/streams/other/poll", headers=key))
            polled = await client.get("/streams/jobs.a/poll", headers=key)
            assert polled.status_code == 200, polled.text
            assert polled.headers["x-client-id"] == "svc"
            published = await client.post("/streams/jobs.a", json={"data": "x"}, headers=key)
            assert published.status_code == 202, published.text
            async with trio.open_nursery() as nursery:
                reader = await open_reader(nursery, client, "/streams/jobs.b", headers=key)
                assert reader.response.headers["x-client-id"] == "svc"
                nursery.cancel_scope.cancel()
            async with connect(ws_url(server, "/streams/jobs.c"), headers=[(b"x-api-key", b"k1")]):
                pass
    actions = {(request.action, request.topics) for request in seen}
    assert {
        ("poll", ("jobs.a",)),
        ("poll", ("other",)),
        ("publish", ("jobs.a",)),
        ("stream", ("jobs.b",)),
        ("stream", ("jobs.c",)),
    } <= actions


async def test_failing_authorizer_is_logged_and_401(caplog: pytest.LogCaptureFixture) -> None:
    def broken(request: AuthRequest) -> Grant:
        raise RuntimeError("session store is down")

    def wrong_type(request: AuthRequest) -> Grant:
        return "yes"  # type: ignore[return-value]

    for hook in (broken, wrong_type):
        caplog.clear()
        async with auth_server(authorizer=hook) as server, http_client(server) as client:
            with trio.fail_after(DEADLINE), caplog.at_level(logging.ERROR, "trio_stream"):
                assert_unauthorized(await client.get("/streams/news"))
                assert_unauthorized(await client.get("/streams/news/poll"))
                refused = await ws_refusal(server, "/streams/news", {})
                assert refused.status_code == 401
                assert (await client.get("/healthz")).status_code == 200
            assert any("authorizer" in record.getMessage() for record in caplog.records)


async def test_expired_grant_from_a_hook_is_401() -> None:
    def expired(request: AuthRequest) -> Grant:
        return Grant(client_id="x", read=("*",), expires_at=time.time() - 1)

    async with auth_server(authorizer=expired) as server, http_client(server) as client:
        assert_unauthorized(await client.get("/streams/news/poll"))


def test_grant_and_cookie_helpers() -> None:
    grant = Grant(read=("a.*", "b"), publish=("*",))
    assert grant.may_read("a.x")
    assert grant.may_read("a.")
    assert grant.may_read("b")
    assert not grant.may_read("bb")
    assert not grant.may_read("a")
    assert grant.may_publish("anything")
    with pytest.raises(LocalProtocolError):
        Grant(client_id="no spaces")
    assert parse_cookies('a=1; b="two"; junk; =x; a=3') == {"a": "1", "b": "two"}
    assert parse_cookies(None) == {}


# -- the command line -------------------------------------------------------------------


def test_auth_secret_option_and_variable_set_a_jwt_authorizer() -> None:
    app = build_app({"auth_secret": SECRET})
    assert isinstance(app.config.authorizer, JWTAuthorizer)
    app = app_from_env({"TRIO_STREAM_AUTH_SECRET": SECRET})
    assert isinstance(app.config.authorizer, JWTAuthorizer)
    assert build_app({}).config.authorizer is None


def test_auth_secret_without_pyjwt_fails_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "jwt", None)  # `import jwt` raises ImportError
    with pytest.raises(SystemExit, match=r"trio-stream\[auth\]"):
        build_app({"auth_secret": SECRET})


# -- a browser ----------------------------------------------------------------------------


@contextmanager
def chromium() -> Iterator[Browser]:
    """Headless system Chromium (skipped, or under CI failed, when unavailable)."""
    from .test_browser import CHROMIUM, CHROMIUM_ARGS, _unavailable

    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} is not installed")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True, timeout=30_000
        )
        try:
            yield browser
        finally:
            browser.close()


def test_browser_helper_streams_with_the_token_in_a_cookie(tmp_path: Path) -> None:
    token = make_token(sub="browser-user", topics=["inbox.*"])
    options = ["--auth-secret", SECRET, "--publish-token", PUBLISH_TOKEN]
    with cli_server("serve", options, tmp_path / "stderr.txt") as server, chromium() as browser:
        context = browser.new_context()
        context.set_default_timeout(15_000)
        context.add_cookies([{"name": COOKIE, "value": token, "url": server.url, "httpOnly": True}])
        page = context.new_page()
        page.goto(f"{server.url}/healthz")
        page.add_script_tag(url="/static/trio-stream.js")
        page.evaluate(
            """() => {
              window.seen = [];
              window.t = TrioStream.open({topic: "inbox.browser-user"}, {
                clientId: "browser-user", ack: 4,
                onEvent: (ev) => { window.seen.push(ev.id); },
              });
            }"""
        )
        page.wait_for_function("() => window.t.state === 'open'")
        batch = [{"data": f"message {i}"} for i in range(12)]
        response = httpx.post(
            f"{server.url}/streams/inbox.browser-user",
            json=batch,
            headers=bearer(PUBLISH_TOKEN),
            timeout=5,
        )
        assert response.status_code == 202, response.text
        ids = response.json()["ids"]
        # With a window of 4, all 12 arrive only if the cookie-authorized acks are taken.
        page.wait_for_function("() => window.seen.length >= 12")
        assert page.evaluate("() => window.seen") == ids
        stats = page.evaluate("() => window.t.stats")
        assert stats["errors"] == 0
        assert stats["ackErrors"] == 0
        # Without the cookie the same request is refused.
        status = page.evaluate(
            """async () => (await fetch("/streams/inbox.browser-user/poll",
                                         {credentials: "omit"})).status"""
        )
        assert status == 401
        page.evaluate("() => window.t.close()")
        context.close()


def test_demo_page_streams_as_the_subject_of_its_cookie(tmp_path: Path) -> None:
    token = make_token(sub="demo-viewer", topics=["demo"])
    options = ["--auth-secret", SECRET, "--rate", "1000", "--burst", "1000"]
    with cli_server("demo", options, tmp_path / "stderr.txt") as server, chromium() as browser:
        context = browser.new_context()
        context.set_default_timeout(15_000)
        context.add_cookies([{"name": COOKIE, "value": token, "url": server.url, "httpOnly": True}])
        page = context.new_page()
        page.goto(f"{server.url}/")
        page.wait_for_function(
            "() => window.demoState && window.demoState.ready && window.demoState.received >= 3",
            timeout=15_000,
        )
        state = page.evaluate(
            "() => ({id: window.demoState.clientId, errors: window.demoState.errors})"
        )
        assert state == {"id": "demo-viewer", "errors": 0}
        assert page.get_by_test_id("client-id").inner_text() == "demo-viewer"
        context.close()
