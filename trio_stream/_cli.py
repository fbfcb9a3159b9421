"""``trio-stream serve|demo``: the application under hypercorn's trio worker."""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import sys
import threading
import time
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import trio

from ._argtypes import integer, number
from ._asgi import App, AppConfig
from ._core._events import Event
from ._hub import HubConfig

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from ._auth import JWTAuthorizer
    from ._hub import Backend, Hub

__all__ = ["app_from_env", "build_app", "main", "serve_app"]

ENV_PREFIX: Final = "TRIO_STREAM_"
DEMO_TOPIC: Final = "demo"


_positive_float = number(0, strict=True)
_non_negative_float = number(0)
_positive_int = integer(1)
_non_negative_int = integer(0)
_window = integer(1, 10_000)


# (flag, type, default, help): the contract's table, in its order.
OPTIONS: Final[Sequence[tuple[str, Callable[[str], Any], object, str]]] = (
    (
        "--rate",
        _non_negative_float,
        100.0,
        "per-client token bucket: events/s delivered to one client (0: none)",
    ),
    ("--burst", _positive_int, 20, "per-client bucket size: events that may go out back to back"),
    (
        "--global-rate",
        _non_negative_float,
        0.0,
        "cap on events/s delivered by the whole server (0: none)",
    ),
    ("--global-burst", _positive_int, None, "size of the global bucket (default: same as --burst)"),
    ("--window", _window, 64, "default ack window for clients that ask for acks without a size"),
    ("--log-capacity", _positive_int, 10_000, "events a topic's replay log retains"),
    ("--log-ttl", _positive_float, 30.0, "seconds an event stays in a topic's replay log"),
    (
        "--log-max-bytes",
        _positive_int,
        16 * 1024 * 1024,
        "bytes of encoded events a topic's replay log retains",
    ),
    ("--max-topics", _positive_int, 10_000, "topics the server holds at once"),
    (
        "--lag-limit",
        _positive_int,
        1000,
        "events a client may fall behind its topic's head before it is paused and polls",
    ),
    (
        "--heartbeat",
        _positive_float,
        15.0,
        "seconds of idleness after which a comment line is sent",
    ),
    ("--retry-ms", _non_negative_int, 3000, "value of the retry: field sent at stream start"),
    (
        "--idle-timeout",
        _positive_float,
        60.0,
        "seconds a stream may go without progress (no write completes, or no ack in ack "
        "mode) before it is closed",
    ),
    ("--max-streams-per-client", _positive_int, 4, "concurrent streams one client id may hold"),
    ("--max-connections", _positive_int, 10_000, "concurrent streams the server accepts in all"),
    ("--publish-token", str, None, "when set, publishing needs 'Authorization: Bearer TOKEN'"),
    (
        "--cors-origins",
        str,
        None,
        "comma-separated origins (or *) allowed to stream, poll and ack from other origins",
    ),
    ("--backend", str, "memory", "'memory', or 'redis://host:port/db' (needs the redis extra)"),
    (
        "--auth-secret",
        str,
        None,
        "when set, streaming, polling and acking need a JWT signed with this secret "
        "(HS256), as 'Authorization: Bearer JWT' or the trio_stream_token cookie "
        "(needs the 'auth' extra: pip install 'trio-stream[auth]')",
    ),
    (
        "--certfile",
        str,
        None,
        "serve TLS with this certificate (HTTP/2 offered by ALPN beside HTTP/1.1)",
    ),
    ("--keyfile", str, None, "the private key for --certfile"),
    (
        "--drain-grace",
        _positive_float,
        5.0,
        "seconds open streams get to end cleanly on SIGINT/SIGTERM",
    ),
)


