"""Training objectives: `BaseStrategy`, `StrategyFactory` and the token-level `seq` / `sft` strategies.

Every strategy reports its loss as a sum over *units* (trained tokens for SEQ/SFT, preference pairs for
DPO, what the aggregation mode names for GRPO) plus the count of those units. The trainer counts the
units of a whole optimizer step (all micro-batches, all-reduced over ranks) before any backward pass and
calls `compute_loss(batch, num_units=that_count)`: each micro-batch then contributes exactly its share of
the step's mean, so batch 8 x 1 micro-batch, 2 x 4 and 2 ranks x 2 x 2 give the same gradient
(REFERENCE D). Called on its own, `compute_loss(batch)` is the mean over the batch's own units.

Batches are dicts of tensors as the datasets yield them (see `astrai.dataset`). An `input_mask` (B, T)
in the batch (True = real token) is always handed to the model, which honours it.

Token batches come in two conventions, told apart by their key:

    target_ids  ours and the original's: already shifted, target_ids[t] is the token after input_ids[t]
                (the datasets read one token past the window for it); an SFT `loss_mask` is aligned
                with target_ids
    labels      Hugging Face's: NOT shifted, labels[t] is the token at position t (== input_ids[t] where
                trained, -100 where not); `prepare` shifts it into target_ids, so position t learns
                labels[t + 1] and the last position learns nothing, as HF's causal-LM loss does. A
                `loss_mask` beside labels is aligned with them and shifted too; SFT without one trains
                where labels are not -100.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from astrai.factory import BaseFactory
from astrai.trainer.executor import unwrap
from astrai.trainer.log_probs import model_logits

IGNORE_INDEX = -100


def batch_size(batch: dict[str, torch.Tensor]) -> int:
    """Number of samples in a batch (the leading dimension of its tensors)."""
    return next(iter(batch.values())).shape[0]


class BaseStrategy(ABC):
    """A loss over batches of one training type, computed with `model` on `device`."""

    def __init__(self, model: nn.Module, device: str | torch.device) -> None:
        self.model = model
        self.device = torch.device(device)

    def __call__(self, batch: dict[str, Any], num_units: int | torch.Tensor | None = None) -> torch.Tensor:
        return self.compute_loss(batch, num_units)

    def prepare(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The batch on `device`; strategies that build their inputs (online GRPO) extend this."""
        out = {}
        for key, value in batch.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"batch[{key!r}] must be a tensor, got {type(value).__name__}")
            out[key] = value.to(self.device, non_blocking=True)
        return out

    @abstractmethod
    def count_units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Number of units the loss averages over in this (prepared) batch, a 0-dim int64 tensor."""

    @abstractmethod
    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum over the batch's units of the per-unit loss (0-dim float32, differentiable)."""

    def compute_loss(self, batch: dict[str, Any], num_units: int | torch.Tensor | None = None) -> torch.Tensor:
        """`loss_sum(batch) / num_units` (default: this batch's own units); 0, not NaN, with no units."""
        batch = self.prepare(batch)
        total = self.loss_sum(batch)
        units = self.count_units(batch) if num_units is None else num_units
        if isinstance(units, torch.Tensor):
            return total / units.to(total.device, total.dtype).clamp(min=1)
        return total / max(units, 1)

    def num_input_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens the model reads for this batch (for throughput metrics)."""
        return batch["input_ids"].numel()

    def step_end(self, step: int) -> None:
        """Called by the trainer after optimizer step `step` (1-based); e.g. GRPO re-syncs its reference."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Strategy state a checkpoint must keep for an exact resume (most strategies have none)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        return None

    # --- step metrics --------------------------------------------------------------------------------------
    # Strategy-specific training metrics (DPO's implicit rewards, GRPO's reward statistics), each a mean over
    # the units of one optimizer step: the trainer resets them as a step starts, the strategy adds (sum,
    # count) pairs while it computes the step's losses, and the metric logger reduces them over ranks into
    # each metrics.jsonl record. Forward passes in eval mode (validation) add nothing.

    def reset_metrics(self) -> None:
        """Forget the metrics added so far (the trainer calls this as each optimizer step starts)."""
        self.__dict__["_metric_sums"] = {}

    def metric_sums(self) -> dict[str, torch.Tensor]:
        """name -> float64 tensor [sum, count] of what `add_metric` was given since the last reset."""
        return self.__dict__.get("_metric_sums", {})

    def add_metric(self, name: str, values: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add `values` (under the bool `mask`, if given) to the step's mean of metric `name`; ignored
        while the model is in eval mode."""
        if not unwrap(self.model).training:
            return
        values = values.detach().double()
        if mask is not None:
            mask = mask.to(values.device, torch.bool)
            pair = torch.stack([(values * mask).sum(), mask.sum().double()])
        else:
            pair = torch.stack([values.sum(), torch.tensor(values.numel(), dtype=torch.float64, device=values.device)])
        sums = self.__dict__.setdefault("_metric_sums", {})
        sums[name] = sums[name] + pair if name in sums else pair

    def _require(self, batch: dict[str, torch.Tensor], *keys: str) -> None:
        missing = [k for k in keys if k not in batch]
        if missing:
            raise ValueError(f"{type(self).__name__} needs batch key(s) {missing}; the batch has {sorted(batch)}")

    def _aux_loss(self, units: torch.Tensor) -> torch.Tensor | float:
        """The MoE load-balancing loss of the last forward, weighted by this micro-batch's units, so the
        step's total is its unit-weighted mean over micro-batches (0 for dense models)."""
        aux = getattr(unwrap(self.model), "aux_loss", None)
        if not isinstance(aux, torch.Tensor) or not aux.requires_grad:
            return 0.0
        return aux.float() * units.to(aux.device, torch.float32)


class StrategyFactory(BaseFactory[BaseStrategy]):
    """Strategies by training type: "seq", "sft", "dpo", "grpo"."""

    kind = "strategy"
    base_class = BaseStrategy

    @classmethod
    def create(cls, train_type: str, model: nn.Module, device: str | torch.device, **kwargs: Any) -> BaseStrategy:
        return super().create(train_type, model, device, **kwargs)


@StrategyFactory.register("seq")
class SEQStrategy(BaseStrategy):
    """Next-token cross-entropy over every target token (pre-training). Batch: `input_ids` (B, T) and
    `target_ids` (B, T; the next tokens, IGNORE_INDEX = not trained) or Hugging Face `labels` (B, T; not
    shifted), optional `input_mask` (B, T)."""

    def __init__(self, model: nn.Module, device: str | torch.device, label_smoothing: float = 0.0) -> None:
        super().__init__(model, device)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={label_smoothing!r}: must be in [0, 1)")
        self.label_smoothing = label_smoothing

    def prepare(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The batch on `device`, Hugging Face `labels` shifted into `target_ids` (module docstring)."""
        batch = super().prepare(batch)
        if "labels" not in batch:
            return batch
        if "target_ids" in batch:
            raise ValueError(
                "the batch has both target_ids (the next tokens) and labels (Hugging Face: the tokens"
                " themselves, shifted by the strategy); give one"
            )
        labels = batch.pop("labels")  # (B, T)
        batch["target_ids"] = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
        if "loss_mask" in batch:
            mask = batch["loss_mask"]
            batch["loss_mask"] = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
        return batch

    def _trained(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T) bool: the positions whose target is trained."""
        self._require(batch, "input_ids", "target_ids")
        trained = batch["target_ids"] != IGNORE_INDEX
        if "input_mask" in batch:
            trained = trained & batch["input_mask"].bool()
        return trained

    def count_units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._trained(batch).sum()

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        trained = self._trained(batch)
        logits = model_logits(self.model, batch["input_ids"], batch.get("input_mask"))  # (B, T, V)
        targets = torch.where(trained, batch["target_ids"], IGNORE_INDEX)
        total = F.cross_entropy(
            logits.flatten(0, 1).float(),
            targets.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
            label_smoothing=self.label_smoothing,
        )
        return total + self._aux_loss(trained.sum())


@StrategyFactory.register("sft")
class SFTStrategy(SEQStrategy):
    """Supervised fine-tuning: next-token cross-entropy where `loss_mask` (B, T, aligned with `target_ids`)
    is set, e.g. on assistant turns. A batch with nothing to train contributes 0. A Hugging Face batch
    (`labels`) needs no `loss_mask`: its -100 labels mark what is not trained."""

    def prepare(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        masked_by_labels = "labels" in batch and "loss_mask" not in batch
        batch = super().prepare(batch)
        if masked_by_labels:
            batch["loss_mask"] = batch["target_ids"] != IGNORE_INDEX
        return batch

    def _trained(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self._require(batch, "loss_mask")
        return super()._trained(batch) & batch["loss_mask"].bool()


# Register the other built-in strategies. Imported last: they import `BaseStrategy` from here.
from astrai.trainer import dpo, grpo  # noqa: E402, F401
