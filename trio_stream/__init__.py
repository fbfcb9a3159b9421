"""Server-Sent Events and WebSocket streams for Trio, with rate limiting and backpressure."""

from __future__ import annotations

from ._asgi import (
    App as App,
    AppConfig as AppConfig,
)
from ._auth import (
    Authorizer as Authorizer,
    AuthRequest as AuthRequest,
    ForbiddenError as ForbiddenError,
    Grant as Grant,
    JWTAuthorizer as JWTAuthorizer,
    UnauthorizedError as UnauthorizedError,
)
from ._cli import (
    serve_app as serve_app,
)
from ._client import (
    EventStream as EventStream,
    EventStreamStatistics as EventStreamStatistics,
    HTTPStatusError as HTTPStatusError,
    StreamReset as StreamReset,
    StreamResetError as StreamResetError,
    open_event_stream as open_event_stream,
    publish as publish,
)
from ._connection import (
    Connection as Connection,
    ConnectionStatistics as ConnectionStatistics,
    Sink as Sink,
)
from ._core._decoder import (
    Decoder as Decoder,
)
from ._core._errors import (
    ClientPausedError as ClientPausedError,
    IdempotencyKeyReusedError as IdempotencyKeyReusedError,
    LimitExceededError as LimitExceededError,
    LocalProtocolError as LocalProtocolError,
    NotSentError as NotSentError,
    RateLimitedError as RateLimitedError,
    RemoteProtocolError as RemoteProtocolError,
    TopicLimitError as TopicLimitError,
    TrioStreamError as TrioStreamError,
    UnknownClientError as UnknownClientError,
)
from ._core._events import (
    Event as Event,
    encode as encode,
    encode_comment as encode_comment,
    encode_retry as encode_retry,
)
from ._core._idempotency import (
    Published as Published,
)
from ._core._limits import (
    Bucket as Bucket,
    CreditWindow as CreditWindow,
    Limiter as Limiter,
    SlidingWindow as SlidingWindow,
    TokenBucket as TokenBucket,
)
from ._core._ring import (
    Entry as Entry,
    Gap as Gap,
)
from ._hub import (
    Backend as Backend,
    ClientStatistics as ClientStatistics,
    Hub as Hub,
    HubConfig as HubConfig,
    HubStatistics as HubStatistics,
    PollResult as PollResult,
    open_hub as open_hub,
)
from ._log import (
    AlreadyPublished as AlreadyPublished,
    BackendUnavailableError as BackendUnavailableError,
    LogStatistics as LogStatistics,
    MemoryLog as MemoryLog,
)
from ._pipeline import (
    Source as Source,
    Stage as Stage,
    batch as batch,
    filter_stage as filter_stage,
    map_stage as map_stage,
    merge as merge,
    open_pipeline as open_pipeline,
    throttle as throttle,
)
from ._several import (
    Delivery as Delivery,
    MultiConnection as MultiConnection,
)
from ._ws_client import (
    WebSocketEventStream as WebSocketEventStream,
    open_websocket_stream as open_websocket_stream,
)

__all__ = [
    "AlreadyPublished",
    "App",
    "AppConfig",
    "AuthRequest",
    "Authorizer",
    "Backend",
    "BackendUnavailableError",
    "Bucket",
    "ClientPausedError",
    "ClientStatistics",
    "Connection",
    "ConnectionStatistics",
    "CreditWindow",
    "Decoder",
    "Delivery",
    "Entry",
    "Event",
    "EventStream",
    "EventStreamStatistics",
    "ForbiddenError",
    "Gap",
    "Grant",
    "HTTPStatusError",
    "Hub",
    "HubConfig",
    "HubStatistics",
    "IdempotencyKeyReusedError",
    "JWTAuthorizer",
    "LimitExceededError",
    "Limiter",
    "LocalProtocolError",
    "LogStatistics",
    "MemoryLog",
    "MultiConnection",
    "NotSentError",
    "PollResult",
    "Published",
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
    "UnauthorizedError",
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
