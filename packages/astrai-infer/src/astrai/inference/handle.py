"""Where a request's events wait for their reader: `RequestHandle` (one request) and `GenerateResult` (many).

The inference loop delivers events from its own thread; readers may be plain threads or coroutines on any
asyncio event loop. A handle buffers events under a lock and wakes whoever waits: a `threading.Condition` for
blocking readers, and for a coroutine an `asyncio.Event` set through `loop.call_soon_threadsafe` (the only
safe way to touch another thread's event loop). Nothing is ever polled.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Iterator

from astrai.inference.stream import GenerationEvent


class RequestHandle:
    """One submitted request: iterate it (sync or async) for its events; `cancel()` to stop it early.

    Iteration ends after the final event (`finished=True`), which every request receives exactly once.
    """

    def __init__(self, prompt_tokens: int, cancel: Callable[[str], object]):
        self.request_id = ""  # set by the engine once the loop has accepted the request
        self.prompt_tokens = prompt_tokens
        self._cancel = cancel
        self._cond = threading.Condition()
        self._events: deque[GenerationEvent] = deque()  # guarded by _cond
        self._waker: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None  # guarded by _cond
        self._delivered_final = False  # guarded by _cond
        self._read_final = False  # the reader has taken the final event; guarded by _cond

    @property
    def finished(self) -> bool:
        """The final event has been delivered (it may not have been read yet)."""
        with self._cond:
            return self._delivered_final

    def deliver(self, event: GenerationEvent) -> None:
        """Called by the inference loop with each event of this request."""
        with self._cond:
            self._events.append(event)
            self._delivered_final |= event.finished
            self._cond.notify_all()
            waker, self._waker = self._waker, None
        if waker is not None:
            loop, ready = waker
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # that event loop is closed: nobody is listening any more
                self.cancel()

    def cancel(self) -> None:
        """Stop the request (idempotent); a final "cancelled" event follows unless it had already finished."""
        if self.request_id:
            self._cancel(self.request_id)

    def iter_sync(self, timeout: float | None = None) -> Iterator[GenerationEvent]:
        """Blocking iteration; `timeout` bounds each wait for the next event (TimeoutError past it)."""
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: self._events or self._read_final, timeout):
                    raise TimeoutError(f"request {self.request_id}: no event within {timeout} s")
                if not self._events:
                    return
                event = self._take()
            yield event
            if event.finished:
                return

    def __aiter__(self) -> RequestHandle:
        return self

    async def __anext__(self) -> GenerationEvent:
        while True:
            with self._cond:
                if self._events:
                    return self._take()
                if self._read_final:
                    raise StopAsyncIteration
                ready = asyncio.Event()
                self._waker = (asyncio.get_running_loop(), ready)
            await ready.wait()

    def _take(self) -> GenerationEvent:
        event = self._events.popleft()
        self._read_final |= event.finished
        return event


class GenerateResult:
    """Collects the output of `count` requests, by index, from the loop thread; readers wait on it.

    `results[i]` is request i's text so far, `token_ids[i]` its token ids, `finish_reasons[i]` its finish
    reason once done. `tokens` lists the `(index, text piece)` pairs not yet taken by `pop_all()` (or, with
    the whole events, by `pop_events()`: both take from the same queue).
    """

    def __init__(self, count: int = 1):
        self.results: list[str] = [""] * count
        self.token_ids: list[list[int]] = [[] for _ in range(count)]
        self.finish_reasons: list[str | None] = [None] * count
        self.errors: list[str | None] = [None] * count
        self._events: list[tuple[int, GenerationEvent]] = []  # not yet taken; guarded by _cond
        self._done = [False] * count
        self._cond = threading.Condition()

    @property
    def tokens(self) -> list[tuple[int, str]]:
        """The `(index, text piece)` pairs not yet taken (events that carry no text are left out)."""
        with self._cond:
            return _pieces(self._events)

    def append(self, token: GenerationEvent | str, idx: int = 0) -> None:
        """Record request `idx`'s next event (called by the inference loop), or a bare text piece of it."""
        if isinstance(token, str):
            token = GenerationEvent(token, [], False, None, None, 0, 0, 0)
        with self._cond:
            self._events.append((idx, token))
            self.results[idx] += token.text
            self.token_ids[idx] += token.token_ids
            if token.finished:
                self._done[idx] = True
                self.finish_reasons[idx] = token.finish_reason
                self.errors[idx] = token.error
            self._cond.notify_all()

    def pop_all(self) -> list[tuple[int, str]]:
        """Take every `(index, text piece)` recorded since the last take."""
        return _pieces(self.pop_events())

    def pop_events(self) -> list[tuple[int, GenerationEvent]]:
        """Take every `(index, event)` recorded since the last take (token ids, final events, errors)."""
        with self._cond:
            events, self._events = self._events, []
        return events

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until an event is pending or every request is done; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._events or all(self._done), timeout)

    def wait_completion(self, timeout: float | None = None) -> None:
        """Wait until every request has finished; TimeoutError past `timeout` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: all(self._done), timeout):
                raise TimeoutError(f"generation timed out after {timeout} s ({sum(self._done)}/{len(self._done)} done)")

    @property
    def done(self) -> bool:
        with self._cond:
            return all(self._done)

    def get_results(self) -> list[str]:
        with self._cond:
            return list(self.results)


def _pieces(events: list[tuple[int, GenerationEvent]]) -> list[tuple[int, str]]:
    return [(idx, event.text) for idx, event in events if event.text]
