"""Strategies: exact token means, split invariance, padding and MoE handling, and DPO / GRPO losses
against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from astrai.config import LoRAConfig
from astrai.trainer import (
    DPOStrategy,
    GRPOStrategy,
    SFTStrategy,
    StrategyFactory,
    apply_lora,
    group_advantages,
)


class Bigram(nn.Module):
    """logits[t] = table[input_ids[t]]: log-probs are readable off the table, so losses can be done by hand."""

    def __init__(self, table: list[list[float]]) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.tensor(table))

    def forward(self, input_ids, input_mask=None, paged_cache=None, position_ids=None):
        return {"logits": self.table[input_ids], "hidden_states": None}


def log_softmax_row(row: list[float], index: int) -> float:
    return row[index] - math.log(sum(math.exp(v) for v in row))


INITIAL = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
TRAINED = [[0.5, 1.0, -1.0], [0.2, -0.3, 0.9], [1.5, 0.0, -0.5]]


def _sft_batch(seed: int = 0, b: int = 4, t: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, t, generator=g) > 0.4
    mask[1] = False  # a row with nothing to train
    return {
        "input_ids": torch.randint(0, 64, (b, t), generator=g),
        "target_ids": torch.randint(0, 64, (b, t), generator=g),
        "loss_mask": mask,
    }


def test_sft_is_the_exact_token_mean_with_label_smoothing(make_lm) -> None:
    model = make_lm()
    batch = _sft_batch()
    strategy = StrategyFactory.create("sft", model, "cpu", label_smoothing=0.1)
    logits = model(batch["input_ids"])["logits"]
    mask = batch["loss_mask"]
    expected = F.cross_entropy(logits[mask], batch["target_ids"][mask], label_smoothing=0.1)
    torch.testing.assert_close(strategy.compute_loss(batch), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("train_type", ["seq", "sft"])
def test_hugging_face_labels_are_shifted_like_target_ids(make_lm, train_type: str) -> None:
    """The same hand-computed loss from target_ids (ours: the next tokens) and from HF labels (the tokens
    themselves, -100 = not trained): position t learns token t + 1, the last position nothing."""
    model = make_lm()
    ids = torch.tensor([[5, 9, 2, 7, 3], [1, 4, 4, 8, 6]])
    trained = torch.tensor([[True, True, False, True, True], [False, True, True, True, True]])  # per token
    logits = model(ids)["logits"].float()  # (B, T, V)
    log_probs = torch.log_softmax(logits, -1)
    terms = [-log_probs[b, t, ids[b, t + 1]] for b in range(2) for t in range(4) if trained[b, t + 1]]
    expected = torch.stack(terms).mean()  # 7 trained next-token predictions

    target_ids = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)
    target_ids[:, :-1][~trained[:, 1:]] = -100
    ours = {"input_ids": ids, "target_ids": target_ids}
    labels = torch.where(trained, ids, -100)
    hf = {"input_ids": ids, "labels": labels}
    if train_type == "sft":
        ours["loss_mask"] = target_ids != -100
    strategy = StrategyFactory.create(train_type, model, "cpu")
    for batch in (ours, hf):
        torch.testing.assert_close(strategy.compute_loss(batch), expected, rtol=1e-6, atol=1e-6)
        assert strategy.count_units(strategy.prepare(batch)) == 7
    if train_type == "sft":  # a loss_mask beside HF labels is aligned with the labels (and shifted with them)
        hf_masked = {"input_ids": ids, "labels": ids, "loss_mask": trained}
        torch.testing.assert_close(strategy.compute_loss(hf_masked), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="both target_ids .* and labels"):
        strategy.compute_loss({**ours, "labels": labels})


def test_fully_masked_batch_gives_zero_loss_and_gradient(make_lm) -> None:
    model = make_lm()
    batch = _sft_batch()
    batch["loss_mask"][:] = False
    loss = SFTStrategy(model, "cpu").compute_loss(batch)
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters() if p.grad is not None)


def test_micro_batches_with_the_global_count_equal_the_full_batch(make_lm) -> None:
    batch = _sft_batch(b=8)
    full_model, split_model = make_lm(), make_lm()
    SFTStrategy(full_model, "cpu").compute_loss(batch).backward()
    strategy = SFTStrategy(split_model, "cpu")
    parts = [{k: v[i : i + 2] for k, v in batch.items()} for i in range(0, 8, 2)]
    units = torch.stack([strategy.count_units(p) for p in parts]).sum()
    assert units == batch["loss_mask"].sum()
    for part in parts:
        strategy.compute_loss(part, num_units=units).backward()
    for a, b in zip(full_model.parameters(), split_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-7)


def test_padding_mask_reaches_the_model(make_lm) -> None:
    model = make_lm()
    ids = torch.randint(0, 64, (1, 6))
    labels = torch.randint(0, 64, (1, 6))
    plain = StrategyFactory.create("seq", model, "cpu").compute_loss({"input_ids": ids, "target_ids": labels})
    pad = torch.zeros(1, 3, dtype=torch.long)
    padded = {
        "input_ids": torch.cat([pad, ids], 1),
        "target_ids": torch.cat([pad - 100, labels], 1),
        "input_mask": torch.cat([pad.bool(), torch.ones(1, 6, dtype=torch.bool)], 1),
    }
    torch.testing.assert_close(StrategyFactory.create("seq", model, "cpu").compute_loss(padded), plain)


def test_moe_aux_loss_is_added(make_lm) -> None:
    model = make_lm(ffn_type="moe", n_routed_experts=4, n_activated_experts=2, aux_loss_coef=0.5)
    ids, labels = torch.randint(0, 64, (2, 6)), torch.randint(0, 64, (2, 6))
    loss = StrategyFactory.create("seq", model, "cpu").compute_loss({"input_ids": ids, "target_ids": labels})
    logits = model(ids)["logits"]
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten()) + model.aux_loss
    assert model.aux_loss.item() > 0
    torch.testing.assert_close(loss, expected)


def test_missing_batch_key_and_bad_arguments(make_lm) -> None:
    model = make_lm()
    with pytest.raises(ValueError, match="loss_mask"):
        SFTStrategy(model, "cpu").compute_loss(
            {"input_ids": torch.zeros(1, 2, dtype=torch.long), "target_ids": torch.zeros(1, 2, dtype=torch.long)}
        )
    with pytest.raises(ValueError, match="beta"):
        StrategyFactory.create("dpo", model, "cpu", betta=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        StrategyFactory.create("dpo", model, "cpu", loss_type="kto")
    with pytest.raises(ValueError, match="unknown strategy"):
        StrategyFactory.create("ppo", model, "cpu")


# --- DPO ----------------------------------------------------------------------------------------------


def _dpo_batch() -> dict[str, torch.Tensor]:
    # One pair; token 0 is the prompt, the completion tokens are positions 1 and 2.
    return {
        "chosen": torch.tensor([[0, 1, 2]]),
        "rejected": torch.tensor([[0, 2, 2]]),
        "chosen_mask": torch.tensor([[False, True, True]]),
        "rejected_mask": torch.tensor([[False, True, True]]),
    }


def _dpo_margin() -> float:
    def logp(table: list[list[float]], seq: list[int]) -> float:
        return sum(log_softmax_row(table[seq[t - 1]], seq[t]) for t in (1, 2))

    chosen, rejected = [0, 1, 2], [0, 2, 2]
    return (logp(TRAINED, chosen) - logp(INITIAL, chosen)) - (logp(TRAINED, rejected) - logp(INITIAL, rejected))


def _dpo_strategy(**kwargs) -> tuple[DPOStrategy, Bigram]:
    model = Bigram(INITIAL)
    strategy = DPOStrategy(model, "cpu", **kwargs)  # the reference is the policy at construction
    with torch.no_grad():
        model.table.copy_(torch.tensor(TRAINED))
    return strategy, model


@pytest.mark.parametrize(
    "kwargs, formula",
    [
        ({"beta": 0.5}, lambda d: -math.log(1 / (1 + math.exp(-0.5 * d)))),
        (
            {"beta": 0.5, "label_smoothing": 0.2},
            lambda d: -0.8 * math.log(1 / (1 + math.exp(-0.5 * d))) - 0.2 * math.log(1 / (1 + math.exp(0.5 * d))),
        ),
        ({"beta": 0.5, "loss_type": "hinge"}, lambda d: max(0.0, 1 - 0.5 * d)),
        (
            {"beta": 0.5, "loss_type": "robust", "label_smoothing": 0.1},
            lambda d: (
                (-0.9 * math.log(1 / (1 + math.exp(-0.5 * d))) + 0.1 * math.log(1 / (1 + math.exp(0.5 * d)))) / 0.8
            ),
        ),
    ],
)
def test_dpo_loss_by_hand(kwargs, formula) -> None:
    strategy, _ = _dpo_strategy(**kwargs)
    assert strategy.compute_loss(_dpo_batch()).item() == pytest.approx(formula(_dpo_margin()), rel=1e-6)


def test_dpo_ipo_uses_length_normalised_log_probs() -> None:
    strategy, _ = _dpo_strategy(beta=0.5, loss_type="ipo")
    delta = _dpo_margin() / 2  # two completion tokens per sequence
    assert strategy.compute_loss(_dpo_batch()).item() == pytest.approx((delta - 1 / (2 * 0.5)) ** 2, rel=1e-6)


def test_dpo_reference_is_a_frozen_cpu_copy_or_the_disabled_adapters(make_lm) -> None:
    strategy, model = _dpo_strategy()
    ref = strategy.ref_model.module
    assert ref is not model and not ref.table.requires_grad
    assert ref.table.untyped_storage().data_ptr() != model.table.untyped_storage().data_ptr()
    assert torch.equal(ref.table, torch.zeros(3, 3))

    lm = make_lm()
    apply_lora(lm, LoRAConfig(rank=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_()
    lora_strategy = DPOStrategy(lm, "cpu")
    assert lora_strategy.ref_model.module is lm  # no copy at all
    ids = torch.randint(0, 64, (1, 5))
    base = make_lm()(ids)["logits"]
    torch.testing.assert_close(lora_strategy.ref_model.logits(ids, None), base)
    assert not torch.allclose(lm(ids)["logits"], base)  # the adapters are back on afterwards


def test_dpo_precomputed_reference_log_probs() -> None:
    strategy, _ = _dpo_strategy(beta=0.5)
    batch = _dpo_batch() | {"ref_chosen_logps": torch.tensor([-1.0]), "ref_rejected_logps": torch.tensor([-3.0])}
    logp = lambda seq: sum(log_softmax_row(TRAINED[seq[t - 1]], seq[t]) for t in (1, 2))  # noqa: E731
    delta = (logp([0, 1, 2]) + 1.0) - (logp([0, 2, 2]) + 3.0)
    assert strategy.compute_loss(batch).item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.5 * delta))), rel=1e-6)


# --- GRPO ---------------------------------------------------------------------------------------------


def _grpo_batch(**extra) -> dict[str, torch.Tensor]:
    return {
        "prompt_ids": torch.tensor([[0]]),
        "prompt_mask": torch.tensor([[True]]),
        "response_ids": torch.tensor([[[1, 2], [2, 0]]]),  # G = 2 responses of R = 2 tokens
        "response_mask": torch.tensor([[[True, True], [True, False]]]),
        "rewards": torch.tensor([[1.0, 0.0]]),
        **extra,
    }


def _grpo_strategy(**kwargs) -> GRPOStrategy:
    model = Bigram(INITIAL)
    strategy = GRPOStrategy(model, "cpu", **kwargs)
    with torch.no_grad():
        model.table.copy_(torch.tensor(TRAINED))
    return strategy


def test_group_advantages() -> None:
    a = 0.5 / (math.sqrt(0.5) + 1e-4)  # unbiased std of (1, 0) is sqrt(1/2)
    torch.testing.assert_close(group_advantages(torch.tensor([[1.0, 0.0]])), torch.tensor([[a, -a]]))
    torch.testing.assert_close(group_advantages(torch.tensor([[1.0, 0.0]]), "none"), torch.tensor([[0.5, -0.5]]))
    single = group_advantages(torch.tensor([[3.0], [5.0]]))  # G = 1: no NaN, no signal
    assert torch.equal(single, torch.zeros(2, 1))


@pytest.mark.parametrize(
    "reduction, expected",
    [
        ("token", lambda a: (-a * 2 + a * 1) / 3),  # sum over 3 completion tokens / 3
        ("sequence", lambda a: (-a + a) / 2),  # each response's token mean, averaged
        ("dr_grpo", lambda a: (-a * 2 + a * 1) / (2 * 2)),  # / (responses x max length)
    ],
)
def test_grpo_on_policy_aggregations_by_hand(reduction, expected) -> None:
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    strategy = _grpo_strategy(reduction=reduction)
    # On policy the ratio is 1, so each completion token contributes -A of its response.
    assert strategy.compute_loss(_grpo_batch()).item() == pytest.approx(expected(a), rel=1e-6, abs=1e-7)


def test_grpo_clipped_ratio_and_k3_kl_by_hand() -> None:
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    # Responses [1, 2] (A = +a) and [2, -] (A = -a) after prompt 0: tokens scored under rows 0, 1 and 0.
    tokens = [(0, 1, a), (1, 2, a), (0, 2, -a)]
    old = [-0.5, -2.0, -1.0]
    strategy = _grpo_strategy(clip_eps=0.2, kl_coef=0.1)
    loss = strategy.compute_loss(_grpo_batch(old_logps=torch.tensor([[[old[0], old[1]], [old[2], 0.0]]])))
    total = 0.0
    for (row, tok, adv), old_logp in zip(tokens, old):
        logp = log_softmax_row(TRAINED[row], tok)
        ref = log_softmax_row(INITIAL[row], tok)
        ratio = math.exp(logp - old_logp)
        clipped = min(max(ratio, 0.8), 1.2)
        k3 = math.exp(ref - logp) - (ref - logp) - 1
        total += -min(ratio * adv, clipped * adv) + 0.1 * k3
    assert loss.item() == pytest.approx(total / 3, rel=1e-6)


def test_grpo_online_rollout_matches_offline() -> None:
    completions = {0: [[1, 2], [2]]}

    def generate(prompts):
        assert prompts == [[0], [0]]  # each prompt group_size times, padding stripped
        return completions[0]

    def reward(prompts, outputs):
        return [1.0 if out == [1, 2] else 0.0 for out in outputs]

    online = _grpo_strategy(group_size=2, generate_fn=generate, reward_fn=reward)
    batch = online.prepare({"prompt_ids": torch.tensor([[0]]), "prompt_mask": torch.tensor([[True]])})
    assert torch.equal(batch["response_ids"], torch.tensor([[[1, 2], [2, 0]]]))
    assert torch.equal(batch["rewards"], torch.tensor([[1.0, 0.0]]))
    offline = _grpo_strategy()
    torch.testing.assert_close(online.compute_loss(batch), offline.compute_loss(_grpo_batch()))

    broadcast = _grpo_strategy(group_size=2, generate_fn=generate, reward_fn=lambda p, c: [1.0])
    with pytest.raises(ValueError, match="1 rewards for 2 completions"):
        broadcast.prepare({"prompt_ids": torch.tensor([[0]])})
    with pytest.raises(ValueError, match="generate_fn and reward_fn"):
        _grpo_strategy(generate_fn=generate)
    with pytest.raises(ValueError, match="no responses"):
        _grpo_strategy().prepare({"prompt_ids": torch.tensor([[0]])})


# --- strategy metrics (TRL's names) -------------------------------------------------------------------


def _means(strategy) -> dict[str, float]:
    return {name: (pair[0] / pair[1]).item() for name, pair in strategy.metric_sums().items()}


def test_dpo_reward_metrics_by_hand() -> None:
    """TRL's implicit rewards beta (logp_pi - logp_ref) of chosen and rejected, their margin and the
    fraction of pairs ranked right, as means over the pairs of every call since the last reset."""

    def logp(table: list[list[float]], seq: list[int]) -> float:
        return sum(log_softmax_row(table[seq[t - 1]], seq[t]) for t in (1, 2))

    pairs = [([0, 1, 2], [0, 2, 2]), ([0, 2, 1], [0, 1, 1]), ([0, 0, 1], [0, 2, 0])]
    beta = 0.5
    chosen = [beta * (logp(TRAINED, c) - logp(INITIAL, c)) for c, _ in pairs]
    rejected = [beta * (logp(TRAINED, r) - logp(INITIAL, r)) for _, r in pairs]
    assert 0 < sum(c > r for c, r in zip(chosen, rejected)) < len(pairs)  # a batch that is partly wrong

    def batch(rows):
        mask = torch.tensor([[False, True, True]] * len(rows))
        return {
            "chosen": torch.tensor([c for c, _ in rows]),
            "rejected": torch.tensor([r for _, r in rows]),
            "chosen_mask": mask,
            "rejected_mask": mask,
        }

    strategy, model = _dpo_strategy(beta=beta)
    strategy.compute_loss(batch(pairs[:2]))  # two micro-batches of one step: means over all three pairs
    strategy.compute_loss(batch(pairs[2:]))
    n = len(pairs)
    expected = {
        "rewards/chosen": sum(chosen) / n,
        "rewards/rejected": sum(rejected) / n,
        "rewards/margins": sum(c - r for c, r in zip(chosen, rejected)) / n,
        "rewards/accuracies": sum(c > r for c, r in zip(chosen, rejected)) / n,
        "logps/chosen": sum(logp(TRAINED, c) for c, _ in pairs) / n,
        "logps/rejected": sum(logp(TRAINED, r) for _, r in pairs) / n,
    }
    got = _means(strategy)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name

    strategy.reset_metrics()
    model.eval()  # validation forwards add nothing
    strategy.compute_loss(batch(pairs))
    assert strategy.metric_sums() == {}


def test_grpo_metrics_by_hand() -> None:
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    tokens = [(0, 1, a), (1, 2, a), (0, 2, -a)]  # (table row, token, advantage) of the 3 completion tokens
    old = [-0.5, -2.0, -1.0]
    strategy = _grpo_strategy(clip_eps=0.2, kl_coef=0.1)
    batch = _grpo_batch(old_logps=torch.tensor([[[old[0], old[1]], [old[2], 0.0]]]))
    batch_two = {  # a second prompt whose two responses got the same reward
        **batch,
        "rewards": torch.tensor([[2.0, 2.0]]),
    }
    strategy.compute_loss(batch)
    strategy.compute_loss(batch_two)
    clipped, kls = [], []
    for (row, tok, adv), old_logp in zip(tokens, old):
        logp = log_softmax_row(TRAINED[row], tok)
        ref = log_softmax_row(INITIAL[row], tok)
        ratio = math.exp(logp - old_logp)
        clipped.append((ratio < 0.8 and adv < 0) or (ratio > 1.2 and adv > 0))
        kls.append(math.exp(ref - logp) - (ref - logp) - 1)
    assert 0 < sum(clipped) < 3  # some tokens clipped, some not
    expected = {
        "reward": (1.0 + 0.0 + 2.0 + 2.0) / 4,
        "reward_std": (math.sqrt(0.5) + 0.0) / 2,
        "frac_reward_zero_std": 0.5,
        # the second batch's advantages are 0: nothing of it is clipped
        "clip_ratio/region_mean": sum(clipped) / 6,
        "kl": 2 * sum(kls) / 6,
    }
    got = _means(strategy)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
    without_kl = _grpo_strategy()
    without_kl.compute_loss(batch)
    assert "kl" not in _means(without_kl) and "reward" in _means(without_kl)
