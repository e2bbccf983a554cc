"""Fixed-shape decode steps (`astrai.inference.cuda_graphs`): run eagerly on the CPU against the naive reference,
and on CUDA recorded as graphs against the eager steps and the reference."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from astrai.config import AutoRegressiveLMConfig
from astrai.inference import Executor, InferenceEngine, KVCache, SamplingParams, Task, cuda_graphs
from astrai.inference.cuda_graphs import DecodeGraphs, buckets, serves
from astrai.model import AutoRegressiveLM

GREEDY = dict(temperature=0.0, ignore_eos=True)


def _static_engine(model, tokenizer, **kwargs) -> InferenceEngine:
    """An engine whose decode steps run through eager fixed-shape steps (the CPU stand-in for the graphs)."""
    engine = InferenceEngine(model, tokenizer, **kwargs)
    executor = engine.scheduler.executor
    executor.decode_graphs = DecodeGraphs(
        model, executor.page_cache, engine.scheduler.max_batch_size, engine.max_seq_len, capture=False
    )
    return engine


def _tokens(handle) -> list[int]:
    events = list(handle.iter_sync())
    assert events[-1].finish_reason == "length"
    return [token for event in events for token in event.token_ids]


def _requests(seed: int, count: int) -> tuple[list[list[int]], list[int]]:
    """Prompts of 1-40 tokens, some sharing a 9-token system prefix, and output lengths of 1-20."""
    rng = random.Random(seed)
    system = [rng.randrange(10, 400) for _ in range(9)]
    prompts = [
        (system if i % 2 else []) + [rng.randrange(10, 400) for _ in range(rng.randrange(1, 32))] for i in range(count)
    ]
    return prompts, [rng.randrange(1, 21) for _ in prompts]


def test_buckets_double_up_to_the_limit():
    assert buckets(1) == [1]
    assert buckets(16) == [1, 2, 4, 8, 16]
    assert buckets(24) == [1, 2, 4, 8, 16, 24]


def test_static_decode_matches_naive_recompute(model, tokenizer, naive_greedy):
    """Many concurrent requests of mixed lengths, prefix hits and forced preemption (20 pages of 4 for up to 8
    sequences of up to 64 tokens): every greedy output is the naive one, over several batch and page buckets."""
    prompts, lengths = _requests(0, 20)
    engine = _static_engine(model, tokenizer, max_batch_size=8, max_seq_len=64, page_size=4, num_pages=24)
    try:
        handles = [engine.submit(p, SamplingParams(max_tokens=n, **GREEDY)) for p, n in zip(prompts, lengths)]
        outputs = [_tokens(handle) for handle in handles]
        stats = engine.get_stats()
    finally:
        engine.shutdown()
    assert outputs == [naive_greedy(p, n) for p, n in zip(prompts, lengths)]
    assert stats["preemptions"] > 0 and stats["prefix_hit_tokens"] > 0
    shapes = engine.scheduler.executor.decode_graphs._steps.keys()
    assert len({rows for rows, _ in shapes}) >= 3 and len({pages for _, pages in shapes}) >= 2, sorted(shapes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_decode_logits_match_the_packed_step(model, tokenizer, dtype):
    """The same decode rows through the eager fixed-shape step and through the engine's own step: the same
    logits (float32 to rounding; bfloat16 within its precision), padding rows and pages leaving no trace."""
    model = copy.deepcopy(model).to(dtype)
    cache = KVCache.from_config(model.config, num_pages=40, page_size=4, dtype=dtype)
    executor = Executor(model, tokenizer, cache, static_decode=True, max_batch_size=8, max_seq_len=64)
    assert executor.decode_graphs is not None and not executor.decode_graphs.capture
    rng = random.Random(1)
    tasks = []
    for i, n in enumerate([3, 9, 17, 30, 5]):  # 1 to 8 pages each: 5 rows in a bucket of 8, 8 pages
        task = Task(task_id=f"t{i}", prompt_ids=[rng.randrange(10, 400) for _ in range(n)], max_tokens=4)
        assert cache.task_alloc(task.task_id, task.all_ids)
        executor.execute_prefill([task], [n - 1])
        task.next_pos = n - 1
        tasks.append(task)
    static = executor.execute_decode(tasks).float()
    reference = executor._forward(tasks, [[t.all_ids[t.next_pos]] for t in tasks]).float()
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
    torch.testing.assert_close(static, reference, **tolerance)
    assert static.shape == (5, model.config.vocab_size)


def test_static_decode_refuses_bad_steps(model, tokenizer):
    cache = KVCache.from_config(model.config, num_pages=8, page_size=4)
    graphs = DecodeGraphs(model, cache, max_batch=4, max_seq_len=16, capture=False)
    assert cache.task_alloc("a", [5, 6, 7])
    with pytest.raises(ValueError, match="at least one row"):
        graphs.run([], [], [])
    with pytest.raises(ValueError, match="pages end before position 4"):
        graphs.run(["a"], [9], [4])  # its one page holds positions 0-3
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        graphs.run(["a"] * 5, [9] * 5, [2] * 5)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA cache"):
        DecodeGraphs(model, cache, max_batch=4, max_seq_len=16, capture=True)


def test_a_step_that_cannot_be_recorded_falls_back_to_eager_decoding(model, tokenizer, naive_greedy, monkeypatch):
    engine = _static_engine(model, tokenizer, max_seq_len=64, page_size=4)
    executor = engine.scheduler.executor

    def fail(*args):
        raise cuda_graphs.CaptureError("an operation that cannot be captured")

    monkeypatch.setattr(executor.decode_graphs, "run", fail)
    try:
        outputs = engine.generate([[5, 6, 7], list(range(10, 30))], max_tokens=6, **GREEDY)
    finally:
        engine.shutdown()
    assert outputs == [naive_greedy([5, 6, 7], 6), naive_greedy(list(range(10, 30)), 6)]
    assert executor.decode_graphs is None  # dropped at the first failure


@pytest.mark.parametrize(
    "layout",
    [
        dict(attn_type="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, n_kv_heads=4),
        dict(ffn_type="moe", n_routed_experts=4, n_activated_experts=2, n_shared_experts=1),
    ],
    ids=["mla", "moe"],
)
def test_models_whose_steps_change_shape_keep_the_eager_path(tokenizer, layout):
    config = AutoRegressiveLMConfig(
        **{**dict(vocab_size=tokenizer.vocab_size, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, dim_ffn=64), **layout},
        max_len=64,
    )
    model = AutoRegressiveLM(config).eval()
    cache = KVCache.from_config(config, num_pages=8, page_size=4)
    assert not serves(model, cache)
    with pytest.raises(ValueError, match="cannot run at fixed shape"):
        DecodeGraphs(model, cache, max_batch=2, max_seq_len=16, capture=False)


def test_qk_norm_gated_tied_model_through_static_decode(tokenizer, naive_greedy):
    config = AutoRegressiveLMConfig(
        vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, dim_ffn=64, max_len=128,
        use_qk_norm=True, use_gated_attention=True, attn_bias=True, tie_weight=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoRegressiveLM(config).eval()
    prompts = [list(range(5, 25)), [3, 4, 5], [9] * 11]
    engine = _static_engine(model, tokenizer, max_seq_len=64, page_size=4)
    try:
        outputs = engine.generate(prompts, max_tokens=10, **GREEDY)
    finally:
        engine.shutdown()
    assert outputs == [naive_greedy(p, 10, model=model) for p in prompts]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_matches_eager_steps_and_naive(model, tokenizer, naive_greedy, dtype):
    """On the device, concurrent requests of mixed lengths with prefix hits and preemption: replayed graphs give
    exactly the tokens of the same fixed-shape steps run eagerly (the same kernels), and in float32 those of the
    padded steps (`cuda_graphs=False`) and of the naive reference."""
    cuda_model = copy.deepcopy(model).to("cuda", dtype)
    prompts, lengths = _requests(2, 24)
    kwargs = dict(max_batch_size=8, max_seq_len=64, page_size=4, num_pages=24)
    outputs = {}
    for mode in ("graphs", "eager fixed shape", "padded"):
        if mode == "eager fixed shape":
            engine = _static_engine(cuda_model, tokenizer, **kwargs)
        else:
            engine = InferenceEngine(cuda_model, tokenizer, cuda_graphs=mode == "graphs", **kwargs)
        try:
            handles = [engine.submit(p, SamplingParams(max_tokens=n, **GREEDY)) for p, n in zip(prompts, lengths)]
            outputs[mode] = [_tokens(handle) for handle in handles]
            assert engine.get_stats()["preemptions"] > 0
            graphs = engine.scheduler.executor.decode_graphs
            if mode == "graphs":  # every bucket recorded at start: 4 batch sizes x 5 page counts
                assert graphs is not None and graphs.capture and graphs.recorded == 20 == len(graphs._steps)
            elif mode == "padded":
                assert graphs is None
        finally:
            engine.shutdown()
    assert outputs["graphs"] == outputs["eager fixed shape"]
    if dtype == torch.float32:
        assert (
            outputs["graphs"]
            == outputs["padded"]
            == [naive_greedy(p, n, model=cuda_model) for p, n in zip(prompts, lengths)]
        )
