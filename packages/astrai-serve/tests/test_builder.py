"""SSE framing, the context-length check and GenContext bookkeeping (no server)."""

import pytest

from astrai.inference import GenerationEvent
from astrai.serve import APIError, GenContext, sse
from astrai.serve.builder import check_context
from astrai.serve.context import ChoiceState


def test_sse_frames_end_with_a_blank_line():
    assert sse({"a": "é\n", "b": [1, 2]}) == 'data: {"a":"é\\n","b":[1,2]}\n\n'
    assert sse({"type": "ping"}, "ping") == 'event: ping\ndata: {"type":"ping"}\n\n'
    assert sse("[DONE]") == "data: [DONE]\n\n"


def test_check_context_accepts_exact_fit_and_refuses_one_more():
    check_context(10, 6, 16, "max_tokens")
    check_context(15, None, 16, "max_tokens")
    with pytest.raises(APIError) as err:
        check_context(10, 7, 16, "max_completion_tokens")
    assert (err.value.status, err.value.param) == (400, "max_completion_tokens")
    assert err.value.message == (
        "the prompt (10 tokens) plus max_completion_tokens (7) exceeds the model's context length of 16 tokens"
    )
    with pytest.raises(APIError) as err:
        check_context(16, None, 16, "max_tokens")
    assert (err.value.status, err.value.param) == (400, "messages")


def _event(text, completion, finished=False, reason=None, stop=None, cached=3):
    return GenerationEvent(
        text=text,
        token_ids=[1] * bool(text),
        finished=finished,
        finish_reason=reason,
        stop_sequence=stop,
        prompt_tokens=9,
        cached_tokens=cached,
        completion_tokens=completion,
    )


def test_gen_context_records_text_tokens_and_finish_per_choice():
    ctx = GenContext("id", 1, "m", prompt_tokens=9, choices=[ChoiceState(0), ChoiceState(1)])
    ctx.record(0, _event("He", 2))
    ctx.record(1, _event("Hi", 1, cached=0))
    ctx.record(0, _event("llo", 5, finished=True, reason="stop_sequence", stop="!"))
    assert ctx.failure() is None
    ctx.record(1, _event("", 4, finished=True, reason="error"))
    assert [c.text for c in ctx.choices] == ["Hello", "Hi"]
    assert ctx.completion_tokens == 9
    assert ctx.cached_tokens == 3  # the first choice's cache hits
    assert (ctx.choices[0].finish_reason, ctx.choices[0].stop_sequence) == ("stop_sequence", "!")
    assert ctx.failure() is ctx.choices[1]
