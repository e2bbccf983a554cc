"""Fixed-shape steps (`astrai.inference.cuda_graphs`): run eagerly on the CPU against the naive reference and the
engine's own steps, and on CUDA recorded as graphs against the eager steps and the reference."""

from __future__ import annotations

import copy
import itertools
import random

import pytest
import torch
import torch.nn.functional as F

import astrai.inference.cache.view as view_module
from astrai.config import AutoRegressiveLMConfig
from astrai.inference import Executor, InferenceEngine, KVCache, SamplingParams, Task, cuda_graphs
from astrai.inference.cuda_graphs import StepGraphs, _bucket, buckets, serves
from astrai.model import AutoRegressiveLM
from astrai.model.sdpa import grouped_attention

GREEDY = dict(temperature=0.0, ignore_eos=True)


def _static_engine(model, tokenizer, **kwargs) -> InferenceEngine:
    """An engine whose steps run as eager fixed-shape steps (the CPU stand-in for the graphs)."""
    engine = InferenceEngine(model, tokenizer, **kwargs)
    scheduler = engine.scheduler
    executor = scheduler.executor
    executor.graphs = StepGraphs(
        model, executor.page_cache, scheduler.max_batch_size, scheduler.max_prefill_tokens, engine.max_seq_len,
        capture=False,
    )  # fmt: skip
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


def test_a_cpu_engine_keeps_its_own_steps(make_engine):
    """Graphs are a CUDA matter: on the CPU the engine takes its packed steps, with the CPU's prefill budget."""
    engine = make_engine(max_seq_len=64)
    assert engine.scheduler.executor.graphs is None and engine.scheduler.max_prefill_tokens == 512


def test_buckets_double_up_to_the_limit():
    assert buckets(1) == [1]
    assert buckets(16) == [1, 2, 4, 8, 16]
    assert buckets(24) == [1, 2, 4, 8, 16, 24]
    assert buckets(512, 16) == [16, 32, 64, 128, 256, 512]
    assert buckets(8, 16) == [8]


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_static_steps_match_naive_recompute(model, tokenizer, naive_greedy, monkeypatch, packed):
    """Many concurrent requests of mixed lengths, chunked prefill (12 tokens a step), prefix hits and forced
    preemption (24 pages of 4 for up to 8 sequences of up to 64 tokens): every greedy output is the naive one,
    over several step shapes. `packed`: as the CPU schedules (decodes ride along with prefill chunks), else as
    CUDA does (prefill chunks and decodes in steps of their own)."""
    if not packed:
        monkeypatch.setattr(view_module, "supports_cache", lambda cache: False)
    prompts, lengths = _requests(0, 20)
    engine = _static_engine(
        model, tokenizer, max_batch_size=8, max_seq_len=64, page_size=4, num_pages=24, max_prefill_tokens=12
    )
    graphs = engine.scheduler.executor.graphs
    try:
        handles = [engine.submit(p, SamplingParams(max_tokens=n, **GREEDY)) for p, n in zip(prompts, lengths)]
        outputs = [_tokens(handle) for handle in handles]
        stats = engine.get_stats()
    finally:
        engine.shutdown()
    assert outputs == [naive_greedy(p, n) for p, n in zip(prompts, lengths)]
    assert stats["preemptions"] > 0 and stats["prefix_hit_tokens"] > 0
    shapes = graphs._steps.keys()
    decodes = {(rows, pages) for rows, tokens, pages in shapes if tokens == 1}
    chunks = {pages for rows, tokens, pages in shapes if tokens == 12}
    assert len(decodes) >= 3 and len(chunks) >= 3, sorted(shapes)  # chunks: first and continued ones


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_steps_logits_match_the_engine_steps(model, tokenizer, dtype):
    """The same rows through the eager fixed-shape steps and through the engine's own steps: the same logits
    (float32 to rounding; bfloat16 within its precision), padding rows, tokens and pages leaving no trace."""
    model = copy.deepcopy(model).to(dtype)
    cache = KVCache.from_config(model.config, num_pages=40, page_size=4, dtype=dtype)
    executor = Executor(model, tokenizer, cache, static_steps=True, max_batch_size=8, max_chunk=32, max_seq_len=64)
    graphs = executor.graphs
    assert graphs is not None and not graphs.capture
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
    rng = random.Random(1)
    tasks = []
    for i, n in enumerate([3, 9, 17, 30, 5]):  # 1 to 8 pages each: 5 rows in a bucket of 8, 8 pages
        task = Task(task_id=f"t{i}", prompt_ids=[rng.randrange(10, 400) for _ in range(n)], max_tokens=4)
        assert cache.task_alloc(task.task_id, task.all_ids)
        first = min(n - 1, 7)  # a first chunk, then a continued one (through the static step), then the rest
        for start, end in ((0, first), (first, n - 1)):
            if end > start:
                chunk = task.all_ids[start:end]
                static = graphs.prefill(task.task_id, chunk, start).float().clone()
                task.next_pos = start
                reference = executor._forward([task], [chunk]).float()
                torch.testing.assert_close(static, reference, **tolerance)
        task.next_pos = n - 1
        tasks.append(task)
    static = executor.forward_decode(tasks).float()
    reference = executor._forward(tasks, [[t.all_ids[t.next_pos]] for t in tasks]).float()
    torch.testing.assert_close(static, reference, **tolerance)
    assert static.shape == (5, model.config.vocab_size)
    both = executor.forward(tasks[:2], [1, 1]).float()  # two rows: one step each, both logits kept
    torch.testing.assert_close(both, reference[:2], **tolerance)


