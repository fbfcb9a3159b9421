"""The Redis backend: several ``trio-stream serve`` processes on one real redis-server.

Each test starts its own redis-server (``_redis.py``) on a free loopback port and the
servers as real processes with ``--backend redis://...``. Without redis-server these
tests skip, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import TYPE_CHECKING

import httpx
import pytest
import trio

from trio_stream._core._errors import IdempotencyKeyReusedError
from trio_stream._core._events import Event, encode
from trio_stream._core._ring import Entry, Resume
from trio_stream._hub import Hub, HubConfig, open_hub
from trio_stream._log import BackendUnavailableError
from trio_stream.backends.redis import RedisBackend, RedisLog, SharedBucket
from trio_stream.testing import RecordingSink

from ._processes import CliServer, cli_server
from ._redis import RedisServer, redis_server
from ._support import (
    StreamReader,
    http_client,
    metrics,
    open_reader,
    publish,
    publish_many,
    sample,
    wait_until,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.e2e

FAST = ["--rate", "10000", "--burst", "10000"]


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A throwaway redis-server (no persistence)."""
    with redis_server(tmp_path / "redis") as server:
        yield server


@contextlib.contextmanager
def two_servers(
    redis: RedisServer,
    tmp_path: Path,
    options: list[str] = (),  # type: ignore[assignment]
) -> Iterator[tuple[CliServer, CliServer]]:
    """Two ``trio-stream serve`` processes on *redis*."""
    argv = ["--backend", redis.url, *FAST, *options]
    with (
        cli_server("serve", argv, tmp_path / "a.err") as a,
        cli_server("serve", argv, tmp_path / "b.err") as b,
    ):
        yield a, b


async def test_redis_publish_on_one_stream_from_the_other(
    redis: RedisServer, tmp_path: Path
) -> None:
    with two_servers(redis, tmp_path) as (a, b), trio.fail_after(20):
        async with (
            http_client(a.url) as to_a,
            http_client(b.url) as to_b,
            trio.open_nursery() as nursery,
        ):
            reader = await open_reader(nursery, to_b, "/streams/prices")
            ids = await publish_many(to_a, "prices", [f"p{i}" for i in range(50)])
            ids += await publish(to_a, "prices", {"event": "tick", "data": "x\ny"})
            events = await reader.wait_events(51)
            nursery.cancel_scope.cancel()
    assert [e.id for e in events] == ids
    assert [e.data for e in events] == [f"p{i}" for i in range(50)] + ["x\ny"]
    assert events[-1].event == "tick"
    assert len(set(ids)) == 51


async def test_redis_last_event_id_resumes_exactly_on_the_other(
    redis: RedisServer, tmp_path: Path
) -> None:
    with two_servers(redis, tmp_path) as (a, b), trio.fail_after(20):
        async with http_client(a.url) as to_a, http_client(b.url) as to_b:
            async with trio.open_nursery() as nursery:
                first = await open_reader(nursery, to_a, "/streams/news")
                ids = await publish_many(to_a, "news", [str(i) for i in range(10)])
                seen = (await first.wait_events(4))[:4]
                nursery.cancel_scope.cancel()
            # A new topic for B, and an id B never issued: B loads what Redis retains.
            async with trio.open_nursery() as nursery:
                resumed = await open_reader(
                    nursery, to_b, "/streams/news", headers={"Last-Event-ID": seen[-1].id or ""}
                )
                more = await publish_many(to_b, "news", ["10", "11"])
                events = await resumed.wait_events(8)
                nursery.cancel_scope.cancel()
            poll = await to_b.get("/streams/news/poll", params={"after": ids[2]})
    assert not any(block.event == "reset" for block in resumed.blocks)
    assert [e.id for e in events] == ids[4:] + more
    assert [e.data for e in events] == [str(i) for i in range(4, 12)]
    assert poll.status_code == 200
    assert [e["id"] for e in poll.json()["events"]] == ids[3:] + more


