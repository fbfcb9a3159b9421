"""Tracing (OpenTelemetry spans, failing open) and the saturation warning."""

from __future__ import annotations

import itertools
import logging
from typing import Any, Final

import attrs
import pytest
import trio
import trio.testing
from opentelemetry.trace import SpanContext, TraceFlags

from trio_stream import Event, Hub, HubConfig
from trio_stream._tracing import remote_context, traceparent
from trio_stream.testing import RecordingSink

_SPAN_IDS: Final = itertools.count(0x1000_0000_0000_0001)


def _new_context() -> SpanContext:
    span_id = next(_SPAN_IDS)
    return SpanContext(
        trace_id=(0xABCD << 112) + span_id,
        span_id=span_id,
        is_remote=False,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )


@attrs.define
class FakeSpan:
    """Records what a span was given; each has a context of its own (unique ids)."""

    name: str
    attributes: dict[str, Any]
    links: list[Any] | None
    start_time: int | None
    end_time: int | None = None
    context: SpanContext = attrs.field(factory=_new_context)

    def set_attribute(self, key: str, value: Any) -> None:
        self.attributes[key] = value

    def end(self, end_time: int | None = None) -> None:
        self.end_time = end_time

    def get_span_context(self) -> SpanContext:
        return self.context

    def linked_to(self) -> list[SpanContext]:
        return [link.context for link in self.links or ()]


@attrs.define
class FakeTracer:
    spans: list[FakeSpan] = attrs.field(factory=list)

    def start_span(self, name: str, **kwargs: Any) -> FakeSpan:
        span = FakeSpan(
            name,
            dict(kwargs.get("attributes") or {}),
            kwargs.get("links"),
            kwargs.get("start_time"),
        )
        self.spans.append(span)
        return span


class BrokenTracer:
    def start_span(self, name: str, **kwargs: Any) -> Any:
        raise RuntimeError("the tracer is broken")


async def test_tracing_spans_from_publication_to_write_and_ack(autojump_clock: object) -> None:
    tracer = FakeTracer()
    hub = Hub(HubConfig(rate=0, heartbeat_interval=1000, tracer=tracer))
    sink = RecordingSink()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.connect("t", client_id="c", ack=10).run, sink)
        await trio.testing.wait_all_tasks_blocked()
        ids = hub.publish_nowait("t", [Event(data="a"), Event(data="b")])
        await trio.sleep(0.25)
        hub.ack("t", client_id="c", last_event_id=ids[1])
        nursery.cancel_scope.cancel()
    names = [span.name for span in tracer.spans]
    assert names == ["trio_stream.publish", "trio_stream.write", "trio_stream.write",
                     "trio_stream.ack", "trio_stream.ack"]  # fmt: skip
    publish, *deliveries = tracer.spans
    assert publish.attributes["trio_stream.first_event_id"] == ids[0]
    assert [s.attributes["messaging.message.id"] for s in deliveries] == ids + ids
    for span in deliveries:
        assert span.linked_to() == [publish.context]  # linked to the publish span
        assert span.start_time == publish.start_time
    ack_span = deliveries[-1]
    assert ack_span.end_time is not None
    assert ack_span.start_time is not None
    assert ack_span.end_time - ack_span.start_time == pytest.approx(0.25e9, abs=1e3)


async def test_tracing_that_raises_never_breaks_streaming(
    autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    hub = Hub(HubConfig(rate=0, heartbeat_interval=1000, tracer=BrokenTracer()))
    sink = RecordingSink()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.connect("t", client_id="c", ack=10).run, sink)
        await trio.testing.wait_all_tasks_blocked()
        ids = hub.publish_nowait("t", [Event(data=str(i)) for i in range(5)])
        await trio.sleep(1)
        hub.ack("t", client_id="c", last_event_id=ids[-1])
        nursery.cancel_scope.cancel()
    assert sink.ids == ids
    assert hub.tracing is not None
    assert hub.tracing.errors == 3  # publish, write, ack
    assert "tracing failed" in caplog.text


async def test_tracing_off_by_default() -> None:
    assert Hub().tracing is None


async def test_saturation_warns_once_per_crossing(
    autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[tuple[str, float]] = []
    hub = Hub(
        HubConfig(log_capacity=10, log_ttl=5.0, on_saturation=lambda t, s: calls.append((t, s)))
    )
    caplog.set_level(logging.WARNING, "trio_stream")
    hub.publish_nowait("t", [Event(data="x")] * 8)
    assert calls == []
    hub.publish_nowait("t", [Event(data="x")])
    hub.publish_nowait("t", [Event(data="x")])
    assert calls == [("t", 0.9)]
    assert caplog.text.count("90% full") == 1
    await trio.sleep(6)  # everything expires: back under the threshold
    hub.housekeep()
    hub.publish_nowait("t", [Event(data="x")] * 9)
    assert calls == [("t", 0.9), ("t", 0.9)]


async def test_saturation_callback_that_raises_is_contained(autojump_clock: object) -> None:
    def broken(topic: str, saturation: float) -> None:
        raise RuntimeError("alerting is down")

    hub = Hub(HubConfig(log_capacity=2, on_saturation=broken))
    assert len(hub.publish_nowait("t", [Event(data="x")] * 2)) == 2


def test_traceparent_round_trip_gives_a_remote_context() -> None:
    context = _new_context()
    value = traceparent(context)
    assert value == f"00-{context.trace_id:032x}-{context.span_id:016x}-01"
    back = remote_context(value.encode())
    assert back is not None
    assert (back.trace_id, back.span_id, back.trace_flags) == (
        context.trace_id,
        context.span_id,
        context.trace_flags,
    )
    assert back.is_remote


def test_traceparent_of_an_invalid_context_is_none() -> None:
    assert traceparent(SpanContext(trace_id=0, span_id=0, is_remote=False)) is None


@pytest.mark.parametrize(
    "value",
    [
        None,
        b"",
        b"garbage",
        b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01",  # all-zero trace id
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-" + b"0" * 16 + b"-01",  # all-zero span id
        b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # another version
        b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",  # trailing
        "00-4bf92f3577b34da6a3ce929d0e0e47é6-00f067aa0ba902b7-01".encode(),
        b"\xff" * 55,
    ],
)
def test_remote_context_of_anything_malformed_is_none(value: bytes | None) -> None:
    assert remote_context(value) is None
