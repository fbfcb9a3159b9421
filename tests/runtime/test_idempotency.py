"""Idempotency keys of publishes on the memory backend (the hub and `MemoryLog`)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_stream import (
    AlreadyPublished,
    Event,
    Hub,
    HubConfig,
    IdempotencyKeyReusedError,
    LocalProtocolError,
    MemoryLog,
    Published,
)
from trio_stream._core._idempotency import DIGEST_LENGTH, digest
from trio_stream._metrics import exposition
from trio_stream.testing import RecordingSink

TTL = 10.0


def events(*datas: str) -> list[Event]:
    return [Event(data=data) for data in datas]


def test_digest_is_of_names_and_data_in_order() -> None:
    assert len(digest(events("a"))) == DIGEST_LENGTH
    assert digest(events("a", "b")) == digest([Event(data="a"), Event(data="b", id="x")])
    assert digest(events("a", "b")) != digest(events("b", "a"))
    assert digest(events("a")) != digest([Event(data="a", event="a")])
    assert digest(events("ab")) != digest(events("a", "b"))
    assert digest(events("\ud800")) != digest(events("\ud801"))  # lone surrogates too


def test_published_is_the_list_of_ids() -> None:
    ids = Published(["a", "b"], replayed=True)
    assert ids == ["a", "b"]
    assert ids.replayed
    assert not Published(["a"]).replayed
    assert repr(ids) == "Published(['a', 'b'], replayed=True)"


async def test_hub_key_replays_within_the_ttl_then_is_forgotten(autojump_clock: object) -> None:
    hub = Hub(HubConfig(log_ttl=TTL))
    first = hub.publish_nowait("t", events("a", "b"), idempotency_key="k-1")
    await trio.sleep(TTL - 0.001)
    again = hub.publish_nowait("t", events("a", "b"), idempotency_key="k-1")
    replayed_async = await hub.publish("t", events("a", "b"), idempotency_key="k-1")
    submitted = await hub.submit("t", events("a", "b"), idempotency_key="k-1")
    log = hub.log("t")
    assert (log.head, hub.published, hub.publish_replayed) == (2, 2, 3)
    assert log.statistics().idempotency_keys == 1
    await trio.sleep(0.01)  # the events expire, and the key with them
    assert log.statistics().idempotency_keys == 0
    later = hub.publish_nowait("t", events("a", "b"), idempotency_key="k-1")
    assert not first.replayed
    assert again == replayed_async == submitted == first
    assert [again.replayed, replayed_async.replayed, submitted.replayed] == [True] * 3
    assert not later.replayed
    assert later != first
    assert log.head == 4
    assert b"trio_stream_publish_replayed_total 3.0" in exposition(hub)


async def test_hub_replay_delivers_nothing_more(autojump_clock: object) -> None:
    hub = Hub(HubConfig(rate=0))
    sink = RecordingSink()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.connect("t", client_id="c").run, sink)
        await trio.testing.wait_all_tasks_blocked()
        ids = hub.publish_nowait("t", events("x"), idempotency_key="once")
        hub.publish_nowait("t", events("x"), idempotency_key="once")
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert sink.ids == ids


async def test_hub_key_with_other_events_is_refused(autojump_clock: object) -> None:
    hub = Hub(HubConfig(log_ttl=TTL))
    hub.publish_nowait("t", events("a"), idempotency_key="k")
    with pytest.raises(IdempotencyKeyReusedError, match="'k'"):
        hub.publish_nowait("t", events("b"), idempotency_key="k")
    with pytest.raises(IdempotencyKeyReusedError):
        hub.publish_nowait("t", [Event(data="a", event="named")], idempotency_key="k")
    with pytest.raises(IdempotencyKeyReusedError):
        await hub.publish("t", events("a", "a"), idempotency_key="k")
    assert hub.log("t").head == 1
    assert hub.publish_replayed == 0


async def test_hub_keys_are_per_topic(autojump_clock: object) -> None:
    hub = Hub()
    on_t = hub.publish_nowait("t", events("a"), idempotency_key="k")
    on_u = hub.publish_nowait("u", events("b"), idempotency_key="k")  # other events: fine
    assert not on_u.replayed
    assert on_t != on_u
    assert hub.publish_nowait("t", events("a"), idempotency_key="k") == on_t


async def test_hub_refused_publish_remembers_nothing(autojump_clock: object) -> None:
    hub = Hub(HubConfig(log_capacity=1, log_ttl=TTL))
    hub.publish_nowait("t", events("filler"))
    with pytest.raises(trio.WouldBlock):
        hub.publish_nowait("t", events("b"), idempotency_key="k")
    with pytest.raises(LocalProtocolError):  # a bad event name: refused before the key
        hub.publish_nowait("t", [Event(data="c", event="x" * 129)], idempotency_key="k2")
    assert hub.log("t").statistics().idempotency_keys == 0
    await trio.sleep(TTL)
    accepted = hub.publish_nowait("t", events("c"), idempotency_key="k")  # k is free
    assert not accepted.replayed
    assert hub.log("t").head == 2


async def test_hub_replay_is_answered_even_when_the_log_is_full(autojump_clock: object) -> None:
    hub = Hub(HubConfig(log_capacity=1))
    ids = hub.publish_nowait("t", events("a"), idempotency_key="k")
    assert hub.publish_nowait("t", events("a"), idempotency_key="k") == ids


async def test_hub_empty_batch_is_not_remembered(autojump_clock: object) -> None:
    hub = Hub()
    assert hub.publish_nowait("t", [], idempotency_key="k") == []
    assert not hub.publish_nowait("t", events("a"), idempotency_key="k").replayed


@pytest.mark.parametrize(
    "key", ["", "x" * 129, "a b", "tab\there", "new\nline", "é", "\x7f", "nul\x00"]
)
async def test_hub_bad_keys_are_refused(key: str) -> None:
    hub = Hub()
    with pytest.raises(LocalProtocolError, match="idempotency key"):
        hub.publish_nowait("t", events("a"), idempotency_key=key)
    with pytest.raises(LocalProtocolError, match="idempotency key"):
        await hub.publish("t", events("a"), idempotency_key=key)
    assert hub.topics() == []  # refused before the topic was made


async def test_hub_visible_ascii_keys_are_accepted() -> None:
    hub = Hub()
    for key in ["x" * 128, "!", "~", '"quoted"', "a,b", "{brace}:idem:*"]:
        assert not hub.publish_nowait("t", events(key), idempotency_key=key).replayed
        assert hub.publish_nowait("t", events(key), idempotency_key=key).replayed


async def test_hub_waiting_publishes_with_one_key_publish_once(autojump_clock: object) -> None:
    """Two `publish` calls with the same key wait on a full log: when room comes, the
    first appends and the second, looking the key up again, replays."""
    hub = Hub(HubConfig(log_capacity=1, log_ttl=TTL))
    hub.publish_nowait("t", events("filler"))
    results: list[Published] = []

    async def publisher() -> None:
        results.append(await hub.publish("t", events("a"), idempotency_key="k"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(publisher)
        nursery.start_soon(publisher)
    assert trio.current_time() == pytest.approx(TTL)
    first, second = results
    assert first == second
    assert sorted([first.replayed, second.replayed]) == [False, True]
    assert hub.log("t").head == 2


async def test_log_keys_are_bounded_by_capacity_and_counted_in_bytes(
    autojump_clock: object,
) -> None:
    log = MemoryLog("t", capacity=3, ttl=TTL)
    for i in range(3):
        log.append_nowait(events(str(i)), idempotency_key=f"key-{i}")
        await trio.sleep(1)
    with pytest.raises(trio.WouldBlock):
        log.append_nowait(events("3"), idempotency_key="key-3")
    stats = log.statistics()
    assert stats.idempotency_keys == 3
    retained = [log.entry(p) for p in range(1, 4)]
    events_bytes = sum(len(entry.wire) for entry in retained if entry is not None)
    assert stats.nbytes == events_bytes + 3 * (len("key-0") + DIGEST_LENGTH)
    await trio.sleep(TTL - 3 + 0.5)  # the first event expired: its key too
    assert log.statistics().idempotency_keys == 2
    with pytest.raises(AlreadyPublished) as earlier:
        log.append_nowait(events("1"), idempotency_key="key-1")
    assert earlier.value.ids == [log.cursor_id(2)]
    log.append_nowait(events("0"), idempotency_key="key-0")  # forgotten: appended again
    assert log.head == 4


async def test_log_key_bytes_count_toward_max_bytes(autojump_clock: object) -> None:
    """Room for two events without keys is room for one with a 128-character key."""
    probe = MemoryLog("probe")
    size = len(probe.append_nowait(events("x" * 200))[0].wire)
    log = MemoryLog("t", max_bytes=2 * size, ttl=TTL)
    log.append_nowait(events("x" * 200), idempotency_key="k" * 128)
    with pytest.raises(trio.WouldBlock):
        log.append_nowait(events("y" * 200))
    assert log.saturation == pytest.approx((size + 128 + DIGEST_LENGTH) / (2 * size))
    await trio.sleep(TTL)
    log.append_nowait(events("y" * 200))
    log.append_nowait(events("z" * 200))  # without keys, two fit
    assert log.head == 3
