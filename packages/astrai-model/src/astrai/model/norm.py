"""`RMSNorm`: root-mean-square normalisation computed in float32, as Hugging Face's `LlamaRMSNorm`.

`y = weight * (x / sqrt(mean(x^2) + eps))`: the normalisation runs in float32 whatever the input dtype,
the result is cast back to the input dtype and only then multiplied by the weight (transformers' order, so
bf16 checkpoints reproduce its numbers). Under `torch.inference_mode()` on the CPU one fused kernel computes
the same (`astrai.model.native.fused`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from astrai.model.native import fused


class RMSNorm(nn.Module):
    """RMS normalisation over the last dimension with a learned per-channel scale (initialised to ones)."""

    def __init__(self, dim: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.normalized_shape = (dim,)
        self.norm_eps = norm_eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        fast = fused.rms_norm(x, self.weight, self.norm_eps)  # the CPU inference kernel, where it serves
        if fast is not None:
            return fast
        normed = F.rms_norm(x.float(), self.normalized_shape, eps=self.norm_eps)
        return self.weight * normed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape[0]}, eps={self.norm_eps}"
