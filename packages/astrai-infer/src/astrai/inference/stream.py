"""`GenerationEvent` and `OutputStream`: how a request's sampled tokens become the events its caller reads.

Per request the loop keeps one `OutputStream`. Each sampled token goes through

    incremental detokeniser -> stop-string checker -> event

The detokeniser only releases text once it forms whole characters (byte-level BPE pieces of one emoji or CJK
character never reach the client half-decoded); the `StopChecker` holds back any tail that may begin a stop
string and trims the output before a match. A non-final event is sent only when it carries new text; the
token ids sampled since the previous event ride along with it, so the ids of all events together are every
generated token except a final stop token (which is never shown, but is counted in `completion_tokens`).
Exactly one final event (`finished=True`) ends every request, whatever the reason. For a request that asked for
log-probabilities, `logprobs` holds one `TokenLogprob` per entry of `token_ids`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from astrai.inference.stop import StopChecker
from astrai.inference.task import Task
from astrai.tokenize import IncrementalDetokenizer

FINISH_REASONS = ("stop", "stop_sequence", "length", "cancelled", "error")


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability under the model (log-softmax of its logits, before any sampling
    filter), and the `top` most likely tokens as (token id, log-probability), most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, token_ids: Sequence[int], tops: Sequence[int]) -> list[TokenLogprob]:
    """Row r's `TokenLogprob` of `token_ids[r]` under `logits[r]` (R, V), with its `tops[r]` most likely tokens."""
    if not len(token_ids):
        return []
    logprobs = logits.float().log_softmax(dim=-1)
    index = torch.tensor(list(token_ids), device=logits.device).unsqueeze(1)
    chosen = logprobs.gather(1, index).squeeze(1).tolist()
    top_values, top_ids = logprobs.topk(max(tops), dim=-1)  # max(tops) = 0: empty
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    return [
        TokenLogprob(token, chosen[r], tuple(zip(top_ids[r][:k], top_values[r][:k], strict=True)))
        for r, (token, k) in enumerate(zip(token_ids, tops, strict=True))
    ]


@dataclasses.dataclass
class GenerationEvent:
    """One piece of a request's output, or its final event (`finished=True`, with `finish_reason`)."""

    text: str  # new text since the previous event (may be "" on the final event)
    token_ids: list[int]  # new token ids since the previous event
    finished: bool
    finish_reason: str | None  # final event only: one of FINISH_REASONS
    stop_sequence: str | None  # the stop string that matched, when finish_reason == "stop_sequence"
    prompt_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache
    completion_tokens: int  # every token sampled so far, a final stop token included
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked for them
    # The first event of a request that asked for prompt log-probabilities: one per prompt token but the first.
    prompt_logprobs: list[TokenLogprob] | None = None


class OutputStream:
    """Turns one task's sampled tokens into `GenerationEvent`s and delivers them to `task.stream_callback`."""

    def __init__(self, task: Task, tokenizer, stop: Sequence[str] | None = None):
        self._task = task
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids=task.prompt_ids)  # prompt = context only
        self._stop = StopChecker(stop)
        self._pending_ids: list[int] = []  # sampled since the last event, not yet sent
        self._pending_logprobs: list[TokenLogprob] | None = [] if task.logprobs is not None else None
        self.cached_tokens = 0  # prompt tokens the prefix cache served; the loop sets it at admission
        self.prompt_logprobs: list[TokenLogprob] | None = None  # set by the loop; sent with the first event
        self.finished = False

    @property
    def matched_stop(self) -> str | None:
        """The stop string found in the output, if any (the task must then finish with "stop_sequence")."""
        return self._stop.matched

    def push(self, token_id: int, visible: bool = True, logprob: TokenLogprob | None = None) -> None:
        """Take a freshly sampled token (with its `logprob` when the request asked for them); `visible=False` for
        a stop token (counted, never shown).

        Sends an event when new text is ready. After a stop string matches, later text is dropped.
        """
        if not visible:
            return
        self._pending_ids.append(token_id)
        if self._pending_logprobs is not None and logprob is not None:
            self._pending_logprobs.append(logprob)
        text = self._stop.push(self._detok.push(token_id))
        if text:
            self._emit(text, finished=False)

    def finish(self, reason: str, error: str | None = None) -> None:
        """Send the final event: whatever text was held back (unless a stop string cut it) and the reason."""
        if self.finished:
            return
        if reason not in FINISH_REASONS:
            raise ValueError(f"reason={reason!r}: allowed {FINISH_REASONS}")
        text = ""
        if reason not in ("cancelled", "error"):
            # The tail the detokeniser still holds may complete a stop string; only then is the rest released.
            text = self._stop.push(self._detok.flush())
            text += self._stop.flush()
            if self._stop.matched is not None:
                reason = "stop_sequence"
        self.finished = True
        self._emit(text, finished=True, reason=reason, error=error)

    def _emit(self, text: str, finished: bool, reason: str | None = None, error: str | None = None) -> None:
        task = self._task
        event = GenerationEvent(
            text=text,
            token_ids=self._pending_ids,
            finished=finished,
            finish_reason=reason,
            stop_sequence=self._stop.matched if reason == "stop_sequence" else None,
            prompt_tokens=task.input_tokens,
            cached_tokens=self.cached_tokens,
            completion_tokens=task.output_tokens,
            error=error,
            logprobs=self._pending_logprobs,
            prompt_logprobs=self.prompt_logprobs,
        )
        self.prompt_logprobs = None
        self._pending_ids = []
        self._pending_logprobs = [] if self._pending_logprobs is not None else None
        if task.stream_callback is not None:
            task.stream_callback(event)
