"""SchedulerStats' request histograms: vLLM's bounds, bucket edges, and a retired task's timings."""

import pytest

from astrai.inference import Task
from astrai.inference.stats import (
    REQUEST_LATENCY_BUCKETS,
    TTFT_BUCKETS,
    Histogram,
    SchedulerStats,
    one_two_five_buckets,
)


def test_histogram_counts_a_value_in_the_first_bucket_whose_bound_it_does_not_exceed():
    h = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        h.observe(value)
    assert h.snapshot() == {"buckets": [0.1, 1.0], "counts": [2, 2, 1], "sum": pytest.approx(8.65), "count": 5}


def test_token_buckets_are_one_two_five_up_to_the_context():
    assert one_two_five_buckets(100) == (1, 2, 5, 10, 20, 50, 100)
    assert one_two_five_buckets(4096)[-1] == 2000
    assert TTFT_BUCKETS[0] == 0.001 and TTFT_BUCKETS[-1] == 2560.0 and REQUEST_LATENCY_BUCKETS[-1] == 7680.0


def test_a_retired_task_records_its_phases_and_finish_reason():
    stats = SchedulerStats(max_seq_len=64)
    task = Task("t", [1, 2, 3], max_tokens=4)
    task.arrival_time, task.scheduled_time, task.first_token_time = 10.0, 10.5, 11.0
    task.output_ids, task.output_tokens, task.finish_time, task.finish_reason = [5, 6, 7], 3, 12.0, "length"
    stats.request_finished(task)
    never_ran = Task("u", [1])
    never_ran.arrival_time, never_ran.finish_time, never_ran.finish_reason = 10.0, 10.25, "cancelled"
    stats.request_finished(never_ran)
    stats.publish()
    snap = stats.snapshot()
    h = snap["histograms"]
    assert snap["requests_by_finish_reason"] == {"abort": 1, "error": 0, "length": 1, "stop": 0}
    assert h["e2e_request_latency_seconds"]["sum"] == 2.0 + 0.25
    assert h["request_queue_time_seconds"]["sum"] == 0.5 + 0.25
    assert h["request_inference_time_seconds"]["sum"] == 1.5 + 0.0
    assert (h["request_prefill_time_seconds"]["sum"], h["request_prefill_time_seconds"]["count"]) == (0.5, 1)
    assert (h["request_decode_time_seconds"]["sum"], h["request_decode_time_seconds"]["count"]) == (1.0, 1)
    assert h["time_per_output_token_seconds"]["sum"] == 0.5  # 1 s over the 2 tokens after the first
    assert (h["request_prompt_tokens"]["sum"], h["request_generation_tokens"]["sum"]) == (4, 3)
