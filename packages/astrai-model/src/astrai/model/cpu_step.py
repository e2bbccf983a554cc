"""The decoder layers of a packed inference step on the CPU, each check made once per step, not per call.

The module path (`DecoderBlock` -> `RMSNorm`, `GQA`, `MLP`, `Linear`) decides at every call whether its kernel
serves the arguments and whether each packed weight is still current. In a small model's decode step that
Python is a good part of the time around the matrix products. In a packed step (`KVCacheView.packed`) under
`torch.inference_mode()` on the CPU the answers are the same for every layer, so `run_layers` checks them once
per step and then runs each layer as its bare sequence of calls: the fused RMSNorm, one packed q/k/v product,
the fused rotary embedding, the cache's write and attend, the output projection with the residual added in the
same kernel call, the second RMSNorm, one packed gate/up product, the fused SwiGLU, the down projection with its
residual. Every intermediate goes into tensors made once per step (`_Buffers`), and the residual stream is
updated in place. These are the computations the module path makes, in the same order on the same values,
rounded at the same points, so the result is bit for bit the module path's (its reference in the tests).

A decode step (one token per row) goes further when its view binds its attention for C code
(`native_attend`, the inference engine's paged cache does): every layer then runs in one C call
(`native.layers`), which makes the same kernel calls in the same order into the same buffers, with no Python
between them; the Python loop (`_layer`) is its reference in the tests and runs every other step.

With the benchmark's 20M model on a 2-core Zen 4: against the module path, interleaved A/B runs on a busy
machine gave 5.5 -> 4.9 ms for a bfloat16 batch-1 step, 8.1 -> 7.5 ms for 16 bfloat16 sequences and
11.4 -> 11.0 ms for 16 float32 sequences. The buffers and fused residuals, with the products' deeper prefetch
and the attention's bfloat16 dot products, then took the layers of a 13-sequence bfloat16 step from 3.9-4.2 to
3.1-3.2 ms, and the single C call to 2.5-2.7 ms (the kernels alone, called from Python with nothing between
them: 2.2-2.3 ms in the same runs). Within the engine's mixed workload a bfloat16 decode step went from 4.75
to 3.76 ms.

It serves GQA attention without q/k norm or gating and with rotary over the whole head, the SwiGLU MLP (each
module exactly its class, with no forward hooks: a LoRA adapter's hook keeps the module path), in float32
(more rows than the split product takes, `linear._SPLIT_ROWS`) or bfloat16, with packed weights
(`pack_linear_weights`) and the fused kernels built; elsewhere `run_layers` returns None before doing
anything, and the model runs its modules.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from astrai.model.attention import GQA
from astrai.model.decoder_block import DecoderBlock
from astrai.model.linear import _SPLIT_ROWS, Linear, packed_group, packed_linear, plain_module
from astrai.model.mlp import MLP
from astrai.model.native import fused, layers, matmul
from astrai.model.norm import RMSNorm
from astrai.protocols import KVCacheView

_DTYPES = (torch.float32, torch.bfloat16)  # the fused kernels'


def run_layers(
    layers: nn.ModuleList, x: Tensor, rotary_emb: tuple[Tensor, Tensor], paged_cache: KVCacheView
) -> Tensor | None:
    """`layers` over x (1, N, dim), the packed step's tokens, with `paged_cache` packed; None (nothing done)
    where this path does not serve (see the module doc)."""
    cos, sin = rotary_emb
    if not _serves(x, cos, sin):
        return None
    plans = []
    for block in layers:
        plan = _plan(block, x, cos)
        if plan is None:
            return None
        plans.append(plan)
    if not plans:
        return None
    stream = torch.empty_like(x)  # the residual stream, each layer adding to it in place
    buffers = _Buffers(x.shape[1], x.dtype)
    if not _native_layers(plans, x, stream, cos, sin, paged_cache, buffers):
        for plan in plans:
            _layer(plan, x, stream, cos, sin, paged_cache, buffers)
            x = stream
    return stream


class _Plan(NamedTuple):
    """One layer's part in a step: what its calls read, checked current."""

    layer_id: int
    heads: tuple[int, int, int]  # query heads, KV heads, head size
    norms: tuple[Tensor, float, Tensor, float]  # input and post-attention RMSNorm: weight, eps
    qkv: tuple[Tensor, Tensor | None, list[int]]  # packed_group's
    o: tuple[Tensor, Tensor | None]  # packed weight, bias
    gate_up: tuple[Tensor, Tensor | None, list[int]]
    down: tuple[Tensor, Tensor | None]


def _serves(x: Tensor, cos: Tensor, sin: Tensor) -> bool:
    if not (torch.is_inference_mode_enabled() and x.is_cpu and x.dtype in _DTYPES and fused.available()):
        return False
    if x.dim() != 3 or x.shape[0] != 1 or not x.is_contiguous():
        return False
    if x.dtype == torch.float32 and x.shape[1] <= _SPLIT_ROWS:  # the split product's rows
        return False
    return cos.dtype == sin.dtype == torch.float32 and cos.is_contiguous() and sin.is_contiguous()


