"""Server-Sent Events and WebSocket streams for Trio, with rate limiting and backpressure."""

from __future__ import annotations

from ._asgi import App as App
from ._asgi import AppConfig as AppConfig
from ._cli import serve_app as serve_app
from ._client import (
    EventStream as EventStream,
)
from ._client import (
    EventStreamStatistics as EventStreamStatistics,
)
from ._client import (
    HTTPStatusError as HTTPStatusError,
)
from ._client import (
    StreamReset as StreamReset,
)
from ._client import (
    StreamResetError as StreamResetError,
)
from ._client import (
    open_event_stream as open_event_stream,
)
from ._client import (
    publish as publish,
)
from ._connection import (
    Connection as Connection,
)
from ._connection import (
    ConnectionStatistics as ConnectionStatistics,
)
from ._connection import (
    Sink as Sink,
)
from ._core._decoder import Decoder as Decoder
from ._core._errors import (
    ClientPausedError as ClientPausedError,
)
from ._core._errors import (
    LimitExceededError as LimitExceededError,
)
from ._core._errors import (
    LocalProtocolError as LocalProtocolError,
)
from ._core._errors import (
    NotSentError as NotSentError,
)
from ._core._errors import (
    RateLimitedError as RateLimitedError,
)
from ._core._errors import (
    RemoteProtocolError as RemoteProtocolError,
)
from ._core._errors import (
    TopicLimitError as TopicLimitError,
)
from ._core._errors import (
    TrioStreamError as TrioStreamError,
)
from ._core._errors import (
    UnknownClientError as UnknownClientError,
)
from ._core._events import (
    Event as Event,
)
from ._core._events import (
    encode as encode,
)
from ._core._events import (
    encode_comment as encode_comment,
)
from ._core._events import (
    encode_retry as encode_retry,
)
from ._core._limits import (
    CreditWindow as CreditWindow,
)
from ._core._limits import (
    Limiter as Limiter,
)
from ._core._limits import (
    SlidingWindow as SlidingWindow,
)
from ._core._limits import (
    TokenBucket as TokenBucket,
)
from ._core._ring import Entry as Entry
from ._core._ring import Gap as Gap
from ._hub import (
    ClientStatistics as ClientStatistics,
)
from ._hub import (
    Hub as Hub,
)
from ._hub import (
    HubConfig as HubConfig,
)
from ._hub import (
    HubStatistics as HubStatistics,
)
from ._hub import (
    PollResult as PollResult,
)
from ._hub import (
    open_hub as open_hub,
)
from ._log import LogStatistics as LogStatistics
from ._log import MemoryLog as MemoryLog
from ._pipeline import (
    Source as Source,
)
from ._pipeline import (
    Stage as Stage,
)
from ._pipeline import (
    batch as batch,
)
from ._pipeline import (
    filter_stage as filter_stage,
)
from ._pipeline import (
    map_stage as map_stage,
)
from ._pipeline import (
    merge as merge,
)
from ._pipeline import (
    open_pipeline as open_pipeline,
)
from ._pipeline import (
    throttle as throttle,
)
from ._ws_client import (
    WebSocketEventStream as WebSocketEventStream,
)
from ._ws_client import (
    open_websocket_stream as open_websocket_stream,
)

__all__ = [
    "App",
    "AppConfig",
    "ClientPausedError",
    "ClientStatistics",
    "Connection",
    "ConnectionStatistics",
    "CreditWindow",
    "Decoder",
    "Entry",
    "Event",
    "EventStream",
    "EventStreamStatistics",
    "Gap",
    "HTTPStatusError",
    "Hub",
    "HubConfig",
    "HubStatistics",
    "LimitExceededError",
    "Limiter",
    "LocalProtocolError",
    "LogStatistics",
    "MemoryLog",
    "NotSentError",
    "PollResult",
    "RateLimitedError",
    "RemoteProtocolError",
    "Sink",
    "SlidingWindow",
    "Source",
    "Stage",
    "StreamReset",
    "StreamResetError",
    "TokenBucket",
    "TopicLimitError",
    "TrioStreamError",
    "UnknownClientError",
    "WebSocketEventStream",
    "batch",
    "encode",
    "encode_comment",
    "encode_retry",
    "filter_stage",
    "map_stage",
    "merge",
    "open_event_stream",
    "open_hub",
    "open_pipeline",
    "open_websocket_stream",
    "publish",
    "serve_app",
    "throttle",
]
