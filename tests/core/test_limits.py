"""Limiter arithmetic: absolute deadlines that always hold what they promise."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from trio_stream import CreditWindow, SlidingWindow, TokenBucket
from trio_stream._core._limits import lag


def drain(limiter: TokenBucket | SlidingWindow, count: int, start: float = 0.0) -> list[float]:
    """Send *count* events one at a time as early as allowed; the times they went."""
    now, times = start, []
    for _ in range(count):
        now = limiter.ready_at(now)
        assert limiter.available(now) >= 1  # waking at the deadline always finds a token
        limiter.consume(now, 1)
        times.append(now)
    return times


def test_token_bucket_burst_then_one_per_interval() -> None:
    times = drain(TokenBucket(rate=10, burst=5), 12)
    assert times[:5] == [0.0] * 5
    assert times[5:] == pytest.approx([0.1 * k for k in range(1, 8)])


def test_token_bucket_refills_to_burst_not_beyond() -> None:
    bucket = TokenBucket(rate=10, burst=3)
    bucket.consume(0.0, 3)
    assert bucket.available(0.0) == 0
    assert bucket.available(0.1) == 1
    assert bucket.available(100.0) == 3


def test_token_bucket_refill_interval_adds_tokens_in_steps() -> None:
    bucket = TokenBucket(rate=10, burst=10, refill_interval=0.5)
    bucket.consume(0.0, 10)
    assert bucket.available(0.49) == 0
    assert bucket.available(0.5) == 5
    assert bucket.ready_at(0.1) == 0.5
    assert bucket.ready_at(0.6, 6) == 1.0


def test_token_bucket_rejects_impossible_requests() -> None:
    bucket = TokenBucket(rate=1, burst=2)
    with pytest.raises(ValueError, match="bucket of 2"):
        bucket.ready_at(0.0, 3)
    with pytest.raises(ValueError, match="available"):
        bucket.consume(0.0, 3)
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(rate=0, burst=1)


def test_ready_at_changes_nothing() -> None:
    """Asking when is free: a waiter cancelled before consuming leaves the bucket as it was."""
    bucket = TokenBucket(rate=2, burst=2)
    bucket.consume(0.0, 2)
    before = bucket.available(10.0)
    bucket.ready_at(0.0, 2)
    assert bucket.available(10.0) == before


@given(
    rate=st.floats(0.1, 1000),
    burst=st.integers(1, 50),
    step=st.sampled_from([0.0, 0.01, 0.1, 0.3]),
    start=st.floats(0, 1e6),
)
def test_token_bucket_deadlines_never_livelock(
    rate: float, burst: int, step: float, start: float
) -> None:
    """However floats round, waking at ready_at finds the token, and none is over-granted."""
    count = burst + 20
    times = drain(TokenBucket(rate=rate, burst=burst, refill_interval=step), count, start)
    assert times == sorted(times)
    span = times[-1] - times[0]
    assert count <= burst + rate * (span + step) + 1e-6


@given(
    limit=st.integers(1, 20),
    period=st.floats(0.01, 10),
    gaps=st.lists(st.floats(0, 5), min_size=1, max_size=60),
)
def test_sliding_window_never_exceeds_its_limit(
    limit: int, period: float, gaps: list[float]
) -> None:
    window = SlidingWindow(limit=limit, period=period)
    now, times = 0.0, []
    for gap in gaps:
        now = window.ready_at(now + gap)
        window.consume(now, 1)
        times.append(now)
    for i, t in enumerate(times):
        in_window = [u for u in times[i:] if u < t + period]
        assert len(in_window) <= limit


def test_sliding_window_waits_for_the_oldest_to_leave() -> None:
    window = SlidingWindow(limit=3, period=1.0)
    window.consume(0.0, 2)
    window.consume(0.5, 1)
    assert window.available(0.9) == 0
    assert window.ready_at(0.9) == 1.0
    assert window.ready_at(0.9, 3) == 1.5
    assert window.available(1.0) == 2


def test_credit_window_is_cumulative() -> None:
    credits = CreditWindow(4)
    credits.on_sent(4)
    assert credits.credits == 0
    assert credits.on_ack(2) == 2
    assert credits.credits == 2
    assert credits.on_ack(1) == 0  # older than the last ack: nothing
    with pytest.raises(ValueError, match="only 4 sent"):
        credits.on_ack(5)


def test_lag() -> None:
    assert lag(10, 7) == 3
    assert lag(7, 10) == 0
