"""Anthropic Messages wire format (`POST /v1/messages`).

Responses follow the anthropic SDK's `Message` and stream-event models. A stream is: `message_start`,
`content_block_start` (one text block, index 0), `ping`, `content_block_delta`*, `content_block_stop`,
`message_delta` (stop reason and cumulative usage), `message_stop`; every event has a named `event:`
line, which the SDK needs (it skips events without one). Usage follows Anthropic's accounting:
`input_tokens` excludes the prompt tokens read from the prefix cache, which are reported as
`cache_read_input_tokens`; `message_start` reports the whole prompt because the cache hit is not yet
known, and `message_delta`'s cumulative usage overwrites it.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

from astrai.serve.anthropic_schema import CountTokensRequest, MessagesRequest
from astrai.serve.builder import ResponseBuilder, check_context, settle, sse
from astrai.serve.context import ChoiceState, GenContext
from astrai.serve.fields import joined_text

if TYPE_CHECKING:
    from astrai.inference import InferenceEngine

# engine finish reason -> Anthropic stop_reason
_STOP_REASONS = {"stop": "end_turn", "stop_sequence": "stop_sequence", "length": "max_tokens"}

# HTTP status -> (Anthropic status, error type); overload is 529 "overloaded_error" in Anthropic's API
_ERROR_KINDS = {
    401: (401, "authentication_error"),
    403: (403, "permission_error"),
    404: (404, "not_found_error"),
    413: (413, "request_too_large"),
    429: (529, "overloaded_error"),
    503: (529, "overloaded_error"),
}


class AnthropicResponseBuilder(ResponseBuilder):
    """Reads `MessagesRequest`s and writes messages and message stream events."""

    @staticmethod
    def chat_messages(request: MessagesRequest | CountTokensRequest) -> list[dict[str, str]]:
        """The conversation as {"role", "content"} dicts for the chat template, `system` first."""
        system = joined_text(request.system)
        messages = [{"role": "system", "content": system}] if system else []
        return messages + [{"role": m.role, "content": m.text} for m in request.messages]

    def prepare(self, request: MessagesRequest, engine: InferenceEngine) -> tuple[list[int], GenContext, list[str]]:
        prompt_ids = self.encode_prompt(engine, self.chat_messages(request))
        check_context(len(prompt_ids), request.max_tokens, engine.max_seq_len, "max_tokens")
        sampling = {
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "top_k": request.top_k,
        }
        ctx = GenContext(
            resp_id=f"msg_{uuid.uuid4().hex[:24]}",
            created=int(time.time()),
            model=self.model_name,
            prompt_tokens=len(prompt_ids),
            stream=bool(request.stream),
            sampling={k: v for k, v in sampling.items() if v is not None},
            choices=[ChoiceState(0)],
        )
        return prompt_ids, ctx, list(request.stop_sequences or [])

    @staticmethod
    def _usage(ctx: GenContext) -> dict[str, int]:
        return {
            "input_tokens": ctx.prompt_tokens - ctx.cached_tokens,
            "cache_read_input_tokens": ctx.cached_tokens,
            "output_tokens": ctx.completion_tokens,
        }

    def format_stream_start(self, ctx: GenContext) -> list[str]:
        message = {
            "id": ctx.resp_id,
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": ctx.model,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": ctx.prompt_tokens, "output_tokens": 0},
        }
        return [
            sse({"type": "message_start", "message": message}, "message_start"),
            sse(
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                "content_block_start",
            ),
            sse({"type": "ping"}, "ping"),
        ]

    def format_chunk(self, ctx: GenContext, token: str, index: int = 0) -> str:
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": token}}
        return sse(delta, "content_block_delta")

    def format_stream_end(self, ctx: GenContext, stop: str | None = None) -> list[str]:
        settle(ctx, None, stop)
        choice = ctx.choices[0]
        message_delta = {
            "type": "message_delta",
            "delta": {"stop_reason": _STOP_REASONS[choice.finish_reason], "stop_sequence": choice.stop_sequence},
            "usage": self._usage(ctx),
        }
        return [
            sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
            sse(message_delta, "message_delta"),
            sse({"type": "message_stop"}, "message_stop"),
        ]

    def format_response(self, ctx: GenContext, content: str | None = None, stop: str | None = None) -> dict[str, Any]:
        settle(ctx, content, stop)
        choice = ctx.choices[0]
        return {
            "id": ctx.resp_id,
            "type": "message",
            "role": "assistant",
            "model": ctx.model,
            "content": [{"type": "text", "text": choice.text}],
            "stop_reason": _STOP_REASONS[choice.finish_reason],
            "stop_sequence": choice.stop_sequence,
            "usage": self._usage(ctx),
        }

    def format_stream_error(self, status: int, message: str) -> str:
        return sse(self.error_body(status, message, None)[1], "error")

    def error_body(self, status: int, message: str, param: str | None) -> tuple[int, dict[str, Any]]:
        default = (status, "api_error") if status >= 500 else (status, "invalid_request_error")
        wire_status, kind = _ERROR_KINDS.get(status, default)
        return wire_status, {"type": "error", "error": {"type": kind, "message": message}}
