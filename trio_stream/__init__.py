"""Server-Sent Events and WebSocket streams for Trio, with rate limiting and backpressure."""

from __future__ import annotations

from ._core._errors import (
    LocalProtocolError as LocalProtocolError,
    RemoteProtocolError as RemoteProtocolError,
    TrioStreamError as TrioStreamError,
)
from ._core._events import (
    Event as Event,
    encode as encode,
    encode_comment as encode_comment,
    encode_retry as encode_retry,
)
from ._core._limits import (
    CreditWindow as CreditWindow,
    Limiter as Limiter,
    SlidingWindow as SlidingWindow,
    TokenBucket as TokenBucket,
)

__all__ = [
    "CreditWindow",
    "Event",
    "Limiter",
    "LocalProtocolError",
    "RemoteProtocolError",
    "SlidingWindow",
    "TokenBucket",
    "TrioStreamError",
    "encode",
    "encode_comment",
    "encode_retry",
]
