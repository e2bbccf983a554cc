"""The in-place paged attention kernels (decodes: `PagedRows`, prefill chunks: `PagedChunks`) against a float64
gather + softmax reference, their guards, their build cache, and `KvcacheView.attend` (the engine's
greedy-vs-naive test runs every step through them end to end)."""

import ctypes
import platform
import shutil

import pytest
import torch

import astrai.inference.cache.paged_attention as pa
from astrai.config import AutoRegressiveLMConfig
from astrai.inference.cache import KVCache
from astrai.inference.cache.view import KvcacheView
from astrai.model.sdpa import build_attention_mask, sdpa

HAS_COMPILER = platform.system() == "Linux" and any(shutil.which(c) for c in ("cc", "gcc"))
pytestmark = pytest.mark.skipif(not HAS_COMPILER, reason="the kernel is built with a C compiler on Linux")


def _reference(q, k_cache, v_cache, page_table, seq_lens, scale):
    """Float64: gather each row's positions through its page table, softmax(q k^T * scale) v per head."""
    B, H, d = q.shape
    page_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    flat_k, flat_v = k_cache.double().reshape(-1, Hkv, d), v_cache.double().reshape(-1, Hkv, d)
    out = torch.zeros(B, H, d, dtype=torch.float64)
    for b in range(B):
        n = int(seq_lens[b])
        if n == 0:
            continue
        slots = torch.tensor([int(page_table[b, t // page_size]) * page_size + t % page_size for t in range(n)])
        k = flat_k[slots].repeat_interleave(H // Hkv, dim=1)  # (n, H, d)
        v = flat_v[slots].repeat_interleave(H // Hkv, dim=1)
        probs = (torch.einsum("hd,nhd->hn", q[b].double(), k) * scale).softmax(-1)
        out[b] = torch.einsum("hn,nhd->hd", probs, v)
    return out


def _case(B, H, Hkv, d, page_size, lens, dtype, seed=0):
    """Random pages for ragged rows, scattered over a cache twice as large as needed (plus a spare page)."""
    gen = torch.Generator().manual_seed(seed)
    per_row = [-(-n // page_size) for n in lens]
    num_pages = 2 * sum(per_row) + 1
    k_cache = torch.randn(num_pages, page_size, Hkv, d, generator=gen).to(dtype)
    v_cache = torch.randn(num_pages, page_size, Hkv, d, generator=gen).to(dtype)
    order = torch.randperm(num_pages, generator=gen)
    table = torch.full((B, max(max(per_row), 1)), -1, dtype=torch.int64)
    used = 0
    for b, n in enumerate(per_row):
        table[b, :n] = order[used : used + n]
        used += n
    q = torch.randn(B, H, d, generator=gen).to(dtype)
    return q, k_cache, v_cache, table, torch.tensor(lens, dtype=torch.int64)


def test_the_kernel_builds_here():
    assert pa.available(), "a C compiler is on PATH, so the kernel must build (see the warning for why not)"


@pytest.mark.parametrize(
    "B, H, Hkv, d, page_size, lens",
    [
        (1, 6, 2, 64, 16, [37]),  # one row: KV heads split over threads
        (5, 6, 2, 64, 16, [1, 16, 17, 100, 250]),  # ragged, block and page edges
        (3, 8, 2, 128, 8, [9, 33, 64]),  # the other specialised head size, pages smaller than a block
        (4, 4, 4, 80, 5, [3, 21, 48, 7]),  # generic head size, no grouping, pages not dividing a block
        (2, 32, 4, 32, 16, [40, 19]),  # more query heads than one pass takes
        (3, 2, 1, 16, 16, [0, 5, 16]),  # a row with no cached position gives zeros
        (2, 4, 2, 64, 16, [30, 70]),  # pairs of query heads per KV head
        (2, 24, 8, 16, 8, [5, 40]),  # a pass of 16 query heads ends inside a KV head's group of 3
    ],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_float32_matches_the_float64_reference(B, H, Hkv, d, page_size, lens, threads):
    q, k_cache, v_cache, table, seq_lens = _case(B, H, Hkv, d, page_size, lens, torch.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = pa.paged_decode_attention(q, k_cache, v_cache, table, seq_lens, d**-0.5)
    finally:
        torch.set_num_threads(before)
    assert out.dtype == torch.float32 and out.shape == (B, H, d)
    torch.testing.assert_close(out.double(), _reference(q, k_cache, v_cache, table, seq_lens, d**-0.5),
                               atol=2e-6, rtol=2e-5)  # fmt: skip


@pytest.mark.parametrize("d", [48, 64, 128])  # an odd number of 16-wide chunks: no bfloat16 pairs of them
def test_bfloat16_accumulates_in_float32(d):
    q, k_cache, v_cache, table, seq_lens = _case(6, 6, 2, d, 16, [5, 60, 120, 300, 17, 1], torch.bfloat16)
    out = pa.paged_decode_attention(q, k_cache, v_cache, table, seq_lens, 0.125)
    expected = _reference(q, k_cache, v_cache, table, seq_lens, 0.125)
    assert out.dtype == torch.bfloat16
    # Only the final rounding to bfloat16 separates it from float64 on the same (bfloat16) inputs.
    torch.testing.assert_close(out.double(), expected, atol=0, rtol=2**-8)


def test_an_empty_batch_gives_an_empty_result():
    q, k_cache, v_cache, table, seq_lens = _case(1, 4, 2, 16, 4, [3], torch.float32)
    out = pa.paged_decode_attention(q[:0], k_cache, v_cache, table[:0], seq_lens[:0], 0.25)
    assert out.shape == (0, 4, 16)


@pytest.mark.parametrize("dtype, d", [(torch.float32, 16), (torch.bfloat16, 16), (torch.bfloat16, 64)])
def test_non_finite_scores_give_nan_as_torch_does(dtype, d):  # bfloat16 at 64: scores by pairs
    q, k_cache, v_cache, table, seq_lens = _case(2, 4, 2, d, 16, [40, 40], dtype)
    q[0, 0, 3] = float("nan")  # every score of row 0, head 0
    k_cache[table[1, 1], 1, 0, 2] = float("nan")  # one key (position 17) of row 1, KV head 0 (query heads 0, 1)
    q[1, 3] = 1e30  # row 1, head 3: scores overflow to +-inf
    out = pa.paged_decode_attention(q, k_cache, v_cache, table, seq_lens, 0.25)
    reference = _reference(q, k_cache, v_cache, table, seq_lens, 0.25)
    assert torch.equal(out.isnan(), reference.isnan()) and out[0, 0].isnan().all() and out[1, :2].isnan().all()
    finite = ~reference.isnan()
    tolerance = dict(atol=2e-6, rtol=2e-5) if dtype == torch.float32 else dict(atol=2**-20, rtol=2**-8)
    torch.testing.assert_close(out.double()[finite], reference[finite], **tolerance)


def test_a_page_outside_the_cache_is_refused_not_read():
    q, k_cache, v_cache, table, seq_lens = _case(2, 4, 2, 16, 4, [6, 3], torch.float32)
    for bad in (k_cache.shape[0], -1):
        broken = table.clone()
        broken[0, 1] = bad
        with pytest.raises(RuntimeError, match="page index lies outside the cache"):
            pa.paged_decode_attention(q, k_cache, v_cache, broken, seq_lens, 0.25)


def test_bad_arguments_raise_value_error():
    q, k_cache, v_cache, table, seq_lens = _case(2, 4, 2, 16, 4, [6, 3], torch.float32)
    with pytest.raises(ValueError, match="dtypes"):
        pa.paged_decode_attention(q.double(), k_cache.double(), v_cache.double(), table, seq_lens, 0.25)
    with pytest.raises(ValueError, match="seq_lens"):
        pa.paged_decode_attention(q, k_cache, v_cache, table, seq_lens + 100, 0.25)  # longer than the table
    with pytest.raises(ValueError, match="seq_lens"):
        pa.paged_decode_attention(q, k_cache, v_cache, table, seq_lens - 5, 0.25)  # negative
    with pytest.raises(ValueError, match="seq_lens"):
        pa.paged_decode_attention(q, k_cache, v_cache, table, seq_lens[:1], 0.25)  # fewer lengths than rows
    with pytest.raises(ValueError, match="page_table"):
        pa.paged_decode_attention(q, k_cache, v_cache, table[0], seq_lens, 0.25)
    with pytest.raises(ValueError, match="page_table: the kernel reads CPU memory only"):
        pa.paged_decode_attention(q, k_cache, v_cache, table.to("meta"), seq_lens, 0.25)
    with pytest.raises(ValueError, match="multiple of 16"):
        pa.paged_decode_attention(q[..., :8], k_cache[..., :8], v_cache[..., :8], table, seq_lens, 0.25)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        pa.paged_decode_attention(q[:, :3], k_cache, v_cache, table, seq_lens, 0.25)
    with pytest.raises(ValueError, match="k_cache"):
        pa.paged_decode_attention(q, k_cache[0, 0], v_cache, table, seq_lens, 0.25)
    assert pa.supports_cache(k_cache)
    assert not pa.supports_cache(k_cache.half())  # float16: the caller gathers
    assert not pa.supports_cache(k_cache[..., :8])


def test_paged_rows_are_checked_once_and_kept_apart_from_the_caller():
    q, k_cache, v_cache, table, seq_lens = _case(2, 4, 2, 16, 4, [6, 3], torch.float32)
    rows = pa.PagedRows(table, seq_lens, page_size=4)
    expected = rows.attend(q, k_cache, v_cache, 0.25)
    seq_lens[0], table[1, 0] = 100, k_cache.shape[0]  # edited after the check: the rows keep their own copy
    assert torch.equal(rows.attend(q, k_cache, v_cache, 0.25), expected)
    with pytest.raises(ValueError, match="need \\(B=2, H, d\\)"):
        rows.attend(q[:1], k_cache, v_cache, 0.25)  # another number of rows
    with pytest.raises(ValueError, match="checked for 4"):
        rows.attend(q, k_cache.view(-1, 2, 2, 16), v_cache.view(-1, 2, 2, 16), 0.25)  # pages of another size


def _decode_step_attend(step, layer, q, k, v, out, scale):
    """paged_attention.c's decode_step_attend through its address, as a C caller (the model's layers) calls it."""
    signature = ctypes.CFUNCTYPE(ctypes.c_int, *pa._library().decode_step_attend.argtypes)
    k_stride, v_stride = k.stride(0), v.stride(0)
    return signature(step.function)(step.context, layer, q.data_ptr(), q.shape[1], k.data_ptr(), k_stride,
                                    v.data_ptr(), v_stride, out.data_ptr(), scale)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decode_step_bound_for_c_stores_and_attends_each_layer(dtype):
    """`PagedRows.bind_layers`: one layer's call stores each row's new entry at its slot (from rows of a wider
    tensor, as views of a q/k/v product) and attends, equal to the store then `PagedRows.attend`."""
    layers, B, H, Hkv, d, ps = 3, 4, 6, 2, 64, 16
    lens = [5, 17, 40, 1]
    q, k_pages, v_pages, table, seq_lens = _case(B, H, Hkv, d, ps, lens, dtype)
    k_caches = torch.stack([k_pages + i for i in range(layers)])  # (layers, pages, ps, Hkv, d)
    v_caches = torch.stack([v_pages - i for i in range(layers)])
    slots = torch.tensor([int(table[b, (n - 1) // ps]) * ps + (n - 1) % ps for b, n in enumerate(lens)])
    qkv = torch.randn(B, (H + 2 * Hkv) * d).to(dtype)
    k, v = qkv[:, H * d : (H + Hkv) * d], qkv[:, (H + Hkv) * d :]  # rows (H + 2 Hkv) d apart
    rows = pa.PagedRows(table, seq_lens, ps)
    expected_k, expected_v = k_caches.clone(), v_caches.clone()
    expected_k[2].view(-1, Hkv, d)[slots] = k.reshape(B, Hkv, d)
    expected_v[2].view(-1, Hkv, d)[slots] = v.reshape(B, Hkv, d)
    expected = rows.attend(q, expected_k[2], expected_v[2], 0.125)
    step = rows.bind_layers(k_caches, v_caches, slots)
    out = torch.empty_like(q)
    assert _decode_step_attend(step, 2, q, k, v, out, 0.125) == 0
    assert torch.equal(out, expected)
    assert torch.equal(k_caches, expected_k) and torch.equal(v_caches, expected_v)  # layers 0 and 1 untouched


def test_a_decode_step_bound_for_c_refuses_bad_slots_heads_and_caches():
    q, k_pages, v_pages, table, seq_lens = _case(2, 4, 2, 16, 4, [3, 6], torch.float32)
    caches = torch.stack([k_pages, k_pages]), torch.stack([v_pages, v_pages])
    rows = pa.PagedRows(table, seq_lens, 4)
    entries = torch.zeros(2, 32)
    before = [c.clone() for c in caches]
    for slot in (-1, k_pages.shape[0] * 4):  # before the first slot, past the last (the spare page's included)
        step = rows.bind_layers(*caches, torch.tensor([0, slot]))
        assert _decode_step_attend(step, 0, q, entries, entries, torch.empty_like(q), 0.5) == -1
    step = rows.bind_layers(*caches, torch.tensor([0, 1]))
    assert _decode_step_attend(step, 0, q[:, :3], entries, entries, torch.empty_like(q), 0.5) == -5  # 3 heads, 2 KV
    for layer in (-1, 2):  # the caches hold layers 0 and 1
        assert _decode_step_attend(step, layer, q, entries, entries, torch.empty_like(q), 0.5) == -6
    assert (step.rows, step.n_layers, step.n_kv_heads, step.head_dim, step.dtype) == (2, 2, 2, 16, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(caches, before, strict=True))  # nothing written
    with pytest.raises(ValueError, match="slots"):
        rows.bind_layers(*caches, torch.tensor([0]))
    with pytest.raises(ValueError, match="k_caches"):
        rows.bind_layers(k_pages, v_pages, torch.tensor([0, 1]))  # one layer's pages, not every layer's
    with pytest.raises(ValueError, match="k_caches"):
        rows.bind_layers(caches[0].transpose(3, 4), caches[1].transpose(3, 4), torch.tensor([0, 1]))


def test_without_the_kernel_available_says_so(monkeypatch):
    """Turned off, or a build that fails: `available()` is False with a warning naming this kernel, and the
    engine gathers instead (the build cache itself: astrai-model's test_native.py)."""
    pa._library.cache_clear()
    try:
        monkeypatch.setenv("ASTRAI_NATIVE_KERNELS", "0")
        assert not pa.available()
        pa._library.cache_clear()
        monkeypatch.delenv("ASTRAI_NATIVE_KERNELS")
        monkeypatch.setenv("CC", "/bin/false")  # a compiler that fails: a warning, then the gather path
        with pytest.warns(UserWarning, match="paged attention kernel not built"):
            assert not pa.available()
        assert not pa.available()  # not retried
    finally:
        pa._library.cache_clear()


def _chunk_case(H, Hkv, d, page_size, chunks, dtype, seed=0):
    """Chunks (start, count) of one row each, their queries in q one after another with a spare row before
    each chunk (a decode's place in a packed step, which the chunk kernel must leave alone)."""
    lens = [start + count for start, count in chunks]
    _, k_cache, v_cache, table, _ = _case(len(chunks), H, Hkv, d, page_size, lens, dtype, seed)
    counts = torch.tensor([count for _, count in chunks])
    firsts = torch.cumsum(counts + 1, 0) - counts  # a spare row before each chunk
    q = torch.randn(int(firsts[-1] + counts[-1]), H, d, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    starts = torch.tensor([start for start, _ in chunks])
    return q, k_cache, v_cache, table, starts, counts, firsts


def _chunk_reference(q, k_cache, v_cache, table, starts, counts, firsts, scale):
    """Each query of chunk c, at position starts[c] + i, as a decode over positions 0 .. its own."""
    rows = torch.cat([torch.arange(f, f + n) for f, n in zip(firsts.tolist(), counts.tolist())])
    chunk_of = torch.repeat_interleave(torch.arange(len(counts)), counts)
    positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts.tolist(), counts.tolist())])
    return rows, _reference(q[rows], k_cache, v_cache, table[chunk_of], positions + 1, scale)


def _chunk_attention(q, k_cache, v_cache, table, starts, counts, firsts, scale, fill=7.0):
    chunks = pa.PagedChunks(table, starts, counts, firsts, page_size=k_cache.shape[1])
    out = torch.full_like(q, fill)
    chunks.attend(q, k_cache, v_cache, scale, out)
    return out


@pytest.mark.parametrize(
    "H, Hkv, d, page_size, chunks",
    [
        (6, 2, 64, 16, [(0, 37), (100, 20), (5, 2)]),  # first and continued chunks, 3 query heads per KV head
        (4, 4, 80, 5, [(0, 1), (3, 17), (40, 33)]),  # generic head size, no grouping, pages not dividing a block
        (8, 2, 128, 8, [(0, 64), (17, 5)]),  # the other specialised head size, 4 query heads per KV head
        (32, 4, 32, 16, [(0, 9), (200, 40)]),  # 8 query heads per KV head: lanes of one token or two
        (2, 1, 16, 16, [(0, 300)]),  # a long first chunk, 16 of its tokens' pairs per lane block
    ],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_chunks_match_the_float64_reference(H, Hkv, d, page_size, chunks, threads):
    case = _chunk_case(H, Hkv, d, page_size, chunks, torch.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = _chunk_attention(*case, d**-0.5)
    finally:
        torch.set_num_threads(before)
    rows, expected = _chunk_reference(*case, d**-0.5)
    torch.testing.assert_close(out[rows].double(), expected, atol=2e-6, rtol=2e-5)
    spare = torch.ones(out.shape[0], dtype=torch.bool)
    spare[rows] = False
    assert spare.sum() == len(chunks) and (out[spare] == 7.0).all()  # rows outside the chunks left as they were


@pytest.mark.parametrize(
    "H, Hkv, d, page_size",
    [(6, 2, 64, 16), (4, 4, 16, 8), (8, 2, 128, 5), (3, 1, 48, 16)],  # bf16 pairs of every head size served
)
def test_chunks_in_bfloat16_accumulate_in_float32(H, Hkv, d, page_size):
    case = _chunk_case(H, Hkv, d, page_size, [(0, 50), (120, 31), (7, 3)], torch.bfloat16)
    out = _chunk_attention(*case, d**-0.5)
    rows, expected = _chunk_reference(*case, d**-0.5)
    assert out.dtype == torch.bfloat16
    # The final rounding, and float32 sums (about 2**-24 of the values' size, seen where the outputs nearly cancel;
    # sums in bfloat16 would be off by about 2**-8 of it).
    torch.testing.assert_close(out[rows].double(), expected, atol=2**-20, rtol=2**-8)


@pytest.mark.parametrize("dtype, d", [(torch.float32, 16), (torch.bfloat16, 16), (torch.bfloat16, 64)])
def test_chunks_propagate_nan_and_never_see_later_positions(dtype, d):  # bfloat16: scores by pairs
    q, k_cache, v_cache, table, starts, counts, firsts = _chunk_case(4, 2, d, 16, [(0, 20)], dtype)
    k_cache[table[0, 1], 2, 1] = float("nan")  # position 18, KV head 1: only the chunk's last 2 queries see it
    v_cache[table[0, 1], 1, 0, 4] = float("inf")  # position 17, KV head 0: the last 3 (inf - inf: NaN)
    v_cache[table[0, 1], 3, 0, 5] = float("nan")  # position 19, KV head 0: the last one
    q[firsts[0] + 5, 0, 3] = float("nan")  # every score of query 5, head 0
    out = _chunk_attention(q, k_cache, v_cache, table, starts, counts, firsts, 0.25)
    rows, expected = _chunk_reference(q, k_cache, v_cache, table, starts, counts, firsts, 0.25)
    got = out[rows].double()
    assert torch.equal(got.isnan(), expected.isnan()) and torch.equal(got.isinf(), expected.isinf())
    assert got[18:, 2:].isnan().all() and not got[:18, 2:].isnan().any() and got[5, 0].isnan().all()
    assert not got[:17, 1].isnan().any() and not got[:17, 1].isinf().any()  # queries before 17: finite
    finite = ~expected.isnan()
    tolerance = dict(atol=2e-6, rtol=2e-5) if dtype == torch.float32 else dict(atol=2**-20, rtol=2**-8)
    torch.testing.assert_close(got[finite], expected[finite], **tolerance)


def test_chunks_refuse_a_page_outside_the_cache_and_bad_arguments():
    q, k_cache, v_cache, table, starts, counts, firsts = _chunk_case(4, 2, 16, 4, [(0, 6), (2, 3)], torch.float32)
    for bad in (k_cache.shape[0], -1):
        broken = table.clone()
        broken[0, 1] = bad
        with pytest.raises(RuntimeError, match="page index lies outside the cache"):
            _chunk_attention(q, k_cache, v_cache, broken, starts, counts, firsts, 0.25)
    with pytest.raises(ValueError, match="counts"):
        pa.PagedChunks(table, starts, counts - 3, firsts, 4)  # a chunk without queries
    with pytest.raises(ValueError, match="starts"):
        pa.PagedChunks(table, starts - 1, counts, firsts, 4)  # before position 0
    with pytest.raises(ValueError, match="within 2 pages x 4"):
        pa.PagedChunks(table, starts + 3, counts, firsts, 4)  # past the row's pages
    with pytest.raises(ValueError, match="firsts"):
        pa.PagedChunks(table, starts, counts, firsts[:1], 4)
    with pytest.raises(ValueError, match="firsts"):
        pa.PagedChunks(table, starts, counts, torch.tensor([1, -2]), 4)
    huge = torch.tensor([2**63 - 1, 0])  # sums that wrap around in int64 must not slip past the checks
    chunks = pa.PagedChunks(table, starts, counts, huge, 4)
    with pytest.raises(ValueError, match="reach row"):
        chunks.attend(q, k_cache, v_cache, 0.25, torch.empty_like(q))
    with pytest.raises(ValueError, match="within 2 pages x 4"):
        pa.PagedChunks(table, huge, counts, firsts, 4)
    with pytest.raises(ValueError, match="page_table"):
        pa.PagedChunks(table.int(), starts, counts, firsts, 4)
    chunks = pa.PagedChunks(table, starts, counts, firsts, 4)
    out = torch.empty_like(q)
    with pytest.raises(ValueError, match="reach row"):
        chunks.attend(q[:-1], k_cache, v_cache, 0.25, out[:-1])  # q shorter than the chunks
    with pytest.raises(ValueError, match="out"):
        chunks.attend(q, k_cache, v_cache, 0.25, out.double())
    with pytest.raises(ValueError, match="dtypes"):
        chunks.attend(q.double(), k_cache.double(), v_cache.double(), 0.25, out.double())
    with pytest.raises(ValueError, match="checked for 4"):
        chunks.attend(q, k_cache.view(-1, 2, 2, 16), v_cache.view(-1, 2, 2, 16), 0.25, out)
    expected = _chunk_attention(q, k_cache, v_cache, table, starts, counts, firsts, 0.25)
    starts[1], table[1, 0] = 100, -1  # edited after the check: the chunks keep their own copies
    chunks.attend(q, k_cache, v_cache, 0.25, out)
    rows = torch.cat([torch.arange(1, 7), torch.arange(8, 11)])
    assert torch.equal(out[rows], expected[rows])


def test_view_attend_equals_gather_then_sdpa():
    """Through a real KVCache: `attend` (in place) against `gather` + the model's SDPA on the same step."""
    config = AutoRegressiveLMConfig(vocab_size=32, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, dim_ffn=64,
                                    max_len=256)  # fmt: skip
    cache = KVCache.from_config(config, num_pages=40, page_size=8, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    lens = [13, 1, 70]
    for i, n in enumerate(lens):  # prefill each task, then bind one decode step for all of them
        assert cache.task_alloc(f"t{i}", list(range(100 * i, 100 * i + n + 1)))
        prefill = cache.bind_tasks([f"t{i}"], [0], [n])
        for layer in range(2):
            prefill.write(layer, torch.randn(1, n, 2, 16, generator=gen), torch.randn(1, n, 2, 16, generator=gen))
    step = cache.bind_tasks([f"t{i}" for i in range(3)], lens, [1, 1, 1])
    q = torch.randn(3, 4, 16, generator=gen)
    for layer in range(2):
        k_new, v_new = torch.randn(3, 1, 2, 16, generator=gen), torch.randn(3, 1, 2, 16, generator=gen)
        step.write(layer, k_new, v_new)
        in_place = step.attend(layer, q, k_new[:, 0], v_new[:, 0], 0.25)
        k, v = step.gather(layer)  # (B, S, Hkv, d)
        mask = (torch.arange(k.shape[1])[None, :] < step.seq_lens[:, None])[:, None, None, :]
        gathered = sdpa(q[:, :, None], k.transpose(1, 2), v.transpose(1, 2), mask, True, scale=0.25)[:, :, 0]
        torch.testing.assert_close(in_place, gathered, atol=2e-6, rtol=2e-5)
    half_cache = KVCache.from_config(config, num_pages=4, page_size=8, dtype=torch.float16)
    assert half_cache.task_alloc("t", [1, 2]) and not half_cache.packs_steps
    half = half_cache.bind_tasks(["t"], [1], [1])
    assert half.attend(0, q[:1].half(), k_new[:1, 0].half(), v_new[:1, 0].half(), 0.25) is None  # the model gathers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_step_attends_like_the_padded_step(dtype):
    """One packed step (decodes and first chunks of 1 token through `PagedRows`; continued chunks of 9, 15, 16
    and 17 tokens and first chunks of 11 and 30 through `PagedChunks`) against the padded step of the same
    tokens on a twin cache: the same cache contents afterwards, and every query's attention equal to gather +
    the model's own mask + SDPA."""
    config = AutoRegressiveLMConfig(vocab_size=32, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, dim_ffn=64,
                                    max_len=256)  # fmt: skip
    rows = [(13, 1), (0, 11), (20, 9), (1, 1), (0, 1), (70, 1), (0, 30), (24, 17), (30, 15), (33, 16)]
    caches = [KVCache.from_config(config, num_pages=80, page_size=8, dtype=dtype) for _ in range(2)]
    gen = torch.Generator().manual_seed(2)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    history = [(randn(2, start, 2, 16), randn(2, start, 2, 16)) for start, _ in rows]
    ids = [f"t{i}" for i in range(len(rows))]
    for cache in caches:
        for i, (start, n) in enumerate(rows):
            assert cache.task_alloc(ids[i], list(range(100 * i, 100 * i + start + n)))
            if start:
                earlier = cache.bind_tasks([ids[i]], [0], [start])
                for layer in range(2):
                    earlier.write(layer, history[i][0][layer][None], history[i][1][layer][None])
    starts, counts = [s for s, _ in rows], [n for _, n in rows]
    N, T = sum(counts), max(counts)
    packed = caches[0].bind_tasks(ids, starts, counts, packed=True)
    padded = caches[1].bind_tasks(ids, starts, counts)
    assert packed.packed and not padded.packed
    real = torch.arange(T)[None, :] < torch.tensor(counts)[:, None]  # (B, T) real tokens of the padded step
    positions = torch.tensor(starts)[:, None] + torch.arange(T)[None, :]
    mask = build_attention_mask(real, positions, padded.seq_lens)
    for layer in range(2):
        q, k, v = randn(N, 4, 16), randn(1, N, 2, 16), randn(1, N, 2, 16)
        packed.write(layer, k, v)
        got = packed.attend(layer, q, k[0], v[0], 0.25)  # (N, H, d)

        def pad(x):  # (N, ...) row after row -> (B, T, ...) right-padded
            out = x.new_zeros(len(rows), T, *x.shape[1:])
            out[real] = x
            return out

        padded.write(layer, pad(k[0]), pad(v[0]))
        keys, values = padded.gather(layer)
        want = sdpa(pad(q).transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), mask, True, scale=0.25)
        tol = dict(atol=2e-6, rtol=2e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)  # bf16 rounding
        torch.testing.assert_close(got, want.transpose(1, 2)[real], **tol)
        for table in ("k_cache", "v_cache"):
            stored = [getattr(c._storage, table)[layer, :-1] for c in caches]  # the scratch page aside
            torch.testing.assert_close(stored[0], stored[1], atol=0, rtol=0)


def test_a_packed_step_needs_tokens_and_the_kernel(monkeypatch):
    config = AutoRegressiveLMConfig(vocab_size=32, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, dim_ffn=64,
                                    max_len=64)  # fmt: skip
    cache = KVCache.from_config(config, num_pages=4, page_size=8, dtype=torch.float32)
    assert cache.packs_steps
    assert cache.task_alloc("t", [1, 2, 3])
    with pytest.raises(ValueError, match="every row brings at least one token"):
        cache.bind_tasks(["t"], [0], [0], packed=True)
    table = cache.make_table_tensor(["t"])  # one page of 8 positions
    one = torch.ones(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="lacks a page up to 8"):
        KvcacheView(cache._storage, table, one * 9, one * 9, packed_rows=[(0, 9)])
    with pytest.raises(ValueError, match="lacks a page up to 2"):
        KvcacheView(cache._storage, table * 0 - 1, one * 3, one * 3, packed_rows=[(0, 3)])  # no page at all
    holed = torch.tensor([[-1, int(table[0, 0])]])  # the history's page missing, this step's present
    with pytest.raises(ValueError, match="lacks a page up to 9"):
        KvcacheView(cache._storage, holed, one * 10, one, packed_rows=[(9, 1)])
    monkeypatch.setenv("ASTRAI_NATIVE_KERNELS", "0")
    pa._library.cache_clear()
    try:
        assert not cache.packs_steps
        with pytest.raises(ValueError, match="packed step needs the paged attention kernel"):
            cache.bind_tasks(["t"], [0], [3], packed=True)
    finally:
        pa._library.cache_clear()
