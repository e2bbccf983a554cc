"""DeepSeek-V3 checkpoints: AutoModel.from_pretrained(HF folder) matches transformers; export round trip."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from astrai.model import AutoModel, AutoRegressiveLM, DeepSeekMoE
from astrai.model.hf.deepseek import DeepseekV3Converter, deinterleave_rope_rows

YARN = {
    "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
    "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0,
}  # fmt: skip


def tiny_deepseek(q_lora_rank: int | None, **overrides) -> DeepseekV3ForCausalLM:
    """2 layers (the first dense), MLA, 8 routed experts in 4 groups, noaux_tc routing, YaRN RoPE."""
    torch.manual_seed(0)
    cfg = DeepseekV3Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1, kv_lora_rank=16,
        q_lora_rank=q_lora_rank, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=256,
        rope_parameters=YARN, **overrides,
    )  # fmt: skip
    model = DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():  # spread the routing scores so near-ties cannot flip an expert choice
        for layer in model.model.layers[1:]:
            layer.mlp.gate.weight.normal_(0.0, 0.5)
            layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.1)
    return model


def hf_logits(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def our_logits(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, input_mask=mask)["logits"]


@pytest.mark.parametrize("q_lora_rank", [24, None])
def test_from_pretrained_matches_transformers(tmp_path, q_lora_rank):
    hf = tiny_deepseek(q_lora_rank)
    hf.save_pretrained(tmp_path)
    ours = AutoModel.from_pretrained(tmp_path)
    assert isinstance(ours, AutoRegressiveLM)
    cfg = ours.config
    assert (cfg.attn_type, cfg.ffn_type, cfg.topk_method, cfg.n_dense_layers) == ("mla", "moe", "noaux_tc", 1)
    assert (cfg.q_lora_rank, cfg.rope_scaling["rope_type"], cfg.routed_scaling_factor) == (q_lora_rank, "yarn", 2.5)
    assert not isinstance(ours.layers[0].mlp, DeepSeekMoE) and isinstance(ours.layers[1].mlp, DeepSeekMoE)

    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))  # past original 32 positions
    torch.testing.assert_close(our_logits(ours, ids), hf_logits(hf, ids), atol=1e-4, rtol=0)

    # Right-padded batch: the real positions of each row match transformers'.
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    theirs, mine = hf_logits(hf, ids, mask), our_logits(ours, ids, mask)
    torch.testing.assert_close(mine[mask.bool()], theirs[mask.bool()], atol=1e-4, rtol=0)


def test_multi_token_prediction_layers_are_dropped(tmp_path):
    hf = tiny_deepseek(24)
    hf.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.2.eh_proj.weight"] = torch.zeros(64, 128)  # what DeepSeek-V3 ships as layer 61
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = AutoModel.from_pretrained(tmp_path)
    ids = torch.randint(0, 128, (1, 12))
    torch.testing.assert_close(our_logits(ours, ids), hf_logits(hf, ids), atol=1e-4, rtol=0)


def test_deinterleave_rope_rows():
    weight = torch.arange(2 * 6, dtype=torch.float32)[:, None]  # 2 blocks of (2 nope | 4 rope) rows
    out = deinterleave_rope_rows(weight, row_block=6, rope_dim=4).flatten().tolist()
    assert out == [0, 1, 2, 4, 3, 5, 6, 7, 8, 10, 9, 11]


def test_config_errors_name_the_field():
    hf = tiny_deepseek(24).config.to_dict()
    with pytest.raises(ValueError, match="attention_bias"):
        DeepseekV3Converter().config_from_hf({**hf, "attention_bias": True})
    with pytest.raises(ValueError, match="n_activated_experts"):  # 9 experts out of 8
        DeepseekV3Converter().config_from_hf({**hf, "num_experts_per_tok": 9})


def test_export_round_trip_through_transformers(tmp_path):
    hf = tiny_deepseek(24)
    hf.save_pretrained(tmp_path / "hf")
    ours = AutoModel.from_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "export", format="hf")
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert (exported["model_type"], exported["rope_interleave"]) == ("deepseek_v3", False)
    reloaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "export").eval()
    ids = torch.randint(0, 128, (2, 20))
    torch.testing.assert_close(hf_logits(reloaded, ids), hf_logits(hf, ids), atol=1e-4, rtol=0)
    # And back: our names and values are restored exactly.
    again = AutoModel.from_pretrained(tmp_path / "export")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_export_rejects_what_deepseek_cannot_express(tmp_path):
    hf = tiny_deepseek(24)
    hf.save_pretrained(tmp_path)
    cfg = AutoModel.from_pretrained(tmp_path).config
    with pytest.raises(ValueError, match="topk_method"):
        DeepseekV3Converter().config_to_hf(cfg.replace(topk_method="greedy"))
    with pytest.raises(ValueError, match="attn_type='mla'"):
        DeepseekV3Converter().config_to_hf(cfg.replace(attn_type="gqa"))
    with pytest.raises(ValueError, match="use_qk_norm=True"):
        DeepseekV3Converter().config_to_hf(cfg.replace(use_qk_norm=True))
