"""The one exception type the serving layer raises for a request it refuses.

`APIError` carries an HTTP status in OpenAI's terms (400 bad request, 401 bad key, 429 overloaded, 500/503
server side) plus a message and, where one field is at fault, its name. Each protocol's `ResponseBuilder`
turns it into that protocol's error body (and Anthropic turns 429 into its own 529 "overloaded_error"), so
code that refuses a request never needs to know which protocol it is serving.
"""

from __future__ import annotations


class APIError(Exception):
    """A request refused with `status`; `param` names the offending request field when there is one."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def __repr__(self) -> str:
        return f"APIError(status={self.status}, message={self.message!r}, param={self.param!r})"
