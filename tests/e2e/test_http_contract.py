"""The HTTP contract (``CONTRACT.md``) end to end: hypercorn on 127.0.0.1, real sockets.

Every test runs on the real clock under a generous ``fail_after``; timing assertions
have tolerances for a loaded two-core machine. Raw sockets (h11 on trio) are used where
the bytes on the wire matter or where a client must misbehave (stop reading, abort).
"""

from __future__ import annotations

import re
import socket
import struct
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, quote, urlsplit

import pytest
import trio
from httpx_sse import aconnect_sse

from ._support import (
    Block,
    http_client,
    metrics,
    open_raw,
    open_reader,
    publish,
    publish_many,
    sample,
    wait_until,
)
from .conftest import open_server

if TYPE_CHECKING:
    from collections.abc import Mapping

    import httpx

    from ._support import RawResponse, Samples, StreamReader
    from .conftest import Server

pytestmark = pytest.mark.e2e

CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def ids_of(blocks: list[Block]) -> list[str | None]:
    return [block.id for block in blocks if block.is_event]


async def open_stream(
    url: str, target: str, *, headers: Mapping[str, str] | None = None
) -> RawResponse:
    """A raw stream (``/streams/{target}``) that has received its first bytes."""
    response = await open_raw(url, f"/streams/{target}", headers=headers)
    assert response.status == 200
    await response.read_until(lambda body: b"\n\n" in body)
    return response


# -- headers and first bytes -------------------------------------------------------------


async def test_stream_headers_and_first_bytes(server: Server) -> None:
    with trio.fail_after(10):
        async with await open_raw(
            server.url, "/streams/headers", headers={"X-Client-ID": "given-1"}
        ) as response:
            assert response.status == 200
            assert response.header("content-type") == "text/event-stream; charset=utf-8"
            assert response.header("cache-control") == "no-cache"
            assert response.header("x-accel-buffering") == "no"
            assert response.header("connection") == "keep-alive"
            assert response.header("transfer-encoding") == "chunked"
            assert response.header("x-client-id") == "given-1"
            # Sent at once, before any event exists: nothing is published here.
            await response.read_until(lambda body: len(body) >= len(b"retry: 3000\n\n"))
            assert bytes(response.body) == b"retry: 3000\n\n"

        async with await open_raw(server.url, "/streams/headers?client_id=from.query") as r:
            assert r.header("x-client-id") == "from.query"
        # The header wins over the query parameter.
        async with await open_raw(
            server.url, "/streams/headers?client_id=q", headers={"X-Client-ID": "h"}
        ) as r:
            assert r.header("x-client-id") == "h"

        assigned = []
        for _ in range(2):
            async with await open_raw(server.url, "/streams/headers") as r:
                client_id = r.header("x-client-id")
                assert client_id is not None
                assert CLIENT_ID.fullmatch(client_id)
                assigned.append(client_id)
        assert assigned[0] != assigned[1]


async def test_retry_field_follows_the_configuration() -> None:
    with trio.fail_after(10):
        async with (
            open_server(hub={"retry_ms": 1234}) as server,
            await open_stream(server.url, "r") as response,
        ):
            assert bytes(response.body) == b"retry: 1234\n\n"


# -- framing through a third-party SSE client ----------------------------------------------

ROUND_TRIP = [
    ({"data": "one\rtwo"}, None, "one\ntwo"),
    ({"data": "three\nfour"}, None, "three\nfour"),
    ({"data": "five\r\nsix"}, None, "five\nsix"),
    ({"data": "mixed\r\n\n\rend"}, None, "mixed\n\n\nend"),
    ({"data": "trailing\n"}, None, "trailing\n"),
    ({"data": " leading space"}, None, " leading space"),
    (
        {"data": "id: 7\ndata: x\n: no comment\nretry: 1"},
        None,
        "id: 7\ndata: x\n: no comment\nretry: 1",
    ),
    ({"data": "héllo wörld ✓ 😀 中文 — \u2018quotes\u2019 \u2028 \u0085 \ufeff"}, None, None),
    ({"event": "tick", "data": "named"}, "tick", "named"),
    ({"event": "ünï cödé ✓", "data": "x"}, "ünï cödé ✓", "x"),
]


async def test_multiline_unicode_and_named_events_round_trip_through_httpx_sse(
    server: Server,
) -> None:
    with trio.fail_after(10):
        async with (
            http_client(server) as client,
            aconnect_sse(client, "GET", "/streams/frames") as source,
        ):
            assert source.response.status_code == 200
            ids = await publish(client, "frames", [item for item, _, _ in ROUND_TRIP])
            got = []
            # Cancelled, not left with `break`: the cancellation unwinds (and so
            # finishes) every async generator httpx and httpx-sse stack up.
            with trio.CancelScope() as enough:
                async for sse in source.aiter_sse():
                    got.append(sse)
                    if len(got) == len(ROUND_TRIP) + 1:
                        enough.cancel()
        retry, events = got[0], got[1:]
        assert retry.retry == 3000
        assert retry.data == ""
        assert [sse.id for sse in events] == ids
        for sse, (item, name, data) in zip(events, ROUND_TRIP, strict=True):
            assert sse.event == (name or "message")
            assert sse.data == (item["data"] if data is None else data)


