"""KVCache: task page tables, prefix reuse, ragged write/gather through the view, randomized stress."""

import random

import pytest
import torch

from astrai.config import AutoRegressiveLMConfig
from astrai.inference.cache import KVCache, KvcacheView, Storage, cache_entry_shapes
from astrai.protocols import KVCacheView

GQA = AutoRegressiveLMConfig(vocab_size=32, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, dim_ffn=32, max_len=64)
MLA = AutoRegressiveLMConfig(
    vocab_size=32, dim=16, n_layers=3, n_heads=4, dim_ffn=32, max_len=64,
    attn_type="mla", kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=2,
)  # fmt: skip
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _state(cache):
    alloc = cache._pool._alloc
    return list(alloc._refs), alloc.free_pages(), list(alloc._lru), len(cache._pool._prefix)


def test_entry_shapes_follow_the_attention_type():
    assert cache_entry_shapes(GQA) == ((2, 4), (2, 4))
    assert cache_entry_shapes(MLA) == ((8,), (2,))  # the KV latent and the shared RoPE key, not K/V per head
    cache = KVCache.from_config(MLA, num_pages=5, page_size=4, dtype=torch.bfloat16)
    assert cache.storage.k_cache.shape == (3, 6, 4, 8)  # layers, pages + scratch page, page_size, latent
    assert cache.storage.v_cache.shape == (3, 6, 4, 2)
    assert cache.storage.bytes_per_token == 3 * (8 + 2) * 2


def test_alloc_reuses_cached_prefix_pages_but_never_the_last_prompt_token():
    cache = KVCache(1, 8, 4, (1,), (1,))
    prompt = list(range(8))  # exactly two pages
    assert cache.task_alloc("a", prompt) and cache.task_cached("a") == 0
    cache.task_record_hashes("a", prompt)
    # Same prompt: page 1 holds the last prompt token, so only page 0 is reused and 4 tokens are prefilled.
    assert cache.task_alloc("b", prompt)
    assert cache.task_cached("b") == 4 and cache.task_pages("b")[0] == cache.task_pages("a")[0]
    assert cache.task_pages("b")[1] != cache.task_pages("a")[1]
    # One more token: both pages are reused.
    assert cache.task_alloc("c", [*prompt, 99])
    assert cache.task_cached("c") == 8 and cache.task_pages("c")[:2] == cache.task_pages("a")
    assert cache.storage is cache._storage
    cache.check_invariants()
    for task in "abc":
        cache.task_free(task)
    assert (cache.num_used_pages, cache.num_cached_pages, cache.num_free_pages) == (0, 2, 6)
    cache.check_invariants()


def test_cached_prefix_survives_its_owner_and_is_evicted_deepest_page_first():
    cache = KVCache(1, 4, 2, (1,), (1,))
    assert cache.task_alloc("a", [1, 2, 3, 4, 5])
    cache.task_record_hashes("a", [1, 2, 3, 4, 5])
    assert cache.task_pages("a") == [0, 1, 2]
    cache.task_free("a")
    assert (cache.num_cached_pages, cache.num_free_pages) == (2, 2)  # pages 0 and 1 hold the prefix
    # Two free pages, then one eviction: page 1 (the deeper one) goes; the prefix root stays reusable.
    assert cache.task_alloc("b", [7, 7, 7, 7, 7]) and cache.task_pages("b") == [2, 3, 1]
    assert cache._pool.lookup([1, 2, 3, 4]) == [0] and cache.num_cached_pages == 1
    assert cache.task_alloc("c", [1, 2, 9]) is False  # needs one fresh page besides the hit: none left
    cache.task_free("b")
    assert cache.task_alloc("c", [1, 2, 9])
    assert cache.task_pages("c") == [0, 1] and cache.task_cached("c") == 2
    cache.check_invariants()


def test_reset_prefix_cache_frees_cached_pages_and_uncaches_live_ones():
    cache = KVCache(1, 8, 2, (1,), (1,))
    for task, prompt in (("a", [1, 2, 3, 4, 5]), ("b", [6, 7, 8])):
        assert cache.task_alloc(task, prompt)
        cache.task_record_hashes(task, prompt)
    cache.task_free("a")
    assert (cache.num_used_pages, cache.num_cached_pages) == (2, 2)  # b's pages live, a's prefix cached
    cache.reset_prefix_cache()
    cache.check_invariants()
    assert (cache.num_used_pages, cache.num_cached_pages, cache.num_free_pages) == (2, 0, 6)
    assert cache.task_alloc("c", [1, 2, 3, 4, 5]) and cache.task_cached("c") == 0  # nothing reused
    cache.task_free("b")  # b's page was indexed before the reset: it is freed, not cached
    cache.task_free("c")
    assert (cache.num_used_pages, cache.num_cached_pages, cache.num_free_pages) == (0, 0, 8)
    cache.check_invariants()


