"""`Muon` (MomentUm Orthogonalized by Newton-Schulz) with an AdamW for the parameters Muon is not for.

Muon updates hidden 2-D weight matrices with the orthogonalised Nesterov momentum of their gradient
(Keller Jordan, https://kellerjordan.github.io/posts/muon/, reference code KellerJordan/Muon `muon.py`):

    buf   <- lerp(buf, g, 1 - momentum)                 # EMA momentum
    u     <- lerp(g, buf, momentum)   (nesterov)  or  buf
    O     <- NS5(u)                                     # quintic Newton-Schulz in bf16, ~ U V^T of u
    p     <- p * (1 - lr * weight_decay)                # decoupled decay, unadjusted lr
    p     <- p - adjusted_lr * O

with `adjusted_lr = lr * sqrt(max(1, rows / cols))` ("original") or `lr * 0.2 * sqrt(max(rows, cols))`
("match_rms_adamw": Moonshot, arXiv 2502.16982, which gives the update AdamW's RMS so AdamW's lr and
weight decay carry over). This is the arithmetic of `torch.optim.Muon`, step for step.

Embeddings, the LM head, norms, biases and any parameter that is not 2-D go to the AdamW inside the same
optimizer (torch's AdamW arithmetic). Which is which is decided by param groups: every group says
`use_muon=True` or `False`; `muon_param_groups(model)` builds the two groups from parameter names.
Group keys: Muon groups `lr, momentum, nesterov, weight_decay, ns_steps, adjust_lr`; AdamW groups `lr,
betas, eps, weight_decay`. Keys a group leaves out take the constructor's values (for AdamW groups: the
`adamw_*` ones), so an LR scheduler scales both kinds of group through their `lr`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # quintic maximising the slope at zero (Keller Jordan)
NS_EPS = 1e-7
ADJUST_LR = ("original", "match_rms_adamw")


def zeropower_via_newtonschulz5(g: torch.Tensor, steps: int) -> torch.Tensor:
    """Approximate U V^T of the 2-D `g = U S V^T` by `steps` quintic Newton-Schulz iterations, in bf16.

    The iteration does not converge to U V^T: singular values end up roughly in [0.7, 1.2], which does not
    hurt training. Runs on the wide orientation (rows <= cols), so X X^T is the smaller Gram matrix.
    """
    a, b, c = NS_COEFFICIENTS
    x = g.bfloat16()
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=NS_EPS)  # Frobenius norm >= spectral norm, so singular values are <= 1
    for _ in range(steps):
        gram = x @ x.T  # (rows, rows)
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b * A + c * A @ A
        x = torch.addmm(x, poly, x, beta=a)  # a * X + (b * A + c * A^2) @ X
    return x.T if tall else x


def adjusted_lr(lr: float, adjust_lr: str, shape: torch.Size) -> float:
    """The lr applied to a Muon update of a `shape` matrix (see the module docstring)."""
    rows, cols = shape[0], shape[1]
    if adjust_lr == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    return lr * 0.2 * math.sqrt(max(rows, cols))


class Muon(Optimizer):
    """Muon for `use_muon=True` param groups (2-D matrices), AdamW for `use_muon=False` groups."""

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_wd: float = 0.0,
        adjust_lr: str = "original",
    ) -> None:
        self._group_defaults = {
            True: {
                "lr": lr,
                "momentum": momentum,
                "nesterov": nesterov,
                "weight_decay": weight_decay,
                "ns_steps": ns_steps,
                "adjust_lr": adjust_lr,
            },
            False: {"lr": adamw_lr, "betas": tuple(adamw_betas), "eps": adamw_eps, "weight_decay": adamw_wd},
        }
        # Every hyper-parameter is filled per group by add_param_group, by the group's kind.
        super().__init__(params, defaults={})

    @property
    def lr(self) -> float:
        """The Muon groups' default lr (the live values are in `param_groups`)."""
        return self._group_defaults[True]["lr"]

    @property
    def momentum(self) -> float:
        return self._group_defaults[True]["momentum"]

    @property
    def weight_decay(self) -> float:
        return self._group_defaults[True]["weight_decay"]

    @property
    def ns_steps(self) -> int:
        return self._group_defaults[True]["ns_steps"]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        use_muon = param_group.get("use_muon")
        if not isinstance(use_muon, bool):
            raise ValueError(
                f"Muon param group use_muon={use_muon!r}: every group must say use_muon=True (2-D hidden "
                "matrices) or False (AdamW); muon_param_groups(model) builds them"
            )
        for key, value in self._group_defaults[use_muon].items():
            param_group.setdefault(key, value)
        _validate_group(param_group)
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict[str, Any]) -> None:
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Muon does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - momentum)
            update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
            update = zeropower_via_newtonschulz5(update, group["ns_steps"])
            p.mul_(1 - lr * weight_decay)
            p.add_(update, alpha=-adjusted_lr(lr, group["adjust_lr"], p.shape))

    def _adamw_step(self, group: dict[str, Any]) -> None:
        # torch.optim.AdamW's single-tensor arithmetic, operation for operation.
        lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Muon's AdamW does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)  # a tensor, as in torch's Adam, so state dicts interoperate
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            step = state["step"].item()
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            p.mul_(1 - lr * weight_decay)
            exp_avg.lerp_(p.grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            step_size = lr / (1 - beta1**step)
            denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
            p.addcdiv_(exp_avg, denom, value=-step_size)


def _validate_group(group: dict[str, Any]) -> None:
    def fail(key: str, allowed: str) -> None:
        raise ValueError(f"Muon param group {key}={group[key]!r}: {allowed}")

    if not group["lr"] >= 0:
        fail("lr", "must be >= 0")
    if not group["weight_decay"] >= 0:
        fail("weight_decay", "must be >= 0")
    if group["use_muon"]:
        if not 0 <= group["momentum"] < 1:
            fail("momentum", "must be in [0, 1)")
        if not isinstance(group["ns_steps"], int) or group["ns_steps"] < 0:
            fail("ns_steps", "must be an int >= 0")
        if group["adjust_lr"] not in ADJUST_LR:
            fail("adjust_lr", f"allowed: {list(ADJUST_LR)}")
        for p in group["params"]:
            if p.ndim != 2:
                raise ValueError(
                    f"Muon group holds a parameter of shape {tuple(p.shape)}; Muon takes 2-D matrices only"
                )
    else:
        if len(group["betas"]) != 2 or not all(0 <= beta < 1 for beta in group["betas"]):
            fail("betas", "must be two numbers in [0, 1)")
        if not group["eps"] > 0:
            fail("eps", "must be > 0")


def muon_param_groups(
    model: nn.Module,
    lr: float | None = None,
    adamw_lr: float | None = None,
    adamw_name_parts: tuple[str, ...] = ("embed", "lm_head"),
) -> list[dict[str, Any]]:
    """Split `model`'s trainable parameters into a Muon group and an AdamW group, for `Muon(groups, ...)`.

    Muon gets the 2-D weights of hidden layers; AdamW gets parameters whose name contains one of
    `adamw_name_parts` (embeddings, the LM head), norms, biases and every parameter that is not 2-D.
    `lr` / `adamw_lr`, when given, are set on the groups (else the optimizer's defaults apply).
    Empty groups are left out.
    """
    muon, adamw = [], []
    for name, p in model.named_parameters():  # tied weights appear once
        if not p.requires_grad:
            continue
        hidden_matrix = p.ndim == 2 and not any(part in name for part in adamw_name_parts)
        (muon if hidden_matrix else adamw).append(p)
    groups = []
    for params, use_muon, group_lr in ((muon, True, lr), (adamw, False, adamw_lr)):
        if params:
            groups.append({"params": params, "use_muon": use_muon, **({} if group_lr is None else {"lr": group_lr})})
    return groups
