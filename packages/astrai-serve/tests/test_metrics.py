"""Prometheus exposition of engine stats, read back with prometheus_client's own parser."""

from prometheus_client.parser import text_string_to_metric_families

from astrai.inference.stats import SchedulerStats
from astrai.serve import render_metrics

STATS = {
    "running": 2,
    "waiting": 1,
    "pages_total": 64,
    "pages_used": 10,
    "pages_cached": 4,
    "pages_free": 50,
    "prefix_hit_tokens": 30,
    "prompt_tokens_total": 120,
    "generation_tokens_total": 500,
    "preemptions": 0,
    "requests_finished": 7,
    "requests_cancelled": 2,
    "requests_failed": 1,
    "tokens_per_s": 41.5,
    "loop_alive": True,
    "ttft_sum": 1.75,
    "ttft_count": 7,
}


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value}, read by prometheus_client's own parser."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_every_reported_stat_becomes_a_typed_astrai_sample():
    text = render_metrics(STATS)
    astrai = {name: value for (name, labels), value in _samples(text).items() if name.startswith("astrai_")}
    assert astrai == {
        "astrai_requests_running": 2,
        "astrai_requests_waiting": 1,
        "astrai_kv_pages_total": 64,
        "astrai_kv_pages_used": 10,
        "astrai_kv_pages_cached": 4,
        "astrai_kv_pages_free": 50,
        "astrai_generation_tokens_per_second": 41.5,
        "astrai_prompt_tokens_total": 120,
        "astrai_prefix_cache_hit_tokens_total": 30,
        "astrai_generation_tokens_total": 500,
        "astrai_preemptions_total": 0,
        "astrai_requests_finished_total": 7,
        "astrai_requests_cancelled_total": 2,
        "astrai_requests_failed_total": 1,
        "astrai_engine_loop_alive": 1,
        "astrai_prefix_cache_hit_rate": 0.25,
        "astrai_time_to_first_token_seconds_sum": 1.75,
        "astrai_time_to_first_token_seconds_count": 7,
    }
    assert "# TYPE astrai_requests_running gauge" in text
    assert "# TYPE astrai_generation_tokens_total counter" in text
    assert "# TYPE astrai_time_to_first_token_seconds summary" in text


def test_recent_ttft_samples_give_quantiles_and_missing_stats_are_left_out():
    text = render_metrics({"ttft_sum": 1.0, "ttft_count": 4, "time_to_first_token_s": [0.4, 0.1, 0.3, 0.2]})
    assert _samples(text) == {
        ("astrai_time_to_first_token_seconds", (("quantile", "0.5"),)): 0.2,
        ("astrai_time_to_first_token_seconds", (("quantile", "0.9"),)): 0.4,
        ("astrai_time_to_first_token_seconds", (("quantile", "0.99"),)): 0.4,
        ("astrai_time_to_first_token_seconds_sum", ()): 1.0,
        ("astrai_time_to_first_token_seconds_count", ()): 4.0,
    }
    assert (
        _samples(render_metrics({"prompt_tokens_total": 0, "prefix_hit_tokens": 0}))[
            ("astrai_prefix_cache_hit_rate", ())
        ]
        == 0
    )
    assert _samples(render_metrics({"tokens_per_s": float("inf")})) == {
        ("astrai_generation_tokens_per_second", ()): float("inf")
    }


def test_vllm_series_have_vllms_names_labels_and_buckets():
    stats = SchedulerStats(max_seq_len=100)
    for ttft in (0.003, 0.03, 3.0):
        stats.first_token(ttft)
    stats.next_token(0.02)
    stats.publish(**STATS)
    samples = _samples(render_metrics(stats.snapshot(), "my-model"))
    labels = (("engine", "0"), ("model_name", "my-model"))
    assert samples[("vllm:num_requests_running", labels)] == 2
    assert samples[("vllm:num_requests_waiting", labels)] == 1
    assert samples[("vllm:kv_cache_usage_perc", labels)] == 10 / 64
    assert samples[("vllm:prompt_tokens_total", labels)] == 120
    assert samples[("vllm:generation_tokens_total", labels)] == 500
    assert samples[("vllm:num_preemptions_total", labels)] == 0
    assert samples[("vllm:prefix_cache_hits_total", labels)] == 30
    assert samples[("vllm:prefix_cache_queries_total", labels)] == 120
    for reason in ("stop", "length", "abort", "error"):
        assert samples[("vllm:request_success_total", tuple(sorted((*labels, ("finished_reason", reason)))))] == 0
    ttft = "vllm:time_to_first_token_seconds"
    bucket = lambda le: samples[(f"{ttft}_bucket", tuple(sorted((*labels, ("le", le)))))]  # noqa: E731
    assert (bucket("0.001"), bucket("0.005"), bucket("0.04"), bucket("2.5"), bucket("5.0"), bucket("+Inf")) == (
        0, 1, 2, 2, 3, 3,
    )  # fmt: skip
    assert samples[(f"{ttft}_count", labels)] == 3 and samples[(f"{ttft}_sum", labels)] == 3.033
    assert samples[("vllm:inter_token_latency_seconds_count", labels)] == 1
    prompt_bounds = [le for (name, lbl), _ in samples.items() if name == "vllm:request_prompt_tokens_bucket"
                     for key, le in lbl if key == "le"]  # fmt: skip
    assert prompt_bounds == ["1.0", "2.0", "5.0", "10.0", "20.0", "50.0", "100.0", "+Inf"]  # 1-2-5 up to max_seq_len
