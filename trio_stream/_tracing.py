"""OpenTelemetry spans from publication to write and to ack, failing open.

Needs ``opentelemetry-api`` (the ``tracing`` extra); the hub imports this module only
when a tracer is configured.

With tracing off (the default) the hub holds no `Tracing` and nothing here runs. With
it on, each publish gets a span (with Redis, from the request to Redis's answer), and
each delivery a span from the event's publication to its write (and, in ack mode, to
its ack), linked to the publish span (not across processes: with Redis, not at all)
and carrying the event id. Any exception a tracer raises is logged (once a minute at
most) and swallowed: tracing never breaks streaming.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio
from opentelemetry.trace import Link

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._core._ring import Entry

__all__ = ["Tracing", "open_telemetry_tracer"]

logger: Final = logging.getLogger("trio_stream")
ERROR_LOG_INTERVAL: Final = 60.0


def open_telemetry_tracer() -> Any:
    """The ``trio_stream`` tracer of the global OpenTelemetry provider."""
    from opentelemetry import trace

    return trace.get_tracer("trio_stream")


@attrs.define(eq=False)
class Tracing:
    """Makes the spans; *tracer* is an OpenTelemetry ``Tracer`` (or anything alike).

    Times in the engine are `trio.current_time()`; spans need wall-clock nanoseconds,
    so the offset between the two clocks is taken once, here.
    """

    tracer: Any
    _offset_ns: int | None = attrs.field(default=None, init=False)
    _error_logged_at: float = attrs.field(default=-ERROR_LOG_INTERVAL, init=False)
    errors: int = attrs.field(default=0, init=False)
    """Exceptions raised by the tracer, swallowed."""

    def _ns(self, moment: float) -> int:
        if self._offset_ns is None:  # taken in the first Trio run that traces
            self._offset_ns = time.time_ns() - round(trio.current_time() * 1e9)
        return self._offset_ns + round(moment * 1e9)

    def _failed(self) -> None:
        self.errors += 1
        now = trio.current_time()
        if now - self._error_logged_at >= ERROR_LOG_INTERVAL:
            self._error_logged_at = now
            logger.warning("tracing failed (ignored; %d so far)", self.errors, exc_info=True)

    def published(self, topic: str, entries: Sequence[Entry]) -> None:
        """A span for one publish; each entry keeps its context for the delivery spans."""
        if not entries:
            return
        try:
            moment = self._ns(entries[0].published_at)
            span = self.tracer.start_span(
                "trio_stream.publish",
                attributes={
                    "messaging.destination.name": topic,
                    "messaging.batch.message_count": len(entries),
                    "trio_stream.first_event_id": entries[0].id,
                    "trio_stream.last_event_id": entries[-1].id,
                },
                start_time=moment,
            )
            span.end(end_time=moment)
            context = span.get_span_context()
            for entry in entries:
                entry.trace_context = context
        except Exception:
            self._failed()

    def submitted(self, topic: str, ids: Sequence[str], started: float, ended: float) -> None:
        """A span for one publish to a remote log (Redis), from the request to its answer.

        Its events reach this process's log later, from the backend, without the span's
        context: their delivery spans are not linked to it.
        """
        if not ids:
            return
        try:
            span = self.tracer.start_span(
                "trio_stream.publish",
                attributes={
                    "messaging.destination.name": topic,
                    "messaging.batch.message_count": len(ids),
                    "trio_stream.first_event_id": ids[0],
                    "trio_stream.last_event_id": ids[-1],
                },
                start_time=self._ns(started),
            )
            span.end(end_time=self._ns(ended))
        except Exception:
            self._failed()

    def delivered(
        self, topic: str, client_id: str, entries: Sequence[Entry], stage: str, now: float
    ) -> None:
        """A span per entry from its publication to *now* (its write, or its ack)."""
        try:
            end = self._ns(now)
            for entry in entries:
                context = entry.trace_context
                links = None if context is None else [Link(context)]  # type: ignore[arg-type]
                span = self.tracer.start_span(
                    f"trio_stream.{stage}",
                    attributes={
                        "messaging.destination.name": topic,
                        "messaging.message.id": entry.id,
                        "trio_stream.client_id": client_id,
                    },
                    links=links,
                    start_time=self._ns(entry.published_at),
                )
                span.end(end_time=end)
        except Exception:
            self._failed()
