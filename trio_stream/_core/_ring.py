"""The bookkeeping of a topic's replay log: a bounded ring of encoded entries.

Pure: times are passed in. Positions are contiguous integers (``seq``), 1 for the first
event a ring accepts; position 0 means "before everything". Ids are ``<epoch>-<seq>``
with the sequence number as 12 hex digits, so within one epoch they also sort as
strings.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Final, Literal

import attrs

from ._events import Event

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["Entry", "Gap", "Resume", "Ring"]

_SEQ_DIGITS: Final = 12
_COMPACT_AT: Final = 1024


class Entry:
    """An event in a log, with its wire form made once, at publish time.

    Only the wire form is kept: the event's data is read back from it when asked for
    (by the WebSocket transport and polls, once per entry), so a log holds each event's
    bytes once, not twice. (Data with CR line breaks, which the wire turns into LF, is
    kept as well, so that it comes back as published.)

    Args:
        seq: Its position in its log.
        id: Its id.
        event: The event as published (its own ``id`` is ignored: *id* is the id).
        wire: The SSE framing, ``id:`` line included: what every stream writes.
        published_at: When it was accepted (trio time).
        order: Where the hub accepted it among the events of every topic.
        trace_context: The publish span's context, when tracing is on.
    """

    __slots__ = (
        "_data",
        "_json",
        "_tagged",
        "id",
        "name",
        "order",
        "published_at",
        "seq",
        "trace_context",
        "wire",
    )

    def __init__(
        self,
        *,
        seq: int,
        id: str,
        event: Event,
        wire: bytes,
        published_at: float,
        order: int = 0,
        trace_context: object = None,
    ) -> None:
        self.seq = seq
        self.id = id
        self.name: str | None = event.event
        """The event's name (``None``: unnamed)."""
        self.wire = wire
        self.published_at = published_at
        self.order = order
        self.trace_context = trace_context
        self._data: str | None = event.data if "\r" in event.data else None
        self._json: str | None = None
        self._tagged: bytes | None = None

    def __repr__(self) -> str:
        return f"Entry(seq={self.seq!r}, id={self.id!r}, name={self.name!r})"

    @property
    def data(self) -> str:
        """The event's data, as published."""
        if self._data is not None:
            return self._data
        lines = self.wire.decode().split("\n")
        return "\n".join([line[6:] for line in lines if line.startswith("data: ")])

    @property
    def event(self) -> Event:
        """The event as published (without its id: the entry's ``id`` is the id)."""
        return Event(data=self.data, event=self.name)

    def tagged(self, topic: str) -> bytes:
        """The wire form without its ``id:`` line, the event named ``<topic>[/<name>]``.

        What a stream of several topics writes after its own ``id:`` line. Made on
        first use, then kept: every such stream of the topic shares it.
        """
        if self._tagged is None:
            wire = self.wire
            rest = wire[wire.index(b"\n") + 1 :] if wire.startswith(b"id:") else wire
            name = topic.encode()
            if self.name is None:
                self._tagged = b"event: " + name + b"\n" + rest
            else:  # `rest` starts with "event: <name>"
                self._tagged = b"event: " + name + b"/" + rest[len(b"event: ") :]
        return self._tagged

    @property
    def json(self) -> str:
        """The event as the WebSocket transport sends it (made on first use, then kept)."""
        if self._json is None:
            self._json = json.dumps(
                {"id": self.id, "event": self.name, "data": self.data}, ensure_ascii=False
            )
        return self._json

    def json_as(self, event_id: str, topic: str) -> str:
        """`json` with another id and a ``"topic"`` (for a stream of several topics).

        The event's name and data are taken from `json` as it is: encoded once per
        entry, not once per stream.
        """
        own = len('{"id": ') + len(json.dumps(self.id))
        return f'{{"id": {json.dumps(event_id)}, "topic": {json.dumps(topic)}{self.json[own:]}'


_GONE: Final = Entry(seq=0, id="", event=Event(), wire=b"", published_at=0.0)
"""Stands in the ring's slots of expired entries until they are compacted away."""


