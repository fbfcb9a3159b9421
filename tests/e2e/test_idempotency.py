"""``Idempotency-Key`` on ``POST /streams/{topic}``, end to end on a real hypercorn.

(The Redis backend's side, with two processes, is in ``test_redis.py``.)
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest
import trio

import trio_stream

from ._support import (
    http_client,
    metrics,
    open_reader,
    publish,
    raw_exchange,
    request_bytes,
    sample,
)
from .conftest import open_server

if TYPE_CHECKING:
    import httpx

    from .conftest import Server

pytestmark = pytest.mark.e2e

KEY = "Idempotency-Key"


async def post(
    client: httpx.AsyncClient, topic: str, body: object, key: str | bytes
) -> httpx.Response:
    raw = key if isinstance(key, bytes) else key.encode()
    return await client.post(f"/streams/{topic}", json=body, headers={KEY.encode(): raw})


@pytest.mark.parametrize(
    "value",
    [b"", b"x" * 129, b"a b", b"a\tb", "é".encode(), b"\xff\xfe"],
    ids=["empty", "129-chars", "space", "tab", "utf-8", "latin-1"],
)
async def test_publish_bad_idempotency_key_is_400_naming_the_header(
    server: Server, value: bytes
) -> None:
    with trio.fail_after(10):
        async with http_client(server) as client:
            response = await post(client, "t", {"data": "a"}, value)
            poll = await client.get("/streams/t/poll")
    assert response.status_code == 400
    assert KEY in response.json()["error"]
    assert poll.json()["events"] == []


@pytest.mark.parametrize("value", [b"a\x01b", b"a\x7fb", b"a\x00b"])
async def test_publish_idempotency_key_with_control_characters_is_400(
    server: Server, value: bytes
) -> None:
    body = b'{"data": "a"}'
    request = (
        b"POST /streams/t HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nIdempotency-Key: %s\r\n\r\n%s" % (len(body), value, body)
    )
    with trio.fail_after(10):
        status, _ = await raw_exchange(server.url, request)
        async with http_client(server) as client:
            poll = await client.get("/streams/t/poll")
    assert status == 400
    assert poll.json()["events"] == []


async def test_publish_idempotency_key_repeated(server: Server) -> None:
    """The header twice with different values is a 400; twice the same value is fine."""
    body = json.dumps({"data": "a"}).encode()
    with trio.fail_after(10):
        _, different = request_bytes(
            server.url, "POST", "/streams/t", {KEY: "one", "idempotency-key": "two"}, body
        )
        status, head = await raw_exchange(server.url, different)
        async with http_client(server) as client:
            response = await client.post(
                "/streams/t",
                content=body,
                headers=[(KEY, "same"), (KEY, "same")],
            )
            again = await post(client, "t", {"data": "a"}, "same")
    assert status == 400
    assert b"application/json" in head
    assert response.status_code == 202
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == response.json()


async def test_publish_retry_with_the_key_replays_the_ids_and_delivers_once(
    server: Server,
) -> None:
    batch = [{"data": "a"}, {"event": "tick", "data": "b\nc"}]
    with trio.fail_after(10):
        async with http_client(server) as client, trio.open_nursery() as nursery:
            reader = await open_reader(nursery, client, "/streams/once")
            first = await post(client, "once", batch, "order-42")
            # The same events spelled otherwise: still a retry of the same publish.
            retry = await client.post(
                "/streams/once",
                content=json.dumps(batch, indent=2).encode(),
                headers={KEY: "order-42"},
            )
            marker = await publish(client, "once", {"data": "after"})
            events = await reader.wait_events(3)
            samples = await metrics(client)
            nursery.cancel_scope.cancel()
    assert first.status_code == 202
    assert "idempotent-replayed" not in first.headers
    assert retry.status_code == 202
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.json() == first.json()
    ids = first.json()["ids"]
    assert [e.id for e in events] == [*ids, *marker]  # the retry delivered nothing
    assert [e.data for e in events] == ["a", "b\nc", "after"]
    assert sample(samples, "trio_stream_publish_replayed_total") == 1
    assert sample(samples, "trio_stream_events_published_total") == 3


async def test_publish_same_key_other_body_is_422(server: Server) -> None:
    with trio.fail_after(10):
        async with http_client(server) as client:
            first = await post(client, "t", {"data": "a"}, "k")
            other = await post(client, "t", {"data": "b"}, "k")
            named = await post(client, "t", {"data": "a", "event": "x"}, "k")
            elsewhere = await post(client, "u", {"data": "b"}, "k")  # keys are per topic
            poll = await client.get("/streams/t/poll")
    assert first.status_code == 202
    assert other.status_code == 422
    assert named.status_code == 422
    error = other.json()["error"]
    assert KEY in error
    assert "different body" in error
    assert elsewhere.status_code == 202
    assert [e["data"] for e in poll.json()["events"]] == ["a"]


async def test_publish_refused_remembers_nothing() -> None:
    async with open_server(hub={"log_capacity": 1, "log_ttl": 0.5}) as server:
        with trio.fail_after(10):
            async with http_client(server) as client:
                await publish(client, "t", {"data": "filler"})
                full = await post(client, "t", {"data": "a"}, "k")
                bad = await post(client, "t", {"data": 1}, "k")
                await trio.sleep(0.6)
                accepted = await post(client, "t", {"data": "a"}, "k")
    assert full.status_code == 429
    assert bad.status_code == 400
    assert accepted.status_code == 202
    assert "idempotent-replayed" not in accepted.headers


async def test_publish_key_is_forgotten_after_the_log_ttl() -> None:
    async with open_server(hub={"log_ttl": 0.5}) as server:
        with trio.fail_after(10):
            async with http_client(server) as client:
                first = await post(client, "t", {"data": "a"}, "k")
                await trio.sleep(0.6)
                later = await post(client, "t", {"data": "a"}, "k")
    assert later.status_code == 202
    assert "idempotent-replayed" not in later.headers
    assert later.json() != first.json()


async def test_client_publish_sends_the_key(server: Server) -> None:
    url = f"{server.url}/streams/t"
    with trio.fail_after(10):
        first = await trio_stream.publish(url, ["a"], idempotency_key="client-1")
        retry = await trio_stream.publish(url, ["a"], idempotency_key="client-1")
        with pytest.raises(trio_stream.HTTPStatusError) as other:
            await trio_stream.publish(url, ["b"], idempotency_key="client-1")
        with pytest.raises(trio_stream.LocalProtocolError):
            await trio_stream.publish(url, ["b"], idempotency_key="not ok")
    assert not first.replayed
    assert retry.replayed
    assert retry == first
    assert other.value.status_code == 422
    assert server.app.hub.log("t").head == 1
