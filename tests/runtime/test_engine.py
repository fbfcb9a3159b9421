"""The engine under a virtual clock: logs, the hub, connections, limits, acks, pauses."""

from __future__ import annotations

import gc
import json
import sys
import tracemalloc
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from trio_stream import (
    ClientPausedError,
    Event,
    Hub,
    HubConfig,
    LimitExceededError,
    MemoryLog,
    NotSentError,
    RateLimitedError,
    UnknownClientError,
)
from trio_stream.testing import RecordingSink, Written

if TYPE_CHECKING:
    from collections.abc import Sequence

    from trio_stream import Connection, Entry


def events(n: int, prefix: str = "e") -> list[Event]:
    return [Event(data=f"{prefix}{i}") for i in range(n)]


def config(**overrides: object) -> HubConfig:
    base: dict[str, object] = {"rate": 0, "burst": 1, "heartbeat_interval": 1000.0}
    base.update(overrides)
    return HubConfig(**base)  # type: ignore[arg-type]


async def run_stream(nursery: trio.Nursery, conn: Connection, sink: RecordingSink) -> None:
    nursery.start_soon(conn.run, sink)
    await trio.testing.wait_all_tasks_blocked()


# -- the log --------------------------------------------------------------------------


async def test_log_ids_increase_and_carry_the_epoch() -> None:
    log = MemoryLog("t", epoch="abcd")
    ids = [e.id for e in log.append_nowait(events(3))]
    assert ids == sorted(ids)
    assert len(set(ids)) == 3
    assert all(i.startswith("abcd-") for i in ids)
    assert (
        log.append_nowait([Event(data="x")])[0].wire == f"id: {log.id_of(4)}\ndata: x\n\n".encode()
    )


@pytest.mark.parametrize(
    "data", ["plain", "", "two\nlines", "é ünïcode ✓", "\n\nblank lines\n", "cr\rlf\r\nend"]
)
async def test_log_entries_give_back_the_data_as_published(data: str) -> None:
    log = MemoryLog("t")
    [entry] = log.append_nowait([Event(data=data, event="named")])
    assert entry.data == data
    assert entry.event == Event(data=data, event="named")
    assert json.loads(entry.json) == {"id": entry.id, "event": "named", "data": data}


async def test_log_entries_keep_the_bytes_of_an_event_once() -> None:
    """The wire form is kept; the data string is read back from it, not kept beside it."""
    log = MemoryLog("t", capacity=5000, max_bytes=1 << 30)
    payload = "x" * 2000
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        log.append_nowait([Event(data=payload + str(i)) for i in range(2000)])
        gc.collect()
        per_entry = (tracemalloc.get_traced_memory()[0] - before) / 2000
    finally:
        tracemalloc.stop()
    assert 2000 < per_entry < 2000 * 1.3  # about the wire (2 KB), not twice it


async def test_log_fails_closed_when_full_and_loses_nothing(autojump_clock: object) -> None:
    log = MemoryLog("t", capacity=5, ttl=10.0)
    accepted = [e.id for e in log.append_nowait(events(5))]
    with pytest.raises(trio.WouldBlock):
        log.append_nowait(events(1))
    assert log.rejected == 1
    got = log.read_after(0, 100)
    assert not isinstance(got, type(None))
    assert [e.id for e in got] == accepted  # type: ignore[union-attr]
    # publish() waits for the oldest to expire, then goes in
    start = trio.current_time()
    await log.append(events(1))
    assert trio.current_time() - start == pytest.approx(10.0)


async def test_log_bounded_by_bytes(autojump_clock: object) -> None:
    log = MemoryLog("t", capacity=1000, max_bytes=200, ttl=5.0)
    log.append_nowait([Event(data="x" * 100)])
    with pytest.raises(trio.WouldBlock):
        log.append_nowait([Event(data="y" * 100)])


async def test_log_resume_from_every_retained_id_is_exact(autojump_clock: object) -> None:
    log = MemoryLog("t", capacity=50)
    entries = log.append_nowait(events(20))
    for i, entry in enumerate(entries):
        resume = log.resolve(entry.id)
        assert resume.gap is None
        got = log.read_after(resume.position, 100)
        assert [e.event.data for e in got] == [f"e{j}" for j in range(i + 1, 20)]  # type: ignore[union-attr]


