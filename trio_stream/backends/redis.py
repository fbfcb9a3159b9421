"""Topic logs on Redis Streams, so that many processes (and hosts) serve as one.

Needs ``coredis`` (the ``redis`` extra). Per topic, Redis holds two keys, under a
configurable prefix (``trio_stream:`` by default):

- ``<prefix>{<topic>}:log``, a stream of the topic's events (fields ``e``: name, ``d``:
  data, ``s``: encoded size, ``c``: running total of sizes, and, only when the publisher
  traces, ``t``: the publish span's W3C ``traceparent``), with ids ``<ms>-<n>``: the
  Redis clock in milliseconds (never going back) and the topic's event number;
- ``<prefix>{<topic>}:meta``, a hash with the last ``n``, the running size total ``c``
  and the last ``ms``.

Publishing runs one Lua script: trim the expired events (``XTRIM MINID``), check count
and bytes of what remains against the limits, refuse (fail closed) or ``XADD`` all the
events; so publishers on any number of processes together never overshoot. Both keys
expire when idle (the stream after ``max(2 * ttl, 60 s)``, the hash after a week).

A publish with an idempotency key K uses a third key, ``<prefix>{<topic>}:idem:<K>``
(the same hash slot), holding the digest of the events and their ids for the TTL
(``PX``). The same script looks it up first: if it is there, nothing is appended and
the script answers with those ids (or says the key was used for other events); if not,
it appends and sets it. So of any number of processes receiving the same retry, one
appends.

Reading: each process keeps, per topic it serves, a `RedisLog`: a local mirror (the same
ring as the memory log, entries encoded once per process) fed by one task that follows
the stream with ``XREAD BLOCK`` from the last id it saw. Ten thousand local streams of a
topic cost one Redis reader. A mirror starts by loading what Redis retains (``XRANGE``
over the TTL window), so a ``Last-Event-ID`` issued by any process resumes exactly here.
Local positions are the event numbers, so they stay contiguous across processes.

When Redis cannot be reached, publishing raises `BackendUnavailableError` (the app
answers 503), open streams keep their heartbeats, and each reader retries with back-off
from the last id it saw: nothing accepted is lost or repeated.

Limits: the global bucket and each client's bucket are shared (`SharedBucket`): one
state per bucket in Redis (the hash ``<prefix>limit:global``, ``<prefix>limit:client:<id>``,
expiring once idle), so that the limits hold for all processes together while the
per-event path stays local. A bucket that one process alone uses is owned by it (it keeps
the state; nothing asked of Redis per event; processes renew their lives as owners in
``<prefix>owners``); once another process needs it, the owner is asked to give it back
(``<prefix>releases``) and they all lease a few tokens at a time from the GCRA state in
Redis (`LeasedTokens`). While Redis cannot be reached, they grant nothing.

Acks: a process that opens a stream for a client says so in ``<prefix>client:<id>``
(expiring after ``client_ttl``, renewed while the stream lasts); an ack posted to a
process that cannot apply it is forwarded through the capped stream ``<prefix>acks``,
which every process follows (as it follows the pause announcements, ``<prefix>pauses``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
from functools import partial
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import attrs
import coredis
import coredis.exceptions
import trio
from coredis.tokens import PureToken

from .._core._errors import IdempotencyKeyReusedError, TrioStreamError
from .._core._events import Event, encode
from .._core._idempotency import check_idempotency_key, digest
from .._core._limits import Bucket, LeasedTokens, TokenBucket, _at_least_one, _positive
from .._core._ring import Entry, Resume, Ring
from .._log import AlreadyPublished, BackendUnavailableError, MemoryLog, number_accepted

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from .._hub import Hub, HubConfig

__all__ = ["DEFAULT_PREFIX", "RedisBackend", "RedisLog", "SharedBucket"]

logger: Final = logging.getLogger("trio_stream")

DEFAULT_PREFIX: Final = "trio_stream:"
READ_BLOCK_MS: Final = 5_000
READ_COUNT: Final = 1_000
COMMAND_TIMEOUT: Final = 5.0
"""Seconds a Redis command (other than the blocking read's wait) may take."""
MIN_BACKOFF: Final = 0.05
MAX_BACKOFF: Final = 2.0
PUBLISH_RETRY_AFTER: Final = 1.0
META_IDLE_MS: Final = 7 * 24 * 3600 * 1000
PAUSES_KEPT: Final = 10_000
"""Pause announcements kept (about) in ``<prefix>pauses``, for the processes to follow."""
ACKS_KEPT: Final = 10_000
"""Forwarded acks kept (about) in ``<prefix>acks``, for the processes to follow."""
LEASE_AHEAD: Final = 0.1
"""Seconds before its window opens that a shared bucket's token may be leased.

A busy shared bucket leases about ``rate * LEASE_AHEAD`` tokens at a time, so asks
Redis at most about ``2 / LEASE_AHEAD`` times a second, whatever its rate.
"""
LEASE_FLOOR: Final = 0.005
"""A shared bucket waiting for a lease says it is ready no sooner than this from now."""
OWNER_HOLD: Final = 3.0
"""Seconds a process stays an owner of buckets after its last renewal.

A process that crashes or loses Redis keeps the buckets it owns from the others this
long (they then take them over as if it had emptied them). A saturated process can
take a second or two for a round trip to Redis (coredis takes several task steps, each
one pass of a busy scheduler): if its renewal comes late, its buckets pause, and resume
when it comes (see `RedisBackend.epoch`).
"""
OWNER_RENEW: Final = 0.5
"""Seconds between renewals of a process's life as an owner of buckets."""
PAUSED_POLL: Final = 0.2
"""While an owned bucket is paused, `SharedBucket.ready_at` says to look again this soon."""
RELEASES_KEPT: Final = 10_000
"""Release requests kept (about) in ``<prefix>releases``, for the processes to follow."""
OWNED_IDLE: Final = 30.0
"""Seconds after its last use that an owned bucket is given back (checked this often)."""
OWNED_KEY_TTL: Final = 120.0
"""Seconds an owned bucket's key lives in Redis unless its owner touches it (or longer:
see `owned_key_ttl`)."""

_ERRORS: Final = (coredis.exceptions.RedisError, OSError, trio.TooSlowError)


def owned_key_ttl(span: float) -> float:
    """Seconds an owned bucket's key lives after its owner took or touched it.

    If the owner crashed, what it may have granted (until its next touch, or its
    renewals' lapse) must stay counted for *span* (``burst / rate``) more.
    """
    return max(OWNED_KEY_TTL, 2 * OWNED_IDLE + OWNER_HOLD + span)


_PUBLISH_ARGS: Final = 8
"""Arguments of `_PUBLISH` before the events' (three per event: name, data, size)."""

_PUBLISH: Final = """
local stream, meta, idem = KEYS[1], KEYS[2], KEYS[3]
local k, trace, digest = tonumber(ARGV[6]), ARGV[7], ARGV[8]
local base = 8  -- ARGV[base + 3 * (i - 1) + 1 .. 3]: name, data and size of event i
if idem then
  local held = redis.call('GET', idem)
  if held then
    local earlier, ids = string.match(held, '^(%S+)(.*)$')
    if earlier ~= digest then
      return {3}
    end
    local replayed = {}
    for id in string.gmatch(ids, '%S+') do
      replayed[#replayed + 1] = id
    end
    return {2, replayed}
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl, capacity, max_bytes = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('XTRIM', stream, 'MINID', string.format('%d', now - ttl + 1))
local len = redis.call('XLEN', stream)
local m = redis.call('HMGET', meta, 'n', 'c', 'ms')
local n, c, last = tonumber(m[1]) or 0, tonumber(m[2]) or 0, tonumber(m[3]) or 0
local held, oldest = 0, now
if len > 0 then
  local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1]
  local f, fc, fs = first[2], 0, 0
  for i = 1, #f, 2 do
    if f[i] == 'c' then fc = tonumber(f[i + 1]) elseif f[i] == 's' then fs = tonumber(f[i + 1]) end
  end
  held = c - fc + fs
  oldest = tonumber(string.match(first[1], '^(%d+)'))
end
local ms = math.max(now, last)
local sizes, add = {}, 0
for i = 1, k do
  sizes[i] = tonumber(ARGV[base + 3 * i]) + #string.format('%d-%d', ms, n + i) + 5
  add = add + sizes[i]
end
if len + k > capacity or held + add > max_bytes then
  return {0, string.format('%d', math.max(0, oldest + ttl - now))}
end
local ids = {}
for i = 1, k do
  n = n + 1
  c = c + sizes[i]
  local id = string.format('%d-%d', ms, n)
  local at = base + 3 * (i - 1)
  if trace == '' then
    redis.call('XADD', stream, id, 'e', ARGV[at + 1], 'd', ARGV[at + 2],
               's', sizes[i], 'c', string.format('%d', c))
  else
    redis.call('XADD', stream, id, 'e', ARGV[at + 1], 'd', ARGV[at + 2],
               's', sizes[i], 'c', string.format('%d', c), 't', trace)
  end
  ids[i] = id
end
redis.call('HSET', meta, 'n', string.format('%d', n), 'c', string.format('%d', c),
           'ms', string.format('%d', ms))
redis.call('PEXPIRE', stream, ARGV[4])
redis.call('PEXPIRE', meta, ARGV[5])
if idem and k > 0 then
  redis.call('SET', idem, digest .. ' ' .. table.concat(ids, ' '), 'PX', ARGV[1])
end
return {1, ids}
"""
"""Answers ``{1, ids}`` (appended), ``{0, ms}`` (full: room in *ms*), ``{2, ids}``
(the idempotency key names an earlier publish: its ids) or ``{3}`` (the key was used for
other events)."""

_LIMIT: Final = """
local key, owners, releases = KEYS[1], KEYS[2], KEYS[3]
local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local want, ahead, need = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local me, hold, mine, op = ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV[9]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local span = burst * interval
local function fmt(x) return string.format('%.17g', x) end
local s = redis.call('HMGET', key, 't', 'o', 'w', 's')
local tat, owner, owned_span = tonumber(s[1]) or 0, s[2], tonumber(s[4]) or span
if owner == me then
  -- Ours: fold in what we took (not known: as if we emptied the bucket just now).
  if mine >= 0 then tat = math.max(tat, now + mine) else tat = math.max(tat, now + owned_span) end
  owner = false
elseif owner and tonumber(redis.call('HGET', owners, owner) or '0') < now then
  -- Its owner stopped renewing (it crashed, or lost Redis), so stopped granting by
  -- now; it may have emptied the bucket just before.
  tat = math.max(tat, now + owned_span)
  owner = false
end
if tat < now then tat = now end
if owner then
  if op ~= 'lease' then return {0, '0'} end
  if not s[3] or tonumber(s[3]) < now - hold then  -- not asked yet, or long ago: missed?
    redis.call('HSET', key, 'w', fmt(now))
    redis.call('XADD', releases, 'MAXLEN', '~', ARGV[11], '*', 'o', me, 'to', owner, 'k', key)
  end
  redis.call('HSET', key, 'h:' .. me, fmt(now + hold))
  return {-1, '0'}
end
redis.call('HDEL', key, 'o', 'w')
local others, last = false, now
local fields = redis.call('HGETALL', key)
for i = 1, #fields, 2 do
  local name = fields[i]
  if string.sub(name, 1, 2) == 'h:' and name ~= 'h:' .. me then
    local till = tonumber(fields[i + 1])
    if till >= now then
      others, last = true, math.max(last, till)
    else
      redis.call('HDEL', key, name)
    end
  end
end
if op == 'lease' and not others and tonumber(redis.call('HGET', owners, me) or '0') >= now then
  redis.call('HSET', key, 't', fmt(tat), 'o', me, 's', fmt(span))
  redis.call('HDEL', key, 'h:' .. me)
  redis.call('PEXPIRE', key, ARGV[10])
  return {-2, fmt(tat - now)}
end
local n = 0
if op == 'lease' then
  n = math.min(want, math.floor((now + span + ahead - tat) / interval))
  if n < need then n = need end
  if n > 0 then tat = tat + n * interval else n = 0 end
end
redis.call('HSET', key, 't', fmt(tat))
if op == 'leave' then
  redis.call('HDEL', key, 'h:' .. me)
else
  redis.call('HSET', key, 'h:' .. me, fmt(now + hold))
  last = math.max(last, now + hold)
end
redis.call('PEXPIRE', key, math.ceil((math.max(tat, last) - now) / 1000) + 1)
return {n, fmt(tat - now)}
"""
"""A bucket's state, in microseconds of Redis's clock, in the hash ``KEYS[1]``.

Fields: ``t``, the GCRA TAT; ``o``, the process that owns the bucket, if one does (it
keeps the TAT locally meanwhile; it is alive, and may take buckets, while its entry in
the hash ``KEYS[2]`` lies ahead), and ``s``, its ``burst * interval``; ``w``, when another
process last asked the owner to release it (on the stream ``KEYS[3]``; asked again if
that is ``hold`` ago);
``h:<process>``, until when a process holds it shared.

``op`` is ``lease``, ``release`` (the owner gives the bucket back and holds it shared)
or ``leave``. A caller that owned the bucket passes what it took as ``mine``, its TAT
ahead of its request's start (``-1``: not known). A lease answers ``{-2, tat - now}``
when the caller now owns the bucket (nobody else holds it); ``{-1, 0}`` when another
process owns it (asked to release it); else ``{n, last}``: it grants up to ``want``
tokens whose slots end at most ``burst * interval + ahead`` after now (so each is
leased at most ``ahead`` before its window opens), but at least ``need`` however far
ahead, and answers how many, and how far ahead of now the last slot (or, granting none,
the TAT) lies. Keys expire once idle: owned ones after ``ARGV[10]`` ms unless touched.
"""

_ALIVE: Final = """
local me, hold = ARGV[1], tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local was = tonumber(redis.call('HGET', KEYS[1], me) or '0')
redis.call('HSET', KEYS[1], me, string.format('%.17g', now + hold))
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if tonumber(all[i + 1]) < now then redis.call('HDEL', KEYS[1], all[i]) end
end
redis.call('PEXPIRE', KEYS[1], math.ceil(hold / 1000) + 1)
if was >= now then return 1 end
return 0
"""
"""Renew this process's life as an owner of buckets; ``1`` if it was still alive."""

_TOUCH: Final = """
local out = {}
for i = 1, #KEYS do
  local s = redis.call('HMGET', KEYS[i], 'o', 'w', 's')
  if s[1] == ARGV[1] then
    local span_ms = math.ceil((tonumber(s[3]) or 0) / 1000)
    redis.call('PEXPIRE', KEYS[i], math.max(tonumber(ARGV[2]), span_ms + tonumber(ARGV[3])))
    if s[2] then out[i] = 2 else out[i] = 1 end
  else
    out[i] = 0
  end
end
return out
"""
"""Keep the buckets this process owns from expiring: per key, ``1`` (still ours),
``2`` (ours, and somebody asked for it) or ``0`` (not ours any more).

An owned key lives ``ARGV[2]`` ms, and at least ``ARGV[3]`` ms beyond its span: if its
owner crashed, the state it left must outlive what it may have granted.
"""

_REGISTER: Final = """
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], '1', 'PX', ARGV[1])
end
return #KEYS
"""

_FORWARD_ACK: Final = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', 'o', ARGV[2], 't', ARGV[3],
           'c', ARGV[4], 'a', ARGV[5], 'u', ARGV[6])
