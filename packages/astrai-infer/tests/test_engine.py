"""InferenceEngine: outputs against a naive recompute, the generate conveniences, validation, failures, shutdown."""

import asyncio
import copy
import functools
import random
import threading

import pytest
import torch

import astrai.inference.cache.paged_attention as paged_attention
import astrai.inference.cache.view as view_module
from astrai.config import AutoRegressiveLMConfig
from astrai.inference import (
    GenerationEvent,
    GenerationRequest,
    InferenceEngine,
    LoopStoppedError,
    QueueFullError,
    SamplingParams,
)
from astrai.model import AutoRegressiveLM
from astrai.model.native import fused, matmul

GREEDY = dict(temperature=0.0, ignore_eos=True)


def _drain(handle):
    events = list(handle.iter_sync())
    assert events[-1].finished and all(not e.finished for e in events[:-1])
    return [t for e in events for t in e.token_ids], events


def _check_clean(engine):
    stats = engine.get_stats()
    assert stats["pages_used"] == 0 and stats["running"] == 0 and stats["waiting"] == 0
    engine.scheduler.page_cache.check_invariants()


@pytest.mark.parametrize(
    "in_place, budget",
    [(True, 8), (True, 20), (False, 8)],
    ids=["packed-8-token-chunks", "packed-20-token-chunks", "padded-gathered-history"],
)
def test_greedy_matches_naive_recompute_with_prefix_hits_chunking_and_preemption(
    make_engine, naive_greedy, monkeypatch, in_place, budget
):
    # Pages of 4 tokens, 8- or 20-token prefill chunks, and 20 pages for 10 concurrent requests of up to 64
    # tokens: long prompts are chunked, the shared 10-token system prompt is served from the prefix cache, and
    # the cache runs out of pages, so the newest requests get preempted and recomputed. Steps are packed and
    # attend in place (decodes one query per row, prefill chunks, first or continued, causally over their row's
    # pages), or, where the kernel does not serve the cache, padded over the gathered history.
    decode_rows, continued_chunks = [], []
    decodes, chunks = view_module.PagedRows.attend, view_module.PagedChunks.attend
    monkeypatch.setattr(
        view_module.PagedRows, "attend", lambda rows, q, *a: decode_rows.append(len(q)) or decodes(rows, q, *a)
    )
    monkeypatch.setattr(
        view_module.PagedChunks,
        "attend",
        lambda step, *a: continued_chunks.append(bool((step.starts > 0).any())) or chunks(step, *a),
    )
    if not in_place:
        monkeypatch.setattr(view_module, "supports_cache", lambda cache: False)
    engine = make_engine(max_batch_size=10, max_seq_len=64, page_size=4, num_pages=20, max_prefill_tokens=budget)
    packed = in_place and paged_attention.available()  # steps are then one unpadded forward each
    assert engine.scheduler.executor.packs_steps is packed
    rng = random.Random(0)
    system = [rng.randrange(10, 400) for _ in range(10)]
    prompts = [system + [rng.randrange(10, 400) for _ in range(rng.randrange(1, 30))] for _ in range(14)]
    lengths = [rng.randrange(1, 25) for _ in prompts]
    handles = [engine.submit(p, SamplingParams(max_tokens=n, **GREEDY)) for p, n in zip(prompts, lengths)]
    for prompt, n, handle in zip(prompts, lengths, handles):
        ids, events = _drain(handle)
        assert ids == naive_greedy(prompt, n)
        assert events[-1].finish_reason == "length"
        assert events[-1].completion_tokens == n and events[-1].prompt_tokens == len(prompt)
    stats = engine.get_stats()
    assert stats["preemptions"] > 0 and stats["prefix_hit_tokens"] > 0
    assert stats["requests_finished"] == len(prompts)
    _check_clean(engine)
    if packed:
        assert max(decode_rows) > 1  # batched queries attended in place
        assert any(continued_chunks) and not all(continued_chunks)  # first and continued prefill chunks
    else:
        assert not decode_rows and not continued_chunks