def test_failed_alloc_and_extend_change_nothing():
    cache = KVCache(1, 4, 2, (1,), (1,))
    assert cache.task_alloc("a", [1, 2, 3, 4])
    cache.task_record_hashes("a", [1, 2, 3, 4])
    assert cache.task_alloc("b", [5, 6])
    cache.task_free("a")  # two cached pages
    before = _state(cache)
    assert not cache.task_alloc("c", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])  # needs 5 pages, 4 exist
    assert _state(cache) == before and "c" not in cache._table
    assert cache.task_extend("b", 7) and len(cache.task_pages("b")) == 4  # evicts both cached pages
    before = _state(cache)
    assert not cache.task_extend("b", 8)
    assert _state(cache) == before
    assert cache.task_extend("b", 7)  # already covered
    cache.check_invariants()


def test_live_tasks_share_prefix_pages():
    # Defect 2 of the original: a second request sharing a page still in use crashed the loop.
    cache = KVCache(1, 6, 2, (1,), (1,))
    system = [9, 8, 7, 6]
    assert cache.task_alloc("a", [*system, 1])
    cache.task_record_hashes("a", [*system, 1])
    assert cache.task_alloc("b", [*system, 2])
    shared = cache.task_pages("a")[:2]
    assert cache.task_pages("b")[:2] == shared and cache.task_cached("b") == 4
    assert [cache._pool.ref_count(p) for p in shared] == [2, 2]
    cache.task_free("a")
    assert cache.task_alloc("c", [*system, 3]) and cache.task_pages("c")[:2] == shared
    cache.check_invariants()
    cache.task_free("b")
    cache.task_free("c")
    assert cache.num_used_pages == 0 and cache.num_cached_pages == 2
    cache.check_invariants()


def test_user_errors_are_value_errors():
    cache = KVCache(1, 4, 2, (1,), (1,))
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        cache.task_alloc("a", [])
    assert cache.task_alloc("a", [1, 2, 3])
    with pytest.raises(ValueError, match="already holds"):
        cache.task_alloc("a", [1])
    with pytest.raises(ValueError, match="exceed its 4 slots"):
        cache.bind_tasks(["a"], [3], [2])
    with pytest.raises(ValueError, match="differ in length"):
        cache.bind_tasks(["a"], [0, 1], [1])
    with pytest.raises(ValueError, match="k_shape"):
        Storage(1, 4, 2, (), (1,))
    with pytest.raises(ValueError, match="page_size"):
        KVCache(1, 4, 0, (1,), (1,))
    cache.check_invariants()


def _ragged(rows, shape, generator):
    # Random entries per row, right-padded with large values that must never reach the cache.
    width = max(rows)
    data = torch.full((len(rows), width, *shape), 1e6)
    for b, n in enumerate(rows):
        data[b, :n] = torch.randn(n, *shape, generator=generator)
    return data


