"""OpenAI Chat Completions wire format (`POST /v1/chat/completions`).

Responses follow the openai SDK's `ChatCompletion` / `ChatCompletionChunk` models. A stream opens every
choice with `{"role": "assistant", "content": ""}`, sends `{"content": piece}` deltas, closes every choice
with an empty delta carrying its `finish_reason`, then (with `stream_options.include_usage`) one chunk
with empty `choices` and the usage, then `data: [DONE]`. With include_usage every other chunk carries
`"usage": null`; without it no chunk has a usage field.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING, Any

from astrai.inference import TokenLogprob
from astrai.serve.builder import ResponseBuilder, check_context, settle, sse
from astrai.serve.context import ChoiceState, GenContext
from astrai.serve.errors import APIError
from astrai.serve.openai_schema import ChatCompletionRequest, ChatMessage

if TYPE_CHECKING:
    from astrai.inference import InferenceEngine

DONE = "data: [DONE]\n\n"

# engine finish reason -> OpenAI finish_reason
_FINISH_REASONS = {"stop": "stop", "stop_sequence": "stop", "length": "length"}

# HTTP status -> (error type, error code), after the OpenAI API's own error bodies
_ERROR_KINDS = {
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}


class OpenAIResponseBuilder(ResponseBuilder):
    """Reads `ChatCompletionRequest`s and writes chat completions and their chunks."""

    @staticmethod
    def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
        """The conversation as {"role", "content"} dicts for the chat template (a developer message is a system one).

        As transformers passes them: an assistant's `tool_calls` with `function.arguments` parsed into a dict
        (HF templates expect one), a tool message's `tool_call_id`.
        """
        out: list[dict[str, Any]] = []
        for m in messages:
            msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text}
            if m.tool_calls:
                msg["tool_calls"] = [_template_call(c) for c in m.tool_calls]
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            if m.name is not None and m.role == "tool":
                msg["name"] = m.name
            out.append(msg)
        return out

    def prepare(
        self, request: ChatCompletionRequest, engine: InferenceEngine
    ) -> tuple[list[int], GenContext, list[str]]:
        if request.stream_options is not None and not request.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")
        tools = request.tools if request.tools and request.tool_choice != "none" else None
        prompt_ids = self.encode_prompt(engine, self.chat_messages(request.messages), tools=tools)
        if request.max_completion_tokens is not None:
            max_tokens, param = request.max_completion_tokens, "max_completion_tokens"
        else:
            max_tokens, param = request.max_tokens, "max_tokens"
        check_context(len(prompt_ids), max_tokens, engine.max_seq_len, param)
        sampling = {
            "max_tokens": max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "top_k": request.top_k,
            "presence_penalty": request.presence_penalty,
            "frequency_penalty": request.frequency_penalty,
            "repetition_penalty": request.repetition_penalty,
            "logit_bias": request.logit_bias,
            "seed": request.seed,
            "ignore_eos": request.ignore_eos,
            "logprobs": (request.top_logprobs or 0) if request.logprobs else None,
        }
        ctx = GenContext(
            resp_id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=self.model_name,
            prompt_tokens=len(prompt_ids),
            stream=bool(request.stream),
            include_usage=request.stream_options is not None and request.stream_options.include_usage,
            sampling={k: v for k, v in sampling.items() if v is not None},
            choices=[ChoiceState(i) for i in range(request.n or 1)],
        )
        if request.logprobs:
            ctx.token_text = lambda token_id: engine.tokenizer.decode([token_id], skip_special_tokens=False)
        return prompt_ids, ctx, request.stop_sequences

    @staticmethod
    def _logprobs(ctx: GenContext, logprobs: list[TokenLogprob]) -> dict[str, Any] | None:
        """OpenAI's `logprobs` object for these tokens (None when the request did not ask for them)."""
        if ctx.token_text is None:
            return None

        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text = ctx.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        content = [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(*t) for t in lp.top]} for lp in logprobs]
        return {"content": content, "refusal": None}

    def _chunk(self, ctx: GenContext, index: int, delta: dict[str, str], finish_reason: str | None = None) -> str:
        choice = ctx.choices[index]
        logprobs = self._logprobs(ctx, choice.unsent_logprobs)
        choice.unsent_logprobs = []
        data: dict[str, Any] = {
            "id": ctx.resp_id,
            "object": "chat.completion.chunk",
            "created": ctx.created,
            "model": ctx.model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
        }
        if ctx.include_usage:
            data["usage"] = None
        return sse(data)

    @staticmethod
    def _usage(ctx: GenContext) -> dict[str, Any]:
        completion_tokens = ctx.completion_tokens if ctx.generate else 0
        return {
            "prompt_tokens": ctx.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": ctx.prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": ctx.cached_tokens},
        }

    def format_stream_start(self, ctx: GenContext) -> list[str]:
        return [self._chunk(ctx, c.index, {"role": "assistant", "content": ""}) for c in ctx.choices]

    def format_chunk(self, ctx: GenContext, token: str, index: int = 0) -> str:
        return self._chunk(ctx, index, {"content": token})

    def format_stream_end(self, ctx: GenContext, stop: str | None = None) -> list[str]:
        settle(ctx, None, stop)
        frames = [self._chunk(ctx, c.index, {}, _FINISH_REASONS[c.finish_reason]) for c in ctx.choices]
        if ctx.include_usage:
            usage_chunk = {
                "id": ctx.resp_id,
                "object": "chat.completion.chunk",
                "created": ctx.created,
                "model": ctx.model,
                "choices": [],
                "usage": self._usage(ctx),
            }
            frames.append(sse(usage_chunk))
        frames.append(DONE)
        return frames

    def format_response(self, ctx: GenContext, content: str | None = None, stop: str | None = None) -> dict[str, Any]:
        settle(ctx, content, stop)
        return {
            "id": ctx.resp_id,
            "object": "chat.completion",
            "created": ctx.created,
            "model": ctx.model,
            "choices": [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text, "refusal": None},
                    "logprobs": self._logprobs(ctx, c.logprobs),
                    "finish_reason": _FINISH_REASONS[c.finish_reason],
                }
                for c in ctx.choices
            ],
            "usage": self._usage(ctx),
        }

    def format_stream_error(self, status: int, message: str) -> str:
        # The openai SDK raises APIError for any data payload with a truthy "error" key.
        return sse(self.error_body(status, message, None)[1])

    def error_body(self, status: int, message: str, param: str | None) -> tuple[int, dict[str, Any]]:
        default = ("server_error", None) if status >= 500 else ("invalid_request_error", None)
        kind, code = _ERROR_KINDS.get(status, default)
        return status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI tool call with its JSON-string `function.arguments` parsed into a dict (kept as is if not JSON)."""
    function = dict(call.get("function") or {})
    if isinstance(function.get("arguments"), str):
        try:
            function["arguments"] = json.loads(function["arguments"])
        except json.JSONDecodeError:
            pass
    return {**call, "function": function}
