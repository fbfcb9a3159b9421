"""Several topics on one stream, on the wire (``CONTRACT.md``): hypercorn on 127.0.0.1.

``GET /streams?topic=a&topic=b``, its composite ids, ``/streams/_poll``,
``POST /streams/_ack`` and the same over WebSocket, driven with plain HTTP clients the
way third-party clients use them. (Our own clients on several topics: test_several_clients.)
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, quote, urlsplit

import pytest
import trio
from trio_websocket import ConnectionRejected

from trio_stream._auth import JWTAuthorizer

from ._support import http_client, open_reader, publish
from .conftest import open_server
from .test_auth import SECRET, bearer, make_token
from .test_websocket import connect, ws_url

if TYPE_CHECKING:
    import httpx

    from ._support import Block

pytestmark = pytest.mark.e2e

DEADLINE = 20.0


def seen(blocks: list[Block]) -> list[tuple[str | None, str | None]]:
    return [(block.event, block.data) for block in blocks if block.is_event]


async def test_events_of_several_topics_are_named_by_topic_and_resume_exactly() -> None:
    with trio.fail_after(DEADLINE):
        async with (
            open_server() as server,
            http_client(server) as client,
            trio.open_nursery() as nursery,
        ):
            path = "/streams?topic=prices&topic=news&topic=alerts"
            reader = await open_reader(nursery, client, path, headers={"X-Client-ID": "c1"})
            assert reader.response.headers["content-type"] == "text/event-stream; charset=utf-8"
            assert reader.response.headers["cache-control"] == "no-cache"
            assert reader.response.headers["x-accel-buffering"] == "no"
            assert reader.response.headers["x-client-id"] == "c1"
            assert reader.blocks[0].retry == "3000"
            await publish(client, "news", {"data": "n1"})
            await publish(client, "prices", [{"event": "tick", "data": "p1"}, {"data": "p2"}])
            await publish(client, "other", {"data": "not on this stream"})
            await publish(client, "alerts", {"data": "a1\na2"})
            await publish(client, "news", {"event": "breaking", "data": "n2"})
            events = await reader.wait_events(5)
            assert seen(events) == [
                ("news", "n1"),
                ("prices/tick", "p1"),
                ("prices", "p2"),
                ("alerts", "a1\na2"),
                ("news/breaking", "n2"),
            ]
            ids = [block.id for block in events]
            assert all(ids)
            assert len(set(ids)) == 5

            # The same topics in another order, resuming with the header or the parameter.
            for cut in (0, 2):
                again = await open_reader(
                    nursery,
                    client,
                    "/streams?topic=alerts&topic=news&topic=prices",
                    headers={"Last-Event-ID": str(ids[cut]), "X-Client-ID": f"r{cut}"},
                )
                assert seen(await again.wait_events(4 - cut)) == seen(events)[cut + 1 :]
            by_param = await open_reader(
                nursery,
                client,
                f"/streams?topic=news&topic=prices&topic=alerts&last_event_id={quote(str(ids[3]))}",
            )
            assert seen(await by_param.wait_events(1)) == [("news/breaking", "n2")]
            await trio.sleep(0.2)
            assert len(by_param.events) == 1
            nursery.cancel_scope.cancel()


async def test_a_resume_id_of_other_topics_resets_each_topic() -> None:
    with trio.fail_after(DEADLINE):
        async with (
            open_server() as server,
            http_client(server) as client,
            trio.open_nursery() as nursery,
        ):
            await publish(client, "a", {"data": "a1"})
            [single] = await publish(client, "b", {"data": "b1"})
            reader = await open_reader(
                nursery, client, "/streams?topic=a&topic=b", headers={"Last-Event-ID": single}
            )
            blocks = list(await reader.wait_events(4))
            resets = [b for b in blocks if b.event == "reset"]
            assert [b.json() for b in resets] == [
                {"reason": "unknown", "last_event_id": single, "topic": "a"},
                {"reason": "unknown", "last_event_id": single, "topic": "b"},
            ]
            assert all(b.id is None for b in resets)
            assert seen([b for b in blocks if b.event != "reset"]) == [("a", "a1"), ("b", "b1")]
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [
        ("GET", "/streams", 400),
        ("GET", "/streams?" + "&".join(f"topic=t{i}" for i in range(17)), 400),
        ("GET", "/streams?topic=a&topic=a", 400),
        ("GET", "/streams?topic=a&topic=b%2Fc", 400),
        ("GET", "/streams?topic=a&ack=0", 400),
        ("GET", "/streams?topic=a&client_id=no%20spaces", 400),
        ("POST", "/streams", 405),
        ("GET", "/streams/_poll", 400),
        ("GET", "/streams/_poll?topic=a&limit=0", 400),
        ("POST", "/streams/_poll?topic=a", 405),
        ("GET", "/streams/_ack", 405),
        ("GET", "/streams/_other", 404),
        ("POST", "/streams/_other", 404),
        ("GET", "/streams/_other/poll", 404),
    ],
)
async def test_bad_requests_for_several_topics(method: str, target: str, status: int) -> None:
    async with open_server() as server, http_client(server) as client:
        response = await client.request(method, target)
        assert response.status_code == status, response.text
        assert "error" in response.json()
        if status == 405:
            assert "OPTIONS" in response.headers["allow"]


async def test_acks_of_several_topics() -> None:
    with trio.fail_after(DEADLINE):
        async with (
            open_server() as server,
            http_client(server) as client,
            trio.open_nursery() as nursery,
        ):
            reader = await open_reader(
                nursery, client, "/streams?topic=a&topic=b&ack=2", headers={"X-Client-ID": "k"}
            )
            for i in range(3):
                await publish(client, "a", {"data": f"a{i}"})
                await publish(client, "b", {"data": f"b{i}"})
            first = await reader.wait_events(2)
            await trio.sleep(0.3)
            assert seen(reader.events) == [("a", "a0"), ("b", "b0")]  # the window is full

            async def ack(body: dict[str, object]) -> httpx.Response:
                return await client.post("/streams/_ack", json=body)

            response = await ack({"client_id": "k", "last_event_id": first[0].id})
            assert response.status_code == 204
            await reader.wait_events(3)
            await trio.sleep(0.3)
            assert seen(reader.events)[2:] == [("a", "a1")]
            ack_body = {"client_id": "k", "last_event_id": reader.events[-1].id}
            response = await ack({**ack_body, "buffer_utilization": 0.5})
            assert response.status_code == 204
            await reader.wait_events(5)

            good = str(first[0].id)
            refused: dict[int, list[dict[str, object]]] = {
                400: [
                    {"client_id": "k", "last_event_id": "no-tilde"},
                    {"client_id": "k"},
                    {"client_id": "k", "last_event_id": good, "buffer_utilization": 2},
                ],
                404: [{"client_id": "nobody", "last_event_id": good}],
                409: [
                    {"client_id": "k", "last_event_id": "0badf00d~x-000000000001"},
                    {
                        "client_id": "k",
                        "last_event_id": good.replace("-000000000001~", "-00000000000f~"),
                    },
                ],
            }
            for status, bodies in refused.items():
                for body in bodies:
                    response = await ack(body)
                    assert response.status_code == status, (body, response.text)
                    assert "error" in response.json()
            response = await client.post(
                "/streams/_ack", content=b"{" * 70_000, headers={"content-type": "application/json"}
            )
            assert response.status_code == 413
            nursery.cancel_scope.cancel()


async def test_a_lagging_topic_pauses_the_stream_then_poll_several_and_stream_again() -> None:
    """In ack mode without acks, the lag grows on topic b: the stream pauses, names b,
    sends the client to ``/streams/_poll``, refuses it meanwhile, and takes it back."""
    with trio.fail_after(DEADLINE):
        async with (
            open_server(hub={"lag_limit": 5, "poll_interval": 0.2}) as server,
            http_client(server) as client,
            trio.open_nursery() as nursery,
        ):
            reader = await open_reader(
                nursery, client, "/streams?topic=b&topic=a&ack=2", headers={"X-Client-ID": "p"}
            )
            sent = [("a", "a0")]
            await publish(client, "a", {"data": "a0"})
            for i in range(10):
                await publish(client, "b", {"data": f"b{i}"})
                sent.append(("b", f"b{i}"))
            await reader.wait_for(lambda r: r.ended)
            pause = reader.blocks[-1]
            assert pause.event == "pause"
            info = pause.json()
            assert info["topic"] == "b"
            assert info["retry_after_ms"] == 200
            url = urlsplit(info["poll_url"])
            query = parse_qs(url.query)
            assert url.path == "/streams/_poll"
            assert query["topic"] == ["a", "b"]
            assert query["client_id"] == ["p"]
            streamed = [(str(b.event), str(b.data)) for b in reader.events if b.event != "pause"]
            assert query["after"] == [reader.events[len(streamed) - 1].id]

            refused = await client.get("/streams?topic=a&topic=b", headers={"X-Client-ID": "p"})
            assert refused.status_code == 429
            assert refused.headers["x-stream-pause"] == "true"
            assert refused.json() == {"error": "paused", "poll_url": info["poll_url"]}

            polled: list[tuple[str, str]] = []
            poll_url = info["poll_url"]
            while True:
                body = (await client.get(poll_url + "&limit=3")).json()
                assert body["reset"] is False
                polled += [(e["topic"], e["data"]) for e in body["events"]]
                assert all(e["event"] is None for e in body["events"])
                after = body["last_event_id"]
                if body["resume_stream"]:
                    break
                poll_url = f"/streams/_poll?topic=a&topic=b&client_id=p&after={quote(after)}"
            assert streamed + polled == sent[: len(streamed) + len(polled)]

            again = await open_reader(
                nursery,
                client,
                "/streams?topic=a&topic=b",
                headers={"X-Client-ID": "p", "Last-Event-ID": after},
            )
            await publish(client, "a", {"data": "a1"})
            sent.append(("a", "a1"))
            rest = len(sent) - len(streamed) - len(polled)
            await again.wait_events(rest)
            assert streamed + polled + seen(again.events) == sent
            nursery.cancel_scope.cancel()


async def test_several_topics_over_websocket() -> None:
    with trio.fail_after(DEADLINE):
        async with open_server() as server, http_client(server) as client:
            url = ws_url(server, "/streams?topic=b&topic=a&ack=1&client_id=w")
            async with connect(url) as ws:
                await publish(client, "a", {"data": "a0"})
                await publish(client, "b", {"event": "tick", "data": "b0"})
                first = json.loads(await ws.get_message())
                assert first["topic"] == "a"
                assert first["event"] is None
                assert first["data"] == "a0"
                assert "~" in first["id"]
                with trio.move_on_after(0.3):  # the window of 1 is full
                    raise AssertionError(await ws.get_message())
                await ws.send_message(json.dumps({"ack": first["id"], "topic": "a"}))
                second = json.loads(await ws.get_message())
                assert (second["topic"], second["event"], second["data"]) == ("b", "tick", "b0")
                await ws.send_message(json.dumps({"ack": second["id"]}))
            # A resume over WebSocket with the composite id: nothing before it again.
            await publish(client, "a", {"data": "a1"})
            async with connect(
                ws_url(server, "/streams?topic=a&topic=b&last_event_id=" + quote(second["id"]))
            ) as ws:
                third = json.loads(await ws.get_message())
                assert (third["topic"], third["data"]) == ("a", "a1")
            with pytest.raises(ConnectionRejected) as refused:  # as the event stream
                async with connect(ws_url(server, "/streams?topic=a&topic=a")):
                    pass
            assert refused.value.status_code == 400
            assert b"repeat" in (refused.value.body or b"")


async def test_a_grant_must_cover_every_topic_of_the_stream() -> None:
    with trio.fail_after(DEADLINE):
        async with (
            open_server(authorizer=JWTAuthorizer(SECRET)) as server,
            http_client(server) as client,
            trio.open_nursery() as nursery,
        ):
            narrow = bearer(make_token("u", ["a"]))
            response = await client.get("/streams?topic=a&topic=b", headers=narrow)
            assert response.status_code == 403
            assert "'b'" in response.json()["error"]
            response = await client.get("/streams/_poll?topic=a&topic=b", headers=narrow)
            assert response.status_code == 403
            assert (await client.get("/streams?topic=a&topic=b")).status_code == 401

            wide = bearer(make_token("u", ["a", "b*"]))
            reader = await open_reader(
                nursery, client, "/streams?topic=a&topic=b1&ack", headers=wide
            )
            assert reader.response.headers["x-client-id"] == "u"
            await publish(client, "b1", {"data": "x"})
            [event] = await reader.wait_events(1)
            body = {"client_id": "u", "last_event_id": event.id}
            assert (await client.post("/streams/_ack", json=body, headers=wide)).status_code == 204
            assert (await client.post("/streams/_ack", json=body)).status_code == 401
            assert (
                await client.post("/streams/_ack", json=body, headers=narrow)
            ).status_code == 403
            nursery.cancel_scope.cancel()