async def test_redis_publish_fails_closed_exactly_under_concurrent_publishers(
    redis: RedisServer, tmp_path: Path
) -> None:
    """Two processes, 4 publishers each, race for a log of 40: exactly 40 get a 202."""
    capacity = 40
    statuses: list[int] = []
    retry_after: list[str] = []
    with two_servers(redis, tmp_path, ["--log-capacity", str(capacity)]) as (a, b):
        async with (
            httpx.AsyncClient(base_url=a.url, timeout=20) as to_a,
            httpx.AsyncClient(base_url=b.url, timeout=20) as to_b,
        ):

            async def publisher(client: httpx.AsyncClient, name: str) -> None:
                for i in range(25):
                    response = await client.post("/streams/full", json={"data": f"{name}{i}"})
                    statuses.append(response.status_code)
                    if response.status_code == 429:
                        retry_after.append(response.headers["retry-after"])

            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    for n in range(4):
                        nursery.start_soon(publisher, to_a, f"a{n}-")
                        nursery.start_soon(publisher, to_b, f"b{n}-")
            poll = await to_b.get("/streams/full/poll", params={"limit": "1000"})
    assert sorted(set(statuses)) == [202, 429]
    assert statuses.count(202) == capacity
    assert statuses.count(429) == 200 - capacity
    assert all(int(value) >= 1 for value in retry_after)
    assert len(poll.json()["events"]) == capacity


async def test_redis_client_paused_on_one_is_paused_on_the_other(
    redis: RedisServer, tmp_path: Path
) -> None:
    """Paused on A: B answers 429 too; catching up by polling B lets it stream on A."""
    options = ["--rate", "100", "--burst", "50", "--lag-limit", "20"]
    who = {"X-Client-ID": "slowpoke"}
    with two_servers(redis, tmp_path, options) as (a, b), trio.fail_after(30):
        async with (
            httpx.AsyncClient(base_url=a.url, timeout=20) as to_a,
            httpx.AsyncClient(base_url=b.url, timeout=20) as to_b,
        ):
            async with trio.open_nursery() as nursery:
                reader = await open_reader(nursery, to_a, "/streams/q", headers=who)
                await publish_many(to_a, "q", [str(i) for i in range(200)])
                await reader.wait_for(lambda r: any(x.event == "pause" for x in r.blocks))
                nursery.cancel_scope.cancel()
            pause = next(x for x in reader.blocks if x.event == "pause").json()
            refused = await _wait_status(to_b, "/streams/q", who, 429)
            polled = 0
            url = pause["poll_url"]
            while True:
                response = await to_b.get(url)
                if response.status_code == 429:
                    await trio.sleep(0.1)
                    continue
                body = response.json()
                polled += len(body["events"])
                url = f"/streams/q/poll?after={body['last_event_id']}&client_id=slowpoke"
                if body["resume_stream"]:
                    break
            resumed = await _wait_status(to_a, "/streams/q", who, 200)  # news takes a moment
    assert refused.headers["x-stream-pause"] == "true"
    assert refused.json()["error"] == "paused"
    assert polled > 0
    assert resumed.headers["content-type"].startswith("text/event-stream")


async def _wait_status(
    client: httpx.AsyncClient, path: str, headers: dict[str, str], status: int
) -> httpx.Response:
    """GET *path* until it answers *status* (an event stream is left unread)."""
    while True:
        async with client.stream("GET", path, headers=headers) as response:
            if response.status_code == status:
                if status != 200:
                    await response.aread()
                return response
        await trio.sleep(0.05)


async def test_redis_restart_mid_stream_loses_nothing(tmp_path: Path) -> None:
    """Redis goes away and comes back (with its data) while a stream is open.

    Publishing answers 503 meanwhile, healthz says degraded, the stream keeps its
    heartbeats, and once Redis is back the stream gets every accepted event once.
    """
    with (
        redis_server(tmp_path / "redis", persistent=True) as redis,
        two_servers(redis, tmp_path, ["--heartbeat", "0.3"]) as (a, b),
    ):
        async with (
            http_client(b.url) as to_b,
            httpx.AsyncClient(base_url=b.url, timeout=20) as plain_b,
            httpx.AsyncClient(base_url=a.url, timeout=20) as to_a,
        ):
            with trio.fail_after(40):
                async with trio.open_nursery() as nursery:
                    reader = await open_reader(nursery, to_b, "/streams/ledger")
                    accepted = await publish_many(to_a, "ledger", [str(i) for i in range(10)])
                    await reader.wait_events(10)

                    redis.stop()
                    refused = await to_a.post("/streams/ledger", json={"data": "lost"})
                    health = await _wait_health(plain_b, 503)
                    beats = len(reader.blocks)
                    await trio.sleep(1.0)
                    beats = len(reader.blocks) - beats

                    redis.start()
                    for i in range(10, 20):
                        accepted += await _publish_when_back(to_a, "ledger", str(i))
                    events = await reader.wait_events(20)
                    healthy = await _wait_health(plain_b, 200)
                    samples = await metrics(to_b)
                    nursery.cancel_scope.cancel()
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert "redis unavailable" in refused.json()["error"]
    assert health == "degraded: redis unavailable"
    assert beats >= 2  # heartbeats went on while Redis was away
    assert healthy == "ok"
    assert [e.id for e in events] == accepted
    assert [e.data for e in events] == [str(i) for i in range(20)]
    assert sample(samples, "trio_stream_backend_errors_total") >= 1


