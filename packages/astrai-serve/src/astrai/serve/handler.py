"""`ProtocolHandler`: serves one generation request, streaming or not, for any `ResponseBuilder`.

Steps: the builder prepares the prompt and context (400 on bad input); one engine request is submitted
per choice (on the choice's own prompt where it has one: a completion request may hold several) (429 when the queue is full, 503 once the engine loop has stopped; nothing is left behind); then either a `StreamingResponse` whose
body turns engine events into the protocol's frames, or the collected events turned into one JSON body.

Every way a request can end cancels its engine handles (`handle.cancel()` is idempotent): the streaming
body cancels in its `finally` (a client disconnect cancels the body task) and again in a background task
(covering a disconnect before the body ever started); the non-streaming path races the collection against
the client's `http.disconnect` message, so a client that hangs up stops its generation at once, even
while its prompt is still queued or being prefilled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from astrai.inference import GenerationEvent, LoopStoppedError, QueueFullError, SamplingParams
from astrai.serve.builder import ResponseBuilder
from astrai.serve.context import GenContext
from astrai.serve.errors import APIError

if TYPE_CHECKING:
    from astrai.inference import InferenceEngine

logger = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client hung up"; nobody receives it


def _cancel_all(handles: Sequence[Any]) -> None:
    for handle in handles:
        handle.cancel()


async def _merge(handles: Sequence[Any]) -> AsyncIterator[tuple[int, GenerationEvent]]:
    """Yield (choice index, event) from all handles as they arrive, until each has sent its final event."""
    queue: asyncio.Queue[tuple[int, GenerationEvent | BaseException]] = asyncio.Queue()

    async def pump(index: int, handle: Any) -> None:
        try:
            async for event in handle:
                queue.put_nowait((index, event))
        except Exception as exc:  # delivered to the consumer, which fails the request with it
            queue.put_nowait((index, exc))

    pumps = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        remaining = len(handles)
        while remaining:
            index, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            remaining -= item.finished
            yield index, item
    finally:
        for task in pumps:
            task.cancel()


async def _wait_for_disconnect(request: Request) -> None:
    """Return when the client closes the connection (the body has been read, so only that can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ProtocolHandler:
    """Serves `request` (a parsed protocol request) on `engine`, with `builder` for the protocol's format.

    `http_request` is the Starlette request, watched for client disconnects. `max_queue`, when set, refuses
    (429) a request that would make the engine's waiting queue longer than that.
    """

    def __init__(
        self,
        request: Any,
        engine: InferenceEngine,
        builder: ResponseBuilder,
        *,
        http_request: Request,
        max_queue: int | None = None,
    ) -> None:
        self.request = request
        self.engine = engine
        self.builder = builder
        self.http_request = http_request
        self.max_queue = max_queue

    async def handle(self) -> StreamingResponse | Response | dict[str, Any]:
        # Rendering and tokenising a long prompt takes a while: keep the event loop serving other requests.
        prompt_ids, ctx, stops = await asyncio.to_thread(self.builder.prepare, self.request, self.engine)
        handles = self._submit(prompt_ids, ctx, stops)
        if ctx.stream:
            return self._handle_stream(handles, ctx)
        return await self._handle_non_stream(handles, ctx)

    def _submit(self, prompt_ids: list[int], ctx: GenContext, stops: list[str]) -> list[Any]:
        """Submit one engine request per choice; all or none (a refusal cancels those already submitted)."""
        if self.max_queue is not None and self.engine.get_stats()["waiting"] + len(ctx.choices) > self.max_queue:
            raise APIError(429, f"the server is overloaded: more than {self.max_queue} requests are waiting")
        try:
            params = SamplingParams(**ctx.sampling, stop=stops or None)
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc
        handles: list[Any] = []
        try:
            for choice in ctx.choices:
                # Choices must differ even under a seed: choice i samples with seed + i (mod 2**63, the schema's range).
                if params.seed is None:
                    seeded = params
                else:
                    seeded = dataclasses.replace(params, seed=(params.seed + choice.index) % 2**63)
                prompt = prompt_ids if choice.prompt_ids is None else choice.prompt_ids
                handles.append(self.engine.submit(prompt, seeded))
        except QueueFullError as exc:
            _cancel_all(handles)
            raise APIError(429, f"the server is overloaded: {exc}") from exc
        except LoopStoppedError as exc:
            _cancel_all(handles)
            raise APIError(503, f"the server is not generating: {exc}") from exc
        except ValueError as exc:
            _cancel_all(handles)
            raise APIError(400, str(exc)) from exc
        return handles

    def _handle_stream(self, handles: list[Any], ctx: GenContext) -> StreamingResponse:
        builder = self.builder

        async def body() -> AsyncIterator[str]:
            try:
                for frame in builder.format_stream_start(ctx):
                    yield frame
                async for index, event in _merge(handles):
                    ctx.record(index, event)
                    if event.text:
                        yield builder.format_chunk(ctx, event.text, index)
                    if (failed := ctx.failure()) is not None:
                        yield builder.format_stream_error(*_failure_status(failed.finish_reason, failed.error))
                        return
                for frame in builder.format_stream_end(ctx):
                    yield frame
            except Exception as exc:  # the stream has started: report in-band, then end it
                logger.exception("stream %s failed", ctx.resp_id)
                yield builder.format_stream_error(500, f"internal error: {exc}")
            finally:
                _cancel_all(handles)

        return StreamingResponse(
            body(), media_type="text/event-stream", headers=SSE_HEADERS, background=BackgroundTask(_cancel_all, handles)
        )

    async def _handle_non_stream(self, handles: list[Any], ctx: GenContext) -> Response | dict[str, Any]:
        async def collect() -> None:
            async for index, event in _merge(handles):
                ctx.record(index, event)

        collecting = asyncio.ensure_future(collect())
        watching = asyncio.ensure_future(_wait_for_disconnect(self.http_request))
        try:
            await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watching.cancel()
            collecting.cancel()  # no-op when it finished
            _cancel_all(handles)
            await asyncio.gather(watching, collecting, return_exceptions=True)
        if collecting.cancelled():
            logger.info("client disconnected; cancelled %s", ctx.resp_id)
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        collecting.result()  # re-raise a failure of the engine's event stream (answered as a 500)
        if (failed := ctx.failure()) is not None:
            raise APIError(*_failure_status(failed.finish_reason, failed.error))
        return self.builder.format_response(ctx)


def _failure_status(finish_reason: str | None, error: str | None) -> tuple[int, str]:
    """(status, message) for a generation that ended with finish_reason "error" or "cancelled"."""
    if finish_reason == "cancelled":  # not by this request: the engine is shutting down
        return 503, "the generation was cancelled because the server is shutting down"
    return 500, f"generation failed: {error or 'unknown engine error'}"
