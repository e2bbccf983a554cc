"""MLA: parity with transformers' DeepseekV3Attention, latent KV caching, absorption, KV-head groups, gating."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

from astrai.config import AutoRegressiveLMConfig
from astrai.model import AutoModel, AutoRegressiveLM, ContiguousKVCache
from astrai.model.factories import AttnFactory
from astrai.model.hf.deepseek import DeepseekV3Converter
from astrai.model.mla import MLA, yarn_softmax_mscale

YARN = {
    "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
    "mscale": 1.0, "mscale_all_dim": 0.707, "rope_theta": 10000.0,
}  # fmt: skip
MLA_DIMS = dict(kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12)
OURS = dict(vocab_size=64, dim=64, n_layers=1, n_heads=4, dim_ffn=96, max_len=128, attn_type="mla", **MLA_DIMS)


def randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.data = torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if p.ndim == 1 else 0.0)  # norms around 1
    return module


def hf_attention(q_lora_rank, rope_interleave, rope_parameters):
    hf_cfg = DeepseekV3Config(
        vocab_size=64, hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=1,
        q_lora_rank=q_lora_rank, rope_interleave=rope_interleave, max_position_embeddings=128, first_k_dense_replace=1,
        rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}, **MLA_DIMS,
    )  # fmt: skip
    hf_cfg._attn_implementation = "eager"
    return hf_cfg, randomise(DeepseekV3Attention(hf_cfg, layer_idx=0)).eval()


def converted(hf_cfg, attn: nn.Module) -> tuple[AutoRegressiveLMConfig, MLA]:
    converter = DeepseekV3Converter()
    cfg = converter.config_from_hf(hf_cfg.to_dict())
    hf_names = {f"model.layers.0.self_attn.{k}": v for k, v in attn.state_dict().items()}
    ours = converter.state_dict_from_hf(hf_names, cfg)
    mla = AttnFactory.create("mla", cfg, 0)
    mla.load_state_dict({k.removeprefix("layers.0.attention."): v for k, v in ours.items()}, strict=True)
    return cfg, mla.eval()


def causal_additive(T: int) -> torch.Tensor:
    return torch.full((T, T), float("-inf")).triu(1)[None, None]


@pytest.mark.parametrize(
    "q_lora_rank,rope_interleave,rope_parameters",
    [(24, True, YARN), (None, True, None), (24, False, YARN), (None, False, None)],
)
def test_parity_with_transformers(q_lora_rank, rope_interleave, rope_parameters):
    hf_cfg, attn = hf_attention(q_lora_rank, rope_interleave, rope_parameters)
    cfg, mla = converted(hf_cfg, attn)
    assert (mla.q_lora_rank, cfg.rope_dim) == (q_lora_rank, 8)
    assert mla.scale == pytest.approx(attn.scaling, rel=1e-12)

    x = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(1))
    position_ids = torch.arange(10)[None].expand(2, -1)
    cos, sin = DeepseekV3RotaryEmbedding(hf_cfg)(x, position_ids)
    expected, _ = attn(x, (cos, sin), causal_additive(10))
    torch.testing.assert_close(mla(x, (cos, sin), None), expected, atol=1e-5, rtol=0)


def test_yarn_softmax_mscale():
    assert yarn_softmax_mscale(None) == 1.0
    assert yarn_softmax_mscale({"rope_type": "yarn", "factor": 4.0}) == 1.0  # no mscale_all_dim
    assert yarn_softmax_mscale({"rope_type": "yarn", "factor": 1.0, "mscale_all_dim": 1.0}) == 1.0
    m = 0.1 * 0.707 * torch.log(torch.tensor(40.0, dtype=torch.float64)).item() + 1.0
    assert yarn_softmax_mscale({"type": "yarn", "factor": 40.0, "mscale_all_dim": 0.707}) == pytest.approx(m * m)


def test_absorb_is_cheaper_threshold():
    # kv_lora_rank=16, nope=16, v=12: absorbing adds 2*16-16-12 = 4 per query, expanding costs 16*28 = 448 per key.
    mla = MLA(AutoRegressiveLMConfig(**OURS), 0)
    assert mla.absorb_is_cheaper(111) and not mla.absorb_is_cheaper(112)
    # With n_kv_heads=2 (n_rep=2) expansion is half as expensive per query head.
    mla = MLA(AutoRegressiveLMConfig(**OURS, n_kv_heads=2), 0)
    assert mla.absorb_is_cheaper(55) and not mla.absorb_is_cheaper(56)
    # A latent no wider than nope + v: absorption is never more expensive.
    mla = MLA(AutoRegressiveLMConfig(**{**OURS, "kv_lora_rank": 14}), 0)
    assert mla.absorb_is_cheaper(10**6)


def test_grouped_kv_heads_equal_repeated_heads():
    """n_kv_heads=2 behaves as 4 heads whose kv_b_proj blocks are repeated (query head h reads kv head h // 2)."""
    grouped = randomise(MLA(AutoRegressiveLMConfig(**OURS, n_kv_heads=2), 0)).eval()
    full = MLA(AutoRegressiveLMConfig(**OURS), 0).eval()
    state = dict(grouped.state_dict())
    state["kv_b_proj.weight"] = state["kv_b_proj.weight"].view(2, 28, 16).repeat_interleave(2, 0).reshape(112, 16)
    full.load_state_dict(state)
    x = torch.randn(1, 6, 64)
    cos, sin = torch.randn(1, 6, 8), torch.randn(1, 6, 8)
    torch.testing.assert_close(grouped(x, (cos, sin)), full(x, (cos, sin)), atol=1e-6, rtol=0)


def test_gated_attention_scales_heads_before_o_proj():
    cfg = AutoRegressiveLMConfig(**OURS, use_gated_attention=True)
    gated = randomise(MLA(cfg, 0)).eval()
    with torch.no_grad():
        gated.gate.weight.zero_()  # sigmoid(0) = 1/2 for every channel
    plain = MLA(AutoRegressiveLMConfig(**OURS), 0).eval()
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if not k.startswith("gate.")})
    x = torch.randn(2, 5, 64)
    cos, sin = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    torch.testing.assert_close(gated(x, (cos, sin)), 0.5 * plain(x, (cos, sin)), atol=1e-6, rtol=0)


