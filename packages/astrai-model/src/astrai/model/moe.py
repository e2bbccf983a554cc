"""`DeepSeekMoE`: mixture-of-experts feed-forward with shared and routed SwiGLU experts.

Every token goes through all shared experts (outputs summed, DeepSeek style) and through the
`n_activated_experts` routed experts its router picks, weighted by their routing scores:

    y = sum_j shared_j(x) + sum_{e in topk(x)} w_e(x) * routed_e(x)

Routing (`topk_method`, with transformers' semantics):
- `greedy`: softmax over the router logits, top-k (Qwen3-MoE, DeepSeek-V2-Lite);
- `group_limited_greedy`: softmax; experts split into `n_group` groups scored by their best expert, only the
  best `topk_group` groups compete for the top-k (DeepSeek-V2);
- `noaux_tc`: sigmoid scores; selection uses scores plus the `e_score_correction_bias` buffer, groups are scored
  by the sum of their two best corrected scores; the weights use the uncorrected scores (DeepSeek-V3).
Then the chosen weights are renormalised to sum to 1 if `norm_topk_prob`, and multiplied by
`routed_scaling_factor`. The router runs in float32 whatever the model dtype.

Dispatch is grouped by expert: token/expert pairs are sorted by expert, each expert runs once on its
contiguous slice, and results are scattered back with one `index_add_`.

In training mode every forward stores the load-balancing loss on `self.aux_loss` (0-dim float32, already
multiplied by `aux_loss_coef`), as transformers' `load_balancing_loss_func` (Switch Transformer / Qwen):
`n_routed_experts * sum_e f_e * P_e`, where `f_e` is the fraction of tokens that picked expert `e` and `P_e`
the mean routing probability of `e` (scores normalised to sum to 1 per token). It equals `n_activated_experts`
for perfectly balanced routing. In eval mode `aux_loss` is a zero tensor.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from astrai.config import AutoRegressiveLMConfig
from astrai.model.factories import FFNFactory
from astrai.model.linear import Linear
from astrai.model.mlp import MLP


@FFNFactory.register("moe")
class DeepSeekMoE(nn.Module):
    """Shared + routed experts of `dim_ffn` hidden channels each; `FFNFactory.from_config("moe", config)` builds
    it from an `AutoRegressiveLMConfig` (fields of the same names; the experts' size is `dim_ffn_expert`)."""

    def __init__(
        self,
        dim: int,
        dim_ffn: int,
        n_routed_experts: int,
        n_shared_experts: int = 1,
        n_activated_experts: int = 2,
        topk_method: str = "greedy",
        *,
        norm_topk_prob: bool = False,
        routed_scaling_factor: float = 1.0,
        n_group: int | None = None,
        topk_group: int | None = None,
        aux_loss_coef: float = 0.001,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.n_routed_experts = n_routed_experts
        self.n_shared_experts = n_shared_experts
        self.n_activated_experts = n_activated_experts
        self.topk_method = topk_method
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor
        self.n_group = n_group
        self.topk_group = topk_group
        self.aux_loss_coef = aux_loss_coef

        self.router = Linear(dim, n_routed_experts)  # (E, D) logits
        if topk_method == "noaux_tc":
            # Per-expert selection bias of DeepSeek's auxiliary-loss-free balancing; part of the checkpoint.
            self.register_buffer("e_score_correction_bias", torch.zeros(n_routed_experts, dtype=torch.float32))
        self.shared_experts = nn.ModuleList(MLP(dim, dim_ffn) for _ in range(n_shared_experts))
        self.routed_experts = nn.ModuleList(MLP(dim, dim_ffn) for _ in range(n_routed_experts))
        self.aux_loss: Tensor | None = None

    @staticmethod
    def config_kwargs(config: AutoRegressiveLMConfig) -> dict[str, Any]:
        """This block's arguments as an `AutoRegressiveLMConfig` sets them (used by `FFNFactory.from_config`)."""
        return {
            "dim": config.dim,
            "dim_ffn": config.dim_ffn_expert or config.dim_ffn,
            "n_routed_experts": config.n_routed_experts,
            "n_shared_experts": config.n_shared_experts,
            "n_activated_experts": config.n_activated_experts,
            "topk_method": config.topk_method,
            "norm_topk_prob": config.norm_topk_prob,
            "routed_scaling_factor": config.routed_scaling_factor,
            "n_group": config.n_group,
            "topk_group": config.topk_group,
            "aux_loss_coef": config.aux_loss_coef,
        }

    def reset_parameters(self) -> None:
        if self.topk_method == "noaux_tc":
            self.e_score_correction_bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, self.dim)  # (N, D)
        probs, weights, experts = self.route(x)  # (N, E), (N, K), (N, K)
        if self.training:
            self.aux_loss = self.aux_loss_coef * self.balance_loss(probs, experts)
        else:
            self.aux_loss = x.new_zeros((), dtype=torch.float32)

        out = self._dispatch(x, weights, experts)
        for expert in self.shared_experts:
            out = out + expert(x)
        return out.view(shape)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Pick experts for tokens x (N, D).

        Returns `probs` (N, E) float32 routing probabilities (each row sums to 1; used by the balance loss),
        `weights` (N, K) float32 mixing weights of the chosen experts and `experts` (N, K) their indices.
        """
        logits = F.linear(x.float(), self.router.weight.float())  # (N, E)
        if self.topk_method == "noaux_tc":
            scores = logits.sigmoid()
            choice = scores + self.e_score_correction_bias
        else:
            scores = logits.softmax(-1)
            choice = scores
        if self.topk_method != "greedy":
            choice = self._mask_groups(choice)
        experts = choice.topk(self.n_activated_experts, dim=-1, sorted=False).indices
        weights = scores.gather(1, experts)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = weights * self.routed_scaling_factor
        probs = scores if self.topk_method != "noaux_tc" else scores / scores.sum(-1, keepdim=True)
        return probs, weights, experts

    def _mask_groups(self, choice: Tensor) -> Tensor:
        """Keep the experts of each token's best `topk_group` groups; the others get -inf. choice (N, E)."""
        grouped = choice.view(-1, self.n_group, self.n_routed_experts // self.n_group)  # (N, G, E/G)
        if self.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # (N, G)
        else:
            group_scores = grouped.amax(-1)
        best = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices  # (N, topk_group)
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)  # (N, G)
        return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view_as(choice)

    def balance_loss(self, probs: Tensor, experts: Tensor) -> Tensor:
        """`E * sum_e f_e * P_e` (without the coefficient); differentiable through `probs` (N, E)."""
        n_tokens = probs.shape[0]
        picked = torch.bincount(experts.flatten(), minlength=self.n_routed_experts).float()
        frac_tokens = picked / n_tokens  # f_e: sums to n_activated_experts
        return self.n_routed_experts * (frac_tokens * probs.mean(0)).sum()

    def _dispatch(self, x: Tensor, weights: Tensor, experts: Tensor) -> Tensor:
        """Run each routed expert once on the tokens that chose it. x (N, D), weights/experts (N, K)."""
        K = experts.shape[1]
        order = experts.flatten().argsort(stable=True)  # token/expert pairs sorted by expert
        token_of_pair = order // K  # (N*K,) token index of each sorted pair
        counts = torch.bincount(experts.flatten(), minlength=self.n_routed_experts).tolist()
        pair_weights = weights.flatten()[order].unsqueeze(-1)  # (N*K, 1)

        outputs = []
        for expert, tokens, w in zip(self.routed_experts, x[token_of_pair].split(counts), pair_weights.split(counts)):
            if tokens.shape[0]:
                outputs.append((expert(tokens) * w).to(x.dtype))
        out = torch.zeros_like(x)
        return out.index_add_(0, token_of_pair, torch.cat(outputs))
