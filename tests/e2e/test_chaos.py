"""Chaos through real intermediaries: nginx, a fault-injecting proxy, pause/resume cycles.

- nginx (Debian's, default proxy buffering, ``proxy_read_timeout 2s``) in front of a
  ``trio-stream serve`` process: events pass one by one; backpressure passes too,
  thanks to ``X-Accel-Buffering: no``; heartbeats below the proxy timeout keep an idle
  stream open, and above it the proxy cuts the stream and the client resumes exactly.
- `_faultproxy` between the server and its consumers: latency, a bandwidth cap, resets
  in the middle of an event, half-open connections and pauses. Under each, every
  consumer (the project's client, plain and in ack mode) ends with every event once and
  in order, and the server's memory stays bounded.
- 100 cycles of a consumer stopping (so that it is paused) and resuming, and 100 of
  connecting and going away: connections and client entries return to their baseline.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

import h11
import pytest
import trio

from trio_stream._client import StreamReset, open_event_stream

from ._faultproxy import Faults, open_fault_proxy
from ._nginx import IGNORING_ACCEL, require_nginx, running_nginx
from ._processes import cli_server
from ._support import (
    http_client,
    metrics,
    open_raw,
    parse_blocks,
    publish,
    publish_many,
    sample,
    wait_until,
)
from .conftest import open_server

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    import httpx

    from trio_stream._client import EventStreamStatistics

    from ._nginx import Nginx
    from ._processes import CliServer
    from ._support import RawResponse

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

PROXY_TIMEOUT = 2.0  # nginx's proxy_read_timeout


async def connections(client: httpx.AsyncClient) -> float:
    """The server's ``trio_stream_connections``."""
    return sample(await metrics(client), "trio_stream_connections")


async def wait_for_connections(client: httpx.AsyncClient, count: int) -> None:
    """Scrape until the server holds *count* streams (bound it with ``fail_after``)."""
    while await connections(client) != count:  # noqa: ASYNC110 - no event to wait on
        await trio.sleep(0.05)


def rss_bytes(pid: int) -> int:
    """Resident memory of process *pid*."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def consume(
    url: str,
    *,
    client_id: str,
    after: str,
    count: int,
    ack: int | None = None,
    heartbeat_timeout: float = 1.5,
) -> tuple[list[str], EventStreamStatistics]:
    """Read *count* events after *after* with the project's client: their ids, its stats."""
    ids: list[str] = []
    async with open_event_stream(
        url,
        client_id=client_id,
        last_event_id=after,
        ack=ack,
        heartbeat_timeout=heartbeat_timeout,
        retry_jitter=0.0,
    ) as events:
        async for item in events:
            assert not isinstance(item, StreamReset), item
            assert item.id is not None
            ids.append(item.id)
            if len(ids) == count:
                break
        return ids, events.statistics()


async def arrival_times(stream: RawResponse, count: int) -> list[float]:
    """When each of the next *count* events of *stream* arrived (block by block)."""
    times: list[float] = []
    rest = b""
    while len(times) < count:
        chunk = await stream.receive()
        assert chunk, "the stream ended"
        blocks, rest = parse_blocks(rest + chunk)
        times += [trio.current_time()] * sum(block.is_event for block in blocks)
    return times


# -- nginx ------------------------------------------------------------------------------


NGINX_SERVER = [
    "--heartbeat", "0.5", "--retry-ms", "200", "--lag-limit", "20",
    "--rate", "10000", "--burst", "1000", "--log-max-bytes", str(64 * 1024 * 1024),
]  # fmt: skip


@pytest.fixture(scope="module")
def behind_nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CliServer, Nginx]]:
    """A server with a 0.5 s heartbeat, behind nginx with a 2 s ``proxy_read_timeout``."""
    require_nginx()
    tmp = tmp_path_factory.mktemp("nginx")
    with (
        cli_server("serve", NGINX_SERVER, tmp / "server.txt") as server,
        running_nginx(server.url, tmp / "nginx", read_timeout=PROXY_TIMEOUT) as nginx,
    ):
        yield server, nginx


