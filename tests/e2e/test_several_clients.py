"""Several topics on one stream, from the clients' side: the Python clients against the
real server (hypercorn on 127.0.0.1, real sockets, the real clock).

Publishing goes straight into the hub (`Hub.publish_nowait`): each call is accepted at
once, in call order, which is the order the contract says a stream of several topics
interleaves its events in. So the tests know exactly what each client must hand out:
every event once, in that order, each with its topic and its own name.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import pytest
import trio

from trio_stream._client import StreamReset, open_event_stream
from trio_stream._core._events import Event
from trio_stream._ws_client import open_websocket_stream

from ._faultproxy import Faults, open_fault_proxy
from ._support import http_client, wait_until
from .conftest import open_server

if TYPE_CHECKING:
    from collections.abc import Sequence

    from trio_stream._client import EventStream
    from trio_stream._hub import Hub

    from .conftest import Server

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

DEADLINE = 10.0

# (topic, name, data): what a caller should see of an event.
Seen = tuple[str | None, str | None, str]


def seen(events: Sequence[Event]) -> list[Seen]:
    return [(event.topic, event.event, event.data) for event in events]


def per_topic(items: Sequence[Seen]) -> dict[str | None, list[str]]:
    """The data of each topic's events, in order."""
    topics: dict[str | None, list[str]] = {}
    for topic, _, data in items:
        topics.setdefault(topic, []).append(data)
    return topics


def publish_one_by_one(hub: Hub, items: Sequence[Seen]) -> None:
    """Publish each event on its own, in order: that is the order of acceptance."""
    for topic, name, data in items:
        assert topic is not None
        hub.publish_nowait(topic, [Event(data=data, event=name)])


def interleaved(rng: random.Random, topics: Sequence[str], phase: str, count: int) -> list[Seen]:
    """*count* events spread at random over *topics*, one in three named ``tick``."""
    return [
        (rng.choice(topics), "tick" if i % 3 == 0 else None, f"{phase}-{i}") for i in range(count)
    ]


async def collect(events: EventStream, into: list[Event]) -> None:
    """Append every event of *events* to *into* (a reset fails the test)."""
    async for item in events:
        assert not isinstance(item, StreamReset), item
        into.append(item)


async def wait_for_count(got: Sequence[Event], count: int) -> None:
    """Wait until *got* holds *count* events (bound it with ``fail_after``)."""
    await wait_until(lambda: len(got) >= count)


def assert_exactly(got: Sequence[Event], published: Sequence[Seen]) -> None:
    """Each topic's events once and in order, with their topics and names; and across
    topics, the order of acceptance."""
    assert per_topic(seen(got)) == per_topic(published)
    assert seen(got) == list(published)
    ids = [event.id for event in got]
    assert None not in ids
    assert len(set(ids)) == len(ids)


# -- the SSE client -----------------------------------------------------------------------


