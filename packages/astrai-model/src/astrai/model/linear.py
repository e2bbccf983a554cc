"""`Linear`: an affine projection `y = x W^T (+ b)` initialised like Hugging Face models (normal, std 0.02).

CPU inference kernels, switched on per model by `pack_linear_weights(model)` (the inference engine does) and
used only under `torch.inference_mode()`; training and `no_grad` evaluation always run `F.linear`. Both match
`F.linear` up to summation order and are tested against it. Figures: torch 2.13 on a 2-core AVX-512 machine,
the 20M-parameter model of `benchmarks/bench_generate.py`.

- Packed weights: each layer keeps a copy of its weight laid out for a faster product than MKL's, and
  multiplies through it (`packed_linear`):
  - `astrai.model.native.matmul`'s kernel (float32; bfloat16 on CPUs with AVX512-BF16), 16 outputs at a
    time, which reads each weight once per 16 rows of x: at the 1-30 rows of a decode step 1.2-1.35x faster
    than oneDNN in float32 and 1.15-1.55x in bfloat16, within 5% of it at hundreds of rows;
  - elsewhere oneDNN's blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, what torch.compile's
    freezing uses), 1.2-1.5x faster projections than MKL at 1-512 rows and 3x faster LM heads at 1-16 rows;
    a 16-sequence decode step 18 -> 11 ms.
  The copy costs one more weight's worth of memory. It is checked against the live weight on every call
  (same tensor, `_version` and storage), so an optimizer step, `load_state_dict` or `.to()` re-packs it on
  the next inference forward instead of serving stale weights.
- Few float32 rows (at most `_SPLIT_ROWS`, a decode step of one or two sequences): oneDNN and MKL run a
  single-threaded matrix-vector product. Splitting W's output rows into one block per intra-op thread and
  multiplying them as one batch, `bmm((k, out/k, in), (k, in, M))`, keeps every core streaming weights: a
  batch-1 decode step takes 4.5 ms, against 6 ms through the float32 kernel, 7.5 ms through oneDNN and 10 ms
  with `F.linear`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _global_hooks

from astrai.model.native import matmul

INIT_STD = 0.02  # transformers' default `initializer_range`
_SPLIT_ROWS = 2  # up to this many float32 rows the split product beats the packed kernels (per step: 1 row 4.5 ms
# against 6.0 through `matmul`, 3 rows 6.4 against 5.1)


class Linear(nn.Linear):
    """`nn.Linear` without bias by default; weight (out_dim, in_dim) ~ N(0, 0.02), bias zeros."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = False) -> None:
        super().__init__(in_dim, out_dim, bias=bias)
        self._pack = False  # set by pack_linear_weights
        self._packed: tuple[Tensor, tuple[int, int], Tensor] | None = None  # (weight, _stamp(weight), copy)
        self._group_packed: tuple | None = None  # fused_linear's copy for a group this layer leads

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=INIT_STD)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in_dim) -> (..., out_dim)."""
        if self._pack and torch.is_inference_mode_enabled() and x.dtype == self.weight.dtype:
            if x.dtype == torch.float32 and x.numel() <= _SPLIT_ROWS * self.in_features:
                return row_split_linear(x, self.weight, self.bias)
            packed = self._packed_weight()
            if packed is not None:
                y = packed_linear(x.reshape(-1, self.in_features), packed, self.bias)
                return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    def _packed_weight(self) -> Tensor | None:
        """The packed copy of the current weight, re-made when the weight changed; None (and the kernels off)
        when the weight moved to a device or dtype that cannot be packed."""
        weight = self._parameters["weight"]
        packed = self._packed
        if packed is None or packed[0] is not weight or packed[1] != _stamp(weight):
            if not can_pack(weight):
                self._pack, self._packed = False, None
                return None
            packed = (weight, _stamp(weight), _pack_weight(weight))
            self._packed = packed
        return packed[2]

    def __getstate__(self) -> dict:
        # Copies and pickles never carry the packed copy (possibly an opaque oneDNN tensor); they re-pack on use.
        return {**self.__dict__, "_packed": None, "_group_packed": None}


def row_split_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)` for few rows of x (..., in) as one batched product over blocks of W's rows."""
    out_dim, in_dim = weight.shape
    blocks = _blocks(out_dim, torch.get_num_threads())
    rows = x.reshape(-1, in_dim)  # (M, in)
    m = rows.shape[0]
    # (k, out/k, in) @ (k, in, M) -> (k, out/k, M), whose memory is (out, M): W's row order.
    y = torch.bmm(weight.view(blocks, out_dim // blocks, in_dim), rows.t().expand(blocks, in_dim, m))
    y = y.view(1, out_dim) if m == 1 else y.view(out_dim, m).t().contiguous()  # (M, out)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], out_dim)


@functools.cache
def _blocks(out_dim: int, threads: int) -> int:
    """The most blocks, at most one per thread, that split `out_dim` rows evenly."""
    blocks = max(threads, 1)
    while out_dim % blocks:
        blocks -= 1
    return blocks


def can_pack(weight: Tensor) -> bool:
    """Whether this torch build can run `weight`'s dtype and device through packed oneDNN weights."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    if weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return weight.dtype == torch.float32


def pack_linear_weights(model: nn.Module, enable: bool = True) -> int:
    """Switch every `Linear` of `model` whose weight `can_pack` to the CPU inference kernels (or back, with
    `enable=False`, dropping the packed copies). Returns how many layers use them. The matrix product kernel is
    built (or loaded) here, not in the first forward."""
    count = 0
    for module in model.modules():
        if isinstance(module, Linear):
            module._pack = enable and can_pack(module.weight)
            if not module._pack:
                module._packed = module._group_packed = None
            else:
                matmul.available()
            count += module._pack
    return count


def fused_linear(x: Tensor, layers: tuple[Linear, ...]) -> tuple[Tensor, ...]:
    """`tuple(layer(x) for layer in layers)` for layers reading the same input (q/k/v, gate/up).

    With the packed kernels on (and more rows than the split product takes) the layers run as one packed
    product over their concatenated weights, packed once and kept on the first layer (instead of one copy per
    layer): one call instead of several, and a wider product; a 16-sequence decode step runs ~5% faster,
    a bfloat16 batch-1 step ~6%. The outputs are then column slices of one (..., sum(out)) tensor.
    """
    first = layers[0]
    if x.dtype == torch.float32 and x.numel() <= _SPLIT_ROWS * first.in_features:
        return tuple(layer(x) for layer in layers)  # the split product, layer by layer
    group = packed_group(layers, x.dtype)
    if group is None:
        return tuple(layer(x) for layer in layers)
    packed, bias, widths = group
    y = packed_linear(x.reshape(-1, first.in_features), packed, bias)
    return y.view(*x.shape[:-1], y.shape[-1]).split_with_sizes(widths, -1)


def packed_group(layers: tuple[Linear, ...], dtype: torch.dtype) -> tuple[Tensor, Tensor | None, list[int]] | None:
    """The packed concatenated weight of `layers` for `dtype` inputs under `torch.inference_mode()`, with the
    concatenated bias (or None) and each layer's output width; re-made when a weight or bias changed since (as
    `Linear` re-packs its own weight). None where the packed kernels do not serve, and for layers whose call
    does more than `Linear.forward` (a forward hook, such as a LoRA adapter's, or a subclass): `fused_linear`
    then calls the layers."""
    first = layers[0]
    if not (first._pack and torch.is_inference_mode_enabled() and all(plain_module(layer, Linear) for layer in layers)):
        return None
    group = first._group_packed
    if group is None or group[1].dtype != dtype or not _current(group[0], layers):
        group = _pack_group(layers, dtype)
        if group is None:
            return None
    return group[1], group[2], group[3]


def plain_module(module: nn.Module, kind: type[nn.Module]) -> bool:
    """Whether calling `module` only runs `kind.forward`: exactly that class, and no forward hooks on it or on
    every module."""
    return (
        type(module) is kind
        and not (module._forward_hooks or module._forward_pre_hooks)
        and not (_global_hooks._global_forward_hooks or _global_hooks._global_forward_pre_hooks)
    )


def _tensors(layers: tuple[Linear, ...]) -> list[Tensor | None]:
    """Weights, then biases (from the parameter dictionaries: `Module.__getattr__` would cost more than the rest)."""
    return [layer._parameters["weight"] for layer in layers] + [layer._parameters["bias"] for layer in layers]


def _stamp(t: Tensor | None) -> tuple[int, int]:
    """What changes when a tensor's values may have: its `_version` (in-place updates) and storage."""
    return (-1, 0) if t is None else (t._version, t.data_ptr())


def _keys(layers: tuple[Linear, ...]) -> list[tuple[Tensor | None, tuple[int, int]]]:
    return [(t, _stamp(t)) for t in _tensors(layers)]


def _current(keys: list[tuple[Tensor | None, tuple[int, int]]], layers: tuple[Linear, ...]) -> bool:
    """Whether `layers` still hold the weights and biases `keys` were taken of, unchanged."""
    return all(t is key and _stamp(t) == stamp for t, (key, stamp) in zip(_tensors(layers), keys, strict=True))


def _pack_group(layers: tuple[Linear, ...], dtype: torch.dtype) -> tuple | None:
    """(weights' and biases' keys, packed concatenated weight, concatenated bias or None, output widths), stored
    on the first layer; None (nothing stored) when the layers cannot share one product."""
    weights, biases = [layer.weight for layer in layers], [layer.bias for layer in layers]
    if (
        not all(layer._pack and w.dtype == dtype for layer, w in zip(layers, weights, strict=True))
        or len({b is None for b in biases}) != 1
    ):
        return None
    packed = _pack_weight(torch.cat([w.detach() for w in weights]))
    bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
    layers[0]._group_packed = (_keys(layers), packed, bias, [w.shape[0] for w in weights])
    return layers[0]._group_packed


def packed_linear(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    """`F.linear(x, W, bias)` for x (M, in) through `packed`, W's packed copy (`_pack_weight`) -> (M, out)."""
    if packed.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return matmul.linear(x, packed, bias)


def _pack_weight(weight: Tensor) -> Tensor:
    """The copy of `weight` (`can_pack`) that `packed_linear` multiplies by: the native kernel's layout where it
    serves, else oneDNN's blocked layout."""
    packed = matmul.pack(weight)
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None) if packed is None else packed