# -- resume ------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["header", "query"])
async def test_resume_after_an_id_is_exact(server: Server, how: str) -> None:
    topic = f"resume-{how}"
    with trio.fail_after(15):
        async with http_client(server) as client:
            ids = await publish_many(client, topic, [f"e{i}" for i in range(10)])
            if how == "header":
                # The header wins over the query parameter.
                target = f"/streams/{topic}?last_event_id={quote(ids[7])}"
                headers = {"Last-Event-ID": ids[3]}
            else:
                target = f"/streams/{topic}?last_event_id={quote(ids[3])}"
                headers = {}
            async with (
                await open_raw(server.url, target, headers=headers) as resumed,
                await open_stream(server.url, topic) as fresh,
            ):
                assert resumed.status == 200
                events = await resumed.read_events(6)
                assert ids_of(events) == ids[4:]
                assert [e.data for e in events] == [f"e{i}" for i in range(4, 10)]
                more = await publish_many(client, topic, ["x", "y", "z"])
                events = await resumed.read_events(9)
                assert ids_of(events) == ids[4:] + more
                # Without an id, a stream starts with what is published from now on.
                assert ids_of(await fresh.read_events(3)) == more
                await trio.sleep(0.2)  # nothing more, nothing twice
                assert ids_of(resumed.blocks()) == ids[4:] + more
                assert ids_of(fresh.blocks()) == more
                assert not any(b.event == "reset" for b in resumed.blocks() + fresh.blocks())


async def test_resume_after_an_expired_id_is_a_reset_counted_as_dropped() -> None:
    with trio.fail_after(15):
        async with open_server(hub={"log_ttl": 1.0}) as server, http_client(server) as client:
            old = await publish_many(client, "ttl", [f"old{i}" for i in range(5)])
            await trio.sleep(1.3)  # the TTL runs out on the real clock
            new = await publish_many(client, "ttl", ["new0", "new1"])
            dropped = sample(await metrics(client), "trio_stream_events_dropped_total")
            async with await open_raw(
                server.url, "/streams/ttl", headers={"Last-Event-ID": old[1]}
            ) as response:
                events = await response.read_events(3)
            reset = events[0]
            assert reset.event == "reset"
            assert reset.id is None
            assert "id" not in dict(reset.fields)
            assert reset.json() == {"reason": "expired", "last_event_id": old[1]}
            # Then the stream continues from the oldest retained event.
            assert ids_of(events[1:]) == new
            samples = await metrics(client)
            # old[2], old[3] and old[4] were published after old[1] and never delivered.
            assert sample(samples, "trio_stream_events_dropped_total") == dropped + 3


async def test_resume_with_an_id_of_another_epoch_is_an_unknown_reset(server: Server) -> None:
    with trio.fail_after(10):
        async with http_client(server) as client:
            ids = await publish_many(client, "epoch", ["a", "b"])
            epoch, _, seq = ids[0].rpartition("-")
            other = ("0" if epoch[0] != "0" else "1") + epoch[1:] + "-" + seq
            never = f"{epoch}-{int(seq, 16) + 1000:0{len(seq)}x}"
            for stale in (other, never):
                async with await open_raw(
                    server.url, "/streams/epoch", headers={"Last-Event-ID": stale}
                ) as response:
                    events = await response.read_events(3)
                assert events[0].event == "reset"
                assert events[0].id is None
                assert events[0].json() == {"reason": "unknown", "last_event_id": stale}
                assert ids_of(events[1:]) == ids


# -- rate limits ---------------------------------------------------------------------------


def assert_within_bucket(
    times: list[float], start: float, *, rate: float, burst: int, slack: int = 2
) -> None:
    """No prefix of the arrivals came faster than a token bucket allows."""
    for count, at in enumerate(sorted(times), 1):
        allowed = burst + rate * (at - start) + slack
        assert count <= allowed, f"{count} events after {at - start:.3f} s (at most {allowed})"


def event_times(reader: StreamReader) -> list[float]:
    return [at for at, block in zip(reader.times, reader.blocks, strict=True) if block.is_event]


