"""`server_config`: the uvicorn configuration `astrai serve` runs an app under, with connection timeouts.

uvicorn closes a keep-alive connection that stays idle `timeout_keep_alive` seconds after a response, but
it waits for ever on a connection that was opened and never sends a complete request head, or sends it a
byte at a time (slowloris): each such connection is held open, and enough of them exhaust the server's
file descriptors. `HeaderTimeoutProtocol` closes a connection that has not delivered a full request head
within `header_timeout` seconds of opening, or of its previous response completing.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol


class HeaderTimeoutProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP protocol, closing connections whose request head does not arrive in time."""

    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None

    def _awaiting_head(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self._header_timeout, self._on_header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self._awaiting_head() and not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._awaiting_head():
            self._arm_header_timer()  # a new request head has begun (or is still incomplete)
        else:
            self._disarm_header_timer()  # the head is complete: the request is being served

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()  # the next request head must arrive in time too (keep-alive also applies)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)


def server_config(
    app: Any,
    *,
    host: str,
    port: int,
    header_timeout: float,
    keep_alive_timeout: float,
    log_level: str = "info",
) -> uvicorn.Config:
    """A uvicorn config serving `app`, closing connections after the header and keep-alive timeouts (seconds)."""
    for name, value in (("header_timeout", header_timeout), ("keep_alive_timeout", keep_alive_timeout)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=functools.partial(HeaderTimeoutProtocol, header_timeout=header_timeout),
        timeout_keep_alive=keep_alive_timeout,
        log_level=log_level,
        timeout_graceful_shutdown=5,
    )