@attrs.frozen(kw_only=True)
class Gap:
    """A resume point the log could not honour exactly.

    Attributes:
        reason: ``"expired"`` when the id was issued by this log but is older than what
            it retains; ``"unknown"`` otherwise (another epoch, never issued, malformed).
        last_event_id: The id asked for.
        lost: Events known to be lost (0 when the reason is ``"unknown"``).
        position: Where reading continues: just before the oldest retained event.
        topic: The topic it is on, on a stream of several topics (else ``None``).
    """

    reason: Literal["expired", "unknown"]
    last_event_id: str
    lost: int
    position: int
    topic: str | None = None


@attrs.frozen(kw_only=True)
class Resume:
    """Where a reader starts: after *position*, announcing *gap* first if there is one."""

    position: int
    gap: Gap | None = None


@attrs.define(eq=False)
class Ring:
    """Entries of one topic, bounded by count, bytes and age; fail closed when full.

    Args:
        epoch: A string unique to this ring's lifetime, the prefix of every id.
        capacity: Events retained at most.
        max_bytes: Bytes of encoded events retained at most.
        ttl: Seconds an event is retained.
    """

    epoch: str
    capacity: int
    max_bytes: int
    ttl: float
    _entries: list[Entry] = attrs.field(factory=list, init=False)
    _start: int = attrs.field(default=0, init=False)  # index of the oldest live entry
    _head: int = attrs.field(default=0, init=False)  # seq of the newest event
    _bytes: int = attrs.field(default=0, init=False)
    expired: int = attrs.field(default=0, init=False)
    """Events removed because their time was up."""

    def __len__(self) -> int:
        return len(self._entries) - self._start

    @property
    def head(self) -> int:
        """The position of the newest event ever appended (0 when none)."""
        return self._head

    @property
    def first(self) -> int:
        """The position of the oldest retained event (``head + 1`` when empty)."""
        return self._head - len(self) + 1

    @property
    def nbytes(self) -> int:
        """Bytes of encoded events retained."""
        return self._bytes

    @property
    def oldest(self) -> Entry | None:
        """The oldest retained entry."""
        return self._entries[self._start] if len(self) else None

    def id_of(self, position: int) -> str | None:
        """The id of the event at *position* (``None`` for 0): retained or not."""
        return f"{self.epoch}-{position:0{_SEQ_DIGITS}x}" if position > 0 else None

    def cursor_id(self, position: int) -> str:
        """An id that resumes after *position*, retained or not, 0 included."""
        return f"{self.epoch}-{position:0{_SEQ_DIGITS}x}"

    def entry(self, position: int) -> Entry | None:
        """The retained entry at *position*, if any."""
        index = position - self.first
        if 0 <= index < len(self):
            return self._entries[self._start + index]
        return None

    def parse(self, event_id: str) -> int | None:
        """The position an id of this ring names, or ``None`` for another epoch.

        Raises:
            ValueError: *event_id* does not have the shape of an id.
        """
        epoch, sep, seq = event_id.rpartition("-")
        if not sep or len(seq) != _SEQ_DIGITS or not epoch:
            raise ValueError(f"malformed event id {event_id[:64]!r}")
        try:
            position = int(seq, 16)
        except ValueError:
            raise ValueError(f"malformed event id {event_id[:64]!r}") from None
        if seq != f"{position:0{_SEQ_DIGITS}x}":
            raise ValueError(f"malformed event id {event_id[:64]!r}")
        return position if epoch == self.epoch else None

    def resolve(self, last_event_id: str | None) -> Resume:
        """Where a reader resuming after *last_event_id* starts; never raises.

        ``None`` means "from now on": after the head.
        """
        if last_event_id is None:
            return Resume(position=self._head)
        try:
            position = self.parse(last_event_id)
        except ValueError:
            position = None
        if position is None or position > self._head:
            return Resume(
                position=self.first - 1,
                gap=Gap(
                    reason="unknown", last_event_id=last_event_id, lost=0, position=self.first - 1
                ),
            )
        if position < self.first - 1:
            return Resume(position=self.first - 1, gap=self.gap_after(position, last_event_id))
        return Resume(position=position)

    def gap_after(self, position: int, last_event_id: str | None = None) -> Gap:
        """The gap a reader at *position* (older than the oldest retained) faces."""
        return Gap(
            reason="expired",
            last_event_id=last_event_id
            if last_event_id is not None
            else self.id_of(position) or "",
            lost=self.first - 1 - position,
            position=self.first - 1,
        )

    def read_after(self, position: int, limit: int) -> list[Entry] | Gap:
        """Up to *limit* retained entries after *position*, oldest first.

        Returns a `Gap` instead when events after *position* are no longer retained.
        """
        first = self.first
        if position < first - 1:
            return self.gap_after(position)
        index = self._start + position - first + 1
        return self._entries[index : index + limit]

    def expire(self, now: float) -> int:
        """Drop the entries older than the TTL; returns how many went."""
        entries, start, cutoff = self._entries, self._start, now - self.ttl
        end = start
        while end < len(entries) and entries[end].published_at <= cutoff:
            self._bytes -= len(entries[end].wire)
            entries[end] = _GONE  # free the event now; the slot goes at the next compaction
            end += 1
        gone = end - start
        if gone:
            self._start = end
            self.expired += gone
            if end >= _COMPACT_AT and end * 2 >= len(entries):
                del entries[:end]
                self._start = 0
        return gone

    def room_for(self, count: int, nbytes: int) -> bool:
        """Whether *count* more events of *nbytes* in all fit now."""
        return len(self) + count <= self.capacity and self._bytes + nbytes <= self.max_bytes

    def fits_ever(self, count: int, nbytes: int) -> bool:
        """Whether *count* events of *nbytes* would fit in an empty ring."""
        return count <= self.capacity and nbytes <= self.max_bytes

    def free_at(self) -> float | None:
        """When the oldest entry expires, freeing room (``None`` when empty)."""
        oldest = self.oldest
        return None if oldest is None else oldest.published_at + self.ttl

    def wire_size(self, body: bytes) -> int:
        """Bytes an event whose body (fields but ``id:``) is *body* takes in the ring."""
        return len(body) + self._id_line_size

    @property
    def _id_line_size(self) -> int:
        return len(self.epoch) + _SEQ_DIGITS + 6  # "id: " + epoch + "-" + seq + "\n"

    def restart(self, head: int) -> int:
        """Drop every retained entry and go on from *head*; returns how many went.

        For a ring that mirrors a log kept elsewhere (see `extend`): when events between
        the head and *head* were missed, readers behind find a `Gap`.
        """
        gone = len(self)
        self.expired += gone
        self._entries.clear()
        self._start = self._bytes = 0
        self._head = head
        return gone

    def extend(self, entries: Sequence[Entry]) -> None:
        """Append entries made elsewhere, ids included, at positions ``head + 1`` on.

        The caller numbers them contiguously and checks room if it must (a mirror of a
        log bounded elsewhere does not).
        """
        if not entries:
            return
        if entries[0].seq != self._head + 1 or entries[-1].seq != self._head + len(entries):
            raise ValueError("entries must continue the ring's positions without a hole")
        self._bytes += sum(len(entry.wire) for entry in entries)
        self._entries.extend(entries)
        self._head = entries[-1].seq

    def append(self, bodies: Sequence[tuple[Event, bytes]], now: float) -> list[Entry]:
        """Append events with their encoded bodies; returns their entries.

        The caller has checked `room_for`. Each body is ``encode(event)`` of an event
        without an id: the ``id:`` line is put in front of it here.
        """
        seq, epoch = self._head, self.epoch
        added = []
        for event, body in bodies:
            seq += 1
            event_id = f"{epoch}-{seq:0{_SEQ_DIGITS}x}"
            wire = b"id: " + event_id.encode() + b"\n" + body
            self._bytes += len(wire)
            added.append(Entry(seq=seq, id=event_id, event=event, wire=wire, published_at=now))
        self._entries.extend(added)
        self._head = seq
        return added
