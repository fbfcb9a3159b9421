"""Pipeline stages: bursty producers smoothed by a token bucket, then batched.

What it shows: two producers feed one stream through `trio_stream`'s pipeline stages.
Producer ``a`` sends bursts of 15 events; producer ``b`` sends one event every 0.3 s.
``merge`` interleaves them, ``throttle`` lets them through a ``TokenBucket`` of 20
events/s with bursts of 5, and ``batch`` groups what passes into lists of at most 8
events, each sent at the latest 0.25 s after its first event: under load the consumer
gets many events per receive, when idle it gets them one by one. Every link is a
zero-buffer channel, so nothing queues up: the producers themselves are held back
(backpressure) until the bucket lets their events go.

Run it (it takes about 3 seconds, on the real clock)::

    .venv/bin/python examples/pipeline.py

What you will see: one line per batch, with its time, size and events (``a0`` is
producer a's first event); a line whenever a producer finishes handing over a burst,
showing how long backpressure held it; and a summary in which the busiest second
carries no more than the bucket allows (20 events/s plus the burst of 5).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import attrs
import trio

from trio_stream import TokenBucket, batch, merge, open_pipeline, throttle

if TYPE_CHECKING:
    from trio_stream import Source

RATE: Final = 20.0
BURST: Final = 5


@attrs.frozen(kw_only=True)
class Reading:
    """One event from a producer."""

    source: str
    seq: int

    def __str__(self) -> str:
        return f"{self.source}{self.seq}"


def producer(name: str, start: float, bursts: list[float], size: int) -> Source[Reading]:
    """A source sending *size* readings at each of the times *bursts* (s after *start*)."""

    async def produce(send: trio.MemorySendChannel[Reading]) -> None:
        with send:
            seq = 0
            for at in bursts:
                await trio.sleep_until(start + at)
                for _ in range(size):
                    await send.send(Reading(source=name, seq=seq))
                    seq += 1
                held = trio.current_time() - (start + at)
                if size > 1:
                    print(
                        f"{trio.current_time() - start:5.2f} s  producer {name}: burst of "
                        f"{size} due at {at:.2f} s handed over, held {held:.2f} s by backpressure"
                    )

    return produce


async def main() -> None:
    start = trio.current_time()
    a = producer("a", start, bursts=[0.0, 1.5], size=15)
    b = producer("b", start, bursts=[0.3 * i for i in range(7)], size=1)
    bucket = TokenBucket(rate=RATE, burst=BURST)

    delivered: list[float] = []
    async with (
        open_pipeline(a) as from_a,
        open_pipeline(b) as from_b,
        open_pipeline(merge(from_a, from_b), throttle(bucket), batch(8, 0.25)) as batches,
    ):
        async for readings in batches:
            now = trio.current_time() - start
            delivered += [now] * len(readings)
            names = " ".join(str(reading) for reading in readings)
            print(f"{now:5.2f} s  batch of {len(readings)}: {names}")

    elapsed = trio.current_time() - start
    busiest = max(sum(1 for u in delivered if t <= u < t + 1.0) for t in delivered)
    print(
        f"\n{len(delivered)} events in {elapsed:.2f} s; the busiest second carried "
        f"{busiest} (the bucket allows {RATE:.0f}/s plus a burst of {BURST})."
    )


if __name__ == "__main__":
    trio.run(main)
