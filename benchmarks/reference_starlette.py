"""The reference: what Python users run today, sse-starlette's EventSourceResponse on uvicorn.

``python -m benchmarks.reference_starlette --port P [--heartbeat S]`` serves the same
endpoints the benchmark uses on trio_stream:

- ``POST /streams/{topic}``: a JSON object ``{"data": str, "event": str?}`` or a list of
  them; answers ``202 {"ids": [...]}``.
- ``GET /streams/{topic}``: ``text/event-stream`` with ``id:`` and ``data:`` lines and a
  ``: ping`` comment every ``--heartbeat`` seconds.
- ``GET /healthz``.

Written the way such apps usually are: every subscriber gets its own unbounded
``asyncio.Queue``, publishing puts each (shared) message on every queue, and the
response's generator yields one dict per event. With a consumer that stops reading,
its queue grows for as long as the publisher goes on: that is the reference's memory
behaviour the slow-consumer workload measures. uvicorn runs as a plain ``pip install
uvicorn`` gives it here (asyncio loop, h11 parser).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import secrets
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import uvicorn
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ._wire import raise_nofile_limit

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from starlette.requests import Request

Message = tuple[str, str | None, str]  # id, event name, data


def create_app(heartbeat: float = 15.0) -> Starlette:
    subscribers: defaultdict[str, set[asyncio.Queue[Message]]] = defaultdict(set)
    ids = itertools.count(1)

    async def stream(request: Request) -> Response:
        topic = request.path_params["topic"]
        client_id = (
            request.headers.get("x-client-id")
            or request.query_params.get("client_id")
            or secrets.token_hex(8)
        )
        queue: asyncio.Queue[Message] = asyncio.Queue()
        subscribers[topic].add(queue)

        async def events() -> AsyncIterator[dict[str, str]]:
            try:
                while True:
                    event_id, name, data = await queue.get()
                    event = {"id": event_id, "data": data}
                    if name:
                        event["event"] = name
                    yield event
            finally:
                subscribers[topic].discard(queue)

        return EventSourceResponse(events(), ping=heartbeat, headers={"X-Client-ID": client_id})

    async def publish(request: Request) -> Response:
        try:
            body: Any = await request.json()
        except ValueError:
            return JSONResponse({"error": "body is not JSON"}, status_code=400)
        items = body if isinstance(body, list) else [body]
        for item in items:
            if not (isinstance(item, dict) and isinstance(item.get("data"), str)):
                return JSONResponse({"error": "expected {'data': str}"}, status_code=400)
        queues = subscribers.get(request.path_params["topic"], ())
        published = []
        for item in items:
            event_id = str(next(ids))
            message = (event_id, item.get("event"), item["data"])
            for queue in queues:
                queue.put_nowait(message)
            published.append(event_id)
        return JSONResponse({"ids": published}, status_code=202)

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    return Starlette(
        routes=[
            Route("/streams/{topic}", stream, methods=["GET"]),
            Route("/streams/{topic}", publish, methods=["POST"]),
            Route("/healthz", healthz),
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reference_starlette")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--heartbeat", type=float, default=15.0, help="seconds between pings")
    return parser.parse_args(argv)


if __name__ == "__main__":
    raise_nofile_limit()
    arguments = parse_args()
    print(f"sse-starlette reference on http://{arguments.host}:{arguments.port}", flush=True)
    uvicorn.run(
        create_app(arguments.heartbeat),
        host=arguments.host,
        port=arguments.port,
        log_level="warning",
        access_log=False,
        backlog=4096,
        timeout_graceful_shutdown=1,
    )
