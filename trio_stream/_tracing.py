"""OpenTelemetry spans from publication to write and to ack, failing open.

Needs ``opentelemetry-api`` (the ``tracing`` extra); the hub imports this module only
when a tracer is configured.

With tracing off (the default) the hub holds no `Tracing` and nothing here runs. With
it on, each publish gets a span (with Redis, from the request to Redis's answer), and
each delivery a span from the event's publication to its write (and, in ack mode, to
its ack), linked to the publish span and carrying the event id.

The link crosses processes: with Redis, the publish span is started before the request,
and its context goes into each of the events' stream entries as a W3C ``traceparent``
string (field ``t``, written only when the publishing process traces). Each process
that mirrors the topic and traces turns it back into a remote ``SpanContext`` on its
entries (`remote_context`), so delivery spans on any process link to the publish span.
An absent or malformed ``t`` means no link, never an error.

Any exception a tracer raises is logged (once a minute at most) and swallowed: tracing
never breaks streaming.
"""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio
from opentelemetry.trace import Link, SpanContext, TraceFlags

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._core._ring import Entry

__all__ = ["Tracing", "open_telemetry_tracer", "remote_context", "traceparent"]

logger: Final = logging.getLogger("trio_stream")
ERROR_LOG_INTERVAL: Final = 60.0
_TRACEPARENT: Final = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def traceparent(context: Any) -> str | None:
    """The W3C ``traceparent`` of a span context (version ``00``); ``None`` if invalid."""
    trace_id, span_id = context.trace_id, context.span_id
    if not (isinstance(trace_id, int) and isinstance(span_id, int)):
        return None
    if not (0 < trace_id < 1 << 128 and 0 < span_id < 1 << 64):
        return None
    return f"00-{trace_id:032x}-{span_id:016x}-{int(context.trace_flags) & 0xFF:02x}"


def remote_context(value: bytes | str | None) -> SpanContext | None:
    """The remote span context a ``traceparent`` names (as `traceparent` writes it).

    Returns ``None`` for ``None`` and for anything malformed (never raises): a context
    that cannot be read only costs the link.
    """
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if value is None or len(value) != 55:
        return None
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return None
    trace_id, span_id = int(match[1], 16), int(match[2], 16)
    if not (trace_id and span_id):
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(int(match[3], 16)))


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

    def submitting(self, topic: str, count: int) -> tuple[Any, str | None]:
        """Start the span of a publish to a remote log (Redis), before the request.

        Returns:
            The span (``None`` if the tracer failed), to end with `answered`, and its
            context as a ``traceparent`` to send along with the events (``None``: none).
        """
        try:
            span = self.tracer.start_span(
                "trio_stream.publish",
                attributes={
                    "messaging.destination.name": topic,
                    "messaging.batch.message_count": count,
                },
                start_time=self._ns(trio.current_time()),
            )
        except Exception:
            self._failed()
            return None, None
        try:
            return span, traceparent(span.get_span_context())
        except Exception:
            self._failed()
            return span, None

    def answered(
        self,
        span: Any,
        ids: Sequence[str],
        *,
        replayed: bool = False,
        error: BaseException | None = None,
    ) -> None:
        """End the span of `submitting` when the remote log answered (or failed).

        It gets the ids (``trio_stream.first_event_id``, ``trio_stream.last_event_id``),
        ``trio_stream.replayed`` when an idempotency key named an earlier publish, and
        ``error.type`` when nothing was published (or the outcome is unknown).
        """
        if span is None:
            return
        try:
            if ids:
                span.set_attribute("trio_stream.first_event_id", ids[0])
                span.set_attribute("trio_stream.last_event_id", ids[-1])
            if replayed:
                span.set_attribute("trio_stream.replayed", True)
            if error is not None:
                span.set_attribute("error.type", type(error).__qualname__)
            span.end(end_time=self._ns(trio.current_time()))
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
