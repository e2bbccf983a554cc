"""`ResponseBuilder`: what a wire protocol (OpenAI, Anthropic) contributes to serving a request.

The `ProtocolHandler` runs the same steps for every protocol (prepare, submit, stream or collect, cancel on
disconnect); a builder supplies the protocol-specific parts: reading the request into a prompt and a
`GenContext`, and writing stream frames, the final response body and error bodies. Builders hold no
per-request state, so one instance per protocol serves every request of an app.

Server-sent events are framed here (`sse`): every event ends with a blank line, as the SSE specification and
both official SDKs require (the original ended events with a single newline, so clients merged them).

`encode_prompt` is the one place a request's text reaches the tokenizer. It refuses text far longer than
the context could hold before tokenising it (`MAX_CHARS_PER_TOKEN` characters per token of context), and
renders the chat template under `render_time_limit`, so a template that never finishes fails that request.
The app runs `prepare` in a worker thread, so neither blocks other requests.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from astrai.serve.context import GenContext
from astrai.serve.errors import APIError
from astrai.tokenize.chat_template import render_time_limit

if TYPE_CHECKING:
    from astrai.inference import InferenceEngine


# No tokenizer packs more text than this into a token on average; a prompt longer than this many characters per
# token of context cannot fit, and is refused before the tokenizer spends time on it.
MAX_CHARS_PER_TOKEN = 32
TEMPLATE_TIME_LIMIT_S = 5.0  # default bound on rendering one request's chat template


def sse(data: dict[str, Any] | str, event: str | None = None) -> str:
    """One server-sent event: optional `event:` line, one `data:` line (compact JSON), blank line."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    head = f"event: {event}\n" if event is not None else ""
    return f"{head}data: {payload}\n\n"


def check_context(
    prompt_tokens: int, max_tokens: int | None, max_seq_len: int, param: str, prompt_param: str = "messages"
) -> None:
    """Refuse (400) a prompt that leaves no room, or a `max_tokens` that does not fit the model's context."""
    if max_tokens is None:
        if prompt_tokens >= max_seq_len:
            raise APIError(
                400,
                f"the prompt has {prompt_tokens} tokens, which leaves no room to generate within the model's "
                f"context length of {max_seq_len} tokens",
                prompt_param,
            )
    elif prompt_tokens + max_tokens > max_seq_len:
        raise APIError(
            400,
            f"the prompt ({prompt_tokens} tokens) plus {param} ({max_tokens}) exceeds the model's context length "
            f"of {max_seq_len} tokens",
            param,
        )


def check_chars(chars: int, max_seq_len: int, param: str) -> None:
    """Refuse (400) text too long for any prompt within the context (`MAX_CHARS_PER_TOKEN`), before tokenising it."""
    if chars > MAX_CHARS_PER_TOKEN * max_seq_len:
        raise APIError(
            400,
            f"the {param} have {chars} characters, more than a prompt within the model's context length of "
            f"{max_seq_len} tokens can have (at most {MAX_CHARS_PER_TOKEN} characters per token)",
            param,
        )


def settle(ctx: GenContext, content: str | None, stop: str | None) -> None:
    """Close `ctx` for the architecture document's call forms `format_stream_end(ctx, stop)` and
    `format_response(ctx, content, stop)`, used by a caller that ran the generation itself rather than recording
    engine events into `ctx`: `content` becomes the text and `stop` the matched stop sequence of its one choice;
    a choice with no finish reason yet ended normally ("stop"). With neither, a fully recorded `ctx` is unchanged.
    """
    if content is not None or stop is not None:
        if len(ctx.choices) != 1:
            raise ValueError(f"content / stop describe one choice; this context has {len(ctx.choices)}")
        choice = ctx.choices[0]
        if content is not None:
            choice.text = content
        if stop is not None:
            choice.finish_reason, choice.stop_sequence = "stop_sequence", stop
    for choice in ctx.choices:
        if choice.finish_reason is None:
            choice.finished, choice.finish_reason = True, "stop"


class ResponseBuilder(ABC):
    """Protocol-specific request reading and response writing; see the module docstring."""

    def __init__(self, model_name: str, *, template_time_limit: float = TEMPLATE_TIME_LIMIT_S) -> None:
        self.model_name = model_name  # reported in every response's `model` field
        self.template_time_limit = template_time_limit  # seconds one chat-template render may take

    @abstractmethod
    def prepare(self, request: Any, engine: InferenceEngine) -> tuple[list[int], GenContext, list[str]]:
        """Validate `request` against the engine and return (prompt token ids, context, stop strings).

        Raises `APIError` (400) for anything the request schema alone could not check.
        """

    @abstractmethod
    def format_stream_start(self, ctx: GenContext) -> list[str]:
        """The SSE frames sent before any generated text."""

    @abstractmethod
    def format_chunk(self, ctx: GenContext, token: str, index: int = 0) -> str:
        """The SSE frame carrying `token`, a new piece of text of choice `index`."""

    @abstractmethod
    def format_stream_end(self, ctx: GenContext, stop: str | None = None) -> list[str]:
        """The SSE frames closing a stream whose choices all finished normally (finish reasons, usage).

        `stop`: the stop sequence that ended a single-choice generation the caller ran itself (see `settle`).
        """

    @abstractmethod
    def format_response(self, ctx: GenContext, content: str | None = None, stop: str | None = None) -> dict[str, Any]:
        """The JSON body of a non-streaming response whose choices all finished normally.

        `content` / `stop`: the text and the stop sequence of a single-choice generation the caller ran
        itself (see `settle`); the handler records engine events into `ctx` instead and passes neither.
        """

    @abstractmethod
    def format_stream_error(self, status: int, message: str) -> str:
        """The SSE frame reporting a failure after the stream started (the stream ends after it)."""

    @abstractmethod
    def error_body(self, status: int, message: str, param: str | None) -> tuple[int, dict[str, Any]]:
        """The (HTTP status, JSON body) of a refused request in this protocol's error shape."""

    def encode_prompt(
        self,
        engine: InferenceEngine,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Render `messages` ({"role", "content"} dicts) with the chat template and tokenise them, once.

        A chat template is Jinja code run on the client's messages, and templates reject conversations they
        do not support (`raise_exception("roles must alternate")`, ...), with whatever exception type the
        template engine uses; such a refusal, or a render past `template_time_limit`, is the request's
        fault, so it is a 400, never a 500.
        """
        check_chars(sum(len(m.get("content") or "") for m in messages), engine.max_seq_len, "messages")
        try:
            with render_time_limit(self.template_time_limit):
                return list(
                    engine.tokenizer.apply_chat_template(
                        messages,
                        tokenize=True,
                        add_generation_prompt=add_generation_prompt,
                        **({"tools": tools} if tools is not None else {}),
                    )
                )
        except Exception as exc:
            raise APIError(400, f"the chat template cannot render these messages: {exc}", "messages") from exc
