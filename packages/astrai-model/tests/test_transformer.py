"""`AutoRegressiveLM`: causality, padding invariance, tied weights, aux loss, dtype behaviour."""

from __future__ import annotations

import pytest
import torch

from astrai.model import MLP, AutoRegressiveLM, DecoderBlock, DeepSeekMoE

TOL = 1e-5


@pytest.fixture
def model(lm_config):
    torch.manual_seed(0)
    return AutoRegressiveLM(lm_config(use_qk_norm=True)).eval()


def test_outputs_and_shapes(model, tokens):
    ids = tokens(2, 7)
    with torch.no_grad():
        out = model(ids)
    assert out["logits"].shape == (2, 7, 97) and out["hidden_states"].shape == (2, 7, 64)
    assert torch.equal(out["logits"], model.lm_head(out["hidden_states"]))  # hidden states are after the norm
    assert all(isinstance(layer, DecoderBlock) for layer in model.layers)
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, seq_len\), got shape \(7,\)"):
        model(ids[0])


def test_logits_index_runs_the_head_at_one_position_per_row(model, tokens):
    ids = tokens(3, 7)
    index = torch.tensor([6, 0, 3])
    with torch.no_grad():
        full = model(ids)
        picked = model(ids, logits_index=index)
    assert picked["logits"].shape == (3, 1, 97) and torch.equal(picked["hidden_states"], full["hidden_states"])
    torch.testing.assert_close(picked["logits"][:, 0], full["logits"][torch.arange(3), index], atol=TOL, rtol=0)


def test_causal(model, tokens):
    ids = tokens(1, 10)
    changed = ids.clone()
    changed[0, 6] = (ids[0, 6] + 1) % 97
    with torch.no_grad():
        a, b = model(ids)["logits"], model(changed)["logits"]
    assert torch.equal(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_real_tokens(model, tokens, side):
    rows = [tokens(1, n, seed=n)[0] for n in (9, 4, 6)]
    T = 9
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for b, r in enumerate(rows):
        where = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        ids[b, where], mask[b, where] = r, 1
    with torch.no_grad():
        batched = model(ids, mask)["logits"]
        for b, r in enumerate(rows):
            alone = model(r[None])["logits"][0]
            assert (batched[b][mask[b].bool()] - alone).abs().max() < TOL
    assert torch.isfinite(batched).all()  # padding queries do not produce NaN


def test_padding_keeps_gradients_finite(model, tokens):
    model.train()
    ids, mask = tokens(2, 8), torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8])
    model(ids, mask)["logits"].float().logsumexp(-1)[mask.bool()].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_tied_weights_share_one_parameter_with_hf_init(lm_config):
    torch.manual_seed(0)
    model = AutoRegressiveLM(lm_config(tie_weight=True, vocab_size=4000))
    assert model.lm_head.weight is model.embed_tokens.weight
    assert "lm_head.weight" not in model.state_dict()
    assert abs(model.embed_tokens.weight.std().item() - 0.02) < 1e-3  # N(0, 0.02), not clobbered by the head
    assert abs(model.layers[0].attention.q_proj.weight.std().item() - 0.02) < 2e-3
    assert torch.equal(model.norm.weight, torch.ones(64))
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == sum(t.numel() for t in model.state_dict().values())


def test_load_state_dict_keeps_tie(lm_config):
    source = AutoRegressiveLM(lm_config(tie_weight=True))
    target = AutoRegressiveLM(lm_config(tie_weight=True))
    target.load_state_dict(source.state_dict(), assign=True)
    assert target.lm_head.weight is target.embed_tokens.weight
    assert torch.equal(target.lm_head.weight, source.embed_tokens.weight)


def test_aux_loss(model, lm_config, tokens):
    model(tokens(1, 4))
    assert torch.equal(model.aux_loss, torch.zeros(()))  # dense model
    moe = AutoRegressiveLM(lm_config(ffn_type="moe", n_routed_experts=4, n_activated_experts=2, n_dense_layers=1))
    assert isinstance(moe.layers[0].mlp, MLP) and isinstance(moe.layers[1].mlp, DeepSeekMoE)
    moe.train()
    moe(tokens(2, 5))
    assert torch.equal(moe.aux_loss, moe.layers[1].mlp.aux_loss.float())
    assert moe.aux_loss.requires_grad


def test_bf16_keeps_rope_in_float32(model, tokens):
    ids = tokens(2, 12)
    with torch.no_grad():
        reference = model(ids)["logits"]
        model.to(torch.bfloat16)
        cos, sin = model.rotary_embedding(ids, torch.arange(12).expand(2, 12) + 100_000)  # far positions too
        logits = model(ids)["logits"]
    assert cos.dtype == sin.dtype == torch.float32
    expected = torch.arange(12, dtype=torch.float32)[:, None] + 100_000
    assert torch.allclose(cos[0, :, 0], expected.squeeze(1).cos(), atol=1e-3)  # fp32 angle: well within 1e-3
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - reference).abs().max() < 0.05