async def test_nginx_passes_spaced_events_one_by_one(behind_nginx: tuple[CliServer, Nginx]) -> None:
    server, nginx = behind_nginx
    spacing, count = 0.3, 5
    with trio.fail_after(20):
        async with (
            http_client(server.url) as client,
            await open_raw(nginx.url, "/streams/spaced") as stream,
            trio.open_nursery() as nursery,
        ):
            assert stream.status == 200
            assert (stream.header("content-type") or "").startswith("text/event-stream")
            await stream.read_until(lambda body: b"retry:" in body)
            published: list[float] = []

            async def publish_spaced() -> None:
                for i in range(count):
                    published.append(trio.current_time())
                    await publish(client, "spaced", {"data": f"event {i}"})
                    await trio.sleep(spacing)

            nursery.start_soon(publish_spaced)
            arrived = await arrival_times(stream, count)
    delays = [a - p for a, p in zip(arrived, published, strict=True)]
    assert max(delays) < 0.2, delays  # each as it was published...
    assert arrived[-1] - arrived[0] > (count - 1) * spacing * 0.8  # ...not in a lump


async def test_nginx_keeps_backpressure_thanks_to_x_accel_buffering(
    behind_nginx: tuple[CliServer, Nginx],
) -> None:
    """Forces the difference the header makes. A client behind nginx stops reading while
    large events pour in. With the header honoured, nginx buffers little and passes the
    backpressure on: the server sees the client fall behind and pauses it. Through a
    location that ignores the header, nginx soaks up three times as much (into its
    buffers and temporary files) and the server never learns the client is slow."""
    server, nginx = behind_nginx
    batch = [{"data": "x" * 16_000}] * 16  # 256 KB a request
    with trio.fail_after(40):
        async with http_client(server.url) as client:
            samples = await metrics(client)
            pauses = sample(samples, "trio_stream_retry_signals_total", kind="pause")
            async with await open_raw(
                nginx.url, "/streams/bp", headers={"X-Client-ID": "stalled"}, rcvbuf=4096
            ) as stalled:
                assert stalled.status == 200
                needed = 0
                while sample(samples, "trio_stream_retry_signals_total", kind="pause") == pauses:
                    assert needed < 200 * len(batch), "the stalled client was never paused"
                    needed += len(await publish(client, "bp", batch))
                    samples = await metrics(client)

            sent = sample(await metrics(client), "trio_stream_events_sent_total")
            async with await open_raw(
                nginx.url,
                f"{IGNORING_ACCEL}/streams/bp-ignored",
                headers={"X-Client-ID": "stalled-but-buffered"},
                rcvbuf=4096,
            ) as buffered:
                assert buffered.status == 200
                # Smaller batches, each written to nginx before the next: nginx takes
                # everything while the client reads nothing, and the lag stays at zero.
                published = 0
                while published < max(3 * needed, 512):  # 8 MB at least
                    published += len(await publish(client, "bp-ignored", batch[:4]))
                    with trio.move_on_after(5):
                        while sample(samples, "trio_stream_events_sent_total") < sent + published:
                            samples = await metrics(client)
                    written = sample(samples, "trio_stream_events_sent_total") - sent
                    assert written == published, f"nginx stopped taking events at {written}"
                assert (
                    sample(samples, "trio_stream_retry_signals_total", kind="pause") == pauses + 1
                )


async def test_nginx_idle_stream_survives_thanks_to_heartbeats(
    behind_nginx: tuple[CliServer, Nginx],
) -> None:
    server, nginx = behind_nginx
    idle = PROXY_TIMEOUT * 1.75
    with trio.fail_after(20):
        async with (
            http_client(server.url) as client,
            await open_raw(nginx.url, "/streams/idle") as stream,
        ):
            assert stream.status == 200
            await trio.sleep(idle)  # nothing published for longer than the proxy waits
            await publish(client, "idle", {"data": "still here"})
            events = await stream.read_events(1)
            assert events[0].data == "still here"
            heartbeats = [block for block in stream.blocks() if block.is_comment]
            assert len(heartbeats) >= idle / 0.5 - 1
            assert not stream.ended
    assert "upstream timed out" not in nginx.errors()


