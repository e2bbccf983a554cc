"""Prometheus text rendering of engine stats."""

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


def test_every_reported_stat_becomes_a_typed_sample():
    text = render_metrics(STATS)
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert samples == {
        "astrai_requests_running": "2",
        "astrai_requests_waiting": "1",
        "astrai_kv_pages_total": "64",
        "astrai_kv_pages_used": "10",
        "astrai_kv_pages_cached": "4",
        "astrai_kv_pages_free": "50",
        "astrai_generation_tokens_per_second": "41.5",
        "astrai_prompt_tokens_total": "120",
        "astrai_prefix_cache_hit_tokens_total": "30",
        "astrai_generation_tokens_total": "500",
        "astrai_preemptions_total": "0",
        "astrai_requests_finished_total": "7",
        "astrai_requests_cancelled_total": "2",
        "astrai_requests_failed_total": "1",
        "astrai_engine_loop_alive": "1",
        "astrai_prefix_cache_hit_rate": "0.25",
        "astrai_time_to_first_token_seconds_sum": "1.75",
        "astrai_time_to_first_token_seconds_count": "7",
    }
    assert "# TYPE astrai_requests_running gauge" in text
    assert "# TYPE astrai_generation_tokens_total counter" in text
    assert "# TYPE astrai_time_to_first_token_seconds summary" in text
    assert text.endswith("\n")


def test_recent_ttft_samples_give_quantiles_and_missing_stats_are_left_out():
    text = render_metrics({"ttft_sum": 1.0, "ttft_count": 4, "time_to_first_token_s": [0.4, 0.1, 0.3, 0.2]})
    assert text.splitlines()[2:] == [
        'astrai_time_to_first_token_seconds{quantile="0.5"} 0.2',
        'astrai_time_to_first_token_seconds{quantile="0.9"} 0.4',
        'astrai_time_to_first_token_seconds{quantile="0.99"} 0.4',
        "astrai_time_to_first_token_seconds_sum 1",
        "astrai_time_to_first_token_seconds_count 4",
    ]
    assert render_metrics({"prompt_tokens_total": 0, "prefix_hit_tokens": 0}).count("hit_rate 0") == 1
    assert render_metrics({"tokens_per_s": float("inf")}).splitlines()[-1] == (
        "astrai_generation_tokens_per_second +Inf"
    )
