"""`SchedulerStats`: the inference loop's counters, and the snapshot any thread may read.

The loop thread alone updates the counters (no lock needed for that); after each step, and before it delivers
a final event, it publishes a snapshot under a lock. Readers (`get_stats()`, the HTTP `/metrics` endpoint)
only ever see a published snapshot, never half-updated state. Throughput is measured over a trailing window
so it falls back to zero when the engine goes idle.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

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


class SchedulerStats:
    """Loop-side counters and gauges; `snapshot()` is safe from any thread."""

    def __init__(self) -> None:
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.ttft_sum = 0.0  # seconds, with ttft_count: a Prometheus-style summary
        self._recent_ttft: deque[float] = deque(maxlen=RECENT_TTFT)
        self._rate: deque[tuple[float, int]] = deque()  # (time, tokens generated in that step); guarded by _lock
        self._lock = threading.Lock()
        self._published: dict[str, Any] = {}

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def first_token(self, seconds: float) -> None:
        """Record one request's time to first token."""
        self.ttft_sum += seconds
        self.counters["ttft_count"] += 1
        self._recent_ttft.append(seconds)

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
