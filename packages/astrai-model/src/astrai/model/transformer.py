"""`AutoRegressiveLM`: the decoder-only language model.

    input_ids (B, T) -> embed_tokens -> n_layers x DecoderBlock -> norm -> lm_head -> logits (B, T, V)

Attention is GQA or MLA (`attn_type`), the feed-forward a SwiGLU MLP or DeepSeekMoE (`ffn_type`; the first
`n_dense_layers` layers stay dense). With `tie_weight` the LM head *is* the embedding matrix: one Parameter,
saved once (as `embed_tokens.weight`; `lm_head.weight` never appears in the state dict). An untied model loading
such a tied checkpoint starts its LM head as a copy of the embedding (as the original did), with a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from astrai.config import AutoRegressiveLMConfig
from astrai.model import cpu_step
from astrai.model.automodel import AutoModel
from astrai.model.decoder_block import DecoderBlock
from astrai.model.embedding import Embedding
from astrai.model.linear import Linear
from astrai.model.norm import RMSNorm
from astrai.model.rope import RotaryEmbedding
from astrai.model.sdpa import build_attention_mask, default_position_ids
from astrai.protocols import KVCacheView

logger = logging.getLogger(__name__)


@AutoModel.register("autoregressive_lm")
class AutoRegressiveLM(AutoModel, share_registry=True):
    """Decoder-only LM; `forward` returns `{"logits": (B, T, V), "hidden_states": (B, T, dim)}`."""

    def __init__(self, config: AutoRegressiveLMConfig) -> None:
        super().__init__(config)
        self.rotary_embedding = RotaryEmbedding.from_config(config)
        self.embed_tokens = Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(
            DecoderBlock(config, i, config.attn_type, "mlp" if i < config.n_dense_layers else config.ffn_type)
            for i in range(config.n_layers)
        )
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = Linear(config.dim, config.vocab_size)
        if config.tie_weight:
            self.lm_head.weight = self.embed_tokens.weight  # one Parameter; its init is the embedding's N(0, 0.02)
            self.register_state_dict_post_hook(_drop_tied_head)
            self.register_load_state_dict_pre_hook(_feed_tied_head)
            self.register_load_state_dict_post_hook(_retie_head)
        else:
            self.register_load_state_dict_pre_hook(_untie_head)

    def forward(
        self,
        input_ids: Tensor,
        input_mask: Tensor | None = None,
        paged_cache: KVCacheView | None = None,
        position_ids: Tensor | None = None,
        logits_index: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """input_ids (B, T); input_mask (B, T) 1 = token, 0 = padding (left or right; with a cache, right);
        paged_cache: this step's KV-cache view; position_ids (B, T) absolute positions (derived when None);
        logits_index (B,): the one position per row whose logits are wanted (an inference engine samples
        from each row's last token), so the LM head runs on B rows, not B * T; logits are then (B, 1, V).

        A packed cache view (`paged_cache.packed`) takes input_ids (1, N): every cached sequence's new tokens
        back to back, with their `position_ids` (1, N) and no input_mask; `logits_index` (R,) then picks R of
        the N tokens and logits are (R, 1, V)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        packed = paged_cache is not None and paged_cache.packed
        if packed:
            if input_ids.shape[0] != 1 or position_ids is None or input_mask is not None:
                raise ValueError("a packed cache step takes input_ids (1, N) with position_ids and no input_mask")
            mask = None  # the cache attends every query over its own sequence (KVCacheView.attend)
        else:
            kv_lens = paged_cache.seq_lens if paged_cache is not None else None
            if position_ids is None:
                position_ids = default_position_ids(input_ids, input_mask, kv_lens)
            mask = build_attention_mask(input_mask, position_ids, kv_lens, is_causal=True)  # None: plain causal
        rotary_emb = self.rotary_embedding(input_ids, position_ids)  # (cos, sin), (B, T, rope_dim) float32

        h = self.embed_tokens(input_ids)  # (B, T, dim)
        fast = cpu_step.run_layers(self.layers, h, rotary_emb, paged_cache) if packed else None
        if fast is not None:  # a packed CPU inference step: the same calls, checked once per step
            h = fast
        else:
            for layer in self.layers:
                h = layer(h, rotary_emb, mask, paged_cache)
        h = self.norm(h)
        if logits_index is None:
            return {"logits": self.lm_head(h), "hidden_states": h}
        picked = h[0, logits_index] if packed else h[torch.arange(h.shape[0], device=h.device), logits_index]
        return {"logits": self.lm_head(picked).unsqueeze(1), "hidden_states": h}

    def _complete_state_dict(self, tensors: dict[str, Tensor], source: str | Path = "state dict") -> dict[str, Tensor]:
        if self.config.tie_weight:
            return tensors
        return _with_untied_head(tensors, "", source)

    @property
    def aux_loss(self) -> Tensor:
        """Sum of the MoE layers' (coefficient-weighted) auxiliary losses of the last forward; 0 without MoE."""
        losses = [layer.mlp.aux_loss for layer in self.layers if getattr(layer.mlp, "aux_loss", None) is not None]
        if not losses:
            return torch.zeros((), device=self.embed_tokens.weight.device)
        return torch.stack([loss.float() for loss in losses]).sum()


# Tied weights: `lm_head.weight` is left out of saved state and rebuilt from `embed_tokens.weight` on load.
# Hooks (not overrides) so the tie also survives loading through a wrapper (DDP, FSDP, a training module).


def _drop_tied_head(module: AutoRegressiveLM, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    state_dict.pop(prefix + "lm_head.weight", None)


def _feed_tied_head(module: AutoRegressiveLM, state_dict: dict, prefix: str, *args: object) -> None:
    if prefix + "embed_tokens.weight" in state_dict:
        state_dict[prefix + "lm_head.weight"] = state_dict[prefix + "embed_tokens.weight"]


def _retie_head(module: AutoRegressiveLM, incompatible_keys: object) -> None:
    module.lm_head.weight = module.embed_tokens.weight  # `assign=True` loading made two Parameters


def _untie_head(module: AutoRegressiveLM, state_dict: dict, prefix: str, *args: object) -> None:
    state_dict.update(_with_untied_head(state_dict, prefix, "state dict"))


def _with_untied_head(tensors: dict[str, Tensor], prefix: str, source: str | Path) -> dict[str, Tensor]:
    """A tied checkpoint (an embedding, no LM head) for an untied model: the head starts as a copy of the embedding."""
    head, embedding = prefix + "lm_head.weight", prefix + "embed_tokens.weight"
    if head in tensors or embedding not in tensors:
        return tensors
    logger.warning("%s: no %s (a tied checkpoint); the untied LM head starts as a copy of %s", source, head, embedding)
    return {**tensors, head: tensors[embedding].clone()}
