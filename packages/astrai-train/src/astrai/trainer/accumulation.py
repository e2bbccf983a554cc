"""Gradient accumulation bookkeeping: `GradientState` and the optimizer/scheduler wrappers that obey it.

An optimizer step covers one *window* of micro-batches: `grad_accum_steps` of them, or fewer for the
trailing window of an epoch (which is stepped, never dropped). `GradientState.sync_gradients` is true on
the window's last micro-batch only; `AccumOptimizer.step` / `zero_grad` and `AccumScheduler.step` act only
then, so a loop can call them after every micro-batch. Windows never span epochs: the trainer opens each
one with `begin_window(size)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from astrai.protocols import OptimizerProtocol, SchedulerProtocol


class GradientState:
    """Position inside the current accumulation window."""

    def __init__(self, grad_accum_steps: int = 1) -> None:
        if isinstance(grad_accum_steps, bool) or not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps={grad_accum_steps!r}: must be an int >= 1")
        self.num_steps = grad_accum_steps
        self._window = grad_accum_steps
        self._micro = grad_accum_steps  # "just finished a window": gradients are in sync before training

    def begin_window(self, size: int | None = None) -> None:
        """Start a window of `size` micro-batches (default `num_steps`; fewer at the end of an epoch)."""
        size = self.num_steps if size is None else size
        if not 1 <= size <= self.num_steps:
            raise ValueError(f"window size {size}: must be in [1, grad_accum_steps={self.num_steps}]")
        self._window, self._micro = size, 0

    def advance(self) -> None:
        """Count one micro-batch; a loop that never calls `begin_window` gets windows of `num_steps`."""
        if self._micro >= self._window:
            self._window, self._micro = self.num_steps, 0
        self._micro += 1

    @property
    def sync_gradients(self) -> bool:
        """True when the current micro-batch is the last of its window (gradients must be reduced)."""
        return self._micro >= self._window


class AccumOptimizer:
    """An optimizer whose `step` and `zero_grad` act only at the end of an accumulation window."""

    def __init__(self, optimizer: OptimizerProtocol, gradient_state: GradientState) -> None:
        self.optimizer = optimizer
        self.gradient_state = gradient_state

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if self.gradient_state.sync_gradients:
            return self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.gradient_state.sync_gradients:
            self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, d: dict[str, Any], /) -> None:
        self.optimizer.load_state_dict(d)


class AccumScheduler:
    """An LR scheduler that advances once per optimizer step, not once per micro-batch."""

    def __init__(self, scheduler: SchedulerProtocol, gradient_state: GradientState) -> None:
        self.scheduler = scheduler
        self.gradient_state = gradient_state

    def step(self) -> None:
        if self.gradient_state.sync_gradients:
            self.scheduler.step()

    def get_last_lr(self) -> list[float]:
        return self.scheduler.get_last_lr()

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, d: dict[str, Any], /) -> None:
        self.scheduler.load_state_dict(d)