async def test_rate_limit_is_a_bucket_per_client_id() -> None:
    """Burst then rate, per client id: a second client has its own bucket, while two
    streams of one client share theirs."""
    rate, burst, n = 10.0, 10, 20
    with trio.fail_after(30):
        async with (
            open_server(hub={"rate": rate, "burst": burst}) as server,
            http_client(server) as client,
            trio.open_nursery() as nursery,
        ):
            readers = {
                name: await open_reader(
                    nursery, client, "/streams/rate", headers={"X-Client-ID": client_id}
                )
                for name, client_id in (("a", "a"), ("b", "b"), ("c1", "c"), ("c2", "c"))
            }
            start = trio.current_time()
            ids = await publish_many(client, "rate", [str(i) for i in range(n)])
            for reader in readers.values():
                await reader.wait_events(n)
                assert ids_of(reader.events) == ids
            a, b = event_times(readers["a"]), event_times(readers["b"])
            c = event_times(readers["c1"]) + event_times(readers["c2"])
            for times in (a, b, c):
                assert_within_bucket(times, start, rate=rate, burst=burst)
            # The burst goes out back to back (at the rate alone: 0.9 s)...
            assert sorted(a)[burst - 1] - start < 0.6
            # ...then the rate: (20 - 10) / 10 = 1 s for a client alone,
            assert max(a) - start >= 0.8
            # and a and b did not share a bucket, which would take (40 - 10) / 10 = 3 s;
            assert max(max(a), max(b)) - start < 2.2
            # while c's two streams did: 3 s.
            assert max(c) - start >= 2.4
            nursery.cancel_scope.cancel()


async def test_global_rate_caps_all_clients_together() -> None:
    rate, burst, n = 20.0, 10, 15
    with trio.fail_after(30):
        async with (
            open_server(hub={"global_rate": rate, "global_burst": burst}) as server,
            http_client(server) as client,
            trio.open_nursery() as nursery,
        ):
            readers = [
                await open_reader(nursery, client, "/streams/g", headers={"X-Client-ID": name})
                for name in ("g1", "g2")
            ]
            start = trio.current_time()
            ids = await publish_many(client, "g", [str(i) for i in range(n)])
            for reader in readers:
                await reader.wait_events(n)
                assert ids_of(reader.events) == ids
            times = event_times(readers[0]) + event_times(readers[1])
            assert_within_bucket(times, start, rate=rate, burst=burst)
            assert max(times) - start >= 0.8  # (30 - 10) / 20 = 1 s for both together
            nursery.cancel_scope.cancel()


async def test_poll_is_rate_limited_like_a_stream() -> None:
    with trio.fail_after(20):
        async with (
            open_server(hub={"rate": 2.0, "burst": 3}) as server,
            http_client(server) as client,
        ):
            ids = await publish_many(client, "p", [str(i) for i in range(10)])
            response = await client.get("/streams/p/poll?client_id=poller")
            assert response.status_code == 200
            body = response.json()
            assert [e["id"] for e in body["events"]] == ids[:3]  # what the bucket holds
            assert [e["data"] for e in body["events"]] == ["0", "1", "2"]
            assert body["last_event_id"] == ids[2]
            assert body["reset"] is False
            url = f"/streams/p/poll?client_id=poller&after={body['last_event_id']}"
            response = await client.get(url)
            assert response.status_code == 429
            retry_after = int(response.headers["retry-after"])
            assert retry_after == 1  # the next token in 0.5 s, rounded up
            assert "error" in response.json()
            await trio.sleep(retry_after)
            response = await client.get(url)
            assert response.status_code == 200
            assert [e["id"] for e in response.json()["events"]] == ids[3:5]
            # Another client has its own bucket; `after` unknown to the log: a reset.
            response = await client.get("/streams/p/poll?client_id=other&after=nope&limit=2")
            body = response.json()
            assert body["reset"] is True
            assert [e["id"] for e in body["events"]] == ids[:2]
            samples = await metrics(client)
            assert sample(samples, "trio_stream_retry_signals_total", kind="retry_after") == 1


async def test_too_many_topics_is_429() -> None:
    with trio.fail_after(10):
        async with (
            open_server(hub={"max_topics": 2}) as server,
            http_client(server) as client,
        ):
            await publish_many(client, "t1", ["x"])
            await publish_many(client, "t2", ["x"])
            response = await client.post("/streams/t3", json={"data": "x"})
            assert response.status_code == 429
            assert response.json()["error"] == "too many topics"
            response = await client.get("/streams/t4")
            assert response.status_code == 429
            assert response.json()["error"] == "too many topics"
            await publish_many(client, "t1", ["still fine"])


# -- ack mode ------------------------------------------------------------------------------


async def ack(
    client: httpx.AsyncClient,
    topic: str,
    client_id: str,
    last_event_id: str,
    utilization: float | None = None,
) -> httpx.Response:
    body: dict[str, object] = {"client_id": client_id, "last_event_id": last_event_id}
    if utilization is not None:
        body["buffer_utilization"] = utilization
    return await client.post(f"/streams/{topic}/ack", json=body)


