"""`OptimizerFn` and `SchedulerFn`: the `TrainConfig.optimizer_fn` / `scheduler_fn` callables built from
plain values (a run file, a test), picklable so that spawned training processes can receive them.

    OptimizerFn("adamw", lr=3e-4, weight_decay=0.1)    -> torch.optim.AdamW over the trainable params
    OptimizerFn("sgd", lr=0.1)                          -> torch.optim.SGD
    OptimizerFn("muon", lr=0.02, adamw_lr=3e-4)         -> Muon (hidden matrices) + AdamW (the rest)
    SchedulerFn("cosine", warmup_steps=100, lr_decay_steps=900)

Unknown parameter names are rejected when the callable is built, naming the parameter.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from astrai.factory import check_arguments
from astrai.protocols import OptimizerProtocol
from astrai.trainer.muon import Muon, muon_param_groups
from astrai.trainer.schedule import BaseScheduler, SchedulerFactory

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "muon": Muon,
}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _typed(target: Any, params: dict[str, Any], what: str) -> dict[str, Any]:
    """`params` checked against the types of `target`'s defaults: numbers must be numbers, tuples of
    numbers (e.g. betas) lists or tuples of numbers, given back as tuples."""
    defaults = {n: p.default for n, p in inspect.signature(target).parameters.items()}
    out = dict(params)
    for key, value in params.items():
        default = defaults.get(key)
        if _number(default) and not _number(value):
            raise ValueError(f"{what}: {key}={value!r} must be a number")
        if isinstance(default, tuple) and all(_number(d) for d in default):
            if not isinstance(value, (list, tuple)) or len(value) != len(default) or not all(map(_number, value)):
                raise ValueError(f"{what}: {key}={value!r} must be {len(default)} numbers")
            out[key] = tuple(value)
    return out


class OptimizerFn:
    """`model -> optimizer` over the model's trainable parameters (frozen ones, e.g. under LoRA, are left out)."""

    def __init__(self, name: str = "adamw", **params: Any) -> None:
        if name not in OPTIMIZERS:
            raise ValueError(f"optimizer name={name!r}: allowed {sorted(OPTIMIZERS)}")
        check_arguments(OPTIMIZERS[name], ([],), params, what=f"optimizer {name!r}")
        self.name = name
        self.params = _typed(OPTIMIZERS[name], params, f"optimizer {name!r}")
        try:  # build once on a stand-in parameter, so bad values fail now, naming the optimizer
            self(nn.Linear(2, 2, bias=False))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"optimizer {name!r}: {exc}") from None

    def __call__(self, model: nn.Module) -> OptimizerProtocol:
        if self.name == "muon":
            return Muon(muon_param_groups(model), **self.params)
        trainable = [p for p in model.parameters() if p.requires_grad]
        return OPTIMIZERS[self.name](trainable, **self.params)

    def __repr__(self) -> str:
        return f"OptimizerFn({self.name!r}, **{self.params!r})"


class SchedulerFn:
    """`optimizer -> LR schedule` of a registered `schedule_type` (cosine, sgdr, wsd, ...)."""

    def __init__(self, schedule_type: str, **params: Any) -> None:
        component = SchedulerFactory.get_component_class(schedule_type)
        check_arguments(component, (None,), params, what=f"schedule {schedule_type!r}")
        self.schedule_type = schedule_type
        self.params = _typed(component, params, f"schedule {schedule_type!r}")
        try:  # build once on a stand-in optimizer, so bad values fail now
            self(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"schedule {schedule_type!r}: {exc}") from None

    def __call__(self, optimizer: OptimizerProtocol) -> BaseScheduler:
        return SchedulerFactory.create(optimizer, self.schedule_type, **self.params)

    def __repr__(self) -> str:
        return f"SchedulerFn({self.schedule_type!r}, **{self.params!r})"