def test_static_steps_refuse_bad_steps(model, tokenizer):
    cache = KVCache.from_config(model.config, num_pages=8, page_size=4)
    graphs = StepGraphs(model, cache, max_batch=4, max_chunk=16, max_seq_len=16, capture=False)
    assert cache.task_alloc("a", [5, 6, 7])
    with pytest.raises(ValueError, match="at least one row"):
        graphs.decode([], [], [])
    with pytest.raises(ValueError, match="at least one token"):
        graphs.prefill("a", [], 0)
    with pytest.raises(ValueError, match="pages end before position 4"):
        graphs.decode(["a"], [9], [4])  # its one page holds positions 0-3
    with pytest.raises(ValueError, match="pages end before position 4"):
        graphs.prefill("a", [9, 9], 3)
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        graphs.decode(["a"] * 5, [9] * 5, [2] * 5)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA cache"):
        StepGraphs(model, cache, max_batch=4, max_chunk=16, max_seq_len=16, capture=True)


def test_a_shape_that_cannot_be_recorded_runs_eagerly(model, tokenizer, naive_greedy, monkeypatch, caplog):
    """A failed recording (here: of the 2-row decode steps) leaves that shape to run eagerly, through a fresh step,
    and every other shape recorded; the outputs stay the naive ones."""
    recorded = []

    def capture(step, pool, stream):
        if (step.rows, step.tokens) == (2, 1):
            raise RuntimeError("operation not permitted when stream is capturing")
        recorded.append((step.rows, step.tokens, step.pages))  # stands in for a graph: the step still runs eagerly

    monkeypatch.setattr(cuda_graphs._Step, "capture", capture)
    engine = _static_engine(model, tokenizer, max_batch_size=4, max_seq_len=64, page_size=4)
    graphs = engine.scheduler.executor.graphs
    graphs.capture = True
    try:
        graphs.record_all()
        prompts = [[5, 6, 7], list(range(10, 30))]
        outputs = engine.generate(prompts, max_tokens=6, **GREEDY)
    finally:
        engine.shutdown()
    assert outputs == [naive_greedy(p, 6) for p in prompts]
    failed = {shape for shape in graphs._steps if shape[:2] == (2, 1)}
    assert failed and failed.isdisjoint(recorded) and len(recorded) == len(graphs._steps) - len(failed)
    assert "recording the step of 2 rows x 1 tokens" in caplog.text


def test_refresh_records_again_only_after_a_weight_tensor_was_replaced(model, tokenizer):
    model = copy.deepcopy(model)
    cache = KVCache.from_config(model.config, num_pages=8, page_size=4)
    graphs = StepGraphs(model, cache, max_batch=2, max_chunk=16, max_seq_len=16, capture=False)
    graphs.record_all()
    steps = dict(graphs._steps)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)  # in place: a graph reads the new values where the old ones were
    graphs.refresh()
    assert graphs._steps == steps
    model.lm_head.weight.data = model.lm_head.weight.data.clone()  # a new tensor: the graphs read freed memory
    graphs.refresh()
    assert graphs._steps.keys() == steps.keys() and all(graphs._steps[k] is not steps[k] for k in steps)


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
        StepGraphs(model, cache, max_batch=2, max_chunk=16, max_seq_len=16, capture=False)


