"""A WebSocket consumer in ack mode that loses its connection and still misses nothing.

What it shows: ``open_websocket_stream``, the WebSocket twin of ``open_event_stream``. A
publisher posts ``--count`` events to a topic in small batches while the consumer reads
them over WebSocket with an ack window of 8: it acknowledges on the socket itself
(``{"ack": id}`` messages) each event it has handled, and the server never runs more
than 8 events ahead of that. Midway the consumer's TCP connection is cut under it (the
socket is shut down, as a network failure would): the client notices, reconnects and
resumes right after the last event it received. If the consumer falls too far behind
the publisher, the server pauses it (a ``pause`` message, then close code 1013): the
client polls over HTTP until it has caught up and goes back to the WebSocket, and the
loop below sees one unbroken stream all the same. The first stream starts after a
marker event published beforehand, so the whole run is covered.

Run it against a server (``trio-stream serve`` listens on 127.0.0.1:8000)::

    trio-stream serve &                 # or: trio-stream serve --lag-limit 20 &
    .venv/bin/python examples/websocket_client.py [--url http://127.0.0.1:8000] [--count 200]

What you will see: a line every 25 events (how many were received, the last one, the
acks sent so far, and whether the client is streaming or polling), a line when the
connection is cut and when events flow again, a line whenever the server pauses the
client and when it streams again; then the proof: the ids received are exactly the ids
the server gave the published events, in order (``missing: 0``, ``repeated: 0``, ``in
order: True``), and how many WebSocket connections, pauses, polls and acks it took. The
exit status is 0 only if that holds. Against a default server it takes two or three
seconds (its rate limit of 100 events/s per client paces the 200 events).
With ``--lag-limit 20`` the client, 100 events behind when it reconnects, is paused at
once, and catching up takes some ten seconds: in ack mode each poll fetches at most the
window (8 events), one poll per ``retry_after_ms`` the server asks for (1 s by default).
"""

from __future__ import annotations

import argparse
import secrets
import socket
import sys
from typing import Final

import trio

from trio_stream import StreamReset, open_websocket_stream, publish

WINDOW: Final = 8
BATCH: Final = 10
BATCH_INTERVAL: Final = 0.02


async def main(base_url: str, count: int) -> bool:
    """Publish *count* events and consume them over WebSocket; True if none was lost."""
    topic = f"ws-{secrets.token_hex(4)}"
    http_url = f"{base_url.rstrip('/')}/streams/{topic}"
    ws_url = "ws" + http_url.removeprefix("http")  # http -> ws, https -> wss
    published: list[str] = []
    received: list[str] = []
    sockets: list[trio.SocketStream] = []

    async def connect(host: str, port: int) -> trio.abc.Stream:
        stream = await trio.open_tcp_stream(host, port)
        sockets.append(stream)
        return stream

    async def publisher() -> None:
        for start in range(0, count, BATCH):
            batch = [f"event {i}" for i in range(start, min(start + BATCH, count))]
            published.extend(await publish(http_url, batch))
            await trio.sleep(BATCH_INTERVAL)
        print(f"published {len(published)} events to {topic!r}")

    (start_id,) = await publish(http_url, ["marker: the consumer starts after this"])
    started = trio.current_time()
    with trio.fail_after(60):
        async with (
            trio.open_nursery() as nursery,
            open_websocket_stream(
                ws_url,
                ack=WINDOW,
                last_event_id=start_id,
                retry_interval=0.5,
                stream_factory=connect,
            ) as events,
        ):
            nursery.start_soon(publisher)
            polling, connections, cut_at, to_cut = False, 1, 0.0, True
            async for item in events:
                stats = events.statistics()
                now = trio.current_time() - started
                if (stats.state == "polling") != polling:
                    polling = not polling
                    if polling:
                        print(f"{now:6.2f} s  paused by the server: catching up by polling")
                    else:
                        print(f"{now:6.2f} s  caught up: streaming over WebSocket again")
                if cut_at and stats.connections > connections:
                    print(
                        f"{now:6.2f} s  reconnected: next event {now - cut_at:.2f} s after the cut"
                    )
                    cut_at = 0.0
                connections = stats.connections
                if isinstance(item, StreamReset):
                    print(f"{now:6.2f} s  events were lost: {item}")  # not within the TTL
                    continue
                assert item.id is not None
                received.append(item.id)
                if len(received) % 25 == 0:
                    print(
                        f"{now:6.2f} s  received {len(received):>4}  last {item.data!r:<12}"
                        f"  acks sent {stats.acks:>3}  {stats.state}"
                    )
                # Midway, while streaming (then the last socket opened is the stream's).
                if to_cut and len(received) >= count // 2 and stats.state == "streaming":
                    print(f"{now:6.2f} s  cutting the connection under the client")
                    sockets[-1].socket.shutdown(socket.SHUT_RDWR)
                    cut_at, to_cut = now, False
                if len(received) == count:
                    break
            stats = events.statistics()

    missing = len(set(published) - set(received))
    repeated = len(received) - len(set(received))
    in_order = received == published
    print(f"published: {len(published)}, received: {len(received)}")
    print(f"missing: {missing}, repeated: {repeated}, in order: {in_order}")
    print(
        f"WebSocket connections: {stats.connections}, pauses: {stats.pauses},"
        f" polls: {stats.polls}, acks sent: {stats.acks}"
    )
    return missing == 0 and repeated == 0 and in_order


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    parser.add_argument("--count", type=int, default=200, help="events to publish")
    args = parser.parse_args()
    sys.exit(0 if trio.run(main, args.url, args.count) else 1)
