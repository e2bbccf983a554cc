"""`BodyLimitMiddleware`: refuse request bodies larger than the server will ever use, before reading them.

Pure ASGI, so it runs before anything buffers the body. A `Content-Length` over the limit is answered at
once with 413, without reading a byte of the body; a body without a length (chunked transfer encoding) is
counted as it arrives and refused as soon as it passes the limit, so the server never holds more than
`max_bytes` of it. Either way the refusal is in the error shape of the protocol its path belongs to
(`reject(path, message)` builds it).

`default_max_request_bytes(max_seq_len)` sizes the limit from the model's context: a request whose text
fills the whole context is far below it, whatever the script and JSON escaping.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MIN_REQUEST_BYTES = 1 << 20  # 1 MiB: room for long system prompts and generation settings on a tiny model
BYTES_PER_CONTEXT_TOKEN = 64  # a token is a few bytes of UTF-8; `\uXXXX` escapes and JSON framing add more


def default_max_request_bytes(max_seq_len: int) -> int:
    """The body limit for a model with a context of `max_seq_len` tokens."""
    return max(MIN_REQUEST_BYTES, BYTES_PER_CONTEXT_TOKEN * max_seq_len)


def _too_large(max_bytes: int) -> str:
    return f"the request body is larger than this server's limit of {max_bytes} bytes (--max-request-bytes)"


class BodyLimitMiddleware:
    """Answer 413 to an HTTP request whose body is over `max_bytes`; see the module docstring."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, reject: Callable[[str, str], Response]) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1, got {max_bytes}")
        self.app = app
        self.max_bytes = max_bytes
        self.reject = reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self.reject(scope["path"], _too_large(self.max_bytes))(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside the endpoint's body read: the app's HTTP error handler answers it.
                    raise HTTPException(413, _too_large(self.max_bytes))
            return message

        await self.app(scope, counting_receive, send)
