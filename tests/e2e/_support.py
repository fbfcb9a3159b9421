"""Helpers for the end-to-end tests: raw HTTP/1.1 on trio sockets, SSE parsing, metrics.

The SSE parser here is deliberately independent of ``trio_stream._core``: these tests
check the wire, so they must not share the code whose output they judge.
"""

from __future__ import annotations

import contextlib
import json
import socket
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import attrs
import h11
import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

    from .conftest import Server

Headers = list[tuple[bytes, bytes]]


# -- SSE ------------------------------------------------------------------------------------


@attrs.frozen
class Block:
    """One blank-line-terminated block of an SSE body, its fields as they came."""

    fields: tuple[tuple[str, str], ...]

    def get(self, name: str) -> str | None:
        """The last value of field *name* (``None`` when absent)."""
        values = [value for key, value in self.fields if key == name]
        return values[-1] if values else None

    @property
    def id(self) -> str | None:
        """The ``id:`` field."""
        return self.get("id")

    @property
    def event(self) -> str | None:
        """The ``event:`` field."""
        return self.get("event")

    @property
    def data(self) -> str | None:
        """The ``data:`` lines joined by LF, or ``None`` with no data line."""
        lines = [value for key, value in self.fields if key == "data"]
        return "\n".join(lines) if lines else None

    @property
    def retry(self) -> str | None:
        """The ``retry:`` field."""
        return self.get("retry")

    @property
    def is_comment(self) -> bool:
        """Whether the block holds nothing but comment lines."""
        return bool(self.fields) and all(key == "" for key, _ in self.fields)

    @property
    def is_event(self) -> bool:
        """Whether the block carries an event (a ``data:`` line)."""
        return self.data is not None

    def json(self) -> Any:
        """The data parsed as JSON."""
        assert self.data is not None, self
        return json.loads(self.data)


def parse_blocks(buffer: bytes) -> tuple[list[Block], bytes]:
    """Complete blocks at the start of *buffer* (LF line ends), and the rest."""
    blocks = []
    while (end := buffer.find(b"\n\n")) >= 0:
        chunk, buffer = buffer[:end], buffer[end + 2 :]
        fields = []
        for line in chunk.decode("utf-8").split("\n"):
            if line.startswith(":"):
                fields.append(("", line[1:]))
                continue
            name, _, value = line.partition(":")
            fields.append((name, value.removeprefix(" ")))
        blocks.append(Block(tuple(fields)))
    return blocks, buffer


# -- a raw HTTP/1.1 client ------------------------------------------------------------------


def host_port(url: str) -> tuple[str, int]:
    """The host and port of a ``http://host:port`` URL."""
    parts = urlsplit(url)
    assert parts.hostname is not None, url
    assert parts.port is not None, url
    return parts.hostname, parts.port


async def connect(url: str, *, rcvbuf: int | None = None) -> trio.SocketStream:
    """A TCP connection to the server of *url*, with a small receive buffer if asked."""
    host, port = host_port(url)
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


@attrs.define(eq=False)
class RawResponse:
    """A response read off a socket with h11: the head at once, the body as it comes."""

    stream: trio.SocketStream
    connection: h11.Connection
    status: int = 0
    headers: Headers = attrs.field(factory=list)
    body: bytearray = attrs.field(factory=bytearray)
    ended: bool = False

    def header(self, name: str) -> str | None:
        """The first value of header *name* (case-insensitive)."""
        wanted = name.lower().encode()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value.decode("latin-1")
        return None

    async def _next(self) -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
        while True:
            event = self.connection.next_event()
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            self.connection.receive_data(data)

    async def read_head(self) -> None:
        """Read until the response head is in."""
        while True:
            event = await self._next()
            if isinstance(event, h11.Response):
                self.status = event.status_code
                self.headers = list(event.headers)
                assert self.status < 500, f"the server answered {self.status}"
                return
            assert isinstance(event, h11.InformationalResponse), event

    async def receive(self) -> bytes:
        """The next piece of the body, appended to `body` too; ``b""`` at its end."""
        if self.ended:
            return b""
        event = await self._next()
        if isinstance(event, h11.Data):
            self.body += event.data
            return bytes(event.data)
        self.ended = True
        return b""

    async def read_until(self, predicate: Callable[[bytes], bool]) -> None:
        """Receive until ``predicate(body)`` holds (or fail at the body's end)."""
        while not predicate(bytes(self.body)):
            if not await self.receive():
                raise AssertionError(f"body ended early: {bytes(self.body)[-500:]!r}")

    async def read_to_end(self) -> bytes:
        """Receive the rest of the body; return all of it."""
        while await self.receive():
            pass
        return bytes(self.body)

    def blocks(self) -> list[Block]:
        """The complete SSE blocks received so far."""
        return parse_blocks(bytes(self.body))[0]

    async def read_blocks(self, predicate: Callable[[list[Block]], bool]) -> list[Block]:
        """Receive until ``predicate(blocks)`` holds; return the blocks."""
        await self.read_until(lambda body: predicate(parse_blocks(body)[0]))
        return self.blocks()

    async def read_events(self, count: int) -> list[Block]:
        """Receive until at least *count* events are in; return all events received."""
        await self.read_until(lambda body: sum(b.is_event for b in parse_blocks(body)[0]) >= count)
        return [block for block in self.blocks() if block.is_event]

    async def aclose(self) -> None:
        """Close the socket."""
        await self.stream.aclose()

    async def __aenter__(self) -> RawResponse:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def request_bytes(
    url: str,
    method: str,
    target: str,
    headers: Mapping[str, str | bytes] | None = None,
    body: bytes = b"",
) -> tuple[h11.Connection, bytes]:
    """An h11 client connection and the bytes of one request on it."""
    host, port = host_port(url)
    connection = h11.Connection(h11.CLIENT)
    all_headers = [(b"host", f"{host}:{port}".encode())]
    for name, value in (headers or {}).items():
        all_headers.append((name.encode(), value if isinstance(value, bytes) else value.encode()))
    if body or method in ("POST", "PUT"):
        all_headers.append((b"content-length", str(len(body)).encode()))
    data = connection.send(h11.Request(method=method, target=target, headers=all_headers))
    assert data is not None
    if body:
        data += connection.send(h11.Data(data=body)) or b""
    data += connection.send(h11.EndOfMessage()) or b""
    return connection, data


