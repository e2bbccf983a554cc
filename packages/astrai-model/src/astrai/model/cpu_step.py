"""The decoder layers of a packed inference step on the CPU, each check made once per step, not per call.

The module path (`DecoderBlock` -> `RMSNorm`, `GQA`, `MLP`, `Linear`) decides at every call whether its kernel
serves the arguments and whether each packed weight is still current. In a small model's decode step that
Python is a good part of the time around the matrix products: with the benchmark's 20M model, interleaved A/B
runs gave 5.5 -> 4.9 ms for a bfloat16 batch-1 step, 8.1 -> 7.5 ms for 16 bfloat16 sequences, 11.4 -> 11.0
ms for 16 float32 sequences (a busy machine). In a packed
step (`KVCacheView.packed`) under `torch.inference_mode()` on the CPU the answers are the same for every layer,
so `run_layers` checks them once per step and then runs each layer as its bare sequence of calls: the fused
RMSNorm, one packed q/k/v product, the fused rotary embedding, the cache's write and attend, the output
projection and residual, the second RMSNorm, one packed gate/up product, the fused SwiGLU, the down projection
and residual. These are the calls the module path makes, in the same order on the same values, so the result
is bit for bit the module path's (its reference in the tests).

It serves GQA attention without q/k norm or gating and with rotary over the whole head, the SwiGLU MLP (each
module exactly its class, with no forward hooks: a LoRA adapter's hook keeps the module path), in float32
(more rows than the split product takes, `linear._SPLIT_ROWS`) or bfloat16, with packed weights
(`pack_linear_weights`) and the fused kernels built; elsewhere `run_layers` returns None before doing
anything, and the model runs its modules.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from astrai.model.attention import GQA
from astrai.model.decoder_block import DecoderBlock
from astrai.model.linear import _SPLIT_ROWS, Linear, packed_group, packed_linear, plain_module
from astrai.model.mlp import MLP
from astrai.model.native import fused
from astrai.model.norm import RMSNorm
from astrai.protocols import KVCacheView

_DTYPES = (torch.float32, torch.bfloat16)  # the fused kernels'


def run_layers(
    layers: nn.ModuleList, x: Tensor, rotary_emb: tuple[Tensor, Tensor], paged_cache: KVCacheView
) -> Tensor | None:
    """`layers` over x (1, N, dim), the packed step's tokens, with `paged_cache` packed; None (nothing done)
    where this path does not serve (see the module doc)."""
    cos, sin = rotary_emb
    if not _serves(layers, x, cos, sin):
        return None
    weights = []
    for block in layers:
        packed = _packed_weights(block, x.dtype)
        if packed is None:
            return None
        weights.append(packed)
    for block, packed in zip(layers, weights, strict=True):
        x = _layer(block, packed, x, cos, sin, paged_cache)
    return x


def _serves(layers: nn.ModuleList, x: Tensor, cos: Tensor, sin: Tensor) -> bool:
    if not (torch.is_inference_mode_enabled() and x.is_cpu and x.dtype in _DTYPES and fused.available()):
        return False
    if x.dim() != 3 or x.shape[0] != 1 or not x.is_contiguous():
        return False
    if x.dtype == torch.float32 and x.shape[1] <= _SPLIT_ROWS:  # the split product's rows
        return False
    if not (cos.dtype == sin.dtype == torch.float32 and cos.is_contiguous() and sin.is_contiguous()):
        return False
    for block in layers:
        attn, mlp = block.attention, block.mlp
        if not (plain_module(block, DecoderBlock) and plain_module(attn, GQA) and plain_module(mlp, MLP)):
            return False  # another layout, a subclass or a forward hook (a LoRA adapter's)
        parts = [
            (attn.o_proj, Linear),
            (mlp.down, Linear),
            (block.input_norm, RMSNorm),
            (block.post_attention_norm, RMSNorm),
        ]
        if not all(plain_module(module, kind) for module, kind in parts):  # q/k/v and gate/up: packed_group
            return False
        if attn.use_qk_norm or attn.use_gated_attention or cos.shape != (1, x.shape[1], attn.head_dim):
            return False
        norms = (block.input_norm.weight, block.post_attention_norm.weight)
        if any(w.dtype != x.dtype or not w.is_contiguous() for w in norms):
            return False
    return True


def _packed_weights(block: DecoderBlock, dtype: torch.dtype) -> tuple | None:
    """The block's four packed products (q/k/v, output, gate/up, down) for `dtype`, current; None if one is not
    packed."""
    attn, mlp = block.attention, block.mlp
    qkv = packed_group((attn.q_proj, attn.k_proj, attn.v_proj), dtype)
    gate_up = packed_group((mlp.gate, mlp.up), dtype)
    if qkv is None or gate_up is None:
        return None
    o, down = attn.o_proj, mlp.down
    if not (o._pack and down._pack and o.weight.dtype == down.weight.dtype == dtype):
        return None
    o_weight, down_weight = o._packed_weight(), down._packed_weight()
    if o_weight is None or down_weight is None:  # (`is`: `in` would compare tensors elementwise)
        return None
    return qkv, o_weight, gate_up, down_weight


def _layer(block: DecoderBlock, packed: tuple, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCacheView) -> Tensor:
    """`block(x, (cos, sin), None, cache)` as bare calls (the module doc)."""
    (qkv_weight, qkv_bias, qkv_widths), o_weight, (gate_up_weight, gate_up_bias, gate_up_widths), down_weight = packed
    attn, mlp = block.attention, block.mlp
    _, N, dim = x.shape
    H, Hkv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    h = torch.empty_like(x)
    fused.rms_norm_into(x, dim, block.input_norm.weight, block.input_norm.norm_eps, h)
    qkv = _linear(h, qkv_weight, qkv_bias)  # (1, N, (H + 2 Hkv) hd)
    q, k, v = qkv.split_with_sizes(qkv_widths, -1)
    q, k, v = q.view(1, N, H, hd), k.view(1, N, Hkv, hd), v.view(1, N, Hkv, hd)
    q_rot, k_rot = torch.empty(q.shape, dtype=x.dtype), torch.empty(k.shape, dtype=x.dtype)
    fused.rotary_into(q, qkv.shape[-1], k, qkv.shape[-1], cos, sin, q_rot, k_rot)
    cache.write(attn.layer_id, k_rot, v)
    out = cache.attend(attn.layer_id, q_rot[0], k_rot[0], v[0], hd**-0.5)  # (N, H, hd)
    if out is None:
        raise RuntimeError("a packed KV-cache view returned no attention (KVCacheView.attend)")
    x = x + _linear(out.view(1, N, H * hd), o_weight, attn.o_proj.bias)
    fused.rms_norm_into(x, dim, block.post_attention_norm.weight, block.post_attention_norm.norm_eps, h)
    gate_up = _linear(h, gate_up_weight, gate_up_bias)
    gate, up = gate_up.split_with_sizes(gate_up_widths, -1)
    hidden = torch.empty(gate.shape, dtype=x.dtype)
    fused.silu_mul_into(gate, up, gate_up.shape[-1], hidden)
    return x + _linear(hidden, down_weight, mlp.down.bias)


def _linear(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    """x (1, N, in) through a packed weight -> (1, N, out)."""
    y = packed_linear(x.view(x.shape[1], x.shape[2]), packed, bias)
    return y.view(1, *y.shape)