return 1
"""


def _never_sent(error: BaseException) -> bool:
    """Whether *error* says that no connection was made, so no command was sent."""
    return isinstance(error, coredis.exceptions.ConnectionError) and str(error).startswith(
        "Unable to establish a connection"
    )


def _split_id(event_id: str) -> tuple[int, int]:
    """``(ms, n)`` of an id ``<ms>-<n>``.

    Raises:
        ValueError: *event_id* does not have that shape.
    """
    ms, sep, n = event_id.partition("-")
    for part in (ms, n):
        if not (part.isascii() and part.isdigit()) or len(part) > 19 or str(int(part)) != part:
            raise ValueError(f"malformed event id {event_id[:64]!r}")
    if not sep:
        raise ValueError(f"malformed event id {event_id[:64]!r}")
    return int(ms), int(n)


@attrs.define(eq=False)
class _RedisRing(Ring):
    """A ring of entries whose ids were given by Redis: position = ``n + base``."""

    base: int = attrs.field(default=0, init=False)
    """Added to event numbers: moves on when a topic's stream starts over."""

    def id_of(self, position: int) -> str | None:
        if position <= 0:
            return None
        entry = self.entry(position)
        return entry.id if entry is not None else f"0-{max(0, position - self.base)}"

    def cursor_id(self, position: int) -> str:
        return self.id_of(position) or "0-0"

    def parse(self, event_id: str) -> int | None:
        _, n = _split_id(event_id)
        position = n + self.base
        entry = self.entry(position)
        if entry is not None and entry.id != event_id and not event_id.startswith("0-"):
            return None  # the number of another event: from before the stream started over
        return position

    @property
    def _id_line_size(self) -> int:
        return 30  # "id: " + 13-digit ms + "-" + n + "\n", for the "could it ever fit" check


