"""The incremental Server-Sent Events decoder.

It follows the WHATWG HTML "event stream interpretation" step by step: UTF-8 with
errors replaced, one leading BOM stripped, lines ended by CRLF, LF or CR, comments,
the ``event``, ``data``, ``id`` and ``retry`` fields, dispatch on a blank line, and
nothing dispatched for an event the stream ends in the middle of.

The work done by :meth:`Decoder.feed` is proportional to the chunk it is given: only
the unterminated tail of the stream is kept between calls, as a list of pieces joined
once its line ends.
"""

from __future__ import annotations

import codecs
from typing import Final, NoReturn

import attrs

from ._errors import LocalProtocolError, RemoteProtocolError
from ._events import Event

__all__ = ["DEFAULT_MAX_DATA_LENGTH", "DEFAULT_MAX_LINE_LENGTH", "Decoder"]

DEFAULT_MAX_LINE_LENGTH: Final = 1024 * 1024
"""Characters one line may hold, line ending excluded."""

DEFAULT_MAX_DATA_LENGTH: Final = 16 * 1024 * 1024
"""Characters of ``data`` (line feeds included) one event may accumulate."""

_BOM: Final = "\ufeff"
# A retry value with more significant digits than this (10**19 ms and up, some 300
# million years) is ignored like a malformed one: it keeps `int()` away from huge
# strings, whose conversion is slow or refused by `sys.set_int_max_str_digits`.
_MAX_RETRY_DIGITS: Final = 19


def _new_utf8_decoder() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


_positive_int: Final = attrs.validators.and_(
    attrs.validators.instance_of(int), attrs.validators.ge(1)
)


