"""Streams of several topics under a virtual clock: order, ids, resume, limits, acks, pauses."""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import pytest
import trio
import trio.testing

from trio_stream import (
    ClientPausedError,
    Event,
    Gap,
    Hub,
    HubConfig,
    LimitExceededError,
    LocalProtocolError,
    NotSentError,
    UnknownClientError,
)
from trio_stream._several import Delivery, topic_set
from trio_stream.testing import RecordingSink

if TYPE_CHECKING:
    from collections.abc import Sequence

    from trio_stream import Connection, Entry


def config(**overrides: object) -> HubConfig:
    base: dict[str, object] = {"rate": 0, "burst": 1, "heartbeat_interval": 1000.0}
    base.update(overrides)
    return HubConfig(**base)  # type: ignore[arg-type]


@attrs.define(eq=False)
class TopicSink(RecordingSink):
    """Records ``(topic, data)`` of each event, and its id, besides what `RecordingSink` does."""

    got: list[tuple[str, str]] = attrs.field(factory=list)
    wires: list[bytes] = attrs.field(factory=list)
    resets: list[Gap] = attrs.field(factory=list)

    async def send_events(self, entries: Sequence[Entry]) -> None:
        await super().send_events(entries)
        for entry in entries:
            assert isinstance(entry, Delivery)
            self.got.append((entry.topic, entry.event.data))
            self.wires.append(entry.wire)

    async def send_reset(self, gap: Gap) -> None:
        await super().send_reset(gap)
        self.resets.append(gap)


async def start(nursery: trio.Nursery, conn: Connection, sink: RecordingSink) -> None:
    nursery.start_soon(conn.run, sink)
    await trio.testing.wait_all_tasks_blocked()


def publish(hub: Hub, topic: str, *data: str, name: str | None = None) -> list[tuple[str, str]]:
    hub.publish_nowait(topic, [Event(data=d, event=name) for d in data])
    return [(topic, d) for d in data]


def per_topic(got: Sequence[tuple[str, str]], topic: str) -> list[str]:
    return [data for t, data in got if t == topic]


# -- topics and ids -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topics", "problem"),
    [
        ([], "1 to 16"),
        ([f"t{i}" for i in range(17)], "1 to 16"),
        (["a", "b", "a"], "repeat"),
        (["a", "b/c"], "invalid topic"),
        (["a", ""], "invalid topic"),
    ],
)
def test_topic_sets_are_checked(topics: list[str], problem: str) -> None:
    with pytest.raises(LocalProtocolError, match=problem):
        topic_set(topics)


def test_topic_sets_are_sorted() -> None:
    assert topic_set(["b", "c", "a"]) == ("a", "b", "c")
    assert topic_set([f"t{i:02}" for i in range(16)])[-1] == "t15"


async def test_events_interleave_in_acceptance_order_with_topic_names(
    autojump_clock: object,
) -> None:
    hub = Hub(config())
    sink = TopicSink(write_delay=0.01)  # later events pile up: merged batches
    async with trio.open_nursery() as nursery:
        conn = hub.connect_many(["b", "a", "c"], client_id="x")
        await start(nursery, conn, sink)
        sent = publish(hub, "a", "a1")
        await trio.testing.wait_all_tasks_blocked()
        sent += publish(hub, "b", "b1", name="tick")
        sent += publish(hub, "c", "c1", "c2")
        sent += publish(hub, "a", "a2")
        sent += publish(hub, "b", "b2\nmore")
        hub.publish_nowait("other", [Event(data="not streamed")])
        await trio.sleep(1)
        assert sink.got == sent
        assert len(sink.writes) <= 3  # what piled up went in few writes
        named = sink.wires[1].decode()
        assert named.startswith(f"id: {sink.ids[1]}\nevent: b/tick\ndata: b1\n\n")
        assert sink.wires[-1].endswith(b"event: b\ndata: b2\ndata: more\n\n")
        assert len(set(sink.ids)) == len(sent)
        nursery.cancel_scope.cancel()
    assert hub.connections == 0
    assert hub.statistics().sent == len(sent)