async def test_nginx_cuts_a_stream_with_a_longer_heartbeat_and_the_client_resumes_exactly(
    tmp_path: Path,
) -> None:
    """The failure mode: the heartbeat (5 s) is above nginx's proxy_read_timeout (2 s),
    so nginx cuts every stream that stays idle for 2 s. A raw client sees its stream
    end; the project's client reconnects with Last-Event-ID and misses nothing."""
    require_nginx()
    options = ["--heartbeat", "5", "--retry-ms", "200"]
    with (
        cli_server("serve", options, tmp_path / "server.txt") as server,
        running_nginx(server.url, tmp_path / "nginx", read_timeout=PROXY_TIMEOUT) as nginx,
    ):
        with trio.fail_after(30):
            async with http_client(server.url) as client:
                [marker] = await publish(client, "cut", {"data": "start"})
                ids: list[str] = []
                async with trio.open_nursery() as nursery:
                    raw = await open_raw(nginx.url, "/streams/cut-raw")
                    started, ended, truncated = trio.current_time(), math.inf, False

                    async def watch_raw() -> None:
                        nonlocal ended, truncated
                        async with raw:
                            try:
                                await raw.read_to_end()
                            except h11.RemoteProtocolError:  # no last chunk: cut short
                                truncated = True
                        ended = trio.current_time() - started

                    nursery.start_soon(watch_raw)

                    async def publish_with_gaps() -> None:
                        for round_ in range(3):
                            if round_:  # idle for longer than nginx waits: it cuts
                                await trio.sleep(PROXY_TIMEOUT * 1.3)
                            datas = [f"round {round_} event {i}" for i in range(3)]
                            ids.extend(await publish_many(client, "cut", datas))

                    nursery.start_soon(publish_with_gaps)
                    received, stats = await consume(
                        f"{nginx.url}/streams/cut",
                        client_id="cut-client",
                        after=marker,
                        count=9,
                        heartbeat_timeout=30,
                    )
    assert received == ids
    assert stats.duplicates == 0
    assert stats.connections >= 3  # the first stream, and one after each cut
    assert PROXY_TIMEOUT * 0.9 <= ended <= PROXY_TIMEOUT * 2
    assert truncated  # nginx gave up on the upstream: the body is cut, not ended
    assert not [block for block in raw.blocks() if block.is_comment]  # no heartbeat came
    assert "upstream timed out" in nginx.errors()


# -- a fault-injecting proxy -------------------------------------------------------------


FAULT_SERVER = [
    "--rate", "5000", "--burst", "1000", "--heartbeat", "0.3", "--retry-ms", "100",
    "--lag-limit", "50", "--idle-timeout", "2", "--log-capacity", "2000",
]  # fmt: skip
FAULTS: dict[str, Callable[[], Faults]] = {
    "latency": lambda: Faults(latency=0.1),
    "bandwidth": lambda: Faults(bandwidth=30_000),
    "reset": lambda: Faults(cut="reset", cut_after=4000, cuts=4),
    "half-open": lambda: Faults(cut="half-open", cut_after=4000, cuts=2),
    "pause": lambda: Faults(cut="pause", cut_after=4000, cuts=3, pause_for=1.0),
}
EVENTS, BATCH = 300, 10


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliServer]:
    """A server process with quick heartbeats and retries, and a small lag limit."""
    with cli_server("serve", FAULT_SERVER, tmp_path_factory.mktemp("faults") / "server.txt") as s:
        yield s


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_every_consumer_gets_every_event_once_through_faults(
    fault_server: CliServer, fault: str
) -> None:
    topic = f"chaos-{fault}"
    faults = FAULTS[fault]()
    pid = fault_server.process.pid
    rss_before = rss_bytes(pid)
    with trio.fail_after(40):
        async with http_client(fault_server.url) as client:
            async with open_fault_proxy(fault_server.url, faults) as proxy:
                [marker] = await publish(client, topic, {"data": "start"})
                ids: list[str] = []
                results: dict[str, tuple[list[str], EventStreamStatistics]] = {}
                async with trio.open_nursery() as nursery:

                    async def run_consumer(name: str, ack: int | None) -> None:
                        results[name] = await consume(
                            f"{proxy.url}/streams/{topic}",
                            client_id=f"{fault}-{name}",
                            after=marker,
                            count=EVENTS,
                            ack=ack,
                        )

                    nursery.start_soon(run_consumer, "plain", None)
                    nursery.start_soon(run_consumer, "acking", 64)
                    for start in range(0, EVENTS, BATCH):
                        datas = [f"{fault} {i} " + "x" * 200 for i in range(start, start + BATCH)]
                        ids += await publish_many(client, topic, datas)
                        await trio.sleep(0.04)
                held = proxy.held
                samples = await metrics(client)
                depth = sample(samples, "trio_stream_queue_depth", topic=topic)
                assert depth <= 2000  # the log capacity
                # Streams still open: at most the consumers' (closing) and the held ones.
                assert sample(samples, "trio_stream_connections") <= 2 + held
            # The proxy is gone, held connections with it: the server lets go of everything.
            await wait_for_connections(client, 0)

    for name, (received, stats) in results.items():
        assert received == ids, f"{name}: {len(received)} events, not the {len(ids)} published"
        assert stats.resets == 0
    proxied = proxy.statistics
    if fault in ("reset", "half-open", "pause"):
        assert proxied.cuts_mid_event >= 1
        done = {"reset": proxied.resets, "half-open": proxied.half_open, "pause": proxied.pauses}
        assert done[fault] >= 1
    if fault in ("reset", "half-open"):  # the client had to reconnect
        assert max(s.connections + s.pauses for _, s in results.values()) >= 2
    assert rss_bytes(pid) - rss_before < 50 * 1024 * 1024