def test_qk_norm_gated_tied_model_through_static_steps(tokenizer, naive_greedy):
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


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (14, 2), (6, 1)], ids=["mha", "gqa2", "gqa7", "mqa"])
@pytest.mark.parametrize("queries", [1, 3, 8])
def test_grouped_attention_matches_sdpa_for_many_queries(heads, queries):
    """grouped_attention (T queries per row, grouped KV heads, (B, 1, T, S) mask) against SDPA over repeated KV
    heads, in float64, with random masks in which every query sees at least one key, and without a mask."""
    H, Hkv = heads
    B, S, d = 3, 11, 8
    gen = torch.Generator().manual_seed(H * 100 + Hkv * 10 + queries)
    q = torch.randn(B, H, queries, d, dtype=torch.float64, generator=gen)
    k = torch.randn(B, Hkv, S, d, dtype=torch.float64, generator=gen)
    v = torch.randn(B, Hkv, S, 5, dtype=torch.float64, generator=gen)
    mask = torch.rand(B, 1, queries, S, generator=gen) < 0.5
    seen = torch.randint(S, (B, 1, queries, 1), generator=gen)
    mask = mask | (torch.arange(S) == seen)  # every query sees >= 1 key
    kr, vr = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    for m in (mask, None):
        got = grouped_attention(q, k, v, m, 0.3)
        expected = F.scaled_dot_product_attention(q, kr, vr, attn_mask=m, scale=0.3)
        assert got.shape == expected.shape == (B, H, queries, 5)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # its softmax runs in float32


