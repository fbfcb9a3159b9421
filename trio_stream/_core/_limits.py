"""Limiter arithmetic: token bucket, sliding window, ack credits, lag.

Everything here works on absolute times passed in by the caller (``now``) and answers
with absolute deadlines (``ready_at``), never with relative delays. The async layer
sleeps until the deadline, then asks again with the new ``now``. Both questions are
answered by the same expression, so a caller that wakes exactly at ``ready_at(now, n)``
always finds ``available(...) >= n``: no float rounding can make it sleep for zero
seconds forever (which relative delays were seen to do under a virtual clock).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Final, Protocol

import attrs

__all__ = [
    "Bucket",
    "CreditWindow",
    "LeasedTokens",
    "Limiter",
    "SlidingWindow",
    "TokenBucket",
    "lag",
]

INFINITY: Final = math.inf


class Limiter(Protocol):
    """What the throttling stages need from a limiter."""

    def available(self, now: float) -> int:
        """How many events may go at *now*."""
        ...

    def ready_at(self, now: float, n: int = 1) -> float:
        """The earliest time, at or after *now*, when *n* events may go."""
        ...

    def consume(self, now: float, n: int) -> None:
        """Record that *n* events went at *now* (at most ``available(now)``)."""
        ...


class Bucket(Limiter, Protocol):
    """A `Limiter` with a rate and a size: what the hub's global and per-client limits are.

    A `TokenBucket` in one process; with a backend, a bucket all processes share
    (``trio_stream.backends.redis.SharedBucket``).
    """

    @property
    def rate(self) -> float:
        """Tokens added per second."""
        ...

    @property
    def burst(self) -> int:
        """The bucket's size."""
        ...

    def reset(self) -> None:
        """Fill the bucket (as far as this process can)."""
        ...


