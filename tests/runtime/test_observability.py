"""Tracing (OpenTelemetry spans, failing open) and the saturation warning."""

from __future__ import annotations

import logging
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from trio_stream import Event, Hub, HubConfig
from trio_stream.testing import RecordingSink


@attrs.define
class FakeSpan:
    name: str
    attributes: dict[str, Any]
    links: list[Any] | None
    start_time: int | None
    end_time: int | None = None

    def end(self, end_time: int | None = None) -> None:
        self.end_time = end_time

    def get_span_context(self) -> Any:
        from opentelemetry.trace import SpanContext

        return SpanContext(trace_id=1, span_id=len(self.name), is_remote=False)


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
        assert span.links is not None  # linked to the publish span
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
