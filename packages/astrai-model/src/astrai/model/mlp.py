"""`MLP`: the SwiGLU feed-forward network, `down(silu(gate(x)) * up(x))` (Llama / Qwen / Mistral)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from astrai.config import AutoRegressiveLMConfig, EncoderConfig
from astrai.model.factories import FFNFactory
from astrai.model.linear import Linear, fused_linear
from astrai.model.native import fused


@FFNFactory.register("mlp")
class MLP(nn.Module):
    """Gated feed-forward block with hidden size `dim_ffn` (default `config.dim_ffn`; MoE experts pass theirs)."""

    def __init__(
        self, config: AutoRegressiveLMConfig | EncoderConfig, layer_id: int, dim_ffn: int | None = None
    ) -> None:
        super().__init__()
        hidden = dim_ffn or config.dim_ffn
        self.gate = Linear(config.dim, hidden)
        self.up = Linear(config.dim, hidden)
        self.down = Linear(hidden, config.dim)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T, dim) -> (B, T, dim)."""
        gate, up = fused_linear(x, (self.gate, self.up))
        hidden = fused.silu_mul(gate, up)  # the CPU inference kernel, where it serves
        return self.down(F.silu(gate) * up if hidden is None else hidden)
