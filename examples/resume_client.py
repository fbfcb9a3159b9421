"""A client that loses its connection twice and still gets every event exactly once.

What it shows: ``open_event_stream`` resuming by ``Last-Event-ID``. A publisher posts
``--count`` events to a topic in small batches while a consumer streams them. Midway
the consumer's TCP connection is cut under it (the socket is shut down, as a network
failure would): the client notices, waits the server's ``retry:`` interval and
reconnects with the last id it received. Later the consumer leaves its ``async with``
block altogether (a restart), waits a moment, and opens a new stream with
``last_event_id=`` the last id it handled: the events it has not had yet, waiting in the
server's replay log, come next. The first stream starts after a marker event published
beforehand, so the whole run is covered.

Run it against a server (``trio-stream serve`` listens on 127.0.0.1:8000)::

    trio-stream serve &
    .venv/bin/python examples/resume_client.py [--url http://127.0.0.1:8000] [--count 300]

What you will see, in about seven seconds (the server's 3 s ``retry:``, and its rate
limit of 100 events/s per client pacing the 300 events):
a line when the connection is cut and when the client is back, a line for the restart,
then the proof: the ids received are exactly the ids the server gave the published
events, in order — ``missing: 0``, ``repeated: 0``, ``in order: True`` — and the
number of connections it took. The exit status is 0 only if that holds.
"""

from __future__ import annotations

import argparse
import secrets
import socket
import sys
from typing import Final

import trio

from trio_stream import StreamReset, open_event_stream, publish

BATCH: Final = 10
BATCH_INTERVAL: Final = 0.02


async def main(base_url: str, count: int) -> bool:
    topic = f"resume-{secrets.token_hex(4)}"
    url = f"{base_url.rstrip('/')}/streams/{topic}"
    published: list[str] = []
    received: list[str] = []
    connections: list[trio.SocketStream] = []

    async def connect(host: str, port: int) -> trio.abc.Stream:
        stream = await trio.open_tcp_stream(host, port)
        connections.append(stream)
        return stream

    async def publisher() -> None:
        for start in range(0, count, BATCH):
            batch = [f"event {i}" for i in range(start, min(start + BATCH, count))]
            published.extend(await publish(url, batch))
            await trio.sleep(BATCH_INTERVAL)
        print(f"published {len(published)} events to {topic!r}")

    async def consume(last_event_id: str, until: int, *, cut_at: int = 0) -> str:
        """Stream until *until* events are received in all; return the last id handled."""
        cut_time = 0.0
        async with open_event_stream(
            url, last_event_id=last_event_id, stream_factory=connect
        ) as events:
            streams = 0
            async for event in events:
                if isinstance(event, StreamReset):
                    print(f"events were lost: {event}")  # not expected within the log's TTL
                    continue
                assert event.id is not None
                if cut_time and events.statistics().connections > streams:
                    print(
                        f"received {len(received)}: reconnected after"
                        f" {trio.current_time() - cut_time:.2f} s, resuming after"
                        f" {received[-1]!r}"
                    )
                    cut_time = 0.0
                streams = events.statistics().connections
                received.append(event.id)
                if len(received) == cut_at:
                    print(f"received {len(received)}: cutting the connection under the client")
                    connections[-1].socket.shutdown(socket.SHUT_RDWR)
                    cut_time = trio.current_time()
                if len(received) == until:
                    return event.id
        raise AssertionError("the stream ended")  # pragma: no cover

    (start_id,) = await publish(url, ["marker: the consumer starts after this"])
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(publisher)
            last = await consume(start_id, count // 2, cut_at=count // 4)
            print(f"received {len(received)}: leaving the stream (a restart), last id {last!r}")
            await trio.sleep(0.3)  # events go on being published meanwhile
            await consume(last, count)

    missing = len(set(published) - set(received))
    repeated = len(received) - len(set(received))
    in_order = received == published
    print(f"published: {len(published)}, received: {len(received)}")
    print(f"missing: {missing}, repeated: {repeated}, in order: {in_order}")
    print(f"connections: {len(connections)} (one cut under the client, one restart)")
    return missing == 0 and repeated == 0 and in_order


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    parser.add_argument("--count", type=int, default=300, help="events to publish")
    args = parser.parse_args()
    sys.exit(0 if trio.run(main, args.url, args.count) else 1)
