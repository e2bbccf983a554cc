"""`DecoderBlock`: one pre-norm transformer layer, `x + attn(norm(x))` then `x + ffn(norm(x))`.

The same block serves the decoder LM (causal) and the encoder (bidirectional): causality comes from the
mask the model passes, or from `is_causal` when that mask is None.
"""

from __future__ import annotations

from torch import Tensor, nn

from astrai.config import AutoRegressiveLMConfig, EncoderConfig
from astrai.model.factories import AttnFactory, FFNFactory
from astrai.model.norm import RMSNorm
from astrai.protocols import KVCacheView


class DecoderBlock(nn.Module):
    """Attention (`attn_type` from `AttnFactory`) and feed-forward (`ffn_type` from `FFNFactory`), each pre-normed."""

    def __init__(
        self,
        config: AutoRegressiveLMConfig | EncoderConfig,
        layer_id: int,
        attn_type: str = "gqa",
        ffn_type: str = "mlp",
    ) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.input_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = AttnFactory.create(attn_type, config=config, layer_id=layer_id)
        self.post_attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = FFNFactory.from_config(ffn_type, config)

    def forward(
        self,
        x: Tensor,
        rotary_emb: tuple[Tensor, Tensor],
        attention_mask: Tensor | None = None,
        paged_cache: KVCacheView | None = None,
        *,
        is_causal: bool = True,
    ) -> Tensor:
        """x (B, T, dim) -> (B, T, dim)."""
        x = x + self.attention(self.input_norm(x), rotary_emb, attention_mask, paged_cache, is_causal=is_causal)
        return x + self.mlp(self.post_attention_norm(x))
