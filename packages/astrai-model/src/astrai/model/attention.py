"""`GQA`: grouped-query attention (multi-head when `n_kv_heads == n_heads`, multi-query when it is 1).

Per layer: project to `n_heads` query heads and `n_kv_heads` key/value heads of `head_dim` channels
(optional q/k/v bias, as Qwen2), optionally RMS-normalise q and k per head **before** RoPE (Qwen3 / OLMo-2
order), rotate q and k, read and extend the KV cache when one is given, attend with SDPA (or let a packed
cache view attend, `astrai.protocols.KVCacheView`), optionally gate the merged heads with `sigmoid(gate(x))`,
and project back to `dim`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from astrai.config import AutoRegressiveLMConfig, EncoderConfig
from astrai.model.factories import AttnFactory
from astrai.model.linear import Linear, fused_linear
from astrai.model.norm import RMSNorm
from astrai.model.rope import rotate_qk
from astrai.model.sdpa import sdpa
from astrai.protocols import KVCacheView


@AttnFactory.register("gqa")
class GQA(nn.Module):
    """Grouped-query attention; weights named like transformers' Llama/Qwen (`q_proj`, ..., `q_norm`)."""

    def __init__(self, config: AutoRegressiveLMConfig | EncoderConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.n_rep = self.n_heads // self.n_kv_heads  # query heads per KV head
        self.use_qk_norm = config.use_qk_norm
        self.use_gated_attention = config.use_gated_attention
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.q_proj = Linear(config.dim, q_dim, bias=config.attn_bias)
        self.k_proj = Linear(config.dim, kv_dim, bias=config.attn_bias)
        self.v_proj = Linear(config.dim, kv_dim, bias=config.attn_bias)
        self.o_proj = Linear(q_dim, config.dim)
        if self.use_qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        if self.use_gated_attention:
            self.gate = Linear(config.dim, q_dim)

    def forward(
        self,
        x: Tensor,
        rotary_emb: tuple[Tensor, Tensor],
        attn_mask: Tensor | None = None,
        paged_cache: KVCacheView | None = None,
        *,
        is_causal: bool = True,
    ) -> Tensor:
        """x (B, T, dim) -> (B, T, dim). See `astrai.model.sdpa` for the mask, `rope` for `rotary_emb`."""
        B, T, _ = x.shape
        q, k, v = fused_linear(x, (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(B, T, self.n_heads, self.head_dim)  # (B, T, H, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, hd)
        if self.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate_qk(q, k, *rotary_emb)
        out = None
        if paged_cache is not None:
            paged_cache.write(self.layer_id, k, v)
            if paged_cache.packed:  # one unpadded row of every sequence's new tokens: the cache attends
                out = paged_cache.attend(self.layer_id, q[0], k[0], v[0], self.head_dim**-0.5)  # (N, H, hd)
                if out is None:  # SDPA over the row would mix the sequences
                    raise RuntimeError("a packed KV-cache view returned no attention (KVCacheView.attend)")
            elif attn_mask is not None:  # None: a first prefill, its own k, v are the history (build_attention_mask)
                if T == 1:  # a decode step: the cache may attend in place
                    out = paged_cache.attend(self.layer_id, q[:, 0], k[:, 0], v[:, 0], self.head_dim**-0.5)
                if out is None:
                    k, v = paged_cache.gather(self.layer_id)  # (B, S, Hkv, hd): every cached position of each row
        if out is None:
            out = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask, is_causal).transpose(1, 2)
        out = out.reshape(B, T, self.n_heads * self.head_dim)
        if self.use_gated_attention:
            out = out * torch.sigmoid(self.gate(x))
        return self.o_proj(out)