def test_engine_start_builds_the_kernels_before_any_request(make_engine, monkeypatch):
    """The C kernels are compiled (or loaded) while the engine starts, not inside the first request."""
    monkeypatch.setattr(fused, "_library", functools.cache(fused._library.__wrapped__))  # forgets any earlier load
    monkeypatch.setattr(paged_attention, "_library", functools.cache(paged_attention._library.__wrapped__))
    monkeypatch.setattr(matmul, "_library", functools.cache(matmul._library.__wrapped__))
    engine = make_engine()  # a float32 model: its packed layers use the float32 matrix product
    executor = engine.scheduler.executor
    libraries = (fused._library, paged_attention._library, matmul._library)
    assert [library.cache_info().currsize for library in libraries] == [1, 1, 1]
    assert executor.fused_kernels is fused.available() and executor.packs_steps is paged_attention.available()


@pytest.mark.parametrize(
    "layout",
    [
        dict(attn_type="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, n_kv_heads=4),
        dict(ffn_type="moe", n_routed_experts=4, n_activated_experts=2, n_shared_experts=1, dim=64),
        dict(use_qk_norm=True, use_gated_attention=True, attn_bias=True, tie_weight=True, dim=64),
    ],
    ids=["mla", "moe", "qk-norm-gated-tied"],
)
def test_model_variants_match_naive_recompute(tokenizer, layout, naive_greedy):
    # MLA caches the KV latent and the shared RoPE key, not per-head K/V (its steps are padded); the others
    # have 16-channel heads, so their steps are packed. The engine must not care.
    config = AutoRegressiveLMConfig(
        **{**dict(vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, dim_ffn=64), **layout},
        max_len=128,
    )
    torch.manual_seed(0)
    model = AutoRegressiveLM(config).eval()
    prompts = [list(range(5, 25)), [3, 4, 5]]
    with InferenceEngine(model, tokenizer, max_seq_len=64, page_size=4, max_prefill_tokens=8) as engine:
        outputs = engine.generate(prompts, max_tokens=8, **GREEDY)
    assert outputs == [naive_greedy(p, 8, model=model) for p in prompts]


def test_prefix_hit_is_reported_in_cached_tokens(make_engine, naive_greedy):
    engine = make_engine(max_seq_len=64, page_size=4)
    prompt = list(range(20, 33))  # 13 tokens: three full pages
    first, _ = _drain(engine.submit(prompt, SamplingParams(max_tokens=3, **GREEDY)))
    second, events = _drain(engine.submit(prompt, SamplingParams(max_tokens=3, **GREEDY)))
    assert first == second == naive_greedy(prompt, 3)
    assert events[-1].cached_tokens == 12


def test_reset_prefix_cache_after_a_weight_update(model, tokenizer, naive_greedy):
    model = copy.deepcopy(model)  # this test changes the weights
    prompt = list(range(20, 33))  # 13 tokens: three full pages of 4
    with InferenceEngine(model, tokenizer, max_seq_len=64, page_size=4) as engine:
        _drain(engine.submit(prompt, SamplingParams(max_tokens=3, **GREEDY)))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p, generator=torch.Generator().manual_seed(0)) * 0.05)
        _, stale = _drain(engine.submit(prompt, SamplingParams(max_tokens=3, **GREEDY)))
        assert stale[-1].cached_tokens == 12  # without a reset the old weights' KV is reused
        engine.reset_prefix_cache()
        fresh, events = _drain(engine.submit(prompt, SamplingParams(max_tokens=3, **GREEDY)))
        assert events[-1].cached_tokens == 0
        assert fresh == naive_greedy(prompt, 3, model=model)
        engine.scheduler.page_cache.check_invariants()


