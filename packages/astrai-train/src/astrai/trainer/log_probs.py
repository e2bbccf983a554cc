"""Log-probabilities of given tokens under a causal LM, shared by the strategies and the reference model."""

from __future__ import annotations

import torch
from torch import nn


def model_logits(model: nn.Module, input_ids: torch.Tensor, input_mask: torch.Tensor | None) -> torch.Tensor:
    """Logits (B, T, V) of `model(input_ids, input_mask=...)`, whether it returns a dict or a tensor."""
    out = model(input_ids, input_mask=input_mask)
    return out["logits"] if isinstance(out, dict) else out


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position, in float32: logits (B, T, V), targets (B, T) -> (B, T)."""
    logits = logits.float()
    # logsumexp + gather instead of a full log_softmax: one (B, T, V) temporary less.
    picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def completion_log_probs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(input_ids[:, t] | input_ids[:, :t]) for t >= 1: logits (B, T, V) of `input_ids` (B, T) -> (B, T-1).

    Position t-1's logits predict token t, so entry j of the result scores token j + 1."""
    return token_log_probs(logits[:, :-1], input_ids[:, 1:])
