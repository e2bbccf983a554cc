"""`F.linear` through a weight packed for the CPU kernel in `matmul.c` (built like every kernel here,
`astrai.model.native.build`), which `astrai.model.linear` uses for packed layers: float32 everywhere, bfloat16
on CPUs with AVX512-BF16.

`pack(weight)` stores W (N, K) 16 outputs at a time: float32 as (N / 16, K, 16), for each k the weights of 16
outputs side by side, one vector; bfloat16 as (N / 16, K / 2, 16, 2), for each pair of k. `linear(x, packed,
bias)` then keeps each block of 16 rows' sums in registers and reads each weight once per 16 rows. A decode step
of one to a few dozen sequences is bound by reading the weights; there the kernel runs faster than oneDNN's
packed product (the 20M model of `benchmarks/bench_generate.py` on a 2-core Zen 4, all of a step's products,
weights streaming from memory): float32 1.2-1.35x at 13-30 rows (16 rows 4.2 -> 3.3 ms); bfloat16 1.4-1.55x at
1-16 rows (1 row 1.55 -> 1.0 ms, 13 rows 2.15 -> 1.45 ms), 1.15x at 30. At hundreds of rows it is within 5%
of oneDNN. It sums in another order than torch; the tests hold it to the rounding of the float64 product.
`vdpbf16ps` counts subnormal bfloat16 inputs (below ~1.2e-38) as zero.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from astrai.model.native.build import load_library

_SOURCE = Path(__file__).with_name("matmul.c")
BLOCK = 16  # outputs per packed block (the kernel's LANES)


def available() -> bool:
    """True when the kernel is built and loaded."""
    return _library() is not None


def has_bf16_dot() -> bool:
    """True when the kernel is built with its bfloat16 product (the CPU has AVX512-BF16)."""
    return available() and bool(_library().has_bf16_dot())


def pack(weight: Tensor) -> Tensor | None:
    """W (N, K) as the kernel reads it: float32 (N / 16, K, 16), bfloat16 (N / 16, K / 2, 16, 2); None where the
    kernel does not serve (another dtype or device, N not a multiple of 16, bfloat16 with K odd or without the
    CPU's bfloat16 dot product, the kernel not built)."""
    N, K = weight.shape
    if not (weight.is_cpu and N % BLOCK == 0 and available()):
        return None
    if weight.dtype == torch.float32:
        return weight.detach().reshape(N // BLOCK, BLOCK, K).transpose(1, 2).contiguous()
    if weight.dtype == torch.bfloat16 and K % 2 == 0 and has_bf16_dot():
        return weight.detach().reshape(N // BLOCK, BLOCK, K // 2, 2).transpose(1, 2).contiguous()
    return None


def linear(x: Tensor, packed: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, W, bias)` for x (M, K) and `packed = pack(W)`, of W's dtype -> (M, N)."""
    dtype = packed.dtype
    shape = {torch.float32: (BLOCK,), torch.bfloat16: (BLOCK, 2)}.get(dtype)
    if shape is None or packed.dim() != 2 + len(shape) or packed.shape[2:] != shape:
        raise ValueError(f"packed {dtype} {tuple(packed.shape)}: need what pack() returns")
    if not (packed.is_cpu and packed.is_contiguous()):
        raise ValueError("packed: need what pack() returns (contiguous, on the CPU)")
    N, K = packed.shape[0] * BLOCK, packed.shape[1] * len(shape)
    if x.dim() != 2 or x.shape[1] != K or x.dtype != dtype or not x.is_cpu:
        raise ValueError(f"x {x.dtype} {tuple(x.shape)}: need {dtype} (M, {K}) on the CPU")
    if bias is not None:
        if bias.shape != (N,) or bias.dtype != dtype or not bias.is_cpu:
            raise ValueError(f"bias {bias.dtype} {tuple(bias.shape)}: need {dtype} ({N},) on the CPU")
        bias = bias.contiguous()
    y = torch.empty(x.shape[0], N, dtype=dtype)
    linear_into(x.contiguous(), packed, bias, y)
    return y


def linear_into(x: Tensor, packed: Tensor, bias: Tensor | None, out: Tensor, residual: Tensor | None = None) -> None:
    """`linear(x, packed, bias)` into `out` (M, N) contiguous, plus `residual` (M, N) contiguous when given (as
    torch's `residual + F.linear(...)` rounds it; `residual` may be `out` itself), on arguments already checked as
    `linear` checks them (x and bias contiguous)."""
    M = x.shape[0]
    if M:
        steps = packed.shape[1]
        scratch = torch.empty(-(-M // BLOCK) * BLOCK * steps, dtype=torch.int32)  # x transposed
        status = _library().linear(
            x.data_ptr(), M, x.shape[1], packed.data_ptr(), out.shape[1], None if bias is None else bias.data_ptr(),
            None if residual is None else residual.data_ptr(), out.data_ptr(), scratch.data_ptr(),
            int(packed.dtype == torch.bfloat16), torch.get_num_threads(),
        )  # fmt: skip
        if status:
            raise RuntimeError("matmul.linear: this build has no bfloat16 kernel (pack() returns None for it)")


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = load_library(_SOURCE, "matrix product kernel")
    if lib is None:
        return None
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.linear.argtypes = [ptr, i64, i64, ptr, i64, ptr, ptr, ptr, ptr, i32, i32]
    lib.linear.restype = i32
    lib.has_bf16_dot.argtypes = []
    lib.has_bf16_dot.restype = i32
    return lib
