"""Gradient accumulation windows, the optimizer/scheduler wrappers, and executor construction."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from astrai.trainer import (
    AccumOptimizer,
    AccumScheduler,
    ExecutorFactory,
    GradientState,
    NoneExecutor,
)


def _sync_pattern(state: GradientState, n: int) -> list[bool]:
    out = []
    for _ in range(n):
        state.advance()
        out.append(state.sync_gradients)
    return out


def test_gradient_state_windows() -> None:
    state = GradientState(3)
    assert state.sync_gradients  # nothing pending before training
    assert _sync_pattern(state, 7) == [False, False, True, False, False, True, False]
    state.begin_window(2)  # e.g. the trailing window of an epoch
    assert _sync_pattern(state, 2) == [False, True]
    state.begin_window(1)
    assert _sync_pattern(state, 1) == [True]
    for bad in (0, 4):
        with pytest.raises(ValueError, match="window size"):
            state.begin_window(bad)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="grad_accum_steps"):
            GradientState(bad)


def test_accum_wrappers_step_once_per_window() -> None:
    param = nn.Parameter(torch.zeros(()))
    state = GradientState(2)
    optimizer = AccumOptimizer(torch.optim.SGD([param], lr=1.0), state)
    scheduler = AccumScheduler(torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, lambda s: 0.5**s), state)
    values = []
    for _ in range(4):
        state.advance()
        param.grad = torch.ones(()) if param.grad is None else param.grad + 1  # accumulate 1 per micro-batch
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        values.append((param.item(), scheduler.get_last_lr()[0]))
    # Steps happen after micro-batches 2 and 4 with the accumulated gradient 2, at lr 1 then 0.5.
    assert values == [(0.0, 1.0), (-2.0, 0.5), (-2.0, 0.5), (-3.0, 0.25)]
    assert optimizer.param_groups is optimizer.optimizer.param_groups
    assert optimizer.state_dict()["param_groups"][0]["lr"] == 0.25


def test_none_executor_prepare_and_accumulate() -> None:
    model = nn.Linear(2, 1)
    executor = ExecutorFactory.create("none", grad_accum_steps=2)
    assert isinstance(executor, NoneExecutor) and executor.grad_accum_steps == 2
    prepared, optimizer, loader, scheduler = executor.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert prepared is model and isinstance(optimizer, AccumOptimizer) and loader is None and scheduler is None
    syncs = []
    for _ in range(2):
        with executor.accumulate(model):
            syncs.append(executor.sync_gradients)
    assert syncs == [False, True]
    assert executor.unwrap_model(model) is model and not executor.use_distributed


def test_clip_grad_norm() -> None:
    model = nn.Linear(2, 1, bias=False)
    model.weight.grad = torch.tensor([[3.0, 4.0]])
    executor = NoneExecutor()
    assert executor.clip_grad_norm(model, 0.0).item() == 5.0  # <= 0: measure only
    assert torch.equal(model.weight.grad, torch.tensor([[3.0, 4.0]]))
    assert executor.clip_grad_norm(model, 1.0).item() == 5.0
    torch.testing.assert_close(model.weight.grad, torch.tensor([[0.6, 0.8]]))


def test_executor_errors() -> None:
    with pytest.raises(ValueError, match="unknown executor 'zero3'"):
        ExecutorFactory.create("zero3")
    with pytest.raises(ValueError, match="bucket_cap"):
        ExecutorFactory.create("ddp", bucket_cap=10)
    for mode in ("ddp", "fsdp"):
        with pytest.raises(ValueError, match="process group"):
            ExecutorFactory.create(mode).prepare_model(nn.Linear(2, 1))


def test_executor_factory_create_takes_parallel_mode() -> None:
    executor = ExecutorFactory.create(parallel_mode="none", grad_accum_steps=3)
    assert isinstance(executor, NoneExecutor) and executor.grad_accum_steps == 3


def test_accum_wrappers_load_state_dict_round_trip() -> None:
    """`load_state_dict(d)`: the wrapped optimizer's / scheduler's state comes back as saved."""

    def build() -> tuple[AccumOptimizer, AccumScheduler]:
        model = nn.Linear(2, 1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        state = GradientState()
        return AccumOptimizer(optimizer, state), AccumScheduler(scheduler, state)

    optimizer, scheduler = build()
    optimizer.optimizer.param_groups[0]["params"][0].grad = torch.ones(1, 2)
    optimizer.step()
    scheduler.step()
    saved_optimizer, saved_scheduler = optimizer.state_dict(), scheduler.state_dict()

    fresh_optimizer, fresh_scheduler = build()
    fresh_optimizer.load_state_dict(saved_optimizer)
    fresh_scheduler.load_state_dict(saved_scheduler)
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr() == [0.05]
    assert fresh_optimizer.state_dict()["state"][0]["step"] == 1
    assert fresh_optimizer.param_groups[0]["lr"] == 0.05