async def test_composite_ids_resume_every_topic_exactly(autojump_clock: object) -> None:
    """Cut the stream after each event in turn: the rest arrives, none twice."""
    topics = ["a", "b", "c"]
    hub = Hub(config(max_batch=4))
    async with trio.open_nursery() as nursery:
        sink = TopicSink()
        first = hub.connect_many(topics, client_id="x")
        await start(nursery, first, sink)
        sent: list[tuple[str, str]] = []
        for i in range(12):
            sent += publish(hub, topics[(i * 7) % 3], f"e{i}")
        await trio.sleep(1)
        assert sink.got == sent
        first.close()
        await trio.sleep(1)
        # published while nobody streams, interleaved with the topics' earlier events
        for i in range(12, 20):
            sent += publish(hub, topics[i % 3], f"e{i}")
        for cut, last_id in enumerate(sink.ids):
            again = TopicSink()
            conn = hub.connect_many(list(reversed(topics)), client_id="x", last_event_id=last_id)
            await start(nursery, conn, again)
            await trio.sleep(1)
            assert again.got == sent[cut + 1 :], f"resumed after event {cut}"
            assert not again.resets
            conn.close()
            await trio.sleep(0.1)
        nursery.cancel_scope.cancel()


async def test_an_expired_topic_resets_alone(autojump_clock: object) -> None:
    hub = Hub(config(log_ttl=10.0))
    async with trio.open_nursery() as nursery:
        sink = TopicSink()
        conn = hub.connect_many(["a", "b"], client_id="x")
        await start(nursery, conn, sink)
        publish(hub, "a", "a1")
        publish(hub, "b", "b1")
        await trio.sleep(1)
        cursor = sink.ids[-1]
        conn.close()
        publish(hub, "a", "a2", "a3")  # will expire
        await trio.sleep(5)
        publish(hub, "b", "b2")  # still retained
        await trio.sleep(6)
        publish(hub, "a", "a4")
        again = TopicSink()
        await start(
            nursery, hub.connect_many(["a", "b"], client_id="x", last_event_id=cursor), again
        )
        await trio.sleep(1)
        assert [(g.topic, g.reason, g.lost, g.last_event_id) for g in again.resets] == [
            ("a", "expired", 2, cursor)
        ]
        assert again.got == [("b", "b2"), ("a", "a4")]
        assert hub.statistics().dropped == 2
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("bad", ["nonsense", "0000000a~x-000000000001", "a-000000000001"])
async def test_a_foreign_or_malformed_id_resets_every_topic(
    autojump_clock: object, bad: str
) -> None:
    hub = Hub(config())
    publish(hub, "a", "a1")
    publish(hub, "b", "b1")
    async with trio.open_nursery() as nursery:
        sink = TopicSink()
        await start(nursery, hub.connect_many(["a", "b"], client_id="x", last_event_id=bad), sink)
        await trio.sleep(1)
        assert [(g.topic, g.reason, g.last_event_id) for g in sink.resets] == [
            ("a", "unknown", bad),
            ("b", "unknown", bad),
        ]
        assert sink.got == [("a", "a1"), ("b", "b1")]  # from the oldest retained
        nursery.cancel_scope.cancel()


# -- limits, acks, pauses -------------------------------------------------------------


async def test_the_rate_limit_holds_for_the_stream_as_a_whole(autojump_clock: object) -> None:
    hub = Hub(config(rate=10, burst=5))
    sink = TopicSink()
    async with trio.open_nursery() as nursery:
        await start(nursery, hub.connect_many(["a", "b"], client_id="x"), sink)
        begin = trio.current_time()
        sent = publish(hub, "a", *[f"a{i}" for i in range(8)])
        sent += publish(hub, "b", *[f"b{i}" for i in range(7)])
        await trio.sleep(3)
        times = [round(w.at - begin, 6) for w in sink.writes for _ in w.ids]
        assert times[:5] == [0.0] * 5
        assert times[5:] == [pytest.approx(0.1 * k) for k in range(1, 11)]
        assert sink.got == sent
        nursery.cancel_scope.cancel()


async def test_a_stream_of_several_counts_once_per_client(autojump_clock: object) -> None:
    hub = Hub(config(max_streams_per_client=2))
    first = hub.connect_many(["a", "b", "c"], client_id="x")
    second = hub.connect("a", client_id="x")
    with pytest.raises(LimitExceededError):
        hub.connect_many(["d"], client_id="x")
    assert hub.connections == 2
    first.close()
    second.close()
    assert hub.connections == 0
    assert hub.statistics().topics == 3


