"""The stream over WebSocket (contract section "GET /streams/{topic} with Upgrade")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ._asgi import App

__all__ = ["serve_websocket"]


async def serve_websocket(
    app: App,
    scope: dict[str, Any],
    receive: Callable[[], Awaitable[dict[str, Any]]],
    send: Callable[[dict[str, Any]], Awaitable[None]],
) -> None:
    """Serve one WebSocket stream (not yet: refused with 1003)."""
    message = await receive()
    if message["type"] == "websocket.connect":
        await send({"type": "websocket.close", "code": 1003})
