"""`Embedding`: the token-embedding table, initialised like Hugging Face models (normal, std 0.02)."""

from __future__ import annotations

from torch import Tensor, nn

from astrai.model.linear import INIT_STD


class Embedding(nn.Embedding):
    """`nn.Embedding(vocab_size, dim)` with weight (vocab_size, dim) ~ N(0, 0.02)."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__(vocab_size, dim)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=INIT_STD)

    def forward(self, x: Tensor) -> Tensor:
        """x (...) token ids -> (..., dim)."""
        return super().forward(x)
