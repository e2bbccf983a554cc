"""`ReferenceModel`: the frozen policy that DPO and GRPO measure the trained policy against.

No second full copy lands on the training device when it can be avoided:
- a model with LoRA adapters is its own reference: the adapters are switched off for the reference
  forward (the base weights are frozen, so "base model" is exactly the initial policy);
- otherwise a frozen copy is made parameter by parameter straight onto `device` (default CPU), never
  through a transient copy on the training device, and inputs are moved to it for the forward.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from astrai.trainer.executor import unwrap
from astrai.trainer.log_probs import model_logits
from astrai.trainer.lora import adapters_disabled, has_lora


def frozen_copy(module: nn.Module, device: str | torch.device) -> nn.Module:
    """A deep copy of `module` with every parameter and buffer copied to `device`, frozen, in eval mode."""
    memo: dict[int, object] = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if isinstance(tensor, DTensor):
            raise ValueError("build the reference model before the policy is sharded (FSDP)")
        copied = tensor.detach().to(device, copy=True)
        memo[id(tensor)] = nn.Parameter(copied, requires_grad=False) if isinstance(tensor, nn.Parameter) else copied
    ref = copy.deepcopy(module, memo)
    ref.requires_grad_(False)
    return ref.eval()


class ReferenceModel:
    """Computes reference logits for `policy` without gradients."""

    def __init__(self, policy: nn.Module, device: str | torch.device = "cpu") -> None:
        policy = unwrap(policy)
        self.uses_adapters = has_lora(policy)
        # Adapters off: call the policy module itself (under DDP, the wrapped module: no reducer involved).
        self.module = policy if self.uses_adapters else frozen_copy(policy, device)
        self.device = next(self.module.parameters()).device

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, input_mask: torch.Tensor | None) -> torch.Tensor:
        """Reference logits (B, T, V) on the inputs' device."""
        if self.uses_adapters:
            with adapters_disabled(self.module):
                return model_logits(self.module, input_ids, input_mask)
        mask = None if input_mask is None else input_mask.to(self.device)
        out = model_logits(self.module, input_ids.to(self.device), mask)
        return out.to(input_ids.device)

    @torch.no_grad()
    def sync_from(self, policy: nn.Module) -> None:
        """Overwrite the reference weights with the policy's current ones (every rank must call: FSDP
        gathers the full tensors)."""
        if self.uses_adapters:
            raise ValueError("a LoRA policy's reference is its frozen base model; it cannot be re-synced")
        state = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True))
        self.module.load_state_dict({k: v.to(self.device) for k, v in state.items()})
