"""Request parameters: `SamplingParams` (one generation) and `GenerationRequest` (a chat-message request).

Both validate on construction, so a bad value raises `ValueError` naming the field in the caller's thread and
never reaches the inference loop. The sampling rules are the loop's own: `SamplingParams` checks itself by
building the `Task` it will become (one set of rules, not two), plus what only a request has (stop strings,
`top_p > 0`). Checks that need the model (token ids below the vocabulary size, prompt length) happen at
submission, in `InferenceEngine.submit`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from astrai.inference.stop import StopChecker
from astrai.inference.task import Task


@dataclasses.dataclass
class SamplingParams:
    """How to sample one request's output (OpenAI meaning for the penalties and `logit_bias`)."""

    max_tokens: int | None = None  # None: up to max_seq_len - prompt_len; else >= 1 (capped to that room)
    temperature: float = 1.0  # >= 0; 0 = greedy
    top_p: float = 1.0  # (0, 1]
    top_k: int = 0  # 0 = off
    presence_penalty: float = 0.0  # [-2, 2]
    frequency_penalty: float = 0.0  # [-2, 2]
    repetition_penalty: float = 1.0  # > 0 (Hugging Face meaning); 1 = off
    logit_bias: dict[int, float] | None = None  # token id -> bias in [-100, 100]
    seed: int | None = None  # same seed, same prompt -> same output, whatever else is in the batch
    stop: list[str] | None = None  # stop strings: output is trimmed before the first match
    stop_token_ids: list[int] | None = None  # in addition to the tokenizer's stop ids
    ignore_eos: bool = False  # True: the tokenizer's stop ids do not end the output (stop_token_ids still do)
    logprobs: int | None = None  # k in [0, 20]: events carry each token's log-probability and the k most likely
    prompt_logprobs: int | None = None  # k in [0, 20]: the first event carries the same for the prompt's tokens

    def __post_init__(self) -> None:
        if isinstance(self.top_p, (int, float)) and not isinstance(self.top_p, bool) and self.top_p <= 0:
            raise ValueError(f"top_p={self.top_p!r}: must be in (0, 1]")
        if self.stop is not None and not isinstance(self.stop, (list, tuple)):
            raise ValueError(f"stop={self.stop!r}: must be a list of strings")
        StopChecker(self.stop)  # raises for an empty or non-string stop sequence
        if self.stop_token_ids is not None and not isinstance(self.stop_token_ids, (list, tuple, set, frozenset)):
            raise ValueError(f"stop_token_ids={self.stop_token_ids!r}: must be a list of token ids")
        if self.logit_bias is not None and not isinstance(self.logit_bias, dict):
            raise ValueError(f"logit_bias={self.logit_bias!r}: must be a dict of token id -> bias")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos={self.ignore_eos!r}: must be a bool")
        Task(task_id="validation", prompt_ids=[0], **self.task_kwargs(()))

    def task_kwargs(self, eos_ids: Any) -> dict[str, Any]:
        """The `Task` fields of these parameters; `eos_ids` (the tokenizer's stop ids) stop the output
        unless `ignore_eos`."""
        stop_ids = set(self.stop_token_ids or ())
        if not self.ignore_eos:
            stop_ids |= set(eos_ids)
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "logit_bias": dict(self.logit_bias or {}),
            "seed": self.seed,
            "stop_token_ids": frozenset(stop_ids),
            "logprobs": self.logprobs,
            "prompt_logprobs": self.prompt_logprobs,
        }


@dataclasses.dataclass
class GenerationRequest:
    """A chat request: `messages` ([{"role": ..., "content": ...}, ...]) rendered with the chat template."""

    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stream: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.messages, list) or not self.messages:
            raise ValueError(f"messages={self.messages!r}: must be a non-empty list of messages")
        for message in self.messages:
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError(f"messages: {message!r} must be a dict with 'role' and 'content'")
        if not isinstance(self.stream, bool):
            raise ValueError(f"stream={self.stream!r}: must be a bool")
        self.sampling_params()  # validates the sampling fields

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k
        )
