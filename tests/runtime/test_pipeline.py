"""Tests of the pipeline stages and `open_pipeline`, on a virtual clock."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
import trio
import trio.testing
from hypothesis import given, settings, strategies as st

from trio_stream._core._limits import SlidingWindow, TokenBucket
from trio_stream._pipeline import (
    Source,
    Stage,
    batch,
    filter_stage,
    map_stage,
    merge,
    open_pipeline,
    throttle,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from trio.testing import MockClock

T = TypeVar("T")
Channel = trio.MemoryReceiveChannel[Any] | trio.MemorySendChannel[Any]


# ---------------------------------------------------------------------------- helpers


def approx(values: Sequence[float]) -> Any:
    """Times computed by limiter arithmetic, equal up to float rounding."""
    return pytest.approx(list(values), abs=1e-9)


def timed(start: float, schedule: Sequence[tuple[float, T]], end: float = 0.0) -> Source[T]:
    """A source that sends each item at ``start + time``, then ends at ``start + end``."""

    async def source(send: trio.MemorySendChannel[T]) -> None:
        with send:
            for at, item in schedule:
                await trio.sleep_until(start + at)
                await send.send(item)
            await trio.sleep_until(start + end)

    return source


async def collect(receive: trio.MemoryReceiveChannel[T], start: float) -> list[tuple[float, T]]:
    """Every item of *receive* with the time it arrived, relative to *start*."""
    return [(trio.current_time() - start, item) async for item in receive]


def spy(stage: Stage[Any, Any], channels: list[Channel]) -> Stage[Any, Any]:
    """*stage*, recording the channels it is given."""

    async def spied(
        receive: trio.MemoryReceiveChannel[Any], send: trio.MemorySendChannel[Any]
    ) -> None:
        channels.extend((receive, send))
        await stage(receive, send)

    return spied


def is_closed(channel: Channel) -> bool:
    stats = channel.statistics()
    return stats.open_send_channels == 0 and stats.open_receive_channels == 0


def task_count() -> int:
    """Tasks alive in this run."""

    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(count(child) for n in task.child_nurseries for child in n.child_tasks)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return count(root)


async def run_pipeline(source: Any, *stages: Stage[Any, Any], into: list[Any]) -> None:
    """Run a pipeline to its end, appending what comes out to *into*."""
    async with open_pipeline(source, *stages) as out:
        async for item in out:
            into.append(item)


async def double(x: int) -> int:
    await trio.lowlevel.checkpoint()
    return 2 * x


def is_even(x: int) -> bool:
    return x % 2 == 0


async def is_odd(x: int) -> bool:
    await trio.lowlevel.checkpoint()
    return x % 2 == 1


# ------------------------------------------------------------------------ map, filter


async def test_map_stage_sync_and_async_functions() -> None:
    async with open_pipeline(range(5), map_stage(double), map_stage(str)) as out:
        assert [item async for item in out] == ["0", "2", "4", "6", "8"]


async def test_filter_stage_sync_and_async_predicates() -> None:
    async with open_pipeline(range(10), filter_stage(is_even)) as out:
        assert [item async for item in out] == [0, 2, 4, 6, 8]
    async with open_pipeline(range(10), filter_stage(is_odd)) as out:
        assert [item async for item in out] == [1, 3, 5, 7, 9]


async def test_open_pipeline_without_stages_yields_the_source() -> None:
    async with open_pipeline(["a", "b"]) as out:
        assert [item async for item in out] == ["a", "b"]


async def test_map_stage_preserves_order_whatever_the_durations(
    autojump_clock: MockClock,
) -> None:
    async def slower_for_small(x: int) -> int:
        await trio.sleep((10 - x) * 0.1)
        return x

    async with open_pipeline(range(10), map_stage(slower_for_small)) as out:
        assert [item async for item in out] == list(range(10))


async def test_stage_runs_standalone_and_closes_both_channels() -> None:
    send_in, receive_in = trio.open_memory_channel[int](0)
    send_out, receive_out = trio.open_memory_channel[int](0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(map_stage(double), receive_in, send_out)
        with send_in:
            await send_in.send(21)
            assert await receive_out.receive() == 42
        with pytest.raises(trio.EndOfChannel):
            await receive_out.receive()
    assert send_in.statistics().open_receive_channels == 0
    assert receive_out.statistics().open_send_channels == 0


async def test_open_pipeline_reads_async_generator_and_closes_it() -> None:
    closed = False

    async def letters() -> AsyncIterator[str]:
        nonlocal closed
        try:
            for letter in "abcdef":
                yield letter
        finally:
            closed = True

    async with open_pipeline(letters(), map_stage(str.upper)) as out:
        assert await out.receive() == "A"
        assert await out.receive() == "B"
    assert closed


async def test_open_pipeline_owns_a_channel_source() -> None:
    send, receive = trio.open_memory_channel[int](0)
    stopped_by: list[BaseException] = []

    async def produce() -> None:
        with send:
            try:
                for i in range(100):
                    await send.send(i)
            except trio.BrokenResourceError as exc:
                stopped_by.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce)
        async with open_pipeline(receive, map_stage(double)) as out:
            assert await out.receive() == 0
    # Leaving the block closed the source channel, so the producer was told to stop.
    assert is_closed(receive)
    assert len(stopped_by) == 1


async def test_open_pipeline_rejects_a_source_it_cannot_read() -> None:
    with pytest.raises(TypeError, match="iterable or callable"):
        async with open_pipeline(42):  # type: ignore[call-overload]
            pass  # pragma: no cover


# --------------------------------------------------------------------------- throttle


async def test_throttle_token_bucket_burst_then_rate(autojump_clock: MockClock) -> None:
    start = trio.current_time()
    bucket = TokenBucket(rate=10, burst=3)
    async with open_pipeline(range(8), throttle(bucket)) as out:
        got = await collect(out, start)
    assert [item for _, item in got] == list(range(8))
    assert [t for t, _ in got] == approx([0, 0, 0, 0.1, 0.2, 0.3, 0.4, 0.5])


async def test_throttle_refills_after_a_quiet_spell(autojump_clock: MockClock) -> None:
    start = trio.current_time()
    schedule = [(0.0, i) for i in range(4)] + [(2.0, i) for i in range(4, 8)]
    bucket = TokenBucket(rate=10, burst=3)
    async with open_pipeline(timed(start, schedule), throttle(bucket)) as out:
        got = await collect(out, start)
    assert [t for t, _ in got] == approx([0, 0, 0, 0.1, 2, 2, 2, 2.1])


async def test_throttle_sliding_window_exact_times(autojump_clock: MockClock) -> None:
    start = trio.current_time()
    window = SlidingWindow(limit=3, period=1.0)
    async with open_pipeline(range(10), throttle(window)) as out:
        got = await collect(out, start)
    assert [t for t, _ in got] == approx([0, 0, 0, 1, 1, 1, 2, 2, 2, 3])


@settings(max_examples=40, deadline=None)
@given(
    bursts=st.lists(
        st.tuples(st.sampled_from([0.0, 0.125, 0.25, 0.5, 1.0, 2.0]), st.integers(1, 8)),
        min_size=1,
        max_size=6,
    ),
    limit=st.integers(1, 4),
    period=st.sampled_from([0.25, 0.5, 1.0]),
)
def test_throttle_sliding_window_never_exceeds_limit(
    bursts: list[tuple[float, int]], limit: int, period: float
) -> None:
    """Bursts at random gaps: no window of *period* ever holds more than *limit*.

    Also checks that the throttle holds an item no longer than the window forces it to:
    each item goes at its arrival or exactly when a window slot frees up.
    """

    async def scenario() -> list[tuple[float, int]]:
        schedule: list[tuple[float, int]] = []
        at = 0.0
        for gap, count in bursts:
            at += gap
            schedule += [(at, len(schedule) + i) for i in range(count)]
        async with open_pipeline(
            timed(0.0, schedule), throttle(SlidingWindow(limit, period))
        ) as out:
            got = await collect(out, 0.0)
        assert [item for _, item in got] == [item for _, item in schedule]
        arrivals = [at for at, _ in schedule]
        for (t, _), arrival in zip(got, arrivals, strict=True):
            assert t >= arrival
            earlier = [u for u, _ in got if u < t]
            # Either it went as it arrived, or it waited for the oldest grant to expire.
            assert t == arrival or any(u + period == t for u in earlier)
        return got

    got = trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    times = [t for t, _ in got]
    for t in times:
        assert sum(1 for u in times if t <= u < t + period) <= limit


async def test_throttle_cost_counts_a_batch_as_its_length(autojump_clock: MockClock) -> None:
    start = trio.current_time()
    bucket = TokenBucket(rate=10, burst=5)
    async with open_pipeline(range(12), batch(5), throttle(bucket, cost=len)) as out:
        got = await collect(out, start)
    assert [items for _, items in got] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]
    assert [t for t, _ in got] == approx([0, 0.5, 0.7])


async def test_throttle_cost_zero_passes_at_once(autojump_clock: MockClock) -> None:
    start = trio.current_time()
    bucket = TokenBucket(rate=1, burst=1)
    async with open_pipeline(range(5), throttle(bucket, cost=lambda _: 0)) as out:
        got = await collect(out, start)
    assert [t for t, _ in got] == [0] * 5
    assert bucket.available(trio.current_time()) == 1


async def test_throttle_cost_beyond_burst_raises() -> None:
    bucket = TokenBucket(rate=10, burst=3)
    received: list[Any] = []
    with pytest.raises(ValueError, match="cannot wait for 4 tokens"):
        await run_pipeline([[1], [2, 3, 4, 5]], throttle(bucket, cost=len), into=received)
    assert received == [[1]]


async def test_throttle_cancelled_while_waiting_consumes_nothing(
    autojump_clock: MockClock,
) -> None:
    start = trio.current_time()
    bucket = TokenBucket(rate=1, burst=1)
    received = []
    with trio.move_on_after(0.5) as scope:
        async with open_pipeline(range(3), throttle(bucket)) as out:
            async for item in out:
                received.append(item)
    assert scope.cancelled_caught
    assert received == [0]
    # The cancelled wait for item 1 left the bucket as item 0 left it.
    assert bucket.available(start + 0.5) == 0
    assert bucket.ready_at(start + 0.5) == pytest.approx(start + 1.0, abs=1e-9)


async def test_throttle_shared_stage_serves_pipelines_in_turn(autojump_clock: MockClock) -> None:
    """Two pipelines running one throttle stage share its limit, first come first served."""
    start = trio.current_time()
    shared = throttle(TokenBucket(rate=10, burst=1))
    got: list[tuple[float, str]] = []

    async def run(name: str) -> None:
        async with open_pipeline([name] * 3, shared) as out:
            got.extend(await collect(out, start))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, "a")
        nursery.start_soon(run, "b")
    got.sort()
    assert [t for t, _ in got] == approx([0, 0.1, 0.2, 0.3, 0.4, 0.5])
    names = [name for _, name in got]
    assert names in (["a", "b"] * 3, ["b", "a"] * 3)


async def test_throttle_separate_stages_on_one_limiter_stay_within_it(
    autojump_clock: MockClock,
) -> None:
    start = trio.current_time()
    bucket = TokenBucket(rate=10, burst=2)
    got: list[tuple[float, int]] = []

    async def run() -> None:
        async with open_pipeline(range(5), throttle(bucket)) as out:
            got.extend(await collect(out, start))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        nursery.start_soon(run)
    assert sorted(t for t, _ in got) == approx([0, 0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])


async def test_throttle_after_consumer_stall_delivers_one_released_item_early(
    autojump_clock: MockClock,
) -> None:
    """Tokens are spent when an item is let go; the send then waits for the consumer.

    So after a stall the consumer receives the item released before it, plus a full
    burst: the documented one-item slack, and no more.
    """
    start = trio.current_time()
    bucket = TokenBucket(rate=10, burst=3)
    async with open_pipeline(range(6), throttle(bucket)) as out:
        await trio.sleep(1.0)
        got = await collect(out, start)
    assert [t for t, _ in got] == approx([1, 1, 1, 1, 1.1, 1.2])


# ------------------------------------------------------------------------------ batch


async def test_batch_by_size() -> None:
    async with open_pipeline(range(7), batch(3)) as out:
        assert [items async for items in out] == [[0, 1, 2], [3, 4, 5], [6]]


async def test_batch_by_time_from_first_item(autojump_clock: MockClock) -> None:
    start = trio.current_time()
    schedule = [(0.0, 0), (0.1, 1), (0.2, 2), (1.0, 3), (5.0, 4)]
    async with open_pipeline(timed(start, schedule, end=7.0), batch(10, 0.5)) as out:
        got = await collect(out, start)
    # No batch while the input is idle (1.5 to 5.5), and none empty.
    assert got == [(0.5, [0, 1, 2]), (1.5, [3]), (5.5, [4])]


async def test_batch_size_before_delay(autojump_clock: MockClock) -> None:
    start = trio.current_time()
    schedule = [(0.0, 0), (0.1, 1), (0.2, 2)]
    async with open_pipeline(timed(start, schedule, end=3.0), batch(2, 0.5)) as out:
        got = await collect(out, start)
    assert [t for t, _ in got] == approx([0.1, 0.7])
    assert [items for _, items in got] == [[0, 1], [2]]


async def test_batch_end_of_input_sends_partial_batch(autojump_clock: MockClock) -> None:
    start = trio.current_time()
    schedule = [(0.0, "a"), (0.1, "b")]
    async with open_pipeline(timed(start, schedule, end=0.2), batch(10, 5.0)) as out:
        got = await collect(out, start)
    assert [t for t, _ in got] == approx([0.2])
    assert [items for _, items in got] == [["a", "b"]]


async def test_batch_fills_up_behind_a_slow_consumer(autojump_clock: MockClock) -> None:
    async with open_pipeline(range(10), batch(4, 0.1)) as out:
        sizes = []
        async for items in out:
            sizes.append(len(items))
            await trio.sleep(1.0)
    assert sizes == [4, 4, 2]


@pytest.mark.parametrize(("max_size", "max_delay"), [(0, 1.0), (-1, 1.0), (1, -0.5), (1, math.nan)])
def test_batch_rejects_bad_bounds(max_size: int, max_delay: float) -> None:
    with pytest.raises(ValueError, match="max_"):
        batch(max_size, max_delay)


# ------------------------------------------------------------------------------ merge


async def test_merge_interleaves_by_arrival_and_ends_with_the_last_input(
    autojump_clock: MockClock,
) -> None:
    start = trio.current_time()
    a = timed(start, [(0.0, "a0"), (0.2, "a1"), (0.4, "a2"), (2.0, "a3")])
    b = timed(start, [(0.1, "b0"), (0.3, "b1")])
    async with (
        open_pipeline(a) as from_a,
        open_pipeline(b) as from_b,
        open_pipeline(merge(from_a, from_b), map_stage(str.upper)) as out,
    ):
        got = await collect(out, start)
    assert got == [(0.0, "A0"), (0.1, "B0"), (0.2, "A1"), (0.3, "B1"), (0.4, "A2"), (2.0, "A3")]
    assert is_closed(from_a)
    assert is_closed(from_b)


async def test_merge_of_nothing_ends_at_once() -> None:
    nothing: list[trio.MemoryReceiveChannel[int]] = []
    async with open_pipeline(merge(*nothing)) as out:
        assert [item async for item in out] == []


async def test_merge_stops_its_inputs_when_the_consumer_leaves(autojump_clock: MockClock) -> None:
    async def forever(name: str) -> AsyncIterator[str]:
        while True:
            yield name
            await trio.sleep(0.1)

    async with (
        open_pipeline(forever("a")) as from_a,
        open_pipeline(forever("b")) as from_b,
    ):
        async with open_pipeline(merge(from_a, from_b)) as out:
            assert {await out.receive(), await out.receive()} == {"a", "b"}
        # The merge closed both inputs: their pipelines wind down by themselves.
        await trio.sleep(1.0)
        assert is_closed(from_a)
        assert is_closed(from_b)


# ----------------------------------------------------------------------- backpressure


async def test_backpressure_stops_the_source(autojump_clock: MockClock) -> None:
    """A consumer that stops reading stops every stage, up to the source.

    Each link is a zero-buffer channel: after the consumer has read 2 items, the map
    stage holds item 2 (blocked sending it), the feeder task holds item 3, and the
    source has produced nothing more, however long we wait.
    """
    produced = 0

    async def numbers() -> AsyncIterator[int]:
        nonlocal produced
        for i in range(1000):
            produced += 1
            yield i

    async with open_pipeline(numbers(), map_stage(double)) as out:
        assert [await out.receive(), await out.receive()] == [0, 2]
        await trio.testing.wait_all_tasks_blocked()
        assert produced == 4
        await trio.sleep(100)
        assert produced == 4
        assert await out.receive() == 4
        await trio.testing.wait_all_tasks_blocked()
        assert produced == 5


async def test_backpressure_through_throttle_and_batch(autojump_clock: MockClock) -> None:
    produced = 0

    async def numbers() -> AsyncIterator[int]:
        nonlocal produced
        for i in range(1000):
            produced += 1
            yield i

    bucket = TokenBucket(rate=100, burst=10)
    async with open_pipeline(numbers(), throttle(bucket), batch(5, 1.0)) as out:
        assert await out.receive() == [0, 1, 2, 3, 4]
        await trio.sleep(60)
        await trio.testing.wait_all_tasks_blocked()
        # batch holds [5..9], throttle holds 10, the feeder holds 11.
        assert produced == 12


# ----------------------------------------------------------------------- cancellation


async def test_cancelled_pipeline_leaves_no_task_and_closes_every_channel(
    autojump_clock: MockClock,
) -> None:
    channels: list[Channel] = []
    source_closed = False

    async def numbers() -> AsyncIterator[int]:
        nonlocal source_closed
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            source_closed = True

    async def slow(x: int) -> int:
        await trio.sleep(0.3)
        return x

    before = task_count()
    with trio.move_on_after(1.5) as scope:
        async with open_pipeline(
            numbers(),
            spy(map_stage(slow), channels),
            spy(throttle(TokenBucket(rate=5, burst=1)), channels),
            spy(batch(3, 0.5), channels),
        ) as out:
            async for _ in out:
                pass
    assert scope.cancelled_caught
    assert task_count() == before
    assert source_closed
    assert len(channels) == 6
    assert all(is_closed(channel) for channel in channels)


async def test_cancelled_item_is_dropped_never_delivered_twice(
    autojump_clock: MockClock,
) -> None:
    started: list[int] = []
    finished: list[int] = []
    delivered: list[int] = []

    async def work(x: int) -> int:
        started.append(x)
        await trio.sleep(1.0)
        finished.append(x)
        return x

    with trio.move_on_after(3.5):
        async with open_pipeline(range(10), map_stage(work)) as out:
            async for item in out:
                delivered.append(item)
    assert started == [0, 1, 2, 3]
    assert finished == delivered == [0, 1, 2]


async def test_consumer_closing_its_channel_winds_the_chain_down() -> None:
    source_closed = False

    async def numbers() -> AsyncIterator[int]:
        nonlocal source_closed
        try:
            for i in range(1000):
                yield i
        finally:
            source_closed = True

    before = task_count()
    async with open_pipeline(numbers(), map_stage(double), filter_stage(is_even)) as out:
        with out:
            assert await out.receive() == 0
        await trio.testing.wait_all_tasks_blocked()
        # Only this test's task is left: every stage saw the closure and ended.
        assert task_count() == before
        assert source_closed


async def test_leaving_the_block_early_cancels_the_rest() -> None:
    before = task_count()
    async with open_pipeline(range(10**9), map_stage(double)) as out:
        assert await out.receive() == 0
    assert task_count() == before
    with pytest.raises(trio.ClosedResourceError):
        await out.receive()


# ---------------------------------------------------------------------------- errors


async def test_map_exception_leaves_unwrapped_with_its_cause() -> None:
    """The failing stage closes its output, so the consumer sees the end and leaves.

    Leaving cancels the chain at once: if the stage closed its channels with
    ``async with`` (an ``aclose()`` checkpoint), that cancellation would replace the
    error in flight and the block would end silently. This forces that race.
    """

    def parse(text: str) -> int:
        try:
            return int(text)
        except ValueError as exc:
            raise LookupError(f"bad item {text!r}") from exc

    received: list[int] = []
    with pytest.raises(LookupError, match="bad item 'x'") as info:
        await run_pipeline(["1", "2", "x", "4"], map_stage(parse), into=received)
    assert received == [1, 2]
    assert isinstance(info.value.__cause__, ValueError)


async def test_source_exception_leaves_unwrapped() -> None:
    async def failing() -> AsyncIterator[int]:
        yield 1
        raise KeyError("source broke")

    received: list[int] = []
    with pytest.raises(KeyError, match="source broke"):
        await run_pipeline(failing(), map_stage(double), into=received)
    assert received in ([], [2])  # the error cancels what is still in flight


async def test_merge_input_exception_leaves_unwrapped() -> None:
    async def failing(send: trio.MemorySendChannel[int]) -> None:
        with send:
            await send.send(1)
            raise OSError("input broke")

    async def consume() -> None:
        async with open_pipeline(failing) as broken, open_pipeline(range(3)) as fine:
            await run_pipeline(merge(broken, fine), into=[])

    with pytest.raises(OSError, match="input broke"):
        await consume()


async def test_body_exception_leaves_unwrapped() -> None:
    async def consume() -> None:
        async with open_pipeline(range(10), map_stage(double)) as out:
            await out.receive()
            raise RuntimeError("consumer broke")

    with pytest.raises(RuntimeError, match="consumer broke"):
        await consume()