@pytest.mark.parametrize("config", [GQA, MLA], ids=["gqa", "mla"])
def test_view_write_gather_round_trip_matches_contiguous_reference(config, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    cache = KVCache.from_config(config, num_pages=16, page_size=4, device=device)
    k_shape, v_shape = cache_entry_shapes(config)
    tasks = ["a", "b", "c"]
    prompts = [5, 9, 2]
    for task, n in zip(tasks, prompts, strict=True):
        assert cache.task_alloc(task, list(range(n)))
    ref = {(t, layer): ([], []) for t in tasks for layer in range(config.n_layers)}
    lengths = [0, 0, 0]
    # Prefill (ragged), then steps where rows bring different counts (a prefill chunk, a decode, nothing).
    for new in ([5, 9, 2], [1, 1, 1], [3, 1, 0], [1, 0, 1], [1, 1, 1]):
        for b, task in enumerate(tasks):
            assert cache.task_extend(task, lengths[b] + new[b] - 1) or new[b] == 0
        view = cache.bind_tasks(tasks, lengths, new)
        assert isinstance(view, KVCacheView) and isinstance(view, KvcacheView)
        lengths = [n + m for n, m in zip(lengths, new, strict=True)]
        assert view.seq_lens.tolist() == lengths
        for layer in range(config.n_layers):
            k, v = _ragged(new, k_shape, gen), _ragged(new, v_shape, gen)
            view.write(layer, k.to(device), v.to(device))
            for b, task in enumerate(tasks):
                ref[task, layer][0].append(k[b, : new[b]])
                ref[task, layer][1].append(v[b, : new[b]])
            got_k, got_v = view.gather(layer)
            width = max(lengths)
            assert got_k.shape == (3, width, *k_shape) and got_v.shape == (3, width, *v_shape)
            for b, task in enumerate(tasks):
                want_k, want_v = torch.cat(ref[task, layer][0]), torch.cat(ref[task, layer][1])
                assert torch.equal(got_k[b, : lengths[b]].cpu(), want_k)
                assert torch.equal(got_v[b, : lengths[b]].cpu(), want_v)
                # Past a row's length: the scratch page (padding lands there), finite for attention's mask.
                assert torch.isfinite(got_k[b, lengths[b] :]).all() and torch.isfinite(got_v[b, lengths[b] :]).all()
    cache.check_invariants()


def test_bind_with_total_len_only_writes_each_row_up_to_it():
    # The architecture document's form, bind(page_table, total_len): every row writes the step's whole width.
    cache = KVCache(1, 8, 4, (1,), (1,))
    for task in ("a", "b"):
        assert cache.task_alloc(task, [1, 2, 3, 4, 5])
    table = cache.make_table_tensor(["a", "b"])
    prompt = torch.arange(10, dtype=torch.float32).view(2, 5, 1)
    view = cache.bind(table, 5)
    view.write(0, prompt, -prompt)
    assert view.seq_lens.tolist() == [5, 5] and view.start_pos.tolist() == [0, 0]
    assert torch.equal(view.gather(0)[0], prompt)
    for task in ("a", "b"):
        assert cache.task_extend(task, 5)
    step = torch.tensor([[[100.0]], [[200.0]]])
    view = cache.bind(cache.make_table_tensor(["a", "b"]), torch.tensor([6, 6]))  # one token each, at position 5
    with pytest.raises(RuntimeError, match="first write"):
        _ = view.start_pos
    view.write(0, step, step)
    keys, values = view.gather(0)
    assert torch.equal(keys, torch.cat([prompt, step], dim=1)) and torch.equal(values[:, 5], step[:, 0])
    assert view.start_pos.tolist() == [5, 5]


def test_record_hashes_takes_prompt_ids_by_name():
    cache = KVCache(1, 8, 4, (1,), (1,))
    assert cache.task_alloc("a", list(range(9)))
    cache.task_record_hashes("a", prompt_ids=list(range(9)), start_logical_page=1)  # page 0 is not indexed
    assert cache.task_alloc("b", list(range(9))) and cache.task_cached("b") == 0
    cache.task_record_hashes(task_id="a", prompt_ids=list(range(9)))
    assert cache.task_alloc("c", list(range(9))) and cache.task_cached("c") == 8
    cache.check_invariants()


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("config", [GQA, MLA], ids=["gqa", "mla"])
def test_view_round_trip_on_cuda(config):
    test_view_write_gather_round_trip_matches_contiguous_reference(config, device="cuda")


def test_storage_write_and_gather_by_page_table():
    storage = Storage(2, 4, 2, (3,), (1,))
    table = torch.tensor([[2, 0, -1], [1, 3, -1]])
    k = torch.arange(2 * 3 * 3, dtype=torch.float32).view(2, 3, 3)
    v = -torch.arange(6, dtype=torch.float32).view(2, 3, 1)
    storage.write(1, table, 1, k, v)  # positions 1..3 of both rows
    # Row 0: position 1 in page 2 offset 1, positions 2, 3 in page 0.
    assert torch.equal(storage.k_cache[1, 2, 1], k[0, 0]) and torch.equal(storage.k_cache[1, 0], k[0, 1:])
    got_k, got_v = storage.gather(1, table, 4)
    assert torch.equal(got_k[:, 1:], k) and torch.equal(got_v[:, 1:], v)
    assert not got_k[:, 0].any()  # position 0 was never written
    assert not storage.k_cache[0].any()  # other layers untouched
    lens = torch.tensor([2, 4])
    got_k, _ = storage.gather(1, table, lens)
    assert torch.equal(got_k[0, 1], k[0, 0]) and not got_k[0, 2:].any()
    # Row 1 writes only its first entry; the rest goes to the scratch page.
    storage.write(0, table, torch.tensor([0, 0]), k, v, lengths=torch.tensor([3, 1]))
    got_k, _ = storage.gather(0, table, torch.tensor([3, 3]))
    assert torch.equal(got_k[0], k[0]) and torch.equal(got_k[1, 0], k[1, 0]) and not got_k[1, 1:].any()


def _code(tokens):
    # A number that identifies the whole token prefix (exact in float32): what position len-1's entry holds.
    h = 0
    for t in tokens:
        h = (h * 31 + t + 1) % 1_000_003
    return float(h)


def _stress_step(cache, rng, live, stats):
    batch = rng.sample(sorted(live), min(len(live), rng.randint(1, 3)))
    rows = []
    for task in batch:
        info = live[task]
        if info["written"] >= len(info["tokens"]):
            info["tokens"].append(rng.randrange(3))  # decode one generated token
        n = min(len(info["tokens"]) - info["written"], rng.randint(1, 5))  # prefill chunk or decode
        if not cache.task_extend(task, info["written"] + n - 1):
            stats["preempted"] += 1
            cache.task_free(task)
            del live[task]
            continue
        rows.append((task, n))
    if not rows:
        return
    view = cache.bind_tasks([t for t, _ in rows], [live[t]["written"] for t, _ in rows], [n for _, n in rows])
    width = max(n for _, n in rows)
    k = torch.full((len(rows), width, 2), -7.0)
    for b, (task, n) in enumerate(rows):
        start, tokens = live[task]["written"], live[task]["tokens"]
        k[b, :n, 0] = torch.tensor([_code(tokens[: p + 1]) for p in range(start, start + n)])
        k[b, :n, 1] = torch.arange(start, start + n, dtype=torch.float32)
    for layer in range(2):
        view.write(layer, k + layer, -k[..., :1])
    for task, n in rows:
        live[task]["written"] += n
    for layer in range(2):
        got_k, got_v = view.gather(layer)
        for b, (task, _) in enumerate(rows):
            info = live[task]
            want = [_code(info["tokens"][: p + 1]) for p in range(info["written"])]
            assert got_k[b, : info["written"], 0].tolist() == [w + layer for w in want]
            assert got_v[b, : info["written"], 0].tolist() == [-w for w in want]
    for task, _ in rows:  # publish every full page written so far, generated tokens included
        cache.task_record_hashes(task, live[task]["tokens"][: live[task]["written"]])


@pytest.mark.parametrize("seed", range(4))
def test_randomized_stress_keeps_invariants_and_frees_everything(seed):
    rng = random.Random(seed)
    # Two-token pages over a 3-token alphabet: the same page content recurs under many prefixes and at
    # many positions, which is what an inexact prefix index would get wrong.
    cache = KVCache(2, 10, 2, (2,), (1,))
    bases = [[rng.randrange(3) for _ in range(12)] for _ in range(3)]
    live, stats = {}, {"hits": 0, "refused": 0, "preempted": 0}
    for step in range(600):
        op = rng.random()
        if op < 0.3:
            prompt = rng.choice(bases)[: rng.randint(0, 12)] + [rng.randrange(3) for _ in range(rng.randint(0, 4))]
            prompt = prompt or [0]
            before = _state(cache)
            task = f"t{step}"
            if cache.task_alloc(task, prompt):
                cached = cache.task_cached(task)
                assert cached % cache.page_size == 0 and cached < len(prompt)
                stats["hits"] += cached
                live[task] = {"tokens": list(prompt), "written": cached}
                # Reused pages must hold exactly this prompt's prefix.
                if cached:
                    got_k, _ = cache.bind_tasks([task], [cached], [0]).gather(0)
                    assert got_k[0, :, 0].tolist() == [_code(prompt[: p + 1]) for p in range(cached)]
            else:
                stats["refused"] += 1
                assert _state(cache) == before
        elif op < 0.8 and live:
            _stress_step(cache, rng, live, stats)
        elif live:
            task = rng.choice(sorted(live))
            cache.task_free(task)
            del live[task]
        cache.check_invariants()
    for task in list(live):
        cache.task_free(task)
    cache.check_invariants()
    assert cache.num_used_pages == 0
    assert cache.num_free_pages + cache.num_cached_pages == cache.num_pages
    # The scenario really exercised prefix reuse, refusals and pressure on running tasks.
    assert stats["hits"] > 0 and stats["refused"] > 0 and stats["preempted"] > 0, stats
