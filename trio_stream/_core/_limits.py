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

__all__ = ["CreditWindow", "Limiter", "SlidingWindow", "TokenBucket", "lag"]

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