def test_architecture_attributes():
    mla = MLA(AutoRegressiveLMConfig(**OURS, q_lora_rank=24), 3)
    assert (mla.n_heads, mla.n_kv_heads, mla.n_rep, mla.head_dim, mla.layer_id) == (4, 4, 1, 24, 3)
    assert (mla.use_qk_norm, mla.use_gated_attention) == (False, False)
    assert not hasattr(mla, "q_norm") and not hasattr(mla, "k_norm") and not hasattr(mla, "gate")
    assert mla.kv_a_proj.weight.shape == (16 + 8, 64) and mla.kv_norm.weight.shape == (16,)
    assert mla.kv_b_proj.weight.shape == (4 * (16 + 12), 16) and mla.o_proj.weight.shape == (64, 4 * 12)
    assert mla.q_a_proj.weight.shape == (24, 64) and mla.q_b_proj.weight.shape == (4 * 24, 24)
    assert not hasattr(MLA(AutoRegressiveLMConfig(**OURS), 0), "q_a_proj")
    mla = MLA(AutoRegressiveLMConfig(**OURS, use_qk_norm=True, use_gated_attention=True), 0)
    assert (mla.use_qk_norm, mla.use_gated_attention) == (True, True)
    assert mla.q_norm.weight.shape == mla.k_norm.weight.shape == (24,)  # head_dim = nope + rope
    assert mla.q_proj.weight.shape == (4 * 24, 64) and mla.gate.weight.shape == (4 * 12, 64)


