"""DeepSeekMoE: parity with transformers' MoE blocks for every routing method, dispatch, aux loss, save/load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import DeepseekV2Config, DeepseekV3Config, Qwen3MoeConfig
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock, load_balancing_loss_func

from astrai.config import AutoRegressiveLMConfig
from astrai.model import MLP, AutoModel
from astrai.model.factories import FFNFactory
from astrai.model.hf.deepseek import DeepseekV3Converter
from astrai.model.hf.qwen3_moe import Qwen3MoeConverter
from astrai.model.moe import DeepSeekMoE

DIM, N_TOKENS = 32, 24
HF_SIZES = dict(vocab_size=64, hidden_size=DIM, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=1)
OURS = dict(vocab_size=64, dim=DIM, n_layers=1, n_heads=4, dim_ffn=48, max_len=64, ffn_type="moe")


def randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """transformers leaves directly built blocks uninitialised (router zeros, experts empty)."""
    gen = torch.Generator().manual_seed(seed)
    for tensor in [*module.parameters(), *module.buffers()]:
        tensor.data = torch.randn(tensor.shape, generator=gen) * 0.3
    return module


def ours_from_hf(block: nn.Module, converter, cfg: AutoRegressiveLMConfig) -> DeepSeekMoE:
    """Our MoE with the HF block's weights, converted by the checkpoint converter under test."""
    hf_names = {f"model.layers.0.mlp.{k}": v for k, v in block.state_dict().items()}
    ours = converter.state_dict_from_hf(hf_names, cfg)
    moe = FFNFactory.from_config("moe", cfg)
    moe.load_state_dict({k.removeprefix("layers.0.mlp."): v for k, v in ours.items()}, strict=True)
    return moe.eval()


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, N_TOKENS // 2, DIM, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_qwen3_moe_block_parity(norm_topk_prob):
    hf_cfg = Qwen3MoeConfig(**HF_SIZES, num_experts=8, num_experts_per_tok=3, norm_topk_prob=norm_topk_prob)
    block = randomise(Qwen3MoeSparseMoeBlock(hf_cfg)).eval()
    cfg = Qwen3MoeConverter().config_from_hf({**hf_cfg.to_dict(), "num_attention_heads": 4})
    assert (cfg.n_routed_experts, cfg.n_shared_experts, cfg.topk_method) == (8, 0, "greedy")
    moe = ours_from_hf(block, Qwen3MoeConverter(), cfg)
    x = tokens()
    torch.testing.assert_close(moe(x), block(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_shared", [1, 2])
def test_deepseek_v3_moe_parity_noaux_tc(n_shared):
    hf_cfg = DeepseekV3Config(
        **HF_SIZES, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=n_shared,
        routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=0,
    )  # fmt: skip
    block = randomise(DeepseekV3MoE(hf_cfg)).eval()
    cfg = AutoRegressiveLMConfig(
        **OURS, n_routed_experts=16, n_activated_experts=4, n_shared_experts=n_shared, dim_ffn_expert=16,
        topk_method="noaux_tc", n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
    )  # fmt: skip
    moe = ours_from_hf(block, DeepseekV3Converter(), cfg)
    assert len(moe.shared_experts) == n_shared
    x = tokens()
    torch.testing.assert_close(moe(x), block(x), atol=1e-5, rtol=0)
    # The correction bias steers selection only: a large bias on expert 0 makes every token pick it.
    moe.e_score_correction_bias[0] = 100.0
    _, _, experts = moe.route(x.view(-1, DIM))
    assert (experts == 0).any(-1).all()


@pytest.mark.parametrize("topk_method", ["greedy", "group_limited_greedy"])
def test_deepseek_v2_moe_parity(topk_method):
    groups = dict(n_group=4, topk_group=2) if topk_method != "greedy" else {}
    hf_cfg = DeepseekV2Config(
        **HF_SIZES, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=2, routed_scaling_factor=1.5,
        topk_method=topk_method, **groups,
    )  # fmt: skip
    block = randomise(DeepseekV2Moe(hf_cfg)).eval()
    cfg = AutoRegressiveLMConfig(
        **OURS, n_routed_experts=16, n_activated_experts=4, n_shared_experts=2, dim_ffn_expert=16,
        topk_method=topk_method, routed_scaling_factor=1.5, **groups,
    )  # fmt: skip
    moe = ours_from_hf(block, DeepseekV3Converter(), cfg)
    x = tokens()
    torch.testing.assert_close(moe(x), block(x), atol=1e-5, rtol=0)


def test_group_limited_routing_stays_in_best_groups():
    cfg = AutoRegressiveLMConfig(
        **OURS, n_routed_experts=8, n_activated_experts=2, topk_method="group_limited_greedy", n_group=4, topk_group=1
    )
    moe = FFNFactory.from_config("moe", cfg)
    with torch.no_grad():
        moe.router.weight.copy_(torch.randn(8, DIM))
    _, _, experts = moe.route(torch.randn(50, DIM))
    groups = experts // 2  # 2 experts per group, topk_group=1: both picks share a group
    assert (groups[:, 0] == groups[:, 1]).all()


def naive_moe(moe: DeepSeekMoE, x: torch.Tensor) -> torch.Tensor:
    """Token-by-token reference: softmax, top-k, weighted sum of the chosen experts plus the shared ones."""
    out = []
    for token in x.view(-1, DIM):
        probs = F.softmax(token @ moe.router.weight.T, dim=-1)
        weights, chosen = probs.topk(moe.n_activated_experts)
        if moe.norm_topk_prob:
            weights = weights / weights.sum()
        y = sum(w * moe.routed_experts[int(e)](token) for w, e in zip(weights * moe.routed_scaling_factor, chosen))
        out.append(y + sum(expert(token) for expert in moe.shared_experts))
    return torch.stack(out).view_as(x)


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_grouped_dispatch_equals_per_token_loop(norm_topk_prob):
    torch.manual_seed(0)
    cfg = AutoRegressiveLMConfig(
        **OURS, n_routed_experts=8, n_activated_experts=2, n_shared_experts=1, dim_ffn_expert=16,
        norm_topk_prob=norm_topk_prob, routed_scaling_factor=1.5,
    )  # fmt: skip
    moe = randomise(FFNFactory.from_config("moe", cfg)).eval()
    x = tokens()
    torch.testing.assert_close(moe(x), naive_moe(moe, x), atol=1e-5, rtol=0)


def test_unused_experts_are_skipped():
    cfg = AutoRegressiveLMConfig(**OURS, n_routed_experts=8, n_activated_experts=1)
    moe = randomise(FFNFactory.from_config("moe", cfg)).eval()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[5] = 1.0  # expert 5 wins for every token with a positive channel sum
    x = tokens().abs()
    torch.testing.assert_close(moe(x), naive_moe(moe, x), atol=1e-5, rtol=0)


def test_aux_loss_matches_transformers_and_trains_the_router():
    cfg = AutoRegressiveLMConfig(**OURS, n_routed_experts=8, n_activated_experts=2, aux_loss_coef=0.01)
    moe = randomise(FFNFactory.from_config("moe", cfg)).train()
    x = tokens()
    moe(x)
    logits = x.view(-1, DIM) @ moe.router.weight.T
    expected = 0.01 * load_balancing_loss_func((logits,), num_experts=8, top_k=2)
    torch.testing.assert_close(moe.aux_loss, expected, atol=1e-7, rtol=0)
    assert moe.aux_loss.dtype == torch.float32 and moe.aux_loss.shape == () and moe.aux_loss > 0
    moe.aux_loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in moe.routed_experts.parameters())  # only the router is balanced


def test_aux_loss_balanced_routing_equals_top_k():
    # Uniform probabilities and each expert picked by the same number of tokens: E * sum(K/E * 1/E) = K.
    cfg = AutoRegressiveLMConfig(**OURS, n_routed_experts=4, n_activated_experts=2, aux_loss_coef=1.0)
    moe = FFNFactory.from_config("moe", cfg).train()
    probs = torch.full((4, 4), 0.25)
    experts = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]])
    assert moe.balance_loss(probs, experts).item() == 2.0


