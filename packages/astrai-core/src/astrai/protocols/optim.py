"""Optimizer and LR-scheduler protocols, met by torch's classes and by the gradient-accumulation wrappers.

`load_state_dict(d)` takes its state positionally (the architecture document's name `d`, positional-only), so
torch's `load_state_dict(state_dict)` and any wrapper's own parameter name meet the protocol alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class OptimizerProtocol(Protocol):
    param_groups: list[dict[str, Any]]

    def step(self, closure: Callable[[], Any] | None = None) -> Any: ...

    def zero_grad(self, set_to_none: bool = True) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, d: dict[str, Any], /) -> None: ...


@runtime_checkable
class SchedulerProtocol(Protocol):
    def step(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, d: dict[str, Any], /) -> None: ...

    def get_last_lr(self) -> list[float]: ...
