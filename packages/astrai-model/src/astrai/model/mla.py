"""`MLA`: DeepSeek-V2/V3 multi-head latent attention.

Keys and values are compressed per token into one latent vector `c` (`kv_lora_rank` channels, RMS-normalised)
plus one RoPE key `k_pe` (`qk_rope_head_dim` channels) shared by every head. Per head, `kv_b_proj` expands the
latent into a no-RoPE key `k_nope` (`qk_nope_head_dim`) and a value (`v_head_dim`); the query is split the same
way into `q_nope | q_pe`. Scores are `q_nope . k_nope + q_pe . k_pe`.

A KV cache stores only `c` and the roped `k_pe` (that is the point of MLA: `kv_lora_rank + qk_rope_head_dim`
numbers per token instead of `2 * n_heads * head_dim`). After the gather the attention either expands the
cached latents into per-head keys and values, or absorbs `kv_b_proj` into the query and the output
("weight absorption", DeepSeek-V2 paper section 2.1.3): `q_nope . (W_uk c) = (W_uk^T q_nope) . c`, so every
head attends directly over the latents as a single shared key/value head. Absorption wins when few queries
meet many cached keys (decode); expansion wins for long query blocks (prefill, training).

`use_qk_norm` adds `q_norm` and `k_norm`, RMSNorms over each head's full query and key (`nope | rope`,
`head_dim` channels), applied after RoPE: the cache holds the shared RoPE key already rotated, and the per-head
keys exist only once the latents are expanded, so the key norm acts there (as the original's MLA normalised
after RoPE too; no checkpoint format fixes this order for MLA). Normalising `W_uk c` per head is not linear
in the latent `c`, so with qk-norm the attention always expands (no absorption).

Weights follow transformers' `DeepseekV3Attention` (HF names in brackets): `q_proj` or the low-rank
`q_a_proj` [q_a_proj], `q_a_norm` [q_a_layernorm], `q_b_proj` [q_b_proj]; `kv_a_proj` [kv_a_proj_with_mqa],
`kv_norm` [kv_a_layernorm], `kv_b_proj`, `o_proj`. RoPE channels use the rotate-half layout; checkpoints with
DeepSeek's interleaved layout are permuted on import (`astrai.model.hf.deepseek`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from astrai.model.factories import AttnFactory
from astrai.model.linear import Linear
from astrai.model.norm import RMSNorm
from astrai.model.rope import apply_rotary_emb
from astrai.model.sdpa import sdpa


def yarn_softmax_mscale(rope_scaling: dict | None) -> float:
    """Extra softmax-scale factor of DeepSeek's YaRN (`mscale**2` with `mscale_all_dim`, as transformers)."""
    if not rope_scaling or rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
        return 1.0
    mscale_all_dim = rope_scaling.get("mscale_all_dim")
    factor = rope_scaling["factor"]
    if not mscale_all_dim or factor <= 1:
        return 1.0
    mscale = 0.1 * mscale_all_dim * math.log(factor) + 1.0
    return mscale * mscale


