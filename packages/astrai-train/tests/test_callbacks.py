"""Callbacks: every built-in one is a TrainCallback; metric log, activation checkpointing, clipping, validation, progress bar, and the
checkpoint taken when SIGTERM arrives mid-window."""

from __future__ import annotations

import io
import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from astrai.serialization import Checkpoint, latest_checkpoint
from astrai.trainer import (
    CallbackFactory,
    GradientCheckpointingCallback,
    MetricLoggerCallback,
    NoneExecutor,
    SFTStrategy,
    TrainCallback,
    Trainer,
    read_metrics,
)
from astrai.trainer.metric_logger import gradient_statistics


def test_metric_log_appends_and_resume_drops_later_records(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in (1, 2, 3, 4)))
    logger = MetricLoggerCallback(str(tmp_path), log_interval=1, metrics=["loss", "lr", "val_loss"])
    ctx = SimpleNamespace(
        rank=0, step=2, tokens=0, epoch=0, iteration=2, loss=0.5, lr=0.1, val_loss=None, grad_norm=None, world_size=1
    )
    logger.on_train_begin(ctx)  # resuming at step 2: records 3 and 4 came after that checkpoint
    ctx.step, ctx.in_step = 3, False
    logger.on_batch_end(ctx)  # the window's last micro-batch: a step boundary
    logger.on_train_end(ctx)
    records = read_metrics(log)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert {k: records[-1][k] for k in ("loss", "lr", "val_loss", "iter")} == {
        "loss": 0.5,
        "lr": 0.1,
        "val_loss": None,
        "iter": 2,
    }
    with pytest.raises(ValueError, match="unknown"):
        MetricLoggerCallback(str(tmp_path), metrics=["perplexity"])
    log.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(log)


def test_gradient_statistics() -> None:
    model = nn.Linear(2, 2)
    model.weight.grad = torch.tensor([[1.0, -2.0], [float("nan"), 3.0]])
    model.bias.grad = torch.tensor([0.0, 4.0])
    values = torch.tensor([1.0, -2.0, 3.0, 0.0, 4.0], dtype=torch.float64)
    stats = gradient_statistics(model)
    assert stats["grad_nan_num"] == 1 and stats["grad_max"] == 4.0 and stats["grad_min"] == -2.0
    assert stats["grad_mean"] == pytest.approx(values.mean().item())
    assert stats["grad_std"] == pytest.approx(values.std(unbiased=False).item())


def test_activation_checkpointing_keeps_gradients(tmp_path: Path, make_lm, make_config, sft_dataset) -> None:
    results = []
    for modules in ([], ["DecoderBlock"]):
        model = make_lm()

        class Spy:  # records whether the blocks' forward is wrapped while training
            seen: list[bool] = []

            def on_step_end(self, ctx):
                self.seen.append("_original_forward" in ctx.model.layers[0].__dict__)

        spy = Spy()
        Trainer(
            make_config(tmp_path / str(len(modules)), model, sft_dataset, gradient_checkpointing_modules=modules),
            callbacks=[spy],
        ).train()
        assert spy.seen == [bool(modules)] and "_original_forward" not in model.layers[0].__dict__  # restored
        results.append(model.state_dict())
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=0, atol=1e-6)


def test_gradient_checkpointing_accepts_types(make_lm) -> None:
    model = make_lm()
    callback = GradientCheckpointingCallback([type(model.layers[0])])
    callback.on_train_begin(SimpleNamespace(model=model))
    assert all("_original_forward" in block.__dict__ for block in model.layers)
    callback.on_train_end(SimpleNamespace(model=model))
    assert not any("_original_forward" in block.__dict__ for block in model.layers)


def test_gradient_clipping_records_the_norm() -> None:
    model = nn.Linear(2, 1, bias=False)
    model.weight.grad = torch.tensor([[6.0, 8.0]])
    ctx = SimpleNamespace(executor=NoneExecutor(), model=model, grad_norm=None)
    CallbackFactory.create("gradient_clipping", max_grad_norm=2.0).on_optimizer_step(ctx)
    assert ctx.grad_norm == 10.0
    torch.testing.assert_close(model.weight.grad, torch.tensor([[1.2, 1.6]]))


