"""Sampling: exact masks, HF parity, penalties by hand, greedy and seeded rows independent of the batch."""

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from astrai.inference.sampling import (
    LogitBiasStrategy,
    PenaltyStrategy,
    SamplingPipeline,
    TemperatureStrategy,
    TopKStrategy,
    TopPStrategy,
)
from astrai.inference.task import Task

NEG = -float("inf")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_top_k_keeps_each_rows_k_largest_and_ties():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [2.0, 2.0, 1.0, 0.0, 3.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    out = TopKStrategy(torch.tensor([2, 2, 0])).apply(logits)
    expected = torch.tensor([[NEG, 5.0, NEG, 4.0, NEG], [2.0, 2.0, NEG, NEG, 3.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    assert torch.equal(out, expected)
    assert torch.equal(TopKStrategy(7).apply(logits), logits)  # k beyond the vocabulary keeps all
    assert torch.equal(TopKStrategy(1).apply(logits, filter_value=-1e4)[0], torch.tensor([-1e4, 5, -1e4, -1e4, -1e4]))


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])  # ranked: 0.5, 0.3, 0.15, 0.05
    logits = probs.log().expand(4, 4)
    out = TopPStrategy(torch.tensor([0.7, 0.85, 0.0, 1.0])).apply(logits)
    kept = out.isfinite()
    assert kept.tolist() == [
        [False, True, False, True],  # 0.5 + 0.3 reaches 0.7
        [True, True, False, True],  # 0.8 < 0.85, so the third token is needed too
        [False, True, False, False],  # p = 0 keeps the top token
        [True, True, True, True],  # p = 1 is off
    ]
    assert torch.equal(out[kept], logits[kept])


def test_temperature_scales_rows_and_zero_is_greedy_for_that_row_only():
    logits = torch.tensor([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0], [4.0, -1.0, 0.0]])
    out = TemperatureStrategy(torch.tensor([2.0, 0.0, 1e-6])).apply(logits)
    assert torch.equal(out[0], torch.tensor([0.5, 1.5, 1.0]))
    assert torch.equal(out[1], torch.tensor([NEG, 3.0, NEG]))
    assert torch.equal(out[2], torch.tensor([4.0, NEG, NEG]))


@pytest.mark.parametrize("seed", range(3))
def test_warpers_match_hugging_face(seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 50, generator=gen) * 3
    ids = torch.randint(0, 50, (4, 12), generator=gen)
    top_k, top_p, temperature, penalty = [1, 5, 17, 50], [0.1, 0.5, 0.9, 0.99], [0.5, 0.7, 1.3, 2.0], [0.5, 1.2, 1.5, 3]
    ours = {
        "top_k": TopKStrategy(torch.tensor(top_k)).apply(logits),
        "top_p": TopPStrategy(torch.tensor(top_p)).apply(logits),
        "temperature": TemperatureStrategy(torch.tensor(temperature)).apply(logits),
        "repetition": PenaltyStrategy(
            [[] for _ in range(4)], ids.tolist(), repetition=torch.tensor(penalty, dtype=torch.float32)
        ).apply(logits),
    }
    for b in range(4):
        row, row_ids = logits[b : b + 1], ids[b : b + 1]
        assert torch.equal(ours["top_k"][b : b + 1], TopKLogitsWarper(top_k[b])(row_ids, row.clone()))
        assert torch.equal(ours["top_p"][b : b + 1], TopPLogitsWarper(top_p[b])(row_ids, row.clone()))
        assert torch.equal(ours["temperature"][b : b + 1], TemperatureLogitsWarper(temperature[b])(row_ids, row))
        hf = RepetitionPenaltyLogitsProcessor(float(penalty[b]))(row_ids, row.clone())
        assert torch.equal(ours["repetition"][b : b + 1], hf)


def test_penalties_match_a_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [1.0, 1.0, 1.0, 1.0]])
    outputs = [[0, 0, 2], [3]]
    prompts = [[1], [3]]
    out = PenaltyStrategy(
        outputs,
        prompts,
        presence=torch.tensor([0.5, 0.0]),
        frequency=torch.tensor([0.25, 1.0]),
        repetition=torch.tensor([2.0, 1.0]),
    ).apply(logits)
    # Row 0: repetition on tokens 0, 1, 2 (seen in prompt or output): 2/2, -1*2, 0.5/2; token 3 unseen.
    # Then OpenAI: token 0 (count 2) -= 0.25*2 + 0.5; token 2 (count 1) -= 0.25 + 0.5; token 1 is only in the prompt.
    assert torch.equal(out[0], torch.tensor([1.0 - 1.0, -2.0, 0.25 - 0.75, 3.0]))
    # Row 1: only the frequency penalty on token 3.
    assert torch.equal(out[1], torch.tensor([1.0, 1.0, 1.0, 0.0]))
    # Presence and frequency alone ignore the prompt.
    alone = PenaltyStrategy([[1], []], None, presence=1.0, frequency=0.0).apply(logits)
    assert torch.equal(alone, torch.tensor([[2.0, -2.0, 0.5, 3.0], [1.0, 1.0, 1.0, 1.0]]))


