"""Qwen3-MoE checkpoints: AutoModel.from_pretrained(HF folder) matches transformers; layouts; export round trip."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from astrai.model import MLP, AutoModel, DeepSeekMoE
from astrai.model.hf.qwen3_moe import Qwen3MoeConverter


def tiny_qwen3_moe(**overrides) -> Qwen3MoeForCausalLM:
    """2 layers, GQA 4/2 heads with head_dim 16 and qk-norm, 8 experts (top-2)."""
    torch.manual_seed(0)
    fields = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, max_position_embeddings=128,
    )  # fmt: skip
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**fields, **overrides})).eval()
    with torch.no_grad():  # spread the router logits so near-ties cannot flip an expert choice
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.normal_(0.0, 0.5)
    return model


def logits_of(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, Qwen3MoeForCausalLM):
            return model(input_ids=ids, attention_mask=mask).logits
        return model(ids, input_mask=mask)["logits"]


@pytest.mark.parametrize("overrides", [{}, {"norm_topk_prob": False, "tie_word_embeddings": True}])
def test_from_pretrained_matches_transformers(tmp_path, overrides):
    hf = tiny_qwen3_moe(**overrides)
    hf.save_pretrained(tmp_path)
    ours = AutoModel.from_pretrained(tmp_path)
    cfg = ours.config
    assert (cfg.ffn_type, cfg.topk_method, cfg.n_shared_experts, cfg.n_routed_experts) == ("moe", "greedy", 0, 8)
    assert (cfg.use_qk_norm, cfg.norm_topk_prob) == (True, hf.config.norm_topk_prob)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits_of(ours, ids), logits_of(hf, ids), atol=1e-4, rtol=0)

    mask = torch.ones_like(ids)
    mask[0, 17:] = 0
    real = mask.bool()
    torch.testing.assert_close(logits_of(ours, ids, mask)[real], logits_of(hf, ids, mask)[real], atol=1e-4, rtol=0)


def test_leading_dense_layers(tmp_path):
    hf = tiny_qwen3_moe(mlp_only_layers=[0])
    hf.save_pretrained(tmp_path)
    ours = AutoModel.from_pretrained(tmp_path)
    assert ours.config.n_dense_layers == 1
    assert isinstance(ours.layers[0].mlp, MLP) and isinstance(ours.layers[1].mlp, DeepSeekMoE)
    ids = torch.randint(0, 128, (1, 16))
    torch.testing.assert_close(logits_of(ours, ids), logits_of(hf, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", [{"decoder_sparse_step": 2}, {"mlp_only_layers": [1]}, {"mlp_only_layers": [0, 2]}])
def test_unsupported_layouts_raise(layout):
    hf = {**tiny_qwen3_moe().config.to_dict(), **layout}
    with pytest.raises(ValueError, match="decoder_sparse_step"):
        Qwen3MoeConverter().config_from_hf(hf)


def test_hub_config_key_num_experts():
    hf = tiny_qwen3_moe().config.to_dict()
    hf["num_experts"] = hf.pop("num_local_experts", 8)
    assert Qwen3MoeConverter().config_from_hf(hf).n_routed_experts == 8


def test_export_round_trip_through_transformers(tmp_path):
    hf = tiny_qwen3_moe(mlp_only_layers=[0])
    hf.save_pretrained(tmp_path / "hf")
    ours = AutoModel.from_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "export", format="hf")
    assert json.loads((tmp_path / "export" / "config.json").read_text())["model_type"] == "qwen3_moe"
    reloaded = Qwen3MoeForCausalLM.from_pretrained(tmp_path / "export").eval()
    ids = torch.randint(0, 128, (2, 16))
    torch.testing.assert_close(logits_of(reloaded, ids), logits_of(hf, ids), atol=1e-5, rtol=0)


def test_export_rejects_shared_experts(tmp_path):
    hf = tiny_qwen3_moe()
    hf.save_pretrained(tmp_path)
    cfg = AutoModel.from_pretrained(tmp_path).config
    with pytest.raises(ValueError, match="n_shared_experts=1"):
        Qwen3MoeConverter().config_to_hf(cfg.replace(n_shared_experts=1))