def test_seeded_sampling_does_not_depend_on_the_rest_of_the_batch(make_engine):
    engine = make_engine(max_seq_len=64)
    params = SamplingParams(max_tokens=12, temperature=1.0, top_k=50, seed=1234, ignore_eos=True)
    alone, _ = _drain(engine.submit([5, 6, 7, 8], params))
    others = [
        engine.submit([9 + i] * (3 + i), SamplingParams(max_tokens=20, seed=i, ignore_eos=True)) for i in range(5)
    ]
    crowded = engine.submit([5, 6, 7, 8], params)
    assert _drain(crowded)[0] == alone
    for h in others:
        _drain(h)
    different, _ = _drain(engine.submit([5, 6, 7, 8], SamplingParams(max_tokens=12, seed=99, ignore_eos=True)))
    assert different != alone


def test_generate_text_ids_batch_and_stream_agree(make_engine, tokenizer, naive_greedy):
    engine = make_engine(max_seq_len=64)
    text = engine.generate("Hello world", max_tokens=8, **GREEDY)
    ids = tokenizer.encode("Hello world")
    assert text == tokenizer.decode(naive_greedy(ids, 8))
    assert engine.generate(ids, max_tokens=8, **GREEDY) == naive_greedy(ids, 8)
    assert engine.generate(["Hello world", "The quick"], max_tokens=8, **GREEDY) == [
        text,
        engine.generate("The quick", max_tokens=8, **GREEDY),
    ]
    assert "".join(engine.generate("Hello world", stream=True, max_tokens=8, **GREEDY)) == text
    pieces = list(engine.generate([ids, ids[:3]], stream=True, max_tokens=8, **GREEDY))
    assert [t for i, p in pieces if i == 0 for t in p] == naive_greedy(ids, 8)
    assert {i for i, _ in pieces} == {0, 1}


def test_streamed_text_is_the_decoding_of_the_tokens(make_engine, tokenizer):
    # Sampled tokens of a byte-level BPE split multi-byte characters; the pieces must still add up exactly.
    engine = make_engine(max_seq_len=96)
    for seed in range(4):
        handle = engine.submit(tokenizer.encode("日本語 🙂"), SamplingParams(max_tokens=40, seed=seed, ignore_eos=True))
        ids, events = _drain(handle)
        assert "".join(e.text for e in events) == tokenizer.decode(ids)


def test_generate_async_yields_the_same_pieces(make_engine):
    engine = make_engine(max_seq_len=64)
    expected = list(engine.generate("Hello", stream=True, max_tokens=10, **GREEDY))

    async def collect():
        return [piece async for piece in engine.generate_async("Hello", max_tokens=10, **GREEDY)]

    assert asyncio.run(collect()) == expected


def test_handle_async_iteration_from_an_event_loop(make_engine):
    engine = make_engine(max_seq_len=64)

    async def run():
        handle = engine.submit([1, 2, 3], SamplingParams(max_tokens=5, **GREEDY))
        return [event async for event in handle]

    events = asyncio.run(run())
    assert all(isinstance(e, GenerationEvent) for e in events)
    assert events[-1].finished and events[-1].completion_tokens == 5


def test_generate_with_request_renders_the_chat_template(make_engine, tokenizer, naive_greedy):
    engine = make_engine(max_seq_len=96)
    messages = [{"role": "user", "content": "Hi!"}]
    request = GenerationRequest(messages=messages, max_tokens=6, temperature=0.0)
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    expected = naive_greedy(ids, 6, set(tokenizer.stop_ids))
    assert engine.generate_with_request(request) == tokenizer.decode(expected)
    stream = GenerationRequest(messages=messages, max_tokens=6, temperature=0.0, stream=True)
    assert "".join(engine.generate_with_request(stream)) == tokenizer.decode(expected)


def test_stop_token_ids_end_the_output_without_showing_the_token(make_engine, naive_greedy):
    engine = make_engine(max_seq_len=64)
    prompt = [30, 31, 32]
    reference = naive_greedy(prompt, 10)
    stop = reference[3]
    first = reference.index(stop)
    ids, events = _drain(engine.submit(prompt, SamplingParams(max_tokens=10, stop_token_ids=[stop], **GREEDY)))
    assert ids == reference[:first]
    assert events[-1].finish_reason == "stop" and events[-1].completion_tokens == first + 1


