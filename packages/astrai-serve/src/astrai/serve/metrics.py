"""Prometheus metrics of one `get_stats()` snapshot, through `prometheus_client`, in vLLM's names and ours.

The `vllm:` series carry the labels `model_name` and `engine` and the names, types and bucket bounds of vLLM's
own (v1) metrics, so a Grafana dashboard or alert written for vLLM reads this server unchanged: request
gauges, KV-cache use, prefix-cache queries / hits, token and preemption counters, `request_success` by
`finished_reason`, and the request histograms (time to first token, inter-token latency, time per output
token, end-to-end, queue, inference, prefill and decode time, prompt and generation tokens).

The `astrai_` series are the ones this server has always had (pages by state, throughput, loop liveness, a
time-to-first-token summary with recent quantiles); they stay so existing dashboards keep working. Stats the
engine does not report are left out rather than invented, so a newer or older engine never breaks the page.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

CONTENT_TYPE = CONTENT_TYPE_LATEST
PREFIX = "astrai_"

# (stats key, metric name, type, help); counters are named without `_total`, which the exposition appends.
_SIMPLE: tuple[tuple[str, str, str, str], ...] = (
    ("running", "requests_running", "gauge", "Requests admitted to the batch (prefilling or decoding)."),
    ("waiting", "requests_waiting", "gauge", "Requests queued for admission."),
    ("pages_total", "kv_pages_total", "gauge", "KV-cache pages in the pool."),
    ("pages_used", "kv_pages_used", "gauge", "KV-cache pages held by running requests."),
    ("pages_cached", "kv_pages_cached", "gauge", "Unreferenced KV-cache pages kept for prefix reuse."),
    ("pages_free", "kv_pages_free", "gauge", "KV-cache pages free for allocation."),
    ("tokens_per_s", "generation_tokens_per_second", "gauge", "Recent generation throughput."),
    ("prompt_tokens_total", "prompt_tokens", "counter", "Prompt tokens submitted."),
    ("prefix_hit_tokens", "prefix_cache_hit_tokens", "counter", "Prompt tokens served from the prefix cache."),
    ("generation_tokens_total", "generation_tokens", "counter", "Tokens generated."),
    ("preemptions", "preemptions", "counter", "Requests preempted for lack of KV pages and recomputed."),
    ("requests_finished", "requests_finished", "counter", "Requests finished, for any reason."),
    ("requests_cancelled", "requests_cancelled", "counter", "Requests cancelled (client gone, shutdown)."),
    ("requests_failed", "requests_failed", "counter", "Requests ended by an engine error."),
)

# vLLM's series: (stats key, vLLM name, type, help)
_VLLM_SIMPLE: tuple[tuple[str, str, str, str], ...] = (
    ("running", "num_requests_running", "gauge", "Number of requests in model execution batches."),
    ("waiting", "num_requests_waiting", "gauge", "Number of requests waiting to be processed."),
    ("prompt_tokens_total", "prompt_tokens", "counter", "Number of prefill tokens processed."),
    ("generation_tokens_total", "generation_tokens", "counter", "Number of generation tokens processed."),
    ("preemptions", "num_preemptions", "counter", "Cumulative number of preemption from the engine."),
    ("prompt_tokens_total", "prefix_cache_queries", "counter", "Prefix cache queries, in queried tokens."),
    ("prefix_hit_tokens", "prefix_cache_hits", "counter", "Prefix cache hits, in cached tokens."),
)
_VLLM_HISTOGRAMS = {
    "time_to_first_token_seconds": "Histogram of time to first token in seconds.",
    "inter_token_latency_seconds": "Histogram of inter-token latency in seconds.",
    "time_per_output_token_seconds": "Histogram of time per output token in seconds.",
    "e2e_request_latency_seconds": "Histogram of e2e request latency in seconds.",
    "request_queue_time_seconds": "Histogram of time spent in WAITING phase for request.",
    "request_inference_time_seconds": "Histogram of time spent in RUNNING phase for request.",
    "request_prefill_time_seconds": "Histogram of time spent in PREFILL phase for request.",
    "request_decode_time_seconds": "Histogram of time spent in DECODE phase for request.",
    "request_prompt_tokens": "Number of prefill tokens processed.",
    "request_generation_tokens": "Number of generation tokens processed.",
}
_LABELS = ("model_name", "engine")
_QUANTILES = (0.5, 0.9, 0.99)


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of an ascending sequence."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def _family(name: str, kind: str, help_text: str, value: float, labels: Sequence[str] = ()) -> Metric:
    family_type = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
    family = family_type(name, help_text, labels=_LABELS if labels else None)
    family.add_metric(list(labels), float(value))
    return family


def _histogram(name: str, help_text: str, data: Mapping[str, Any], labels: Sequence[str]) -> Metric:
    family = HistogramMetricFamily(name, help_text, labels=_LABELS)
    cumulative, buckets = 0, []
    for bound, count in zip([*data["buckets"], math.inf], data["counts"]):
        cumulative += count
        buckets.append(("+Inf" if math.isinf(bound) else repr(float(bound)), cumulative))
    family.add_metric(list(labels), buckets, sum_value=data["sum"])
    return family


def _vllm_metrics(stats: Mapping[str, Any], labels: Sequence[str]) -> Iterator[Metric]:
    for key, name, kind, help_text in _VLLM_SIMPLE:
        if key in stats:
            yield _family(f"vllm:{name}", kind, help_text, stats[key], labels)
    if "pages_used" in stats and stats.get("pages_total"):
        usage = stats["pages_used"] / stats["pages_total"]
        yield _family("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", usage, labels)
    if "requests_by_finish_reason" in stats:
        success = CounterMetricFamily(
            "vllm:request_success", "Count of successfully processed requests.", labels=[*_LABELS, "finished_reason"]
        )
        for reason, count in stats["requests_by_finish_reason"].items():
            success.add_metric([*labels, reason], float(count))
        yield success
    for name, data in stats.get("histograms", {}).items():
        if name in _VLLM_HISTOGRAMS:
            yield _histogram(f"vllm:{name}", _VLLM_HISTOGRAMS[name], data, labels)


def _astrai_metrics(stats: Mapping[str, Any]) -> Iterator[Metric]:
    for key, name, kind, help_text in _SIMPLE:
        if key in stats:
            yield _family(PREFIX + name, kind, help_text, stats[key])
    if "loop_alive" in stats:
        yield _family(PREFIX + "engine_loop_alive", "gauge", "1 while the scheduler loop runs.", stats["loop_alive"])
    if "prefix_hit_tokens" in stats and "prompt_tokens_total" in stats:
        prompts = stats["prompt_tokens_total"]
        rate = stats["prefix_hit_tokens"] / prompts if prompts else 0.0
        yield _family(PREFIX + "prefix_cache_hit_rate", "gauge", "Share of prompt tokens served from the cache.", rate)
    if "ttft_sum" in stats and "ttft_count" in stats:
        name = PREFIX + "time_to_first_token_seconds"
        summary = Metric(name, "Time from submission to first token.", "summary")
        recent = sorted(stats.get("time_to_first_token_s") or [])  # recent samples, when the engine keeps them
        for q in _QUANTILES if recent else ():
            summary.add_sample(name, {"quantile": str(q)}, _quantile(recent, q))
        summary.add_sample(name + "_sum", {}, float(stats["ttft_sum"]))
        summary.add_sample(name + "_count", {}, float(stats["ttft_count"]))
        yield summary


class _Snapshot:
    """A prometheus_client collector over one stats snapshot."""

    def __init__(self, stats: Mapping[str, Any], model_name: str) -> None:
        self.stats = stats
        self.labels = (model_name, "0")

    def collect(self) -> Iterator[Metric]:
        yield from _vllm_metrics(self.stats, self.labels)
        yield from _astrai_metrics(self.stats)


def render_metrics(stats: Mapping[str, Any], model_name: str = "astrai") -> str:
    """The Prometheus text page for one `get_stats()` snapshot; `model_name` labels the `vllm:` series."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(stats, model_name))
    return generate_latest(registry).decode()