async def open_raw(
    url: str,
    target: str,
    *,
    method: str = "GET",
    headers: Mapping[str, str | bytes] | None = None,
    body: bytes = b"",
    rcvbuf: int | None = None,
) -> RawResponse:
    """Send one request on a new connection and read the response head.

    Use the result as ``async with`` to close the socket afterwards.
    """
    connection, data = request_bytes(url, method, target, headers, body)
    stream = await connect(url, rcvbuf=rcvbuf)
    response = RawResponse(stream, connection)
    try:
        await stream.send_all(data)
        await response.read_head()
    except BaseException:
        await stream.aclose()
        raise
    return response


async def raw_exchange(url: str, data: bytes) -> tuple[int, bytes]:
    """Send *data* as is on a new connection; the status and the head of the answer.

    The answer may come before all of *data* is sent (a 413 does): sending goes on
    beside reading, and a peer that stops taking it is fine.
    """
    stream = await connect(url)
    async with stream:

        async def send() -> None:
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(data)

        received = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            while b"\r\n\r\n" not in received:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                received += chunk
            nursery.cancel_scope.cancel()
    status_line = bytes(received).split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 "), received
    status = int(status_line.split()[1])
    assert status < 500, received
    return status, bytes(received)


# -- httpx ----------------------------------------------------------------------------------


async def _no_server_error(response: httpx.Response) -> None:
    assert response.status_code < 500, (
        f"{response.request.method} {response.request.url} answered {response.status_code}"
    )


def http_client(server: Server | str, **kwargs: Any) -> httpx.AsyncClient:
    """An httpx client for *server* that fails any request the server answers with a 5xx."""
    url = server if isinstance(server, str) else server.url
    kwargs.setdefault("timeout", 20.0)
    return httpx.AsyncClient(base_url=url, event_hooks={"response": [_no_server_error]}, **kwargs)


async def publish(
    client: httpx.AsyncClient, topic: str, events: Sequence[Mapping[str, str]] | Mapping[str, str]
) -> list[str]:
    """Publish, expecting 202; the ids."""
    response = await client.post(f"/streams/{topic}", json=events)
    assert response.status_code == 202, response.text
    ids: list[str] = response.json()["ids"]
    return ids


async def publish_many(client: httpx.AsyncClient, topic: str, datas: Iterable[str]) -> list[str]:
    """Publish one event per data string in one batch; the ids."""
    return await publish(client, topic, [{"data": data} for data in datas])


@attrs.define(eq=False)
class StreamReader:
    """Reads an SSE response (httpx streaming) into blocks from a background task."""

    response: httpx.Response
    blocks: list[Block] = attrs.field(factory=list)
    times: list[float] = attrs.field(factory=list)
    ended: bool = False
    _changed: trio.Event = attrs.field(factory=trio.Event)

    async def run(self) -> None:
        """Read until the body ends."""
        rest = b""
        async for chunk in self.response.aiter_raw():
            now = trio.current_time()
            blocks, rest = parse_blocks(rest + chunk)
            self.blocks += blocks
            self.times += [now] * len(blocks)
            self._changed.set()
            self._changed = trio.Event()
        self.ended = True
        self._changed.set()

    @property
    def events(self) -> list[Block]:
        """The events received so far."""
        return [block for block in self.blocks if block.is_event]

    async def wait_for(self, predicate: Callable[[StreamReader], bool]) -> None:
        """Wait until ``predicate(self)`` holds."""
        while not predicate(self):
            assert not self.ended, f"stream ended early: {self.blocks[-5:]}"
            await self._changed.wait()

    async def wait_events(self, count: int) -> list[Block]:
        """Wait until *count* events are in; the events."""
        await self.wait_for(lambda reader: len(reader.events) >= count)
        return self.events


async def open_reader(
    nursery: trio.Nursery,
    client: httpx.AsyncClient,
    path: str,
    *,
    headers: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
) -> StreamReader:
    """Open an SSE stream with *client* and read it in *nursery*; fails unless 200."""
    ready: trio.Event = trio.Event()
    holder: list[StreamReader] = []

    async def run() -> None:
        async with client.stream("GET", path, headers=headers, params=params) as response:
            assert response.status_code == 200, (await response.aread()).decode()
            reader = StreamReader(response)
            holder.append(reader)
            ready.set()
            await reader.run()

    nursery.start_soon(run)
    await ready.wait()
    # The stream has started (headers and `retry:` are out) once the reader sees a block.
    reader = holder[0]
    await reader.wait_for(lambda r: bool(r.blocks))
    return reader


# -- metrics --------------------------------------------------------------------------------


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    """Every sample of a Prometheus exposition, by name and label set."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


async def metrics(client: httpx.AsyncClient) -> Samples:
    """Scrape ``/metrics``."""
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse_metrics(response.text)


def sample(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when absent."""
    return samples.get((name, frozenset(labels.items())), 0.0)


async def wait_until(predicate: Callable[[], bool], *, interval: float = 0.02) -> None:
    """Poll *predicate* until it holds (bound it with a ``fail_after`` around).

    For the server's state, which has no event to wait on from outside.
    """
    while not predicate():  # noqa: ASYNC110
        await trio.sleep(interval)