async def _wait_health(client: httpx.AsyncClient, status: int) -> str:
    while True:
        response = await client.get("/healthz")
        if response.status_code == status:
            return response.text
        await trio.sleep(0.05)


async def _publish_when_back(client: httpx.AsyncClient, topic: str, data: str) -> list[str]:
    while True:
        response = await client.post(f"/streams/{topic}", json={"data": data})
        if response.status_code == 202:
            ids: list[str] = response.json()["ids"]
            return ids
        assert response.status_code == 503, response.text
        await trio.sleep(0.05)


async def test_redis_log_limits_bytes_and_expires(redis: RedisServer) -> None:
    """In-process: the byte limit fails closed, and the TTL frees room again."""
    backend = RedisBackend(redis.url, prefix="test:")
    config = HubConfig(log_capacity=100, log_max_bytes=420, log_ttl=0.5, backend=backend)
    with trio.fail_after(10):
        async with open_hub(config) as hub:
            await wait_until(lambda: hub.health() is None)
            ids = await hub.submit("bytes", [Event(data="x" * 100)] * 3)
            with pytest.raises(trio.WouldBlock):
                await hub.submit("bytes", [Event(data="y" * 100)])
            assert hub.publish_retry_after("bytes") > 0
            await trio.sleep(0.6)
            later = await hub.submit("bytes", [Event(data="z" * 100)])
            log = hub.log("bytes")
            await wait_until(lambda: log.head >= 4)
            stats = hub.statistics()
    assert len(ids) == 3
    assert len(later) == 1
    assert [i.split("-")[1] for i in [*ids, *later]] == ["1", "2", "3", "4"]
    assert log.statistics().depth == 1  # the first three expired
    assert stats.publish_rejected == 1
    assert backend.errors == 0


async def test_redis_unreachable_publish_is_503_and_healthz_degraded(tmp_path: Path) -> None:
    """A server whose Redis never answers: 503 with Retry-After, degraded, counted."""
    from ._redis import free_port

    backend = f"redis://127.0.0.1:{free_port()}/0"
    with (
        cli_server("serve", ["--backend", backend], tmp_path / "err") as server,
        trio.fail_after(20),
    ):
        async with httpx.AsyncClient(base_url=server.url, timeout=20) as client:
            refused = await client.post("/streams/t", json={"data": "x"})
            health = await _wait_health(client, 503)
            errors = await metrics(client)
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.json() == {"error": "redis unavailable: nothing was published"}
    assert health == "degraded: redis unavailable"
    assert sample(errors, "trio_stream_backend_errors_total") >= 1


def _mirror_entry(seq: int, event_id: str) -> Entry:
    event = Event(data=str(seq))
    return Entry(
        seq=seq,
        id=event_id,
        event=event,
        wire=b"id: " + event_id.encode() + b"\n" + encode(event),
        published_at=trio.current_time(),
    )