async def test_log_expired_id_is_a_gap_with_the_count_lost(autojump_clock: object) -> None:
    log = MemoryLog("t", ttl=10.0)
    old = log.append_nowait(events(5))
    await trio.sleep(6)
    log.append_nowait(events(3, "new"))
    await trio.sleep(5)  # the first five are 11 s old: gone
    resume = log.resolve(old[1].id)
    assert resume.gap is not None
    assert resume.gap.reason == "expired"
    assert resume.gap.lost == 3
    got = log.read_after(resume.position, 100)
    assert [e.event.data for e in got] == ["new0", "new1", "new2"]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "bad", ["", "x", "zzzz-000000000001", "abcd-1", "abcd-00000000000g", "a" * 10_000, "\x00\n"]
)
async def test_log_unknown_or_malformed_id_is_a_gap_not_an_error(bad: str) -> None:
    log = MemoryLog("t", epoch="abcd")
    log.append_nowait(events(2))
    resume = log.resolve(bad)
    assert resume.gap is not None
    assert resume.gap.reason == "unknown"
    assert resume.position == 0


async def test_log_never_issued_id_is_unknown() -> None:
    log = MemoryLog("t", epoch="abcd")
    log.append_nowait(events(2))
    gap = log.resolve(log.id_of(7)).gap
    assert gap is not None
    assert gap.reason == "unknown"


# -- streams ---------------------------------------------------------------------------


async def test_stream_delivers_in_batches_and_in_order(autojump_clock: object) -> None:
    hub = Hub(config())
    sink = RecordingSink(write_delay=0.01)
    async with trio.open_nursery() as nursery:
        conn = hub.connect("t", client_id="c")
        await run_stream(nursery, conn, sink)
        ids = hub.publish_nowait("t", events(1))
        await trio.testing.wait_all_tasks_blocked()
        ids += hub.publish_nowait("t", events(50))
        await trio.sleep(1)
        assert sink.ids == ids
        # the first event went alone, the 50 that piled up meanwhile in few writes
        assert len(sink.writes) <= 3
        nursery.cancel_scope.cancel()
    assert hub.connections == 0


async def test_stream_token_bucket_burst_then_rate(autojump_clock: object) -> None:
    hub = Hub(config(rate=10, burst=5))
    sink = RecordingSink()
    async with trio.open_nursery() as nursery:
        await run_stream(nursery, hub.connect("t", client_id="c"), sink)
        start = trio.current_time()
        hub.publish_nowait("t", events(15))
        await trio.sleep(2)
        times = [round(w.at - start, 6) for w in sink.writes for _ in w.ids]
        assert times[:5] == [0.0] * 5
        assert times[5:] == [pytest.approx(0.1 * k) for k in range(1, 11)]
        nursery.cancel_scope.cancel()


async def test_stream_clients_are_isolated(autojump_clock: object) -> None:
    hub = Hub(config(rate=1, burst=1))
    slow, other = RecordingSink(), RecordingSink()
    async with trio.open_nursery() as nursery:
        await run_stream(nursery, hub.connect("a", client_id="slow"), slow)
        await run_stream(nursery, hub.connect("b", client_id="other"), other)
        hub.publish_nowait("a", events(10))  # "slow" is now rate-limited for 9 s
        await trio.sleep(0.5)
        start = trio.current_time()
        hub.publish_nowait("b", events(1))
        await trio.testing.wait_all_tasks_blocked()
        assert other.writes[-1].at == start
        nursery.cancel_scope.cancel()


async def test_stream_global_cap_holds_across_100_connections(autojump_clock: object) -> None:
    hub = Hub(config(global_rate=50, global_burst=10))
    sinks = [RecordingSink() for _ in range(100)]
    async with trio.open_nursery() as nursery:
        for i, sink in enumerate(sinks):
            await run_stream(nursery, hub.connect("t", client_id=f"c{i}"), sink)
        start = trio.current_time()
        hub.publish_nowait("t", events(5))
        await trio.sleep(4)
        times = sorted(w.at - start for sink in sinks for w in sink.writes for _ in w.ids)
        # 500 deliveries wanted; the cap lets 10 + 50/s through
        assert len(times) == 10 + 50 * 4
        for t in range(5):
            assert sum(1 for x in times if x <= t + 1e-9) <= 10 + 50 * t
        nursery.cancel_scope.cancel()