def test_stop_string_is_trimmed_and_never_streamed(make_engine, tokenizer):
    engine = make_engine(max_seq_len=96)
    full = engine.generate("The quick brown", max_tokens=30, **GREEDY)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), "the random model produced blank text; pick another prompt"
    handle = engine.submit(tokenizer.encode("The quick brown"), SamplingParams(max_tokens=30, stop=[stop], **GREEDY))
    _, events = _drain(handle)
    text = "".join(e.text for e in events)
    assert text == full[: full.index(stop)]
    assert events[-1].finish_reason == "stop_sequence" and events[-1].stop_sequence == stop
    assert all(stop not in e.text for e in events)


def test_max_tokens_is_capped_by_the_sequence_length(make_engine):
    engine = make_engine(max_seq_len=32)
    ids, events = _drain(engine.submit(list(range(10, 40)), SamplingParams(max_tokens=50, **GREEDY)))
    assert len(ids) == 2 and events[-1].finish_reason == "length"


@pytest.mark.parametrize(
    "prompt, params",
    [
        ([1, 2], dict(max_tokens=0)),
        ([1, 2], dict(max_tokens=-3)),
        ([1, 2], dict(top_p=0.0)),
        ([1, 2], dict(top_p=1.5)),
        ([1, 2], dict(temperature=-0.1)),
        ([1, 2], dict(top_k=-1)),
        ([1, 2], dict(presence_penalty=2.5)),
        ([1, 2], dict(repetition_penalty=0.0)),
        ([1, 2], dict(stop=[""])),
        ([1, 2], dict(logit_bias={1: 101.0})),
        ([1, 2], dict(logit_bias={10_000: 1.0})),
        ([], dict()),
        ("", dict()),
        ([1, 10_000], dict()),
        ([1, -1], dict()),
        (list(range(1, 65)), dict()),  # no room left within max_seq_len=64
    ],
)
def test_bad_requests_raise_value_error_at_submission(make_engine, prompt, params):
    engine = make_engine(max_seq_len=64)
    with pytest.raises(ValueError):
        if isinstance(prompt, str):
            engine.generate(prompt, **params)
        else:
            engine.submit(prompt, SamplingParams(**params))
    stats = engine.get_stats()
    assert stats["waiting"] == 0 and stats["steps"] == 0  # nothing reached the loop


class _Gate:
    """Holds the loop inside its next decode forward until `open()`; `entered` is set once it waits there."""

    def __init__(self, engine):
        self.entered = threading.Event()
        self._release = threading.Event()
        executor = engine.scheduler.executor
        real = executor.forward_decode

        def gated(tasks):
            self.entered.set()
            self._release.wait()
            return real(tasks)

        executor.forward_decode = gated

    def open(self):
        self._release.set()


def test_queue_full_is_refused_at_submission(make_engine):
    engine = make_engine(max_seq_len=64, max_batch_size=1, max_queue=2)
    gate = _Gate(engine)
    running = engine.submit([1, 2, 3], SamplingParams(max_tokens=4, **GREEDY))
    assert gate.entered.wait(10)
    queued = [engine.submit([4, 5], SamplingParams(max_tokens=2, **GREEDY)) for _ in range(2)]
    with pytest.raises(QueueFullError):
        engine.submit([6], SamplingParams(max_tokens=2))
    gate.open()
    for handle in [running, *queued]:
        assert _drain(handle)[1][-1].finish_reason == "length"


def test_cancel_frees_the_request_at_the_next_step(make_engine):
    engine = make_engine(max_seq_len=64, max_batch_size=1)
    gate = _Gate(engine)
    running = engine.submit([1, 2, 3], SamplingParams(max_tokens=50, **GREEDY))
    waiting = engine.submit([4, 5, 6], SamplingParams(max_tokens=50, **GREEDY))
    assert gate.entered.wait(10)
    running.cancel()
    waiting.cancel()
    running.cancel()  # idempotent
    gate.open()
    for handle in (running, waiting):
        _, events = _drain(handle)
        assert events[-1].finish_reason == "cancelled"
        assert events[-1].completion_tokens < 50
    assert engine.get_stats()["requests_cancelled"] == 2
    _check_clean(engine)