@attrs.define(eq=False)
class RedisLog(MemoryLog):
    """A topic's log on Redis, mirrored in this process; made by `RedisBackend`.

    Reading is local (the mirror); publishing goes to Redis (`submit`).
    """

    backend: RedisBackend | None = attrs.field(default=None, kw_only=True)
    remote = True
    _key: str = attrs.field(init=False)
    _meta: str = attrs.field(init=False)
    _idem: str = attrs.field(init=False)
    _loaded: trio.Event = attrs.field(factory=trio.Event, init=False)
    _scope: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)
    _last_id: str | None = attrs.field(default=None, init=False)
    _offset: float = attrs.field(default=0.0, init=False)  # trio time - Redis time
    _resync: bool = attrs.field(default=True, init=False)
    _full_until: float = attrs.field(default=-math.inf, init=False)
    _head_at_load: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        prefix = DEFAULT_PREFIX if self.backend is None else self.backend.prefix
        self._key = f"{prefix}{{{self.topic}}}:log"
        self._meta = f"{prefix}{{{self.topic}}}:meta"
        self._idem = f"{prefix}{{{self.topic}}}:idem:"

    def _make_ring(self) -> Ring:
        return _RedisRing(
            epoch="redis", capacity=self.capacity, max_bytes=self.max_bytes, ttl=self.ttl
        )

    @property
    def ready(self) -> bool:
        """Whether the mirror has loaded what Redis retains."""
        return self._loaded.is_set()

    async def wait_ready(self) -> None:
        """Wait until the mirror has loaded what Redis retains.

        Cancellation: safe.
        """
        await self._loaded.wait()

    def resolve_pending(self, last_event_id: str | None) -> Resume:
        """`resolve`, with ``None`` meaning after the head Redis had when loading began.

        So a stream asked for before the mirror loaded gets every event published
        after it asked, even those the loading brought.
        """
        if last_event_id is None:
            return Resume(position=max(self._head_at_load, self.first - 1))
        return self.resolve(last_event_id)

    def close(self) -> None:
        """Stop following the topic's stream."""
        self._scope.cancel()

    # -- publishing ------------------------------------------------------------------

    def append_nowait(
        self, events: Iterable[Event], *, idempotency_key: str | None = None
    ) -> list[Entry]:
        """Not available: a Redis log publishes through the network (`submit`).

        Raises:
            RuntimeError: Always.
        """
        raise RuntimeError("a Redis topic log publishes asynchronously: use Hub.submit")

    async def append(
        self, events: Iterable[Event], *, idempotency_key: str | None = None
    ) -> list[Entry]:
        """Not available: see `append_nowait` (``Hub.publish`` works).

        Raises:
            RuntimeError: Always.
        """
        raise RuntimeError("a Redis topic log publishes asynchronously: use Hub.submit")

    async def submit(
        self,
        events: Iterable[Event],
        *,
        idempotency_key: str | None = None,
        trace_context: str | None = None,
    ) -> list[str]:
        """Append *events* in Redis, all or none, or refuse; returns their ids.

        The events reach this process's readers when the mirror's reader brings them.
        *trace_context*, the publish span's ``traceparent``, is stored with each event,
        for the delivery spans of every process to link to.

        With *idempotency_key*, Redis remembers the publish under it for the log's TTL
        (unless there are no events), and a publish with that key from any process
        meanwhile appends nothing: checked, appended and remembered in one script.

        Raises:
            AlreadyPublished: *idempotency_key* names an earlier publish of the same
                events, whose ids it carries: nothing was appended (not an error).
            IdempotencyKeyReusedError: It names an earlier publish of other events.
            trio.WouldBlock: The topic is full of unexpired events, counting every
                process's (fail closed).
            BatchTooLargeError: The events could never fit, even in an empty log.
            LocalProtocolError: An event's data is not valid Unicode, or a bad key.
            BackendUnavailableError: Redis could not be reached: nothing was published,
                unless its ``maybe_published`` is true (the request may have reached
                Redis, and its answer did not come back: the outcome is unknown; a
                retry with the same *idempotency_key* publishes at most once).

        Cancellation: a cancelled call may or may not have published the events.
        """
        if idempotency_key is not None:
            check_idempotency_key(idempotency_key)
        bodies, _ = self._prepare(events)
        backend = self.backend
        if backend is None or backend.script is None:
            raise BackendUnavailableError(
                "redis unavailable: nothing was published", retry_after=PUBLISH_RETRY_AFTER
            )
        args: list[str | int] = [
            max(1, math.ceil(self.ttl * 1000)),
            self.capacity,
            self.max_bytes,
            max(2 * math.ceil(self.ttl * 1000), 60_000),
            META_IDLE_MS,
            len(bodies),
            trace_context or "",
            "" if idempotency_key is None else digest([event for event, _ in bodies]),
        ]
        assert len(args) == _PUBLISH_ARGS
        for event, body in bodies:
            args += [event.event or "", event.data, len(body)]
        keys = [self._key, self._meta]
        if idempotency_key is not None:
            keys.append(f"{self._idem}{idempotency_key}")
        try:
            with trio.fail_after(COMMAND_TIMEOUT):
                result: Any = await backend.script(keys=keys, args=args)
        except _ERRORS as error:
            backend.failed(error, f"publishing to topic {self.topic!r}")
            if _never_sent(error):
                raise BackendUnavailableError(
                    "redis unavailable: nothing was published", retry_after=PUBLISH_RETRY_AFTER
                ) from None
            raise BackendUnavailableError(
                "redis unavailable: no answer, the events may or may not have been published",
                retry_after=PUBLISH_RETRY_AFTER,
                maybe_published=True,
            ) from None
        backend.worked()
        status = int(result[0])
        if status == 0:
            self.rejected += len(bodies)
            self._full_until = trio.current_time() + int(result[1]) / 1000
            raise trio.WouldBlock
        if status == 3:
            raise IdempotencyKeyReusedError(
                f"idempotency key {idempotency_key!r} was used on topic {self.topic!r} "
                "for other events"
            )
        ids = [i.decode() if isinstance(i, bytes) else str(i) for i in result[1]]
        if status == 2:
            raise AlreadyPublished(ids)
        return ids

    def retry_after(self) -> float:
        """Seconds until the topic frees room, as Redis said when it last refused."""
        return max(0.0, self._full_until - trio.current_time())

    # -- following the stream ---------------------------------------------------------

    async def follow(self) -> None:
        """Load what Redis retains, then follow the stream, until `close` or cancelled.

        Errors are counted and retried with back-off, from the last id seen.
        """
        backend = self.backend
        assert backend is not None
        backoff = MIN_BACKOFF
        with self._scope:
            while True:
                if backend.client is None:  # the backend stopped
                    return
                try:
                    if self._resync:
                        await self._sync_clock(backend.client)
                    if not self._loaded.is_set():
                        await self._load(backend.client)
                    else:
                        await self._read(backend.client)
                except _ERRORS as error:
                    backend.failed(error, f"reading topic {self.topic!r}")
                    self._resync = True
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)
                else:
                    backend.worked()
                    backoff = MIN_BACKOFF

    async def _sync_clock(self, client: Any) -> None:
        assert self.backend is not None
        with trio.fail_after(COMMAND_TIMEOUT):
            now = await self.backend.redis_time()
        self._offset = trio.current_time() - now
        self._resync = False

    async def _load(self, client: Any) -> None:
        assert self.backend is not None
        with trio.fail_after(COMMAND_TIMEOUT):
            meta = await client.hmget(self._meta, ["n", "ms"])
            self._head_at_load = int(meta[0] or 0)
            now = await self.backend.redis_time()
            cutoff = math.floor(now * 1000 - self.ttl * 1000)
            items = await client.xrange(self._key, str(cutoff + 1), "+", count=self.capacity)
        ring = self._ring
        if items:
            _, n = _split_id(items[0].identifier.decode())
            ring.restart(n - 1)
            self._feed(items)
        else:
            n, ms = int(meta[0] or 0), int(meta[1] or 0)
            ring.restart(n)
            self._last_id = f"{ms}-{n}"
        self._loaded.set()

    async def _read(self, client: Any) -> None:
        assert self._last_id is not None
        with trio.fail_after(READ_BLOCK_MS / 1000 + COMMAND_TIMEOUT):
            got = await client.xread(
                {self._key: self._last_id}, count=READ_COUNT, block=READ_BLOCK_MS
            )
        if got:
            for items in got.values():
                self._feed(items)

    def _feed(self, items: Sequence[Any]) -> None:
        """Append entries read from Redis to the mirror; wake the readers."""
        ring = self._ring
        assert isinstance(ring, _RedisRing)
        batch: list[Entry] = []
        moved = False
        tracing = None if self.backend is None else self.backend.trace_context
        traced: bytes | None = None
        context: object = None
        for item in items:
            event_id = item.identifier.decode()
            ms, n = _split_id(event_id)
            head = batch[-1].seq if batch else ring.head
            position = n + ring.base
            if position <= head:  # the stream started over (its keys expired, or were lost)
                ring.base += head + 1 - position
                position = head + 1
            elif position > head + 1:  # trimmed before this process could read them
                ring.extend(batch)
                batch = []
                ring.restart(position - 1)
                moved = True
            fields = item.field_values
            name = fields.get(b"e", b"").decode("utf-8", "replace") or None
            event = Event(data=fields.get(b"d", b"").decode("utf-8", "replace"), event=name)
            wire = b"id: " + event_id.encode() + b"\n" + encode(event)
            if tracing is not None and (raw := fields.get(b"t")) != traced:
                traced, context = raw, tracing(raw)  # one context per publish, shared
            batch.append(
                Entry(
                    seq=position,
                    id=event_id,
                    event=event,
                    wire=wire,
                    published_at=ms / 1000 + self._offset,
                    trace_context=context,
                )
            )
            number_accepted(batch[-1:])
            self._last_id = event_id
        ring.extend(batch)
        self.published += len(batch)
        if batch or moved:
            self._grew()


