"""Attention read in place from the paged KV cache (a small C kernel, built on first use): one query per row
over that row's cached positions. It serves decodes, and in packed steps (`astrai.inference.cache.view`) also
each query of a short continued prefill chunk, over its row's positions up to its own.

Without it a decode step gathers every row's whole history out of the pages, for every layer (a copy as large
as the cache it reads), before attention reads that copy again. On a CPU the copy and the second read cost more
than every projection of the step together. `paged_decode_attention` reads each cached key and value row once,
where it lies (keys for the scores, then values for the weighted sum), every query head of a row sharing each
read.

The kernel is `paged_attention.c` beside this file, compiled with the machine's C compiler (`$CC`, else `cc`,
`gcc`) for this CPU on first use and kept in `$ASTRAI_CACHE_DIR/kernels` (default `~/.cache/astrai/kernels`)
under a name that hashes the source, the flags and the CPU, so an edit or another machine builds afresh. It
runs its parallel loop on the OpenMP runtime torch already loaded (the same `libgomp.so.1`), so it shares
torch's threads rather than starting a second pool. Where there is no compiler, no OpenMP in torch, or the
build fails (a warning says why), `available()` is False and the engine runs padded steps that gather the
history instead; `ASTRAI_NATIVE_KERNELS=0` turns it off on purpose. It covers float32 and bfloat16 caches on
the CPU; the test suite checks it against the gather + softmax reference.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("paged_attention.c")
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11")
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
    lib = _library()
    if lib is None:
        raise RuntimeError("the paged attention kernel is not available here (see paged_attention.available())")
    B, H, d = q.shape
    pages, page_size, Hkv, dk = k_cache.shape
    if v_cache.shape != k_cache.shape or dk != d or H % Hkv:
        raise ValueError(f"q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}: "
                         "need (B, H, d) and equal (pages, page_size, Hkv, d) with H a multiple of Hkv")  # fmt: skip
    if d % _LANES or d > _MAX_HEAD_DIM:
        raise ValueError(f"head size {d}: the kernel takes a multiple of {_LANES} up to {_MAX_HEAD_DIM}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype and q.dtype in _DTYPES):
        raise ValueError(f"dtypes {q.dtype}, {k_cache.dtype}, {v_cache.dtype}: need one of {list(_DTYPES)}")
    tensors = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "page_table": page_table, "seq_lens": seq_lens}
    elsewhere = [name for name, t in tensors.items() if t.device.type != "cpu"]
    if elsewhere:
        raise ValueError(f"{', '.join(elsewhere)}: the kernel reads CPU memory only")
    if page_table.dtype != torch.int64 or page_table.dim() != 2 or page_table.shape[0] != B:
        raise ValueError(f"page_table {page_table.dtype} {tuple(page_table.shape)}: need int64 (B={B}, P)")
    if seq_lens.dtype != torch.int64 or seq_lens.shape != (B,):
        raise ValueError(f"seq_lens {seq_lens.dtype} {tuple(seq_lens.shape)}: need int64 (B={B},)")
    if B and not 0 <= int(seq_lens.min()) <= int(seq_lens.max()) <= page_table.shape[1] * page_size:
        raise ValueError(f"seq_lens {seq_lens.tolist()}: need 0 .. {page_table.shape[1]} pages x {page_size} per row")
    q, page_table, seq_lens = q.contiguous(), page_table.contiguous(), seq_lens.contiguous()
    k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()  # views of the cache already are: no copy
    out = torch.empty_like(q)
    status = lib.paged_decode_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), page_table.data_ptr(),
        seq_lens.data_ptr(), B, H, Hkv, d, page_table.shape[1], page_size, pages, scale,
        _DTYPES[q.dtype], torch.get_num_threads(),
    )  # fmt: skip
    if status:
        raise RuntimeError(f"paged_decode_attention: {_ERRORS.get(status, f'error {status}')}")
    return out


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("ASTRAI_NATIVE_KERNELS", "1") == "0" or not torch.backends.openmp.is_available():
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or platform.system() != "Linux":
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as err:  # no compiler, a failed or timed-out build
        detail = getattr(err, "stderr", "") or err
        warnings.warn(f"paged attention kernel not built ({detail}); decode attention gathers instead", stacklevel=3)
        return None
    fn = lib.paged_decode_attention
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr] * 6 + [i64] * 7 + [ctypes.c_float, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return lib


def _build(compiler: str) -> Path:
    """The shared library for this source, compiler, flags and CPU: built once, then found in the cache dir."""
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(_FLAGS).encode(), _cpu_id()]))
    folder = Path(os.environ.get("ASTRAI_CACHE_DIR") or Path.home() / ".cache" / "astrai") / "kernels"
    target = folder / f"paged_attention-{key.hexdigest()[:16]}.so"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:  # built aside, then renamed: never half-written
            built = Path(tmp) / target.name
            subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", str(built), "-lm"], check=True,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
            os.replace(built, target)
    return target


def _cpu_id() -> bytes:
    """What `-march=native` compiles for: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor().encode()
    lines = info.splitlines()
    return "\n".join(
        next((line for line in lines if line.startswith(key)), "") for key in ("model name", "flags")
    ).encode()