async def test_redis_ring_maps_redis_ids_to_positions() -> None:
    """The mirror's ring: positions are the event numbers; gaps and strangers are told."""
    log = RedisLog("t")
    ring = log._ring
    ring.restart(4)  # events 1-4 expired before this process loaded the topic
    ring.extend([_mirror_entry(n, f"1000-{n}") for n in (5, 6, 7)])
    assert log.resolve("1000-6") == Resume(position=6)
    assert log.resolve("1000-7") == Resume(position=7)
    expired = log.resolve("900-2").gap
    assert expired is not None
    assert (expired.reason, expired.lost, expired.position) == ("expired", 2, 4)
    for stranger in ("1000-8", "5-6", "abc", "1000-06", "1000-", "-1", "\u0661-1"):
        gap = log.resolve(stranger).gap
        assert gap is not None, stranger
        assert gap.reason == "unknown", stranger
    assert log.id_of(6) == "1000-6"
    assert log.id_of(3) == "0-3"
    assert log.resolve("0-3").gap is not None
    with pytest.raises(ValueError, match="without a hole"):
        ring.extend([_mirror_entry(9, "1000-9")])
    assert ring.restart(9) == 3
    assert (ring.head, len(ring), ring.nbytes) == (9, 0, 0)


async def test_redis_websocket_stream_on_the_other_process(
    redis: RedisServer, tmp_path: Path
) -> None:
    """A WebSocket stream on B, resuming after an id A issued, gets A's events exactly."""
    from trio_stream import open_websocket_stream

    with two_servers(redis, tmp_path) as (a, b), trio.fail_after(20):
        async with http_client(a.url) as to_a:
            marker = await publish_many(to_a, "ws-topic", ["marker"])
            ids = await publish_many(to_a, "ws-topic", [f"w{i}" for i in range(20)])
            ws_url = b.url.replace("http://", "ws://") + "/streams/ws-topic"
            async with open_websocket_stream(ws_url, last_event_id=marker[0]) as events:
                got = []
                async for item in events:
                    assert isinstance(item, Event)
                    got.append(item.id)
                    if len(got) == 20:
                        break
    assert got == ids


# -- limits across processes ------------------------------------------------------------------


def event_times(readers: list[StreamReader]) -> list[float]:
    """When each event of *readers* arrived, in order."""
    pairs = (zip(r.blocks, r.times, strict=True) for r in readers)
    return sorted(t for blocks in pairs for block, t in blocks if block.is_event)


def busiest(times: list[float], window: float) -> int:
    """The most events that arrived within any *window* seconds."""
    most, j = 0, 0
    for i, start in enumerate(times):
        while j < len(times) and times[j] <= start + window:
            j += 1
        most = max(most, j - i)
    return most


async def test_redis_global_rate_holds_across_processes(redis: RedisServer, tmp_path: Path) -> None:
    """Global 100/s, burst 20, on two processes: four streams over both get at most
    100 * t + 20 events in any t seconds together (each process alone would allow 2x)."""
    options = ["--global-rate", "100", "--global-burst", "20"]
    with two_servers(redis, tmp_path, options) as (a, b), trio.fail_after(20):
        async with (
            http_client(a.url) as to_a,
            http_client(b.url) as to_b,
            trio.open_nursery() as nursery,
        ):
            readers = [
                await open_reader(nursery, c, "/streams/flood", headers={"X-Client-ID": f"c{i}"})
                for i, c in enumerate([to_a, to_b, to_a, to_b])
            ]
            await publish_many(to_a, "flood", [str(i) for i in range(800)])
            await trio.sleep(2.5)
            nursery.cancel_scope.cancel()
    times = event_times(readers)
    most = busiest(times, 2.0)
    assert most <= 100 * 2.0 + 20 + 20  # the limit, plus 10 % for the clocks of 2 sockets
    assert most >= 150  # and it does let events go
    assert all(r.events for r in readers)  # on both processes


async def test_redis_client_rate_holds_across_processes(redis: RedisServer, tmp_path: Path) -> None:
    """One client streaming from both processes: 50/s, burst 10 for both streams together."""
    options = ["--rate", "50", "--burst", "10"]
    who = {"X-Client-ID": "twin"}
    with two_servers(redis, tmp_path, options) as (a, b), trio.fail_after(20):
        async with (
            http_client(a.url) as to_a,
            http_client(b.url) as to_b,
            trio.open_nursery() as nursery,
        ):
            on_a = await open_reader(nursery, to_a, "/streams/twin", headers=who)
            on_b = await open_reader(nursery, to_b, "/streams/twin", headers=who)
            await publish_many(to_a, "twin", [str(i) for i in range(400)])
            await trio.sleep(2.5)
            nursery.cancel_scope.cancel()
    most = busiest(event_times([on_a, on_b]), 2.0)
    assert most <= 50 * 2.0 + 10 + 10
    assert most >= 70
    assert on_a.events
    assert on_b.events


