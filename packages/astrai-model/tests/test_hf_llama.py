"""Llama and Mistral checkpoints written by transformers load with the same logits (fp32, max abs 1e-4),
and our Llama-shaped models export to folders transformers loads with the same logits."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from astrai.model import AutoModel, AutoRegressiveLM

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


@pytest.mark.parametrize(
    "rope_scaling",
    [None, LLAMA3, {"rope_type": "linear", "factor": 2.0}, {"rope_type": "dynamic", "factor": 2.0}],
    ids=["default", "llama3", "linear", "dynamic"],
)
def test_llama_logits_match_transformers(tmp_path, hf_checkpoint, assert_same_logits, rope_scaling):
    # 32 positions < the 40-token batch, so dynamic NTK really rescales and llama3/linear see long positions
    # (a copy: transformers adds `rope_theta` into the dict it is given)
    rope = dict(rope_scaling) if rope_scaling else None
    hf_model = hf_checkpoint(tmp_path, "Llama", rope_scaling=rope, max_position_embeddings=32)
    ours = AutoModel.from_pretrained(tmp_path)
    assert isinstance(ours, AutoRegressiveLM)
    kind = None if ours.config.rope_scaling is None else ours.config.rope_scaling["rope_type"]
    assert kind == (rope_scaling or {}).get("rope_type")
    assert_same_logits(hf_model, ours)


def test_llama_tied_embeddings(tmp_path, hf_checkpoint, assert_same_logits):
    hf_model = hf_checkpoint(tmp_path, "Llama", tie_word_embeddings=True)
    ours = AutoModel.from_pretrained(tmp_path)
    assert ours.config.tie_weight
    assert ours.lm_head.weight is ours.embed_tokens.weight
    assert_same_logits(hf_model, ours)


def test_mistral_logits_match_and_window_bounds_max_len(tmp_path, hf_checkpoint, assert_same_logits):
    hf_model = hf_checkpoint(tmp_path, "Mistral", sliding_window=48)
    ours = AutoModel.from_pretrained(tmp_path)
    assert ours.config.max_len == 48  # sliding window shorter than the context
    assert_same_logits(hf_model, ours)


def test_sharded_hf_checkpoint(tmp_path, hf_checkpoint, assert_same_logits):
    hf_model = hf_checkpoint(tmp_path / "single", "Llama")
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert_same_logits(hf_model, AutoModel.from_pretrained(tmp_path / "sharded"), seq=10)


@pytest.mark.parametrize("tie", [False, True])
def test_export_llama_round_trip(tmp_path, lm_config, assert_same_logits, tie):
    torch.manual_seed(0)
    config = lm_config(tie_weight=tie, rope_theta=500000.0, rope_scaling=dict(LLAMA3), norm_eps=1e-5)
    ours = AutoRegressiveLM(config).eval()
    ours.save_pretrained(tmp_path, format="hf")
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf_model).__name__ == "LlamaForCausalLM"
    assert_same_logits(hf_model, ours)
    assert AutoModel.from_pretrained(tmp_path).config.to_dict() == config.to_dict()  # and back


def test_unsupported_llama_features_are_errors(tmp_path, hf_checkpoint):
    hf_checkpoint(tmp_path, "Llama", mlp_bias=True)
    with pytest.raises(ValueError, match="mlp_bias"):
        AutoModel.from_pretrained(tmp_path)
