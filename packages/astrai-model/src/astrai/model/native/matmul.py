"""Float32 `F.linear` through a weight packed for the CPU kernel in `matmul.c` (built like every kernel here,
`astrai.model.native.build`), which `astrai.model.linear` uses for packed float32 layers.

`pack(weight)` stores W (N, K) as (N / 16, K, 16): for each k the weights of 16 outputs side by side, one vector.
`linear(x, packed, bias)` then keeps each block of 16 rows' sums in registers and reads each weight once per 16
rows. A decode step of a few to a few dozen sequences is bound by reading the weights; there the kernel runs
1.2-1.35x faster than oneDNN's packed product (13-30 rows, the 20M model of `benchmarks/bench_generate.py` on a
2-core Zen 4, weights streaming from memory: 16 rows 4.2 -> 3.3 ms per step's products), and within 5% of it at
hundreds of rows. It sums in another order than torch; the tests hold it to float32 rounding of the float64
product.
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


def pack(weight: Tensor) -> Tensor | None:
    """W (N, K) float32 on the CPU as the kernel reads it, (N / 16, K, 16); None where the kernel does not serve
    (another dtype or device, N not a multiple of 16, the kernel not built)."""
    N, K = weight.shape
    if weight.dtype != torch.float32 or not weight.is_cpu or N % BLOCK or not available():
        return None
    return weight.detach().reshape(N // BLOCK, BLOCK, K).transpose(1, 2).contiguous()


def linear(x: Tensor, packed: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, W, bias)` for x (M, K) float32 and `packed = pack(W)` -> (M, N)."""
    blocks, K, width = packed.shape
    N = blocks * width
    if width != BLOCK or packed.dtype != torch.float32 or not (packed.is_cpu and packed.is_contiguous()):
        raise ValueError(f"packed {packed.dtype} {tuple(packed.shape)}: need what pack() returns")
    if x.dim() != 2 or x.shape[1] != K or x.dtype != torch.float32 or not x.is_cpu:
        raise ValueError(f"x {x.dtype} {tuple(x.shape)}: need float32 (M, {K}) on the CPU")
    if bias is not None:
        if bias.shape != (N,) or bias.dtype != torch.float32 or not bias.is_cpu:
            raise ValueError(f"bias {bias.dtype} {tuple(bias.shape)}: need float32 ({N},) on the CPU")
        bias = bias.contiguous()
    x = x.contiguous()
    M = x.shape[0]
    y = torch.empty(M, N)
    if M:
        scratch = torch.empty(-(-M // BLOCK) * BLOCK * K)
        _library().linear_f32(x.data_ptr(), M, K, packed.data_ptr(), N, None if bias is None else bias.data_ptr(),
                              y.data_ptr(), scratch.data_ptr(), torch.get_num_threads())  # fmt: skip
    return y


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = load_library(_SOURCE, "float32 matrix product kernel")
    if lib is None:
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.linear_f32.argtypes = [ptr, i64, i64, ptr, i64, ptr, ptr, ptr, ctypes.c_int]
    lib.linear_f32.restype = None
    return lib