# No validation on assignment: attrs would route every write to the decoder's state
# through a hook, which made `feed` half as slow again. The limits are validated in
# `__init__` only.
@attrs.define(eq=False, on_setattr=attrs.setters.NO_OP)
class Decoder:
    """Turns the bytes of an event stream into :class:`Event` values, chunk by chunk.

    Bytes go in through :meth:`feed` as they arrive, split anywhere (inside a line, a
    CRLF or a UTF-8 sequence); the events they complete come out. :meth:`close` marks
    the end of the stream. A decoder reads one response: a reconnecting client starts a
    new one, passing the previous :attr:`last_event_id`.

    Decoded events have ``event=None`` for the default type (``message`` in a browser),
    ``id=None`` when the last event id in force is empty, and ``retry=None``: a
    ``retry`` field changes :attr:`retry` instead, the way it changes a browser's
    reconnection time.

    Args:
        last_event_id: The initial value of :attr:`last_event_id`, e.g. the id the
            request was resumed from. The stream's own last event id buffer still starts
            empty, as the standard says, so the first event dispatched without an
            ``id`` field on this stream resets it.
        max_line_length: The most characters one line may hold, line ending excluded.
        max_data_length: The most characters of data (a line feed counted after each
            ``data`` line) one event may accumulate before it is dispatched.

    Raises:
        TypeError: A limit is not an integer.
        ValueError: A limit is less than one.
    """

    _last_event_id: str = attrs.field(default="", validator=attrs.validators.instance_of(str))
    max_line_length: int = attrs.field(default=DEFAULT_MAX_LINE_LENGTH, validator=_positive_int)
    max_data_length: int = attrs.field(default=DEFAULT_MAX_DATA_LENGTH, validator=_positive_int)

    _retry: int | None = attrs.field(default=None, init=False)
    _utf8: codecs.IncrementalDecoder = attrs.field(
        init=False, repr=False, factory=_new_utf8_decoder
    )
    _started: bool = attrs.field(default=False, init=False, repr=False)
    _after_cr: bool = attrs.field(default=False, init=False, repr=False)
    _pending: list[str] = attrs.field(init=False, repr=False, factory=list)
    _pending_length: int = attrs.field(default=0, init=False, repr=False)
    _data: list[str] = attrs.field(init=False, repr=False, factory=list)
    _data_length: int = attrs.field(default=0, init=False, repr=False)
    _event_type: str = attrs.field(default="", init=False, repr=False)
    _id_buffer: str = attrs.field(default="", init=False, repr=False)
    _closed: bool = attrs.field(default=False, init=False, repr=False)
    _failed: bool = attrs.field(default=False, init=False, repr=False)

    @property
    def last_event_id(self) -> str:
        """The last event id string: what a reconnecting client sends as ``Last-Event-ID``.

        It takes the value of the stream's last event id buffer at every dispatch (every
        blank line), including one that dispatches nothing because the data is empty,
        and never in the middle of an event: if the stream breaks after an ``id`` line
        but before the blank line ending that event, this still names the event before.
        The empty string means no id.
        """
        return self._last_event_id

    @property
    def retry(self) -> int | None:
        """The reconnection time from the most recent valid ``retry`` field, in ms.

        ``None`` until the stream has sent one. Values that are not made of ASCII digits
        only are ignored, as are values of ``10**19`` or more.
        """
        return self._retry

    def feed(self, data: bytes) -> list[Event]:
        """Feed the next chunk of the stream.

        Args:
            data: The bytes that followed the previous chunk; may be empty.

        Returns:
            The events this chunk completed, in stream order; often none.

        Raises:
            RemoteProtocolError: A line is longer than :attr:`max_line_length`, or an
                event's data longer than :attr:`max_data_length`. The decoder is then
                unusable; :attr:`last_event_id` and :attr:`retry` keep the values they
                had before this call, since the events it completed are not returned.
            LocalProtocolError: The decoder was closed, or failed earlier.
        """
        if self._closed:
            raise LocalProtocolError("cannot feed a closed decoder")
        if self._failed:
            raise LocalProtocolError("cannot feed a decoder after it raised RemoteProtocolError")
        text = self._utf8.decode(data)
        if not text:
            return []
        if not self._started:
            self._started = True
            if text[0] == _BOM:
                text = text[1:]
        elif self._after_cr:
            # The previous chunk ended with a CR: an LF starting this one belongs to it.
            self._after_cr = False
            if text[0] == "\n":
                text = text[1:]
        if not text:
            return []

        self._after_cr = text[-1] == "\r"
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        lines = text.split("\n")
        rest = lines.pop()
        limit = self.max_line_length
        if not lines:
            self._pending.append(rest)
            self._pending_length += len(rest)
            if self._pending_length > limit:
                self._fail(f"line longer than max_line_length={limit} characters")
            return []
        if self._pending:
            self._pending.append(lines[0])
            lines[0] = "".join(self._pending)
        self._pending = [rest] if rest else []
        self._pending_length = len(rest)
        if len(lines[0]) > limit or (
            len(text) > limit and max(len(rest), *map(len, lines)) > limit
        ):
            self._fail(f"line longer than max_line_length={limit} characters")

        last_event_id, retry = self._last_event_id, self._retry
        try:
            return self._interpret(lines)
        except RemoteProtocolError:
            self._last_event_id, self._retry = last_event_id, retry
            raise

    def close(self) -> list[Event]:
        """Mark the end of the stream.

        As the standard says, any pending data is discarded: an unterminated last line is
        not processed, and an event not yet ended by a blank line is not dispatched.
        Calling it again does nothing.

        Returns:
            Always an empty list, so that a caller can treat it like :meth:`feed`.
        """
        self._closed = True
        self._pending = []
        self._pending_length = 0
        self._data = []
        self._data_length = 0
        self._event_type = ""
        self._utf8.reset()
        return []

    def _fail(self, message: str) -> NoReturn:
        self._failed = True
        raise RemoteProtocolError(message)

    def _interpret(self, lines: list[str]) -> list[Event]:
        # The buffers live in locals for the loop and are written back at the end (on
        # an error the decoder is dead, so they need not be).
        events: list[Event] = []
        data = self._data
        data_length = self._data_length
        event_type = self._event_type
        id_buffer = self._id_buffer
        max_data_length = self.max_data_length
        for line in lines:
            if not line:
                # Dispatch.
                self._last_event_id = id_buffer
                if data:
                    events.append(
                        Event(data="\n".join(data), event=event_type or None, id=id_buffer or None)
                    )
                    data = []
                    data_length = 0
                event_type = ""
            elif line[0] == ":":
                continue
            else:
                name, _, value = line.partition(":")
                if value[:1] == " ":
                    value = value[1:]
                if name == "data":
                    data.append(value)
                    data_length += len(value) + 1
                    if data_length > max_data_length:
                        self._fail(
                            f"event data longer than max_data_length={max_data_length} characters"
                        )
                elif name == "event":
                    # The standard allows NUL in an event type, `Event` refuses it: keep
                    # the event, with the NUL replaced.
                    event_type = value.replace("\0", "\ufffd")
                elif name == "id":
                    if "\0" not in value:
                        id_buffer = value
                elif name == "retry":
                    self._set_retry(value)
        self._data = data
        self._data_length = data_length
        self._event_type = event_type
        self._id_buffer = id_buffer
        return events

    def _set_retry(self, value: str) -> None:
        if value and value.isascii() and value.isdigit():
            digits = value.lstrip("0")
            if len(digits) <= _MAX_RETRY_DIGITS:
                self._retry = int(digits) if digits else 0
