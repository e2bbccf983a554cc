"""Token log-probabilities: log-softmax of the model's logits before any sampling filter, checked against a full
forward over the prompt and the generated tokens."""

import pytest
import torch

from astrai.inference import SamplingParams, Task


def _reference(model, prompt_ids, output_ids):
    """(V,) log-probabilities at each generated position, from one forward over the whole sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + output_ids]))["logits"][0].float()
    return logits.log_softmax(-1)[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(output_ids)]


@pytest.mark.parametrize(
    "sampling",
    [dict(temperature=0), dict(temperature=0.7, top_k=3, top_p=0.9, seed=1, repetition_penalty=1.3)],
    ids=["greedy", "filtered"],
)
def test_logprobs_equal_log_softmax_of_the_full_forward(make_engine, model, sampling):
    engine = make_engine(max_batch_size=4, page_size=4)
    prompts = [[5, 17, 42, 99, 7], [3, 3, 120]]
    handles = [engine.submit(p, SamplingParams(max_tokens=6, ignore_eos=True, logprobs=4, **sampling)) for p in prompts]
    plain = engine.submit(prompts[0], SamplingParams(max_tokens=6, ignore_eos=True, temperature=0))
    for prompt, handle in zip(prompts, handles, strict=True):
        events = list(handle.iter_sync(timeout=60))
        ids = [t for e in events for t in e.token_ids]
        logprobs = [lp for e in events for lp in e.logprobs]
        assert len(ids) == 6 and [lp.token_id for lp in logprobs] == ids
        reference = _reference(model, prompt, ids)
        for position, lp in enumerate(logprobs):
            row = reference[position]
            assert lp.logprob == pytest.approx(row[lp.token_id].item(), abs=1e-4)
            values, top_ids = row.topk(4)
            assert [t for t, _ in lp.top] == top_ids.tolist()
            assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-4)
    assert all(e.logprobs is None for e in plain.iter_sync(timeout=60))  # only those who ask pay for them


def test_logprobs_zero_gives_only_the_sampled_token(make_engine):
    engine = make_engine()
    events = list(engine.submit([5, 6], SamplingParams(max_tokens=3, ignore_eos=True, logprobs=0)).iter_sync(60))
    logprobs = [lp for e in events for lp in e.logprobs]
    assert len(logprobs) == 3 and all(lp.top == () and lp.logprob <= 0 for lp in logprobs)
    assert Task("t", [1], logprobs=20).logprobs == 20
    for bad in (-1, 21, 2.0, True):
        with pytest.raises(ValueError, match="logprobs="):
            SamplingParams(logprobs=bad)


def test_prompt_logprobs_come_with_the_first_event(make_engine, model):
    engine = make_engine(page_size=4)
    prompt = [5, 17, 42, 99, 7, 7, 300]
    list(engine.submit(prompt, SamplingParams(max_tokens=1)).iter_sync(timeout=60))  # now prefix-cached
    events = list(engine.submit(prompt, SamplingParams(max_tokens=2, prompt_logprobs=3)).iter_sync(timeout=60))
    first, rest = events[0].prompt_logprobs, [e.prompt_logprobs for e in events[1:]]
    assert rest == [None] * len(rest)
    with torch.no_grad():
        reference = model(torch.tensor([prompt]))["logits"][0].float().log_softmax(-1)
    assert [lp.token_id for lp in first] == prompt[1:]
    for position, lp in enumerate(first):  # position t predicts token t + 1
        assert lp.logprob == pytest.approx(reference[position, prompt[position + 1]].item(), abs=1e-4)
        assert [t for t, _ in lp.top] == reference[position].topk(3).indices.tolist()