async def test_ack_mode_over_http() -> None:
    with trio.fail_after(20):
        async with (
            open_server(hub={"window": 2}) as server,
            http_client(server) as client,
            await open_stream(server.url, "acks?ack=3", headers={"X-Client-ID": "acker"}) as stream,
            await open_stream(
                server.url, "acks?ack", headers={"X-Client-ID": "default"}
            ) as default,
        ):
            before = await metrics(client)
            ids = await publish_many(client, "acks", [str(i) for i in range(10)])
            assert ids_of(await stream.read_events(3)) == ids[:3]
            assert ids_of(await default.read_events(2)) == ids[:2]  # `?ack` is `--window`
            await trio.sleep(0.5)
            assert ids_of(stream.blocks()) == ids[:3]  # nothing until an ack
            assert ids_of(default.blocks()) == ids[:2]

            response = await ack(client, "acks", "acker", ids[1], 0.25)
            assert response.status_code == 204
            assert ids_of(await stream.read_events(5)) == ids[:5]  # acked 2: up to 5
            assert (await ack(client, "acks", "acker", ids[4], 0.5)).status_code == 204
            assert ids_of(await stream.read_events(8)) == ids[:8]  # cumulative: up to 8
            # An id at or before the last acked one: 204, and nothing changes.
            assert (await ack(client, "acks", "acker", ids[0])).status_code == 204
            assert (await ack(client, "acks", "acker", ids[4])).status_code == 204
            await trio.sleep(0.3)
            assert ids_of(stream.blocks()) == ids[:8]

            # Not sent yet (ids[9]): 409. Unknown client: 404. Bad input: 400. Big: 413.
            response = await ack(client, "acks", "acker", ids[9])
            assert response.status_code == 409
            assert "error" in response.json()
            response = await ack(client, "acks", "nobody", ids[0])
            assert response.status_code == 404
            assert "error" in response.json()
            response = await client.post("/streams/acks/ack", json={"client_id": "acker"})
            assert response.status_code == 400
            assert "error" in response.json()
            response = await ack(client, "acks", "acker", ids[5], 1.5)
            assert response.status_code == 400
            response = await client.post(
                "/streams/acks/ack",
                json={"client_id": "acker", "last_event_id": ids[5], "pad": "x" * 70_000},
            )
            assert response.status_code == 413
            assert "error" in response.json()
            assert ids_of(stream.blocks()) == ids[:8]

            after = await metrics(client)
            name = "trio_stream_client_buffer_utilization"
            assert sample(after, f"{name}_count") - sample(before, f"{name}_count") == 2
            assert sample(after, f"{name}_sum") - sample(before, f"{name}_sum") == 0.75
            latency = "trio_stream_delivery_latency_seconds_count"
            assert sample(after, latency, stage="ack") > sample(before, latency, stage="ack")


# -- pause and poll ------------------------------------------------------------------------


def poll_query(poll_url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(poll_url).query)


async def poll_until_resumed(
    client: httpx.AsyncClient, poll_url: str, topic: str, client_id: str
) -> tuple[list[str], str | None]:
    """Poll from *poll_url* as a client should, until ``resume_stream``; the ids polled
    and the id to resume the stream after."""
    polled: list[str] = []
    url = poll_url
    last: str | None = poll_query(poll_url).get("after", [None])[0]
    for _ in range(100):
        response = await client.get(url)
        if response.status_code == 429:
            await trio.sleep(int(response.headers["retry-after"]))
            continue
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"events", "last_event_id", "reset", "resume_stream"}
        assert body["reset"] is False
        polled += [event["id"] for event in body["events"]]
        if body["events"]:
            assert body["last_event_id"] == body["events"][-1]["id"]
        else:
            assert body["last_event_id"] == last
        last = body["last_event_id"]
        if body["resume_stream"]:
            return polled, last
        url = f"/streams/{topic}/poll?after={quote(str(last))}&client_id={client_id}"
    raise AssertionError("never told to resume the stream")


async def assert_paused(client: httpx.AsyncClient, topic: str, client_id: str) -> str:
    """A new stream of the client is refused as the contract says; the poll URL."""
    response = await client.get(f"/streams/{topic}", headers={"X-Client-ID": client_id})
    assert response.status_code == 429
    assert response.headers["x-stream-pause"] == "true"
    assert int(response.headers["retry-after"]) >= 1
    body = response.json()
    assert body["error"] == "paused"
    poll_url: str = body["poll_url"]
    assert poll_url.startswith(f"/streams/{topic}/poll?")
    assert poll_query(poll_url)["client_id"] == [client_id]
    return poll_url