async def test_redis_shared_bucket_fails_closed_without_redis(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis does not answer: the bucket grants nothing, says when to look again, and
    counts the errors. (A listener that never answers: coredis is then left clean.)"""
    from trio_stream.backends import redis as module

    monkeypatch.setattr(module, "COMMAND_TIMEOUT", 0.05)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, _silent, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            backend = RedisBackend(f"redis://127.0.0.1:{port}/0")
            await nursery.start(backend.run, Hub(HubConfig(backend=backend)))
            bucket = backend.bucket("client:x", 100.0, 10)
            assert isinstance(bucket, SharedBucket)
            now = trio.current_time()
            first = bucket.ready_at(now)
            await trio.sleep(0.4)
            later = trio.current_time()
            available, ready = bucket.available(later), bucket.ready_at(later)
            nursery.cancel_scope.cancel()
    assert first > now
    assert available == 0
    assert ready > later
    assert backend.errors >= 2  # retried, with back-off
    assert backend.problem() == "redis unavailable"


async def _silent(stream: trio.SocketStream) -> None:
    """A peer that reads everything and never answers."""
    async with stream:
        while await stream.receive_some():
            pass


# -- acks on any process ----------------------------------------------------------------------


async def test_redis_acks_posted_to_the_other_process_keep_the_stream_flowing(
    redis: RedisServer, tmp_path: Path
) -> None:
    """An ack-mode stream on A whose acks all go to B: each ack releases the next window."""
    who = {"X-Client-ID": "acker"}
    with two_servers(redis, tmp_path) as (a, b), trio.fail_after(20):
        async with (
            http_client(a.url) as to_a,
            httpx.AsyncClient(base_url=b.url, timeout=20) as to_b,
            trio.open_nursery() as nursery,
        ):
            reader = await open_reader(nursery, to_a, "/streams/acked?ack=5", headers=who)
            ids = await publish_many(to_a, "acked", [str(i) for i in range(20)])
            statuses = []
            for window in range(1, 4):
                await reader.wait_events(5 * window)
                await trio.sleep(0.2)  # no more than the window comes without an ack
                assert len(reader.events) == 5 * window
                last = reader.events[-1].id
                body = {"client_id": "acker", "last_event_id": last, "buffer_utilization": 0.5}
                response = await to_b.post("/streams/acked/ack", json=body)
                statuses.append(response.status_code)
            events = await reader.wait_events(20)
            malformed = await to_b.post(
                "/streams/acked/ack", json={"client_id": "acker", "last_event_id": "bogus"}
            )
            stranger = await to_b.post(
                "/streams/acked/ack", json={"client_id": "nobody", "last_event_id": ids[0]}
            )
            other_topic = await to_b.post(
                "/streams/elsewhere/ack", json={"client_id": "acker", "last_event_id": ids[0]}
            )
            nursery.cancel_scope.cancel()
    assert statuses == [204, 204, 204]
    assert [e.id for e in events] == ids
    assert malformed.status_code == 400
    assert stranger.status_code == 404
    assert stranger.json()["error"] == "unknown client 'nobody'"
    assert other_topic.status_code == 204  # forwarded; A ignores it (A would answer 409)


async def test_redis_streaming_clients_stay_announced_while_they_stream(
    redis: RedisServer,
) -> None:
    """The announcement that routes acks outlives ``client_ttl`` while the stream lasts,
    and lapses after; then acks for the client are no longer forwarded."""
    backend = RedisBackend(redis.url, prefix="who:")
    key = "who:client:walker"
    with trio.fail_after(10):
        async with open_hub(HubConfig(backend=backend, client_ttl=0.6)) as hub:
            await wait_until(lambda: hub.health() is None)
            with hub.connect("t", client_id="walker"):
                await trio.sleep(1.5)  # 2.5 times client_ttl
                held = await backend.client.exists([key])
            await trio.sleep(0.6 + 0.2 + 0.1)  # the last renewal lapses
            gone = await backend.client.exists([key])
            forwarded = await backend.forward_ack("t", client_id="walker", last_event_id="1-1")
    assert held == 1
    assert gone == 0
    assert forwarded is False


# -- tracing ----------------------------------------------------------------------------------


async def test_redis_publish_makes_a_publish_span(redis: RedisServer) -> None:
    """A publish to Redis gets its span, from the request to Redis's answer; a refused
    one too, saying why."""
    from tests.runtime.test_observability import FakeTracer

    tracer = FakeTracer()
    backend = RedisBackend(redis.url, prefix="trace:")
    with trio.fail_after(10):
        async with open_hub(HubConfig(backend=backend, tracer=tracer, log_capacity=2)) as hub:
            await wait_until(lambda: hub.health() is None)
            ids = await hub.submit("traced", [Event(data="a"), Event(data="b")])
            with pytest.raises(trio.WouldBlock):
                await hub.submit("traced", [Event(data="c")])
    span, refused = [s for s in tracer.spans if s.name == "trio_stream.publish"]
    assert refused.attributes == {
        "messaging.destination.name": "traced",
        "messaging.batch.message_count": 1,
        "error.type": "WouldBlock",
    }
    assert refused.end_time is not None
    assert span.attributes == {
        "messaging.destination.name": "traced",
        "messaging.batch.message_count": 2,
        "trio_stream.first_event_id": ids[0],
        "trio_stream.last_event_id": ids[1],
    }
    assert span.start_time is not None
    assert span.end_time is not None
    assert span.end_time >= span.start_time


async def test_redis_delivery_spans_link_to_the_publish_span_of_another_process(
    redis: RedisServer,
) -> None:
    """Publish on hub A, deliver (write and ack) on hub B, two backends on one
    redis-server: each of B's delivery spans links to A's publish span, by its ids."""
    from tests.runtime.test_observability import FakeTracer

    tracer_a, tracer_b = FakeTracer(), FakeTracer()
    sink = RecordingSink()
    with trio.fail_after(10):
        async with (
            open_hub(HubConfig(backend=RedisBackend(redis.url), tracer=tracer_a)) as a,
            open_hub(HubConfig(backend=RedisBackend(redis.url), tracer=tracer_b, rate=0)) as b,
            trio.open_nursery() as nursery,
        ):
            await wait_until(lambda: a.health() is None and b.health() is None)
            nursery.start_soon(b.connect("traced", client_id="c", ack=10).run, sink)
            await wait_until(lambda: b.log("traced").ready)
            ids = await a.submit("traced", [Event(data="a"), Event(data="b")])
            await wait_until(lambda: sink.ids == ids)
            b.ack("traced", client_id="c", last_event_id=ids[-1])
            nursery.cancel_scope.cancel()
    (publish,) = tracer_a.spans
    assert publish.name == "trio_stream.publish"
    assert publish.attributes["trio_stream.last_event_id"] == ids[-1]
    assert [s.name for s in tracer_b.spans] == ["trio_stream.write"] * 2 + ["trio_stream.ack"] * 2
    assert [s.attributes["messaging.message.id"] for s in tracer_b.spans] == ids + ids
    for span in tracer_b.spans:
        (link,) = span.linked_to()
        assert (link.trace_id, link.span_id) == (publish.context.trace_id, publish.context.span_id)
        assert link.trace_flags == publish.context.trace_flags
        assert link.is_remote


async def test_redis_delivery_spans_without_a_readable_context_have_no_link(
    redis: RedisServer,
) -> None:
    """Events published without tracing, or with a malformed context: delivered, traced
    without a link, and no tracing error."""
    from tests.runtime.test_observability import FakeTracer

    tracer = FakeTracer()
    sink = RecordingSink()
    with trio.fail_after(10):
        async with (
            open_hub(HubConfig(backend=RedisBackend(redis.url))) as a,
            open_hub(HubConfig(backend=RedisBackend(redis.url), tracer=tracer, rate=0)) as b,
            trio.open_nursery() as nursery,
        ):
            await wait_until(lambda: a.health() is None and b.health() is None)
            nursery.start_soon(b.connect("untraced", client_id="c").run, sink)
            await wait_until(lambda: b.log("untraced").ready)
            ids = await a.submit("untraced", [Event(data="plain")])
            ids += await a.log("untraced").submit([Event(data="odd")], trace_context="00-zz-1")
            await wait_until(lambda: sink.ids == ids)
            stream = await b.config.backend.client.xrange(  # type: ignore[union-attr]
                "trio_stream:{untraced}:log", "-", "+"
            )
            nursery.cancel_scope.cancel()
    assert [s.name for s in tracer.spans] == ["trio_stream.write"] * 2
    assert [s.links for s in tracer.spans] == [None, None]
    assert b.tracing is not None
    assert b.tracing.errors == 0
    assert [b"t" in item.field_values for item in stream] == [False, True]


# -- publishes without an answer --------------------------------------------------------------


_BUSY = """
local t = redis.call('TIME')
local start = t[1] * 1000000 + t[2]
repeat
  t = redis.call('TIME')
until t[1] * 1000000 + t[2] - start >= tonumber(ARGV[1])
return 1
"""


async def _block_redis(port: int, seconds: float) -> None:
    """Keep redis-server busy (a script spinning for *seconds*), from its own connection."""
    micros = str(round(seconds * 1e6))
    parts = ["EVAL", _BUSY, "0", micros]
    command = f"*{len(parts)}\r\n" + "".join(f"${len(p.encode())}\r\n{p}\r\n" for p in parts)
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(command.encode())
        assert await stream.receive_some() == b":1\r\n"


async def _submit_losing_the_answer(
    hub: Hub,
    redis: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    topic: str,
    *,
    idempotency_key: str | None = None,
) -> BackendUnavailableError:
    """Submit the event ``second`` to *topic* while Redis answers only after the timeout
    (it runs the publish, its answer comes too late); the error it raised."""
    from trio_stream.backends import redis as module

    await wait_until(lambda: hub.health() is None)
    await hub.submit(topic, [Event(data="first")])  # a connection to reuse
    monkeypatch.setattr(module, "COMMAND_TIMEOUT", 0.2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_block_redis, redis.port, 0.6)
        await trio.sleep(0.1)
        with pytest.raises(BackendUnavailableError) as caught:
            await hub.submit(topic, [Event(data="second")], idempotency_key=idempotency_key)
    return caught.value


async def test_redis_publish_without_answer_says_it_may_have_published(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis runs the publish but answers after the timeout: the error says the outcome
    is unknown (and indeed the events were published), not that nothing was."""
    backend = RedisBackend(redis.url, prefix="slow:")
    with trio.fail_after(10):
        async with open_hub(HubConfig(backend=backend)) as hub:
            caught = await _submit_losing_the_answer(hub, redis, monkeypatch, "slow")
            log = hub.log("slow")
            await wait_until(lambda: log.head >= 2)
            entry = log.entry(2)
    assert caught.maybe_published
    assert "may or may not have been published" in str(caught)
    assert entry is not None
    assert entry.event.data == "second"


# -- idempotency keys -------------------------------------------------------------------------


async def test_redis_idempotent_retry_on_the_other_process_returns_the_same_ids(
    redis: RedisServer, tmp_path: Path
) -> None:
    """A publish with a key on A, its retry on B: B answers A's ids, replayed, and a
    stream (on B) sees the events once; other events with the key are a 422 on either."""
    batch = [{"data": "a"}, {"event": "tick", "data": "b"}]
    headers = {"Idempotency-Key": "order-7"}
    with two_servers(redis, tmp_path) as (a, b), trio.fail_after(20):
        async with (
            http_client(a.url) as to_a,
            http_client(b.url) as to_b,
            trio.open_nursery() as nursery,
        ):
            reader = await open_reader(nursery, to_b, "/streams/orders")
            first = await to_a.post("/streams/orders", json=batch, headers=headers)
            retry = await to_b.post("/streams/orders", json=batch, headers=headers)
            other = await to_b.post("/streams/orders", json={"data": "c"}, headers=headers)
            marker = await publish(to_a, "orders", {"data": "after"})
            events = await reader.wait_events(3)
            samples = await metrics(to_b)
            nursery.cancel_scope.cancel()
    assert first.status_code == 202
    assert "idempotent-replayed" not in first.headers
    assert retry.status_code == 202
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.json() == first.json()
    assert other.status_code == 422
    assert [e.id for e in events] == [*first.json()["ids"], *marker]
    assert [e.data for e in events] == ["a", "b", "after"]
    assert sample(samples, "trio_stream_publish_replayed_total") == 1


async def test_redis_concurrent_same_key_publishes_on_both_processes_append_once(
    redis: RedisServer, tmp_path: Path
) -> None:
    """For each of 30 keys, A and B get the same publish at once: one appends, the
    other answers its ids; the log holds each event once."""
    keys = [f"k{i}" for i in range(30)]
    answers: dict[str, list[httpx.Response]] = {key: [] for key in keys}
    with two_servers(redis, tmp_path) as (a, b), trio.fail_after(30):
        async with http_client(a.url) as to_a, http_client(b.url) as to_b:

            async def post(client: httpx.AsyncClient, key: str) -> None:
                response = await client.post(
                    "/streams/race", json={"data": key}, headers={"Idempotency-Key": key}
                )
                answers[key].append(response)

            async with trio.open_nursery() as nursery:
                for key in keys:
                    nursery.start_soon(post, to_a, key)
                    nursery.start_soon(post, to_b, key)
            poll = await to_a.get("/streams/race/poll", params={"limit": "1000"})
    for key in keys:
        one, two = answers[key]
        assert one.status_code == two.status_code == 202
        assert one.json() == two.json()
        replayed = sorted(r.headers.get("idempotent-replayed", "") for r in (one, two))
        assert replayed == ["", "true"], key
    polled = poll.json()["events"]
    assert sorted(e["data"] for e in polled) == sorted(keys)
    assert {e["id"] for e in polled} == {answers[key][0].json()["ids"][0] for key in keys}


async def test_redis_idempotency_key_expires_with_the_log_ttl(redis: RedisServer) -> None:
    """In-process: the key is a Redis key in the topic's hash slot, with a PX of the
    TTL; a refused publish sets none; after the TTL the key publishes again."""
    backend = RedisBackend(redis.url, prefix="idem:")
    config = HubConfig(backend=backend, log_ttl=0.5, log_capacity=2)
    with trio.fail_after(10):
        async with open_hub(config) as hub:
            await wait_until(lambda: hub.health() is None)
            first = await hub.submit("t", [Event(data="a")], idempotency_key="k")
            ttl_ms = await backend.client.pttl("idem:{t}:idem:k")
            again = await hub.submit("t", [Event(data="a")], idempotency_key="k")
            with pytest.raises(IdempotencyKeyReusedError):
                await hub.submit("t", [Event(data="b")], idempotency_key="k")
            await hub.submit("t", [Event(data="filler")])
            with pytest.raises(trio.WouldBlock):
                await hub.submit("t", [Event(data="c")], idempotency_key="refused")
            refused_key = await backend.client.exists(["idem:{t}:idem:refused"])
            await trio.sleep(0.6)
            gone = await backend.client.exists(["idem:{t}:idem:k"])
            later = await hub.submit("t", [Event(data="a")], idempotency_key="k")
    assert 0 < ttl_ms <= 500
    assert not first.replayed
    assert again.replayed
    assert again == first
    assert refused_key == 0
    assert gone == 0
    assert not later.replayed
    assert later != first
    assert hub.publish_replayed == 1


async def test_redis_retry_after_a_lost_answer_publishes_once(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The case keys are for: Redis publishes but its answer comes too late
    (``maybe_published``); the retry with the same key gets the ids, publishing nothing."""
    from trio_stream.backends import redis as module

    backend = RedisBackend(redis.url, prefix="lost:")
    with trio.fail_after(10):
        async with open_hub(HubConfig(backend=backend)) as hub:
            caught = await _submit_losing_the_answer(
                hub, redis, monkeypatch, "lost", idempotency_key="k"
            )
            monkeypatch.setattr(module, "COMMAND_TIMEOUT", 5.0)
            retry = await hub.publish("lost", [Event(data="second")], idempotency_key="k")
            log = hub.log("lost")
            await wait_until(lambda: log.head >= 2)
            await trio.sleep(0.2)  # anything more would have come by now
            head = log.head
            entry = log.entry(2)
    assert caught.maybe_published
    assert retry.replayed
    assert entry is not None
    assert retry == [entry.id]
    assert head == 2
