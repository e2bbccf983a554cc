"""GenerateResult: (index, text) pairs as the architecture document has them, the events behind them, waiting."""

import threading

import pytest

from astrai.inference import GenerateResult, GenerationEvent


def _event(text, ids, finished=False, reason=None):
    return GenerationEvent(text, ids, finished, reason, None, 3, 0, len(ids))


def test_tokens_and_pop_all_are_index_text_pairs():
    result = GenerateResult(2)
    result.append(_event("He", [1, 2]), 0)
    result.append(_event("x", [7]), 1)
    result.append("llo", 0)  # a bare text piece is accepted too
    assert result.tokens == [(0, "He"), (1, "x"), (0, "llo")]
    assert result.pop_all() == [(0, "He"), (1, "x"), (0, "llo")]
    assert result.tokens == [] and result.pop_all() == []
    assert result.get_results() == ["Hello", "x"] and result.token_ids == [[1, 2], [7]]


def test_pop_events_takes_from_the_same_queue_with_final_events():
    result = GenerateResult(1)
    result.append(_event("a", [4]))
    final = _event("", [], finished=True, reason="length")
    result.append(final)
    assert result.tokens == [(0, "a")]  # the final event carries no text
    assert [e for _, e in result.pop_events()][-1] is final
    assert result.pop_all() == [] and result.done and result.finish_reasons == ["length"]


def test_wait_and_wait_completion():
    result = GenerateResult(2)
    assert not result.wait(timeout=0.01)
    with pytest.raises(TimeoutError, match="0/2 done"):
        result.wait_completion(timeout=0.01)
    worker = threading.Thread(
        target=lambda: [result.append(_event("z", [5], True, "stop"), i) for i in range(2)], daemon=True
    )
    worker.start()
    result.wait_completion(timeout=30)
    worker.join()
    assert result.pop_all() == [(0, "z"), (1, "z")]