# -- pause/resume cycles ----------------------------------------------------------------


async def test_a_hundred_pause_and_resume_cycles_leave_nothing_behind() -> None:
    """Forces the whole pause handover a hundred times: an ack-mode consumer stops
    reading (and so acking) while more than the lag limit is published; the server
    pauses it; it reads again, polls, catches up and streams again. Then a hundred
    consumers connect and go away. Every event arrives once; connections and client
    entries go back to where they started."""
    hub_config = {"lag_limit": 8, "poll_interval": 0.0, "client_ttl": 0.5}
    cycles, per_cycle = 100, 12
    with trio.fail_after(50):
        async with open_server(hub=hub_config) as server, http_client(server) as client:
            hub = server.app.hub
            base_clients = hub.statistics().clients
            [marker] = await publish(client, "cycles", {"data": "start"})
            ids: list[str] = []
            received: list[str] = []
            async with open_event_stream(
                f"{server.url}/streams/cycles",
                client_id="cycler",
                last_event_id=marker,
                ack=4,
                ack_interval=0.0,
                retry_jitter=0.0,
            ) as events:
                for cycle in range(cycles):
                    paused = hub.retry_signals["pause"]

                    def paused_again(before: int = paused) -> bool:
                        return hub.retry_signals["pause"] > before

                    # Stopped: not iterating, so not reading nor acking.
                    datas = [f"cycle {cycle} event {i}" for i in range(per_cycle)]
                    ids += await publish_many(client, "cycles", datas)
                    if cycle:  # the first cycle's stream opens only when iterated
                        await wait_until(paused_again)
                    # Resumed: read everything published so far.
                    async for item in events:
                        assert not isinstance(item, StreamReset)
                        assert item.id is not None
                        received.append(item.id)
                        if len(received) == len(ids):
                            break
                stats = events.statistics()
            assert received == ids
            assert stats.duplicates == 0
            assert stats.pauses >= cycles - 1
            assert hub.retry_signals["pause"] >= cycles - 1

            # Connect and go away, a hundred times, each a new client.
            [previous] = await publish(client, "visits", {"data": "start"})
            for i in range(cycles):
                [one] = await publish(client, "visits", {"data": f"visit {i}"})
                async with open_event_stream(
                    f"{server.url}/streams/visits",
                    client_id=f"visitor-{i}",
                    last_event_id=previous,
                ) as events:
                    async for item in events:
                        assert not isinstance(item, StreamReset)
                        assert item.id == one
                        break
                previous = one
            await wait_for_connections(client, 0)
            assert hub.statistics().connections == 0
            # Idle entries go after client_ttl (checked by the hub's housekeeping, each second).
            await wait_until(lambda: hub.statistics().clients <= base_clients, interval=0.1)
            text = (await client.get("/metrics")).text
            assert re.search(r"^trio_stream_connections 0\.0$", text, re.MULTILINE)