@AttnFactory.register("mla")
class MLA(nn.Module):
    """Multi-head latent attention; built by `AttnFactory` from an `AutoRegressiveLMConfig` with attn_type "mla"."""

    def __init__(self, config, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads = config.n_heads
        # Heads of the expanded keys/values; query head h reads kv head h // n_rep (DeepSeek: n_kv_heads = n_heads).
        self.n_kv_heads = config.n_kv_heads
        self.n_rep = self.n_heads // self.n_kv_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim  # query/key width per head
        self.use_qk_norm = config.use_qk_norm
        self.use_gated_attention = config.use_gated_attention
        self.scale = self.head_dim**-0.5 * yarn_softmax_mscale(config.rope_scaling)

        dim, heads = config.dim, self.n_heads
        if self.q_lora_rank is None:
            self.q_proj = Linear(dim, heads * self.head_dim)
        else:
            self.q_a_proj = Linear(dim, self.q_lora_rank)
            self.q_a_norm = RMSNorm(self.q_lora_rank, config.norm_eps)
            self.q_b_proj = Linear(self.q_lora_rank, heads * self.head_dim)
        self.kv_a_proj = Linear(dim, self.kv_lora_rank + self.qk_rope_head_dim)
        self.kv_norm = RMSNorm(self.kv_lora_rank, config.norm_eps)
        self.kv_b_proj = Linear(self.kv_lora_rank, self.n_kv_heads * (self.qk_nope_head_dim + self.v_head_dim))
        self.o_proj = Linear(heads * self.v_head_dim, dim)
        if self.use_qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        if self.use_gated_attention:
            self.gate = Linear(dim, heads * self.v_head_dim)

    def forward(self, x: Tensor, rotary_emb, attn_mask=None, paged_cache=None, *, is_causal: bool = True) -> Tensor:
        B, T, _ = x.shape
        cos, sin = rotary_emb  # (B, T, qk_rope_head_dim) float32 each
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        q = q.view(B, T, self.n_heads, self.head_dim)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], -1)  # (B, T, H, nope), (.., rope)
        q_pe = apply_rotary_emb(q_pe, cos, sin)  # (B, T, H, rope)

        latent, k_pe = self.kv_a_proj(x).split([self.kv_lora_rank, self.qk_rope_head_dim], -1)
        latent = self.kv_norm(latent)  # (B, T, kv_lora_rank)
        k_pe = apply_rotary_emb(k_pe.unsqueeze(2), cos, sin).squeeze(2)  # (B, T, rope): one key for all heads

        if paged_cache is not None:
            if paged_cache.packed:
                raise ValueError("MLA attention takes padded cache steps only (the KV-cache view is packed)")
            paged_cache.write(self.layer_id, latent, k_pe)
            if attn_mask is not None:  # None: a first prefill, its own entries are the history (sdpa module)
                latent, k_pe = paged_cache.gather(self.layer_id)  # (B, S, kv_lora_rank), (B, S, rope)

        # Per-head key norms need the expanded keys (module docstring): qk-norm always expands.
        if paged_cache is not None and not self.use_qk_norm and self.absorb_is_cheaper(T):
            out = self._attend_absorbed(q_nope, q_pe, latent, k_pe, attn_mask, is_causal)
        else:
            out = self._attend_expanded(q_nope, q_pe, latent, k_pe, attn_mask, is_causal)
        out = out.reshape(B, T, self.n_heads * self.v_head_dim)
        if self.use_gated_attention:
            out = out * torch.sigmoid(self.gate(x))
        return self.o_proj(out)

    def absorb_is_cheaper(self, q_len: int) -> bool:
        """Whether attending over the latents beats expanding them, for `q_len` queries per row.

        Multiply-adds per query head and cached key: expansion costs `kv_lora_rank * (nope + v) * n_kv_heads / n_heads`
        (running `kv_b_proj` once per key) plus `q_len * (nope + rope + v)` for scores and values; absorption
        costs `q_len * (2 * kv_lora_rank + rope)`. Terms that do not grow with the key count are left out.
        """
        extra_per_query = 2 * self.kv_lora_rank - self.qk_nope_head_dim - self.v_head_dim
        expand_cost = self.kv_lora_rank * (self.qk_nope_head_dim + self.v_head_dim) / self.n_rep
        return extra_per_query <= 0 or q_len * extra_per_query < expand_cost

    def _attend_expanded(self, q_nope, q_pe, latent, k_pe, attn_mask, is_causal) -> Tensor:
        """Expand the latents into per-head keys and values, then plain attention. Returns (B, T, H, v)."""
        B, S, _ = latent.shape
        kv = self.kv_b_proj(latent).view(B, S, self.n_kv_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], -1)
        k_pe = k_pe.unsqueeze(2).expand(B, S, self.n_kv_heads, self.qk_rope_head_dim)
        k = torch.cat([k_nope, k_pe], -1)  # (B, S, Hkv, head_dim)
        q = torch.cat([q_nope, q_pe], -1)  # (B, T, H, head_dim)
        if self.use_qk_norm:  # per head over nope | rope, after RoPE (module docstring)
            q, k = self.q_norm(q), self.k_norm(k)
        out = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask, is_causal, scale=self.scale)
        return out.transpose(1, 2)

    def _attend_absorbed(self, q_nope, q_pe, latent, k_pe, attn_mask, is_causal) -> Tensor:
        """Attend over the latents with `kv_b_proj` folded into query and output. Returns (B, T, H, v)."""
        B, T, H, _ = q_nope.shape
        w = self.kv_b_proj.weight.view(self.n_kv_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w.split([self.qk_nope_head_dim, self.v_head_dim], 1)  # (Hkv, nope, c), (Hkv, v, c)
        # Query heads grouped by the kv head they read: (B, T, Hkv, n_rep, nope) -> latent space (..., c).
        q_nope = q_nope.view(B, T, self.n_kv_heads, self.n_rep, self.qk_nope_head_dim)
        q_latent = torch.einsum("btgrn,gnc->btgrc", q_nope, w_uk).reshape(B, T, H, self.kv_lora_rank)
        q = torch.cat([q_latent, q_pe], -1).transpose(1, 2)  # (B, H, T, c + rope)
        k = torch.cat([latent, k_pe], -1).unsqueeze(1)  # (B, 1, S, c + rope): one head shared by all
        out = sdpa(q, k, latent.unsqueeze(1), attn_mask, is_causal, scale=self.scale)  # (B, H, T, c)
        out = out.transpose(1, 2).reshape(B, T, self.n_kv_heads, self.n_rep, self.kv_lora_rank)
        return torch.einsum("btgrc,gvc->btgrv", out, w_uv).reshape(B, T, H, self.v_head_dim)
