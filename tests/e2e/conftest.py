"""Real servers on 127.0.0.1 for end-to-end tests: hypercorn serving the app in-process."""

from __future__ import annotations

from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import attrs
import pytest
import trio

from trio_stream._asgi import App, AppConfig
from trio_stream._cli import serve_app
from trio_stream._hub import HubConfig

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


@attrs.frozen
class Server:
    """A running server: its base URL and the app (whose ``hub`` tests may inspect)."""

    url: str
    app: App


@asynccontextmanager
async def open_server(
    *, hub: dict[str, Any] | None = None, **app_options: Any
) -> AsyncIterator[Server]:
    """Serve a fresh `App` on a free loopback port for the duration of the block."""
    settings: dict[str, Any] = {"rate": 1000.0, "burst": 1000}
    settings.update(hub or {})
    app = App(AppConfig(hub=HubConfig(**settings), **app_options))
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(partial(serve_app, app, host="127.0.0.1", port=0))
        yield Server(urls[0], app)
        nursery.cancel_scope.cancel()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    """A server with high rate limits (tests that need low ones use `open_server`)."""
    async with open_server() as running:
        yield running
