"""Prometheus text exposition (format 0.0.4) of the engine's `get_stats()`.

Gauges for the current state (running / waiting requests, KV pages, throughput, prefix-cache hit rate,
loop liveness), counters for totals, and a summary for time to first token (`_sum` / `_count`, plus
quantiles when the engine reports recent samples). Stats the engine does not report are left out rather
than invented, so a newer or older engine never breaks the endpoint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "astrai_"

# (stats key, metric name, type, help)
_SIMPLE: tuple[tuple[str, str, str, str], ...] = (
    ("running", "requests_running", "gauge", "Requests admitted to the batch (prefilling or decoding)."),
    ("waiting", "requests_waiting", "gauge", "Requests queued for admission."),
    ("pages_total", "kv_pages_total", "gauge", "KV-cache pages in the pool."),
    ("pages_used", "kv_pages_used", "gauge", "KV-cache pages held by running requests."),
    ("pages_cached", "kv_pages_cached", "gauge", "Unreferenced KV-cache pages kept for prefix reuse."),
    ("pages_free", "kv_pages_free", "gauge", "KV-cache pages free for allocation."),
    ("tokens_per_s", "generation_tokens_per_second", "gauge", "Recent generation throughput."),
    ("prompt_tokens_total", "prompt_tokens_total", "counter", "Prompt tokens submitted."),
    ("prefix_hit_tokens", "prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache."),
    ("generation_tokens_total", "generation_tokens_total", "counter", "Tokens generated."),
    ("preemptions", "preemptions_total", "counter", "Requests preempted for lack of KV pages and recomputed."),
    ("requests_finished", "requests_finished_total", "counter", "Requests finished, for any reason."),
    ("requests_cancelled", "requests_cancelled_total", "counter", "Requests cancelled (client gone, shutdown)."),
    ("requests_failed", "requests_failed_total", "counter", "Requests ended by an engine error."),
)
_QUANTILES = (0.5, 0.9, 0.99)


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if float(value).is_integer() else repr(float(value))


def _family(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> list[str]:
    lines = [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} {kind}"]
    lines += [f"{PREFIX}{name}{suffix} {_number(value)}" for suffix, value in samples]
    return lines


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of an ascending sequence."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def render_metrics(stats: Mapping[str, Any]) -> str:
    """The Prometheus text page for one `get_stats()` snapshot."""
    lines: list[str] = []
    for key, name, kind, help_text in _SIMPLE:
        if key in stats:
            lines += _family(name, kind, help_text, [("", float(stats[key]))])
    if "loop_alive" in stats:
        lines += _family("engine_loop_alive", "gauge", "1 while the scheduler loop runs.", [("", stats["loop_alive"])])
    if "prefix_hit_tokens" in stats and "prompt_tokens_total" in stats:
        prompts = stats["prompt_tokens_total"]
        rate = stats["prefix_hit_tokens"] / prompts if prompts else 0.0
        lines += _family(
            "prefix_cache_hit_rate", "gauge", "Share of prompt tokens served from the cache.", [("", rate)]
        )
    if "ttft_sum" in stats and "ttft_count" in stats:
        recent = sorted(stats.get("time_to_first_token_s") or [])  # recent samples, when the engine keeps them
        samples = [(f'{{quantile="{q}"}}', _quantile(recent, q)) for q in _QUANTILES] if recent else []
        samples += [("_sum", stats["ttft_sum"]), ("_count", stats["ttft_count"])]
        lines += _family("time_to_first_token_seconds", "summary", "Time from submission to first token.", samples)
    return "\n".join(lines) + "\n"
