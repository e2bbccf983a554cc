"""`EmbeddingEncoder`: a bidirectional transformer trunk that pools its states into one vector per sequence.

    input_ids (B, T) -> embed_tokens -> n_layers x DecoderBlock (no causal mask) -> norm -> pool -> (B, dim)

Pooling honours the padding mask whatever side the padding is on: `mean` averages the real tokens, `cls`
takes the first real token, `last` the last real one. Positions are derived from the mask, so padding
never changes a sequence's embedding. `normalize_embeddings` L2-normalises the result.
An `AutoRegressiveLM` checkpoint of the same trunk loads into an encoder (its `lm_head.weight` is ignored).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from astrai.config import EncoderConfig
from astrai.model.automodel import AutoModel
from astrai.model.decoder_block import DecoderBlock
from astrai.model.embedding import Embedding
from astrai.model.norm import RMSNorm
from astrai.model.rope import RotaryEmbedding
from astrai.model.sdpa import build_attention_mask, default_position_ids


@AutoModel.register("embedding")
class EmbeddingEncoder(AutoModel, share_registry=True):
    """Sentence-embedding model: `forward` returns (B, dim)."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        self.pooling_type = config.pooling_type
        self.normalize_embeddings = config.normalize_embeddings
        self.rotary_embedding = RotaryEmbedding.from_config(config)
        self.embed_tokens = Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(DecoderBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.register_load_state_dict_pre_hook(_drop_lm_head)

    def forward(
        self, input_ids: Tensor, input_mask: Tensor | None = None, position_ids: Tensor | None = None
    ) -> Tensor:
        """input_ids (B, T), input_mask (B, T) 1 = token, 0 = padding -> embeddings (B, dim)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        if position_ids is None:
            position_ids = default_position_ids(input_ids, input_mask, None)
        mask = build_attention_mask(input_mask, position_ids, is_causal=False)  # None: nothing to mask
        rotary_emb = self.rotary_embedding(input_ids, position_ids)

        h = self.embed_tokens(input_ids)  # (B, T, dim)
        for layer in self.layers:
            h = layer(h, rotary_emb, mask, is_causal=False)
        pooled = self._pool(self.norm(h), input_mask)  # (B, dim)
        return F.normalize(pooled, p=2, dim=-1) if self.normalize_embeddings else pooled

    def _pool(self, h: Tensor, input_mask: Tensor | None) -> Tensor:
        """h (B, T, dim) -> (B, dim) over the real tokens of each row."""
        B, T, _ = h.shape
        if input_mask is None:
            input_mask = torch.ones(B, T, dtype=torch.bool, device=h.device)
        real = input_mask.bool()
        if self.pooling_type == "mean":
            total = (h.float() * real[..., None]).sum(dim=1)  # (B, dim), summed in float32
            return (total / real.sum(dim=1, keepdim=True).clamp(min=1)).to(h.dtype)
        if self.pooling_type == "cls":
            index = real.int().argmax(dim=1)  # first real token
        else:  # "last" (the config allows only mean / cls / last)
            index = T - 1 - real.flip(1).int().argmax(dim=1)  # last real token
        return h[torch.arange(B, device=h.device), index]


def _drop_lm_head(module: EmbeddingEncoder, state_dict: dict, prefix: str, *args: object) -> None:
    state_dict.pop(prefix + "lm_head.weight", None)
