"""A slow consumer in ack mode: the server waits for it, the publisher does not.

What it shows: ``open_event_stream(url, ack=WINDOW)``. A publisher posts ``--count``
events to a topic in one go; the consumer handles one event every ``--delay`` seconds.
In ack mode the server sends at most ``WINDOW`` events beyond the last one the client
acknowledged, so the backlog waits in the server's replay log, not in the client: the
client's own buffer (``pending``) never holds more than the window. The client
acknowledges each event when the consumer asks for the next one, in batches (at once
when half the window is done, else within ``ack_interval``), and reports how full its
buffer is with each acknowledgement (``buffer_utilization``).

Start the server with a small ``--lag-limit`` and the consumer falls behind far enough
to be paused: the client then catches up by polling and goes back to streaming, and
the iteration below does not notice (``pauses`` and ``polls`` count it).

Run it::

    trio-stream serve &                 # or: trio-stream serve --lag-limit 20 &
    .venv/bin/python examples/slow_consumer.py [--url http://127.0.0.1:8000]
        [--count 40] [--delay 0.1]

What you will see: the publisher's line first (all events accepted at once), then one
line per event handled: the time, the event, how many events wait in the client
(never more than the window of 8), the acks the server has taken, and whether the
client is streaming or polling. Last, a summary: every event handled once, in order.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from typing import Final

import trio

from trio_stream import StreamReset, open_event_stream, publish

WINDOW: Final = 8


async def main(base_url: str, count: int, delay: float) -> bool:
    url = f"{base_url.rstrip('/')}/streams/slow-{secrets.token_hex(4)}"
    (start_id,) = await publish(url, ["marker: the consumer starts after this"])
    started = trio.current_time()
    published = await publish(url, [f"job {i}" for i in range(count)])
    print(f"published {len(published)} events in {trio.current_time() - started:.3f} s")

    handled: list[str] = []
    most_pending = 0
    with trio.fail_after(max(30.0, count * delay * 3)):
        async with open_event_stream(url, ack=WINDOW, last_event_id=start_id) as events:
            async for event in events:
                if isinstance(event, StreamReset):
                    print(f"events were lost: {event}")
                    continue
                assert event.id is not None
                handled.append(event.id)
                stats = events.statistics()
                most_pending = max(most_pending, stats.pending)
                print(
                    f"{trio.current_time() - started:6.2f} s  {event.data:<8}"
                    f"  pending {stats.pending}/{WINDOW}  acks {stats.acks:>3}  {stats.state}"
                )
                await trio.sleep(delay)  # the slow part
                if len(handled) == count:
                    break
            stats = events.statistics()
    print(
        f"handled {len(handled)} of {count}, in order: {handled == published};"
        f" at most {most_pending} waiting in the client; {stats.acks} acks;"
        f" {stats.pauses} pauses, {stats.polls} polls"
    )
    return handled == published


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    parser.add_argument("--count", type=int, default=40, help="events to publish")
    parser.add_argument("--delay", type=float, default=0.1, help="seconds per event")
    args = parser.parse_args()
    sys.exit(0 if trio.run(main, args.url, args.count, args.delay) else 1)
