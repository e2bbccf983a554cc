"""OpenAI's legacy Completions wire format (`POST /v1/completions`), as vLLM serves it.

Each prompt of the request gets `n` choices, indexed prompt by prompt (`index = prompt * n + j`), each one
engine request on its own prompt. A text prompt is tokenised with the tokenizer's special tokens (BOS), as
vLLM does; a token-id prompt is used as given.

`logprobs` are in the legacy shape: parallel lists `tokens`, `token_logprobs`, `top_logprobs` (one
{token text: logprob} dict per position holding the k most likely tokens and the chosen one) and
`text_offset` (each token's character offset in the choice's text). With `echo` the prompt's tokens come
first, the very first one with `null`s (nothing precedes it), as OpenAI and vLLM report it; lm-evaluation-
harness's `local-completions` scores a continuation by sending it with `echo`, `logprobs: 1` and a small
`max_tokens`. `max_tokens: 0` (with `echo`) reports the prompt alone: the engine samples one token, which is
neither returned nor counted.

A stream sends `text_completion` chunks (with `echo`, each choice's first chunk is its prompt), one final chunk
per choice with its `finish_reason`, the usage chunk when `stream_options.include_usage`, then `[DONE]`.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

from astrai.inference import TokenLogprob
from astrai.serve.builder import check_chars, check_context, settle, sse
from astrai.serve.completions_schema import CompletionRequest
from astrai.serve.context import ChoiceState, GenContext
from astrai.serve.errors import APIError
from astrai.serve.openai_builder import _FINISH_REASONS, DONE, OpenAIResponseBuilder

if TYPE_CHECKING:
    from astrai.inference import InferenceEngine


class CompletionsResponseBuilder(OpenAIResponseBuilder):
    """Reads `CompletionRequest`s and writes text completions and their chunks (see the module docstring)."""

    def prepare(self, request: CompletionRequest, engine: InferenceEngine) -> tuple[list[int], GenContext, list[str]]:
        tokenizer = engine.tokenizer
        texts = [p for p in request.prompts if isinstance(p, str)]
        check_chars(max(map(len, texts), default=0), engine.max_seq_len, "prompt")
        prompts = [list(tokenizer.encode(p)) if isinstance(p, str) else list(p) for p in request.prompts]
        generate = request.max_tokens != 0
        max_tokens = request.max_tokens if generate else 1
        for i, prompt_ids in enumerate(prompts):
            if not prompt_ids:
                raise APIError(400, f"prompt {i} is no tokens once tokenised", "prompt")
            check_context(len(prompt_ids), max_tokens, engine.max_seq_len, "max_tokens", "prompt")
        echo_scores = bool(request.echo) and request.logprobs is not None
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
            "logprobs": request.logprobs,
            "prompt_logprobs": request.logprobs if echo_scores else None,
        }
        n = request.n or 1
        choices = []
        for i, (prompt, prompt_ids) in enumerate(zip(request.prompts, prompts, strict=True)):
            text = prompt if isinstance(prompt, str) else tokenizer.decode(prompt_ids, skip_special_tokens=False)
            choices += [ChoiceState(i * n + j, prompt_ids=prompt_ids, prompt_text=text) for j in range(n)]
        ctx = GenContext(
            resp_id=f"cmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=self.model_name,
            prompt_tokens=sum(map(len, prompts)),
            stream=bool(request.stream),
            include_usage=request.stream_options is not None and request.stream_options.include_usage,
            sampling={k: v for k, v in sampling.items() if v is not None},
            choices=choices,
            echo=bool(request.echo),
            generate=generate,
        )
        if request.logprobs is not None:
            ctx.token_text = lambda token_id: tokenizer.decode([token_id], skip_special_tokens=False)
        return prompts[0], ctx, request.stop_sequences

    @staticmethod
    def _legacy_logprobs(
        ctx: GenContext, choice: ChoiceState, logprobs: list[TokenLogprob], offset: int, with_prompt: bool = False
    ) -> dict[str, list[Any]] | None:
        """The legacy `logprobs` object of these generated tokens (after the prompt's, `with_prompt`), their
        text offsets counted from `offset`; None when the request did not ask for logprobs."""
        if ctx.token_text is None:
            return None
        text = ctx.token_text
        tokens: list[str] = []
        values: list[float | None] = []
        tops: list[dict[str, float] | None] = []

        def add(token_id: int, logprob: float | None, top: dict[str, float] | None) -> None:
            tokens.append(text(token_id))
            values.append(logprob)
            tops.append(top)

        def top_of(entry: TokenLogprob) -> dict[str, float]:
            top: dict[str, float] = {}
            for token_id, logprob in (*entry.top, (entry.token_id, entry.logprob)):
                top.setdefault(text(token_id), logprob)  # most likely first: a shared text keeps the larger value
            return top

        if with_prompt and choice.prompt_ids is not None:
            add(choice.prompt_ids[0], None, None)
            for entry in choice.prompt_logprobs or ():
                add(entry.token_id, entry.logprob, top_of(entry))
        for entry in logprobs if ctx.generate else ():
            add(entry.token_id, entry.logprob, top_of(entry))
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def _chunk_data(self, ctx: GenContext, choices: list[dict[str, Any]]) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": ctx.resp_id,
            "object": "text_completion",
            "created": ctx.created,
            "model": ctx.model,
            "choices": choices,
        }
        if ctx.stream and ctx.include_usage:
            data["usage"] = None
        return data

    def _stream_choice(self, ctx: GenContext, index: int, text: str, finish_reason: str | None = None) -> str:
        choice = ctx.choices[index]
        offset = len(choice.prompt_text) + len(choice.text) - len(text)  # where `text` starts in the echoed text
        logprobs = self._legacy_logprobs(ctx, choice, choice.unsent_logprobs, offset)
        choice.unsent_logprobs = []
        entry = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return sse(self._chunk_data(ctx, [entry]))

    def format_stream_start(self, ctx: GenContext) -> list[str]:
        if not ctx.echo:
            return []
        frames = []
        for choice in ctx.choices:
            entry = {"index": choice.index, "text": choice.prompt_text, "logprobs": None, "finish_reason": None}
            frames.append(sse(self._chunk_data(ctx, [entry])))
        return frames

    def format_chunk(self, ctx: GenContext, token: str, index: int = 0) -> str:
        return self._stream_choice(ctx, index, token) if ctx.generate else ""

    def format_stream_end(self, ctx: GenContext, stop: str | None = None) -> list[str]:
        settle(ctx, None, stop)
        frames = [self._stream_choice(ctx, c.index, "", self._finish_reason(ctx, c)) for c in ctx.choices]
        if ctx.include_usage:
            frames.append(sse({**self._chunk_data(ctx, []), "usage": self._usage(ctx)}))
        frames.append(DONE)
        return frames

    @staticmethod
    def _finish_reason(ctx: GenContext, choice: ChoiceState) -> str:
        return _FINISH_REASONS[choice.finish_reason] if ctx.generate else "length"

    def format_response(self, ctx: GenContext, content: str | None = None, stop: str | None = None) -> dict[str, Any]:
        settle(ctx, content, stop)
        choices = []
        for c in ctx.choices:
            generated = c.text if ctx.generate else ""
            offset = 0 if ctx.echo else len(c.prompt_text)
            choices.append(
                {
                    "index": c.index,
                    "text": (c.prompt_text if ctx.echo else "") + generated,
                    "logprobs": self._legacy_logprobs(ctx, c, c.logprobs, offset, with_prompt=ctx.echo),
                    "finish_reason": self._finish_reason(ctx, c),
                }
            )
        return {**self._chunk_data(ctx, choices), "usage": self._usage(ctx)}
