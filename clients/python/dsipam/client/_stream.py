"""Server-streaming calls as iterators: :class:`Stream` (blocking) and :class:`AsyncStream` (asyncio).

A stream is started with retries (UNAVAILABLE and ABORTED, with backoff, until the call's
deadline) until its first message arrives; after that a failure ends the iteration with the
matching :class:`IpamError`. The watch streams add the resume token of the last message seen,
and the ``follow_allocations`` streams resume by themselves from it.

The body of a stream is a generator of every message; ``hide`` keeps some of them (bookmarks
nobody asked for) from the caller. Priming takes the first message ahead: the blocking client
primes before it returns a stream, so that starting errors are raised by the method itself.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable, Generator
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from ._types import WatchEvent

T = TypeVar("T")


class Stream(Generic[T]):
    """The messages of a server-streaming call, as a blocking iterator.

    Iterate it (``for progress in stream``); :meth:`cancel` ends it from any thread (the
    iteration then stops without an error), and so does leaving a ``with`` block. A stream
    that is dropped without either is cancelled when it is garbage-collected.
    """

    def __init__(self, body: Callable[[Self], Generator[T, None, None]], *, hide: Callable[[T], bool] | None = None) -> None:
        self._lock = threading.Lock()
        self._call: Any = None
        self._cancelled = threading.Event()
        self._hide = hide
        self._ahead: list[T] = []
        self._body = body(self)

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> T:
        while True:
            item = self._ahead.pop() if self._ahead else next(self._body)
            if self._hide is None or not self._hide(item):
                return item

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Ends the stream: the call in flight is cancelled and iteration stops. Safe from any
        thread, and more than once."""
        with self._lock:
            self._cancelled.set()
            call = self._call
        if call is not None:
            call.cancel()

    def close(self) -> None:
        """Cancels the stream and finishes its iterator (call it from the consuming thread)."""
        self.cancel()
        try:
            self._body.close()
        except ValueError:  # the iterator is running in another thread: cancel() ends it there
            pass

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- for the client ---------------------------------------------------------------------

    def _attach(self, call: Any) -> None:
        """Makes ``call`` the one :meth:`cancel` cancels (cancelled at once if the stream is)."""
        with self._lock:
            self._call = call
            cancelled = self._cancelled.is_set()
        if cancelled:
            call.cancel()

    def _pause(self, seconds: float) -> bool:
        """Sleeps; returns False at once when the stream is cancelled meanwhile."""
        return not self._cancelled.wait(seconds)

    def _prime(self) -> Self:
        """Takes the first message ahead (starting the call); on an error, ends the stream."""
        try:
            self._ahead.append(next(self._body))
        except StopIteration:
            pass
        except BaseException:
            self.close()
            raise
        return self


class WatchStream(Stream[WatchEvent]):
    """A :class:`Stream` of :class:`WatchEvent` that remembers where it is.

    Attributes:
        resume_token: the token of the last message seen (bookmarks included); pass it to
            ``watch_allocations`` or ``follow_allocations`` to continue after it. Empty until
            the first message.
        resumes: how many times the stream reconnected after the server went away (always 0
            for ``watch_allocations``, which does not resume by itself).
    """

    def __init__(
        self, body: Callable[[Self], Generator[WatchEvent, None, None]], *, resume_token: str = "", bookmarks: bool = True
    ) -> None:
        self.resume_token = resume_token
        self.resumes = 0
        super().__init__(body, hide=None if bookmarks else _is_bookmark)


def _is_bookmark(event: WatchEvent) -> bool:
    return event.is_bookmark


class AsyncStream(Generic[T]):
    """The messages of a server-streaming call, as an async iterator.

    ``async for`` over it; :meth:`cancel` ends it (the iteration then stops without an error),
    and so does leaving an ``async with`` block. The call starts with the first iteration;
    ``await stream`` starts it at once (retries included) and returns the stream, so that
    starting errors such as :class:`PoolNotFound` are raised there.
    """

    def __init__(self, body: Callable[[Self], AsyncGenerator[T, None]], *, hide: Callable[[T], bool] | None = None) -> None:
        self._call: Any = None
        self._cancelled = False
        self._wake: asyncio.Event | None = None
        self._hide = hide
        self._ahead: list[T] = []
        self._primed = False
        self._body = body(self)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> T:
        while True:
            if self._ahead:
                item = self._ahead.pop()
            else:
                self._primed = True
                item = await self._body.__anext__()
            if self._hide is None or not self._hide(item):
                return item

    def __await__(self) -> Generator[Any, None, Self]:
        return self._prime().__await__()

    async def _prime(self) -> Self:
        if not self._primed:
            self._primed = True
            try:
                self._ahead.append(await self._body.__anext__())
            except StopAsyncIteration:
                pass
            except BaseException:
                await self.aclose()
                raise
        return self

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._cancelled

    def cancel(self) -> None:
        """Ends the stream: the call in flight is cancelled and iteration stops. Call it from the
        event loop's thread; more than once is harmless."""
        self._cancelled = True
        if self._wake is not None:
            self._wake.set()
        if self._call is not None:
            self._call.cancel()

    async def aclose(self) -> None:
        """Cancels the stream and finishes its iterator."""
        self.cancel()
        try:
            await self._body.aclose()
        except RuntimeError:  # the iterator is being awaited elsewhere: cancel() ends it there
            pass

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- for the client ---------------------------------------------------------------------

    def _attach(self, call: Any) -> None:
        self._call = call
        if self._cancelled:
            call.cancel()

    async def _pause(self, seconds: float) -> bool:
        """Sleeps; returns False at once when the stream is cancelled meanwhile."""
        if self._cancelled:
            return False
        if self._wake is None:
            self._wake = asyncio.Event()
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except TimeoutError:
            pass
        return not self._cancelled


class AsyncWatchStream(AsyncStream[WatchEvent]):
    """An :class:`AsyncStream` of :class:`WatchEvent` that remembers where it is.

    Attributes:
        resume_token: the token of the last message seen (bookmarks included); pass it to
            ``watch_allocations`` or ``follow_allocations`` to continue after it.
        resumes: how many times the stream reconnected after the server went away.
    """

    def __init__(
        self, body: Callable[[Self], AsyncGenerator[WatchEvent, None]], *, resume_token: str = "", bookmarks: bool = True
    ) -> None:
        self.resume_token = resume_token
        self.resumes = 0
        super().__init__(body, hide=None if bookmarks else _is_bookmark)
