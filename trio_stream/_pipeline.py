"""Pipeline stages: tasks linked by zero-buffer memory channels.

A *stage* is an async function ``stage(receive, send)``: it reads items from a
:class:`trio.MemoryReceiveChannel` and writes results to a :class:`trio.MemorySendChannel`.
Every stage here keeps the same contract, and a stage you write yourself should too:

- It owns both channels and closes them when it returns (``with receive, send:``), so
  the end of the input travels downstream as :exc:`trio.EndOfChannel`, and
  cancellation leaves no channel open. (Memory channels close synchronously: plain
  ``with`` is better than ``async with`` here, whose ``aclose()`` checkpoint lets a
  cancellation arriving at that moment replace the exception the stage is raising.)
- It ends when its input ends, or quietly when every receiver of its output has closed
  (then it closes its input in turn, so the closure travels upstream).
- It holds at most the item it is working on: an item cancelled in flight is dropped,
  never delivered twice.

:func:`open_pipeline` runs a source and a chain of stages as tasks of one nursery and
hands out the last receive channel. The factories (:func:`map_stage`,
:func:`filter_stage`, :func:`throttle`, :func:`batch`) build stages; :func:`merge`
builds a source that interleaves several channels.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeAlias, TypeVar, overload

import trio

if TYPE_CHECKING:
    from ._core._limits import Limiter

__all__ = [
    "Source",
    "Stage",
    "batch",
    "filter_stage",
    "map_stage",
    "merge",
    "open_pipeline",
    "throttle",
]

T = TypeVar("T")
U = TypeVar("U")
T_contra = TypeVar("T_contra", contravariant=True)
U_co = TypeVar("U_co", covariant=True)
# The item types between the stages of open_pipeline's overloads.
T1 = TypeVar("T1")
T2 = TypeVar("T2")
T3 = TypeVar("T3")
T4 = TypeVar("T4")
T5 = TypeVar("T5")
T6 = TypeVar("T6")

#: How long an async-iterable source may take to close once its pipeline is cancelled.
_SOURCE_CLOSE_TIMEOUT: Final = 5.0


class Stage(Protocol[T_contra, U_co]):
    """A pipeline stage: an async callable ``stage(receive, send)``.

    It reads items of type ``T_contra`` from *receive* and writes items of type ``U_co``
    to *send*. Any ``async def stage(receive, send) -> None`` with matching channel
    types is a ``Stage``; see the module documentation for the contract it should keep.
    """

    def __call__(
        self,
        receive: trio.MemoryReceiveChannel[T_contra],
        send: trio.MemorySendChannel[U_co],
        /,
    ) -> Awaitable[None]:
        """Run until the input ends, then close both channels."""
        ...


class Source(Protocol[U_co]):
    """A pipeline source: an async callable ``source(send)``.

    It writes items of type ``U_co`` to *send* and closes it when it has no more
    (``with send:``). When every receiver has closed, ``send.send()`` raises
    :exc:`trio.BrokenResourceError`: a source that should then stop quietly, as the
    stages here do, catches it around its sends.
    """

    def __call__(self, send: trio.MemorySendChannel[U_co], /) -> Awaitable[None]:
        """Produce items into *send*, then close it."""
        ...


class _Passthrough(Protocol):
    """A stage that hands on items of any type unchanged (what :func:`throttle` returns)."""

    def __call__(
        self, receive: trio.MemoryReceiveChannel[T], send: trio.MemorySendChannel[T], /
    ) -> Awaitable[None]: ...


class _Batcher(Protocol):
    """A stage that groups items of any type into lists (what :func:`batch` returns)."""

    def __call__(
        self, receive: trio.MemoryReceiveChannel[T], send: trio.MemorySendChannel[list[T]], /
    ) -> Awaitable[None]: ...


_SourceLike: TypeAlias = Source[T] | Iterable[T] | AsyncIterable[T]


# ---------------------------------------------------------------------------- helpers


async def _deliver(send: trio.MemorySendChannel[T], item: T) -> bool:
    """Send *item*; False when every receiver has closed (the stage should stop)."""
    try:
        await send.send(item)
    except trio.BrokenResourceError:
        return False
    return True


@contextlib.contextmanager
def _lone_exception_unwrapped() -> Iterator[None]:
    """Re-raise the only exception of an exception group as itself.

    The exception keeps its own ``__cause__`` and ``__context__``; a group of two or
    more is left as it is.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) != 1:
            raise
        lone = group.exceptions[0]
        context, suppress = lone.__context__, lone.__suppress_context__
        try:
            raise lone  # this sets lone.__context__ to the group: undone below
        finally:
            lone.__context__, lone.__suppress_context__ = context, suppress
            del lone, context, group