def test_validation_is_the_exact_mean_over_the_set(tmp_path: Path, make_lm, make_config, sft_dataset) -> None:
    """Validation runs in `on_optimizer_step`: step 1's val_loss is of the weights its loss was computed with."""
    model = make_lm()
    before_step = make_lm()
    cfg = make_config(
        tmp_path,
        model,
        sft_dataset,
        batch_per_device=3,
        grad_accum_steps=3,
        val_dataset=sft_dataset,
        val_step=1,
        metrics=["loss", "val_loss"],
    )
    Trainer(cfg).train()
    record = read_metrics(tmp_path / "logs" / "metrics.jsonl")[-1]
    logged = record["val_loss"]
    everything = {k: torch.stack([sft_dataset[i][k] for i in range(len(sft_dataset))]) for k in sft_dataset[0]}
    with torch.no_grad():
        expected = SFTStrategy(before_step, "cpu").compute_loss(everything).item()
    assert logged == pytest.approx(expected, rel=1e-6)
    assert record["step"] == 1 and logged == pytest.approx(record["loss"], rel=1e-6)  # same data, same weights


def test_progress_bar_reports_loss(make_lm) -> None:
    out = io.StringIO()
    bar = CallbackFactory.create("progress_bar", num_epoch=2, file=out)
    ctx = SimpleNamespace(rank=0, epoch=0, dataloader=[0, 1], step=1, loss=1.23456, lr=0.001, val_loss=0.5)
    bar.on_epoch_begin(ctx)
    bar.on_batch_end(ctx)
    bar.on_step_end(ctx)
    bar.on_batch_end(ctx)
    bar.on_epoch_end(ctx)
    text = out.getvalue()
    assert "Epoch 1/2" in text and "2/2" in text and "loss=1.2346" in text and "val_loss=0.5000" in text


def test_sigterm_checkpoints_at_the_next_step_boundary(tmp_path: Path, make_lm, make_config, sft_dataset) -> None:
    class Terminate:
        def on_batch_end(self, ctx):
            if ctx.step == 1 and ctx.iteration == 5:  # first micro-batch of step 2
                os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    cfg = make_config(
        tmp_path, make_lm(), sft_dataset, batch_per_device=1, grad_accum_steps=4, n_epoch=3, ckpt_interval=100
    )
    Trainer(cfg, callbacks=[Terminate()]).train()  # returns normally
    assert signal.getsignal(signal.SIGTERM) is before
    # Step 2's window was finished, then training stopped before step 3 and saved step 2.
    assert [r["step"] for r in read_metrics(tmp_path / "logs" / "metrics.jsonl")] == [1, 2]
    path = latest_checkpoint(tmp_path / "ckpt")
    ckpt = Checkpoint.load(path)
    assert (ckpt.step, ckpt.iteration, ckpt.extra["sampler"]["iter"]) == (2, 8, 0)
    assert ckpt.extra["sampler"]["epoch"] == 1  # all 8 samples of epoch 0 consumed


def test_every_builtin_callback_accepts_every_hook() -> None:
    """The built-in callbacks subclass TrainCallback: a hook a callback does not implement is a no-op."""
    hooks = [name for name in vars(TrainCallback) if name.startswith("on_")]
    assert len(hooks) == 9
    assert sorted(CallbackFactory.list_registered()) == sorted(
        ["gradient_clipping", "gradient_checkpointing", "checkpoint", "progress_bar", "metric_logger", "validation"]
    )
    for name in CallbackFactory.list_registered():
        cls = CallbackFactory.get_component_class(name)
        assert issubclass(cls, TrainCallback), name
        for hook in hooks:
            assert callable(getattr(cls, hook)), (name, hook)
            if getattr(cls, hook) is getattr(TrainCallback, hook):  # inherited: does nothing, whatever it is given
                assert getattr(cls, hook)(object.__new__(cls), SimpleNamespace()) is None, (name, hook)
