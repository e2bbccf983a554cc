"""Attention read in place from the paged KV cache (a small C kernel, built on first use): queries attend to their
row's cached positions where they lie in the pages.

Without it a step gathers every row's whole history out of the pages, for every layer (a copy as large as the
cache it reads), before attention reads that copy again. On a CPU the copy and the second read cost more than
every projection of a decode step together. The kernel reads each cached key and value row where it lies, and
once for all the queries that share it:

- `PagedRows` (decodes): one query per row, every query head of the row sharing each read;
- `PagedChunks` (prefill chunks in packed steps, `astrai.inference.cache.view`): a chunk of consecutive queries
  of one row, each attending causally up to its own position; 16 (token, head) pairs share each read and every
  multiply-add (flash attention with an online softmax), about twice as fast as torch's SDPA on the CPU.

Each is checked once per step (page tables, lengths, positions) and its `attend` then serves every layer of the
step with only the cheap checks of q and that layer's pages. `PagedRows.bind_layers` binds a decode step to every
layer's caches for C code that runs the layers itself (`DecodeStep`: the address of `decode_step_attend`, which
stores a layer's new entries and attends, and its context), so that no Python runs between layers.

The kernels are `paged_attention.c` beside this file, built on first use by `astrai.model.native.build` (the
machine's C compiler, this CPU, cached under `$ASTRAI_CACHE_DIR/kernels`, OpenMP on torch's own threads). Where
they cannot be built (a warning says why) or `ASTRAI_NATIVE_KERNELS=0`, `available()` is False and the engine
runs padded steps that gather the history instead. They cover float32 and bfloat16 caches on the CPU; the test
suite checks them against the gather + softmax reference.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from astrai.model.native import load_library

_SOURCE = Path(__file__).with_name("paged_attention.c")
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # the kernel's is_bf16 flag
_ERRORS = {
    -1: "a page index lies outside the cache",
    -2: "out of memory",
    -3: "unsupported head size",
    -4: "a negative sequence length",
    -5: "query heads not a multiple of KV heads",
    -6: "a layer outside the cache",
}
_LANES, _MAX_HEAD_DIM = 16, 256  # the kernel's SIMD width and register budget (LANES, MAX_CHUNKS there)


def available() -> bool:
    """True when the kernel is built and loaded (see the module docstring for when it is not)."""
    return _library() is not None


def supports_cache(k_cache: torch.Tensor) -> bool:
    """True when `paged_decode_attention` can serve a cache of these entries (`(..., Hkv, d)`, queries of the
    same dtype): on the CPU, float32 or bfloat16, a head size that is a multiple of 16 up to 256, and the
    kernel built."""
    head_dim = k_cache.shape[-1]
    return (
        k_cache.device.type == "cpu"
        and k_cache.dtype in _DTYPES
        and head_dim % _LANES == 0
        and head_dim <= _MAX_HEAD_DIM
        and available()
    )


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of one query token per row over its cached positions `0 .. seq_lens[b] - 1`.

    q: (B, H, d); k_cache, v_cache: one layer's pages, (pages, page_size, Hkv, d), the same dtype as q;
    page_table: (B, P) int64 physical page of each row's logical page; seq_lens: (B,) int64. Query head h
    reads KV head h // (H // Hkv); d must be a multiple of 16, at most 256. Returns (B, H, d) in q's dtype; a
    row with no cached position gives zeros.
    """
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache {tuple(k_cache.shape)}: need (pages, page_size, Hkv, d)")
    return PagedRows(page_table, seq_lens, k_cache.shape[1]).attend(q, k_cache, v_cache, scale)