def _plan(block: nn.Module, x: Tensor, cos: Tensor) -> _Plan | None:
    """`block`'s plan for x, or None where this path does not serve it. Submodules and parameters are read
    from their dictionaries (`Module.__getattr__` costs more than the rest of the checks)."""
    if not plain_module(block, DecoderBlock):
        return None
    parts = block._modules
    attn, mlp, norm1, norm2 = parts["attention"], parts["mlp"], parts["input_norm"], parts["post_attention_norm"]
    if not (plain_module(attn, GQA) and plain_module(mlp, MLP)):
        return None  # another layout, a subclass or a forward hook (a LoRA adapter's)
    if attn.use_qk_norm or attn.use_gated_attention or cos.shape != (1, x.shape[1], attn.head_dim):
        return None
    projections, ffn = attn._modules, mlp._modules
    o, down = projections["o_proj"], ffn["down"]
    if not all(plain_module(m, kind) for m, kind in ((o, Linear), (down, Linear), (norm1, RMSNorm), (norm2, RMSNorm))):
        return None  # q/k/v and gate/up: packed_group checks them
    norm_weights = (norm1._parameters["weight"], norm2._parameters["weight"])
    if any(w.dtype != x.dtype or not w.is_contiguous() for w in norm_weights):
        return None
    qkv = packed_group((projections["q_proj"], projections["k_proj"], projections["v_proj"]), x.dtype)
    gate_up = packed_group((ffn["gate"], ffn["up"]), x.dtype)
    if qkv is None or gate_up is None:
        return None
    if not (o._pack and down._pack and o._parameters["weight"].dtype == down._parameters["weight"].dtype == x.dtype):
        return None
    outputs = ((qkv[1], sum(qkv[2])), (gate_up[1], sum(gate_up[2])), (o._parameters["bias"], o.out_features),
               (down._parameters["bias"], down.out_features))  # fmt: skip
    if any(b is not None and not (b.dtype == x.dtype and b.shape == (n,) and b.is_contiguous()) for b, n in outputs):
        return None  # the kernels read biases as they read the weights
    o_weight, down_weight = o._packed_weight(), down._packed_weight()
    if o_weight is None or down_weight is None:  # (`is`: `in` would compare tensors elementwise)
        return None
    return _Plan(
        attn.layer_id,
        (attn.n_heads, attn.n_kv_heads, attn.head_dim),
        (norm_weights[0], norm1.norm_eps, norm_weights[1], norm2.norm_eps),
        qkv,
        (o_weight, o._parameters["bias"]),
        gate_up,
        (down_weight, down._parameters["bias"]),
    )


class _Buffers:
    """The step's intermediate tensors, (rows, width) in the step's dtype: made by the first layer that asks,
    reused by the others."""

    def __init__(self, rows: int, dtype: torch.dtype) -> None:
        self._rows, self._dtype, self._made = rows, dtype, {}

    def get(self, name: str, width: int) -> Tensor:
        made = self._made.get(name)
        if made is None or made.shape[1] != width:
            made = self._made[name] = torch.empty(self._rows, width, dtype=self._dtype)
        return made


def _layer(plan: _Plan, x: Tensor, stream: Tensor, cos: Tensor, sin: Tensor, cache: KVCacheView, buffers: _Buffers):
    """The block's forward, `block(x, (cos, sin), None, cache)`, as bare calls (the module doc), into `stream`
    (x's shape; x itself or a tensor to overwrite)."""
    _, N, dim = x.shape
    H, Hkv, hd = plan.heads
    norm1, eps1, norm2, eps2 = plan.norms
    h = buffers.get("normed", dim)
    fused.rms_norm_into(x, dim, norm1, eps1, h)
    qkv_weight, qkv_bias, widths = plan.qkv
    qkv = buffers.get("qkv", sum(widths))
    _project(h, (qkv_weight, qkv_bias), qkv)
    q, k, v = qkv.view(1, N, -1).split_with_sizes(widths, -1)
    q, k, v = q.view(1, N, H, hd), k.view(1, N, Hkv, hd), v.view(1, N, Hkv, hd)
    q_rot, k_rot = buffers.get("q", H * hd).view(q.shape), buffers.get("k", Hkv * hd).view(k.shape)
    fused.rotary_into(q, qkv.shape[-1], k, qkv.shape[-1], cos, sin, q_rot, k_rot)
    cache.write(plan.layer_id, k_rot, v)
    out = cache.attend(plan.layer_id, q_rot[0], k_rot[0], v[0], hd**-0.5)  # (N, H, hd)
    if out is None:
        raise RuntimeError("a packed KV-cache view returned no attention (KVCacheView.attend)")
    residual = stream.view(N, dim)
    _project(out.reshape(N, H * hd).contiguous(), plan.o, residual, x.view(N, dim))
    fused.rms_norm_into(residual, dim, norm2, eps2, h)
    gate_up_weight, gate_up_bias, widths = plan.gate_up
    gate_up = buffers.get("gate_up", sum(widths))
    _project(h, (gate_up_weight, gate_up_bias), gate_up)
    gate, up = gate_up.split_with_sizes(widths, -1)
    hidden = buffers.get("hidden", gate.shape[-1])
    fused.silu_mul_into(gate, up, gate_up.shape[-1], hidden)
    _project(hidden, plan.down, residual, residual)


