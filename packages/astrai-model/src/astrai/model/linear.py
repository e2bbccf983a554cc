"""`Linear`: an affine projection `y = x W^T (+ b)` initialised like Hugging Face models (normal, std 0.02)."""

from __future__ import annotations

from torch import nn

INIT_STD = 0.02  # transformers' default `initializer_range`


class Linear(nn.Linear):
    """`nn.Linear` without bias by default; weight (out_dim, in_dim) ~ N(0, 0.02), bias zeros."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = False) -> None:
        super().__init__(in_dim, out_dim, bias=bias)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=INIT_STD)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