async def test_client_resumes_three_topics_across_a_severed_connection() -> None:
    """The connection is reset in the middle of an event; events of the three topics are
    published while there is none; the client resumes with the composite id."""
    rng = random.Random(8)
    topics = ("c", "a", "b")
    faults = Faults(cut="reset", cut_after=1500, cuts=1)  # ~ a dozen events in
    got: list[Event] = []
    published: list[Seen] = []
    async with (
        open_server(hub={"retry_ms": 300}) as server,
        open_fault_proxy(server.url, faults) as proxy,
    ):
        hub = server.app.hub
        url = f"{proxy.url}/streams?topic=c&topic=a&topic=b"
        with trio.fail_after(DEADLINE):
            async with (
                open_event_stream(url, client_id="three", retry_jitter=0.0) as events,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(collect, events, got)
                await wait_until(lambda: events.statistics().connections == 1)
                before = interleaved(rng, topics, "before", 40)
                published += before
                publish_one_by_one(hub, before)

                # Cut mid-event; the client waits out `retry: 300` before reconnecting.
                await wait_until(lambda: events.statistics().state == "connecting")
                assert proxy.statistics.cuts_mid_event == 1
                received_at_cut = len(got)
                assert 0 < received_at_cut < len(before), "the cut was not mid-way"
                assert events.statistics().connections == 1
                severed = interleaved(rng, topics, "severed", 40)
                published += severed
                publish_one_by_one(hub, severed)  # no await: all before the reconnection

                await wait_until(lambda: events.statistics().connections == 2)
                after = interleaved(rng, topics, "after", 20)
                published += after
                publish_one_by_one(hub, after)
                await wait_until(lambda: len(got) >= len(published))
                await trio.sleep(0.2)  # nothing more may come
                nursery.cancel_scope.cancel()
            stats = events.statistics()

    assert_exactly(got, published)
    assert {event.topic for event in got[received_at_cut:]} == set(topics)
    assert stats.connections == 2
    assert stats.resets == 0
    assert stats.last_event_id == got[-1].id


async def test_client_in_ack_mode_polls_through_a_pause_on_one_lagging_topic() -> None:
    """One topic bursts six times the lag limit past an ack-mode client while the other
    stays quiet: the stream is paused, polled (events of both topics, with their topics)
    and resumed, with neither a gap nor a repeat on either topic."""
    options = {"lag_limit": 10, "rate": 500.0, "burst": 50, "poll_interval": 0.05, "retry_ms": 100}
    got: list[Event] = []
    async with open_server(hub=options) as server:
        hub = server.app.hub
        url = f"{server.url}/streams?topic=quiet&topic=busy"
        with trio.fail_after(DEADLINE):
            async with (
                open_event_stream(
                    url, client_id="lagging", ack=4, ack_interval=0.01, retry_jitter=0.0
                ) as events,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(collect, events, got)
                await wait_until(lambda: events.statistics().connections == 1)
                published: list[Seen] = [("quiet", None, "q0"), ("busy", "tick", "b0")]
                publish_one_by_one(hub, published)
                await wait_until(lambda: len(got) == 2)

                burst: list[Seen] = [("busy", None, f"b{i}") for i in range(1, 61)]
                burst.insert(30, ("quiet", "note", "q1"))  # the quiet topic goes on meanwhile
                published += burst
                publish_one_by_one(hub, burst)
                await wait_until(lambda: events.statistics().pauses == 1)
                assert hub.client_statistics("lagging").paused_topics != ()

                # Polling catches up, then the client streams again.
                await wait_until(lambda: events.statistics().connections == 2)
                assert events.statistics().state == "streaming"
                assert hub.client_statistics("lagging").paused_topics == ()
                tail: list[Seen] = [("busy", None, "b61"), ("quiet", None, "q2")]
                published += tail
                publish_one_by_one(hub, tail)
                await wait_until(lambda: len(got) >= len(published))
                await trio.sleep(0.2)  # nothing more may come
                nursery.cancel_scope.cancel()
            stats = events.statistics()

    assert_exactly(got, published)
    assert stats.pauses == 1
    assert stats.polls >= 1
    assert stats.resets == 0
    assert stats.acks >= 1
    assert stats.last_acked_id is not None


async def test_limits_count_the_stream_of_several_topics_once() -> None:
    """One ack window over all of the stream's topics, one place in the stream count."""
    got: list[Event] = []
    async with open_server(hub={"max_streams_per_client": 1}) as server:
        hub = server.app.hub
        url = f"{server.url}/streams?topic=x&topic=y&topic=z"
        with trio.fail_after(DEADLINE):
            async with (
                open_event_stream(url, client_id="whole", ack=3, auto_ack=False) as events,
                trio.open_nursery() as nursery,
                http_client(server) as client,
            ):
                nursery.start_soon(collect, events, got)
                await wait_until(lambda: events.statistics().connections == 1)
                # Three topics on one stream fit in a limit of one stream per client...
                refused = await client.get("/streams/x", headers={"X-Client-ID": "whole"})
                assert refused.status_code == 429
                assert "retry-after" in refused.headers

                published = [(topic, None, f"{topic}{i}") for i in range(3) for topic in "xyz"]
                publish_one_by_one(hub, published)
                for done in (3, 6, 9):
                    # ...and a window of 3 holds for the stream, not for each topic.
                    await wait_for_count(got, done)
                    await trio.sleep(0.2)
                    assert len(got) == done
                    events.ack()
                nursery.cancel_scope.cancel()
            stats = events.statistics()

    assert_exactly(got, published)
    assert stats.acks >= 2
    assert stats.connections == 1


async def test_rate_limit_counts_the_stream_of_several_topics_once() -> None:
    """A bucket of 5 at 20 events/s for the client: 15 events over three topics take at
    least (15 - 5) / 20 = 0.5 s, not the 0.1 s a bucket per topic would allow."""
    got: list[Event] = []
    async with open_server(hub={"rate": 20.0, "burst": 5}) as server:
        hub = server.app.hub
        url = f"{server.url}/streams?topic=x&topic=y&topic=z"
        with trio.fail_after(DEADLINE):
            async with (
                open_event_stream(url, client_id="rated") as events,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(collect, events, got)
                await wait_until(lambda: events.statistics().connections == 1)
                published = [(topic, None, f"{topic}{i}") for i in range(5) for topic in "xyz"]
                started = trio.current_time()
                publish_one_by_one(hub, published)
                await wait_for_count(got, len(published))
                took = trio.current_time() - started
                nursery.cancel_scope.cancel()
    assert_exactly(got, published)
    assert took >= 0.45, took


# -- the WebSocket client -----------------------------------------------------------------


async def test_websocket_client_hands_out_topics_acks_in_band_and_resumes(
    server: Server,
) -> None:
    hub = server.app.hub
    rng = random.Random(3)
    url = "ws" + server.url.removeprefix("http") + "/streams?topic=p&topic=q"
    got: list[Event] = []
    with trio.fail_after(DEADLINE):
        async with (
            open_websocket_stream(url, client_id="ws", ack=2, ack_interval=0.01) as events,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(collect, events, got)
            await wait_until(lambda: events.statistics().connections == 1)
            first = interleaved(rng, ("p", "q"), "first", 12)
            publish_one_by_one(hub, first)
            # A window of 2 for twelve events: only acks let them all through.
            await wait_until(lambda: len(got) == len(first))
            nursery.cancel_scope.cancel()
        stats = events.statistics()
        assert_exactly(got, first)
        assert stats.acks >= 3

        # Published while no stream is open; the stream's last id resumes both topics.
        second = interleaved(rng, ("p", "q"), "second", 6)
        publish_one_by_one(hub, second)
        resumed: list[Event] = []
        async with open_websocket_stream(
            url, client_id="ws", last_event_id=stats.last_event_id
        ) as events:
            async for item in events:
                assert isinstance(item, Event)
                resumed.append(item)
                if len(resumed) == len(second):
                    break
    assert_exactly(resumed, second)


async def test_websocket_client_polls_through_a_pause_on_one_lagging_topic() -> None:
    options = {"lag_limit": 10, "rate": 500.0, "burst": 50, "poll_interval": 0.05}
    got: list[Event] = []
    async with open_server(hub=options) as server:
        hub = server.app.hub
        url = "ws" + server.url.removeprefix("http") + "/streams?topic=a&topic=b"
        with trio.fail_after(DEADLINE):
            async with (
                open_websocket_stream(
                    url, client_id="wsp", ack=4, ack_interval=0.01, retry_interval=0.05
                ) as events,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(collect, events, got)
                await wait_until(lambda: events.statistics().connections == 1)
                published: list[Seen] = [("b", None, f"b{i}") for i in range(40)]
                published.append(("a", "note", "a0"))
                publish_one_by_one(hub, published)
                await wait_until(lambda: events.statistics().connections == 2)
                tail: list[Seen] = [("a", None, "a1"), ("b", None, "b40")]
                published += tail
                publish_one_by_one(hub, tail)
                await wait_for_count(got, len(published))
                await trio.sleep(0.2)  # nothing more may come
                nursery.cancel_scope.cancel()
            stats = events.statistics()
    assert_exactly(got, published)
    assert stats.pauses == 1
    assert stats.polls >= 1


@pytest.mark.parametrize("transport", ["sse", "websocket"])
async def test_clients_surface_a_reset_on_each_topic(server: Server, transport: str) -> None:
    """A composite id the server cannot place: a `StreamReset` per topic, naming it."""
    hub = server.app.hub
    publish_one_by_one(hub, [("a", None, "a0"), ("b", "tick", "b0")])
    with trio.fail_after(DEADLINE):
        if transport == "sse":
            opened = open_event_stream(
                f"{server.url}/streams?topic=b&topic=a", last_event_id="not-a-cursor"
            )
        else:
            opened = open_websocket_stream(
                "ws" + server.url.removeprefix("http") + "/streams?topic=b&topic=a",
                last_event_id="not-a-cursor",
            )
        async with opened as events:
            items = [await events.__anext__() for _ in range(4)]
    assert items[:2] == [
        StreamReset(reason="unknown", last_event_id="not-a-cursor", topic="a"),
        StreamReset(reason="unknown", last_event_id="not-a-cursor", topic="b"),
    ]
    assert all(isinstance(item, Event) for item in items[2:])
    assert seen([item for item in items[2:] if isinstance(item, Event)]) == [
        ("a", None, "a0"),
        ("b", "tick", "b0"),
    ]