def _native_layers(
    plans: list[_Plan], x: Tensor, stream: Tensor, cos: Tensor, sin: Tensor, cache: KVCacheView, buffers: _Buffers
) -> bool:
    """Every layer as one C call (`native.layers`): the same kernel calls as `_layer`'s, in the same order, into
    the same buffers. For a step whose view binds its attention for C (`native_attend`: a packed decode step of
    the inference engine's cache) and layers of one shape whose products are `matmul`'s; False, with nothing
    done, elsewhere."""
    bind = getattr(cache, "native_attend", None)
    attend = bind() if bind is not None else None
    if attend is None or not layers.available():
        return False
    first = plans[0]
    H, Hkv, hd = first.heads
    F = first.gate_up[2][0]
    _, N, dim = x.shape
    if first.qkv[2] != [H * hd, Hkv * hd, Hkv * hd] or first.gate_up[2] != [F, F]:
        return False
    if any(p.heads != first.heads or p.qkv[2] != first.qkv[2] or p.gate_up[2] != first.gate_up[2] for p in plans):
        return False
    if any(weight.is_mkldnn for p in plans for weight in (p.qkv[0], p.o[0], p.gate_up[0], p.down[0])):
        return False
    # The C side trusts its binding's entry size and shapes: a cache that does not hold this model's entries
    # (or a view for other rows) goes to the Python loop, whose checks name the mismatch.
    if (attend.dtype, attend.rows, attend.n_kv_heads, attend.head_dim) != (x.dtype, N, Hkv, hd):
        return False
    if any(not 0 <= p.layer_id < attend.n_layers for p in plans):
        return False
    tensors = {name: buffers.get(name, width) for name, width in _buffer_widths(dim, H, Hkv, hd, F).items()}
    scratch = torch.empty(-(-N // matmul.BLOCK) * matmul.BLOCK * max(dim, H * hd, F), dtype=torch.int32)
    step = layers.Step(
        N, dim, H, Hkv, hd, F, cos.data_ptr(), sin.data_ptr(), *(t.data_ptr() for t in tensors.values()),
        scratch.data_ptr(), hd**-0.5, int(x.dtype == torch.bfloat16), torch.get_num_threads(),
    )  # fmt: skip
    table = (layers.Layer * len(plans))(*(_native_layer(plan) for plan in plans))
    calls = layers.Calls(**layers.kernels(), attend=attend.function, context=attend.context)
    status = layers.decoder_layers(calls, table, step, x.data_ptr(), stream.data_ptr())
    if status:
        cause = "a product refused" if status == layers.PRODUCT_FAILED else attend.errors.get(status, status)
        raise RuntimeError(f"decoder layers of a decode step: {cause}")
    return True


def _buffer_widths(dim: int, H: int, Hkv: int, hd: int, F: int) -> dict[str, int]:
    """The buffers `layers.Step` names, in its order, with their widths (`_layer` uses the same names)."""
    return dict(normed=dim, qkv=(H + 2 * Hkv) * hd, q=H * hd, k=Hkv * hd, attn=H * hd, gate_up=2 * F, hidden=F)


def _native_layer(plan: _Plan) -> layers.Layer:
    def address(t: Tensor | None) -> int | None:
        return None if t is None else t.data_ptr()

    norm1, eps1, norm2, eps2 = plan.norms
    weights = (plan.qkv[0], plan.qkv[1], *plan.o, plan.gate_up[0], plan.gate_up[1], *plan.down)
    return layers.Layer(plan.layer_id, norm1.data_ptr(), norm2.data_ptr(), eps1, eps2, *map(address, weights))


def _project(x: Tensor, weight: tuple[Tensor, Tensor | None], out: Tensor, residual: Tensor | None = None) -> None:
    """out = x (M, in) through a packed weight and bias (`packed_group`'s or `Linear._packed_weight`'s), plus
    `residual` (M, out) when given (which may be `out`), rounded as `residual + linear(x)` rounds."""
    packed, bias = weight
    if packed.is_mkldnn:
        y = packed_linear(x, packed, bias)
        torch.add(residual, y, out=out) if residual is not None else out.copy_(y)
    else:
        matmul.linear_into(x, packed, bias, out, residual)