class PagedRows:
    """The rows of one step, checked once: page_table (B, P) int64, seq_lens (B,) int64, each at most P pages
    of `page_size` positions. `attend` runs `paged_decode_attention` for these rows over any layer's pages."""

    def __init__(self, page_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int) -> None:
        _check_rows(page_table, page_size, seq_lens=seq_lens)
        B = page_table.shape[0]
        capacity = page_table.shape[1] * page_size
        if B and not 0 <= int(seq_lens.min()) <= int(seq_lens.max()) <= capacity:
            raise ValueError(
                f"seq_lens {seq_lens.tolist()}: need 0 .. {page_table.shape[1]} pages x {page_size} per row"
            )
        # Copies: the kernel trusts these checks, so a later in-place edit of the caller's tensors must not reach it.
        self.page_table = page_table.clone(memory_format=torch.contiguous_format)
        self.seq_lens = seq_lens.clone(memory_format=torch.contiguous_format)
        self.page_size = page_size

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> torch.Tensor:
        """q (B, H, d) over one layer's pages k_cache, v_cache (pages, page_size, Hkv, d) -> (B, H, d)."""
        B = self.seq_lens.shape[0]
        q, k_cache, v_cache = _checked_layer(q, k_cache, v_cache, self.page_size, f"B={B}")
        if q.shape[0] != B:
            raise ValueError(f"q {tuple(q.shape)}: these rows need (B={B}, H, d)")
        out = torch.empty_like(q)
        _run(
            "paged_decode_attention", q, k_cache, v_cache, out, self.page_table.data_ptr(), self.seq_lens.data_ptr(),
            B, self.page_table.shape[1], scale,
        )  # fmt: skip
        return out

    def bind_layers(self, k_caches: torch.Tensor, v_caches: torch.Tensor, slots: torch.Tensor) -> DecodeStep:
        """These rows as a decode step over every layer's caches, k_caches and v_caches (layers, pages,
        page_size, Hkv, d) contiguous, each row's new entry going to flat slot `slots[b]` ((B,) int64): for a C
        caller that runs every layer of the step itself (see `DecodeStep`)."""
        B = self.seq_lens.shape[0]
        if k_caches.dim() != 5 or v_caches.shape != k_caches.shape or k_caches.shape[2] != self.page_size:
            raise ValueError(f"k_caches {tuple(k_caches.shape)}, v_caches {tuple(v_caches.shape)}: need equal "
                             f"(layers, pages, {self.page_size}, Hkv, d)")  # fmt: skip
        if not (supports_cache(k_caches) and k_caches.is_contiguous() and v_caches.is_contiguous()):
            raise ValueError("k_caches, v_caches: need contiguous CPU caches the kernel serves (supports_cache)")
        if k_caches.dtype != v_caches.dtype or not v_caches.is_cpu:
            raise ValueError(f"v_caches {v_caches.dtype}: need k_caches' {k_caches.dtype} on the CPU")
        if slots.dtype != torch.int64 or slots.shape != (B,) or not slots.is_cpu:
            raise ValueError(f"slots {slots.dtype} {tuple(slots.shape)}: need int64 (B={B},) on the CPU")
        return DecodeStep(self, k_caches, v_caches, slots.clone())


class DecodeStep:
    """A decode step's rows (`PagedRows.bind_layers`) bound to every layer's caches, for C code that runs every
    layer of the step (the model's decoder layers, `astrai.model.native.layers`): `function` is the address of
    `decode_step_attend` (paged_attention.c), which stores one layer's new entries and runs its attention, and
    `context` the address of its first argument, valid while this object lives. The caller must hand it what
    the caches hold: `rows` rows of `dtype` entries, `n_kv_heads` x `head_dim` per token, layers below
    `n_layers` (C trusts the element size and shapes; it checks layers, slots and pages). `errors` names its
    error statuses."""

    errors = _ERRORS

    class _Fields(ctypes.Structure):  # paged_attention.c's DecodeStep
        _fields_ = [
            *[(name, ctypes.c_void_p) for name in ("k_cache", "v_cache")],
            *[(name, ctypes.c_int64) for name in ("layer_size", "n_layers")],
            *[(name, ctypes.c_void_p) for name in ("slots", "page_table", "seq_lens")],
            *[(name, ctypes.c_int64) for name in ("batch", "n_kv_heads", "dim", "max_pages", "page_size", "num_pages")],
            *[(name, ctypes.c_int) for name in ("is_bf16", "num_threads")],
        ]

    def __init__(self, rows: PagedRows, k_caches: torch.Tensor, v_caches: torch.Tensor, slots: torch.Tensor):
        layers, pages, page_size, Hkv, d = k_caches.shape
        self.dtype, self.rows, self.n_layers = k_caches.dtype, len(slots), layers
        self.n_kv_heads, self.head_dim = Hkv, d
        self._tensors = (rows, k_caches, v_caches, slots)  # what the fields point into
        self._fields = self._Fields(
            k_caches.data_ptr(), v_caches.data_ptr(), k_caches[0].numel(), layers, slots.data_ptr(),
            rows.page_table.data_ptr(), rows.seq_lens.data_ptr(), len(slots), Hkv, d, rows.page_table.shape[1],
            page_size, pages, _DTYPES[k_caches.dtype], torch.get_num_threads(),
        )  # fmt: skip
        self.function = ctypes.cast(_library().decode_step_attend, ctypes.c_void_p).value
        self.context = ctypes.addressof(self._fields)


