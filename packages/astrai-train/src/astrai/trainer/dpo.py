"""`DPOStrategy`: direct preference optimisation against a frozen reference (REFERENCE F, TRL `dpo_trainer`).

Batch: `chosen`, `rejected` (B, T) token ids and `chosen_mask`, `rejected_mask` (B, T), True on the
completion tokens that are scored (prompt and padding False); optional `chosen_input_mask` /
`rejected_input_mask` (B, T) padding masks for the model. With `ref_chosen_logps` / `ref_rejected_logps`
(B,) in the batch, precomputed reference log-probs are used and the reference model is not run.

    logp(y)  = sum over completion tokens t of log pi(y_t | y_<t)       ("mean": divided by their count)
    delta    = (logp_pi(y_w) - logp_ref(y_w)) - (logp_pi(y_l) - logp_ref(y_l))
    sigmoid: -(1 - eps) log s(beta delta) - eps log s(-beta delta)       (eps = label_smoothing, cDPO)
    robust:  (-(1 - eps) log s(beta delta) + eps log s(-beta delta)) / (1 - 2 eps)
    hinge:   relu(1 - beta delta)
    ipo:     (delta - 1 / (2 beta))^2  with length-normalised log-probs

The unit is the preference pair: the step's loss is the mean over all its pairs.

Metrics (TRL's names, means over the step's pairs, in each metrics.jsonl record and tracker):
    rewards/chosen      beta (logp_pi(y_w) - logp_ref(y_w))            (the implicit reward)
    rewards/rejected    beta (logp_pi(y_l) - logp_ref(y_l))
    rewards/margins     rewards/chosen - rewards/rejected               (= beta delta)
    rewards/accuracies  fraction of pairs with rewards/chosen > rewards/rejected
    logps/chosen, logps/rejected                                        logp_pi of each
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from astrai.trainer.log_probs import completion_log_probs, model_logits
from astrai.trainer.reference import ReferenceModel
from astrai.trainer.strategy import BaseStrategy, StrategyFactory

DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")
LOGP_REDUCTIONS = ("sum", "mean")


def sequence_log_probs(token_logps: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-sequence log-prob from per-token ones (B, T-1) under `mask` (B, T-1): sum, or mean over the mask."""
    total = (token_logps * mask).sum(-1)
    return total if reduction == "sum" else total / mask.sum(-1).clamp(min=1)


def dpo_loss(delta: torch.Tensor, beta: float, loss_type: str, label_smoothing: float) -> torch.Tensor:
    """Per-pair DPO loss (B,) from the log-ratio margin `delta` (B,)."""
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    if loss_type == "robust":
        eps = label_smoothing
        return (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    return (delta - 1 / (2 * beta)) ** 2  # ipo


@StrategyFactory.register("dpo")
class DPOStrategy(BaseStrategy):
    """Preference pairs scored against a frozen reference; see the module docstring for the losses."""

    def __init__(
        self,
        model: nn.Module,
        device: str | torch.device,
        beta: float = 0.1,
        reduction: str = "sum",
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        ref_device: str | None = "cpu",
    ) -> None:
        super().__init__(model, device)
        if beta <= 0:
            raise ValueError(f"beta={beta!r}: must be positive")
        if loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"loss_type={loss_type!r}: allowed {list(DPO_LOSS_TYPES)}")
        if reduction not in LOGP_REDUCTIONS:
            raise ValueError(f"reduction={reduction!r}: allowed {list(LOGP_REDUCTIONS)}")
        limit = 0.5 if loss_type == "robust" else 1.0
        if not 0.0 <= label_smoothing < limit:
            raise ValueError(
                f"label_smoothing={label_smoothing!r}: must be in [0, {limit}) for loss_type={loss_type!r}"
            )
        if label_smoothing and loss_type not in ("sigmoid", "robust"):
            raise ValueError(f"label_smoothing applies to loss_type 'sigmoid' or 'robust', not {loss_type!r}")
        self.beta = beta
        self.loss_type = loss_type
        # IPO is defined on length-normalised log-probs (TRL, confirmed with the IPO authors).
        self.reduction = "mean" if loss_type == "ipo" else reduction
        self.label_smoothing = label_smoothing
        self.ref_model = ReferenceModel(model, ref_device or self.device)

    def count_units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self._require(batch, "chosen", "rejected", "chosen_mask", "rejected_mask")
        return torch.tensor(batch["chosen"].shape[0], device=batch["chosen"].device)

    def num_input_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return 2 * batch["chosen"].numel()

    def _inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Chosen and rejected stacked on the batch axis, `[chosen; rejected]`: ids, scored mask, padding mask."""
        self._require(batch, "chosen", "rejected", "chosen_mask", "rejected_mask")
        if batch["chosen"].shape != batch["rejected"].shape:
            raise ValueError(
                f"chosen {tuple(batch['chosen'].shape)} and rejected {tuple(batch['rejected'].shape)} differ"
            )
        ids = torch.cat([batch["chosen"], batch["rejected"]])  # (2B, T)
        scored = torch.cat([batch["chosen_mask"], batch["rejected_mask"]]).bool()[:, 1:]  # (2B, T-1)
        if "chosen_input_mask" in batch:
            pad = torch.cat([batch["chosen_input_mask"], batch["rejected_input_mask"]]).bool()
            return ids, scored & pad[:, 1:], pad
        return ids, scored, None

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, scored, pad = self._inputs(batch)
        n = batch["chosen"].shape[0]
        logits = model_logits(self.model, ids, pad)  # (2B, T, V)
        policy = sequence_log_probs(completion_log_probs(logits, ids), scored, self.reduction)  # (2B,)
        aux = self._aux_loss(torch.tensor(n, device=logits.device))  # read before the reference forward
        if "ref_chosen_logps" in batch:
            ref = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]).float()
        else:
            ref_logits = self.ref_model.logits(ids, pad)
            ref = sequence_log_probs(completion_log_probs(ref_logits, ids), scored, self.reduction)
        delta = (policy[:n] - ref[:n]) - (policy[n:] - ref[n:])  # (B,)
        chosen_rewards = self.beta * (policy[:n] - ref[:n]).detach()
        rejected_rewards = self.beta * (policy[n:] - ref[n:]).detach()
        self.add_metric("rewards/chosen", chosen_rewards)
        self.add_metric("rewards/rejected", rejected_rewards)
        self.add_metric("rewards/margins", chosen_rewards - rejected_rewards)
        self.add_metric("rewards/accuracies", (chosen_rewards > rejected_rewards).float())
        self.add_metric("logps/chosen", policy[:n])
        self.add_metric("logps/rejected", policy[n:])
        return dpo_loss(delta, self.beta, self.loss_type, self.label_smoothing).sum() + aux
