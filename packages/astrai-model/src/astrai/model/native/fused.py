"""Fused CPU kernels (`fused.c`) for the model's per-token operations: RMSNorm, rotary embedding of q and k,
and SwiGLU's `silu(gate) * up`. Each is one call where torch runs several ops with a tensor between each,
which is what a small model's decode step spends most of its time on (a batch-1 bfloat16 RMSNorm of 384
channels inside the engine: ~40 us as torch ops, ~15 us as one call; 12 and 5 us in isolation).

Each function returns None where the kernel does not serve its arguments, and the caller then runs the torch
expression it replaces (its reference in the tests). The kernels serve CPU tensors of float32 or bfloat16,
all of one dtype, under `torch.inference_mode()` only (no autograd graph is needed there), when the library
is built (`astrai.model.native.build`; `ASTRAI_NATIVE_KERNELS=0` turns it off). Rotary embedding equals
torch's bit for bit; RMSNorm and SiLU differ by an ulp or so where the order of a sum or the exp differs.
"""

from __future__ import annotations

import ctypes
import functools
import math
from pathlib import Path

import torch
from torch import Tensor

from astrai.model.native.build import load_library

_SOURCE = Path(__file__).with_name("fused.c")
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # the kernels' is_bf16 flag


def available() -> bool:
    """True when the fused kernels are built and loaded."""
    return _library() is not None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor | None:
    """`weight * F.rms_norm(x.float(), (d,), eps=eps).to(x.dtype)` for x (..., d), weight (d,); a new
    contiguous tensor, or None where the kernel does not serve (see the module doc)."""
    dim = x.shape[-1]
    stride = _row_stride(x)
    if stride is None or weight.shape != (dim,) or not weight.is_contiguous() or not _serves(x, weight):
        return None
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    rms_norm_into(x, stride, weight, eps, out)
    return out


def rms_norm_into(x: Tensor, stride: int, weight: Tensor, eps: float, out: Tensor) -> None:
    """`rms_norm`'s kernel call into `out` (contiguous, x's shape), on arguments already checked as `rms_norm`
    checks them (x's rows `stride` elements apart)."""
    dim = x.shape[-1]
    rows = out.numel() // dim if dim else 0
    if rows:
        _library().rms_norm(x.data_ptr(), stride, weight.data_ptr(), out.data_ptr(), rows, dim, eps,
                            _DTYPES[x.dtype], torch.get_num_threads())  # fmt: skip


def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor] | None:
    """`apply_rotary_emb` of q (B, T, H, d) and k (B, T, Hkv, d) by cos, sin (B, T, d) float32: new contiguous
    q and k, or None where the kernel does not serve. q and k may be views into one projection's output
    (each token's heads side by side, tokens equally spaced)."""
    B, T, H, d = q.shape
    Hkv = k.shape[2]
    if k.shape != (B, T, Hkv, d) or cos.shape != (B, T, d) or sin.shape != cos.shape or d % 2:
        return None
    q_stride, k_stride = _row_stride(q, 2), _row_stride(k, 2)  # per token: its heads side by side
    if q_stride is None or k_stride is None or not (cos.is_contiguous() and sin.is_contiguous()):
        return None
    if cos.dtype != torch.float32 or sin.dtype != torch.float32 or not (cos.is_cpu and sin.is_cpu and _serves(q, k)):
        return None
    q_out = torch.empty_like(q, memory_format=torch.contiguous_format)
    k_out = torch.empty_like(k, memory_format=torch.contiguous_format)
    rotary_into(q, q_stride, k, k_stride, cos, sin, q_out, k_out)
    return q_out, k_out


def rotary_into(
    q: Tensor, q_stride: int, k: Tensor, k_stride: int, cos: Tensor, sin: Tensor, q_out: Tensor, k_out: Tensor
) -> None:
    """`rotary`'s kernel call into `q_out`, `k_out` (contiguous, q's and k's shapes), on arguments already
    checked as `rotary` checks them (each token's heads of q `q_stride` elements after the last's, of k
    `k_stride`)."""
    B, T, H, d = q.shape
    if B * T:
        _library().rotary(q.data_ptr(), q_stride, H, k.data_ptr(), k_stride, k.shape[2], cos.data_ptr(),
                          sin.data_ptr(), q_out.data_ptr(), k_out.data_ptr(), B * T, d, _DTYPES[q.dtype],
                          torch.get_num_threads())  # fmt: skip


def silu_mul(gate: Tensor, up: Tensor) -> Tensor | None:
    """`F.silu(gate) * up` for gate, up (..., F) of one shape and row layout (e.g. two column slices of one
    projection's output): a new contiguous tensor, or None where the kernel does not serve."""
    stride = _row_stride(gate)
    if stride is None or up.shape != gate.shape or up.stride() != gate.stride() or not _serves(gate, up):
        return None
    out = torch.empty_like(gate, memory_format=torch.contiguous_format)
    silu_mul_into(gate, up, stride, out)
    return out


def silu_mul_into(gate: Tensor, up: Tensor, stride: int, out: Tensor) -> None:
    """`silu_mul`'s kernel call into `out` (contiguous, gate's shape), on arguments already checked as
    `silu_mul` checks them (rows of gate and of up `stride` elements apart)."""
    dim = gate.shape[-1]
    rows = out.numel() // dim if dim else 0
    if rows:
        _library().silu_mul(gate.data_ptr(), up.data_ptr(), stride, out.data_ptr(), rows, dim, _DTYPES[gate.dtype],
                            torch.get_num_threads())  # fmt: skip


def _serves(a: Tensor, b: Tensor) -> bool:
    return (
        a.dtype in _DTYPES
        and a.dtype == b.dtype
        and a.is_cpu
        and b.is_cpu
        and torch.is_inference_mode_enabled()
        and _library() is not None
    )


def _row_stride(x: Tensor, row_dims: int = 1) -> int | None:
    """x seen as rows of its last `row_dims` dimensions: the distance between consecutive rows (in elements)
    when every row is contiguous and the rows are equally spaced (no copy needed), else None."""
    lead = x.dim() - row_dims
    if lead < 0:
        return None
    if x.is_contiguous():
        return math.prod(x.shape[lead:])
    row = 1
    for size, step in zip(reversed(x.shape[lead:]), reversed(x.stride()[lead:])):
        if size != 1 and step != row:
            return None
        row *= size
    stride = span = None
    for size, step in zip(reversed(x.shape[:lead]), reversed(x.stride()[:lead])):
        if size == 1:  # its stride does not matter
            continue
        if span is not None and step != span:
            return None
        stride = step if stride is None else stride
        span = step * size
    return row if stride is None else stride


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = load_library(_SOURCE, "fused CPU kernels", ("-ffp-contract=off",))
    if lib is None:
        return None
    ptr, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.rms_norm.argtypes = [ptr, i64, ptr, ptr, i64, i64, f32, i32, i32]
    lib.rotary.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, ptr, ptr, ptr, i64, i64, i32, i32]
    lib.silu_mul.argtypes = [ptr, ptr, i64, ptr, i64, i64, i32, i32]
    for fn in (lib.rms_norm, lib.rotary, lib.silu_mul):
        fn.restype = None
    return lib