class PagedChunks:
    """The prefill chunks of one step, checked once. Chunk c is `counts[c]` (>= 1) consecutive queries, rows
    `firsts[c] ..` of the step's q, at positions `starts[c] ..` of the row whose pages are `page_table[c]`
    ((C, P) int64); each query attends to its row's positions up to its own, the chunk's own entries included
    (written before `attend`). `attend` runs `paged_chunk_attention` for these chunks over any layer's pages."""

    def __init__(
        self, page_table: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor, firsts: torch.Tensor, page_size: int
    ) -> None:
        _check_rows(page_table, page_size, starts=starts, counts=counts, firsts=firsts)
        # Python ints: sums of int64 tensors could wrap past the checks
        starts_, counts_, firsts_ = starts.tolist(), counts.tolist(), firsts.tolist()
        if any(n < 1 for n in counts_):
            raise ValueError(f"counts {counts_}: every chunk has at least one query")
        if any(s < 0 for s in starts_):
            raise ValueError(f"starts {starts_}: positions start at 0")
        capacity = min(page_table.shape[1] * page_size, 2**31 - 1)  # the kernel holds positions in 32 bits
        if any(s + n > capacity for s, n in zip(starts_, counts_, strict=True)):
            raise ValueError(
                f"starts {starts_}, counts {counts_}: need positions within {page_table.shape[1]} pages x "
                f"{page_size} (and below 2**31)"
            )
        if any(f < 0 for f in firsts_):
            raise ValueError(f"firsts {firsts_}: rows of q start at 0")
        self.rows = max((f + n for f, n in zip(firsts_, counts_, strict=True)), default=0)  # q needs this many rows
        self.page_table, self.starts, self.counts, self.firsts = (
            t.clone(memory_format=torch.contiguous_format) for t in (page_table, starts, counts, firsts)
        )  # copies, as PagedRows'
        self.page_size = page_size

    def attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float, out: torch.Tensor
    ) -> None:
        """The chunks' queries, rows of q (N, H, d), over one layer's pages k_cache, v_cache (pages, page_size,
        Hkv, d): written into the same rows of `out` (N, H, d) contiguous, its other rows left as they are."""
        q, k_cache, v_cache = _checked_layer(q, k_cache, v_cache, self.page_size, "N")
        if q.shape[0] < self.rows:
            raise ValueError(f"q {tuple(q.shape)}: these chunks reach row {self.rows - 1}")
        if out.shape != q.shape or out.dtype != q.dtype or not (out.is_cpu and out.is_contiguous()):
            raise ValueError(f"out {out.dtype} {tuple(out.shape)}: need q's {q.dtype} {tuple(q.shape)}, contiguous")
        _run(
            "paged_chunk_attention", q, k_cache, v_cache, out, self.page_table.data_ptr(), self.starts.data_ptr(),
            self.counts.data_ptr(), self.firsts.data_ptr(), self.page_table.shape[0], self.page_table.shape[1],
            scale,
        )  # fmt: skip


