"""Request schema of Anthropic's `POST /v1/messages`, as far as this server implements it.

Field names and ranges follow the Anthropic Messages API (`max_tokens` is required, `temperature` is in
[0, 1]). Content is a string or a list of text blocks; other block types (images, documents, tool use and
results, thinking) are refused, as are `tools`. Unknown fields (`metadata`, `cache_control` on blocks, ...)
are ignored. A `system` role inside `messages` is accepted, because some clients send it there.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from astrai.serve.fields import STRICT, Count, StopSequences, Text, TextBlock, TopK, joined_text


class AnthropicMessage(BaseModel):
    """One message of the conversation."""

    model_config = STRICT

    role: Literal["user", "assistant", "system"]
    content: Text | list[TextBlock]

    @property
    def text(self) -> str:
        return joined_text(self.content)


class MessagesRequest(BaseModel):
    """Body of `POST /v1/messages`; `None` means "the engine's default" for every sampling field."""

    model_config = STRICT

    model: str | None = None
    max_tokens: Count
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: Text | list[TextBlock] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: TopK | None = None
    stream: bool | None = False
    stop_sequences: StopSequences | None = None
    tools: list[dict[str, Any]] | None = None

    @field_validator("tools")
    @classmethod
    def _refuse_tools(cls, tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if tools:
            raise ValueError("tool use is not supported by this server")
        return tools


class CountTokensRequest(BaseModel):
    """Body of `POST /v1/messages/count_tokens`: a messages request without generation settings."""

    model_config = STRICT

    model: str | None = None
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: Text | list[TextBlock] | None = None
