"""A server with a rate-limited feed of its own, built on trio_stream's public API.

What it shows: embedding the ASGI `App` in your own Trio program. The program publishes
a "ticker" feed into the app's hub from a task of its own (as fast as it likes: the
log fails closed when full, so `publish` simply waits), while every client receives it
at most `--rate` events per second, after a burst of `--burst`.

Run it::

    .venv/bin/python examples/rate_limited_feed.py [--port 8000] [--rate 5] [--seconds 0]

then in another terminal ``curl -N http://127.0.0.1:8000/streams/ticker``.

What you will see: the URL it listens on, then once a second how many events the feed
has published and how many the server has sent; curl shows the first ``--burst``
ticks at once, then ``--rate`` per second. With ``--seconds N`` it stops by itself after
N seconds (and exits 0), as it does on Ctrl+C.
"""

from __future__ import annotations

import argparse
import math
from functools import partial

import trio

from trio_stream import App, AppConfig, Event, Hub, HubConfig, serve_app


async def ticker(hub: Hub) -> None:
    """Publish a tick every 10 ms: faster than any client may receive."""
    n = 0
    while True:
        n += 1
        await hub.publish("ticker", [Event(event="tick", data=f'{{"n": {n}}}')])
        await trio.sleep(0.01)


async def main(port: int, rate: float, burst: int, seconds: float) -> None:
    app = App(AppConfig(hub=HubConfig(rate=rate, burst=burst, log_ttl=10.0)))
    app.run_in_background(ticker)
    with trio.move_on_after(seconds or math.inf):
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(partial(serve_app, app, port=port))
            print(f"listening on {urls[0]}; try: curl -N {urls[0]}/streams/ticker", flush=True)
            while True:
                await trio.sleep(1)
                stats = app.hub.statistics()
                print(f"published {stats.published}, sent {stats.sent}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0: any)")
    parser.add_argument("--rate", type=float, default=5.0, help="events/s per client")
    parser.add_argument("--burst", type=int, default=10, help="events back to back")
    parser.add_argument("--seconds", type=float, default=0, help="stop after this long")
    args = parser.parse_args()
    trio.run(main, args.port, args.rate, args.burst, args.seconds)
