"""Every decoder layer of a packed CPU decode step as one C call (`layers.c`, built like every kernel here,
`astrai.model.native.build`), for `astrai.model.cpu_step`, which binds and checks the arguments.

The C code calls the kernels the Python loop of `cpu_step` calls, in the same order with the same arguments (so
the results are equal bit for bit): the fused kernels (`fused.c`), the matrix product (`matmul.c`) and the KV
cache's store-and-attend of the step, whose address and context the cache view provides. What it saves is the
Python between those calls, a good part of a small model's decode step on the CPU.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

from astrai.model.native import fused, matmul
from astrai.model.native.build import load_library

_SOURCE = Path(__file__).with_name("layers.c")
PRODUCT_FAILED = -100  # layers.c's status when a product refused


class Calls(ctypes.Structure):
    """layers.c's `Calls`: the kernels' entry points and the attention's context."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("linear", "rms_norm", "rotary", "silu_mul", "attend", "context")]


class Layer(ctypes.Structure):
    """layers.c's `Layer`: one layer's cache layer, norm weights and eps, packed weights and biases (None: none)."""

    _fields_ = [
        ("layer_id", ctypes.c_int64),
        ("norm1", ctypes.c_void_p),
        ("norm2", ctypes.c_void_p),
        ("eps1", ctypes.c_float),
        ("eps2", ctypes.c_float),
        *[(name, ctypes.c_void_p) for name in ("qkv", "qkv_bias", "o", "o_bias", "gate_up", "gate_up_bias")],
        *[(name, ctypes.c_void_p) for name in ("down", "down_bias")],
    ]


class Step(ctypes.Structure):
    """layers.c's `Step`: the step's shapes, rotary tables and buffers."""

    _fields_ = [
        *[(name, ctypes.c_int64) for name in ("rows", "dim", "heads", "kv_heads", "head_dim", "ffn")],
        ("cos", ctypes.c_void_p),
        ("sin", ctypes.c_void_p),
        *[(name, ctypes.c_void_p) for name in ("normed", "qkv", "q", "k", "attn", "gate_up", "hidden", "scratch")],
        ("scale", ctypes.c_float),
        ("is_bf16", ctypes.c_int),
        ("num_threads", ctypes.c_int),
    ]


def available() -> bool:
    """True when this library and the kernels it calls are built and loaded."""
    return _library() is not None


def kernels() -> dict[str, int]:
    """The addresses of the kernels `Calls` holds (the attention's excepted)."""
    return _kernels()


def decoder_layers(calls: Calls, layers: ctypes.Array, step: Step, x: int, stream: int) -> int:
    """Run `layers` (an array of `Layer`) over the step's input at address x into stream (see layers.c);
    returns its status (0: done)."""
    return _library().decoder_layers(
        ctypes.addressof(calls), ctypes.addressof(layers), len(layers), ctypes.addressof(step), x, stream
    )


@functools.cache
def _kernels() -> dict[str, int]:
    def address(function) -> int:
        return ctypes.cast(function, ctypes.c_void_p).value

    fused_lib, matmul_lib = fused._library(), matmul._library()
    return dict(
        linear=address(matmul_lib.linear),
        rms_norm=address(fused_lib.rms_norm),
        rotary=address(fused_lib.rotary),
        silu_mul=address(fused_lib.silu_mul),
    )


@functools.cache
def _library() -> ctypes.CDLL | None:
    if not (fused.available() and matmul.available()):
        return None
    lib = load_library(_SOURCE, "decoder layer loop")
    if lib is None:
        return None
    lib.decoder_layers.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                   ctypes.c_void_p, ctypes.c_void_p]  # fmt: skip
    lib.decoder_layers.restype = ctypes.c_int
    return lib