def _check_rows(page_table: torch.Tensor, page_size: int, **per_row: torch.Tensor) -> None:
    """A step's page table (B, P) int64 and its per-row int64 (B,) tensors, on the CPU; the kernel is built."""
    if _library() is None:
        raise RuntimeError("the paged attention kernel is not available here (see paged_attention.available())")
    tensors = {"page_table": page_table, **per_row}
    elsewhere = [name for name, t in tensors.items() if not t.is_cpu]
    if elsewhere:
        raise ValueError(f"{', '.join(elsewhere)}: the kernel reads CPU memory only")
    if page_table.dtype != torch.int64 or page_table.dim() != 2:
        raise ValueError(f"page_table {page_table.dtype} {tuple(page_table.shape)}: need int64 (B, P)")
    B = page_table.shape[0]
    for name, t in per_row.items():
        if t.dtype != torch.int64 or t.shape != (B,):
            raise ValueError(f"{name} {t.dtype} {tuple(t.shape)}: need int64 (B={B},)")
    if page_size < 1:
        raise ValueError(f"page_size {page_size}: need at least 1")


def _checked_layer(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_size: int, rows: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (rows, H, d) and one layer's pages (pages, page_size, Hkv, d) as the kernel takes them, contiguous."""
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}: "
                         f"need ({rows}, H, d) and equal (pages, page_size, Hkv, d)")  # fmt: skip
    _, H, d = q.shape
    _, pages_of, Hkv, dk = k_cache.shape
    if dk != d or H % Hkv:
        raise ValueError(f"q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}: need the same d and H a multiple "
                         "of Hkv")  # fmt: skip
    if pages_of != page_size:
        raise ValueError(f"k_cache pages of {pages_of} positions: these rows were checked for {page_size}")
    if d % _LANES or d > _MAX_HEAD_DIM:
        raise ValueError(f"head size {d}: the kernel takes a multiple of {_LANES} up to {_MAX_HEAD_DIM}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype and q.dtype in _DTYPES):
        raise ValueError(f"dtypes {q.dtype}, {k_cache.dtype}, {v_cache.dtype}: need one of {list(_DTYPES)}")
    if not (q.is_cpu and k_cache.is_cpu and v_cache.is_cpu):
        raise ValueError("q, k_cache, v_cache: the kernel reads CPU memory only")
    return q.contiguous(), k_cache.contiguous(), v_cache.contiguous()  # cache layers: no copy


def _run(name: str, q, k_cache, v_cache, out, *rows_and_scale) -> None:
    """Call kernel `name` on checked arguments: q, the layer's pages, out, then its own row arguments (pointers
    and counts, ending with the page table's width and the scale); raise on its error status."""
    pages, page_size, Hkv, d = k_cache.shape
    *rows, max_pages, scale = rows_and_scale
    status = getattr(_library(), name)(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), *rows, q.shape[1], Hkv, d, max_pages,
        page_size, pages, scale, _DTYPES[q.dtype], torch.get_num_threads(),
    )  # fmt: skip
    if status:
        raise RuntimeError(f"{name}: {_ERRORS.get(status, f'error {status}')}")


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = load_library(_SOURCE, "paged attention kernel")
    if lib is None:
        return None
    i64, ptr, tail = ctypes.c_int64, ctypes.c_void_p, [ctypes.c_float, ctypes.c_int, ctypes.c_int]
    lib.paged_decode_attention.argtypes = [ptr] * 6 + [i64] * 7 + tail
    lib.paged_chunk_attention.argtypes = [ptr] * 8 + [i64] * 7 + tail
    lib.decode_step_attend.argtypes = [ptr, i64, ptr, i64, ptr, i64, ptr, i64, ptr, ctypes.c_float]  # from C only
    for fn in (lib.paged_decode_attention, lib.paged_chunk_attention, lib.decode_step_attend):
        fn.restype = ctypes.c_int
    return lib