async def test_the_ack_window_counts_events_of_every_topic(autojump_clock: object) -> None:
    hub = Hub(config())
    sink = TopicSink()
    async with trio.open_nursery() as nursery:
        conn = hub.connect_many(["a", "b"], client_id="x", ack=3)
        await start(nursery, conn, sink)
        sent: list[tuple[str, str]] = []
        for i in range(4):
            sent += publish(hub, "a", f"a{i}")
            sent += publish(hub, "b", f"b{i}")
        await trio.sleep(5)
        assert sink.got == sent[:3]
        assert conn.statistics().credits == 0
        hub.ack_many(client_id="x", last_event_id=sink.ids[1], buffer_utilization=0.5)
        await trio.sleep(1)
        assert sink.got == sent[:5]
        hub.ack_many(client_id="x", last_event_id=sink.ids[0])  # old: changes nothing
        await trio.sleep(1)
        assert sink.got == sent[:5]
        hub.ack_many(client_id="x", last_event_id=sink.ids[4])
        await trio.sleep(1)
        assert sink.got == sent[:8]
        assert hub.buffer_utilization.count == 1
        # an ack of one topic alone does not count for the stream
        nursery.cancel_scope.cancel()


async def test_ack_errors_for_streams_of_several(autojump_clock: object) -> None:
    hub = Hub(config())
    sink = TopicSink()
    async with trio.open_nursery() as nursery:
        await start(nursery, hub.connect_many(["a", "b"], client_id="x", ack=10), sink)
        publish(hub, "a", "a1")
        await trio.sleep(1)
        good = sink.ids[0]
        with pytest.raises(UnknownClientError):
            hub.ack_many(client_id="nobody", last_event_id=good)
        with pytest.raises(ValueError, match="malformed"):
            hub.ack_many(client_id="x", last_event_id="no tilde")
        with pytest.raises(NotSentError):  # a stream of other topics
            hub.ack_many(client_id="x", last_event_id="0badf00d~x-000000000001")
        ahead = good.replace("-000000000001~", "-000000000009~")
        with pytest.raises(NotSentError):
            hub.ack_many(client_id="x", last_event_id=ahead)
        with pytest.raises(ValueError, match="buffer_utilization"):
            hub.ack_many(client_id="x", last_event_id=good, buffer_utilization=1.5)
        hub.ack_many(client_id="x", last_event_id=good)
        assert hub.topics_of("x", good) == ("a", "b")
        nursery.cancel_scope.cancel()


async def test_one_lagging_topic_pauses_the_stream_then_poll_and_resume(
    autojump_clock: object,
) -> None:
    hub = Hub(config(lag_limit=10, rate=100, burst=100))
    sink = TopicSink(write_delay=1.0)  # one write a second
    async with trio.open_nursery() as nursery:
        conn = hub.connect_many(["a", "b"], client_id="x")
        await start(nursery, conn, sink)
        sent = publish(hub, "a", "a0")
        await trio.sleep(0.5)  # that write is in progress
        sent += publish(hub, "b", *[f"b{i}" for i in range(30)])
        sent += publish(hub, "a", "a1")
        await trio.sleep(5)
        assert conn.state == "paused"
        assert sink.kinds()[-1] == "pause"
        assert sink.paused_topic == "b"
        after = sink.writes[-1].detail
        assert after == sink.ids[-1]
        with pytest.raises(ClientPausedError) as info:
            hub.connect_many(["b", "a"], client_id="x")
        assert info.value.after == after
        assert info.value.topic == "a,b"
        hub.connect("a", client_id="x").close()  # other streams are not paused
        polled: list[tuple[str, str]] = []
        result = hub.poll_many(["a", "b"], client_id="x", after=after, limit=10)
        while True:
            polled += [(e.topic, e.event.data) for e in result.events if isinstance(e, Delivery)]
            if result.resume_stream:
                break
            result = hub.poll_many(["a", "b"], client_id="x", after=result.last_event_id)
        assert sink.got + polled == sent
        assert all(isinstance(e, Delivery) for e in result.events)
        conn2 = hub.connect_many(["a", "b"], client_id="x", last_event_id=result.last_event_id)
        sink2 = TopicSink()
        await start(nursery, conn2, sink2)
        sent += publish(hub, "a", "a2")
        await trio.sleep(1)
        assert sink.got + polled + sink2.got == sent
        nursery.cancel_scope.cancel()


async def test_poll_many_without_after_starts_at_the_oldest_and_within_the_rate(
    autojump_clock: object,
) -> None:
    hub = Hub(config(rate=1, burst=3))
    sent = publish(hub, "b", "b0")
    sent += publish(hub, "a", "a0", "a1")
    sent += publish(hub, "b", "b1")
    result = hub.poll_many(["a", "b"], client_id="x", after=None, limit=100)
    assert [(e.topic, e.event.data) for e in result.events if isinstance(e, Delivery)] == sent[:3]
    assert not result.reset
    empty = hub.poll_many(["a", "b"], client_id="y", after="garbage", limit=1)
    assert empty.reset
    assert empty.last_event_id is not None
