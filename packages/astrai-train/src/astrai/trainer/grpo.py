"""`GRPOStrategy`: group relative policy optimisation (REFERENCE F; TRL `grpo_trainer`, verl `core_algos`).

Batch (as `GRPODataset` yields it): `prompt_ids` (B, P) left-padded, `prompt_mask` (B, P), `response_ids`
(B, G, R) right-padded, `response_mask` (B, G, R) True on the response tokens the loss covers, `rewards`
(B, G); optional `old_logps` (B, G, R), the behaviour policy's token log-probs (absent: on-policy, the
ratio is 1 in value and carries the gradient).

Online: with `generate_fn` and `reward_fn`, a batch of prompts only (`prompt_ids`, `prompt_mask`) is
rolled out in `prepare`: each prompt is sampled `group_size` times by `generate_fn(prompts) ->
completions` (lists of token ids, one completion per prompt given) and scored by `reward_fn(prompts,
completions) -> rewards` (one float each). The caller wires these, e.g. to an inference engine; the
trainer never imports one.

    A_i   = (r_i - mean_group r) / (std_group r + 1e-4)          (scale_rewards="none": no division;
                                                                   G = 1 gives A = 0, never NaN)
    ratio = exp(logp - logp_old)  per completion token
    l_t   = -min(ratio A, clip(ratio, 1 - clip_eps, 1 + clip_eps_high) A) + kl_coef k3_t
    k3_t  = exp(logp_ref - logp) - (logp_ref - logp) - 1          (Schulman; only when kl_coef > 0)

Aggregation (`reduction`), each an exact mean over the optimizer step's units:
    "token"    sum of l_t over all completion tokens / their count            (DAPO; the default)
    "sequence" mean over responses of each response's token mean             (original GRPO)
    "dr_grpo"  sum of l_t / (responses x max_completion_length)               (Dr. GRPO)

Metrics (TRL's names, means over the optimizer step, in each metrics.jsonl record and tracker):
    reward                  mean reward of the responses
    reward_std              mean over prompts of the group's reward std (0 for G = 1)
    frac_reward_zero_std    fraction of groups whose rewards are all equal (advantages 0: no signal)
    clip_ratio/region_mean  fraction of completion tokens whose ratio is clipped (ratio < 1 - clip_eps
                            with A < 0, or > 1 + clip_eps_high with A > 0)
    kl                      mean k3_t over completion tokens (only when kl_coef > 0)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from astrai.trainer.log_probs import model_logits, token_log_probs
from astrai.trainer.reference import ReferenceModel
from astrai.trainer.strategy import BaseStrategy, StrategyFactory

GRPO_REDUCTIONS = ("token", "sequence", "dr_grpo")
SCALE_REWARDS = ("group", "none")
GenerateFn = Callable[[list[list[int]]], Sequence[Sequence[int]]]
RewardFn = Callable[[list[list[int]], list[list[int]]], Sequence[float]]


def group_advantages(rewards: torch.Tensor, scale_rewards: str = "group") -> torch.Tensor:
    """Group-normalised advantages: rewards (B, G) -> (B, G)."""
    rewards = rewards.float()
    centred = rewards - rewards.mean(-1, keepdim=True)
    if scale_rewards == "none":
        return centred
    if rewards.shape[-1] == 1:  # one response per prompt: no spread to normalise, and no signal
        return centred
    return centred / (rewards.std(-1, keepdim=True) + 1e-4)


@StrategyFactory.register("grpo")
class GRPOStrategy(BaseStrategy):
    """Clipped token-level policy gradient on group-normalised rewards; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        device: str | torch.device,
        clip_eps: float = 0.2,
        clip_eps_high: float | None = None,
        kl_coef: float = 0.0,
        group_size: int = 4,
        reduction: str = "token",
        scale_rewards: str = "group",
        max_completion_length: int | None = None,
        sync_interval: int = 0,
        ref_device: str | None = "cpu",
        generate_fn: GenerateFn | None = None,
        reward_fn: RewardFn | None = None,
    ) -> None:
        super().__init__(model, device)
        if reduction not in GRPO_REDUCTIONS:
            raise ValueError(f"reduction={reduction!r}: allowed {list(GRPO_REDUCTIONS)}")
        if scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards={scale_rewards!r}: allowed {list(SCALE_REWARDS)}")
        if not 0 < clip_eps < 1:
            raise ValueError(f"clip_eps={clip_eps!r}: must be in (0, 1)")
        if clip_eps_high is not None and clip_eps_high <= 0:
            raise ValueError(f"clip_eps_high={clip_eps_high!r}: must be positive")
        if kl_coef < 0:
            raise ValueError(f"kl_coef={kl_coef!r}: must be >= 0")
        if group_size < 1:
            raise ValueError(f"group_size={group_size!r}: must be >= 1")
        if max_completion_length is not None and max_completion_length < 1:
            raise ValueError(f"max_completion_length={max_completion_length!r}: must be >= 1")
        if sync_interval < 0:
            raise ValueError(f"sync_interval={sync_interval!r}: must be >= 0 (0: never re-sync the reference)")
        if (generate_fn is None) != (reward_fn is None):
            raise ValueError("online GRPO needs both generate_fn and reward_fn")
        self.clip_eps = clip_eps
        self.clip_eps_high = clip_eps if clip_eps_high is None else clip_eps_high
        self.kl_coef = kl_coef
        self.group_size = group_size
        self.reduction = reduction
        self.scale_rewards = scale_rewards
        self.max_completion_length = max_completion_length
        self.sync_interval = sync_interval
        self.generate_fn = generate_fn
        self.reward_fn = reward_fn
        # The reference is only needed for the KL term.
        self.ref_model = ReferenceModel(model, ref_device or self.device) if kl_coef > 0 else None
        if sync_interval and (self.ref_model is None or self.ref_model.uses_adapters):
            raise ValueError("sync_interval needs kl_coef > 0 and a model without LoRA adapters")

    # --- rollouts ----------------------------------------------------------------------------------------

    def prepare(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        batch = super().prepare(batch)
        if "response_ids" in batch:
            return batch
        if self.generate_fn is None:
            raise ValueError("GRPO batch has no responses: pass generate_fn and reward_fn for online rollouts")
        return self._rollout(batch)

    @torch.no_grad()
    def _rollout(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self._require(batch, "prompt_ids")
        ids = batch["prompt_ids"]
        mask = batch.get("prompt_mask", torch.ones_like(ids, dtype=torch.bool)).bool()
        prompts = [row[m].tolist() for row, m in zip(ids, mask)]
        repeated = [p for p in prompts for _ in range(self.group_size)]  # (B * G) prompts, groups adjacent
        completions = [list(c) for c in self.generate_fn(repeated)]
        if len(completions) != len(repeated):
            raise ValueError(f"generate_fn returned {len(completions)} completions for {len(repeated)} prompts")
        rewards = [float(r) for r in self.reward_fn(repeated, completions)]
        if len(rewards) != len(repeated):  # never broadcast one reward to all (TRL #6533)
            raise ValueError(f"reward_fn returned {len(rewards)} rewards for {len(repeated)} completions")
        width = max(1, *(len(c) for c in completions))
        if self.max_completion_length is not None and width > self.max_completion_length:
            raise ValueError(f"a completion has {width} tokens > max_completion_length={self.max_completion_length}")
        responses = torch.zeros(len(completions), width, dtype=torch.long)
        response_mask = torch.zeros(len(completions), width, dtype=torch.bool)
        for i, c in enumerate(completions):
            responses[i, : len(c)] = torch.tensor(c, dtype=torch.long)
            response_mask[i, : len(c)] = True
        b, g = ids.shape[0], self.group_size
        return {
            "prompt_ids": ids,
            "prompt_mask": mask,
            "response_ids": responses.view(b, g, width).to(self.device),
            "response_mask": response_mask.view(b, g, width).to(self.device),
            "rewards": torch.tensor(rewards, dtype=torch.float32).view(b, g).to(self.device),
        }

    # --- loss --------------------------------------------------------------------------------------------

    def count_units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self._require(batch, "prompt_ids", "response_ids", "response_mask", "rewards")
        mask = batch["response_mask"].bool()  # (B, G, R)
        if self.reduction == "token":
            return mask.sum()
        if self.reduction == "sequence":
            return mask.any(-1).sum()
        return torch.tensor(mask.shape[0] * mask.shape[1], device=mask.device)  # responses (x length in loss_sum)

    def num_input_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        b, g, r = batch["response_ids"].shape
        return b * g * (batch["prompt_ids"].shape[1] + r)

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self._require(batch, "prompt_ids", "response_ids", "response_mask", "rewards")
        b, g, r = batch["response_ids"].shape
        p = batch["prompt_ids"].shape[1]
        prompt_mask = batch.get("prompt_mask", torch.ones_like(batch["prompt_ids"], dtype=torch.bool)).bool()
        responses = batch["response_ids"].reshape(b * g, r)
        mask = batch["response_mask"].reshape(b * g, r).bool()
        ids = torch.cat([batch["prompt_ids"].repeat_interleave(g, 0), responses], dim=1)  # (BG, P+R)
        pad = torch.cat([prompt_mask.repeat_interleave(g, 0), mask], dim=1)
        logits = model_logits(self.model, ids, pad)[:, p - 1 : p + r - 1]  # (BG, R, V): predicts the responses
        logp = token_log_probs(logits, responses)  # (BG, R)
        aux = self._aux_loss(self.count_units(batch))  # read before the reference forward
        old = batch["old_logps"].reshape(b * g, r).float() if "old_logps" in batch else logp.detach()
        adv = group_advantages(batch["rewards"], self.scale_rewards).reshape(b * g, 1)  # (BG, 1)
        ratio = torch.exp(logp - old)
        clipped = ratio.clamp(1 - self.clip_eps, 1 + self.clip_eps_high)
        per_token = -torch.minimum(ratio * adv, clipped * adv)  # (BG, R)
        self._add_reward_metrics(batch["rewards"])
        low = (ratio < 1 - self.clip_eps) & (adv < 0)
        high = (ratio > 1 + self.clip_eps_high) & (adv > 0)
        self.add_metric("clip_ratio/region_mean", (low | high).float(), mask)
        if self.kl_coef > 0:
            ref_logits = self.ref_model.logits(ids, pad)[:, p - 1 : p + r - 1]
            log_ratio = token_log_probs(ref_logits, responses) - logp  # log(pi_ref / pi)
            k3 = torch.exp(log_ratio) - log_ratio - 1
            self.add_metric("kl", k3, mask)
            per_token = per_token + self.kl_coef * k3
        per_token = per_token * mask
        if self.reduction == "sequence":
            total = (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).sum()
        elif self.reduction == "dr_grpo":
            total = per_token.sum() / (self.max_completion_length or r)
        else:
            total = per_token.sum()
        return total + aux

    def _add_reward_metrics(self, rewards: torch.Tensor) -> None:
        rewards = rewards.detach().float()  # (B, G)
        std = rewards.std(-1) if rewards.shape[-1] > 1 else torch.zeros_like(rewards[:, 0])
        self.add_metric("reward", rewards)
        self.add_metric("reward_std", std)
        self.add_metric("frac_reward_zero_std", torch.isclose(std, torch.zeros_like(std)).float())

    # --- reference synchronisation -----------------------------------------------------------------------

    def sync_ref_model(self) -> None:
        """Make the current policy the new reference (every rank must call)."""
        if self.ref_model is None:
            raise ValueError("GRPO with kl_coef=0 has no reference model")
        self.ref_model.sync_from(self.model)

    def step_end(self, step: int) -> None:
        if self.sync_interval and step % self.sync_interval == 0:
            self.sync_ref_model()

    def state_dict(self) -> dict[str, Any]:
        if not self.sync_interval:  # the reference is the initial policy, rebuilt with the model
            return {}
        return {"ref_model": {k: v.detach().cpu() for k, v in self.ref_model.module.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "ref_model" in state:
            self.ref_model.module.load_state_dict(state["ref_model"])