_LEASE: Final = "lease"
_RELEASE: Final = "release"
_LEAVE: Final = "leave"


@attrs.define(eq=False, on_setattr=attrs.setters.NO_OP)  # checked once, at init: fast
class SharedBucket:
    """A token bucket every process on the Redis server draws from; made by `RedisBackend`.

    The same interface as `TokenBucket` (``available``, ``consume``, ``ready_at``,
    ``rate``, ``burst``, ``reset``), all synchronous and local, so the limits hold for
    all processes together while the per-event path stays in this process:

    - While one process alone uses a bucket (a client streaming on one process, the
      global bucket of a lone process), that process owns it: it holds the bucket's
      state (a `TokenBucket`) and asks Redis nothing per event. It stays the owner while
      it renews its life as an owner (every ``OWNER_RENEW``, one request for all its
      buckets) and uses the bucket; it pauses the bucket as soon as its renewals lapse
      (until one comes, and Redis confirms that the bucket is still its own), and gives
      it back once idle for ``OWNED_IDLE``.
    - When another process needs the bucket, it asks the owner (through Redis) to give
      it back with the state it reached. From then on all its users lease tokens from
      the GCRA state in Redis (`LeasedTokens`): each leased token is usable only within
      its own window, so that together they never let more than ``rate * t + burst``
      events go in ``t`` seconds. The first to lease once the others stopped for
      ``OWNER_HOLD`` owns it again. An owner that crashed or lost Redis is taken over
      after ``OWNER_HOLD``, as if it had emptied the bucket just before.

    Leasing is a task in the backend's nursery, one at a time per bucket, started when
    `consume` leaves fewer than half a lease, or when `ready_at` finds no token held. A
    lease is up to ``rate * LEASE_AHEAD`` tokens (at least 1, at most ``burst``): those
    whose windows open within ``LEASE_AHEAD``, so all of them after a quiet spell. When
    a caller waits and fewer are that close (other processes took them), Redis reserves
    a whole lease after theirs (first come, first served): the caller learns exactly
    when it may go, and busy processes take turns by leases, not by tokens.
    Until a lease comes, `ready_at` answers when one is expected, never sooner than
    ``LEASE_FLOOR`` from now: a caller that wakes then and finds no token asks again.
    While Redis cannot be reached the bucket grants nothing (fail closed) and retries
    with back-off.

    Tokens leased and not used in time are lost (this under-delivers, never over-);
    `consume` beyond `available` of leased tokens does not fail but is paid from the
    next lease.

    Args:
        backend: The Redis backend (running, or to be run) that holds the bucket.
        key: The Redis key of its state.
        rate: Tokens added per second, for all processes together.
        burst: The bucket's size, for all processes together.

    Attributes:
        leased: Tokens leased from Redis so far (statistics).
        requests: Requests answered by Redis so far (statistics).
        late: Leases answered too late to use any of their tokens (statistics).
    """

    backend: RedisBackend
    key: str
    rate: float = attrs.field(validator=_positive)
    burst: int = attrs.field(validator=_at_least_one)
    leased: int = attrs.field(default=0, init=False)
    requests: int = attrs.field(default=0, init=False)
    late: int = attrs.field(default=0, init=False)
    _late: bool = attrs.field(default=False, init=False)
    """The last lease came too late to use: ask for no reserve until one does not."""
    _own: TokenBucket | None = attrs.field(default=None, init=False)
    """The bucket's state while this process owns it."""
    _epoch: int = attrs.field(default=-1, init=False)
    """The backend's `RedisBackend.epoch` when this process took the bucket."""
    _owed: float | None = attrs.field(default=None, init=False)
    """The TAT this process reached as owner, not yet handed back to Redis."""
    _used_at: float = attrs.field(default=-math.inf, init=False)
    _giving_back: str | None = attrs.field(default=None, init=False)
    _tokens: LeasedTokens = attrs.field(factory=LeasedTokens, init=False)
    _size: int = attrs.field(init=False)
    _busy: bool = attrs.field(default=False, init=False)
    _wanted: bool = attrs.field(default=False, init=False)
    """Someone waits and no token is held: the next request reserves a whole lease."""
    _next_request: float = attrs.field(default=-math.inf, init=False)
    """After a refusal: no request before this, unless someone waits."""
    _retry_at: float = attrs.field(default=-math.inf, init=False)
    """After an error, or while the owner gives the bucket back: no request before this."""
    _ripens: float = attrs.field(default=-math.inf, init=False)
    """When the next token Redis grants can open its window, as of its last answer."""
    _backoff: float = attrs.field(default=MIN_BACKOFF, init=False)
    _patience: float = attrs.field(default=LEASE_FLOOR, init=False)

    def __attrs_post_init__(self) -> None:
        self._size = min(self.burst, max(1, math.ceil(self.rate * LEASE_AHEAD)))

    def _owned(self, now: float) -> TokenBucket | None:
        """The bucket's state if this process owns it and may use it at *now*.

        ``None`` while it is paused too: its owner's renewals lapsed (here, or in Redis
        and Redis has not confirmed since that the bucket is still this process's).
        """
        own, backend = self._own, self.backend
        if own is not None and (now >= backend.alive_until or self._epoch != backend.epoch):
            return None
        return own

    def _drop(self) -> None:
        """Stop using the bucket as its owner; what it took is owed to Redis."""
        if self._own is not None:
            self._owed = self._own.tat
            self._own = None

    def available(self, now: float) -> int:
        """Tokens at hand that may go at *now* (0 to ``burst``)."""
        own = self._owned(now)
        if own is not None:
            return own.available(now)
        return self._tokens.available(now)

    def consume(self, now: float, n: int) -> None:
        """Take *n* tokens at *now*; lease more if fewer than half a lease remain.

        Raises:
            ValueError: This process owns the bucket and fewer than *n* are available.
                (Leased tokens taken beyond `available` are paid from the next lease.)
        """
        self._used_at = now
        own = self._owned(now)
        if own is not None:
            own.consume(now, n)
            return
        tokens = self._tokens
        tokens.consume(now, n)
        if tokens.remaining(now) * 2 < self._size or tokens.debt:
            self._lease_soon(now)

    def ready_at(self, now: float, n: int = 1) -> float:
        """When *n* tokens should be at hand: exact for tokens held, else an estimate.

        Raises:
            ValueError: *n* exceeds ``burst``, so it would never be ready.
        """
        if n > self.burst:
            raise ValueError(f"cannot wait for {n} tokens in a bucket of {self.burst}")
        own = self._owned(now)
        if own is not None:
            return own.ready_at(now, n)
        if self._own is not None:  # paused
            return now + PAUSED_POLL
        at = self._tokens.ready_at(now, n)
        if at is not None:
            return at
        self._wanted = True
        self._lease_soon(now)
        return max(now, self._ripens, self._retry_at) + LEASE_FLOOR

    def reset(self) -> None:
        """Drop the tokens leased here (the state in Redis, shared, is left alone)."""
        self._tokens.clear()

    def prepare(self) -> None:
        """Ask Redis for the bucket now (if running), before the first event needs it."""
        self._wanted = True
        if self.backend.limit_script is not None:
            self._start()

    def give_back(self, *, keep: bool) -> None:
        """Stop owning the bucket and hand its state to Redis (*keep*: still using it)."""
        self._drop()
        self._giving_back = _RELEASE if keep else _LEAVE
        self._start()

    def lose(self) -> None:
        """Forget the bucket's state: another process took it over."""
        self._own = self._owed = None

    @property
    def owns(self) -> bool:
        """Whether this process owns the bucket (even if paused)."""
        return self._own is not None

    @property
    def ownership(self) -> object:
        """What changes each time this process takes the bucket, or stops owning it."""
        return self._own

    def confirm(self, epoch: int) -> None:
        """Redis confirmed that the bucket was still this process's at *epoch*."""
        if self._own is not None:
            self._epoch = max(self._epoch, epoch)

    def idle_since(self, moment: float) -> bool:
        """Whether the bucket was not used after *moment*."""
        return self._used_at < moment

    def _lease_soon(self, now: float) -> None:
        if not (now < self._next_request and not self._wanted):
            self._start()

    def _start(self) -> None:
        if self._busy:
            return
        if self.backend.spawn(self._talk):
            self._busy = True
        else:  # not running (yet, or any more): nothing to lease from
            self._retry_at = trio.current_time() + MIN_BACKOFF

    async def _talk(self) -> None:
        """Give the bucket back if asked to; lease tokens (while someone waits for them)."""
        backend = self.backend
        try:
            await backend.wait_alive()  # a bucket taken sooner would not be usable
            asked = False
            while backend.limit_script is not None:
                if self._retry_at > trio.current_time():
                    await trio.sleep_until(self._retry_at)
                op = self._giving_back
                if op is not None:
                    self._drop()  # not one token more from the state handed back
                    if await self._request(op):
                        self._giving_back = None
                        backend.disown(self)
                    asked = True  # then a lease only for someone waiting
                    continue
                if self._own is not None or (asked and not self._wanted):
                    return
                asked = True
                await self._request(_LEASE)
        finally:
            self._busy = False

    async def _request(self, op: str) -> bool:
        """One request; whether it was answered (a lease: whether tokens were granted)."""
        backend = self.backend
        script = backend.limit_script
        if script is None:
            return False
        interval = 1 / self.rate
        span = self.burst * interval
        sent, epoch = trio.current_time(), backend.epoch
        owed = self._owed
        mine = -1 if owed is None else math.ceil(1e6 * max(0.0, owed - sent))
        args = [
            repr(1e6 * interval),
            self.burst,
            self._size,
            round(LEASE_AHEAD * 1e6),
            self._size if self._wanted and not self._late else 0,
            backend.origin,
            round(OWNER_HOLD * 1e6),
            mine,
            op,
            math.ceil(1000 * owned_key_ttl(span)),
            RELEASES_KEPT,
        ]
        keys = [self.key, f"{backend.prefix}owners", f"{backend.prefix}releases"]
        if op == _LEASE:  # it may become ours: a request to give it back must find it
            backend.own(self)
        try:
            with trio.fail_after(COMMAND_TIMEOUT):
                count, last = await script(keys=keys, args=args)
        except _ERRORS as error:
            backend.failed(error, "leasing tokens")
            self._retry_at = trio.current_time() + self._backoff
            self._backoff = min(self._backoff * 2, MAX_BACKOFF)
            if op == _LEASE:
                backend.disown(self)
            return False
        backend.worked()
        received = trio.current_time()
        self.requests += 1
        self._backoff = MIN_BACKOFF
        self._owed = None  # handed back, or somebody took the bucket over meanwhile
        count, ahead = int(count), float(last) / 1e6
        if count == -2:  # ours now: its state, as late as it can be
            tat = received + ahead + self._tokens.debt * interval
            self._tokens.clear()
            if epoch != backend.epoch:  # our life lapsed meanwhile: maybe not ours now
                self._owed = tat
                return False
            own = TokenBucket(self.rate, self.burst)
            own.restore(tat)
            self._own, self._epoch = own, epoch
            backend.own(self)  # (again, if a touch crossed this request)
            self._used_at = max(self._used_at, received)
            self._wanted = False
            self._patience = LEASE_FLOOR
            return True
        if op == _LEASE:
            backend.disown(self)
        if count == -1:  # its owner was asked to give it back: look again soon
            self._retry_at = received + self._patience
            self._ripens = self._retry_at
            self._patience = min(self._patience * 2, OWNER_HOLD / 4)
            return False
        self._patience = LEASE_FLOOR
        if op != _LEASE:
            return True
        self._ripens = received + ahead + interval - span
        if count <= 0:
            # One can be leased LEASE_AHEAD before its window opens.
            self._next_request = self._ripens - LEASE_AHEAD
            return False
        self.leased += count
        if received - sent > span:  # no token's window is left: all lapsed on the way
            self.late += 1
            if not self._late:
                logger.warning(
                    "the round trip to Redis (%.3f s) took longer than the burst of %s "
                    "lasts (%.3f s): its leased tokens lapse unused (raise the burst)",
                    received - sent,
                    self.key,
                    span,
                )
            self._late = True  # reserve nothing ahead (that would starve the others)
            self._retry_at = received + self._backoff
            self._backoff = min(self._backoff * 2, MAX_BACKOFF)
            return False
        self._late = False
        self._wanted = False
        self._tokens.add(
            sent_at=sent,
            received_at=received,
            count=count,
            interval=interval,
            span=span,
            last_slot=ahead,
        )
        return True