def test_closing_a_stream_cancels_the_request(make_engine):
    engine = make_engine(max_seq_len=64)
    stream = engine.generate([1, 2, 3], stream=True, max_tokens=60, **GREEDY)
    next(stream)
    stream.close()
    assert engine.generate([1, 2], max_tokens=2, **GREEDY)  # the loop has processed the cancellation
    assert engine.get_stats()["requests_cancelled"] == 1
    _check_clean(engine)


def test_shutdown_ends_every_waiting_caller(make_engine):
    engine = make_engine(max_seq_len=64, max_batch_size=1)
    gate = _Gate(engine)
    handles = [engine.submit([1, 2, i], SamplingParams(max_tokens=40, **GREEDY)) for i in range(3, 6)]
    assert gate.entered.wait(10)
    stopper = threading.Thread(target=engine.shutdown)
    stopper.start()
    gate.open()
    stopper.join(10)
    for handle in handles:
        assert _drain(handle)[1][-1].finish_reason == "cancelled"
    assert not engine.is_alive() and engine.get_stats()["loop_alive"] is False
    with pytest.raises(LoopStoppedError):
        engine.submit([1], SamplingParams())


def test_a_request_whose_sampling_raises_fails_alone(make_engine, naive_greedy):
    engine = make_engine(max_seq_len=64)
    executor = engine.scheduler.executor
    real = executor.sample

    def sample(tasks, logits):
        if any(t.seed == 666 for t in tasks):
            raise RuntimeError("injected sampling failure")
        return real(tasks, logits)

    executor.sample = sample
    good = [engine.submit([7, 8, i], SamplingParams(max_tokens=6, **GREEDY)) for i in range(9, 12)]
    bad = engine.submit([7, 8, 9], SamplingParams(max_tokens=6, seed=666, **GREEDY))
    _, events = _drain(bad)
    assert events[-1].finish_reason == "error" and "injected sampling failure" in events[-1].error
    for i, handle in zip(range(9, 12), good):
        assert _drain(handle)[0] == naive_greedy([7, 8, i], 6)
    with pytest.raises(RuntimeError, match="injected"):
        engine.generate([1, 2], max_tokens=3, seed=666, **GREEDY)
    assert engine.is_alive()
    _check_clean(engine)


def test_a_failing_forward_fails_its_batch_and_the_loop_goes_on(make_engine, naive_greedy):
    engine = make_engine(max_seq_len=64)
    executor = engine.scheduler.executor
    real = executor.forward_decode
    failures = iter([True])

    def decode(tasks):
        if next(failures, False):
            raise RuntimeError("injected forward failure")
        return real(tasks)

    executor.forward_decode = decode
    _, events = _drain(engine.submit([1, 2, 3], SamplingParams(max_tokens=5, **GREEDY)))
    assert events[-1].finish_reason == "error" and "injected forward failure" in events[-1].error
    assert engine.generate([1, 2, 3], max_tokens=5, **GREEDY) == naive_greedy([1, 2, 3], 5)
    assert engine.get_stats()["requests_failed"] == 1
    _check_clean(engine)


