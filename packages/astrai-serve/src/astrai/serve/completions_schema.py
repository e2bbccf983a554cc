"""Request schemas of OpenAI's legacy `POST /v1/completions` and vLLM's `/tokenize` and `/detokenize`.

A completion prompt is a text, a list of token ids, or a non-empty list of either (one prompt each, and `n`
choices per prompt). `max_tokens` defaults to 16, as in the OpenAI API; `max_tokens: 0` is allowed with
`echo`, for scoring a text: the response then carries the prompt and, with `logprobs`, the log-probability of
every prompt token given the ones before it (what lm-evaluation-harness's `local-completions` reads).
`logprobs` is the number of most likely tokens to report per position (0..20, vLLM's bound; OpenAI's is 5).
`suffix` and `best_of` other than `n` are refused: this server cannot produce them.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field, Strict, field_validator, model_validator

from astrai.inference.task import MAX_COUNT, MAX_LOGPROBS
from astrai.serve.fields import STRICT, StopSequences, Text, TopK
from astrai.serve.openai_schema import MAX_CHOICES, ChatMessage, StreamOptions

TokenId = Annotated[int, Field(ge=0, le=MAX_COUNT)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
MAX_PROMPTS = 1024  # prompts of one request; lm-eval batches a few dozen


class CompletionRequest(BaseModel):
    """Body of `POST /v1/completions`; `None` means "the engine's default" for every sampling field."""

    model_config = STRICT

    model: str | None = None
    prompt: (
        Text | TokenIds | Annotated[list[Text], Field(min_length=1)] | Annotated[list[TokenIds], Field(min_length=1)]
    )
    max_tokens: Annotated[int, Field(ge=0, le=MAX_COUNT)] | None = 16
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: TopK | None = None
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    stop: Text | StopSequences | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    logit_bias: dict[Annotated[int, Strict(False)], float] | None = None  # JSON keys are strings
    seed: int | None = Field(None, ge=0, lt=2**63)
    suffix: str | None = None
    user: str | None = None
    ignore_eos: bool | None = False

    @property
    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts, one text or one list of token ids each."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]  # type: ignore[list-item]
        return self.prompt  # type: ignore[return-value]

    @property
    def stop_sequences(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @field_validator("prompt")
    @classmethod
    def _bound_prompts(cls, prompt: Any) -> Any:
        many = isinstance(prompt, list) and isinstance(prompt[0], (str, list))
        if many and len(prompt) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts are allowed in one request, got {len(prompt)}")
        if prompt == "" or (many and "" in prompt):
            raise ValueError("a prompt must not be empty")
        return prompt

    @field_validator("stop")
    @classmethod
    def _check_single_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if stop == "":
            raise ValueError("stop sequences must be non-empty strings")
        return stop

    @field_validator("suffix")
    @classmethod
    def _refuse_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise ValueError("suffix (fill in the middle) is not supported by this server")
        return suffix

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, bias: dict[int, float] | None) -> dict[int, float] | None:
        for token_id, value in (bias or {}).items():
            if token_id < 0 or not -100 <= value <= 100:
                raise ValueError(f"logit_bias: token {token_id} -> {value}: ids must be >= 0, biases in [-100, 100]")
        return bias

    @model_validator(mode="after")
    def _check_combinations(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ValueError("best_of other than n is not supported by this server")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 generates nothing: it is only allowed with echo (to score the prompt)")
        if self.stream and self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs is not supported when streaming; send stream=false")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self


class TokenizeRequest(BaseModel):
    """Body of `POST /tokenize` (vLLM's): a `prompt` text, or chat `messages` rendered with the chat template."""

    model_config = STRICT

    model: str | None = None
    prompt: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages (the template adds them)
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(BaseModel):
    """Body of `POST /detokenize` (vLLM's)."""

    model_config = STRICT

    model: str | None = None
    tokens: list[TokenId]