def _positive(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0 or math.isnan(value):
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


def _non_negative(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{attribute.name} must be zero or positive, got {value!r}")


def _at_least_one(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be an integer of at least 1, got {value!r}")


@attrs.define(eq=False, on_setattr=attrs.setters.NO_OP)  # checked once, at init: fast
class TokenBucket:
    """A token bucket in GCRA form: *burst* events back to back, then *rate* per second.

    The state is one absolute time, the "theoretical arrival time" (TAT): the bucket is
    full when ``tat <= now``. Each event pushes the TAT ``1 / rate`` seconds later; an
    event may go when the TAT is at most ``burst / rate`` seconds in the future.

    Args:
        rate: Tokens added per second.
        burst: The bucket's size: events that may go back to back after a quiet spell.
        refill_interval: When positive, tokens arrive in steps at multiples of this many
            seconds (``rate * refill_interval`` at a time) instead of continuously.
    """

    rate: float = attrs.field(validator=_positive)
    burst: int = attrs.field(validator=_at_least_one)
    refill_interval: float = attrs.field(default=0.0, validator=_non_negative)
    _tat: float = attrs.field(default=-INFINITY, init=False)

    def _deadline(self, n: int) -> float:
        # The time from which n more events fit: tat + n/rate - burst/rate.
        return self._tat + (n - self.burst) / self.rate

    def _quantized(self, now: float) -> float:
        """*now* rounded down to the refill grid (the last refill step)."""
        step = self.refill_interval
        if not step:
            return now
        k = math.floor(now / step)
        if (k + 1) * step <= now:  # floor() may land one step short in floats
            k += 1
        elif k * step > now:
            k -= 1
        return k * step

    def available(self, now: float) -> int:
        """Tokens in the bucket at *now* (0 to ``burst``)."""
        if self._tat == -INFINITY:
            return self.burst
        t = self._quantized(now)
        n = math.floor((t - self._tat) * self.rate) + self.burst
        n = max(0, min(self.burst, n))
        # Settle float rounding on the side of the deadlines ready_at() hands out.
        while n < self.burst and self._deadline(n + 1) <= t:
            n += 1
        while n > 0 and self._deadline(n) > t:
            n -= 1
        return n

    def ready_at(self, now: float, n: int = 1) -> float:
        """The earliest time at or after *now* when *n* tokens are in the bucket.

        Raises:
            ValueError: *n* exceeds ``burst``, so it would never be ready.
        """
        if n > self.burst:
            raise ValueError(f"cannot wait for {n} tokens in a bucket of {self.burst}")
        if self.available(now) >= n:
            return now
        deadline = self._deadline(n)
        step = self.refill_interval
        if step:
            k = math.ceil(deadline / step)
            if (k - 1) * step >= deadline:
                k -= 1
            elif k * step < deadline:
                k += 1
            deadline = k * step
        return max(now, deadline)

    def consume(self, now: float, n: int) -> None:
        """Take *n* tokens at *now*.

        Raises:
            ValueError: Fewer than *n* tokens are available.
        """
        if n > self.available(now):
            raise ValueError(f"{n} tokens asked, {self.available(now)} available")
        # After a quiet spell the TAT lies in the past: the bucket is full, not fuller.
        self._tat = max(self._tat, self._quantized(now)) + n / self.rate

    def reset(self) -> None:
        """Fill the bucket."""
        self._tat = -INFINITY

    @property
    def tat(self) -> float:
        """The TAT: from then on the bucket is full (``-inf``: full already)."""
        return self._tat

    def restore(self, tat: float) -> None:
        """Set the TAT, e.g. to take over the state of a bucket held elsewhere."""
        self._tat = tat


@attrs.define(eq=False)
class _Lease:
    """*count* tokens granted at once; token ``i`` may go from ``valid + i * interval``
    until ``expiry + i * interval`` (both included)."""

    valid: float
    expiry: float
    interval: float
    count: int
    used: int = 0
    """Tokens from the front that went (or lapsed before they could)."""

    def valid_at(self, i: int) -> float:
        return self.valid + i * self.interval

    def expiry_at(self, i: int) -> float:
        return self.expiry + i * self.interval

    def gone(self, now: float) -> int:
        """Tokens from the front used or lapsed at *now*."""
        i = math.ceil((now - self.expiry) / self.interval) if now > self.expiry else 0
        i = max(self.used, min(self.count, i))
        # Settle float rounding on the side of expiry_at(), the expression that decides.
        while i > self.used and self.expiry_at(i - 1) >= now:
            i -= 1
        while i < self.count and self.expiry_at(i) < now:
            i += 1
        return i

    def ripe(self, now: float) -> int:
        """Tokens from the front whose window has opened at *now*."""
        if now < self.valid:
            return 0
        k = min(self.count, math.floor((now - self.valid) / self.interval) + 1)
        while k > 0 and self.valid_at(k - 1) > now:
            k -= 1
        while k < self.count and self.valid_at(k) <= now:
            k += 1
        return k

    def available(self, now: float) -> int:
        return max(0, self.ripe(now) - self.gone(now))


@attrs.define(eq=False)
class LeasedTokens:
    """Tokens leased from a GCRA bucket held elsewhere, each usable in its own window.

    A GCRA bucket of rate ``r`` and size ``b`` (`TokenBucket`, or one in Redis) gives
    each token it grants a slot: the TAT it moved to, ``e``. A local bucket would let
    that token go at ``e - b / r`` at the earliest. A leased token may go from then
    until ``e``, not later: by then the shared bucket has refilled past it, and a token
    kept longer would go on top of a full bucket. So however many holders lease from
    one bucket, and however late they use their tokens, any ``t`` seconds see at most
    ``r * t + b`` tokens go (plus one, for windows closed at both ends), as for one
    bucket. Tokens not used in time are lost: holders may under-use, never over-use.

    Times are absolute, on the caller's clock; `add` converts the remote bucket's
    answer (relative to its own clock reading) into that clock, on the safe side.
    """

    _leases: deque[_Lease] = attrs.field(factory=deque, init=False)
    debt: int = attrs.field(default=0, init=False)
    """Tokens consumed beyond those available, taken from the next lease."""

    def add(
        self,
        *,
        sent_at: float,
        received_at: float,
        count: int,
        interval: float,
        span: float,
        last_slot: float,
    ) -> int:
        """Add *count* tokens granted by a request sent at *sent_at*, answered at *received_at*.

        Args:
            sent_at: When the request left (the remote clock was read after this).
            received_at: When the answer came (the remote clock was read before this).
            count: Tokens granted, in slot order.
            interval: Seconds between successive slots (``1 / rate``).
            span: ``burst / rate``: how long before its slot a token may go.
            last_slot: Seconds from the remote clock reading to the last token's slot.

        Returns:
            How many of them this holder can use: 0 when the round trip took longer
            than *span*, so that no token's window remains (the lease is dropped).
        """
        if count <= 0:
            return 0
        first_slot = last_slot - (count - 1) * interval
        lease = _Lease(
            valid=received_at + first_slot - span,
            expiry=sent_at + first_slot,
            interval=interval,
            count=count,
        )
        if lease.valid > lease.expiry:
            return 0
        paid = min(self.debt, count)
        self.debt -= paid
        lease.used = paid
        if paid < count:
            self._leases.append(lease)
        return count - paid

    def _prune(self, now: float) -> None:
        leases = self._leases
        while leases and leases[0].gone(now) >= leases[0].count:
            leases.popleft()

    def available(self, now: float) -> int:
        """Tokens that may go at *now*."""
        self._prune(now)
        return sum(lease.available(now) for lease in self._leases)

    def remaining(self, now: float) -> int:
        """Tokens held and not lapsed at *now*, whether their window has opened or not."""
        self._prune(now)
        return sum(lease.count - lease.gone(now) for lease in self._leases)

    def ready_at(self, now: float, n: int = 1) -> float | None:
        """The earliest time at or after *now* when *n* tokens held may go.

        ``None`` when the tokens held will never make *n* at once (more must be leased).
        """
        if self.available(now) >= n:
            return now
        for lease in self._leases:  # windows open in lease order, then index order
            for i in range(lease.gone(now), lease.count):
                at = lease.valid_at(i)
                if at > now and self.available(at) >= n:
                    return at
                if n == 1:
                    break  # the first token held is the first to ripen
        return None

    def consume(self, now: float, n: int) -> None:
        """Take *n* tokens at *now*, the soonest to lapse first.

        Taking more than `available` does not fail: the difference becomes `debt`,
        paid from the next lease, so that over time no more go than were granted.
        """
        for lease in self._leases:
            if n <= 0:
                break
            gone = lease.gone(now)
            take = min(n, max(0, lease.ripe(now) - gone))
            if take:
                lease.used = gone + take
                n -= take
        if n > 0:
            self.debt += n
        self._prune(now)

    def clear(self) -> None:
        """Drop every token held, and the debt."""
        self._leases.clear()
        self.debt = 0


@attrs.define(eq=False, on_setattr=attrs.setters.NO_OP)  # checked once, at init: fast
class SlidingWindow:
    """At most *limit* events in any window of *period* seconds (an exact sliding log).

    Memory is bounded by *limit*: grants at the same instant share one entry.
    """

    limit: int = attrs.field(validator=_at_least_one)
    period: float = attrs.field(validator=_positive)
    _log: deque[list[float]] = attrs.field(factory=deque, init=False)  # [time, count]
    _count: int = attrs.field(default=0, init=False)

    def _expire(self, now: float) -> None:
        log = self._log
        while log and log[0][0] + self.period <= now:
            self._count -= int(log.popleft()[1])

    def available(self, now: float) -> int:
        """Events that may go at *now* without any window holding more than ``limit``."""
        self._expire(now)
        return self.limit - self._count

    def ready_at(self, now: float, n: int = 1) -> float:
        """The earliest time at or after *now* when *n* events may go.

        Raises:
            ValueError: *n* exceeds ``limit``, so it would never be ready.
        """
        if n > self.limit:
            raise ValueError(f"cannot wait for {n} events in a window of {self.limit}")
        need = n - self.available(now)
        if need <= 0:
            return now
        for when, count in self._log:
            need -= int(count)
            if need <= 0:
                return when + self.period
        raise AssertionError("unreachable: the log holds more than `need` events")

    def consume(self, now: float, n: int) -> None:
        """Record *n* events at *now*.

        Raises:
            ValueError: Fewer than *n* events are available.
        """
        if n > self.available(now):
            raise ValueError(f"{n} events asked, {self.available(now)} available")
        if n <= 0:
            return
        if self._log and self._log[-1][0] == now:
            self._log[-1][1] += n
        else:
            self._log.append([now, n])
        self._count += n


@attrs.define(eq=False, on_setattr=attrs.setters.NO_OP)  # checked once, at init: fast
class CreditWindow:
    """The ack window: at most *size* events sent beyond the last acknowledged one.

    Positions are the sequence numbers of a log (contiguous integers), so the number of
    events between two positions is their difference.
    """

    size: int = attrs.field(validator=_at_least_one)
    sent: int = 0
    acked: int = 0

    @property
    def outstanding(self) -> int:
        """Events sent and not yet acknowledged."""
        return self.sent - self.acked

    @property
    def credits(self) -> int:
        """Events that may be sent now."""
        return max(0, self.size - self.outstanding)

    def on_sent(self, position: int) -> None:
        """Everything up to *position* was sent."""
        self.sent = max(self.sent, position)

    def on_ack(self, position: int) -> int:
        """Acknowledge everything up to *position*; returns the credits released.

        An ack at or before the last one changes nothing and releases nothing.

        Raises:
            ValueError: *position* is beyond what was sent.
        """
        if position > self.sent:
            raise ValueError(f"ack of position {position}, only {self.sent} sent")
        released = max(0, position - self.acked)
        self.acked += released
        return released


def lag(head: int, position: int) -> int:
    """Events a reader at *position* is behind a log whose newest event is *head*."""
    return max(0, head - position)
