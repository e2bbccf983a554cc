"""The attention mask and positions every layer shares, and the scaled-dot-product call of every attention.

Masks are boolean, `True` = the query may attend to the key, shaped (B, 1, T, S) so one mask serves every
head. The model builds one mask per forward pass (`build_attention_mask`) and returns `None` whenever SDPA's
built-in causal (or full) attention is exact: no padding and no KV cache, or a KV cache that holds nothing
but this step's own (right-padded) tokens, a first prefill. That keeps the fast fused kernels (which skip the
masked half of causal attention) for plain training batches and for prompts.

Key index `j` means:
- without a cache, the `j`-th token of this forward pass (keys are the queries' own tokens);
- with a cache (`astrai.protocols.KVCacheView`), cache slot `j`, which holds the token at absolute position `j`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def default_position_ids(input_ids: Tensor, input_mask: Tensor | None, kv_lens: Tensor | None) -> Tensor:
    """(B, T) absolute positions of `input_ids` (B, T) when the caller gives none.

    Without a cache: 0..T-1, or with a padding mask `cumsum(mask) - 1` (so left-padded rows start at 0, as
    transformers' `generate`; padding gets position 0). With a cache: the new tokens of row b continue
    after its cached ones, `kv_lens[b] - n_new[b] + t` with `n_new` the row's real tokens (right-padded).
    """
    B, T = input_ids.shape
    steps = torch.arange(T, device=input_ids.device)
    if kv_lens is not None:
        n_new = input_mask.sum(dim=1) if input_mask is not None else torch.full_like(kv_lens, T)
        return (kv_lens - n_new)[:, None] + steps  # (B, T)
    if input_mask is None:
        return steps.expand(B, T)
    return (input_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T)


def build_attention_mask(
    input_mask: Tensor | None,
    position_ids: Tensor,
    kv_lens: Tensor | None = None,
    is_causal: bool = True,
) -> Tensor | None:
    """The (B, 1, T, S) boolean mask for one forward pass, or None when SDPA needs none.

    input_mask: (B, T), nonzero for real tokens, zero for padding (left or right), or None.
    position_ids: (B, T) absolute position of every query token.
    kv_lens: (B,) valid cache slots per row after this step's write (`KVCacheView.seq_lens`), or None
        without a cache.

    With a cache, None means that no row had cached entries before this step: attention layers then attend
    causally over the step's own keys. That is exact for every real query even in a ragged batch: rows are
    right-padded, so a real query at i sees keys j <= i, all real.
    """
    B, T = position_ids.shape
    if kv_lens is None:
        if input_mask is None or bool(input_mask.all()):
            return None  # plain causal / full attention: let SDPA use its fused path
        key_ok = input_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        if is_causal:
            idx = torch.arange(T, device=position_ids.device)
            mask = key_ok & (idx[None, :] <= idx[:, None])  # (B, 1, T, T): key j <= query i
        else:
            mask = key_ok.expand(B, 1, T, T)
    else:
        if not is_causal:
            raise ValueError("a KV cache needs causal attention (is_causal=False was given)")
        n_new = input_mask.sum(dim=1).to(kv_lens.dtype) if input_mask is not None else torch.full_like(kv_lens, T)
        if torch.equal(kv_lens, n_new):
            return None  # a first prefill: the cache holds only this step's tokens
        S = int(kv_lens.max())
        slots = torch.arange(S, device=position_ids.device)  # slot j holds absolute position j
        in_cache = slots[None, :] < kv_lens[:, None]  # (B, S)
        causal = slots[None, None, :] <= position_ids[:, :, None]  # (B, T, S)
        mask = (in_cache[:, None, :] & causal)[:, None]  # (B, 1, T, S)
    # A query that may see nothing (a padding token) would make SDPA return NaN; let it see every key instead.
    # Its output is never used, and this keeps NaN out of the following layers and the backward pass.
    return mask | ~mask.any(dim=-1, keepdim=True)


def sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    is_causal: bool,
    scale: float | None = None,
) -> Tensor:
    """Attention of q (B, H, T, dq) over k (B, Hkv, S, dq), v (B, Hkv, S, dv) -> (B, H, T, dv).

    `H` must be a multiple of `Hkv` (query head h reads KV head h // (H // Hkv)). `attn_mask` is a boolean
    (B, 1, T, S) mask from `build_attention_mask`; when None, `is_causal` picks causal or full attention.
    `scale` defaults to 1/sqrt(dq).
    """
    n_rep = q.shape[1] // k.shape[1]
    if q.shape[2] == 1 and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        if k.shape[0] * k.shape[2] > _SMALL_DECODE_KEYS:
            return grouped_attention(q, k, v, attn_mask, scale)
        # Few keys in all: the fused float32 kernel on upcast copies is faster still (and exact in float32).
        out = sdpa(q.float(), k.float(), v.float(), attn_mask, is_causal, scale)
        return out.to(q.dtype)
    if attn_mask is None:
        # Fused kernels take grouped KV heads directly when there is no mask.
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=is_causal and q.shape[2] > 1, scale=scale, enable_gqa=n_rep > 1
        )
    if n_rep > 1 and q.device.type != "cpu":
        # CUDA's masked kernels want one KV head per query head: (B, Hkv, S, d) -> (B, H, S, d). The CPU
        # kernels take grouped heads with a mask too (same result, no copy: ~4x faster decode attention).
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )


_SMALL_DECODE_KEYS = 1024  # batch * keys up to which half-precision decode attention runs in float32 (see sdpa)


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float | None) -> Tensor:
    """q (B, H, T, dq) over k (B, Hkv, S, dq), v (B, Hkv, S, dv) -> (B, H, T, dv): two matmuls over grouped heads
    (the KV heads are never repeated) and a float32 softmax. `attn_mask` (B, 1, T, S) boolean or None; every
    query must see at least one key.

    torch's CPU flash kernel is tuned for long queries; at T = 1 in bf16 it is ~7x slower than this (measured on
    AVX-512 with torch 2.13), and decode steps are all T = 1. It also serves the fixed-shape steps replayed as
    CUDA graphs (`astrai.inference.cuda_graphs`): plain matmuls, no host sync, any mask.
    """
    B, H, T, dq = q.shape
    Hkv = k.shape[1]
    n_rep = H // Hkv
    qg = q.reshape(B, Hkv, n_rep * T, dq)  # query head h = g * n_rep + r reads KV head g; rows (r, t)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * (scale if scale is not None else dq**-0.5)
    if attn_mask is not None:  # (B, 1, T, S) broadcasts over the KV heads and the heads of each group
        scores = scores.view(B, Hkv, n_rep, T, -1).masked_fill(~attn_mask[:, :, None], float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype).view(B, Hkv, n_rep * T, -1)
    return torch.matmul(probs, v).reshape(B, H, T, v.shape[-1])
