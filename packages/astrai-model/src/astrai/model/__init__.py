"""AstrAI models: decoder LM (GQA/MLA attention, dense/MoE feed-forward), embedding encoder, `AutoModel`."""

from astrai.model.attention import GQA
from astrai.model.automodel import AutoModel
from astrai.model.decoder_block import DecoderBlock
from astrai.model.embedding import Embedding
from astrai.model.encoder import EmbeddingEncoder
from astrai.model.factories import AttnFactory, FFNFactory
from astrai.model.linear import Linear, pack_linear_weights
from astrai.model.mla import MLA
from astrai.model.mlp import MLP
from astrai.model.moe import DeepSeekMoE
from astrai.model.norm import RMSNorm
from astrai.model.perplexity import (
    PerplexityResult,
    evaluate_perplexity,
    read_documents,
    scoring_windows,
    token_stream,
)
from astrai.model.reference_cache import ContiguousKVCache, ContiguousKVView
from astrai.model.rope import RotaryEmbedding, apply_rotary_emb
from astrai.model.transformer import AutoRegressiveLM

__all__ = [
    "GQA",
    "MLA",
    "MLP",
    "AttnFactory",
    "AutoModel",
    "AutoRegressiveLM",
    "ContiguousKVCache",
    "ContiguousKVView",
    "DecoderBlock",
    "DeepSeekMoE",
    "Embedding",
    "EmbeddingEncoder",
    "FFNFactory",
    "Linear",
    "pack_linear_weights",
    "PerplexityResult",
    "RMSNorm",
    "RotaryEmbedding",
    "apply_rotary_emb",
    "evaluate_perplexity",
    "read_documents",
    "scoring_windows",
    "token_stream",
]
