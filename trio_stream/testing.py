"""Helpers for testing code built on trio_stream (like `trio.testing`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import attrs
import trio

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._core._ring import Entry, Gap

__all__ = ["RecordingSink", "Written"]


@attrs.frozen(kw_only=True)
class Written:
    """One write a `RecordingSink` took: when, what kind, and which event ids."""

    at: float
    kind: Literal["events", "heartbeat", "reset", "pause"]
    ids: tuple[str, ...] = ()
    detail: object = None


@attrs.define(eq=False)
class RecordingSink:
    """A `Sink` that records every write with its (virtual) time.

    Args:
        write_delay: Seconds each write takes, like a slow socket.
        stuck: When set, writes never complete (a peer that stopped reading).
    """

    write_delay: float = 0.0
    stuck: bool = False
    writes: list[Written] = attrs.field(factory=list)
    paused_topic: str | None = None

    async def _write(
        self,
        kind: Literal["events", "heartbeat", "reset", "pause"],
        ids: tuple[str, ...] = (),
        detail: object = None,
    ) -> None:
        if self.stuck:
            await trio.sleep_forever()
        if self.write_delay:
            await trio.sleep(self.write_delay)
        else:
            await trio.lowlevel.checkpoint()
        self.writes.append(Written(at=trio.current_time(), kind=kind, ids=ids, detail=detail))

    async def send_events(self, entries: Sequence[Entry]) -> None:
        """Record a write of *entries*."""
        await self._write("events", tuple(entry.id for entry in entries))

    async def send_heartbeat(self) -> None:
        """Record a heartbeat."""
        await self._write("heartbeat")

    async def send_reset(self, gap: Gap) -> None:
        """Record a reset."""
        await self._write("reset", detail=gap)

    async def send_pause(
        self, after: str | None, retry_after: float, *, topic: str | None = None
    ) -> None:
        """Record a pause (``detail`` is *after*; ``topic`` the topic that lagged)."""
        self.paused_topic = topic
        await self._write("pause", detail=after)

    @property
    def ids(self) -> list[str]:
        """Every event id written, in order."""
        return [event_id for w in self.writes for event_id in w.ids]

    def kinds(self) -> list[str]:
        """The kind of each write, in order."""
        return [w.kind for w in self.writes]