def test_a_failing_chunk_fails_only_its_request_while_others_decode(make_engine, naive_greedy):
    # A packed step holds the decodes and the new request's prefill chunk in one forward: when it fails, the
    # loop runs the parts alone and fails only the part that fails again.
    engine = make_engine(max_seq_len=64)
    executor = engine.scheduler.executor
    real = executor.forward
    poison = [9, 9, 9, 9, 9, 9]

    def prefill(tasks, lens):
        if any(t.all_ids[: len(poison)] == poison for t in tasks):
            raise RuntimeError("injected forward failure")
        return real(tasks, lens)

    executor.forward = prefill
    decoding = engine.submit([1, 2, 3], SamplingParams(max_tokens=12, **GREEDY))
    events = decoding.iter_sync()
    first = next(events)  # the first request is decoding now
    _, failed = _drain(engine.submit(poison, SamplingParams(max_tokens=5, **GREEDY)))
    assert failed[-1].finish_reason == "error" and "injected forward failure" in failed[-1].error
    rest = list(events)
    assert [t for e in [first, *rest] for t in e.token_ids] == naive_greedy([1, 2, 3], 12)
    assert rest[-1].finish_reason == "length"
    assert engine.get_stats()["requests_failed"] == 1
    _check_clean(engine)


def test_stats_report_work_and_liveness(make_engine):
    engine = make_engine(max_seq_len=64)
    assert engine.get_stats()["loop_alive"] is True and engine.is_alive()
    engine.generate(["Hello", "world"], max_tokens=4, **GREEDY)
    stats = engine.get_stats()
    assert stats["requests_finished"] == 2 and stats["generation_tokens_total"] == 8
    assert stats["ttft_count"] == 2 and len(stats["time_to_first_token_s"]) == 2 and stats["ttft_sum"] > 0
    assert stats["tokens_per_s"] > 0 and stats["pages_total"] == stats["pages_free"] + stats["pages_cached"]
    assert stats["model"] == "astrai"


def test_from_pretrained_loads_model_and_tokenizer(model_dir, naive_greedy, tokenizer):
    with InferenceEngine.from_pretrained(model_dir, max_seq_len=64) as engine:
        assert engine.model_name == model_dir.name and engine.max_seq_len == 64
        ids = tokenizer.encode("Hello")
        assert engine.generate(ids, max_tokens=5, **GREEDY) == naive_greedy(ids, 5)
    assert not engine.is_alive()


def test_bfloat16_engine_generates(model, tokenizer):
    with InferenceEngine(copy.deepcopy(model), tokenizer, max_seq_len=64, dtype="bfloat16") as engine:
        assert engine.scheduler.page_cache.storage.dtype == torch.bfloat16
        assert len(engine.generate([1, 2, 3], max_tokens=6, **GREEDY)) == 6
    with pytest.raises(ValueError, match="dtype"):
        InferenceEngine(model, tokenizer, dtype="float33")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_engine_matches_naive_recompute_on_the_device(model, tokenizer, naive_greedy):
    cuda_model = copy.deepcopy(model).cuda()
    prompts = [[1, 2, 3], list(range(10, 40)), [7] * 5]
    with InferenceEngine(cuda_model, tokenizer, max_seq_len=64, page_size=4, max_prefill_tokens=8) as engine:
        assert engine.scheduler.page_cache.storage.device.type == "cuda"
        outputs = engine.generate(prompts, max_tokens=8, **GREEDY)
    assert outputs == [naive_greedy(p, 8, model=cuda_model) for p in prompts]


def test_engine_packs_weights_for_its_life_and_can_skip_it(model, tokenizer, naive_greedy):
    from astrai.model.linear import can_pack

    packable = can_pack(model.lm_head.weight)
    engine = InferenceEngine(model, tokenizer, max_seq_len=64)
    assert model.lm_head._pack == packable and engine.scheduler.executor.packed_layers == (
        sum(isinstance(m, torch.nn.Linear) for m in model.modules()) if packable else 0
    )
    prompt = [5, 17, 33, 2, 9, 41]
    assert engine.generate(prompt, max_tokens=6, **GREEDY) == naive_greedy(prompt, 6)
    engine.shutdown()
    assert not model.lm_head._pack and model.lm_head._packed is None  # copies dropped with the engine
    with InferenceEngine(model, tokenizer, max_seq_len=64, pack_weights=False) as plain:
        assert plain.generate(prompt, max_tokens=6, **GREEDY) == naive_greedy(prompt, 6)
        assert not model.lm_head._pack
