"""Two ``trio-stream serve`` processes on one Redis behind nginx, as a deployment runs them.

A real redis-server, two real server processes and a real nginx balancing over both
(round robin, no sticky sessions). Under ``CI=true`` these tests fail, not skip, when
redis-server or nginx is missing.
"""

from __future__ import annotations

import itertools
import signal
from typing import TYPE_CHECKING

import pytest
import trio

from trio_stream import HTTPStatusError, StreamReset, open_event_stream, publish
from trio_stream.backends.redis import OWNER_HOLD

from ._nginx import require_nginx, running_nginx
from ._processes import CliServer, cli_server
from ._redis import RedisServer, redis_server
from ._support import http_client, metrics, sample

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.e2e

SERVER = ["--heartbeat", "0.5", "--retry-ms", "200", "--rate", "10000", "--burst", "1000"]
BATCHES, PER_BATCH = 40, 5


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A throwaway redis-server (no persistence)."""
    with redis_server(tmp_path / "redis") as server:
        yield server


async def streams_held(server: CliServer) -> int:
    """How many streams *server* holds (its ``trio_stream_connections``)."""
    async with http_client(server.url) as client:
        return int(sample(await metrics(client), "trio_stream_connections"))


async def test_a_stream_through_nginx_survives_the_death_of_its_process(
    redis: RedisServer, tmp_path: Path
) -> None:
    """A client streams through nginx in ack mode while batches are published through
    nginx (so to either process), each with an `Idempotency-Key` and retried until it
    is accepted. The process holding the stream is killed (SIGKILL) mid-stream: the
    client reconnects through nginx to the other one with its Last-Event-ID, acks
    there, and ends with every event exactly once, in order; no batch twice. The
    stream stalls no longer than the dead process's ownership of the client's bucket
    lasts (`OWNER_HOLD`), plus the reconnection."""
    require_nginx()
    options = ["--backend", redis.url, *SERVER]
    published: list[str] = []
    received: list[str] = []
    retried = 0
    after_kill: list[float] = []  # the kill, then each event's arrival
    with (
        cli_server("serve", options, tmp_path / "a.txt") as a,
        cli_server("serve", options, tmp_path / "b.txt") as b,
        running_nginx([a.url, b.url], tmp_path / "nginx", read_timeout=30) as nginx,
    ):
        url = f"{nginx.url}/streams/failover"
        [start] = await publish(url, ["start"])

        async def publish_batches() -> None:
            nonlocal retried
            for i in range(BATCHES):
                datas = [f"{i}.{j}" for j in range(PER_BATCH)]
                while True:
                    try:
                        ids = await publish(url, datas, idempotency_key=f"batch-{i}")
                    except (OSError, trio.BrokenResourceError, HTTPStatusError):
                        retried += 1  # the answer was lost, or nginx had no upstream
                        await trio.sleep(0.1)
                        continue
                    break
                published.extend(ids)
                await trio.sleep(0.05)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(publish_batches)
                async with open_event_stream(
                    url,
                    client_id="survivor",
                    last_event_id=start,
                    ack=10,
                    heartbeat_timeout=2.0,
                    retry_jitter=0.0,
                ) as events:
                    killed: CliServer | None = None
                    async for item in events:
                        assert not isinstance(item, StreamReset), item
                        assert item.id is not None
                        received.append(item.id)
                        if killed is not None:
                            after_kill.append(trio.current_time())
                        if killed is None and len(received) == 50:
                            held = [await streams_held(s) for s in (a, b)]
                            assert sorted(held) == [0, 1], held
                            killed = a if held[0] else b
                            killed.process.send_signal(signal.SIGKILL)
                            after_kill.append(trio.current_time())
                        if len(received) == BATCHES * PER_BATCH:
                            break
                    statistics = events.statistics()
    assert killed is not None
    assert killed.process.wait() == -signal.SIGKILL
    assert received == published  # every event once, in order
    assert len(set(published)) == BATCHES * PER_BATCH  # no batch published twice
    assert statistics.duplicates == 0
    assert statistics.connections >= 2  # it reconnected, to the survivor
    # The survivor takes over the client's bucket once the dead owner's life lapsed.
    stall = max(b - a for a, b in itertools.pairwise(after_kill))
    assert stall < OWNER_HOLD + 2.0
