"""The one exception type the serving layer raises for a request it refuses.

`APIError` carries an HTTP status in OpenAI's terms (400 bad request, 401 bad key, 429 overloaded, 500/503
server side) plus a message and, where one field is at fault, its name. Each protocol's `ResponseBuilder`
turns it into that protocol's error body (and Anthropic turns 429 into its own 529 "overloaded_error"), so
code that refuses a request never needs to know which protocol it is serving.

`OPENAI_ERRORS` / `ANTHROPIC_ERRORS` document those bodies in the OpenAPI schema (FastAPI's `responses=`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel


class APIError(Exception):
    """A request refused with `status`; `param` names the offending request field when there is one."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def __repr__(self) -> str:
        return f"APIError(status={self.status}, message={self.message!r}, param={self.param!r})"


class _OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(BaseModel):
    """An OpenAI error response body."""

    error: _OpenAIErrorDetail


class _AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicErrorBody(BaseModel):
    """An Anthropic error response body."""

    type: Literal["error"]
    error: _AnthropicErrorDetail


_BAD_REQUEST = "The request is invalid: malformed JSON, a wrong type, a value out of range, a prompt too long."
OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": OpenAIErrorBody, "description": _BAD_REQUEST},
    404: {"model": OpenAIErrorBody, "description": "The model named in the request is not served here."},
    413: {"model": OpenAIErrorBody, "description": "The request body is over the server's limit."},
}
ANTHROPIC_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {**spec, "model": AnthropicErrorBody} for status, spec in OPENAI_ERRORS.items()
}
