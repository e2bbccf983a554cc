"""Request schema of OpenAI's `POST /v1/chat/completions`, as far as this server implements it.

Field names, types and ranges follow the OpenAI API reference. Unknown fields are ignored (clients send
many optional ones); fields that ask for output this server cannot produce (a JSON `response_format`)
are refused instead of silently ignored. `logprobs` / `top_logprobs` (at most 20) report the log-probabilities
of the model's logits before the sampling filters, as OpenAI and vLLM do. `top_k`, `repetition_penalty` and
`ignore_eos` are extensions in the style of vLLM.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, Strict, field_validator, model_validator

from astrai.inference.task import MAX_LOGPROBS
from astrai.serve.fields import STRICT, Count, StopSequences, Text, TextBlock, TopK, joined_text

MAX_CHOICES = 16  # upper bound on `n`: each choice is an independent engine request


class ChatMessage(BaseModel):
    """One chat message. `content` is a string or a list of text parts (joined with newlines).

    Only an assistant message may leave `content` out (or null), as in the OpenAI API.
    """

    model_config = STRICT

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextBlock] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # assistant: [{"id", "type", "function": {"name", "arguments"}}]
    tool_call_id: str | None = None  # tool: the call this message answers

    @model_validator(mode="after")
    def _require_content(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message must have content")
        return self

    @property
    def text(self) -> str:
        return joined_text(self.content)


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """Body of `POST /v1/chat/completions`; `None` means "the engine's default" for every sampling field."""

    model_config = STRICT

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: TopK | None = None
    max_tokens: Count | None = None
    max_completion_tokens: Count | None = None  # the newer name; wins over max_tokens
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Text | StopSequences | None = None
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    # JSON object keys are strings: the token ids are parsed from them (the one lax field)
    logit_bias: dict[Annotated[int, Strict(False)], float] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    user: str | None = None
    ignore_eos: bool | None = False
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @property
    def stop_sequences(self) -> list[str]:
        if isinstance(self.stop, str):
            return [self.stop]
        return list(self.stop or [])

    @field_validator("stop")
    @classmethod
    def _check_single_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if stop == "":
            raise ValueError("stop sequences must be non-empty strings")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, bias: dict[int, float] | None) -> dict[int, float] | None:
        for token_id, value in (bias or {}).items():
            if token_id < 0:
                raise ValueError(f"logit_bias keys must be token ids >= 0, got {token_id}")
            if not -100 <= value <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {value} for token {token_id}")
        return bias

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @field_validator("response_format")
    @classmethod
    def _refuse_structured_output(cls, fmt: dict[str, Any] | None) -> dict[str, Any] | None:
        if fmt is not None and fmt.get("type", "text") != "text":
            raise ValueError(f"response_format {fmt.get('type')!r} is not supported; only 'text' is")
        return fmt