async def test_a_client_that_stops_reading_is_paused_then_polls_and_streams_again() -> None:
    """Forces the slow-socket pause: a raw client with a tiny receive buffer never reads
    while 32 KB events pour in, so hypercorn's send blocks and the lag passes the limit.
    Across stream -> poll -> stream, every event arrives exactly once."""
    topic, slow_id = "big", "slow"
    payload = "x" * 32_000
    config = {"lag_limit": 64, "poll_interval": 0.2}
    with trio.fail_after(60):
        async with (
            open_server(hub=config) as server,
            http_client(server) as client,
            trio.open_nursery() as nursery,
        ):
            control = await open_reader(
                nursery, client, f"/streams/{topic}", headers={"X-Client-ID": "fast"}
            )
            slow = await open_raw(
                server.url, f"/streams/{topic}", headers={"X-Client-ID": slow_id}, rcvbuf=4096
            )
            async with slow:
                assert slow.status == 200
                ids: list[str] = []
                for _ in range(300):
                    ids += await publish_many(client, topic, [payload] * 4)
                    samples = await metrics(client)
                    if sample(samples, "trio_stream_retry_signals_total", kind="pause"):
                        break
                else:
                    raise AssertionError("the client that stopped reading was never paused")
                # Paused while its write is still stuck: the stream gave up its place
                # at once, and a new stream is refused already.
                assert server.app.hub.client_statistics(slow_id).streams == 0
                await assert_paused(client, topic, slow_id)

                # The client reads again: what was in flight, then `pause`, then the end.
                await slow.read_to_end()
                blocks = [b for b in slow.blocks() if b.is_event]
            pause = blocks[-1]
            assert pause.event == "pause"
            assert pause.id is None
            streamed = [b.id for b in blocks[:-1]]
            assert streamed == ids[: len(streamed)]
            assert all(b.data == payload for b in blocks[:-1])
            info = pause.json()
            assert info["retry_after_ms"] == 200
            after = poll_query(info["poll_url"]).get("after")
            assert after == ([streamed[-1]] if streamed else None)
            assert await assert_paused(client, topic, slow_id) == info["poll_url"]

            await trio.sleep(info["retry_after_ms"] / 1000)
            polled, last = await poll_until_resumed(client, info["poll_url"], topic, slow_id)
            assert streamed + polled == ids[: len(streamed) + len(polled)]
            assert len(ids) - len(streamed) - len(polled) <= 32  # within half the lag limit

            headers = {"X-Client-ID": slow_id, **({"Last-Event-ID": last} if last else {})}
            resumed = await open_reader(nursery, client, f"/streams/{topic}", headers=headers)
            more = await publish_many(client, topic, ["after-1", "after-2"])
            rest = len(ids) - len(streamed) - len(polled) + 2
            await resumed.wait_events(rest)
            await trio.sleep(0.2)
            assert streamed + polled + ids_of(resumed.events) == ids + more

            # The reader that kept up was never paused and got everything.
            await control.wait_events(len(ids) + 2)
            assert ids_of(control.events) == ids + more
            assert not any(block.event == "pause" for block in control.blocks)

            samples = await metrics(client)
            assert sample(samples, "trio_stream_retry_signals_total", kind="pause") == 1
            assert sample(samples, "trio_stream_write_stalls_total") >= 1
            nursery.cancel_scope.cancel()


async def test_ack_mode_without_acks_is_paused_then_polls_and_streams_again() -> None:
    topic, client_id = "lazy", "lazy"
    with trio.fail_after(30):
        async with (
            open_server(hub={"lag_limit": 5, "poll_interval": 0.2}) as server,
            http_client(server) as client,
        ):
            async with await open_stream(
                server.url, f"{topic}?ack=2", headers={"X-Client-ID": client_id}
            ) as stream:
                ids = await publish_many(client, topic, ["0", "1"])
                assert ids_of(await stream.read_events(2)) == ids
                for i in range(2, 8):  # the window is full: these wait for an ack
                    ids += await publish_many(client, topic, [str(i)])
                await stream.read_to_end()
            events = [b for b in stream.blocks() if b.is_event]
            assert ids_of(events[:-1]) == ids[:2]
            pause = events[-1]
            assert pause.event == "pause"
            info = pause.json()
            assert poll_query(info["poll_url"])["after"] == [ids[1]]
            assert await assert_paused(client, topic, client_id) == info["poll_url"]

            await trio.sleep(info["retry_after_ms"] / 1000)
            polled, last = await poll_until_resumed(client, info["poll_url"], topic, client_id)
            assert polled == ids[2:]
            assert last is not None
            assert last == ids[-1]
            async with await open_stream(
                server.url,
                f"{topic}?ack=2",
                headers={"X-Client-ID": client_id, "Last-Event-ID": last},
            ) as again:
                more = await publish_many(client, topic, ["8"])
                assert ids_of(await again.read_events(1)) == more


# -- publishing fails closed ----------------------------------------------------------------