def _awaited_if_needed(fn: Callable[[T], Any]) -> Callable[[T], Awaitable[Any]]:
    """*fn* as an async function, whether it is sync or returns an awaitable."""

    async def call(item: T) -> Any:
        result = fn(item)
        if inspect.isawaitable(result):
            result = await result
        return result

    return call


# ----------------------------------------------------------------------------- stages


@overload
def map_stage(fn: Callable[[T], Awaitable[U]]) -> Stage[T, U]: ...
@overload
def map_stage(fn: Callable[[T], U]) -> Stage[T, U]: ...
def map_stage(fn: Callable[[T], Any]) -> Stage[T, Any]:
    """A stage that sends ``fn(item)`` for each item, in order.

    Args:
        fn: A function of one item; it may be sync or async (if it returns an
            awaitable, the stage awaits it). It runs in the stage's task, one item at a
            time: a blocking sync function blocks Trio, so put such work in
            :func:`trio.to_thread.run_sync` inside an async *fn*.

    Returns:
        The stage. It is stateless: the same stage may run in several pipelines.

    Raises:
        Exception: Whatever *fn* raises ends the stage and, through
            :func:`open_pipeline`, leaves the pipeline's block as itself.

    **Backpressure:** the stage takes the next item only once the result for the
    previous one has been received downstream, so a slow consumer stops it and, in
    turn, everything upstream.

    **Cancellation:** an item whose *fn* call is cancelled is dropped; it is never sent
    twice.
    """
    call = _awaited_if_needed(fn)

    async def map_stage(
        receive: trio.MemoryReceiveChannel[T], send: trio.MemorySendChannel[Any]
    ) -> None:
        with receive, send:
            async for item in receive:
                if not await _deliver(send, await call(item)):
                    return

    return map_stage


@overload
def filter_stage(predicate: Callable[[T], Awaitable[bool]]) -> Stage[T, T]: ...
@overload
def filter_stage(predicate: Callable[[T], bool]) -> Stage[T, T]: ...
def filter_stage(predicate: Callable[[T], Any]) -> Stage[T, T]:
    """A stage that sends on the items for which ``predicate(item)`` is true, in order.

    Args:
        predicate: A function of one item, sync or async, as for :func:`map_stage`.

    Returns:
        The stage. It is stateless: the same stage may run in several pipelines.

    Raises:
        Exception: Whatever *predicate* raises ends the stage.

    **Backpressure:** as for :func:`map_stage`; items that are dropped cost the
    consumer nothing.

    **Cancellation:** an item whose test is cancelled is dropped.
    """
    call = _awaited_if_needed(predicate)

    async def filter_stage(
        receive: trio.MemoryReceiveChannel[T], send: trio.MemorySendChannel[T]
    ) -> None:
        with receive, send:
            async for item in receive:
                if not await call(item):
                    continue
                if not await _deliver(send, item):
                    return

    return filter_stage


def throttle(limiter: Limiter, *, cost: Callable[[Any], int] | None = None) -> _Passthrough:
    """A stage that holds each item until *limiter* lets it go.

    For each item the stage sleeps until ``limiter.ready_at(now, n)`` (asking again on
    waking, so nothing else can spend the tokens in between), consumes the *n* tokens
    and sends the item on unchanged. Only :func:`trio.current_time` is read, so a
    virtual clock drives it exactly.

    Args:
        limiter: A :class:`~trio_stream.TokenBucket`, a
            :class:`~trio_stream.SlidingWindow` or any other
            :class:`~trio_stream.Limiter`. Several throttles may share one limiter:
            together they never exceed it.
        cost: Tokens an item takes, e.g. ``len`` behind :func:`batch`; 1 when not
            given. An item that costs 0 goes at once.

    Returns:
        The stage. Pipelines that run this same stage share its queue: they are served
        in first-come, first-served order (a :class:`trio.StrictFIFOLock`), so an item
        that needs many tokens is not overtaken forever by cheap ones. Separate
        ``throttle`` stages over one limiter respect the limit too, in no set order.

    Raises:
        ValueError: An item costs more than the limiter can ever grant at once (more
            than a bucket's ``burst`` or a window's ``limit``), or a negative amount.

    **Backpressure:** tokens are spent when an item is let go, before it is sent on;
    the send then waits for the consumer. A consumer that stalls therefore holds at
    most one released item, which it receives just ahead of the items released when it
    resumes: at the consumer, a window may see one item more than the limit right
    after a stall, never more. A stalled consumer leaves the tokens it did not use to
    other stages sharing the limiter.

    **Cancellation:** cancelled while waiting, the stage has consumed nothing; an item
    released and then cancelled in its send is dropped, and its tokens stay spent.
    """
    lock = trio.StrictFIFOLock()

    async def acquire(n: int) -> None:
        if n < 0:
            raise ValueError(f"an item cannot cost a negative number of tokens ({n})")
        if n == 0:
            return
        async with lock:
            while True:
                now = trio.current_time()
                if limiter.available(now) >= n:
                    limiter.consume(now, n)
                    return
                await trio.sleep_until(limiter.ready_at(now, n))

    async def throttle(
        receive: trio.MemoryReceiveChannel[T], send: trio.MemorySendChannel[T]
    ) -> None:
        with receive, send:
            async for item in receive:
                await acquire(1 if cost is None else cost(item))
                if not await _deliver(send, item):
                    return

    return throttle


