"""The `Event` value and the Server-Sent Events encoder."""

from __future__ import annotations

import re
from typing import Final

import attrs

from ._errors import LocalProtocolError

__all__ = ["Event", "encode", "encode_comment", "encode_retry"]

_FORBIDDEN: Final = re.compile(r"[\r\n\0]")
_LINE_BREAK: Final = re.compile(r"\r\n|\r|\n")


def _no_line_breaks(
    instance: object, attribute: attrs.Attribute[str | None], value: str | None
) -> None:
    if value is not None and _FORBIDDEN.search(value):
        raise LocalProtocolError(
            f"event {attribute.name} must not contain CR, LF or NUL: {value!r}"
        )


def _retry_value(
    instance: object, attribute: attrs.Attribute[int | None], value: int | None
) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise LocalProtocolError(f"retry must be a non-negative integer of milliseconds: {value!r}")


@attrs.frozen(kw_only=True)
class Event:
    """One server-sent event.

    Args:
        data: The payload. CR, LF and CRLF inside it become separate ``data:`` lines on
            the wire and come back as LF from the decoder.
        event: The event type; ``None`` for the default (``message`` in a browser).
        id: The event id; on the decoding side, the last event id in force when the
            event was dispatched.
        retry: A reconnection delay in milliseconds to send with the event.
        topic: On an event a client received from a stream of several topics, the
            topic it belongs to (``None`` on a stream of one topic, whose URL names
            it). Not framed by `encode`: Server-Sent Events have no such field, and a
            stream of several topics says it in ``event:`` instead.

    Raises:
        LocalProtocolError: ``event``, ``id`` or ``topic`` contains CR, LF or NUL, or
            ``retry`` is not a non-negative integer.
    """

    data: str = attrs.field(default="", validator=attrs.validators.instance_of(str))
    event: str | None = attrs.field(default=None, validator=_no_line_breaks)
    id: str | None = attrs.field(default=None, validator=_no_line_breaks)
    retry: int | None = attrs.field(default=None, validator=_retry_value)
    topic: str | None = attrs.field(default=None, validator=_no_line_breaks)


def encode(event: Event) -> bytes:
    """Frame *event* for the wire: its fields, one ``data:`` line per line, a blank line."""
    parts: list[str] = []
    if event.id is not None:
        parts.append(f"id: {event.id}\n")
    if event.event is not None:
        parts.append(f"event: {event.event}\n")
    if event.retry is not None:
        parts.append(f"retry: {event.retry}\n")
    for line in _LINE_BREAK.split(event.data):
        parts.append(f"data: {line}\n")
    parts.append("\n")
    return "".join(parts).encode()


def encode_comment(text: str = "") -> bytes:
    """A comment line (ignored by clients; used as a heartbeat) and a blank line."""
    lines = _LINE_BREAK.split(text)
    return "".join(f": {line}\n" if line else ":\n" for line in lines).encode() + b"\n"


def encode_retry(milliseconds: int) -> bytes:
    """A lone ``retry:`` field, setting the client's reconnection delay."""
    if milliseconds is None:
        raise LocalProtocolError("retry must be a non-negative integer of milliseconds: None")
    _retry_value(None, attrs.fields(Event).retry, milliseconds)
    return f"retry: {milliseconds}\n\n".encode()