def test_aux_loss_zero_coefficient_and_eval():
    cfg = AutoRegressiveLMConfig(**OURS, n_routed_experts=8, n_activated_experts=2, aux_loss_coef=0.0)
    moe = randomise(FFNFactory.from_config("moe", cfg)).train()
    moe(tokens())
    assert moe.aux_loss.item() == 0.0 and moe.aux_loss.requires_grad
    cfg = AutoRegressiveLMConfig(**OURS, n_routed_experts=8, n_activated_experts=2, aux_loss_coef=0.5)
    moe = randomise(FFNFactory.from_config("moe", cfg)).eval()
    moe(tokens())
    assert moe.aux_loss.item() == 0.0 and not moe.aux_loss.requires_grad


def test_noaux_tc_probs_are_normalised_sigmoid():
    cfg = AutoRegressiveLMConfig(
        **OURS, n_routed_experts=8, n_activated_experts=2, topk_method="noaux_tc", n_group=2, topk_group=1
    )
    moe = randomise(FFNFactory.from_config("moe", cfg))
    x = torch.randn(5, DIM)
    probs, weights, _ = moe.route(x)
    sig = torch.sigmoid(x @ moe.router.weight.T)
    torch.testing.assert_close(probs, sig / sig.sum(-1, keepdim=True))
    assert weights.dtype == torch.float32


def test_bf16_forward_keeps_dtype():
    cfg = AutoRegressiveLMConfig(**OURS, n_routed_experts=4, n_activated_experts=2, n_shared_experts=1)
    moe = randomise(FFNFactory.from_config("moe", cfg)).to(torch.bfloat16).eval()
    assert moe(tokens().bfloat16()).dtype == torch.bfloat16


# --- in a model ---------------------------------------------------------------------------------------------

LM = dict(OURS, n_layers=3, n_dense_layers=1, n_routed_experts=8, n_activated_experts=2, n_shared_experts=1)


def test_model_sums_the_layers_aux_losses():
    torch.manual_seed(0)
    model = AutoModel.from_config(AutoRegressiveLMConfig(**LM, aux_loss_coef=0.01)).train()
    assert isinstance(model.layers[0].mlp, MLP) and isinstance(model.layers[2].mlp, DeepSeekMoE)
    out = model(torch.randint(0, 64, (2, 10)))
    per_layer = [model.layers[i].mlp.aux_loss for i in (1, 2)]
    assert torch.equal(model.aux_loss, per_layer[0] + per_layer[1]) and model.aux_loss > 0
    (out["logits"].float().logsumexp(-1).mean() + model.aux_loss).backward()
    assert model.layers[1].mlp.router.weight.grad.abs().sum() > 0


def test_native_save_load_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    cfg = AutoRegressiveLMConfig(**LM, topk_method="noaux_tc", n_group=4, topk_group=2, routed_scaling_factor=2.5)
    model = AutoModel.from_config(cfg).eval()
    with torch.no_grad():
        model.layers[1].mlp.e_score_correction_bias.normal_()  # a buffer: must be saved too
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys() and "layers.2.mlp.routed_experts.7.down.weight" in state
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids)["logits"], loaded(ids)["logits"])