@pytest.mark.parametrize(
    "limit",
    [{"log_capacity": 5}, {"log_max_bytes": 5 * 134 + 60}],
    ids=["by-count", "by-bytes"],
)
async def test_publish_fails_closed_when_the_log_is_full(limit: dict[str, int]) -> None:
    """Each event here takes 134 bytes in the log: 5 fit either way, not 6."""
    data = [f"{i:03d}" + "x" * 97 for i in range(20)]  # 100 characters each
    with trio.fail_after(20):
        async with (
            open_server(hub={"log_ttl": 1.0, **limit}) as server,
            http_client(server) as client,
            trio.open_nursery() as nursery,
        ):
            reader = await open_reader(nursery, client, "/streams/full")
            accepted = await publish_many(client, "full", data[0:3])
            response = await client.post("/streams/full", json=[{"data": d} for d in data[3:6]])
            assert response.status_code == 429
            assert "error" in response.json()
            assert 1 <= int(response.headers["retry-after"]) <= 2
            accepted += await publish_many(client, "full", data[3:5])
            response = await client.post("/streams/full", json={"data": data[5]})
            assert response.status_code == 429
            retry_after = int(response.headers["retry-after"])
            samples = await metrics(client)
            assert sample(samples, "trio_stream_publish_rejected_total") == 4
            assert sample(samples, "trio_stream_retry_signals_total", kind="retry_after") == 2
            assert sample(samples, "trio_stream_queue_depth", topic="full") == 5
            assert sample(samples, "trio_stream_queue_saturation", topic="full") <= 1.0

            await trio.sleep(retry_after + 0.1)  # the oldest expire: room again
            accepted += await publish_many(client, "full", data[5:8])
            await reader.wait_events(len(accepted))
            await trio.sleep(0.2)
            assert ids_of(reader.events) == accepted  # nothing accepted was lost
            assert [e.data for e in reader.events] == data[:8]
            nursery.cancel_scope.cancel()


# -- stream limits -------------------------------------------------------------------------


async def test_stream_limits_answer_429_and_free_up_when_streams_close() -> None:
    config = {"max_streams_per_client": 2, "max_connections": 3}
    with trio.fail_after(20):
        async with open_server(hub=config) as server, http_client(server) as client:
            x1 = await open_stream(server.url, "lim", headers={"X-Client-ID": "x"})
            x2 = await open_stream(server.url, "lim", headers={"X-Client-ID": "x"})
            response = await client.get("/streams/lim", headers={"X-Client-ID": "x"})
            assert response.status_code == 429
            assert int(response.headers["retry-after"]) >= 1
            assert "error" in response.json()
            assert "x-stream-pause" not in response.headers
            async with await open_stream(server.url, "other", headers={"X-Client-ID": "y"}):
                response = await client.get("/streams/lim", headers={"X-Client-ID": "z"})
                assert response.status_code == 429
                assert int(response.headers["retry-after"]) >= 1
                assert "error" in response.json()
                await x1.aclose()
                await wait_until(lambda: server.app.hub.connections == 2)
                async with await open_stream(server.url, "lim", headers={"X-Client-ID": "x"}):
                    response = await client.get("/streams/lim", headers={"X-Client-ID": "z"})
                    assert response.status_code == 429
            await x2.aclose()
            await wait_until(lambda: server.app.hub.connections == 0)
            async with await open_stream(server.url, "lim", headers={"X-Client-ID": "z"}):
                pass


# -- metrics -------------------------------------------------------------------------------

FAMILIES = {
    "trio_stream_connections",
    "trio_stream_events_published_total",
    "trio_stream_events_sent_total",
    "trio_stream_events_dropped_total",
    "trio_stream_write_stalls_total",
    "trio_stream_publish_rejected_total",
    "trio_stream_client_lag_count",
    "trio_stream_client_buffer_utilization_count",
    "trio_stream_delivery_latency_seconds_count",
}


