"""Attention read in place from the paged KV cache (a small C kernel, built on first use): one query per row
over that row's cached positions. It serves decodes, and in packed steps (`astrai.inference.cache.view`) also
each query of a short continued prefill chunk, over its row's positions up to its own.

Without it a decode step gathers every row's whole history out of the pages, for every layer (a copy as large
as the cache it reads), before attention reads that copy again. On a CPU the copy and the second read cost more
than every projection of the step together. `paged_decode_attention` reads each cached key and value row once,
where it lies (keys for the scores, then values for the weighted sum), every query head of a row sharing each
read.

The kernel is `paged_attention.c` beside this file, built on first use by `astrai.model.native.build` (the
machine's C compiler, this CPU, cached under `$ASTRAI_CACHE_DIR/kernels`, OpenMP on torch's own threads). Where
it cannot be built (a warning says why) or `ASTRAI_NATIVE_KERNELS=0`, `available()` is False and the engine
runs padded steps that gather the history instead. It covers float32 and bfloat16 caches on the CPU; the test
suite checks it against the gather + softmax reference.

`PagedRows` checks a step's page table and lengths once; its `attend` then serves every layer of the step
with only the cheap checks of q and that layer's pages.
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
        if _library() is None:
            raise RuntimeError("the paged attention kernel is not available here (see paged_attention.available())")
        elsewhere = [name for name, t in (("page_table", page_table), ("seq_lens", seq_lens)) if not t.is_cpu]
        if elsewhere:
            raise ValueError(f"{', '.join(elsewhere)}: the kernel reads CPU memory only")
        if page_table.dtype != torch.int64 or page_table.dim() != 2:
            raise ValueError(f"page_table {page_table.dtype} {tuple(page_table.shape)}: need int64 (B, P)")
        B = page_table.shape[0]
        if seq_lens.dtype != torch.int64 or seq_lens.shape != (B,):
            raise ValueError(f"seq_lens {seq_lens.dtype} {tuple(seq_lens.shape)}: need int64 (B={B},)")
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
        if q.dim() != 3 or k_cache.dim() != 4:
            raise ValueError(
                f"q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}: need (B, H, d) and (pages, page_size, Hkv, d)"
            )
        B, H, d = q.shape
        pages, page_size, Hkv, dk = k_cache.shape
        if v_cache.shape != k_cache.shape or dk != d or H % Hkv or B != self.seq_lens.shape[0]:
            raise ValueError(f"q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}: "
                             f"need (B={self.seq_lens.shape[0]}, H, d) and equal (pages, page_size, Hkv, d) with H "
                             "a multiple of Hkv")  # fmt: skip
        if page_size != self.page_size:
            raise ValueError(f"k_cache pages of {page_size} positions: these rows were checked for {self.page_size}")
        if d % _LANES or d > _MAX_HEAD_DIM:
            raise ValueError(f"head size {d}: the kernel takes a multiple of {_LANES} up to {_MAX_HEAD_DIM}")
        if not (q.dtype == k_cache.dtype == v_cache.dtype and q.dtype in _DTYPES):
            raise ValueError(f"dtypes {q.dtype}, {k_cache.dtype}, {v_cache.dtype}: need one of {list(_DTYPES)}")
        if not (q.is_cpu and k_cache.is_cpu and v_cache.is_cpu):
            raise ValueError("q, k_cache, v_cache: the kernel reads CPU memory only")
        q, k_cache, v_cache = q.contiguous(), k_cache.contiguous(), v_cache.contiguous()  # cache layers: no copy
        out = torch.empty_like(q)
        status = _library().paged_decode_attention(
            q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), self.page_table.data_ptr(),
            self.seq_lens.data_ptr(), B, H, Hkv, d, self.page_table.shape[1], page_size, pages, scale,
            _DTYPES[q.dtype], torch.get_num_threads(),
        )  # fmt: skip
        if status:
            raise RuntimeError(f"paged_decode_attention: {_ERRORS.get(status, f'error {status}')}")
        return out


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = load_library(_SOURCE, "paged attention kernel")
    if lib is None:
        return None
    fn = lib.paged_decode_attention
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr] * 6 + [i64] * 7 + [ctypes.c_float, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return lib
