"""RoPE: every `rope_scaling` kind gives transformers' cos/sin exactly; rotation matches HF's layout."""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV3Config, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_apply_rotary_pos_emb

from astrai.model import RotaryEmbedding, apply_rotary_emb

MAX_LEN = 64
SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn-tuned": {
        "rope_type": "yarn",
        "factor": 8.0,
        "original_max_position_embeddings": 32,
        "beta_fast": 16,
        "beta_slow": 2,
        "attention_factor": 0.8,
        "truncate": False,
    },
}


def hf_rope(scaling, theta=10000.0, head_dim=32):
    params = {"rope_type": "default", "rope_theta": theta} | (scaling or {})
    config = LlamaConfig(
        hidden_size=4 * head_dim, num_attention_heads=4, max_position_embeddings=MAX_LEN, rope_parameters=params
    )
    return LlamaRotaryEmbedding(config)


@pytest.mark.parametrize("kind", SCALINGS)
@pytest.mark.parametrize("longest", [40, 200], ids=["within", "beyond-max-len"])
def test_cos_sin_equal_transformers(kind, longest):
    scaling = SCALINGS[kind]
    hf = hf_rope(dict(scaling) if scaling else None, theta=50000.0)
    ours = RotaryEmbedding(32, MAX_LEN, 50000.0, scaling)
    positions = torch.stack([torch.arange(longest), torch.arange(longest).flip(0)])  # (2, T)
    x = torch.zeros(2, longest, 8)
    hf_cos, hf_sin = hf(x, positions)
    cos, sin = ours(x, positions)
    assert cos.shape == (2, longest, 32) and cos.dtype == torch.float32
    assert torch.equal(cos, hf_cos) and torch.equal(sin, hf_sin)


def test_deepseek_yarn_mscale_attention_factor():
    scaling = {
        "rope_type": "yarn",
        "factor": 40.0,
        "original_max_position_embeddings": 16,
        "mscale": 1.0,
        "mscale_all_dim": 0.707,
        "beta_fast": 32,
        "beta_slow": 1,
    }
    config = DeepseekV3Config(max_position_embeddings=MAX_LEN, qk_rope_head_dim=16, rope_parameters=dict(scaling))
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    hf = DeepseekV3RotaryEmbedding(config)
    positions = torch.arange(50)[None]
    hf_cos, hf_sin = hf(torch.zeros(1, 50, 4), positions)
    cos, sin = RotaryEmbedding(16, MAX_LEN, config.rope_parameters["rope_theta"], scaling)(positions, positions)
    assert torch.equal(cos, hf_cos) and torch.equal(sin, hf_sin)


def test_default_positions_and_validation():
    rope = RotaryEmbedding(8, 16)
    cos, _ = rope(torch.zeros(3, 5))
    assert cos.shape == (3, 5, 8)
    assert torch.equal(cos, rope(torch.zeros(3, 5), torch.arange(5).expand(3, 5))[0])
    with pytest.raises(ValueError, match="dim=7"):
        RotaryEmbedding(7, 16)
    with pytest.raises(ValueError, match="unknown kind 'longrope'"):
        RotaryEmbedding(8, 16, scaling={"rope_type": "longrope", "factor": 2.0})


def test_apply_rotary_emb_equals_transformers():
    torch.manual_seed(0)
    q, k = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 2, 16)  # (B, T, H, d)
    cos, sin = RotaryEmbedding(16, 32)(q, torch.randint(0, 30, (2, 5)))
    hf_q, hf_k = hf_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    assert torch.equal(apply_rotary_emb(q, cos, sin), hf_q)
    assert torch.equal(apply_rotary_emb(k, cos, sin), hf_k)
    rotated = apply_rotary_emb(q.bfloat16(), cos, sin)
    assert rotated.dtype == torch.bfloat16
    assert torch.allclose(rotated.float(), hf_q, atol=0.05)


def test_rotation_preserves_relative_positions():
    """q.k after RoPE depends only on the position difference (the point of RoPE)."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    rope = RotaryEmbedding(16, 32)

    def score(pq, pk):
        cq, sq = rope(q, torch.tensor([[pq]]))
        ck, sk = rope(k, torch.tensor([[pk]]))
        return (apply_rotary_emb(q, cq, sq) * apply_rotary_emb(k, ck, sk)).sum()

    assert torch.allclose(score(7, 3), score(24, 20), atol=1e-5)