async def test_metrics_move_with_traffic() -> None:
    with trio.fail_after(20):
        async with (
            open_server(hub={"max_streams_per_client": 1}) as server,
            http_client(server) as client,
        ):
            before = await metrics(client)
            assert {name for name, _ in before} >= FAMILIES
            assert sample(before, "trio_stream_connections") == 0

            def delta(after: Samples, name: str, **labels: str) -> float:
                return sample(after, name, **labels) - sample(before, name, **labels)

            async with (
                await open_stream(server.url, "m", headers={"X-Client-ID": "m1"}) as s1,
                await open_stream(server.url, "m", headers={"X-Client-ID": "m2"}) as s2,
            ):
                assert sample(await metrics(client), "trio_stream_connections") == 2
                response = await client.get("/streams/m", headers={"X-Client-ID": "m1"})
                assert response.status_code == 429
                ids = await publish_many(client, "m", [str(i) for i in range(5)])
                assert ids_of(await s1.read_events(5)) == ids
                assert ids_of(await s2.read_events(5)) == ids
                after = await metrics(client)
                assert delta(after, "trio_stream_events_published_total") == 5
                assert delta(after, "trio_stream_events_sent_total") == 10
                assert sample(after, "trio_stream_queue_depth", topic="m") == 5
                assert sample(after, "trio_stream_queue_saturation", topic="m") == 5 / 10_000
                assert delta(after, "trio_stream_retry_signals_total", kind="retry_field") == 2
                assert delta(after, "trio_stream_retry_signals_total", kind="retry_after") == 1
                latency = "trio_stream_delivery_latency_seconds"
                assert delta(after, f"{latency}_count", stage="write") == 10
                assert delta(after, f"{latency}_bucket", stage="write", le="+Inf") == 10
                assert delta(after, "trio_stream_client_lag_count") >= 2
            await wait_until(lambda: server.app.hub.connections == 0)
            assert sample(await metrics(client), "trio_stream_connections") == 0


# -- heartbeats and dead peers ---------------------------------------------------------------


async def test_heartbeat_comment_after_idleness() -> None:
    with trio.fail_after(20):
        async with (
            open_server(hub={"heartbeat_interval": 0.3}) as server,
            http_client(server) as client,
        ):
            start = trio.current_time()
            async with await open_stream(server.url, "hb") as stream:
                await stream.read_until(lambda body: body.count(b"\n\n") >= 2)
                first = trio.current_time() - start
                assert 0.25 <= first < 3
                retry, heartbeat = stream.blocks()
                assert retry.retry == "3000"
                assert heartbeat.is_comment
                assert bytes(stream.body).startswith(b"retry: 3000\n\n:")
                ids = await publish_many(client, "hb", ["e"])
                published = trio.current_time()
                await stream.read_blocks(lambda blocks: len(blocks) >= 4)
                assert stream.blocks()[2].id == ids[0]
                assert stream.blocks()[3].is_comment
                assert trio.current_time() - published >= 0.25  # the event reset the timer


def abort(stream: RawResponse) -> None:
    """Close the socket with a reset (SO_LINGER 0), as a crashed client would."""
    sock = stream.stream.socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_a_client_that_goes_away_frees_its_stream(how: str) -> None:
    config = {"heartbeat_interval": 0.3, "max_streams_per_client": 1}
    with trio.fail_after(20):
        async with open_server(hub=config) as server, http_client(server) as client:
            stream = await open_stream(server.url, "gone", headers={"X-Client-ID": "gone"})
            assert server.app.hub.connections == 1
            if how == "close":
                await stream.aclose()
            else:
                abort(stream)
            await wait_until(lambda: server.app.hub.connections == 0)
            assert sample(await metrics(client), "trio_stream_connections") == 0
            async with await open_stream(server.url, "gone", headers={"X-Client-ID": "gone"}):
                assert server.app.hub.connections == 1


async def test_a_client_that_stops_reading_is_closed_after_the_idle_timeout() -> None:
    """Forces a write hypercorn cannot finish (it shields its socket sends): the stream
    must still give its place back once ``idle_timeout`` passes without progress."""
    config = {"idle_timeout": 1.0, "lag_limit": 1_000_000, "max_streams_per_client": 1}
    payload = "y" * 200_000
    with trio.fail_after(30):
        async with open_server(hub=config) as server, http_client(server) as client:
            stuck = await open_raw(
                server.url, "/streams/stuck", headers={"X-Client-ID": "stuck"}, rcvbuf=4096
            )
            async with stuck:
                for _ in range(4):  # 3.2 MB: far more than the socket buffers take
                    await publish_many(client, "stuck", [payload] * 4)
                published = trio.current_time()
                await wait_until(lambda: server.app.hub.connections == 0)
                took = trio.current_time() - published
                assert took < 5
                samples = await metrics(client)
                assert sample(samples, "trio_stream_connections") == 0
                assert sample(samples, "trio_stream_write_stalls_total") >= 1
                # Its place is free: the same client may stream again.
                async with await open_stream(server.url, "stuck", headers={"X-Client-ID": "stuck"}):
                    assert (await client.get("/healthz")).text == "ok"


