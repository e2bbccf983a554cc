"""`Task`: one generation request as the inference loop tracks it (parameters, progress, timing, status).

Request parameters are validated when the task is built, so a bad request fails at submission with a
`ValueError` naming the field, never inside the loop. Sampling parameters follow the OpenAI meaning
(temperature 0 is greedy; presence/frequency penalties on generated tokens; `logit_bias` added to the logits),
and `repetition_penalty` the Hugging Face one (logits of seen tokens divided if positive, multiplied if not).

Threads: the loop owns every field except the cancellation flag, which any thread may raise with `cancel()`;
the loop honours it at its next step (and frees the task's pages itself).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import time
from collections.abc import Callable, Collection
from typing import Any

_SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes 64-bit seeds
MAX_COUNT = 2**31 - 1  # the largest count (max_tokens, top_k) or token id the loop holds: int32 on the device
MAX_LOGPROBS = 20  # most alternatives reported per token (OpenAI's top_logprobs limit)


class TaskStatus(enum.Enum):
    PENDING = "pending"  # waiting for admission (also after preemption)
    RUNNING = "running"  # holds KV pages, being prefilled or decoded
    FINISHED = "finished"  # stopped by a stop token or max_tokens
    ABORTED = "aborted"  # cancelled, or failed with an error


@dataclasses.dataclass(eq=False)
class Task:
    """A generation request plus its progress. Parameters are fixed at construction; progress fields move."""

    task_id: str
    prompt_ids: list[int]
    max_tokens: int | None = None  # None: until a stop token or the engine's max sequence length
    temperature: float = 1.0  # <= 1e-5: greedy
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1: off
    seed: int | None = None  # per-request sampling seed, independent of other requests in the batch
    stop_token_ids: frozenset[int] = frozenset()
    logit_bias: dict[int, float] = dataclasses.field(default_factory=dict)
    logprobs: int | None = None  # None: none; k: each sampled token's log-probability and the k most likely
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (one extra forward)
    stream_callback: Callable[..., Any] | None = None

    status: TaskStatus = TaskStatus.PENDING
    output_ids: list[int] = dataclasses.field(default_factory=list)
    # Usage counters, reported to clients: len(prompt_ids) and len(output_ids) from construction, `append_token`
    # counts each generated token. Plain attributes, so a loop of one's own may keep them itself.
    input_tokens: int = dataclasses.field(default=0, init=False)
    output_tokens: int = dataclasses.field(default=0, init=False)
    next_pos: int = 0  # positions whose KV is in the cache: the next token fed to the model goes here
    cached_tokens: int = 0  # prompt tokens served from the prefix cache at the last admission
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)  # time.monotonic() seconds
    scheduled_time: float | None = None  # first admission to the batch
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    error: str | None = None
    # torch.Generator of a seeded task, made by the sampler on first use and kept across preemption.
    generator: Any = dataclasses.field(default=None, init=False, repr=False)
    _cancelled: bool = dataclasses.field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.task_id, str) or not self.task_id:
            raise ValueError(f"task_id={self.task_id!r}: must be a non-empty string")
        self.prompt_ids = list(self.prompt_ids)
        if not self.prompt_ids:
            raise ValueError("prompt_ids=[]: the prompt must hold at least one token")
        if not all(_is_count(t, 0) for t in self.prompt_ids):
            raise ValueError(f"prompt_ids={_short(self.prompt_ids)}: must be integer token ids in [0, 2**31)")
        if self.max_tokens is not None and not _is_count(self.max_tokens, 1):
            raise ValueError(f"max_tokens={self.max_tokens!r}: must be an integer in [1, 2**31) or None")
        _check_number("temperature", self.temperature, 0.0, math.inf)
        _check_number("top_p", self.top_p, 0.0, 1.0)
        if not _is_count(self.top_k, 0):
            raise ValueError(f"top_k={self.top_k!r}: must be an integer in [0, 2**31) (0 disables top-k)")
        _check_number("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_number("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_number("repetition_penalty", self.repetition_penalty, 0.0, math.inf)
        if self.repetition_penalty == 0:
            raise ValueError("repetition_penalty=0: must be positive (1 disables it)")
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed < _SEED_LIMIT):
            raise ValueError(f"seed={self.seed!r}: must be an integer in [0, 2**64) or None")
        self.stop_token_ids = frozenset(self.stop_token_ids)
        if not all(_is_count(t, 0) for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids={sorted(self.stop_token_ids)}: must be token ids in [0, 2**31)")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name}={value!r}: must be None or an integer in [0, {MAX_LOGPROBS}]")
        for token, bias in self.logit_bias.items():
            if not _is_count(token, 0):
                raise ValueError(f"logit_bias key {token!r}: must be a token id in [0, 2**31)")
            _check_number(f"logit_bias[{token}]", bias, -100.0, 100.0)
        self.output_ids = list(self.output_ids)
        self.input_tokens = len(self.prompt_ids)
        self.output_tokens = len(self.output_ids)

    @property
    def all_ids(self) -> list[int]:
        """Prompt followed by the tokens generated so far."""
        return self.prompt_ids + self.output_ids

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """Ask the loop to stop this task at its next step (safe from any thread)."""
        self._cancelled = True

    def append_token(self, token_id: int) -> None:
        """Record a generated token (counted in `output_tokens`), its time and the time of the first one."""
        self.last_token_time = time.monotonic()
        if self.first_token_time is None:
            self.first_token_time = self.last_token_time
        self.output_ids.append(token_id)
        self.output_tokens += 1

    def stop_reason(self, stop_ids: Collection[int] = ()) -> str | None:
        """Why the task should stop now, or None.

        "stop" if the last token is a stop token (the task's own or `stop_ids`), else "length" once
        `max_tokens` tokens were generated.
        """
        if self.output_ids and (self.output_ids[-1] in self.stop_token_ids or self.output_ids[-1] in stop_ids):
            return "stop"
        if self.max_tokens is not None and len(self.output_ids) >= self.max_tokens:
            return "length"
        return None

    def is_finished(self, stop_ids: Collection[int] = ()) -> bool:
        return self.stop_reason(stop_ids) is not None

    def finish(self, status: TaskStatus, reason: str, error: str | None = None) -> None:
        """Move to a final status (FINISHED or ABORTED) with the reason clients will see."""
        if status not in (TaskStatus.FINISHED, TaskStatus.ABORTED):
            raise ValueError(f"status={status}: a task finishes as FINISHED or ABORTED")
        self.status = status
        self.finish_reason = reason
        self.error = error
        self.finish_time = time.monotonic()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_count(value: Any, low: int) -> bool:
    return _is_int(value) and low <= value <= MAX_COUNT


def _check_number(name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name}={value!r}: must be a number in [{low}, {high}]")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r}: must be finite")


def _short(ids: list[Any]) -> str:
    return repr(ids) if len(ids) <= 8 else f"[{', '.join(map(repr, ids[:8]))}, ...] ({len(ids)} ids)"
