"""The exceptions trio_stream raises, all under `TrioStreamError`."""

from __future__ import annotations

__all__ = [
    "BatchTooLargeError",
    "ClientPausedError",
    "IdempotencyKeyReusedError",
    "LimitExceededError",
    "LocalProtocolError",
    "NotSentError",
    "RateLimitedError",
    "RemoteProtocolError",
    "TopicLimitError",
    "TrioStreamError",
    "UnknownClientError",
]


class TrioStreamError(Exception):
    """Base class of every exception trio_stream raises on its own account."""


class LocalProtocolError(TrioStreamError, ValueError):
    """The caller asked for something the protocol cannot express.

    For example an event id containing a line break, which would split the event on the
    wire. The mistake is in the calling code, not in the peer.
    """


class RemoteProtocolError(TrioStreamError):
    """The peer sent something the protocol does not allow, or answered unexpectedly."""


class LimitExceededError(TrioStreamError):
    """A stream, connection or client limit is reached; try again after *retry_after* s."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimitedError(LimitExceededError):
    """The client's (or the server's) token bucket is empty."""


class TopicLimitError(TrioStreamError):
    """Creating the topic would exceed the number of topics the hub holds at once."""


class ClientPausedError(TrioStreamError):
    """The client fell too far behind on *topic* and must catch up by polling first.

    Attributes:
        topic: The topic it is paused on.
        client_id: The client.
        after: The id to poll after (``None``: from the oldest retained event).
        retry_after: Seconds to wait before polling.
    """

    def __init__(
        self, *, topic: str, client_id: str, after: str | None, retry_after: float
    ) -> None:
        super().__init__(f"client {client_id!r} is paused on topic {topic!r}: poll to catch up")
        self.topic = topic
        self.client_id = client_id
        self.after = after
        self.retry_after = retry_after


class UnknownClientError(TrioStreamError, LookupError):
    """No client with this id is known (never seen, or forgotten after idling)."""


class NotSentError(TrioStreamError):
    """An acknowledgement names an event that was never sent to this client."""


class BatchTooLargeError(LocalProtocolError):
    """A batch of events could never fit in a topic's log, even an empty one."""


class IdempotencyKeyReusedError(LocalProtocolError):
    """An idempotency key was used on the topic, within the TTL, for other events.

    A key stands for one publish: a retry must carry the same events. Nothing was
    published.
    """
