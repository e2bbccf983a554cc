"""LoRA: low-rank adapters on named linear projections of any model, and their export.

`apply_lora(model, config)` adds to every Linear-like module (a 2-D `weight` of shape (out, in)) whose
attribute name is in `config.target_modules` two parameters, `lora_A` (rank, in) and `lora_B` (out, rank),
and a forward hook that adds `(alpha / rank) * B A dropout(x)` to the module's output. The module itself is
kept (whatever its class or forward), so parameter names do not change: the base weights keep their names
and the adapters appear beside them (`...q_proj.lora_A`). Every other parameter is frozen.

`lora_B` starts at zero, so an adapted model starts exactly at the base model. `merge_lora(model)` folds
`W += (alpha / rank) * B A` into the base weights and removes the adapters, for export and serving.
Adapters are saved apart from the base weights: `adapter_model.safetensors` + `adapter_config.json`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from astrai.config import LoRAConfig
from astrai.serialization import Checkpoint

ADAPTER_PARAMS = ("lora_A", "lora_B")


class LoRAHook:
    """Forward hook adding the low-rank update to one module's output."""

    def __init__(self, rank: int, alpha: float, dropout: float) -> None:
        self.scaling = alpha / rank
        self.dropout = dropout
        self.enabled = True
        self.handle: torch.utils.hooks.RemovableHandle | None = None

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return output
        x = F.dropout(args[0], p=self.dropout, training=module.training)  # (..., in)
        delta = F.linear(F.linear(x.to(module.lora_A.dtype), module.lora_A), module.lora_B)  # (..., out)
        return output + (self.scaling * delta).to(output.dtype)


def _is_linear_like(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 2


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Add adapters to the targeted projections of `model`, freeze everything else; returns the names
    of the adapted modules. A target that matches no Linear-like module is an error."""
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters")
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in config.target_modules and _is_linear_like(module)
    ]
    found = {name.rsplit(".", 1)[-1] for name, _ in targets}
    unmatched = sorted(set(config.target_modules) - found)
    if unmatched:
        linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear_like(m)})
        raise ValueError(f"LoRAConfig.target_modules: {unmatched} match no linear layer; the model has {linear_names}")
    model.requires_grad_(False)
    for _, module in targets:
        out_features, in_features = module.weight.shape
        kwargs = {"device": module.weight.device, "dtype": module.weight.dtype}
        lora_a = torch.empty(config.rank, in_features, **kwargs)
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))  # as nn.Linear (and PEFT) initialise A
        module.register_parameter("lora_A", nn.Parameter(lora_a))
        module.register_parameter("lora_B", nn.Parameter(torch.zeros(out_features, config.rank, **kwargs)))
        hook = LoRAHook(config.rank, config.alpha, config.dropout)
        hook.handle = module.register_forward_hook(hook)
        module._lora_hook = hook
    return [name for name, _ in targets]


def _adapted(model: nn.Module) -> Iterator[tuple[str, nn.Module, LoRAHook]]:
    for name, module in model.named_modules():
        hook = getattr(module, "_lora_hook", None)
        if isinstance(hook, LoRAHook):
            yield name, module, hook


def has_lora(model: nn.Module) -> bool:
    return any(True for _ in _adapted(model))


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model: every adapter of `model` is off inside the block."""
    hooks = [hook for _, _, hook in _adapted(model)]
    for hook in hooks:
        hook.enabled = False
    try:
        yield
    finally:
        for hook in hooks:
            hook.enabled = True


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += scaling * B A) and remove the adapters."""
    for _, module, hook in list(_adapted(model)):
        update = hook.scaling * (module.lora_B.float() @ module.lora_A.float())  # (out, in)
        module.weight.add_(update.to(module.weight.dtype))
        hook.handle.remove()
        del module._lora_hook
        for param in ADAPTER_PARAMS:
            delattr(module, param)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter parameters only, under their full names (`layers.0.attention.q_proj.lora_A`, ...)."""
    return {
        f"{name}.{param}" if name else param: getattr(module, param).detach()
        for name, module, _ in _adapted(model)
        for param in ADAPTER_PARAMS
    }


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy adapter weights into `model`'s adapters; the names must match exactly."""
    params = dict(model.named_parameters())
    expected = set(lora_state_dict(model))
    if set(state_dict) != expected:
        missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        raise ValueError(f"adapter weights do not match the model: missing {missing}, unexpected {unexpected}")
    for name, value in state_dict.items():
        params[name].copy_(value)


def save_lora(model: nn.Module, save_dir: str | Path, config: LoRAConfig) -> Path:
    """Write the adapters of `model` (adapter_model.safetensors + adapter_config.json) to `save_dir`."""
    return Checkpoint(lora_state_dict(model), adapter_config=config.to_dict()).save(save_dir)


def load_lora(model: nn.Module, save_dir: str | Path) -> LoRAConfig:
    """Add the adapters saved in `save_dir` to `model` (which must not have any yet)."""
    ckpt = Checkpoint.load(save_dir)
    if ckpt.adapter_config is None:
        raise ValueError(f"{save_dir} holds no LoRA adapters (no adapter_config.json)")
    config = LoRAConfig.from_dict(ckpt.adapter_config)
    apply_lora(model, config)
    load_lora_state_dict(model, ckpt.state_dict)
    return config
