"""`MixedPrecision`: autocast for the forward pass and, for fp16, loss scaling.

The weights and the optimizer state stay float32 (master weights); only the forward and backward
matmuls run in the low precision. "bf16" needs no loss scaling; "fp16" uses a `GradScaler`, whose state
is part of the checkpoint.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from astrai.protocols import OptimizerProtocol

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    """The precision policy of one run: `mode` is "no", "bf16" or "fp16" on `device_type`."""

    def __init__(self, mode: str, device_type: str) -> None:
        if mode not in ("no", *_DTYPES):
            raise ValueError(f"mixed_precision={mode!r}: allowed ['no', 'bf16', 'fp16']")
        self.mode = mode
        self.device_type = device_type
        self.scaler = torch.amp.GradScaler(device_type) if mode == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.mode == "no":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=_DTYPES[self.mode])

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale_(self, optimizer: OptimizerProtocol) -> None:
        """Bring gradients back to their true scale (before clipping or inspecting them)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: OptimizerProtocol) -> None:
        """`optimizer.step()`, skipped by the scaler when fp16 gradients overflowed."""
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
