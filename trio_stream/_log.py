"""Replay logs: where events wait, bounded by count, bytes and age."""

from __future__ import annotations

import heapq
import itertools
import secrets
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, ClassVar, Final, Protocol

import attrs
import trio

from ._core._errors import (
    BatchTooLargeError,
    IdempotencyKeyReusedError,
    LocalProtocolError,
    TrioStreamError,
)
from ._core._events import Event, encode
from ._core._idempotency import DIGEST_LENGTH, check_idempotency_key, digest
from ._core._ring import Entry, Gap, Resume, Ring

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Sequence

__all__ = [
    "AlreadyPublished",
    "BackendUnavailableError",
    "LagWatcher",
    "LogStatistics",
    "MemoryLog",
    "wait_any_after",
]

DEFAULT_CAPACITY: Final = 10_000
DEFAULT_MAX_BYTES: Final = 16 * 1024 * 1024
DEFAULT_TTL: Final = 30.0


class BackendUnavailableError(TrioStreamError):
    """The backend that holds a topic's log (Redis) cannot be reached now.

    Nothing was published, unless *maybe_published* is true: the request may have
    reached the backend and its answer was lost (a timeout), so the events may have
    been published (publishing them again may publish them twice). Try again after
    *retry_after* seconds.
    """

    def __init__(self, message: str, *, retry_after: float, maybe_published: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.maybe_published = maybe_published


class AlreadyPublished(TrioStreamError):
    """The idempotency key given to a log's append names an earlier append of the same
    events, within the log's TTL: nothing was appended now.

    Not an error (the publish has succeeded, earlier): a signal, as `trio.WouldBlock` is
    for a full log. ``Hub`` turns it into a `Published` result with ``replayed`` set.

    Attributes:
        ids: The ids the earlier append gave the events.
    """

    def __init__(self, ids: list[str]) -> None:
        super().__init__(f"already published as {ids[0]!r}..{ids[-1]!r}" if ids else "")
        self.ids = ids


class LagWatcher(Protocol):
    """A reader that wants to hear when the log's head passes its lag threshold."""

    def lag_threshold(self) -> int:
        """The head position at which this reader is too far behind."""
        ...

    def on_lag(self) -> None:
        """Called once when the head reaches `lag_threshold` (then the watch ends)."""
        ...


@attrs.frozen(kw_only=True)
class LogStatistics:
    """A snapshot of a log.

    Attributes:
        depth: Events retained.
        nbytes: Bytes of encoded events retained (and of idempotency keys remembered).
        capacity: Events the log may retain.
        max_bytes: Bytes the log may retain.
        saturation: The larger of ``depth / capacity`` and ``nbytes / max_bytes``.
        oldest_id: Id of the oldest retained event.
        head_id: Id of the newest event.
        published: Events accepted since the log was made.
        expired: Events dropped because their time was up.
        rejected: Events refused because the log was full.
        waiters: Tasks waiting for new events.
        idempotency_keys: Idempotency keys remembered (at most one per event retained).
    """

    depth: int
    nbytes: int
    capacity: int
    max_bytes: int
    saturation: float
    oldest_id: str | None
    head_id: str | None
    published: int
    expired: int
    rejected: int
    waiters: int
    idempotency_keys: int = 0


_ACCEPTED: Final = itertools.count(1)


def number_accepted(entries: Iterable[Entry]) -> None:
    """Number *entries* in the order they were accepted, across every log of the process
    (`Entry.order`), so that streams of several topics interleave them rightly."""
    for entry in entries:
        entry.order = next(_ACCEPTED)


_Watch = list[Any]  # [threshold, order, watcher, alive]: a heap item, mutable in place
_Key = tuple[str, str]  # an idempotency key and the digest of its events


def _key_size(key: str) -> int:
    """Bytes an idempotency key counts toward a log's ``max_bytes``: it and its digest."""
    return len(key) + DIGEST_LENGTH


def _clean(event: Event) -> Event:
    return event if event.id is None else attrs.evolve(event, id=None)


@attrs.frozen
class _Remembered:
    """What a log remembers of an append under an idempotency key."""

    digest: str
    first: int
    count: int


@attrs.define(eq=False)
class MemoryLog:
    """A topic's replay log in this process's memory (the default backend).

    Events are encoded once, when they are appended; every reader shares the bytes.
    Appending wakes all waiting readers at once, whatever their number.

    An append may carry an idempotency key: the log then remembers the key, with the
    digest of the events and their positions, for as long as it retains those events
    (they expire together, after *ttl*). Another append with that key meanwhile appends
    nothing and raises `AlreadyPublished` with the first one's ids (or
    `IdempotencyKeyReusedError` if its events differ). Since every key stands for at
    least one retained event, a log remembers at most *capacity* keys; each counts its
    length plus 32 bytes (its digest) toward *max_bytes*, so that *max_bytes* bounds
    the log's memory with or without keys.

    Args:
        topic: The topic's name.
        capacity: Events retained at most.
        max_bytes: Bytes of encoded events retained at most.
        ttl: Seconds an event is retained.
        epoch: The id prefix unique to this log's lifetime (random by default), so an
            id from before a restart is recognised as unknown.
    """

    topic: str
    capacity: int = DEFAULT_CAPACITY
    max_bytes: int = DEFAULT_MAX_BYTES
    ttl: float = DEFAULT_TTL
    epoch: str = attrs.field(factory=lambda: secrets.token_hex(4))
    _ring: Ring = attrs.field(init=False)
    _grown: trio.Event = attrs.field(factory=trio.Event, init=False)
    _waiters: int = attrs.field(default=0, init=False)
    _watch: list[_Watch] = attrs.field(factory=list, init=False)
    _watch_order: Iterator[int] = attrs.field(factory=itertools.count, init=False)
    _dead: int = attrs.field(default=0, init=False)
    _listeners: set[Callable[[], object]] = attrs.field(factory=set, init=False)
    _keys: OrderedDict[str, _Remembered] = attrs.field(factory=OrderedDict, init=False)
    """Idempotency keys, oldest first (their events expire in that order)."""
    _key_bytes: int = attrs.field(default=0, init=False)
    published: int = attrs.field(default=0, init=False)
    rejected: int = attrs.field(default=0, init=False)
    remote: ClassVar[bool] = False
    """Whether appending goes through the network (`submit`), not `append_nowait`."""

    def __attrs_post_init__(self) -> None:
        if self.capacity < 1 or self.max_bytes < 1 or not self.ttl > 0:
            raise ValueError("capacity, max_bytes and ttl must be positive")
        self._ring = self._make_ring()

    def _make_ring(self) -> Ring:
        return Ring(
            epoch=self.epoch, capacity=self.capacity, max_bytes=self.max_bytes, ttl=self.ttl
        )

    @property
    def ready(self) -> bool:
        """Whether the log can answer `resolve` (a mirror of a remote log loads first)."""
        return True

    async def wait_ready(self) -> None:
        """Wait until `ready`.

        Cancellation: safe.
        """

    def close(self) -> None:
        """Stop whatever keeps the log up to date (nothing, for a memory log)."""

    # -- reading ---------------------------------------------------------------------

    @property
    def head(self) -> int:
        """The position of the newest event (0 when none was ever appended)."""
        return self._ring.head

    @property
    def first(self) -> int:
        """The position of the oldest retained event (``head + 1`` when empty)."""
        return self._ring.first

    def __len__(self) -> int:
        return len(self._ring)

    @property
    def saturation(self) -> float:
        """How full the log is: the larger of its count and byte ratios, 0 to 1."""
        ring = self._ring
        return max(len(ring) / self.capacity, (ring.nbytes + self._key_bytes) / self.max_bytes)

    def id_of(self, position: int) -> str | None:
        """The id of the event at *position*, retained or not (``None`` for 0)."""
        return self._ring.id_of(position)

    def cursor_id(self, position: int) -> str:
        """An id that resumes exactly after *position* (0 included), retained or not."""
        return self._ring.cursor_id(position)

    def parse(self, event_id: str) -> int | None:
        """The position *event_id* names, or ``None`` when another log issued it.

        Raises:
            ValueError: *event_id* is malformed.
        """
        return self._ring.parse(event_id)

    def entry(self, position: int) -> Entry | None:
        """The retained entry at *position*, if any."""
        return self._ring.entry(position)

    def resolve(self, last_event_id: str | None) -> Resume:
        """Where a reader resuming after *last_event_id* starts; never raises."""
        self.expire()
        return self._ring.resolve(last_event_id)

    def resolve_pending(self, last_event_id: str | None) -> Resume:
        """`resolve` for a reader that asked before the log was `ready`.

        ``None`` then means after the head as it was when the log started loading.
        """
        return self.resolve(last_event_id)

    def read_after(self, position: int, limit: int) -> list[Entry] | Gap:
        """Up to *limit* entries after *position*; a `Gap` if some expired meanwhile."""
        return self._ring.read_after(position, limit)

    async def wait_after(self, position: int) -> None:
        """Wait until an event after *position* exists, or until `poke` is called.

        Cancellation: safe; nothing changes.
        """
        if self._ring.head <= position:
            self._waiters += 1
            try:
                await self._grown.wait()
            finally:
                self._waiters -= 1

    def poke(self) -> None:
        """Wake every task in `wait_after` (they look again and may wait again)."""
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        self._grown.set()
        self._grown = trio.Event()
        for listener in list(self._listeners):
            listener()

    # -- writing ---------------------------------------------------------------------

    def _prepare(
        self, events: Iterable[Event], key: str | None = None
    ) -> tuple[list[tuple[Event, bytes]], int]:
        """Encode *events*; their size in the log, with *key*'s if there is one."""
        try:
            bodies = [(e, encode(e)) for e in map(_clean, events)]
        except UnicodeEncodeError as error:
            raise LocalProtocolError(f"event data is not valid Unicode: {error.reason}") from None
        nbytes = sum(self._ring.wire_size(body) for _, body in bodies)
        if key is not None and bodies:
            nbytes += _key_size(key)
        if not self._ring.fits_ever(len(bodies), nbytes):
            raise BatchTooLargeError(
                f"{len(bodies)} events of {nbytes} bytes can never fit in the log of "
                f"topic {self.topic!r} ({self.capacity} events, {self.max_bytes} bytes)"
            )
        return bodies, nbytes

    def _commit(
        self, bodies: list[tuple[Event, bytes]], nbytes: int, key: _Key | None = None
    ) -> list[Entry] | None:
        """Append, all or none (``None``: no room); no checkpoint from check to append.

        Raises:
            AlreadyPublished: *key* names an earlier append of the same events.
            IdempotencyKeyReusedError: *key* names an earlier append of other events.
        """
        ring = self._ring
        now = trio.current_time()
        self._expire(now)
        if key is not None:
            self._recall(*key)
        if not ring.room_for(len(bodies), nbytes + self._key_bytes):
            return None
        entries = ring.append(bodies, now)
        number_accepted(entries)
        self.published += len(entries)
        if entries:
            if key is not None:
                self._keys[key[0]] = _Remembered(key[1], entries[0].seq, len(entries))
                self._key_bytes += _key_size(key[0])
            self._grew()
        return entries

    def _recall(self, key: str, events_digest: str) -> None:
        """Raise if *key* is remembered: `AlreadyPublished`, or the error if it was used
        for other events."""
        remembered = self._keys.get(key)
        if remembered is None:
            return
        if remembered.digest != events_digest:
            raise IdempotencyKeyReusedError(
                f"idempotency key {key!r} was used on topic {self.topic!r} for other events"
            )
        first = remembered.first
        raise AlreadyPublished(
            [self._ring.cursor_id(p) for p in range(first, first + remembered.count)]
        )

    def _expire(self, now: float) -> int:
        """Drop the events whose time is up, and the keys of those events."""
        gone = self._ring.expire(now)
        keys = self._keys
        if gone and keys:
            first = self._ring.first
            while keys:
                key, remembered = next(iter(keys.items()))
                if remembered.first >= first:
                    break
                del keys[key]
                self._key_bytes -= _key_size(key)
        return gone

    def _keyed(self, bodies: list[tuple[Event, bytes]], key: str | None) -> _Key | None:
        return None if key is None or not bodies else (key, digest([e for e, _ in bodies]))

    def _grew(self) -> None:
        """Wake the readers waiting for new events; tell the lag watchers."""
        self._wake()
        self._check_watchers()

    def append_nowait(
        self, events: Iterable[Event], *, idempotency_key: str | None = None
    ) -> list[Entry]:
        """Append *events* at once, all or none; returns their entries (with ids).

        With *idempotency_key*, the log remembers the append under it for as long as it
        retains the events (see the class's description), unless there are no events.

        Raises:
            AlreadyPublished: *idempotency_key* names an earlier append of the same
                events, whose ids it carries: nothing was appended (not an error).
            IdempotencyKeyReusedError: *idempotency_key* names an earlier append of
                other events: nothing was appended.
            trio.WouldBlock: The log is full of events that have not expired yet
                (fail closed: nothing already accepted is dropped to make room).
            BatchTooLargeError: The events could never fit, even in an empty log.
            LocalProtocolError: An event's data is not valid Unicode, or
                *idempotency_key* is not 1-128 visible ASCII characters.
        """
        if idempotency_key is not None:
            check_idempotency_key(idempotency_key)
        bodies, nbytes = self._prepare(events, idempotency_key)
        entries = self._commit(bodies, nbytes, self._keyed(bodies, idempotency_key))
        if entries is None:
            self.rejected += len(bodies)
            raise trio.WouldBlock
        return entries

    async def append(
        self, events: Iterable[Event], *, idempotency_key: str | None = None
    ) -> list[Entry]:
        """Append *events*, waiting while the log is full; returns their entries.

        *idempotency_key* as for `append_nowait`: it is looked up again each time the
        log has room, so of two appends waiting with the same key, one appends.

        Raises:
            AlreadyPublished: *idempotency_key* names an earlier append of the same
                events, whose ids it carries: nothing was appended (not an error).
            IdempotencyKeyReusedError: It names an earlier append of other events.
            BatchTooLargeError: The events could never fit, even in an empty log.
            LocalProtocolError: An event's data is not valid Unicode, or a bad key.

        Cancellation: safe; if cancelled, nothing was appended.
        Backpressure: waits until enough of the oldest events expire.
        """
        if idempotency_key is not None:
            check_idempotency_key(idempotency_key)
        bodies, nbytes = self._prepare(events, idempotency_key)
        key = self._keyed(bodies, idempotency_key)
        while (entries := self._commit(bodies, nbytes, key)) is None:
            free_at = self._ring.free_at()
            assert free_at is not None  # a full log holds something
            await trio.sleep_until(free_at)
        await trio.lowlevel.checkpoint()
        return entries

    async def submit(
        self,
        events: Iterable[Event],
        *,
        idempotency_key: str | None = None,
        trace_context: str | None = None,
    ) -> list[str]:
        """Append *events* now, all or none, or refuse; returns their ids.

        The form of `append_nowait` that works for remote logs too (`remote`).
        *trace_context*, the publish span's ``traceparent``, travels with the events of a
        remote log to the other processes; a memory log has no use for it.

        Raises:
            AlreadyPublished: *idempotency_key* names an earlier publish of the same
                events (see `append_nowait`).
            IdempotencyKeyReusedError: It names an earlier publish of other events.
            trio.WouldBlock: The log is full of unexpired events (fail closed).
            BatchTooLargeError: The events could never fit, even in an empty log.
            LocalProtocolError: An event's data is not valid Unicode, or a bad key.
            BackendUnavailableError: A remote log's backend cannot be reached.
        """
        entries = self.append_nowait(events, idempotency_key=idempotency_key)
        return [entry.id for entry in entries]

    def retry_after(self) -> float:
        """Seconds until a full log frees room (0 when it has room)."""
        free_at = self._ring.free_at()
        return 0.0 if free_at is None else max(0.0, free_at - trio.current_time())

    def expire(self) -> int:
        """Drop the events whose time is up (and their idempotency keys); how many went."""
        return self._expire(trio.current_time())

    # -- lag watching ----------------------------------------------------------------

    def watch_lag(self, watcher: LagWatcher) -> object:
        """Call ``watcher.on_lag()`` once the head reaches ``watcher.lag_threshold()``.

        The threshold is read again when it is reached, so a reader that kept up only
        moves its watch forward: the cost is per reader that falls behind, not per event.

        Returns:
            A handle for `unwatch_lag`.
        """
        item: _Watch = [watcher.lag_threshold(), next(self._watch_order), watcher, True]
        heapq.heappush(self._watch, item)
        return item

    def unwatch_lag(self, handle: object) -> None:
        """End the watch *handle* (from `watch_lag`), if it is still on."""
        assert isinstance(handle, list)
        if handle[3]:
            handle[3] = False
            self._dead += 1
            if self._dead * 2 > len(self._watch):
                self._watch = [item for item in self._watch if item[3]]
                heapq.heapify(self._watch)
                self._dead = 0

    def _check_watchers(self) -> None:
        watch, head = self._watch, self._ring.head
        while watch and watch[0][0] <= head:
            item = heapq.heappop(watch)
            if not item[3]:
                self._dead -= 1
                continue
            watcher = item[2]
            threshold = watcher.lag_threshold()
            if threshold <= head:
                item[3] = False
                watcher.on_lag()
            else:
                item[0] = threshold
                heapq.heappush(watch, item)

    def statistics(self) -> LogStatistics:
        """A snapshot of the log (after expiring what is due)."""
        self.expire()
        ring = self._ring
        oldest = ring.oldest
        return LogStatistics(
            depth=len(ring),
            nbytes=ring.nbytes + self._key_bytes,
            capacity=self.capacity,
            max_bytes=self.max_bytes,
            saturation=self.saturation,
            oldest_id=None if oldest is None else oldest.id,
            head_id=ring.id_of(ring.head),
            published=self.published,
            expired=ring.expired,
            rejected=self.rejected,
            waiters=self._waiters,
            idempotency_keys=len(self._keys),
        )


async def wait_any_after(logs: Sequence[MemoryLog], positions: Sequence[int]) -> None:
    """Wait until one of *logs* has an event after its position in *positions*, or is poked.

    One wake-up for a reader of several logs, without a task per log.

    Cancellation: safe; nothing changes.
    """
    if any(log.head > position for log, position in zip(logs, positions, strict=True)):
        return
    woken = trio.Event()
    for log in logs:
        log._listeners.add(woken.set)
        log._waiters += 1
    try:
        await woken.wait()
    finally:
        for log in logs:
            log._listeners.discard(woken.set)
            log._waiters -= 1
