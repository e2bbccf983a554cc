"""LR schedules: exact values per step, validation, factory, and state round trips."""

import copy
import math

import pytest
import torch

from astrai.trainer.schedule import CosineScheduler, SchedulerFactory, SGDRScheduler, WSDScheduler


def optimizer(*lrs):
    return torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": lr} for lr in lrs])


def lrs_over(scheduler, steps):
    """The first group's lr at steps 0..steps-1 (step 0: right after construction)."""
    out = []
    for _ in range(steps):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def test_cosine_warms_up_from_zero_then_decays_to_the_floor():
    scheduler = SchedulerFactory.create(optimizer(2.0), "cosine", warmup_steps=4, lr_decay_steps=4, min_rate=0.1)
    assert isinstance(scheduler, CosineScheduler)
    c = math.cos(math.pi / 4)
    expected = [0.0, 0.5, 1.0, 1.5, 2.0, 2 * (0.1 + 0.45 * (1 + c)), 2 * 0.55, 2 * (0.1 + 0.45 * (1 - c)), 0.2, 0.2]
    assert lrs_over(scheduler, 10) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert scheduler.get_last_lr() == pytest.approx([0.2])


def test_cosine_without_warmup_starts_at_full_lr():
    scheduler = CosineScheduler(optimizer(1.0), warmup_steps=0, lr_decay_steps=2, min_rate=0.0)
    assert lrs_over(scheduler, 4) == pytest.approx([1.0, 0.5, 0.0, 0.0], abs=1e-15)


def test_sgdr_restarts_with_growing_cycles():
    scheduler = SchedulerFactory.create(optimizer(1.0), "sgdr", warmup_steps=2, cycle_length=3, min_rate=0.1, t_mult=2)
    half = [1 + math.cos(math.pi * u / 6) for u in range(6)]  # second cycle: 6 steps
    expected = [0.0, 0.5, 1.0, 0.775, 0.325] + [0.1 + 0.45 * h for h in half] + [1.0]
    assert lrs_over(scheduler, 12) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("cycle_length", "t_mult"), [(3, 1), (1, 2), (5, 3), (7, 2)])
def test_sgdr_closed_form_matches_walking_the_cycles(cycle_length, t_mult):
    scheduler = SGDRScheduler(optimizer(1.0), warmup_steps=0, cycle_length=cycle_length, min_rate=0.2, t_mult=t_mult)
    start, length = 0, cycle_length
    for step in range(3000):
        if step >= start + length:
            start, length = start + length, length * t_mult
        expected = 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * (step - start) / length))
        assert scheduler.factor(step) == pytest.approx(expected, rel=1e-12), step


def test_wsd_warmup_stable_then_linear_decay():
    scheduler = SchedulerFactory.create(
        optimizer(1.0), "wsd", warmup_steps=2, stable_steps=3, decay_steps=4, min_rate=0.2
    )
    assert isinstance(scheduler, WSDScheduler)
    expected = [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 0.8, 0.6, 0.4, 0.2, 0.2]
    assert lrs_over(scheduler, 11) == pytest.approx(expected, rel=1e-12)


def test_every_param_group_is_scaled_from_its_own_lr():
    scheduler = CosineScheduler(optimizer(1.0, 0.01), warmup_steps=2, lr_decay_steps=10)
    scheduler.optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in scheduler.optimizer.param_groups] == [0.5, 0.005]


@pytest.mark.parametrize(
    ("schedule", "kwargs", "message"),
    [
        ("cosine", {"warmup_steps": 2, "lr_decay_steps": 0}, r"CosineScheduler.lr_decay_steps=0: must be an int >= 1"),
        ("cosine", {"warmup_steps": -1, "lr_decay_steps": 3}, r"CosineScheduler.warmup_steps=-1"),
        ("cosine", {"warmup_steps": 1, "lr_decay_steps": 3, "min_rate": 1.5}, r"CosineScheduler.min_rate=1.5"),
        ("sgdr", {"warmup_steps": 0, "cycle_length": 0, "min_rate": 0.1}, r"SGDRScheduler.cycle_length=0"),
        ("sgdr", {"warmup_steps": 0, "cycle_length": 2, "min_rate": 0.1, "t_mult": 0}, r"SGDRScheduler.t_mult=0"),
        ("sgdr", {"warmup_steps": 0, "cycle_length": 2, "min_rate": -0.1}, r"SGDRScheduler.min_rate=-0.1"),
        (
            "wsd",
            {"warmup_steps": 0, "stable_steps": 1, "decay_steps": 0, "min_rate": 0.1},
            r"WSDScheduler.decay_steps=0",
        ),
        ("wsd", {"warmup_steps": 0, "stable_steps": -2, "decay_steps": 1, "min_rate": 0.1}, r"stable_steps=-2"),
        ("cosine", {"warmup_steps": 1, "lr_decay_step": 3}, r"unexpected argument\(s\) \['lr_decay_step'\]"),
        ("none", {}, r"unknown scheduler 'none'"),
    ],
)
def test_bad_parameters_are_named(schedule, kwargs, message):
    with pytest.raises(ValueError, match=message):
        SchedulerFactory.create(optimizer(1.0), schedule, **kwargs)


@pytest.mark.parametrize(
    ("schedule", "kwargs"),
    [
        ("cosine", {"warmup_steps": 3, "lr_decay_steps": 5}),
        ("sgdr", {"warmup_steps": 1, "cycle_length": 2, "min_rate": 0.1, "t_mult": 2}),
        ("wsd", {"warmup_steps": 1, "stable_steps": 2, "decay_steps": 3, "min_rate": 0.0}),
    ],
)
def test_state_round_trip_resumes_the_schedule(schedule, kwargs):
    straight = SchedulerFactory.create(optimizer(1.0, 0.1), schedule, **kwargs)
    expected = lrs_over(straight, 12)

    first = SchedulerFactory.create(optimizer(1.0, 0.1), schedule, **kwargs)
    head = lrs_over(first, 5)
    state = first.state_dict()
    snapshot = copy.deepcopy(state)

    resumed = SchedulerFactory.create(optimizer(1.0, 0.1), schedule, **kwargs)  # a fresh optimizer at lr(0)
    resumed.load_state_dict(state)
    assert state == snapshot  # the argument is not modified
    assert resumed.optimizer.param_groups[1]["lr"] == pytest.approx(first.optimizer.param_groups[1]["lr"])
    assert head + lrs_over(resumed, 7) == expected
    resumed.base_lrs[0] = 123.0
    assert state["base_lrs"][0] == 1.0  # nor aliased by the scheduler


def test_loaded_hyper_parameters_are_validated():
    state = CosineScheduler(optimizer(1.0), warmup_steps=1, lr_decay_steps=3).state_dict()
    state["lr_decay_steps"] = 0
    with pytest.raises(ValueError, match="lr_decay_steps=0"):
        CosineScheduler(optimizer(1.0), warmup_steps=1, lr_decay_steps=3).load_state_dict(state)