def batch(max_size: int, max_delay: float = math.inf) -> _Batcher:
    """A stage that groups items into lists of at most *max_size*.

    A batch opens with the first item that arrives after the previous batch was sent,
    and is sent when it holds *max_size* items or *max_delay* seconds after it opened,
    whichever comes first. An idle input sends nothing (no empty batches); when the
    input ends, the batch in progress is sent, then the output closed. Items keep their
    order.

    Args:
        max_size: The most items in one batch (at least 1).
        max_delay: The longest, in seconds, that the first item of a batch waits for
            others (0 or more; ``math.inf``, the default, batches by size only).

    Returns:
        The stage. It is stateless between runs: the same stage may run in several
        pipelines.

    Raises:
        ValueError: *max_size* is below 1 or *max_delay* is negative or NaN.

    **Backpressure:** a full (or timed-out) batch waits for the consumer, and the stage
    reads nothing meanwhile, so at most one batch is held whatever the rates. With a
    slow consumer and a fast producer, batches fill to *max_size*: the consumer gets
    more items per receive rather than more receives.

    **Cancellation:** the items of a batch not yet sent are dropped with it.
    """
    if not isinstance(max_size, int) or max_size < 1:
        raise ValueError(f"max_size must be an integer of at least 1, got {max_size!r}")
    if not max_delay >= 0:
        raise ValueError(f"max_delay must be zero or positive, got {max_delay!r}")

    async def batch(
        receive: trio.MemoryReceiveChannel[T], send: trio.MemorySendChannel[list[T]]
    ) -> None:
        with receive, send:
            ended = False
            while not ended:
                try:
                    items = [await receive.receive()]
                except trio.EndOfChannel:
                    return
                with trio.move_on_at(trio.current_time() + max_delay):
                    while len(items) < max_size:
                        try:
                            items.append(await receive.receive())
                        except trio.EndOfChannel:
                            ended = True
                            break
                if not await _deliver(send, items):
                    return

    return batch


# ---------------------------------------------------------------------------- sources


def merge(*receive_channels: trio.MemoryReceiveChannel[T]) -> Source[T]:
    """A source that interleaves items from several channels as they arrive (fan-in).

    Items from one channel keep their order; between channels, they go in the order
    they arrive. The merged stream ends when all the channels have ended.

    Args:
        *receive_channels: The inputs, e.g. the channels of other pipelines. The source
            owns them: it closes each when it ends or is cancelled.

    Returns:
        The source, to pass to :func:`open_pipeline` (it runs one task per channel).

    **Backpressure:** each input is read only when the merged output has room, so a
    slow consumer stops every input.

    **Cancellation:** an item taken from an input and cancelled before it was sent on
    is dropped.
    """

    async def forward(
        receive: trio.MemoryReceiveChannel[T], send: trio.MemorySendChannel[T]
    ) -> None:
        with receive:
            async for item in receive:
                if not await _deliver(send, item):
                    return

    async def merge(send: trio.MemorySendChannel[T]) -> None:
        with send, _lone_exception_unwrapped():
            async with trio.open_nursery() as nursery:
                for receive in receive_channels:
                    nursery.start_soon(forward, receive, send)

    return merge


async def _feed(items: Iterable[T], send: trio.MemorySendChannel[T]) -> None:
    with send:
        for item in items:
            if not await _deliver(send, item):
                return


async def _feed_async(items: AsyncIterable[T], send: trio.MemorySendChannel[T]) -> None:
    with send:
        try:
            async for item in items:
                if not await _deliver(send, item):
                    return
        finally:
            aclose = getattr(items, "aclose", None)
            if aclose is not None:
                with trio.move_on_after(_SOURCE_CLOSE_TIMEOUT, shield=True):
                    await aclose()


# ---------------------------------------------------------------------------- the chain