async def test_stream_cancelled_while_waiting_for_tokens_takes_none(autojump_clock: object) -> None:
    hub = Hub(config(rate=1, burst=2))
    sink = RecordingSink()
    async with trio.open_nursery() as nursery:
        conn = hub.connect("t", client_id="c")
        await run_stream(nursery, conn, sink)
        hub.publish_nowait("t", events(3))
        await trio.sleep(0.5)
        assert len(sink.ids) == 2
        nursery.cancel_scope.cancel()
    # the third event's wait was cancelled: the bucket kept what it had gained
    await trio.sleep(0.5)
    assert hub.client_statistics("c").tokens == 1


async def test_stream_ack_window(autojump_clock: object) -> None:
    hub = Hub(config())
    sink = RecordingSink()
    async with trio.open_nursery() as nursery:
        conn = hub.connect("t", client_id="c", ack=4)
        await run_stream(nursery, conn, sink)
        ids = hub.publish_nowait("t", events(10))
        await trio.sleep(5)
        assert sink.ids == ids[:4]
        assert conn.statistics().credits == 0
        hub.ack("t", client_id="c", last_event_id=ids[1])  # cumulative: acks 0 and 1
        await trio.sleep(1)
        assert sink.ids == ids[:6]
        hub.ack("t", client_id="c", last_event_id=ids[5], buffer_utilization=0.25)
        await trio.sleep(1)
        assert sink.ids == ids[:10]
        hub.ack("t", client_id="c", last_event_id=ids[0])  # old: changes nothing
        assert hub.buffer_utilization.count == 1
        nursery.cancel_scope.cancel()


async def test_ack_errors(autojump_clock: object) -> None:
    hub = Hub(config())
    sink = RecordingSink()
    async with trio.open_nursery() as nursery:
        await run_stream(nursery, hub.connect("t", client_id="c", ack=2), sink)
        ids = hub.publish_nowait("t", events(5))
        await trio.sleep(1)
        with pytest.raises(NotSentError):
            hub.ack("t", client_id="c", last_event_id=ids[3])
        with pytest.raises(UnknownClientError):
            hub.ack("t", client_id="nobody", last_event_id=ids[0])
        with pytest.raises(ValueError, match="malformed"):
            hub.ack("t", client_id="c", last_event_id="garbage")
        with pytest.raises(ValueError, match="buffer_utilization"):
            hub.ack("t", client_id="c", last_event_id=ids[0], buffer_utilization=1.5)
        nursery.cancel_scope.cancel()


async def test_stream_stuck_writer_times_out_alone(autojump_clock: object) -> None:
    hub = Hub(config(idle_timeout=5.0))
    stuck, fine = RecordingSink(stuck=True), RecordingSink()
    async with trio.open_nursery() as nursery:
        dead = hub.connect("t", client_id="dead")
        await run_stream(nursery, dead, stuck)
        await run_stream(nursery, hub.connect("t", client_id="fine"), fine)
        for second in range(8):
            hub.publish_nowait("t", events(1, f"s{second}-"))
            await trio.sleep(1)
        assert dead.state == "idle"
        assert hub.connections == 1
        assert [round(w.at) for w in fine.writes] == list(range(8))
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("clock", [False, True], ids=["bare hub", "hub clock running"])
async def test_stream_idle_timeout_is_exact_with_or_without_the_hub_clock(
    autojump_clock: object, clock: bool
) -> None:
    """The hub's clock arms the idle deadline of overdue writes only (no deadline per
    write): the stream must still end exactly ``idle_timeout`` after its write began."""
    hub = Hub(config(idle_timeout=5.0, heartbeat_interval=100.0))
    ended: list[float] = []

    async def run(conn: Connection, sink: RecordingSink) -> None:
        await conn.run(sink)
        ended.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        if clock:
            await nursery.start(hub.run_housekeeping)
        for _ in range(3):  # writes that complete keep it alive, however many
            fine = hub.connect("t", client_id="fine")
            nursery.start_soon(run, fine, RecordingSink(write_delay=0.3))
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(40):
                hub.publish_nowait("t", events(1))
                await trio.sleep(0.5)
            assert fine.state == "open"
            fine.close()
        stuck = hub.connect("t", client_id="stuck")
        nursery.start_soon(run, stuck, RecordingSink(stuck=True))
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(0.37)
        began = trio.current_time()
        hub.publish_nowait("t", events(1))
        await trio.sleep(10)
        assert stuck.state == "idle"
        assert ended[-1] == pytest.approx(began + 5.0)
        assert hub.connections == 0
        assert not hub.owing
        nursery.cancel_scope.cancel()