@pytest.mark.parametrize(
    "page_size, max_chunk, max_seq_len",
    [(16, 512, 1024), (3, 48, 100), (5, 37, 61), (7, 12, 30), (6, 100, 40), (4, 1, 9), (16, 2048, 4096), (1, 20, 33)],
)
def test_record_all_covers_every_step_that_can_occur(model, page_size, max_chunk, max_seq_len):
    """Every decode (1..max_batch rows, any positions) and every one-row prefill chunk (any start, 1..max_chunk
    tokens, within max_seq_len) maps to a shape `record_all` records, so no request records a graph lazily."""
    max_batch = 5
    pages_per_seq = -(-max_seq_len // page_size)
    cache = KVCache.from_config(model.config, num_pages=pages_per_seq, page_size=page_size)
    graphs = StepGraphs(model, cache, max_batch, max_chunk, max_seq_len, capture=False)
    graphs.record_all()
    recorded = set(graphs._steps)
    for rows, pages in itertools.product(range(1, max_batch + 1), range(1, pages_per_seq + 1)):
        shape = (_bucket(rows, graphs.batch_buckets), 1, _bucket(pages, graphs.page_buckets))
        assert shape in recorded, shape
    for start in range(max_seq_len):
        for n in range(1, min(max_chunk, max_seq_len - start) + 1):
            pages = (start + n - 1) // page_size + 1
            shape = (1, _bucket(n, graphs.chunk_buckets), _bucket(pages, graphs.page_buckets))
            assert shape in recorded, (start, n, shape)


def test_padding_writes_only_the_scratch_page(model, tokenizer):
    """A decode of 3 rows in a bucket of 4 over 8 pages and a 5-token chunk in a bucket of 16: the cache changes
    only at the real tokens' slots and on the scratch page."""
    ps = 4
    cache = KVCache.from_config(model.config, num_pages=40, page_size=ps)
    executor = Executor(model, tokenizer, cache, static_steps=True, max_batch_size=4, max_chunk=32, max_seq_len=64)
    graphs = executor.graphs
    rng = random.Random(0)
    tasks = []
    for i, n in enumerate([3, 29, 10]):
        task = Task(task_id=f"t{i}", prompt_ids=[rng.randrange(10, 400) for _ in range(n)], max_tokens=4)
        assert cache.task_alloc(task.task_id, task.all_ids)
        task.next_pos = 0
        executor._forward([task], [task.all_ids[: n - 1]])
        task.next_pos = n - 1
        tasks.append(task)
    storage = cache.storage
    for step in ("decode", "prefill"):
        before_k, before_v = storage.k_cache.clone(), storage.v_cache.clone()
        if step == "decode":
            executor.forward_decode(tasks)
            written = [(t.task_id, t.next_pos) for t in tasks]
        else:
            task = Task(task_id="p", prompt_ids=[rng.randrange(10, 400) for _ in range(9)], max_tokens=4)
            assert cache.task_alloc(task.task_id, task.all_ids)
            graphs.prefill("p", task.all_ids[:5], 0)
            written = [("p", p) for p in range(5)]
        changed = ((storage.k_cache != before_k) | (storage.v_cache != before_v)).flatten(3).any(-1)  # (L, P+1, ps)
        allowed = torch.zeros_like(changed)
        allowed[:, storage.num_pages] = True
        for task_id, pos in written:
            allowed[:, cache.task_pages(task_id)[pos // ps], pos % ps] = True
        assert not (changed & ~allowed).any(), (changed & ~allowed).nonzero()


def test_hidden_non_finite_cache_entries_stay_hidden(model, tokenizer):
    """A stale NaN in a slot past a row's position (left there by an earlier task of the same page: a freed page
    is reused as it is) must not reach the row's logits: the engine's own step (the paged attention kernel)
    keeps it out ("a hidden value adds exactly nothing, even an infinite or NaN one"); the fixed-shape step
    zeroes the values past the row's end (a zero probability times NaN would be NaN)."""
    ps = 4
    cache = KVCache.from_config(model.config, num_pages=16, page_size=ps)
    executor = Executor(model, tokenizer, cache, static_steps=True, max_batch_size=2, max_chunk=16, max_seq_len=32)
    task = Task(task_id="t", prompt_ids=list(range(20, 26)), max_tokens=4)  # positions 0-5: pages 0 and 1
    assert cache.task_alloc(task.task_id, task.all_ids)
    executor._forward([task], [task.all_ids[:5]])
    task.next_pos = 5
    last_page = cache.task_pages("t")[1]
    cache.storage.v_cache[:, last_page, 3] = float("nan")  # position 7: after the row's, never attended
    reference = executor._forward([task], [[task.all_ids[5]]])
    assert reference.isfinite().all()
    static = executor.forward_decode([task])
    assert static.isfinite().all(), "a masked stale NaN leaked into the fixed-shape step's logits"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_match_eager_steps_and_naive(model, tokenizer, naive_greedy, dtype):
    """On the device, concurrent requests of mixed lengths with chunked prefill, prefix hits and preemption:
    replayed graphs give exactly the tokens of the same fixed-shape steps run eagerly (the same kernels), and in
    float32 those of the padded steps (`cuda_graphs=False`) and of the naive reference."""
    cuda_model = copy.deepcopy(model).to("cuda", dtype)
    prompts, lengths = _requests(2, 24)
    kwargs = dict(max_batch_size=8, max_seq_len=64, page_size=4, num_pages=24, max_prefill_tokens=12)
    outputs = {}
    for mode in ("graphs", "eager fixed shape", "padded"):
        if mode == "eager fixed shape":
            engine = _static_engine(cuda_model, tokenizer, **kwargs)
        else:
            engine = InferenceEngine(cuda_model, tokenizer, cuda_graphs=mode == "graphs", **kwargs)
        try:
            graphs = engine.scheduler.executor.graphs
            if mode == "graphs":  # every bucket recorded at start
                assert graphs is not None and graphs.capture and graphs.recorded == len(graphs._steps) >= 20
            handles = [engine.submit(p, SamplingParams(max_tokens=n, **GREEDY)) for p, n in zip(prompts, lengths)]
            outputs[mode] = [_tokens(handle) for handle in handles]
            assert engine.get_stats()["preemptions"] > 0
            assert (engine.scheduler.executor.graphs is None) == (mode == "padded")  # no fallback happened
        finally:
            engine.shutdown()
    assert outputs["graphs"] == outputs["eager fixed shape"]
    if dtype == torch.float32:
        naive = [naive_greedy(p, n, model=cuda_model) for p, n in zip(prompts, lengths)]
        assert outputs["graphs"] == outputs["padded"] == naive
