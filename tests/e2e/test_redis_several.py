"""Several topics on one stream with the Redis backend, across two server processes.

A stream of topics published on process A, read on process B, resumed on A with B's
composite id: every topic resumes exactly, whichever process issued the id.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio

from ._redis import RedisServer, redis_server
from ._support import http_client, open_reader, publish
from .test_redis import two_servers

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from ._support import Block

pytestmark = pytest.mark.e2e


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path / "redis") as server:
        yield server


def seen(blocks: list[Block]) -> list[tuple[str | None, str | None]]:
    return [(block.event, block.data) for block in blocks]


async def test_a_stream_of_several_topics_resumes_on_the_other_process(
    redis: RedisServer, tmp_path: Path
) -> None:
    path = "/streams?topic=orders&topic=alerts&topic=prices"
    with two_servers(redis, tmp_path) as (a, b), trio.fail_after(30):
        async with http_client(a.url) as to_a, http_client(b.url) as to_b:
            sent: list[tuple[str | None, str | None]] = []
            async with trio.open_nursery() as nursery:
                reader = await open_reader(nursery, to_b, path, headers={"X-Client-ID": "m"})
                for i in range(6):
                    topic = ("orders", "alerts", "prices")[i % 3]
                    await publish(to_a, topic, {"data": f"{topic}{i}"})
                    sent.append((topic, f"{topic}{i}"))
                await publish(to_a, "prices", {"event": "tick", "data": "t"})
                sent.append(("prices/tick", "t"))
                got = await reader.wait_events(7)
                assert sorted(seen(got)) == sorted(sent)  # every one, whatever the order
                for topic in ("orders", "alerts", "prices"):  # and in order per topic
                    mine = [d for t, d in seen(got) if t is not None and t.startswith(topic)]
                    assert mine == [d for t, d in sent if t is not None and t.startswith(topic)]
                cut = got[2].id
                nursery.cancel_scope.cancel()
            more = []
            for topic in ("alerts", "orders"):
                await publish(to_b, topic, {"data": f"{topic}-more"})
                more.append((topic, f"{topic}-more"))
            async with trio.open_nursery() as nursery:
                resumed = await open_reader(
                    nursery, to_a, path, headers={"X-Client-ID": "m", "Last-Event-ID": cut or ""}
                )
                await resumed.wait_events(len(got) - 3 + 2)
                await trio.sleep(0.3)
                nursery.cancel_scope.cancel()
    assert not any(block.event == "reset" for block in resumed.blocks)
    assert seen(resumed.events) == seen(got)[3:] + more


async def test_acks_of_a_stream_of_several_topics_may_go_to_the_other_process(
    redis: RedisServer, tmp_path: Path
) -> None:
    with two_servers(redis, tmp_path) as (a, b), trio.fail_after(30):
        async with (
            http_client(a.url) as to_a,
            http_client(b.url) as to_b,
            trio.open_nursery() as nursery,
        ):
            reader = await open_reader(
                nursery, to_a, "/streams?topic=x&topic=y&ack=2", headers={"X-Client-ID": "k"}
            )
            for i in range(3):
                await publish(to_a, "x", {"data": f"x{i}"})
                await publish(to_a, "y", {"data": f"y{i}"})
            first = await reader.wait_events(2)
            await trio.sleep(0.3)
            assert len(reader.events) == 2  # the window is full
            body = {"client_id": "k", "last_event_id": first[1].id}
            response = await to_b.post("/streams/_ack", json=body)  # not where it streams
            assert response.status_code == 204
            events = await reader.wait_events(4)
            assert seen(events) == [("x", "x0"), ("y", "y0"), ("x", "x1"), ("y", "y1")]
            unknown = {"client_id": "nobody", "last_event_id": first[1].id}
            assert (await to_b.post("/streams/_ack", json=unknown)).status_code == 404
            nursery.cancel_scope.cancel()