def _env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-stream",
        description="Rate-limited, backpressured Server-Sent Events streams over hypercorn.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{serve,demo,loadgen}")
    for name, summary in (
        ("serve", "serve the hub"),
        ("demo", "serve the hub with a bursty producer on topic 'demo' and a demo page at /"),
    ):
        sub = commands.add_parser(
            name,
            help=summary,
            description=f"{summary}. Every option may also be set by the environment "
            f"variable named after it ({ENV_PREFIX}RATE for --rate, ...).",
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        sub.add_argument(
            "--host",
            default=os.environ.get(ENV_PREFIX + "HOST", "127.0.0.1"),
            help="interface to listen on",
        )
        sub.add_argument(
            "--port",
            type=int,
            default=int(os.environ.get(ENV_PREFIX + "PORT", "8000")),
            help="port to listen on (0: any free port)",
        )
        for flag, kind, default, text in OPTIONS:
            sub.add_argument(
                flag, type=kind, default=default, help=f"{text} [env {_env_name(flag)}]"
            )
    from ._loadgen import add_parser as add_loadgen_parser

    add_loadgen_parser(commands)
    return parser


def _options_from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The options set in *environ*, parsed and checked like their flags."""
    values: dict[str, Any] = {}
    for flag, kind, _, _ in OPTIONS:
        raw = environ.get(_env_name(flag))
        if raw is not None:
            try:
                values[flag.lstrip("-").replace("-", "_")] = kind(raw)
            except (ValueError, argparse.ArgumentTypeError) as error:
                raise SystemExit(f"{_env_name(flag)}: {error}") from None
    return values


def _backend(url: str, max_topics: int) -> Backend | None:
    """The backend ``--backend`` names (``None`` for ``memory``).

    Raises:
        SystemExit: Not a backend this version knows, or the redis extra is missing.
    """
    if url == "memory":
        return None
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise SystemExit(f"--backend {url!r}: expected 'memory' or 'redis://host:port/db'")
    try:
        from .backends.redis import RedisBackend
    except ImportError as error:
        raise SystemExit(
            f"--backend {url!r} needs coredis ({error}): pip install 'trio-stream[redis]'"
        ) from None
    return RedisBackend(url, max_connections=max_topics + 64)


def build_app(options: Mapping[str, Any], *, demo: bool = False) -> App:
    """An `App` from option values named as the flags (``global_rate`` for ``--global-rate``).

    Raises:
        SystemExit: An option value is not acceptable (with a message saying which).
    """
    get = options.get
    backend = _backend(str(get("backend") or "memory"), int(get("max_topics", 10_000)))
    try:
        hub = HubConfig(
            rate=float(get("rate", 100.0)),
            burst=int(get("burst", 20)),
            global_rate=float(get("global_rate", 0.0)),
            global_burst=get("global_burst"),
            window=int(get("window", 64)),
            log_capacity=int(get("log_capacity", 10_000)),
            log_ttl=float(get("log_ttl", 30.0)),
            log_max_bytes=int(get("log_max_bytes", 16 * 1024 * 1024)),
            max_topics=int(get("max_topics", 10_000)),
            lag_limit=int(get("lag_limit", 1000)),
            heartbeat_interval=float(get("heartbeat", 15.0)),
            retry_ms=int(get("retry_ms", 3000)),
            idle_timeout=float(get("idle_timeout", 60.0)),
            max_streams_per_client=int(get("max_streams_per_client", 4)),
            max_connections=int(get("max_connections", 10_000)),
            backend=backend,
        )
    except (TypeError, ValueError) as error:
        raise SystemExit(f"bad option: {error}") from None
    origins = get("cors_origins")
    authorizer = _authorizer(get("auth_secret"), publish_token=get("publish_token"))
    config = AppConfig(
        hub=hub,
        publish_token=get("publish_token"),
        cors_origins=tuple(o.strip() for o in str(origins).split(",") if o.strip())
        if origins
        else (),
        drain_grace_period=float(get("drain_grace", 5.0)),
        demo=demo,
        authorizer=authorizer,
    )
    app = App(config)
    if demo:
        app.run_in_background(bursty_producer)
    return app


def _authorizer(secret: str | None, *, publish_token: str | None) -> JWTAuthorizer | None:
    """``JWTAuthorizer(secret)``, or ``None`` without a secret.

    Raises:
        SystemExit: The secret is empty, or PyJWT (the ``auth`` extra) is missing.
    """
    if secret is None:
        return None
    if not secret:
        raise SystemExit("--auth-secret: the secret must not be empty")
    from ._auth import JWTAuthorizer

    try:
        authorizer = JWTAuthorizer(secret)
    except ImportError:
        raise SystemExit(
            "--auth-secret needs PyJWT, which is not installed: "
            "pip install 'trio-stream[auth]' (or pip install PyJWT)"
        ) from None
    if publish_token is None:
        logging.getLogger("trio_stream").warning(
            "--auth-secret without --publish-token: anyone may publish (the contract "
            "leaves publishing to --publish-token; a token's 'publish' claim counts "
            "once it is set)"
        )
    return authorizer


def bound_http2_send_buffers() -> None:
    """Make hypercorn's HTTP/2 writes wait while a stream's flow-control window is shut.

    Hypercorn (0.17-0.18) queues an HTTP/2 stream's body in a buffer whose writer waits
    above a high-water mark until the sending task drains it. But that task, finding the
    peer's window for the stream shut, takes nothing out and still wakes the writer (the
    empty take counts as "below low water"): the buffer grows without bound, the app's
    writes complete at once, and a stream whose reader has stopped is never seen to fall
    behind (it is neither paused nor timed out; the server's memory grows instead). Over
    HTTP/1.1 the socket's backpressure does this job.

    The fix wakes the writer only once what is *left* in the buffer is below low water,
    so that a shut window holds it, as a full socket does. Idempotent; does nothing when
    hypercorn's HTTP/2 support is not importable or its buffer is not the one expected.
    `serve_app` and `app_from_env` call it.
    """
    try:
        from hypercorn.protocol import h2 as hypercorn_h2
    except ImportError:  # pragma: no cover - h2 is a dependency of hypercorn
        return
    module: Any = hypercorn_h2
    base: Any = getattr(module, "StreamBuffer", None)
    low_water: float | None = getattr(module, "BUFFER_LOW_WATER", None)
    if base is None or low_water is None or getattr(base, "_trio_stream_bounded", False):
        return
    if not all(hasattr(base, name) for name in ("pop", "push", "drain")):  # pragma: no cover
        return
    mark: float = low_water

    class _BoundedStreamBuffer(base):  # type: ignore[misc]
        _trio_stream_bounded = True

        async def pop(self, max_length: int) -> bytes:
            length = min(len(self.buffer), max_length)
            data = bytes(self.buffer[:length])
            del self.buffer[:length]
            if len(self.buffer) < mark:
                await self._paused.set()
            if not self.buffer:
                await self._is_empty.set()
            return data

    module.StreamBuffer = _BoundedStreamBuffer


def app_from_env(environ: Mapping[str, str] | None = None) -> App:
    """The app configured from ``TRIO_STREAM_*`` environment variables (``server:app``)."""
    bound_http2_send_buffers()
    return build_app(_options_from_env(os.environ if environ is None else environ))


async def bursty_producer(hub: Hub, *, topic: str = DEMO_TOPIC) -> None:
    """Publish quiet spells and bursts well above the per-client rate, forever.

    Each 5 s cycle: 4 s at a trickle (2 events/s), then 1 s at four times the
    per-client rate. The average stays below the rate, so a client that keeps up
    catches up after each burst; one that does not falls behind and gets paused.
    Events are due on a fixed schedule (not "sleep after each"), published in the
    batches that fall due each tick; publishing waits when the log is full.
    """
    rate = hub.config.rate or 100.0
    seq = 0
    while True:
        for phase, per_second, seconds in (("quiet", 2.0, 4.0), ("burst", rate * 4, 1.0)):
            start, sent, total = trio.current_time(), 0, round(per_second * seconds)
            while sent < total:
                due = min(total, int((trio.current_time() - start) * per_second) + 1)
                batch = [
                    Event(data=_demo_payload(seq + i, phase)) for i in range(1, due - sent + 1)
                ]
                await hub.publish(topic, batch)
                seq, sent = seq + len(batch), due
                await trio.sleep_until(start + sent / per_second)


def _demo_payload(seq: int, phase: str) -> str:
    # "ts" is wall-clock time: the page shows each event's age.
    return (
        f'{{"seq": {seq}, "phase": "{phase}", "ts": {time.time():.3f}, '
        f'"value": {random.random():.4f}}}'
    )


async def serve_app(
    app: App,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    certfile: str | None = None,
    keyfile: str | None = None,
    on_signal: Callable[[], object] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve *app* with hypercorn's trio worker until SIGINT or SIGTERM, then drain.

    Calls ``task_status.started(urls)`` once listening, and ``on_signal()`` (if given)
    when the stop signal arrives, before draining.
    """
    from hypercorn.config import Config
    from hypercorn.trio import serve

    bound_http2_send_buffers()
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = "-"
    config.loglevel = "WARNING"
    config.graceful_timeout = app.config.drain_grace_period + 1
    config.keep_alive_timeout = 75
    if certfile:
        config.certfile = certfile
        config.keyfile = keyfile
        config.alpn_protocols = ["h2", "http/1.1"]

    async def shutdown_trigger() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                break
        if on_signal is not None:
            on_signal()
        await app.drain()

    asgi: Any = app  # hypercorn's types want TypedDict scopes; ours are plain dicts
    await serve(asgi, config, shutdown_trigger=shutdown_trigger, task_status=task_status)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``trio-stream`` command."""
    args = _parser().parse_args(argv)
    if args.command == "loadgen":
        from ._loadgen import main as loadgen_main

        return loadgen_main(args)
    options = {**vars(args), **_options_from_env_overrides(args)}
    if (options.get("certfile") is None) != (options.get("keyfile") is None):
        raise SystemExit("--certfile and --keyfile go together")
    app = build_app(options, demo=args.command == "demo")

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            serve = partial(
                serve_app,
                app,
                host=args.host,
                port=args.port,
                certfile=options.get("certfile"),
                keyfile=options.get("keyfile"),
                on_signal=partial(_exit_after, app.config.drain_grace_period),
            )
            urls = await nursery.start(serve)
            suffix = "/" if args.command == "demo" else f"/streams/{DEMO_TOPIC}"
            for url in urls:
                print(f"trio-stream {args.command} listening on {url}  (try {url}{suffix})")
            sys.stdout.flush()

    trio.run(run)
    return 0


def _exit_after(seconds: float) -> None:
    """Exit the process (status 0) in *seconds*, if it has not ended by then.

    Hypercorn shields its socket writes from cancellation, so a stream whose client
    stopped reading holds its connection, and so the server, until the peer goes away.
    The grace period bounds a stop all the same.
    """

    def exit_now() -> None:
        logging.getLogger("trio_stream").warning(
            "streams still open %.1f s after the stop signal (clients that stopped "
            "reading): exiting anyway",
            seconds,
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    timer = threading.Timer(seconds, exit_now)
    timer.daemon = True
    timer.start()


def _options_from_env_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Environment values for the options left at their defaults on the command line."""
    from_env = _options_from_env(os.environ)
    defaults = {flag.lstrip("-").replace("-", "_"): default for flag, _, default, _ in OPTIONS}
    return {k: v for k, v in from_env.items() if getattr(args, k) == defaults[k]}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