def test_qk_norm_normalises_each_heads_full_query_and_key():
    """q_norm / k_norm act on each head's whole `nope | rope` vector: scaling a head's query or key changes nothing."""
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(3))
    cos, sin = torch.randn(2, 7, 8), torch.randn(2, 7, 8)
    for use_qk_norm in (True, False):
        cfg = AutoRegressiveLMConfig(**OURS, use_qk_norm=use_qk_norm)
        mla = randomise(MLA(cfg, 0)).eval()
        with torch.no_grad():
            out = mla(x, (cos, sin))
            mla.q_proj.weight.mul_(10.0)  # every query x10
            scaled_q = mla(x, (cos, sin))
            mla.q_proj.weight.div_(10.0)
            mla.kv_a_proj.weight[16:].mul_(10.0)  # the shared RoPE key x10 ...
            mla.kv_b_proj.weight.view(4, 28, 16)[:, :16].mul_(10.0)  # ... and every head's no-RoPE key x10
            scaled_k = mla(x, (cos, sin))
        if use_qk_norm:
            torch.testing.assert_close(scaled_q, out, atol=1e-5, rtol=0)
            torch.testing.assert_close(scaled_k, out, atol=1e-5, rtol=0)
        else:  # the check above has teeth: without the norms the scores change
            assert (scaled_q - out).abs().max() > 1e-2 and (scaled_k - out).abs().max() > 1e-2


# --- in a model: latent KV cache and native save/load ---------------------------------------------------------

# kv_lora_rank=64, nope=v=8: absorbing costs 112 more per query, expanding 1024 per key, so blocks of 10+ queries
# expand the cached latents and shorter ones (decode) attend over them directly.
CACHED = dict(OURS, n_layers=2, kv_lora_rank=64, qk_nope_head_dim=8, v_head_dim=8, q_lora_rank=24)


def tiny_lm(**fields) -> AutoRegressiveLM:
    torch.manual_seed(0)
    return AutoModel.from_config(AutoRegressiveLMConfig(**fields)).eval()


def test_cached_decode_equals_full_forward():
    model = tiny_lm(**CACHED, rope_scaling={"rope_type": "yarn", "factor": 2.0, "mscale_all_dim": 1.0})
    attn = model.layers[0].attention
    assert not attn.absorb_is_cheaper(10) and attn.absorb_is_cheaper(1)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    lens = [16, 13]  # ragged rows: prompts of 12 and 9 tokens, then 4 decode steps each
    with torch.no_grad():
        full = [model(ids[b : b + 1, :n])["logits"][0] for b, n in enumerate(lens)]
        cache = ContiguousKVCache(n_layers=2, batch_size=2, max_len=16)
        prompt_mask = torch.tensor([[1] * 12, [1] * 9 + [0] * 3])
        steps = [model(ids[:, :12], prompt_mask, paged_cache=cache.bind([12, 9]))["logits"]]
        for t in range(4):
            step_ids = torch.stack([ids[0, 12 + t], ids[1, 9 + t]])[:, None]
            steps.append(model(step_ids, paged_cache=cache.bind(1))["logits"])

    # the cache holds the latent (64) and the shared RoPE key (8) per token, not per-head K/V
    assert cache.keys[0].shape == (2, 16, 64) and cache.values[0].shape == (2, 16, 8)
    for b, n_prompt in enumerate([12, 9]):
        cached = torch.cat([steps[0][b, :n_prompt]] + [s[b] for s in steps[1:]])
        torch.testing.assert_close(cached, full[b], atol=1e-5, rtol=0)


def test_qk_norm_cached_decode_token_by_token_equals_full_forward():
    """With qk-norm the cache still holds only latents and RoPE keys; decode expands them (no absorption)."""
    torch.manual_seed(0)
    model = randomise(
        AutoModel.from_config(AutoRegressiveLMConfig(**CACHED, use_qk_norm=True, use_gated_attention=True))
    ).eval()
    attn = model.layers[1].attention
    assert attn.use_qk_norm and attn.absorb_is_cheaper(1)  # absorption would be chosen without qk-norm
    ids = torch.randint(0, 64, (2, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)["logits"]
        cache = ContiguousKVCache(n_layers=2, batch_size=2, max_len=14)
        steps = [model(ids[:, t : t + 1], paged_cache=cache.bind(1))["logits"] for t in range(14)]
    assert cache.keys[0].shape == (2, 14, 64) and cache.values[0].shape == (2, 14, 8)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    assert torch.isfinite(full).all() and full.std() > 0


def test_native_save_load_round_trip_is_bit_exact(tmp_path):
    model = tiny_lm(**CACHED, use_gated_attention=True, tie_weight=True)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert loaded.config == model.config
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys() and "layers.1.attention.kv_a_proj.weight" in state
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids)["logits"], loaded(ids)["logits"])
