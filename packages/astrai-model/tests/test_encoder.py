"""`EmbeddingEncoder`: bidirectional attention, pooling that ignores padding, L2 normalisation."""

from __future__ import annotations

import pytest
import torch

from astrai.model import AutoRegressiveLM, EmbeddingEncoder

TOL = 1e-5


def padded(rows, T, side):
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        where = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        ids[b, where], mask[b, where] = r, 1
    return ids, mask


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_embeddings(encoder_config, tokens, pooling, side):
    torch.manual_seed(0)
    encoder = EmbeddingEncoder(encoder_config(pooling_type=pooling)).eval()
    rows = [tokens(1, n, seed=n)[0] for n in (8, 3, 5)]
    with torch.no_grad():
        batched = encoder(*padded(rows, 8, side))
        alone = torch.cat([encoder(r[None]) for r in rows])
    assert batched.shape == (3, 64)
    assert (batched - alone).abs().max() < TOL


def test_pooling_picks_the_right_tokens(encoder_config, tokens):
    torch.manual_seed(0)
    ids = tokens(1, 6)
    encoders = {p: EmbeddingEncoder(encoder_config(pooling_type=p)).eval() for p in ("mean", "cls", "last")}
    state = encoders["mean"].state_dict()
    for e in encoders.values():
        e.load_state_dict(state)
    trunk = encoders["mean"]
    with torch.no_grad():
        h = trunk.embed_tokens(ids)
        rope = trunk.rotary_embedding(ids)
        for layer in trunk.layers:
            h = layer(h, rope, is_causal=False)
        h = trunk.norm(h)[0]  # (T, dim)
        assert torch.allclose(encoders["mean"](ids)[0], h.mean(0), atol=1e-6)
        assert torch.equal(encoders["cls"](ids)[0], h[0])
        assert torch.equal(encoders["last"](ids)[0], h[-1])


def test_bidirectional(encoder_config, tokens):
    torch.manual_seed(0)
    encoder = EmbeddingEncoder(encoder_config(pooling_type="cls")).eval()
    ids = tokens(1, 6)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 97
    with torch.no_grad():
        assert not torch.allclose(encoder(ids), encoder(changed))  # the first token sees the last


def test_l2_normalisation(encoder_config, tokens):
    torch.manual_seed(0)
    plain = EmbeddingEncoder(encoder_config()).eval()
    normed = EmbeddingEncoder(encoder_config(normalize_embeddings=True)).eval()
    normed.load_state_dict(plain.state_dict())
    ids = tokens(3, 5)
    with torch.no_grad():
        a, b = plain(ids), normed(ids)
    assert torch.allclose(b.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert torch.allclose(b, a / a.norm(dim=-1, keepdim=True), atol=1e-6)


def test_loads_a_language_model_trunk(lm_config, encoder_config):
    lm = AutoRegressiveLM(lm_config())
    encoder = EmbeddingEncoder(encoder_config())
    encoder.load_state_dict(lm.state_dict())  # lm_head.weight is ignored, everything else must match
    assert torch.equal(encoder.embed_tokens.weight, lm.embed_tokens.weight)