def test_logit_bias_is_added_per_row_and_checked_against_the_vocabulary():
    logits = torch.zeros(2, 4)
    out = LogitBiasStrategy([{1: 5.0, 3: -100.0}, {}]).apply(logits)
    assert torch.equal(out, torch.tensor([[0.0, 5.0, 0.0, -100.0], [0.0, 0.0, 0.0, 0.0]]))
    assert not logits.any()  # input untouched
    with pytest.raises(ValueError, match="logit_bias token id 9"):
        LogitBiasStrategy([{9: 1.0}]).apply(logits)
    with pytest.raises(ValueError, match="output_ids holds token id 4"):
        PenaltyStrategy([[4]], presence=1.0).apply(torch.zeros(1, 4))


def test_scalar_parameters_are_validated():
    with pytest.raises(ValueError, match="temperature"):
        TemperatureStrategy(-1.0)
    with pytest.raises(ValueError, match="top_k"):
        TopKStrategy(-2)
    with pytest.raises(ValueError, match="top_p"):
        TopPStrategy(1.5)


def test_sample_draws_from_the_filtered_distribution():
    torch.manual_seed(0)
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0])
    n = 40_000
    draws = SamplingPipeline([TopKStrategy(4)]).sample(probs.log().expand(n, 5))
    freq = torch.bincount(draws, minlength=5).float() / n
    assert freq[4] == 0
    # Binomial standard deviation is at most 0.0025 here; 5 sigma.
    assert torch.allclose(freq, probs, atol=0.0125), freq


def test_greedy_rows_are_unaffected_by_the_rest_of_the_batch():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 100, generator=gen)
    temperature = torch.tensor([0.0, 1.0, 0.0, 2.0, 1e-6, 0.7])
    for _ in range(5):
        tokens = SamplingPipeline([TemperatureStrategy(temperature), TopPStrategy(0.9)]).sample(logits)
        greedy = [0, 2, 4]
        assert torch.equal(tokens[greedy], logits[greedy].argmax(-1))


def _seeded_run(seed_row_logits, others, steps, position):
    # Sample a seeded request placed at `position` among `others` unseeded rows for `steps` steps.
    task = Task("seeded", [1], seed=1234, temperature=1.0, top_k=20)
    fillers = [Task(f"o{i}", [1], temperature=0.8, top_p=0.9) for i in range(others)]
    tokens = []
    for step in range(steps):
        batch = fillers[:position] + [task] + fillers[position:]
        logits = torch.randn(len(batch), seed_row_logits.shape[-1])
        logits[position] = seed_row_logits[step]
        tokens.append(int(SamplingPipeline.for_tasks(batch).sample(logits)[position]))
    return tokens


def test_seeded_row_is_reproducible_in_different_batches():
    row_logits = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    alone = _seeded_run(row_logits, others=0, steps=8, position=0)
    torch.manual_seed(99)  # different global randomness for the other rows
    crowded = _seeded_run(row_logits, others=5, steps=8, position=3)
    assert alone == crowded
    assert len(set(alone)) > 1  # it really sampled, not argmax


def test_for_tasks_builds_only_the_stages_some_row_needs():
    plain = SamplingPipeline.for_tasks([Task("a", [1]), Task("b", [2])])
    assert plain.strategies == [] and plain.generators == [None, None]
    tasks = [
        Task("a", [1], temperature=0.0, top_k=3, logit_bias={2: 1.0}),
        Task("b", [2], top_p=0.5, presence_penalty=0.5, seed=7),
    ]
    pipeline = SamplingPipeline.for_tasks(tasks)
    kinds = [type(s) for s in pipeline.strategies]
    assert kinds == [LogitBiasStrategy, PenaltyStrategy, TemperatureStrategy, TopKStrategy, TopPStrategy]
    assert pipeline.generators[0] is None and pipeline.generators[1] is tasks[1].generator
    assert pipeline.strategies[1]._prompt is None  # no repetition penalty: the prompt is not scanned
    again = SamplingPipeline.for_tasks(tasks)
    assert again.generators[1] is tasks[1].generator  # the generator persists across steps
    # Row 0 is greedy after its bias: token 2 wins over token 1 once biased.
    logits = torch.tensor([[0.0, 1.5, 1.0, -1.0], [0.0, 0.0, 5.0, 0.0]])
    assert int(pipeline.sample(logits)[0]) == 2


def test_penalised_greedy_pipeline_matches_hand_result():
    task = Task("a", [0, 1], temperature=0.0, repetition_penalty=2.0, frequency_penalty=1.0)
    task.append_token(3)
    logits = torch.tensor([[3.0, 2.5, 1.0, 3.2]])
    # token 0: 3/2 = 1.5; token 1: 2.5/2 = 1.25; token 3: 3.2/2 - 1 = 0.6; token 2 untouched: 1.0.
    processed = SamplingPipeline.for_tasks([task]).strategies[0].apply(logits)
    assert torch.allclose(processed, torch.tensor([[1.5, 1.25, 1.0, 0.6]]))  # 3.2/2 - 1 is inexact
    assert int(SamplingPipeline.for_tasks([task]).sample(logits)[0]) == 0


@pytest.mark.gpu
@CUDA
def test_seeded_sampling_on_cuda_matches_across_batches():
    row_logits = torch.randn(6, 64, generator=torch.Generator().manual_seed(3)).cuda()
    results = []
    for others in (0, 4):
        task = Task("s", [1], seed=5)
        batch = [Task(f"o{i}", [1]) for i in range(others)] + [task]
        tokens = []
        for step in range(6):
            logits = torch.randn(len(batch), 64, device="cuda")
            logits[-1] = row_logits[step]
            tokens.append(int(SamplingPipeline.for_tasks(batch, device="cuda").sample(logits)[-1]))
        results.append(tokens)
    assert results[0] == results[1]