async def test_stream_heartbeat_after_idleness(autojump_clock: object) -> None:
    hub = Hub(config(heartbeat_interval=2.0))
    sink = RecordingSink()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.run_housekeeping)  # the shared heartbeat clock
        start = trio.current_time()
        await run_stream(nursery, hub.connect("t", client_id="c"), sink)
        await trio.sleep(3)
        hub.publish_nowait("t", events(1))
        await trio.sleep(4.5)
        assert [(w.kind, w.at - start) for w in sink.writes] == [
            ("heartbeat", 2.0),
            ("events", 3.0),
            ("heartbeat", 5.0),
            ("heartbeat", 7.0),
        ]
        nursery.cancel_scope.cancel()


async def test_stream_pause_when_too_far_behind_then_poll_and_resume(
    autojump_clock: object,
) -> None:
    hub = Hub(config(lag_limit=10, rate=100, burst=100))
    sink = RecordingSink(stuck=False, write_delay=1.0)  # a slow socket: one write a second
    async with trio.open_nursery() as nursery:
        conn = hub.connect("t", client_id="c")
        await run_stream(nursery, conn, sink)
        ids = hub.publish_nowait("t", events(1))
        await trio.sleep(0.5)  # the first write is in progress
        ids += hub.publish_nowait("t", events(30))
        await trio.sleep(5)
        assert conn.state == "paused"
        assert sink.kinds()[-1] == "pause"
        after = sink.writes[-1].detail
        assert after == ids[0]
        with pytest.raises(ClientPausedError) as info:
            hub.connect("t", client_id="c")
        assert info.value.after == ids[0]
        polled: list[str] = []
        result = hub.poll("t", client_id="c", after=after, limit=10)
        polled += [e.id for e in result.events]
        assert not result.resume_stream  # 20 behind: more than half the lag limit
        while not result.resume_stream:
            result = hub.poll("t", client_id="c", after=result.last_event_id, limit=10)
            polled += [e.id for e in result.events]
        assert polled == ids[1 : 1 + len(polled)]
        assert len(ids) - 1 - len(polled) <= 5
        conn2 = hub.connect("t", client_id="c", last_event_id=result.last_event_id)
        sink2 = RecordingSink()
        await run_stream(nursery, conn2, sink2)
        await trio.sleep(1)
        assert polled + sink2.ids == ids[1:]
        nursery.cancel_scope.cancel()


async def test_poll_rate_limited(autojump_clock: object) -> None:
    hub = Hub(config(rate=2, burst=3))
    ids = hub.publish_nowait("t", events(10))
    first = hub.poll("t", client_id="c", after=None, limit=100)
    assert [e.id for e in first.events] == ids[:3]
    with pytest.raises(RateLimitedError) as info:
        hub.poll("t", client_id="c", after=first.last_event_id)
    assert info.value.retry_after == pytest.approx(0.5)


async def test_stream_limits(autojump_clock: object) -> None:
    hub = Hub(config(max_streams_per_client=2, max_connections=3))
    a, b = hub.connect("t", client_id="a"), hub.connect("t", client_id="a")
    with pytest.raises(LimitExceededError):
        hub.connect("t", client_id="a")
    c = hub.connect("t", client_id="b")
    with pytest.raises(LimitExceededError):
        hub.connect("t", client_id="d")
    for conn in (a, b, c):
        conn.close()
    assert hub.connections == 0
    hub.connect("t", client_id="a").close()


