"""Learning-rate schedules: `BaseScheduler`, `SchedulerFactory` and the cosine, SGDR and WSD schedules.

Each schedule is a closed-form multiplier `factor(t)` of every param group's initial lr, where `t` is the
number of `step()` calls so far (torch's `last_epoch`: 0 right after construction). All schedules warm
up linearly from 0 to the full lr over `warmup_steps` (`factor(t) = t / W` for `t < W`; no warmup when
W = 0), then:

* cosine: `m + (1 - m) * (1 + cos(pi * p)) / 2` with `p = min((t - W) / lr_decay_steps, 1)`, so the lr
  falls from lr to `min_rate * lr` and then stays there;
* sgdr: the same cosine restarted every cycle (warm restarts, Loshchilov & Hutter 2017), cycle k being
  `cycle_length * t_mult**k` steps long;
* wsd: warmup, `stable_steps` at the full lr, then a linear decay over `decay_steps` to `min_rate * lr`
  (warmup-stable-decay, Hu et al. 2024, MiniCPM).
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from astrai.factory import BaseFactory


def _check_int(owner: str, name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{owner}.{name}={value!r}: must be an int >= {minimum}")


def _check_rate(owner: str, value: Any) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{owner}.min_rate={value!r}: must be a number in [0, 1]")


def _cosine(min_rate: float, progress: float) -> float:
    """From 1 at progress 0 down to `min_rate` at progress 1."""
    return min_rate + (1.0 - min_rate) * 0.5 * (1.0 + math.cos(math.pi * progress))


class BaseScheduler(LRScheduler, ABC):
    """A schedule given by `factor(step)`; sets every group's lr to `initial_lr * factor(step)`."""

    warmup_steps: int

    @abstractmethod
    def factor(self, step: int) -> float:
        """The multiplier of the initial lr after `step` scheduler steps."""

    def _warmup(self, step: int) -> float | None:
        """The warmup factor while warming up, else None."""
        return step / self.warmup_steps if step < self.warmup_steps else None

    def get_lr(self) -> list[float]:
        return [base_lr * self.factor(self.last_epoch) for base_lr in self.base_lrs]

    @abstractmethod
    def _validate(self) -> None:
        """Raise ValueError naming any hyper-parameter out of range."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a `state_dict()` (copied, never modified) and set the groups' lr to the restored step's."""
        super().load_state_dict(copy.deepcopy(state_dict))
        self._validate()
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


class SchedulerFactory(BaseFactory[BaseScheduler]):
    """Schedules by name: "cosine", "sgdr", "wsd"."""

    kind = "scheduler"
    base_class = BaseScheduler

    @classmethod
    def create(cls, optimizer: Optimizer, schedule_type: str, **kwargs: Any) -> BaseScheduler:  # type: ignore[override]
        """The schedule registered as `schedule_type`, built on `optimizer` with `kwargs`."""
        return super().create(schedule_type, optimizer, **kwargs)


@SchedulerFactory.register("cosine")
class CosineScheduler(BaseScheduler):
    """Linear warmup, cosine decay to `min_rate * lr` over `lr_decay_steps`, then constant."""

    def __init__(
        self, optimizer: Optimizer, warmup_steps: int, lr_decay_steps: int, min_rate: float = 0.1, last_epoch: int = -1
    ) -> None:
        self.warmup_steps = warmup_steps
        self.lr_decay_steps = lr_decay_steps
        self.min_rate = min_rate
        self._validate()
        super().__init__(optimizer, last_epoch)

    def _validate(self) -> None:
        _check_int("CosineScheduler", "warmup_steps", self.warmup_steps, 0)
        _check_int("CosineScheduler", "lr_decay_steps", self.lr_decay_steps, 1)
        _check_rate("CosineScheduler", self.min_rate)

    def factor(self, step: int) -> float:
        warm = self._warmup(step)
        if warm is not None:
            return warm
        return _cosine(self.min_rate, min((step - self.warmup_steps) / self.lr_decay_steps, 1.0))


@SchedulerFactory.register("sgdr")
class SGDRScheduler(BaseScheduler):
    """Linear warmup, then cosine cycles from lr to `min_rate * lr`, cycle k lasting `cycle_length * t_mult**k`."""

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        cycle_length: int,
        min_rate: float,
        t_mult: int = 1,
        last_epoch: int = -1,
    ) -> None:
        self.warmup_steps = warmup_steps
        self.cycle_length = cycle_length
        self.min_rate = min_rate
        self.t_mult = t_mult
        self._validate()
        super().__init__(optimizer, last_epoch)

    def _validate(self) -> None:
        _check_int("SGDRScheduler", "warmup_steps", self.warmup_steps, 0)
        _check_int("SGDRScheduler", "cycle_length", self.cycle_length, 1)
        _check_int("SGDRScheduler", "t_mult", self.t_mult, 1)
        _check_rate("SGDRScheduler", self.min_rate)

    def _cycle_start(self, k: int) -> int:
        """Steps after warmup at which cycle `k` starts: L * (1 + m + ... + m**(k-1))."""
        if self.t_mult == 1:
            return self.cycle_length * k
        return self.cycle_length * (self.t_mult**k - 1) // (self.t_mult - 1)

    def factor(self, step: int) -> float:
        warm = self._warmup(step)
        if warm is not None:
            return warm
        s = step - self.warmup_steps
        if self.t_mult == 1:
            k = s // self.cycle_length
        else:
            # Invert _cycle_start in floating point, then correct by one either way for rounding.
            k = int(math.log(1 + s * (self.t_mult - 1) / self.cycle_length, self.t_mult))
            if self._cycle_start(k) > s:
                k -= 1
            elif self._cycle_start(k + 1) <= s:
                k += 1
        offset = s - self._cycle_start(k)
        return _cosine(self.min_rate, offset / (self.cycle_length * self.t_mult**k))


@SchedulerFactory.register("wsd")
class WSDScheduler(BaseScheduler):
    """Linear warmup, `stable_steps` at lr, linear decay over `decay_steps` to `min_rate * lr`, then constant."""

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        stable_steps: int,
        decay_steps: int,
        min_rate: float,
        last_epoch: int = -1,
    ) -> None:
        self.warmup_steps = warmup_steps
        self.stable_steps = stable_steps
        self.decay_steps = decay_steps
        self.min_rate = min_rate
        self._validate()
        super().__init__(optimizer, last_epoch)

    def _validate(self) -> None:
        _check_int("WSDScheduler", "warmup_steps", self.warmup_steps, 0)
        _check_int("WSDScheduler", "stable_steps", self.stable_steps, 0)
        _check_int("WSDScheduler", "decay_steps", self.decay_steps, 1)
        _check_rate("WSDScheduler", self.min_rate)

    def factor(self, step: int) -> float:
        warm = self._warmup(step)
        if warm is not None:
            return warm
        progress = min(max(step - self.warmup_steps - self.stable_steps, 0) / self.decay_steps, 1.0)
        return 1.0 - (1.0 - self.min_rate) * progress