@overload
def open_pipeline(
    source: _SourceLike[T1], /
) -> contextlib.AbstractAsyncContextManager[trio.MemoryReceiveChannel[T1]]: ...
@overload
def open_pipeline(
    source: _SourceLike[T1], s1: Stage[T1, T2], /
) -> contextlib.AbstractAsyncContextManager[trio.MemoryReceiveChannel[T2]]: ...
@overload
def open_pipeline(
    source: _SourceLike[T1], s1: Stage[T1, T2], s2: Stage[T2, T3], /
) -> contextlib.AbstractAsyncContextManager[trio.MemoryReceiveChannel[T3]]: ...
@overload
def open_pipeline(
    source: _SourceLike[T1], s1: Stage[T1, T2], s2: Stage[T2, T3], s3: Stage[T3, T4], /
) -> contextlib.AbstractAsyncContextManager[trio.MemoryReceiveChannel[T4]]: ...
@overload
def open_pipeline(
    source: _SourceLike[T1],
    s1: Stage[T1, T2],
    s2: Stage[T2, T3],
    s3: Stage[T3, T4],
    s4: Stage[T4, T5],
    /,
) -> contextlib.AbstractAsyncContextManager[trio.MemoryReceiveChannel[T5]]: ...
@overload
def open_pipeline(
    source: _SourceLike[T1],
    s1: Stage[T1, T2],
    s2: Stage[T2, T3],
    s3: Stage[T3, T4],
    s4: Stage[T4, T5],
    s5: Stage[T5, T6],
    /,
) -> contextlib.AbstractAsyncContextManager[trio.MemoryReceiveChannel[T6]]: ...
@overload
def open_pipeline(
    source: _SourceLike[Any], /, *stages: Stage[Any, Any]
) -> contextlib.AbstractAsyncContextManager[trio.MemoryReceiveChannel[Any]]: ...
@contextlib.asynccontextmanager
async def open_pipeline(
    source: _SourceLike[Any], /, *stages: Stage[Any, Any]
) -> AsyncIterator[trio.MemoryReceiveChannel[Any]]:
    """Run *source* and *stages* as one chain of tasks; yield the last receive channel.

    Each stage runs as a task in a nursery owned by the block, reading from the
    previous one through a zero-buffer channel::

        async with open_pipeline(range(100), map_stage(work), batch(10, 0.5)) as batches:
            async for items in batches:
                ...

    Args:
        source: Where items come from: a :class:`trio.MemoryReceiveChannel` (read
            directly), any other iterable or async iterable (read by a task), or a
            :class:`Source` such as :func:`merge` (run as a task). The pipeline owns
            it: a source with an ``aclose()`` method (an async generator, a channel) is
            closed when the pipeline ends.
        *stages: The stages, in order; each one's output type is the next one's input
            type. With none, the channel yields the source's items.

    Yields:
        The receive channel of the last stage. It ends (:exc:`trio.EndOfChannel`) once
        the whole chain has finished; closing it early stops the chain.

    Raises:
        Exception: An exception from a stage, the source or the block's body leaves the
            block as itself (not wrapped in an :exc:`ExceptionGroup`) when it is the
            only one; several at once leave as a group.

    **Backpressure:** every link is a zero-buffer channel, so the chain holds at most
    one item per stage: a consumer that stops reading stops each stage in turn, up to
    the source. Memory does not grow with the backlog.

    **Cancellation:** leaving the block, normally or by an exception or a cancellation,
    cancels whatever is still running and closes every channel of the chain, including
    the source; no task outlives the block. An item in flight at that moment is
    dropped, never delivered twice.
    """
    to_close: list[trio.MemoryReceiveChannel[Any] | trio.MemorySendChannel[Any]] = []
    try:
        with _lone_exception_unwrapped():
            async with trio.open_nursery() as nursery:
                receive = _start_source(nursery, source, to_close)
                for stage in stages:
                    send_next, receive_next = trio.open_memory_channel[Any](0)
                    to_close += (send_next, receive_next)
                    nursery.start_soon(stage, receive, send_next)
                    receive = receive_next
                yield receive
                nursery.cancel_scope.cancel()
    finally:
        for channel in to_close:
            channel.close()


def _start_source(
    nursery: trio.Nursery,
    source: _SourceLike[T],
    to_close: list[trio.MemoryReceiveChannel[Any] | trio.MemorySendChannel[Any]],
) -> trio.MemoryReceiveChannel[T]:
    """Start what *source* needs in *nursery*; return the channel that yields its items."""
    if isinstance(source, trio.MemoryReceiveChannel):
        to_close.append(source)
        return source
    send, receive = trio.open_memory_channel[T](0)
    to_close += (send, receive)
    if isinstance(source, AsyncIterable):
        nursery.start_soon(_feed_async, source, send)
    elif isinstance(source, Iterable):
        nursery.start_soon(_feed, source, send)
    elif callable(source):
        nursery.start_soon(source, send)
    else:
        raise TypeError(f"a pipeline source must be iterable or callable, got {source!r}")
    return receive
