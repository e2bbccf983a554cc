"""Shared fixtures for astrai-model tests: tiny configs, token batches, tiny checkpoints written by transformers.

Each fixture returns a factory function (test modules cannot import each other or this file under
`--import-mode=importlib`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from astrai.config import AutoRegressiveLMConfig, EncoderConfig

VOCAB = 97
# A tiny dense trunk (GQA: 4 query heads over 2 KV heads) in our field names and in transformers' names.
TRUNK = dict(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, dim_ffn=96, max_len=64)
HF_TRUNK = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


@pytest.fixture
def lm_config():
    """`lm_config(**overrides)` -> a tiny AutoRegressiveLMConfig."""
    return lambda **overrides: AutoRegressiveLMConfig(**(TRUNK | overrides))


@pytest.fixture
def encoder_config():
    """`encoder_config(**overrides)` -> a tiny EncoderConfig."""
    return lambda **overrides: EncoderConfig(**(TRUNK | overrides))


@pytest.fixture
def tokens():
    """`tokens(batch, seq, seed=1)` -> (batch, seq) random token ids."""
    return lambda batch, seq, seed=1: torch.randint(
        0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed)
    )


@pytest.fixture
def hf_checkpoint():
    """`hf_checkpoint(folder, family, seed=0, **config)`: save a random transformers `<family>ForCausalLM`
    (family "Llama", "Mistral", "Qwen2", "Qwen3") with the tiny trunk to `folder` and return it in eval mode."""

    def write(folder: Path, family: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
        config = getattr(transformers, f"{family}Config")(**(HF_TRUNK | overrides))
        torch.manual_seed(seed)
        model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
        model.save_pretrained(folder)
        return model

    return write


@pytest.fixture
def assert_same_logits(tokens):
    """`assert_same_logits(hf_model, ours, seq=40)`: equal logits (max abs 1e-4) without a mask and with left
    padding, transformers getting the positions its `generate` derives from the mask (cumsum - 1)."""

    def check(hf_model, ours, seq: int = 40, tol: float = 1e-4) -> None:
        ids = tokens(3, seq)
        mask = torch.stack([torch.arange(seq) >= seq - n for n in (seq, seq - 7, 3)]).long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            assert (hf_model(ids).logits - ours(ids)["logits"]).abs().max() < tol
            expected = hf_model(ids, attention_mask=mask, position_ids=positions).logits
            got = ours(ids, mask)["logits"]
        assert (expected - got)[mask.bool()].abs().max() < tol
        assert torch.isfinite(got).all()

    return check