async def test_idle_timeout_counts_only_while_something_is_owed() -> None:
    """A stream with nothing to send is not idle, even with heartbeats rarer than the
    idle timeout; in ack mode, events waiting for an ack that never comes are."""
    config = {"idle_timeout": 0.5, "heartbeat_interval": 30.0}
    with trio.fail_after(20):
        async with open_server(hub=config) as server, http_client(server) as client:
            quiet = await open_stream(server.url, "quiet", headers={"X-Client-ID": "q"})
            acking = await open_stream(server.url, "quiet?ack=2", headers={"X-Client-ID": "acking"})
            lazy = await open_stream(server.url, "quiet?ack=2", headers={"X-Client-ID": "lazy"})
            async with quiet, acking, lazy:
                await trio.sleep(1.2)  # more than two idle timeouts without a write
                assert server.app.hub.connections == 3
                ids = await publish_many(client, "quiet", ["a", "b"])
                for stream in (quiet, acking, lazy):
                    assert ids_of(await stream.read_events(2)) == ids
                response = await ack(client, "quiet", "acking", ids[1])
                assert response.status_code == 204
                # "lazy" never acks: closed after the idle timeout. The others stay.
                with trio.fail_after(5):
                    await lazy.read_to_end()
                await trio.sleep(1.0)
                assert server.app.hub.connections == 2
                more = await publish_many(client, "quiet", ["c"])
                assert ids_of(await quiet.read_events(3)) == ids + more
                assert ids_of(await acking.read_events(3)) == ids + more


# -- routing, health, CORS -----------------------------------------------------------------


async def test_unknown_paths_are_404_and_wrong_methods_405_with_allow(server: Server) -> None:
    with trio.fail_after(10):
        async with http_client(server) as client:
            for method, path in [
                ("GET", "/"),
                ("GET", "/nope"),
                ("GET", "/streams/t/nope"),
                ("GET", "/streams/t/poll/more"),
                ("POST", "/metrics/x"),
                ("OPTIONS", "/nope"),
            ]:
                response = await client.request(method, path)
                assert response.status_code == 404, (method, path)
                assert "error" in response.json()
            for method, path, allowed in [
                ("PUT", "/streams/t", {"GET", "POST"}),
                ("DELETE", "/streams/t", {"GET", "POST"}),
                ("POST", "/healthz", {"GET"}),
                ("POST", "/metrics", {"GET"}),
                ("GET", "/streams/t/ack", {"POST"}),
                ("POST", "/streams/t/poll", {"GET"}),
            ]:
                response = await client.request(method, path)
                assert response.status_code == 405, (method, path)
                assert "error" in response.json()
                allow = {m.strip() for m in response.headers["allow"].split(",")}
                assert allowed <= allow
                assert method not in allow


async def test_healthz(server: Server) -> None:
    with trio.fail_after(10):
        async with http_client(server) as client:
            response = await client.get("/healthz")
            assert response.status_code == 200
            assert response.text == "ok"
            response = await client.head("/healthz")
            assert response.status_code == 200
            assert response.content == b""


async def test_cors_preflight_and_headers() -> None:
    origin = "https://app.example"
    with trio.fail_after(10):
        async with (
            open_server(cors_origins=(origin,)) as server,
            http_client(server) as client,
        ):
            for path, method in [
                ("/streams/c", "GET"),
                ("/streams/c/poll", "GET"),
                ("/streams/c/ack", "POST"),
            ]:
                response = await client.options(
                    path,
                    headers={
                        "Origin": origin,
                        "Access-Control-Request-Method": method,
                        "Access-Control-Request-Headers": "last-event-id, x-client-id",
                    },
                )
                assert 200 <= response.status_code < 300
                assert response.headers["access-control-allow-origin"] == origin
                methods = response.headers["access-control-allow-methods"]
                assert method in {m.strip() for m in methods.split(",")}
                allowed_headers = response.headers["access-control-allow-headers"].lower()
                assert "last-event-id" in allowed_headers
                assert "x-client-id" in allowed_headers
            response = await client.options(
                "/streams/c",
                headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
            )
            assert "access-control-allow-origin" not in response.headers

            async with await open_raw(
                server.url, "/streams/c", headers={"Origin": origin, "X-Client-ID": "cors"}
            ) as stream:
                assert stream.header("access-control-allow-origin") == origin
                exposed = (stream.header("access-control-expose-headers") or "").lower()
                assert {"x-client-id", "retry-after", "x-stream-pause"} <= {
                    h.strip() for h in exposed.split(",")
                }
            response = await client.get(
                "/streams/c/poll?client_id=cors", headers={"Origin": origin}
            )
            assert response.status_code == 200
            assert response.headers["access-control-allow-origin"] == origin
            response = await client.get(
                "/streams/c/poll", headers={"Origin": "https://evil.example"}
            )
            assert "access-control-allow-origin" not in response.headers
            # Errors too: a page must be able to read a 429's Retry-After.
            response = await client.get("/streams/bad!", headers={"Origin": origin})
            assert response.status_code == 400
            assert response.headers["access-control-allow-origin"] == origin

        async with open_server(cors_origins=("*",)) as server, http_client(server) as client:
            response = await client.options(
                "/streams/c",
                headers={"Origin": "https://any.example", "Access-Control-Request-Method": "GET"},
            )
            assert response.headers["access-control-allow-origin"] == "*"
