"""Optional API-key check, as pure ASGI middleware so it runs before anything reads the request body.

A key is accepted from `Authorization: Bearer <key>` (the openai SDK and anthropic SDK 2.x) or from
`x-api-key: <key>` (older anthropic SDKs, Claude Code). Keys are compared in constant time, as the UTF-8
bytes the client sent (header values are bytes; decoding them as Latin-1, as Starlette's `Headers` does,
would make a non-ASCII key never match its own UTF-8 encoding). Paths in
`public_paths` (by default `/health`, for load balancers) need no key. A refused request gets 401 in the
error shape of the protocol its path belongs to; `reject(path)` builds that response.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send


class APIKeyMiddleware:
    """Refuse HTTP requests that do not present `api_key`; see the module docstring."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str,
        reject: Callable[[str], Response],
        public_paths: frozenset[str] = frozenset({"/health"}),
    ) -> None:
        if not api_key:
            raise ValueError(f"api_key must be a non-empty string, got {api_key!r}")
        self.app = app
        self._key = api_key.encode("utf-8")
        self.reject = reject
        self.public_paths = public_paths

    def _authorised(self, scope: Scope) -> bool:
        presented = []
        for name, value in scope["headers"]:  # raw bytes; names are lower-case in ASGI
            if name == b"x-api-key":
                presented.append(value.strip())
            elif name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    presented.append(token.strip())
        return any(hmac.compare_digest(key, self._key) for key in presented)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.public_paths and not self._authorised(scope):
            await self.reject(scope["path"])(scope, receive, send)
            return
        await self.app(scope, receive, send)
