"""Rotary position embedding (RoPE) in Hugging Face's "rotate_half" layout, with HF's `rope_scaling` kinds.

A head vector `x` of `dim` channels is rotated as `x * cos + rotate_half(x) * sin`, where channel `i` and
channel `i + dim/2` form one rotating pair (not adjacent channels). The angle of pair `i` at position `p` is
`p * inv_freq[i]`; `rope_scaling` changes `inv_freq` (and for YaRN scales cos/sin by an attention factor)
exactly as `transformers.modeling_rope_utils` does, so HF checkpoints load without any permutation.

Precision: angles, cos and sin are always computed in float32 from a float32 `inv_freq` that is held outside
the module's buffers (a per-device cache), so `model.to(torch.bfloat16)` can never degrade them. cos/sin are
computed for the positions actually requested, so any position works (no table to index past its end).

`dynamic` (NTK) is stateless here: the base grows with the longest position of the current batch. transformers
keeps the longest length it has seen in the module instead; the two agree on every call of a fresh model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from astrai.model.native import fused


def rotate_half(x: Tensor) -> Tensor:
    """(..., d) -> (..., d): `[x1, x2] -> [-x2, x1]` with `x1, x2` the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_emb(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate `x` (B, T, H, d) by `cos`, `sin` (B, T, d) float32; computed in float32, returned in x.dtype."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (B, T, 1, d): same angle for every head
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def rotate_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """`apply_rotary_emb` of queries q (B, T, H, d) and keys k (B, T, Hkv, d) by the same angles: one fused
    kernel under `torch.inference_mode()` on the CPU (`astrai.model.native.fused`, bit for bit the same),
    else one rotation of both concatenated."""
    rotated = fused.rotary(q, k, cos, sin)
    if rotated is not None:
        return rotated
    q, k = apply_rotary_emb(torch.cat((q, k), dim=2), cos, sin).split((q.shape[2], k.shape[2]), dim=2)
    return q, k


class RotaryEmbedding(nn.Module):
    """Produces `(cos, sin)`, each (B, T, dim) float32, for given token positions."""

    def __init__(self, dim: int, max_len: int, base: float = 10000.0, scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        if dim <= 0 or dim % 2:
            raise ValueError(f"RotaryEmbedding dim={dim!r}: must be a positive even number")
        self.dim = dim
        self.max_len = max_len
        self.base = float(base)
        self.scaling = dict(scaling) if scaling else {}
        self.kind = self.scaling.get("rope_type", self.scaling.get("type", "default"))
        if self.kind not in _SCALED_INV_FREQ and self.kind not in ("default", "dynamic"):
            raise ValueError(f"RotaryEmbedding rope_scaling={scaling!r}: unknown kind {self.kind!r}")
        # device -> (inv_freq (dim/2,) float32, attention factor); deliberately not a buffer (see module doc).
        self._cache: dict[torch.device, tuple[Tensor, float]] = {}

    @classmethod
    def from_config(cls, config: Any) -> RotaryEmbedding:
        """The RoPE of a model config (`rope_dim`, `max_len`, `rope_theta`, `rope_scaling`)."""
        return cls(config.rope_dim, config.max_len, config.rope_theta, config.rope_scaling)

    def forward(self, x: Tensor, position_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """cos, sin (B, T, dim) float32 for `position_ids` (B, T); default positions 0..T-1 of `x` (B, T, ...)."""
        if position_ids is None:
            position_ids = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        inv_freq, attention_factor = self._frequencies(position_ids)
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, dim): pair i is channels i and i + dim/2
        return emb.cos() * attention_factor, emb.sin() * attention_factor

    def _frequencies(self, position_ids: Tensor) -> tuple[Tensor, float]:
        device = position_ids.device
        if device not in self._cache:
            base_inv_freq = _default_inv_freq(self.dim, self.base, device)
            scaled = _SCALED_INV_FREQ.get(self.kind)
            self._cache[device] = scaled(self, base_inv_freq) if scaled else (base_inv_freq, 1.0)
        inv_freq, attention_factor = self._cache[device]
        if self.kind == "dynamic":
            inv_freq = self._dynamic_ntk(inv_freq, position_ids)
        return inv_freq, attention_factor

    def _dynamic_ntk(self, inv_freq: Tensor, position_ids: Tensor) -> Tensor:
        """Dynamic NTK: beyond `max_len` the base grows with the batch's longest position (no host sync)."""
        seq_len = position_ids.max() + 1
        factor = self.scaling["factor"]
        grown = seq_len.clamp(min=self.max_len)
        base = self.base * ((factor * grown / self.max_len) - (factor - 1)) ** (self.dim / (self.dim - 2))
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64, device=inv_freq.device).float() / self.dim
        ntk_inv_freq = 1.0 / (base**exponents)
        return torch.where(seq_len > self.max_len, ntk_inv_freq, inv_freq)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_len={self.max_len}, base={self.base}, kind={self.kind}"


def _default_inv_freq(dim: int, base: float, device: torch.device) -> Tensor:
    """`inv_freq[i] = base^(-2i/dim)`, i = 0..dim/2-1, float32 (transformers' formula and op order)."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))


def _linear(rope: RotaryEmbedding, inv_freq: Tensor) -> tuple[Tensor, float]:
    """Position interpolation: every angle divided by `factor`."""
    return inv_freq / rope.scaling["factor"], 1.0


def _llama3(rope: RotaryEmbedding, inv_freq: Tensor) -> tuple[Tensor, float]:
    """Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth ramp in between."""
    s = rope.scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context_len = s["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled), 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(rope: RotaryEmbedding, inv_freq: Tensor) -> tuple[Tensor, float]:
    """YaRN (arXiv 2309.00071): interpolate low frequencies, extrapolate high ones, scale cos/sin."""
    s, dim, base = rope.scaling, rope.dim, rope.base
    factor = s["factor"]
    original_len = s.get("original_max_position_embeddings") or rope.max_len
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(n_rotations: float) -> float:
        # the channel pair whose wavelength fits `n_rotations` times into the original context
        return (dim * math.log(original_len / (n_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(inv_freq.device)
    extrapolation = 1 - ramp  # 1: keep the original frequency, 0: fully interpolated
    pos_freqs = base ** (torch.arange(0, dim, 2, device=inv_freq.device).float() / dim)
    interpolated, extrapolated = 1.0 / (factor * pos_freqs), 1.0 / pos_freqs
    return interpolated * (1 - extrapolation) + extrapolated * extrapolation, float(attention_factor)


_SCALED_INV_FREQ = {"linear": _linear, "llama3": _llama3, "yarn": _yarn}
