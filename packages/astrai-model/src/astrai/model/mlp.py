"""`MLP`: the SwiGLU feed-forward network, `down(silu(gate(x)) * up(x))` (Llama / Qwen / Mistral)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from astrai.model.factories import FFNFactory
from astrai.model.linear import Linear, fused_linear
from astrai.model.native import fused


@FFNFactory.register("mlp")
class MLP(nn.Module):
    """Gated feed-forward block, `dim` -> `dim_ffn` hidden channels -> `dim` (MoE experts use it too)."""

    def __init__(self, dim: int, dim_ffn: int) -> None:
        super().__init__()
        self.gate = Linear(dim, dim_ffn)
        self.up = Linear(dim, dim_ffn)
        self.down = Linear(dim_ffn, dim)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T, dim) -> (B, T, dim)."""
        gate, up = fused_linear(x, (self.gate, self.up))
        hidden = fused.silu_mul(gate, up)  # the CPU inference kernel, where it serves
        return self.down(F.silu(gate) * up if hidden is None else hidden)
