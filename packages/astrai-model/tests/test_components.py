"""Building blocks: Linear, Embedding, RMSNorm, MLP, GQA, factories, and the shared mask/SDPA helpers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from astrai.model import GQA, MLP, AttnFactory, Embedding, FFNFactory, Linear, RMSNorm, RotaryEmbedding
from astrai.model.linear import can_pack, fused_linear, pack_linear_weights, row_split_linear
from astrai.model.sdpa import build_attention_mask, default_position_ids, sdpa


def test_linear_and_embedding_init():
    torch.manual_seed(0)
    linear = Linear(256, 512, bias=True)
    assert linear.weight.shape == (512, 256) and torch.equal(linear.bias, torch.zeros(512))
    assert abs(linear.weight.std().item() - 0.02) < 5e-4
    assert Linear(4, 3).bias is None
    embedding = Embedding(1000, 64)
    assert abs(embedding.weight.std().item() - 0.02) < 5e-4


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 16, 40, 300])
@pytest.mark.parametrize("out_dim", [96, 97])
def test_linear_inference_kernels_match_float64(rows, out_dim):
    # Packed: up to 2 rows the row-split batched product (odd out_dim: one block), above it the float32 kernel
    # (out_dim a multiple of 16) or oneDNN packed weights.
    torch.manual_seed(0)
    linear = Linear(64, out_dim, bias=True)
    with torch.no_grad():
        linear.bias.normal_()
    x = torch.randn(rows, 1, 64)
    expected = F.linear(x.double(), linear.weight.double(), linear.bias.double()).float()
    with torch.inference_mode():
        assert torch.equal(linear(x), F.linear(x, linear.weight, linear.bias))  # not packed: F.linear itself
    assert pack_linear_weights(linear) == (1 if can_pack(linear.weight) else 0)
    with torch.inference_mode():
        fast = linear(x)
    assert fast.shape == (rows, 1, out_dim) and fast.is_contiguous()
    torch.testing.assert_close(fast, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(row_split_linear(x, linear.weight, linear.bias), expected, atol=1e-5, rtol=0)
    assert torch.equal(linear(x), F.linear(x, linear.weight, linear.bias))  # outside inference mode: F.linear


@pytest.mark.skipif(not can_pack(torch.ones(1, dtype=torch.bfloat16)), reason="no oneDNN bfloat16 here")
def test_linear_packed_bfloat16_matches_f_linear():
    torch.manual_seed(0)
    linear = Linear(64, 96).to(torch.bfloat16)
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    pack_linear_weights(linear)
    with torch.inference_mode():
        fast = linear(x)
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast, F.linear(x, linear.weight), atol=1e-2, rtol=1e-2)


@pytest.mark.skipif(not can_pack(torch.ones(1)), reason="no oneDNN here")
def test_linear_packed_copy_follows_weight_changes():
    torch.manual_seed(0)
    linear = Linear(32, 48)
    x = torch.randn(8, 32)
    pack_linear_weights(linear)

    def check():
        with torch.inference_mode():
            got = linear(x)
            copy_made = linear._packed[2]
            linear(x)
            assert linear._packed[2] is copy_made  # an unchanged weight is packed once
        torch.testing.assert_close(got, F.linear(x, linear.weight), atol=1e-5, rtol=0)

    check()
    torch.optim.SGD(linear.parameters(), lr=1.0).zero_grad()
    linear(x).sum().backward()  # training forward outside inference mode: plain autograd
    torch.optim.SGD(linear.parameters(), lr=1.0).step()  # in place: bumps the weight's version
    check()
    linear.load_state_dict({"weight": torch.randn(48, 32)})  # copy_ into the same tensor
    check()
    linear.weight = torch.nn.Parameter(torch.randn(48, 32))  # a new tensor
    check()
    assert linear._packed is not None
    clone = copy.deepcopy(linear)  # copies never carry the packed copy; they re-pack on use
    assert clone._pack and clone._packed is None
    assert pack_linear_weights(linear, enable=False) == 0 and linear._packed is None
    pack_linear_weights(clone)
    clone.to(torch.float64)  # a dtype oneDNN cannot pack: the layer falls back to F.linear
    with torch.inference_mode():
        assert torch.equal(clone(x.double()), F.linear(x.double(), clone.weight))
    assert not clone._pack


@pytest.mark.parametrize("bias", [False, True])
def test_fused_linear_equals_the_separate_layers(bias):
    torch.manual_seed(0)
    layers = (Linear(32, 48, bias=bias), Linear(32, 16, bias=bias), Linear(32, 16, bias=bias))
    with torch.no_grad():
        for layer in layers:
            if bias:
                layer.bias.normal_()
    x = torch.randn(3, 5, 32)  # 15 rows: past the split product
    expected = [F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
                for layer in layers]  # fmt: skip
    for layer in layers:
        pack_linear_weights(layer)
    with torch.inference_mode():
        outs = fused_linear(x, layers)
    assert [tuple(o.shape) for o in outs] == [(3, 5, 48), (3, 5, 16), (3, 5, 16)]
    for got, want in zip(outs, expected):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    assert (layers[0]._group_packed is not None) == can_pack(layers[0].weight)
    for change in ("weight", "bias") if bias else ("weight",):
        with torch.no_grad():
            if change == "weight":
                layers[2].weight.mul_(-1)  # any member changing re-packs the group
            else:
                layers[1].bias.add_(1.0)  # a bias alone too (bias-only fine-tuning, an optimizer step)
        with torch.inference_mode():
            got = fused_linear(x, layers)
        for layer, out in zip(layers, got):
            torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip(fused_linear(x, layers), [layer(x) for layer in layers]))


def test_fused_linear_runs_the_layers_hooks():
    """A forward hook (a LoRA adapter's) on one layer of a group: the group runs layer by layer, hook included."""
    torch.manual_seed(0)
    layers = (Linear(32, 48), Linear(32, 16))
    pack_linear_weights(torch.nn.ModuleList(layers))
    x = torch.randn(15, 32)
    handle = layers[1].register_forward_hook(lambda module, args, out: out + 1.0)
    with torch.inference_mode():
        hooked = fused_linear(x, layers)
    torch.testing.assert_close(hooked[1], F.linear(x, layers[1].weight) + 1.0, atol=1e-5, rtol=0)
    handle.remove()
    with torch.inference_mode():
        plain = fused_linear(x, layers)
    torch.testing.assert_close(plain[1], F.linear(x, layers[1].weight), atol=1e-5, rtol=0)
    assert layers[0]._group_packed is not None or not can_pack(layers[0].weight)  # packed once the hook is gone


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_transformers(dtype):
    torch.manual_seed(0)
    ours, hf = RMSNorm(32, 1e-5), LlamaRMSNorm(32, eps=1e-5)
    with torch.no_grad():
        ours.weight.normal_()
        hf.weight.copy_(ours.weight)
    ours.to(dtype), hf.to(dtype)
    x = (torch.randn(3, 7, 32) * 5).to(dtype)
    assert ours(x).dtype == dtype
    assert (ours(x).float() - hf(x).float()).abs().max() <= (1e-6 if dtype == torch.float32 else 1e-2)
    assert ours.normalized_shape == (32,) and ours.norm_eps == 1e-5


def test_mlp_is_swiglu(lm_config):
    torch.manual_seed(0)
    mlp = FFNFactory.from_config("mlp", lm_config())
    assert isinstance(mlp, MLP) and mlp.up.weight.shape == (96, 64)
    assert MLP(64, 40).down.weight.shape == (64, 40)
    x = torch.randn(2, 3, 64)
    expected = F.linear(F.silu(F.linear(x, mlp.gate.weight)) * F.linear(x, mlp.up.weight), mlp.down.weight)
    assert torch.allclose(mlp(x), expected, atol=1e-6)


def test_factories_reject_unknown_names_and_arguments(lm_config):
    assert isinstance(AttnFactory.create("gqa", lm_config(), 3), GQA)
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        AttnFactory.create("flash", lm_config(), 0)
    with pytest.raises(ValueError, match=r"unexpected argument\(s\) \['n_experts'\]"):
        FFNFactory.create("mlp", 64, 96, n_experts=4)


def test_factories_take_the_documented_arguments(lm_config):
    """Architecture document: `AttnFactory.create(attn_type, **kwargs)`, `FFNFactory.create(ffn_type, dim, dim_ffn,
    **kwargs)`."""
    attn = AttnFactory.create(attn_type="gqa", config=lm_config(), layer_id=2)
    assert isinstance(attn, GQA) and attn.layer_id == 2
    mlp = FFNFactory.create(ffn_type="mlp", dim=64, dim_ffn=40)
    assert isinstance(mlp, MLP) and mlp.gate.weight.shape == (40, 64)
    moe = FFNFactory.create("moe", 64, 16, n_routed_experts=4, n_activated_experts=1, norm_topk_prob=True)
    assert (moe.dim, moe.n_routed_experts, moe.n_shared_experts, moe.n_activated_experts) == (64, 4, 1, 1)
    assert moe.routed_experts[3].down.weight.shape == (64, 16) and moe.norm_topk_prob


def test_embedding_forward_takes_x():
    embedding = Embedding(10, 4)
    ids = torch.tensor([[1, 7]])
    assert torch.equal(embedding(x=ids), embedding.weight[ids])


def naive_attention(q, k, v, allowed):
    """q (B,H,T,d), k/v (B,H,S,d), allowed (B,1,T,S) bool."""
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def test_gqa_matches_naive_attention_with_qk_norm_before_rope(lm_config):
    torch.manual_seed(0)
    cfg = lm_config(use_qk_norm=True, use_gated_attention=True, attn_bias=True, head_dim=8)
    attn = GQA(cfg, layer_id=0)
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 64)
    rope = RotaryEmbedding(8, 64)
    cos, sin = rope(x)
    out = attn(x, (cos, sin))

    q = attn.q_norm(attn.q_proj(x).view(2, 5, 4, 8))  # norm, then RoPE (Qwen3 order)
    k = attn.k_norm(attn.k_proj(x).view(2, 5, 2, 8))
    v = attn.v_proj(x).view(2, 5, 2, 8)
    q, k = [((t * cos[:, :, None]) + torch.cat([-t[..., 4:], t[..., :4]], -1) * sin[:, :, None]) for t in (q, k)]
    k, v = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)  # query head h reads KV head h // 2
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    o = naive_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal)
    o = o.transpose(1, 2).reshape(2, 5, 32) * torch.sigmoid(attn.gate(x))
    assert torch.allclose(out, attn.o_proj(o), atol=1e-5)


