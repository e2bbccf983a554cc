"""Per-request generation state shared by the handler and the response builders.

A `GenContext` is created by `ResponseBuilder.prepare` for one HTTP request. It holds what every response
chunk repeats (id, creation time, model name), the sampling arguments for the engine, and one `ChoiceState`
per independent generation (OpenAI's `n`; Anthropic always has one). `record` folds engine
`GenerationEvent`s into it, so at the end it holds the full text, finish reason and token counts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from astrai.inference import GenerationEvent, TokenLogprob

# Final finish reasons that mean the generation did not complete normally (engine failure or shutdown).
FAILED_FINISH_REASONS = frozenset({"error", "cancelled"})


@dataclass
class ChoiceState:
    """What one generation has produced so far."""

    index: int
    text: str = ""
    completion_tokens: int = 0
    finished: bool = False
    finish_reason: str | None = None  # engine terms: stop, stop_sequence, length, cancelled, error
    stop_sequence: str | None = None
    error: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # every token's, when the request asked
    unsent_logprobs: list[TokenLogprob] = field(default_factory=list)  # not yet in a stream chunk
    prompt_ids: list[int] | None = None  # this choice's own prompt (completions' list of prompts), else the request's
    prompt_logprobs: list[TokenLogprob] | None = None  # the prompt's tokens after the first, when asked for
    prompt_text: str = ""  # the prompt as text, for a completion's `echo`


@dataclass
class GenContext:
    """State of one HTTP request's generation(s); see the module docstring."""

    resp_id: str
    created: int  # unix seconds, identical in every chunk of a stream
    model: str
    prompt_tokens: int
    completion_tokens: int = 0  # summed over choices
    cached_tokens: int = 0  # prompt tokens the engine served from its prefix cache
    stream: bool = False
    include_usage: bool = False  # OpenAI stream_options.include_usage
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams arguments other than `stop`
    choices: list[ChoiceState] = field(default_factory=lambda: [ChoiceState(0)])
    token_text: Callable[[int], str] | None = None  # a token id's text, set when the request asked for logprobs
    echo: bool = False  # completions: each choice's text starts with its prompt
    generate: bool = True  # False: completions' max_tokens 0; the one token sampled is not reported

    def record(self, index: int, event: GenerationEvent) -> None:
        """Fold one engine event of choice `index` into the context."""
        choice = self.choices[index]
        choice.text += event.text
        self.completion_tokens += event.completion_tokens - choice.completion_tokens
        choice.completion_tokens = event.completion_tokens
        if event.logprobs:
            choice.logprobs += event.logprobs
            choice.unsent_logprobs += event.logprobs
        if event.prompt_logprobs is not None:
            choice.prompt_logprobs = event.prompt_logprobs
        if index == 0:  # report the first choice's prompt cache hits (every choice of a chat has the same prompt)
            self.cached_tokens = event.cached_tokens
        if event.finished:
            choice.finished = True
            choice.finish_reason = event.finish_reason
            choice.stop_sequence = event.stop_sequence
            choice.error = event.error

    def failure(self) -> ChoiceState | None:
        """The first choice that ended in an engine error or cancellation, if any."""
        return next((c for c in self.choices if c.finish_reason in FAILED_FINISH_REASONS), None)
