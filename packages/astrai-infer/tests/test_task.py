"""Task: parameter validation, stop rules, cancellation, timing, final status."""

import pytest

from astrai.inference.task import Task, TaskStatus


def test_defaults_and_derived_counts():
    task = Task("t1", [5, 6, 7])
    assert task.status is TaskStatus.PENDING
    assert (task.input_tokens, task.output_tokens, task.next_pos, task.cached_tokens) == (3, 0, 0, 0)
    assert (task.temperature, task.top_p, task.top_k, task.repetition_penalty) == (1.0, 1.0, 0, 1.0)
    assert task.first_token_time is None and task.finish_time is None and task.finish_reason is None
    assert not task.cancelled and task.generator is None
    task.append_token(8)
    task.append_token(9)
    assert task.output_tokens == 2 and task.all_ids == [5, 6, 7, 8, 9]
    assert task.arrival_time <= task.first_token_time


def test_usage_counters_are_settable_attributes():
    task = Task("t", [5, 6, 7], output_ids=[8])
    assert (task.input_tokens, task.output_tokens) == (3, 1)
    task.input_tokens = 2  # a loop of one's own keeps the counters (e.g. prompt tokens after truncation)
    task.output_tokens = 0
    task.append_token(9)
    assert (task.input_tokens, task.output_tokens, task.output_ids) == (2, 1, [8, 9])
    assert task.next_pos == 0 and task.all_ids == [5, 6, 7, 8, 9]  # progress follows the ids, not the counters


def test_stop_reason_by_stop_token_then_length():
    task = Task("t", [1], max_tokens=3, stop_token_ids={7})
    assert task.stop_reason() is None and not task.is_finished()
    task.append_token(2)
    assert task.stop_reason(stop_ids={2}) == "stop"  # engine-wide stop ids (e.g. EOS)
    assert task.stop_reason() is None
    task.append_token(7)
    assert task.stop_reason() == "stop"  # the request's own stop ids
    task.append_token(3)
    assert task.stop_reason() == "length" and task.is_finished()
    assert task.stop_reason(stop_ids=[3]) == "stop"  # a stop token at the limit reports "stop"


def test_unbounded_task_finishes_only_on_stop_tokens():
    task = Task("t", [1])
    for _ in range(100):
        task.append_token(4)
    assert not task.is_finished() and task.is_finished(stop_ids={4})


def test_cancel_and_finish():
    task = Task("t", [1])
    task.cancel()
    assert task.cancelled
    task.finish(TaskStatus.ABORTED, "cancelled")
    assert task.status is TaskStatus.ABORTED and task.finish_reason == "cancelled" and task.finish_time is not None
    failed = Task("u", [1])
    failed.finish(TaskStatus.ABORTED, "error", error="boom")
    assert failed.error == "boom"
    with pytest.raises(ValueError, match="FINISHED or ABORTED"):
        Task("v", [1]).finish(TaskStatus.RUNNING, "stop")


def test_valid_extremes_are_accepted():
    task = Task(
        "t", (1, 2), max_tokens=1, temperature=0.0, top_p=0.0, top_k=5, presence_penalty=-2.0,
        frequency_penalty=2.0, repetition_penalty=1.3, seed=2**64 - 1, stop_token_ids=[0], logit_bias={3: -100},
    )  # fmt: skip
    assert task.prompt_ids == [1, 2] and task.stop_token_ids == frozenset({0})
    largest = 2**31 - 1  # int32 on the device
    task = Task("t", [largest], max_tokens=largest, top_k=largest, stop_token_ids=[largest], logit_bias={largest: 1})
    assert (task.max_tokens, task.top_k) == (largest, largest)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("task_id", ""),
        ("prompt_ids", []),
        ("prompt_ids", [1, -1]),
        ("prompt_ids", [1.0]),
        ("max_tokens", 0),
        ("max_tokens", -5),
        ("max_tokens", True),
        ("max_tokens", 2**63),
        ("prompt_ids", [2**31]),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("top_p", 1.5),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_k", 2**63),
        ("top_k", 2**31),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3),
        ("repetition_penalty", 0),
        ("repetition_penalty", -1.0),
        ("seed", -1),
        ("seed", 2**64),
        ("stop_token_ids", {-2}),
        ("stop_token_ids", {2**63}),
        ("logit_bias", {2**63: 1.0}),
        ("logit_bias", {1: 101.0}),
        ("logit_bias", {-1: 1.0}),
    ],
)
def test_bad_parameters_raise_value_error_naming_the_field(field, value):
    kwargs = {"task_id": "t", "prompt_ids": [1], field: value}
    with pytest.raises(ValueError, match=field):
        Task(**kwargs)


@pytest.mark.parametrize("field", ["top_k", "max_tokens"])
def test_sampling_params_refuse_counts_the_engine_cannot_hold(field):
    from astrai.inference import SamplingParams

    with pytest.raises(ValueError, match=rf"{field}=9223372036854775808: must be an integer in \["):
        SamplingParams(**{field: 2**63})