def test_attention_mask_without_cache():
    positions = torch.arange(4).expand(2, 4)
    assert build_attention_mask(None, positions) is None
    assert build_attention_mask(torch.ones(2, 4), positions) is None  # nothing padded: SDPA's causal path
    mask = build_attention_mask(torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), positions)
    assert mask.shape == (2, 1, 4, 4)
    expected_row0 = torch.tensor(
        [
            [1, 1, 1, 1],  # a padding query may see everything (never NaN)
            [0, 1, 0, 0],
            [0, 1, 1, 0],
            [0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask[0, 0], expected_row0)
    assert torch.equal(mask[1, 0], torch.ones(4, 4, dtype=torch.bool).tril())
    bidirectional = build_attention_mask(torch.tensor([[1, 1, 0]]), torch.arange(3)[None], is_causal=False)
    assert torch.equal(bidirectional[0, 0], torch.tensor([[1, 1, 0]] * 3, dtype=torch.bool))


def test_attention_mask_with_cache():
    # row 0: 3 cached + 2 new (positions 3, 4); row 1: 1 cached + 1 new (position 1) then a padding query
    kv_lens = torch.tensor([5, 2])
    positions = default_position_ids(torch.zeros(2, 2, dtype=torch.long), torch.tensor([[1, 1], [1, 0]]), kv_lens)
    assert positions.tolist() == [[3, 4], [1, 2]]
    mask = build_attention_mask(None, positions, kv_lens)
    assert mask[0, 0].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert mask[1, 0].tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0]]
    with pytest.raises(ValueError, match="is_causal=False"):
        build_attention_mask(None, positions, kv_lens, is_causal=False)
    # A first prefill (nothing cached before the step), ragged and right-padded: plain causal attention over the
    # step's own keys is exact, so no mask (and no gather).
    first = torch.tensor([[1, 1, 1], [1, 1, 0]])
    fresh = default_position_ids(torch.zeros(2, 3, dtype=torch.long), first, torch.tensor([3, 2]))
    assert build_attention_mask(first, fresh, torch.tensor([3, 2])) is None
    assert build_attention_mask(first, fresh + 1, torch.tensor([4, 3])) is not None  # one cached entry per row