async def test_stream_resume_reports_expired_gap(autojump_clock: object) -> None:
    hub = Hub(config(log_ttl=10.0))
    old = hub.publish_nowait("t", events(4))
    await trio.sleep(11)
    new = hub.publish_nowait("t", events(2, "n"))
    sink = RecordingSink()
    async with trio.open_nursery() as nursery:
        await run_stream(nursery, hub.connect("t", client_id="c", last_event_id=old[1]), sink)
        await trio.sleep(1)
        assert sink.kinds() == ["reset", "events"]
        assert sink.ids == new
        assert hub.dropped == 2
        nursery.cancel_scope.cancel()


async def test_ten_thousand_streams_share_the_events(autojump_clock: object) -> None:
    """Memory per stream is constant: the encoded event exists once, in the log.

    Every stream writes the very same bytes object, and once written no stream keeps
    a reference to it (no per-connection queue or copy).
    """
    written: set[int] = set()

    class IdentitySink(RecordingSink):
        async def send_events(self, entries: Sequence[Entry]) -> None:
            await trio.lowlevel.checkpoint()
            written.update(id(entry.wire) for entry in entries)
            self.writes.append(Written(at=0.0, kind="events"))

    hub = Hub(config(max_connections=20_000, max_clients=20_000))
    sinks = [IdentitySink() for _ in range(10_000)]
    async with trio.open_nursery() as nursery:
        for i, sink in enumerate(sinks):
            nursery.start_soon(hub.connect("t", client_id=f"c{i}").run, sink)
        await trio.testing.wait_all_tasks_blocked()
        hub.publish_nowait("t", [Event(data="x" * 100_000)])
        await trio.testing.wait_all_tasks_blocked()
        assert all(len(sink.writes) == 1 for sink in sinks)
        entry = hub.log("t").entry(1)
        assert entry is not None
        assert written == {id(entry.wire)}
        gc.collect()
        refs = sys.getrefcount(entry.wire)
        assert refs == 2  # the entry's attribute and getrefcount's argument
        nursery.cancel_scope.cancel()
    assert hub.connections == 0


# -- the client registry --------------------------------------------------------------


def known(hub: Hub) -> set[str]:
    """The client ids *hub* still has an entry for."""
    found = set()
    for client_id in ("a", "b", "c", "s"):
        try:
            hub.client_statistics(client_id)
        except UnknownClientError:
            continue
        found.add(client_id)
    return found


async def test_idle_clients_are_forgotten_after_client_ttl_since_last_seen(
    autojump_clock: object,
) -> None:
    """Polls at 0, 1, 2 and 3 s (a again), a stream from 3 s: at 12.5 s (ttl 10) only b
    and c go; at 13.5 s a goes, s stays while it streams; s goes 10 s after it ends."""
    hub = Hub(config(client_ttl=10.0))
    start = trio.current_time()
    for client_id in ("a", "b", "c", "a"):
        hub.poll("t", client_id=client_id, after=None)
        await trio.sleep(1)
    sink = RecordingSink()
    async with trio.open_nursery() as nursery:
        await run_stream(nursery, hub.connect("t", client_id="s"), sink)
        await trio.sleep_until(start + 12.5)
        hub.housekeep()
        at_12 = known(hub)
        await trio.sleep(1)
        hub.housekeep()
        at_13 = known(hub)
        await trio.sleep(10)
        hub.housekeep()
        streaming_at_23 = known(hub)
        nursery.cancel_scope.cancel()
    ended = trio.current_time()
    await trio.sleep_until(ended + 9.9)
    hub.housekeep()
    before = known(hub)
    await trio.sleep(0.2)
    hub.housekeep()
    assert at_12 == {"a", "s"}
    assert at_13 == {"s"}
    assert streaming_at_23 == {"s"}  # seen while it streams, however long
    assert before == {"s"}
    assert known(hub) == set()


async def test_a_full_registry_forgets_the_least_recently_seen_idle_client(
    autojump_clock: object,
) -> None:
    """Room for three: a (streaming), b and c (polled, then b again). A fourth client
    makes room by forgetting c, seen least recently of those without a stream."""
    hub = Hub(config(max_clients=3))
    async with trio.open_nursery() as nursery:
        await run_stream(nursery, hub.connect("t", client_id="a"), RecordingSink())
        for client_id in ("b", "c", "b"):
            await trio.sleep(1)
            hub.poll("t", client_id=client_id, after=None)
        hub.poll("t", client_id="s", after=None)
        assert known(hub) == {"a", "b", "s"}
        nursery.cancel_scope.cancel()
