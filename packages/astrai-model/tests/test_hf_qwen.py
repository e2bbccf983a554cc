"""Qwen2 (q/k/v bias) and Qwen3 (qk-norm, explicit head_dim, YaRN) checkpoints load with transformers' logits;
Qwen3-shaped models export; configs with no Hugging Face counterpart refuse to export."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from astrai.model import AutoModel, AutoRegressiveLM, EmbeddingEncoder

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}


def test_qwen2_bias_logits_match(tmp_path, hf_checkpoint, assert_same_logits):
    hf_model = hf_checkpoint(tmp_path, "Qwen2")
    ours = AutoModel.from_pretrained(tmp_path)
    assert ours.config.attn_bias and not ours.config.use_qk_norm
    assert ours.layers[0].attention.q_proj.bias is not None and ours.layers[0].attention.o_proj.bias is None
    assert_same_logits(hf_model, ours)


@pytest.mark.parametrize("rope_scaling", [None, YARN], ids=["default", "yarn"])
def test_qwen3_logits_match(tmp_path, hf_checkpoint, assert_same_logits, rope_scaling):
    # head_dim 32 != hidden 64 / 4 heads: Qwen3's explicit head_dim
    rope = dict(rope_scaling) if rope_scaling else None
    hf_model = hf_checkpoint(tmp_path, "Qwen3", head_dim=32, rope_scaling=rope)
    ours = AutoModel.from_pretrained(tmp_path)
    assert (ours.config.head_dim, ours.config.use_qk_norm) == (32, True)
    assert ours.layers[0].attention.q_proj.weight.shape == (4 * 32, 64)
    assert_same_logits(hf_model, ours)


def test_qwen3_tied(tmp_path, hf_checkpoint, assert_same_logits):
    hf_model = hf_checkpoint(tmp_path, "Qwen3", head_dim=16, tie_word_embeddings=True)
    ours = AutoModel.from_pretrained(tmp_path)
    assert ours.lm_head.weight is ours.embed_tokens.weight
    assert_same_logits(hf_model, ours, seq=16)


@pytest.mark.parametrize(
    "family,flags", [("Qwen3", dict(use_qk_norm=True, head_dim=32)), ("Qwen2", dict(attn_bias=True))]
)
def test_export_round_trip(tmp_path, lm_config, assert_same_logits, family, flags):
    torch.manual_seed(0)
    ours = AutoRegressiveLM(lm_config(rope_scaling=dict(YARN), rope_theta=1e6, **flags)).eval()
    ours.save_pretrained(tmp_path, format="hf")
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf_model).__name__ == f"{family}ForCausalLM"
    assert_same_logits(hf_model, ours)


def test_export_without_hf_equivalent_is_an_error(tmp_path, lm_config, encoder_config):
    gated = AutoRegressiveLM(lm_config(use_gated_attention=True))
    with pytest.raises(ValueError, match="no Hugging Face equivalent.*use_gated_attention"):
        gated.save_pretrained(tmp_path, format="hf")
    qk_norm_and_bias = AutoRegressiveLM(lm_config(use_qk_norm=True, attn_bias=True))
    with pytest.raises(ValueError, match="no Hugging Face equivalent"):
        qk_norm_and_bias.save_pretrained(tmp_path, format="hf")
    with pytest.raises(ValueError, match="EncoderConfig"):
        EmbeddingEncoder(encoder_config()).save_pretrained(tmp_path, format="hf")
    with pytest.raises(ValueError, match="format='onnx'"):
        gated.save_pretrained(tmp_path, format="onnx")
    assert not (tmp_path / "config.json").exists()  # nothing half-written


def test_qwen_sliding_window_bounds_max_len(tmp_path, hf_checkpoint):
    hf_checkpoint(tmp_path, "Qwen2", use_sliding_window=True, sliding_window=24, max_window_layers=0)
    assert AutoModel.from_pretrained(tmp_path).config.max_len == 24
