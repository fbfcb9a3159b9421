"""Limiter arithmetic: absolute deadlines that always hold what they promise."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, strategies as st

from trio_stream import CreditWindow, SlidingWindow, TokenBucket
from trio_stream._core._limits import LeasedTokens, lag


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
    # Each token's deadline is a float near `start`: allow its rounding, token by token.
    rounding = count * max(1.0, start) * 2**-50
    assert count <= burst + rate * (span + step + rounding) + 1e-6


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


# -- tokens leased from a shared GCRA bucket ------------------------------------------------


def gcra_grant(
    tat: float, now: float, *, rate: float, burst: int, want: int, ahead: float, need: int
) -> tuple[int, float, float]:
    """The Redis lease script's arithmetic: ``(granted, new tat, tat - now)``."""
    interval = 1 / rate
    tat = max(tat, now)
    n = min(want, math.floor((now + burst * interval + ahead - tat) / interval))
    n = max(0, need, n)
    tat += n * interval
    return n, tat, tat - now


def test_leased_tokens_after_a_quiet_spell_go_at_once_then_lapse_one_per_interval() -> None:
    tokens = LeasedTokens()
    # Five tokens granted on a full bucket (rate 10): slots at 0.1 .. 0.5 after the grant.
    assert tokens.add(sent_at=1.0, received_at=1.0, count=5, interval=0.1, span=0.5, last_slot=0.5)
    assert tokens.available(1.0) == 5
    assert tokens.available(1.15) == 4  # the first slot (1.1) has passed: lapsed
    assert tokens.available(1.45) == 1
    assert tokens.available(1.55) == 0
    assert tokens.ready_at(1.55) is None  # nothing more will come without a new lease


def test_leased_tokens_ahead_of_time_ripen_one_per_interval() -> None:
    tokens = LeasedTokens()
    # A busy bucket (rate 10, burst 2): three tokens whose slots are 0.3 .. 0.5 ahead.
    tokens.add(sent_at=0.0, received_at=0.0, count=3, interval=0.1, span=0.2, last_slot=0.5)
    assert tokens.available(0.0) == 0
    now, times = 0.0, []
    for _ in range(3):
        at = tokens.ready_at(now)
        assert at is not None
        now = at
        assert tokens.available(now) >= 1  # waking at the deadline always finds a token
        tokens.consume(now, 1)
        times.append(now)
    assert times == pytest.approx([0.1, 0.2, 0.3])
    assert tokens.ready_at(now) is None


def test_leased_tokens_round_trip_narrows_each_window_on_the_safe_side() -> None:
    tokens = LeasedTokens()
    # The remote clock was read somewhere in [0.0, 0.05]: a window opens at the latest
    # it could and closes at the earliest it could.
    tokens.add(sent_at=0.0, received_at=0.05, count=1, interval=0.1, span=0.2, last_slot=0.3)
    assert tokens.ready_at(0.0) == pytest.approx(0.15)
    assert tokens.available(0.149) == 0
    assert tokens.available(0.2) == 1
    assert tokens.available(0.301) == 0
    # A round trip longer than burst / rate leaves no window at all.
    assert not tokens.add(
        sent_at=0, received_at=0.25, count=2, interval=0.1, span=0.2, last_slot=0.2
    )
    assert tokens.remaining(0.25) == 0


def test_leased_tokens_consumed_beyond_what_is_held_are_paid_from_the_next_lease() -> None:
    tokens = LeasedTokens()
    tokens.add(sent_at=0.0, received_at=0.0, count=2, interval=0.1, span=0.5, last_slot=0.2)
    tokens.consume(0.0, 3)
    assert tokens.debt == 1
    assert tokens.available(0.0) == 0
    usable = tokens.add(
        sent_at=0.0, received_at=0.0, count=4, interval=0.1, span=0.5, last_slot=0.6
    )
    assert usable == 3
    assert tokens.debt == 0
    assert tokens.available(0.25) == 3
    tokens.clear()
    assert tokens.available(0.25) == 0


def test_leased_tokens_ready_at_for_several() -> None:
    tokens = LeasedTokens()
    tokens.add(sent_at=0.0, received_at=0.0, count=4, interval=0.1, span=0.3, last_slot=0.6)
    # Slots at 0.3 .. 0.6, windows [0.0, 0.3], [0.1, 0.4], [0.2, 0.5], [0.3, 0.6].
    assert tokens.ready_at(0.0, 1) == 0.0
    at = tokens.ready_at(0.0, 3)
    assert at is not None
    assert at == pytest.approx(0.2)
    assert tokens.available(at) == 3
    assert tokens.ready_at(0.0, 5) is None


@given(
    rate=st.sampled_from([5.0, 10.0, 33.0, 100.0]),
    burst=st.integers(1, 12),
    steps=st.lists(
        st.tuples(
            st.integers(0, 2),  # which holder acts
            st.floats(0.0, 0.05),  # time until it acts
            st.sampled_from(["lease", "reserve", "spend"]),  # reserve: a whole lease
            st.floats(0.0, 0.01),  # the lease's round trip
            st.floats(0.0, 1.0),  # where in it the remote clock was read
        ),
        max_size=120,
    ),
)
def test_leased_tokens_of_any_holders_never_beat_one_bucket(
    rate: float, burst: int, steps: list[tuple[int, float, str, float, float]]
) -> None:
    """Three holders lease from one GCRA bucket and spend greedily at random times:
    however they interleave, no window of t seconds sees more than rate * t + burst + 1."""
    holders = [LeasedTokens() for _ in range(3)]
    tat, now, spent = -math.inf, 0.0, []
    size = max(1, min(burst, math.ceil(rate * 0.1)))
    for who, delay, action, trip, where in steps:
        now += delay
        if action != "spend":
            read = now + trip * where
            need = size if action == "reserve" else 0
            n, tat, last = gcra_grant(
                tat, read, rate=rate, burst=burst, want=size, ahead=0.1, need=need
            )
            holders[who].add(
                sent_at=now,
                received_at=now + trip,
                count=n,
                interval=1 / rate,
                span=burst / rate,
                last_slot=last,
            )
        else:
            n = holders[who].available(now)
            holders[who].consume(now, n)
            spent += [now] * n
    for i, start in enumerate(spent):
        for j in range(i, len(spent)):
            assert j - i + 1 <= rate * (spent[j] - start) + burst + 1 + 1e-9