@attrs.define(eq=False)
class RedisBackend:
    """Topic logs on one Redis server, shared by every process configured alike.

    Use it as ``HubConfig(backend=RedisBackend("redis://127.0.0.1:6379/0"))``; the hub
    runs it (`Hub.run_housekeeping`, started by the app's lifespan or `open_hub`).

    Args:
        url: ``redis://host:port/db`` (``rediss://`` for TLS, credentials in the URL).
        prefix: Put in front of every key, so that deployments can share a server.
        max_connections: Connections to Redis at most: each topic's reader holds one.

    Attributes:
        errors: Redis operations that failed.
        origin: This process's name in Redis (random).
        epoch: Counts the times this process's life as an owner of buckets lapsed in
            Redis; buckets it owned before are not its own any more.
        alive_until: Until when (`trio.current_time`) it may use the buckets it owns.
    """

    url: str
    prefix: str = attrs.field(default=DEFAULT_PREFIX, kw_only=True)
    max_connections: int = attrs.field(default=10_064, kw_only=True)
    errors: int = attrs.field(default=0, init=False)
    origin: str = attrs.field(factory=lambda: secrets.token_hex(8), init=False)
    epoch: int = attrs.field(default=0, init=False)
    alive_until: float = attrs.field(default=-math.inf, init=False)
    client: Any = attrs.field(default=None, init=False)
    script: Any = attrs.field(default=None, init=False)
    clock: Any = attrs.field(default=None, init=False)
    limit_script: Any = attrs.field(default=None, init=False)
    _alive_script: Any = attrs.field(default=None, init=False)
    _touch_script: Any = attrs.field(default=None, init=False)
    _owned: dict[str, SharedBucket] = attrs.field(factory=dict, init=False)
    """The buckets this process owns (or may, or gives back), by key."""
    _alive: trio.Event = attrs.field(factory=trio.Event, init=False)
    """Set once this process renewed its life as an owner of buckets (in this run)."""
    _register_script: Any = attrs.field(default=None, init=False)
    _forward_script: Any = attrs.field(default=None, init=False)
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)
    _waiting: list[RedisLog] = attrs.field(factory=list, init=False)
    _failing: bool = attrs.field(default=False, init=False)
    _streaming: set[str] = attrs.field(factory=set, init=False)
    """Clients this process holds streams of, as announced in ``<prefix>client:<id>``."""
    _client_ttl: float = attrs.field(default=300.0, init=False)
    trace_context: Callable[[bytes | None], object] | None = attrs.field(default=None, init=False)
    """Turns an entry's ``traceparent`` into a span context, while the hub traces."""

    def __attrs_post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"not a Redis URL: {self.url!r} (expected redis://host:port/db)")

    def open_log(self, topic: str, config: HubConfig) -> RedisLog:
        """A mirrored Redis log for *topic*; its reader starts now (or when `run` starts)."""
        log = RedisLog(
            topic,
            capacity=config.log_capacity,
            max_bytes=config.log_max_bytes,
            ttl=config.log_ttl,
            backend=self,
        )
        if self._nursery is not None:
            self._nursery.start_soon(log.follow)
        else:
            self._waiting.append(log)
        return log

    def bucket(self, key: str, rate: float, burst: int) -> Bucket:
        """The bucket named *key* that every process on this Redis server shares.

        Asked for at once (so usually owned by this process before its first event).
        """
        bucket = SharedBucket(self, f"{self.prefix}limit:{key}", rate, burst)
        bucket.prepare()
        return bucket

    async def wait_alive(self) -> None:
        """Wait until this process may own buckets (its first renewal in this run)."""
        await self._alive.wait()

    def own(self, bucket: SharedBucket) -> None:
        """Note that this process owns *bucket*, or may by a request in flight.

        `run` keeps its key alive, gives it back when idle or asked for.
        """
        self._owned[bucket.key] = bucket

    def disown(self, bucket: SharedBucket) -> None:
        """Note that *bucket* is not this process's (any more)."""
        if self._owned.get(bucket.key) is bucket:
            del self._owned[bucket.key]

    def check_id(self, event_id: str) -> None:
        """Check that *event_id* has the shape of this backend's ids (``<ms>-<n>``).

        Raises:
            ValueError: It does not.
        """
        _split_id(event_id)

    def spawn(self, task: Callable[[], Any]) -> bool:
        """Run *task* in the backend's nursery; ``False`` (and nothing done) unless running."""
        if self._nursery is None:
            return False
        self._nursery.start_soon(task)
        return True

    async def run(
        self, hub: Hub, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Open the connection pool and run the topics' readers until cancelled.

        Also follows the other processes' pause announcements and forwarded acks,
        applied to *hub*, and keeps this process's streaming clients announced.
        """
        client: Any = coredis.Redis.from_url(self.url, max_connections=self.max_connections)
        try:
            async with client, trio.open_nursery() as nursery:
                self.client = client
                self.script = client.register_script(_PUBLISH)
                self.clock = client.register_script("return redis.call('TIME')")
                self.limit_script = client.register_script(_LIMIT)
                self._alive_script = client.register_script(_ALIVE)
                self._touch_script = client.register_script(_TOUCH)
                self._register_script = client.register_script(_REGISTER)
                self._forward_script = client.register_script(_FORWARD_ACK)
                self._client_ttl = hub.config.client_ttl
                if hub.tracing is not None:
                    from .._tracing import remote_context  # needs opentelemetry-api

                    self.trace_context = remote_context
                self._nursery = nursery
                for log in self._waiting:
                    nursery.start_soon(log.follow)
                nursery.start_soon(self._follow, "pauses", partial(self._apply_pause, hub))
                nursery.start_soon(self._follow, "acks", partial(self._apply_ack, hub))
                nursery.start_soon(self._renew_clients, hub)
                nursery.start_soon(self._keep_alive)
                nursery.start_soon(self._keep_owned)
                nursery.start_soon(self._follow, "releases", self._apply_release)
                self._waiting.clear()
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self.client = self.script = self.clock = self.limit_script = None
            self._alive_script = self._touch_script = None
            self.alive_until = -math.inf
            self._alive = trio.Event()
            self._register_script = self._forward_script = None

    async def redis_time(self) -> float:
        """The Redis server's clock, in seconds since the epoch."""
        seconds, microseconds = await self.clock(keys=[], args=[])
        return int(seconds) + int(microseconds) / 1e6

    def share_pause(self, topic: str, client_id: str, after: str | None, *, paused: bool) -> None:
        """Announce to the other processes that a client was paused, or caught up."""
        if self._nursery is not None:
            fields = {"o": self.origin, "p": "1" if paused else "0", "t": topic, "c": client_id}
            fields["a"] = "" if after is None else after
            self._nursery.start_soon(self._announce, fields)

    async def _announce(self, fields: dict[str, str]) -> None:
        try:
            with trio.fail_after(COMMAND_TIMEOUT):
                await self.client.xadd(
                    f"{self.prefix}pauses",
                    fields,
                    trim_strategy=PureToken.MAXLEN,
                    trim_operator=PureToken.APPROXIMATELY,
                    threshold=PAUSES_KEPT,
                )
        except _ERRORS as error:
            self.failed(error, "announcing a pause")

    def _apply_pause(self, hub: Hub, fields: dict[str, str]) -> None:
        hub.apply_pause(
            fields.get("t", ""),
            fields.get("c", ""),
            fields.get("a") or None,
            paused=fields.get("p") == "1",
        )

    def share_client(self, client_id: str) -> None:
        """Announce that this process holds a stream of *client_id*.

        So that an ack posted to another process is forwarded (`forward_ack`) instead
        of answered 404. The announcement lasts ``client_ttl`` seconds (as long as an
        idle client's entry), renewed while the client streams here.
        """
        if self._nursery is not None and client_id not in self._streaming:
            self._streaming.add(client_id)
            self._nursery.start_soon(self._register, [client_id])

    async def _register(self, client_ids: list[str]) -> None:
        ttl_ms = max(1, math.ceil(self._client_ttl * 1000))
        try:
            for i in range(0, len(client_ids), READ_COUNT):
                keys = [f"{self.prefix}client:{c}" for c in client_ids[i : i + READ_COUNT]]
                with trio.fail_after(COMMAND_TIMEOUT):
                    await self._register_script(keys=keys, args=[ttl_ms])
        except _ERRORS as error:
            self.failed(error, "announcing streaming clients")

    async def _renew_clients(self, hub: Hub) -> None:
        """Renew the announcements of the clients that still stream here, now and then."""
        while True:
            await trio.sleep(self._client_ttl / 3)
            renew = []
            for client_id in list(self._streaming):
                try:
                    streaming = hub.client_statistics(client_id).streams > 0
                except TrioStreamError:  # forgotten
                    streaming = False
                if streaming:
                    renew.append(client_id)
                else:  # its announcement lapses by itself
                    self._streaming.discard(client_id)
            if renew:
                await self._register(renew)

    async def _keep_alive(self) -> None:
        """Renew this process's life as an owner of buckets every ``OWNER_RENEW`` seconds.

        The buckets it owns pause once ``OWNER_HOLD`` has passed since the last renewal
        sent, until the next one comes. If Redis saw that life lapse meanwhile, others
        may have taken them over: a new `epoch` keeps them paused until Redis confirms
        which are still this process's (one request for all), and the others are lost.
        """
        checked, doubtful = True, False
        while True:
            sent = trio.current_time()
            try:
                with trio.fail_after(COMMAND_TIMEOUT):
                    was_alive = await self._alive_script(
                        keys=[f"{self.prefix}owners"],
                        args=[self.origin, round(OWNER_HOLD * 1e6)],
                    )
            except _ERRORS as error:
                self.failed(error, "renewing bucket ownership")
                # It may have run, late, and its lost answer said that our life had
                # lapsed (the next one would then find it renewed): assume so.
                doubtful = doubtful or not _never_sent(error)
                await trio.sleep(MIN_BACKOFF)
                continue
            self.worked()
            if doubtful or not int(was_alive):
                self.epoch += 1
                checked, doubtful = False, False
            self.alive_until = sent + OWNER_HOLD
            self._alive.set()
            if not checked:
                checked = await self._touch([b for b in self._owned.values() if b.owns])
            await trio.sleep(OWNER_RENEW)

    async def _keep_owned(self) -> None:
        """Every ``OWNED_IDLE``: give back the owned buckets not used since; keep the
        keys of the others from expiring, and give back those another process asked for."""
        while True:
            await trio.sleep(OWNED_IDLE)
            idle_since = trio.current_time() - OWNED_IDLE
            kept = []
            for bucket in list(self._owned.values()):
                if bucket.idle_since(idle_since):
                    bucket.give_back(keep=False)
                else:
                    kept.append(bucket)
            await self._touch(kept)

    async def _touch(self, buckets: list[SharedBucket]) -> bool:
        """Keep the keys of *buckets* owned here alive, and learn which still are ours.

        Confirms those that are (at the `epoch` of the request), gives back those
        another process asked for, forgets the others; leaves alone those whose
        ownership changed meanwhile (their own request tells). Whether every request
        worked.
        """
        epoch = self.epoch
        held = [(bucket, bucket.ownership) for bucket in buckets if bucket.owns]
        for i in range(0, len(held), READ_COUNT):
            chunk = held[i : i + READ_COUNT]
            try:
                with trio.fail_after(COMMAND_TIMEOUT):
                    states = await self._touch_script(
                        keys=[bucket.key for bucket, _ in chunk],
                        args=[
                            self.origin,
                            round(OWNED_KEY_TTL * 1000),
                            math.ceil(1000 * owned_key_ttl(0.0)),
                        ],
                    )
            except _ERRORS as error:
                self.failed(error, "keeping owned buckets")
                return False
            for (bucket, ownership), state in zip(chunk, states, strict=True):
                if bucket.ownership is not ownership:
                    continue
                if int(state):
                    bucket.confirm(epoch)
                    if int(state) == 2:  # asked for, and the request missed
                        bucket.give_back(keep=True)
                else:  # taken over: our state is moot
                    bucket.lose()
                    self.disown(bucket)
        return True

    def _apply_release(self, fields: dict[str, str]) -> None:
        """Another process asks for a bucket this one owns: give it back."""
        if fields.get("to") != self.origin:
            return
        key = fields.get("k", "")
        bucket = self._owned.get(key)
        if bucket is not None:
            bucket.give_back(keep=True)
        elif key.startswith(f"{self.prefix}limit:"):
            # Not ours any more (the request crossed our giving it back), or it became
            # ours by a request whose answer was lost: give it back, state not known.
            SharedBucket(self, key, 1.0, 1).give_back(keep=False)

    async def forward_ack(
        self,
        topic: str,
        *,
        client_id: str,
        last_event_id: str,
        buffer_utilization: float | None = None,
    ) -> bool:
        """Hand an ack this process cannot apply to the processes streaming to the client.

        *topic* is ``""`` for the composite id of a stream of several topics.

        They apply it with `Hub.ack` when they read it, a few milliseconds later (errors
        there, such as an id never sent, are ignored). Returns ``False``, forwarding
        nothing, when no process announced a stream of *client_id* (`share_client`)
        within ``client_ttl``.

        Raises:
            BackendUnavailableError: Redis could not be reached: the ack may be lost.
        """
        script = self._forward_script
        if script is None:
            raise BackendUnavailableError(
                "redis unavailable: the ack was not forwarded", retry_after=PUBLISH_RETRY_AFTER
            )
        keys = [f"{self.prefix}client:{client_id}", f"{self.prefix}acks"]
        utilization = "" if buffer_utilization is None else repr(buffer_utilization)
        args = [ACKS_KEPT, self.origin, topic, client_id, last_event_id, utilization]
        try:
            with trio.fail_after(COMMAND_TIMEOUT):
                done = await script(keys=keys, args=args)
        except _ERRORS as error:
            self.failed(error, "forwarding an ack")
            raise BackendUnavailableError(
                "redis unavailable: the ack may not have been forwarded",
                retry_after=PUBLISH_RETRY_AFTER,
            ) from None
        self.worked()
        return bool(int(done))

    def _apply_ack(self, hub: Hub, fields: dict[str, str]) -> None:
        utilization = fields.get("u")
        # Not a client of ours, or not sent by us: some other process's business.
        topic = fields.get("t", "")
        # No topic: an ack of a stream of several topics (a composite id).
        ack = partial(hub.ack, topic) if topic else hub.ack_many
        with contextlib.suppress(TrioStreamError, ValueError):
            ack(
                client_id=fields.get("c", ""),
                last_event_id=fields.get("a", ""),
                buffer_utilization=float(utilization) if utilization else None,
            )

    async def _follow(self, name: str, apply: Callable[[dict[str, str]], None]) -> None:
        """Call *apply* with the fields of each entry other processes add to ``<prefix><name>``.

        From the newest entry when it starts; errors are counted and retried with
        back-off, from the last entry seen.
        """
        key, last, backoff = f"{self.prefix}{name}", None, MIN_BACKOFF
        while self.client is not None:
            try:
                with trio.fail_after(READ_BLOCK_MS / 1000 + COMMAND_TIMEOUT):
                    if last is None:
                        newest = await self.client.xrevrange(key, "+", "-", count=1)
                        last = newest[0].identifier.decode() if newest else "0-0"
                    got = await self.client.xread(
                        {key: last}, count=READ_COUNT, block=READ_BLOCK_MS
                    )
            except _ERRORS as error:
                self.failed(error, f"reading {name}")
                await trio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            self.worked()
            backoff = MIN_BACKOFF
            for items in (got or {}).values():
                for item in items:
                    last = item.identifier.decode()
                    fields = {k.decode(): v.decode() for k, v in item.field_values.items()}
                    if fields.get("o") != self.origin:
                        apply(fields)

    def problem(self) -> str | None:
        """``"redis unavailable"`` while operations fail, else ``None``."""
        return "redis unavailable" if self._failing or self.client is None else None

    def failed(self, error: BaseException, doing: str) -> None:
        """Count a failed operation; log when Redis starts failing."""
        self.errors += 1
        if not self._failing:
            self._failing = True
            logger.warning("redis unavailable while %s: %s", doing, error or type(error).__name__)

    def worked(self) -> None:
        """An operation succeeded: Redis is back, if it was away."""
        if self._failing:
            self._failing = False
            logger.warning("redis available again")
