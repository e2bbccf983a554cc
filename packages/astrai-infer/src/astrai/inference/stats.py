"""`SchedulerStats`: the inference loop's counters, and the snapshot any thread may read.

The loop thread alone updates the counters (no lock needed for that); after each step, and before it delivers
a final event, it publishes a snapshot under a lock. Readers (`get_stats()`, the HTTP `/metrics` endpoint)
only ever see a published snapshot, never half-updated state. Throughput is measured over a trailing window
so it falls back to zero when the engine goes idle.

Per-request latencies and sizes are kept as cumulative histograms (`Histogram`) with vLLM's bucket bounds, so a
dashboard built for vLLM's `vllm:*` series reads ours unchanged: time to first token, inter-token latency, time
per output token, end-to-end latency, queue / prefill / decode / inference time, prompt and generation tokens.
`request_finished` observes a retired task's timings (queue = admission - arrival, prefill = first token -
admission, decode = finish - first token) and counts its finish reason in vLLM's terms (stop, length, abort,
error).
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from astrai.inference.task import Task

RATE_WINDOW_S = 10.0  # tokens/s is measured over this trailing window
RECENT_TTFT = 256  # how many recent time-to-first-token values a snapshot lists

COUNTERS = (
    "prefix_hit_tokens",  # prompt tokens served from the prefix cache, over all admissions
    "prompt_tokens_total",
    "generation_tokens_total",
    "preemptions",
    "requests_finished",  # stop, stop_sequence or length
    "requests_cancelled",
    "requests_failed",
    "steps",
    "ttft_count",
)


# vLLM's histogram bounds (vllm/v1/metrics/loggers.py), in seconds.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                         20.0, 40.0, 80.0)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
# engine finish reason -> vLLM's finished_reason label
FINISHED_REASONS = {"stop": "stop", "stop_sequence": "stop", "length": "length", "cancelled": "abort", "error": "error"}


def one_two_five_buckets(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `max_value` (vLLM's token-count buckets)."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return tuple(buckets)
            buckets.append(mantissa * scale)
        scale *= 10


class Histogram:
    """A cumulative histogram over fixed upper bounds (the last bucket, +Inf, is implied)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last is (bounds[-1], +Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> dict[str, Any]:
        return {"buckets": list(self.bounds), "counts": list(self.counts), "sum": self.sum, "count": sum(self.counts)}


class SchedulerStats:
    """Loop-side counters, gauges and histograms; `snapshot()` is safe from any thread."""

    def __init__(self, max_seq_len: int = 2048) -> None:
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.ttft_sum = 0.0  # seconds, with ttft_count: a Prometheus-style summary
        self._recent_ttft: deque[float] = deque(maxlen=RECENT_TTFT)
        self._rate: deque[tuple[float, int]] = deque()  # (time, tokens generated in that step); guarded by _lock
        self._lock = threading.Lock()
        self._published: dict[str, Any] = {}
        tokens = one_two_five_buckets(max_seq_len)
        self.histograms = {
            "time_to_first_token_seconds": Histogram(TTFT_BUCKETS),
            "inter_token_latency_seconds": Histogram(TOKEN_LATENCY_BUCKETS),
            "time_per_output_token_seconds": Histogram(TOKEN_LATENCY_BUCKETS),
            "e2e_request_latency_seconds": Histogram(REQUEST_LATENCY_BUCKETS),
            "request_queue_time_seconds": Histogram(REQUEST_LATENCY_BUCKETS),
            "request_inference_time_seconds": Histogram(REQUEST_LATENCY_BUCKETS),
            "request_prefill_time_seconds": Histogram(REQUEST_LATENCY_BUCKETS),
            "request_decode_time_seconds": Histogram(REQUEST_LATENCY_BUCKETS),
            "request_prompt_tokens": Histogram(tokens),
            "request_generation_tokens": Histogram(tokens),
        }
        self.finished_by_reason = dict.fromkeys(sorted(set(FINISHED_REASONS.values())), 0)

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def first_token(self, seconds: float) -> None:
        """Record one request's time to first token."""
        self.ttft_sum += seconds
        self.counters["ttft_count"] += 1
        self._recent_ttft.append(seconds)
        self.histograms["time_to_first_token_seconds"].observe(seconds)

    def next_token(self, seconds: float) -> None:
        """Record the time between two consecutive tokens of one request."""
        self.histograms["inter_token_latency_seconds"].observe(seconds)

    def request_finished(self, task: Task) -> None:
        """Record a retired task's timings, sizes and finish reason (its `finish_time` is set)."""
        self.finished_by_reason[FINISHED_REASONS.get(task.finish_reason or "error", "error")] += 1
        end, h = task.finish_time or time.monotonic(), self.histograms
        admitted = task.scheduled_time if task.scheduled_time is not None else end
        h["e2e_request_latency_seconds"].observe(end - task.arrival_time)
        h["request_queue_time_seconds"].observe(admitted - task.arrival_time)
        h["request_inference_time_seconds"].observe(end - admitted)
        h["request_prompt_tokens"].observe(task.input_tokens)
        h["request_generation_tokens"].observe(task.output_tokens)
        if task.first_token_time is not None:
            h["request_prefill_time_seconds"].observe(task.first_token_time - admitted)
            h["request_decode_time_seconds"].observe(end - task.first_token_time)
            if task.output_tokens > 1:
                tpot = (end - task.first_token_time) / (task.output_tokens - 1)
                h["time_per_output_token_seconds"].observe(tpot)

    def step(self, generated: int) -> None:
        """Record a finished step that produced `generated` tokens."""
        self.counters["steps"] += 1
        now = time.monotonic()
        with self._lock:
            self._rate.append((now, generated))
            while now - self._rate[0][0] > RATE_WINDOW_S:
                self._rate.popleft()

    def publish(self, **gauges: Any) -> None:
        """Make the current counters, plus `gauges` (queue depth, page use, ...), visible to readers."""
        snapshot = {
            **self.counters,
            **gauges,
            "ttft_sum": self.ttft_sum,
            "time_to_first_token_s": list(self._recent_ttft),
            "histograms": {name: h.snapshot() for name, h in self.histograms.items()},
            "requests_by_finish_reason": dict(self.finished_by_reason),
        }
        with self._lock:
            self._published = snapshot

    def snapshot(self) -> dict[str, Any]:
        """The last published state, plus `tokens_per_s` over the trailing window."""
        now = time.monotonic()
        with self._lock:
            stats = dict(self._published)
            recent = [(t, n) for t, n in self._rate if now - t <= RATE_WINDOW_S]
        # Averaged over the window, or since the first step in it, but never over less than a second.
        span = max(now - recent[0][0], 1.0) if recent else 1.0
        stats["tokens_per_s"] = sum(n for _, n in recent) / span
        return stats