def test_default_positions_follow_the_mask():
    ids = torch.zeros(2, 4, dtype=torch.long)
    assert default_position_ids(ids, None, None).tolist() == [[0, 1, 2, 3]] * 2
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])
    assert default_position_ids(ids, mask, None).tolist() == [[0, 0, 0, 1], [0, 1, 2, 2]]


def test_sdpa_grouped_heads_and_masks():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    full_k, full_v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    expected = naive_attention(q, full_k, full_v, causal)
    assert torch.allclose(sdpa(q, k, v, None, is_causal=True), expected, atol=1e-5)
    assert torch.allclose(sdpa(q, k, v, causal.expand(2, 1, 5, 5), is_causal=True), expected, atol=1e-5)
    everything = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    assert torch.allclose(
        sdpa(q, k, v, None, is_causal=False), naive_attention(q, full_k, full_v, everything), atol=1e-5
    )


@pytest.mark.parametrize(("batch", "keys"), [(1, 65), (16, 100)])  # the float32 and the half-precision path
def test_half_precision_decode_attention_matches_float64(batch, keys):
    torch.manual_seed(0)
    q = torch.randn(batch, 6, 1, 16)
    k, v = torch.randn(batch, 2, keys, 16), torch.randn(batch, 2, keys, 16)
    lens = torch.randint(1, keys + 1, (batch,))
    mask = (torch.arange(keys)[None, :] < lens[:, None])[:, None, None, :]  # (B, 1, 1, S), ragged rows
    expected = F.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(3, 1), v.double().repeat_interleave(3, 1), attn_mask=mask
    )
    got = sdpa(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, is_causal=True)
    assert got.dtype == torch.bfloat16 and got.shape == (batch, 6, 1, 16)
    torch.testing.assert_close(got.double(), expected, atol=2e-2, rtol=2e-2)
