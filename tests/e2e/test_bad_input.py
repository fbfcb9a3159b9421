"""Bad input end to end: every malformed request gets a 4xx (with a JSON error where the
application answers), and none makes the server answer 5xx, log an unexpected error,
stop another client's stream, or publish part of what it refused.

Each test runs against a `guarded` server: a canary stream opened first must still get
an event published after the test is done with the server.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING
from urllib.parse import quote

import attrs
import h11
import pytest
import trio

from ._support import (
    http_client,
    metrics,
    open_raw,
    open_reader,
    publish,
    raw_exchange,
    request_bytes,
    sample,
)
from .conftest import open_server

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    import httpx

    from .conftest import Server

pytestmark = pytest.mark.e2e

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@attrs.frozen
class Guarded:
    server: Server
    client: httpx.AsyncClient


@pytest.fixture
async def guarded(caplog: pytest.LogCaptureFixture) -> AsyncIterator[Guarded]:
    """A server (publish token set, no rate limit) with a canary stream open throughout.

    On the way out: the canary still receives, and nothing was logged at ERROR.
    """
    caplog.set_level(logging.WARNING)
    with trio.fail_after(60):
        async with (
            open_server(hub={"rate": 0}, publish_token=TOKEN) as server,
            http_client(server, headers=AUTH) as client,
            trio.open_nursery() as nursery,
        ):
            canary = await open_reader(
                nursery, client, "/streams/canary", headers={"X-Client-ID": "canary"}
            )
            yield Guarded(server, client)
            ids = await publish(client, "canary", {"data": "still here"})
            await canary.wait_events(1)
            assert [event.id for event in canary.events] == ids
            nursery.cancel_scope.cancel()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


def assert_json_error(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, (response.request.url, response.text)
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert isinstance(body, dict)
    assert isinstance(body.get("error"), str)
    assert body["error"]


def short(value: object) -> str:
    return repr(value)[:24]


# -- names ------------------------------------------------------------------------------

BAD_TOPICS = [
    "a" * 129,
    "bad%20topic",
    "caf%C3%A9",
    "%00",
    "tab%09",
    "a%2Fb",
    "a%2Fack",
    "%ff%fe",
    "%3Cscript%3E",
    "a*b",
    "a%25",
    "..%2F..%2Fetc",
]


@pytest.mark.parametrize("topic", BAD_TOPICS)
async def test_bad_topic_is_400(guarded: Guarded, topic: str) -> None:
    client = guarded.client
    assert_json_error(await client.get(f"/streams/{topic}"), 400)
    assert_json_error(await client.post(f"/streams/{topic}", json={"data": "x"}), 400)
    assert_json_error(await client.get(f"/streams/{topic}/poll"), 400)
    ack = {"client_id": "c", "last_event_id": "x"}
    assert_json_error(await client.post(f"/streams/{topic}/ack", json=ack), 400)


async def test_longest_topic_is_fine(guarded: Guarded) -> None:
    topic = "A-z.0:_" * 18 + "xx"
    assert len(topic) == 128
    await publish(guarded.client, topic, {"data": "x"})


BAD_CLIENT_IDS: list[str | bytes] = [
    "",
    "a" * 129,
    "bad id",
    "a/b",
    "<x>",
    "é".encode(),
    b"\xff\xfe",
    "a\x01b",
]


@pytest.mark.parametrize("client_id", BAD_CLIENT_IDS, ids=short)
async def test_bad_client_id_header_is_400(guarded: Guarded, client_id: str | bytes) -> None:
    for target in ("/streams/t", "/streams/t/poll"):
        async with await open_raw(
            guarded.server.url, target, headers={"X-Client-ID": client_id}
        ) as response:
            assert response.status == 400
            body = json.loads(await response.read_to_end())
            assert body["error"]


@pytest.mark.parametrize(
    "client_id", ["", "a" * 129, "bad id", "a/b", "é", "%ff", "a\x00", "a\nb"], ids=short
)
async def test_bad_client_id_query_or_body_is_400(guarded: Guarded, client_id: str) -> None:
    client = guarded.client
    query = f"client_id={quote(client_id, safe='%')}"
    assert_json_error(await client.get(f"/streams/t?{query}"), 400)
    assert_json_error(await client.get(f"/streams/t/poll?{query}"), 400)
    ack = {"client_id": client_id, "last_event_id": "x"}
    assert_json_error(await client.post("/streams/t/ack", json=ack), 400)


# -- publish bodies ---------------------------------------------------------------------

BAD_BODIES: list[bytes] = [
    b"",
    b"{",
    b"null",
    b"42",
    b'"just a string"',
    b"[1]",
    b"{}",
    b'{"data": 1}',
    b'{"data": null}',
    b'{"data": ["a"]}',
    b'{"data": {"a": 1}}',
    b'{"data": true}',
    b'{"event": 5, "data": "x"}',
    b'{"event": "", "data": "x"}',
    b'{"event": "a\\nb", "data": "x"}',
    b'{"event": "a\\u0000b", "data": "x"}',
    b'{"event": "' + b"e" * 129 + b'", "data": "x"}',
    b'{"data": "x", "id": "mine"}',
    b'{"data": "x", "retry": 5}',
    b'{"data": "\\ud800"}',
    b'{"data": "a\\udfffb"}',
    b'{"data": "x", "event": "\\ud83d"}',
    b'{"data": "\xff"}',
    b'{"data": "\xed\xa0\x80"}',
    b'{"data": "x"} trailing',
    b'{"data": 1e999999}',
    b'{"data": ' + b"9" * 5000 + b"}",
    b"[" * 100_000 + b"]" * 100_000,
    b'{"data": "x", "data": 5}',
    b"\xef\xbb\xbf",
    b'[{"data": "fine"}, {"data": "also fine"}, {"data": 3}]',
    b'[{"data": "fine"}, {"data": "\\ud800"}]',
    b'[{"data": "fine"}, {"event": "", "data": "x"}]',
    b'[{"data": "fine"}, {"data": "x", "extra": true}]',
    b'[{"data": "fine"}, null]',
]


async def test_bad_publish_bodies_are_400_and_publish_nothing(guarded: Guarded) -> None:
    client = guarded.client
    headers = {**AUTH, "Content-Type": "application/json"}
    for body in BAD_BODIES:
        response = await client.post("/streams/pub", content=body, headers=headers)
        assert_json_error(response, 400)
    # Nothing of any of these, not even a batch's good items, was published.
    response = await client.get("/streams/pub/poll")
    assert response.status_code == 200
    assert response.json()["events"] == []
    samples = await metrics(client)
    assert sample(samples, "trio_stream_events_published_total") == 0


async def test_oversize_bodies_are_413(guarded: Guarded) -> None:
    """Sent on raw sockets: the answer comes before the body is all sent, and the
    server then closes the connection, which httpx reports as a failed write."""
    client, url = guarded.client, guarded.server.url
    mib = 1024 * 1024
    envelope = len(json.dumps({"data": ""}))
    at_limit = json.dumps({"data": "x" * (mib - envelope)}).encode()
    assert len(at_limit) == mib
    response = await client.post("/streams/big", content=at_limit)
    assert response.status_code == 202

    async def answer(target: str, body: bytes) -> int:
        _, request = request_bytes(url, "POST", target, AUTH, body)
        status, head = await raw_exchange(url, request)
        assert b"application/json" in head.lower()
        return status

    over = json.dumps({"data": "x" * (mib - envelope + 1)}).encode()
    assert await answer("/streams/big", over) == 413
    ack = json.dumps({"client_id": "c", "last_event_id": "x", "pad": "p" * 65536}).encode()
    assert await answer("/streams/big/ack", ack) == 413
    assert await answer("/streams/big/ack", b" " * (64 * 1024 + 1)) == 413

    # No Content-Length: a chunked body, found too big while it is read.
    connection = h11.Connection(h11.CLIENT)
    headers = [("Host", "x"), ("Transfer-Encoding", "chunked"), *AUTH.items()]
    request = connection.send(h11.Request(method="POST", target="/streams/big", headers=headers))
    assert request is not None
    for _ in range(17):
        request += connection.send(h11.Data(data=b" " * 65536)) or b""
    request += connection.send(h11.Data(data=b'{"data": "x"}')) or b""
    request += connection.send(h11.EndOfMessage()) or b""
    status, head = await raw_exchange(url, request)
    assert status == 413
    assert b"application/json" in head.lower()

    # Only the one at the limit was published.
    events = (await client.get("/streams/big/poll")).json()["events"]
    assert len(events) == 1


# -- acks -------------------------------------------------------------------------------


async def test_ack_errors(guarded: Guarded) -> None:
    client, url = guarded.client, guarded.server.url
    async with await open_raw(url, "/streams/acks?ack=2", headers={"X-Client-ID": "ak"}) as s:
        assert s.status == 200
        ids = await publish(client, "acks", [{"data": str(i)} for i in range(4)])
        await s.read_events(2)

        async def ack(body: object) -> httpx.Response:
            return await client.post("/streams/acks/ack", json=body)

        assert (await ack({"client_id": "ak", "last_event_id": ids[0]})).status_code == 204
        assert_json_error(await ack({"client_id": "ak", "last_event_id": ids[3]}), 409)
        epoch, _, seq = ids[0].rpartition("-")
        never = f"{epoch}-{int(seq, 16) + 99:0{len(seq)}x}"
        assert_json_error(await ack({"client_id": "ak", "last_event_id": never}), 409)
        assert_json_error(await ack({"client_id": "nobody", "last_event_id": ids[0]}), 404)
        bodies: list[object] = [
            None,
            [],
            "ak",
            {},
            {"client_id": "ak"},
            {"last_event_id": ids[0]},
            {"client_id": 5, "last_event_id": ids[0]},
            {"client_id": "ak", "last_event_id": 5},
            {"client_id": "ak", "last_event_id": None},
            {"client_id": "ak", "last_event_id": "garbage"},
            {"client_id": "ak", "last_event_id": "x" * 10_000},
            {"client_id": "ak", "last_event_id": ids[0], "buffer_utilization": -0.1},
            {"client_id": "ak", "last_event_id": ids[0], "buffer_utilization": 1.01},
            {"client_id": "ak", "last_event_id": ids[0], "buffer_utilization": "half"},
            {"client_id": "ak", "last_event_id": ids[0], "buffer_utilization": True},
            {"client_id": "ak", "last_event_id": ids[0], "buffer_utilization": [0.5]},
        ]
        for body in bodies:
            assert_json_error(await ack(body), 400)
        for raw in (b"{", b"\xff", b"[" * 50_000):
            assert_json_error(await client.post("/streams/acks/ack", content=raw), 400)
        # None of it moved the window: still two events, then an ack of ids[1] frees two.
        assert [b.id for b in s.blocks() if b.is_event] == ids[:2]
        assert (await ack({"client_id": "ak", "last_event_id": ids[1]})).status_code == 204
        assert [b.id for b in await s.read_events(4)] == ids


# -- numbers in the query ---------------------------------------------------------------

BAD_NUMBERS = ["0", "-1", "1.5", "abc", "1e3", "+5", " 5", "0x10", "²", "٣"]


@pytest.mark.parametrize(
    "value", [*BAD_NUMBERS, "10001", "99999999999999999999", "9" * 5000], ids=short
)
async def test_bad_ack_window_is_400(guarded: Guarded, value: str) -> None:
    response = await guarded.client.get(f"/streams/t?ack={quote(value)}")
    assert_json_error(response, 400)


@pytest.mark.parametrize("value", [*BAD_NUMBERS, ""], ids=short)
async def test_bad_poll_limit_is_400(guarded: Guarded, value: str) -> None:
    response = await guarded.client.get(f"/streams/t/poll?limit={quote(value)}")
    assert_json_error(response, 400)


async def test_huge_poll_limit_is_clamped_to_1000(guarded: Guarded) -> None:
    client = guarded.client
    for _ in range(2):
        await publish(client, "many", [{"data": "x"}] * 600)
    for limit in ("1001", "5000", "9" * 5000):
        response = await client.get(f"/streams/many/poll?limit={limit}&client_id=p{len(limit)}")
        assert response.status_code == 200
        assert len(response.json()["events"]) == 1000
    response = await client.get("/streams/many/poll?limit=7")
    assert len(response.json()["events"]) == 7


# -- the query's encoding -----------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/streams/t?client_id=%ff",
        "/streams/t?last_event_id=%c3%28",
        "/streams/t?%ff=1",
        "/streams/t/poll?after=%ed%a0%80",
        "/streams/t/poll?client_id=ok&limit=%ff",
        "/healthz?x=%fe",
    ],
)
async def test_percent_encoded_invalid_utf8_in_the_query_is_400(
    guarded: Guarded, target: str
) -> None:
    assert_json_error(await guarded.client.get(target), 400)


async def test_percent_encoded_invalid_utf8_in_a_post_query_is_400(guarded: Guarded) -> None:
    client = guarded.client
    assert_json_error(await client.post("/streams/t?x=%ff", json={"data": "x"}), 400)
    ack = {"client_id": "c", "last_event_id": "x"}
    assert_json_error(await client.post("/streams/t/ack?x=%ff", json=ack), 400)


@pytest.mark.parametrize(
    "target", [b"/streams/t?client_id=\xff", b"/streams/t?last_event_id=\xc3(", b"/streams/\xff"]
)
async def test_raw_invalid_utf8_in_the_request_line_is_400(guarded: Guarded, target: bytes) -> None:
    url = guarded.server.url
    host = url.removeprefix("http://")
    request = b"GET " + target + b" HTTP/1.1\r\nHost: " + host.encode() + b"\r\n\r\n"
    status, _ = await raw_exchange(url, request)
    assert status == 400


# -- resume ids of any shape ------------------------------------------------------------

ODD_IDS: list[str | bytes] = [
    "garbage",
    "x" * 10_000,
    "-",
    "0-0",
    "abc-00000000000g",
    "\x01\x02\x7f\x1b[31m",
    "a\tb",
    b"\xff\xfe\x80",
    "ünï-cödé".encode(),
]


@pytest.mark.parametrize("last_event_id", ODD_IDS, ids=short)
async def test_any_last_event_id_header_is_a_reset_not_an_error(
    guarded: Guarded, last_event_id: str | bytes
) -> None:
    client, url = guarded.client, guarded.server.url
    ids = await publish(client, "odd", [{"data": "a"}, {"data": "b"}])
    async with await open_raw(
        url, "/streams/odd", headers={"Last-Event-ID": last_event_id}
    ) as response:
        assert response.status == 200
        events = await response.read_events(3)
    reset = events[0]
    assert reset.event == "reset"
    assert reset.id is None
    body = reset.json()
    assert body["reason"] == "unknown"
    if isinstance(last_event_id, str):
        assert body["last_event_id"] == last_event_id
    assert [event.id for event in events[1:]] == ids


@pytest.mark.parametrize(
    "last_event_id",
    ["x" * 10_000, "\x00\x01\n\r\x1b", "line\nbreak\r\nid: 1\n\ndata: forged", "\u2028é😀"],
    ids=short,
)
async def test_any_last_event_id_query_is_a_reset_not_an_error(
    guarded: Guarded, last_event_id: str
) -> None:
    client = guarded.client
    ids = await publish(client, "oddq", [{"data": "a"}])
    target = f"/streams/oddq?last_event_id={quote(last_event_id)}"
    async with await open_raw(guarded.server.url, target) as response:
        assert response.status == 200
        events = await response.read_events(2)
    assert events[0].event == "reset"
    assert events[0].json() == {"reason": "unknown", "last_event_id": last_event_id}
    assert [event.id for event in events[1:]] == ids
    # The id is data, never framing: a forged `id:` or event did not get through.
    assert all(event.event in ("reset", None) for event in events)


async def test_odd_after_in_a_poll_is_a_reset_not_an_error(guarded: Guarded) -> None:
    client = guarded.client
    ids = await publish(client, "oddp", [{"data": "a"}])
    for after in ("garbage", "x" * 10_000, "\x00\n"):
        response = await client.get("/streams/oddp/poll", params={"after": after})
        assert response.status_code == 200
        body = response.json()
        assert body["reset"] is True
        assert [event["id"] for event in body["events"]] == ids


ODD_COMPOSITES = [
    "00000000~",
    "00000000~~",
    "0" * 8 + "~x" * 5_000,
    "ffffffff~a-000000000001~b-000000000001",
    "~" * 100,
    "zz~zz~zz",
    "\x00~\n~\r",
    "é😀~\u2028",
]


@pytest.mark.parametrize("last_event_id", ODD_COMPOSITES, ids=short)
async def test_odd_ids_on_a_stream_of_several_topics_reset_each_topic(
    guarded: Guarded, last_event_id: str
) -> None:
    client = guarded.client
    await publish(client, "several-a", [{"data": "a"}])
    await publish(client, "several-b", [{"data": "b"}])
    target = f"/streams?topic=several-a&topic=several-b&last_event_id={quote(last_event_id)}"
    async with await open_raw(guarded.server.url, target) as response:
        assert response.status == 200
        events = await response.read_events(4)
    resets = [event.json() for event in events[:2]]
    assert resets == [
        {"reason": "unknown", "last_event_id": last_event_id, "topic": "several-a"},
        {"reason": "unknown", "last_event_id": last_event_id, "topic": "several-b"},
    ]
    assert [(event.event, event.data) for event in events[2:]] == [
        ("several-a", "a"),
        ("several-b", "b"),
    ]
    polled = await client.get(
        "/streams/_poll",
        params={"topic": ["several-a", "several-b"], "after": last_event_id},
    )
    assert polled.status_code == 200
    assert polled.json()["reset"] is True


async def test_odd_acks_of_streams_of_several_topics_are_4xx(guarded: Guarded) -> None:
    client = guarded.client
    for last_event_id in ODD_COMPOSITES:
        body = {"client_id": "canary", "last_event_id": last_event_id}
        response = await client.post("/streams/_ack", json=body)
        assert 400 <= response.status_code < 500, (last_event_id[:40], response.text)
        assert_json_error(response, response.status_code)
    odd: list[object] = [
        {"client_id": "canary", "last_event_id": 7},
        [],
        "x",
        {"last_event_id": "a"},
    ]
    for value in odd:
        response = await client.post("/streams/_ack", json=value)
        assert_json_error(response, 400)


# -- the publish token ------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        f"Bearer{TOKEN}",
        "Bearer wrong",
        f"Basic {TOKEN}",
        f"Bearer {TOKEN}x",
        TOKEN,
    ],
    ids=repr,
)
async def test_missing_or_wrong_publish_token_is_401(
    guarded: Guarded, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    async with http_client(guarded.server) as client:  # no token by default
        response = await client.post("/streams/auth", json={"data": "x"}, headers=headers)
        assert_json_error(response, 401)
        assert response.headers["www-authenticate"].lower().startswith("bearer")
        assert (await client.get("/streams/auth/poll")).json()["events"] == []


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "BeArEr"])
async def test_publish_token_scheme_is_case_insensitive(guarded: Guarded, scheme: str) -> None:
    async with http_client(guarded.server) as client:
        response = await client.post(
            "/streams/auth", json={"data": "x"}, headers={"Authorization": f"{scheme} {TOKEN}"}
        )
        assert response.status_code == 202


async def test_reading_needs_no_publish_token(guarded: Guarded) -> None:
    async with http_client(guarded.server) as client:
        assert (await client.get("/streams/auth/poll")).status_code == 200
        async with await open_raw(guarded.server.url, "/streams/auth") as response:
            assert response.status == 200


# -- after all of it --------------------------------------------------------------------


async def test_a_barrage_of_bad_requests_leaves_streams_alone(guarded: Guarded) -> None:
    """Many bad requests at once, while a stream reads: it gets every event, in order."""
    client, url = guarded.client, guarded.server.url
    async with trio.open_nursery() as nursery:
        reader = await open_reader(nursery, client, "/streams/steady")

        async def barrage() -> None:
            for body in BAD_BODIES[:20]:
                response = await client.post("/streams/steady", content=body)
                assert response.status_code == 400
            for topic in BAD_TOPICS:
                assert (await client.get(f"/streams/{topic}")).status_code == 400
            _, request = request_bytes(url, "GET", "/streams/steady?ack=%ff")
            status, _ = await raw_exchange(url, request)
            assert status == 400

        ids: list[str] = []
        async with trio.open_nursery() as bad:
            for _ in range(4):
                bad.start_soon(barrage)
            for i in range(20):
                ids += await publish(client, "steady", {"data": str(i)})
        await reader.wait_events(20)
        assert [event.id for event in reader.events] == ids
        nursery.cancel_scope.cancel()
