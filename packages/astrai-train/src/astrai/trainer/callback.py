"""`TrainCallback` hooks, `CallbackFactory`, and the small built-in callbacks: gradient clipping,
activation checkpointing, progress bar and validation. (Checkpointing and metric logging have modules
of their own.)

Hook order within one optimizer step of the trainer:

    on_batch_begin, on_batch_end           once per micro-batch of the accumulation window, except that
                                           the window's last on_batch_end comes after the optimizer step
    on_optimizer_step                      gradients complete (and unscaled), before optimizer.step():
                                           clipping, then validation (of the weights the step's loss
                                           was computed with)
    on_batch_end (the window's last)       after optimizer.step() and scheduler.step(): `context.in_step`
                                           is False and `context.step` counts the step. Checkpoints and
                                           metric records are taken here, at an optimizer-step
                                           boundary, never mid-window.
    on_step_end                            right after it, once per optimizer step

plus on_train_begin / on_train_end, on_epoch_begin / on_epoch_end and on_error. A callback implements
any subset; missing hooks are skipped. The built-in callbacks subclass `TrainCallback`, whose hooks are
no-ops, so every hook can be called on any of them.
"""

from __future__ import annotations

import sys
from typing import IO, TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from astrai.factory import BaseFactory
from astrai.trainer.strategy import batch_size

if TYPE_CHECKING:
    from astrai.trainer.context import TrainContext


@runtime_checkable
class TrainCallback(Protocol):
    """The hooks a training callback may implement (all optional). A protocol: a class implementing any
    subset of the hooks serves; a subclass inherits the ones it does not override as no-ops."""

    def on_train_begin(self, context: TrainContext) -> None: ...
    def on_train_end(self, context: TrainContext) -> None: ...
    def on_epoch_begin(self, context: TrainContext) -> None: ...
    def on_epoch_end(self, context: TrainContext) -> None: ...
    def on_batch_begin(self, context: TrainContext) -> None: ...
    def on_batch_end(self, context: TrainContext) -> None: ...
    def on_optimizer_step(self, context: TrainContext) -> None: ...
    def on_step_end(self, context: TrainContext) -> None: ...
    def on_error(self, context: TrainContext) -> None: ...


class CallbackFactory(BaseFactory[Any]):
    """Built-in callbacks by name: gradient_clipping, gradient_checkpointing, checkpoint, progress_bar,
    metric_logger, validation."""

    kind = "callback"


@CallbackFactory.register("gradient_clipping")
class GradientClippingCallback(TrainCallback):
    """Records the global gradient norm in `context.grad_norm` and clips it to `max_grad_norm` (> 0)."""

    def __init__(self, max_grad_norm: float) -> None:
        self.max_grad_norm = max_grad_norm

    def on_optimizer_step(self, context: TrainContext) -> None:
        norm = context.executor.clip_grad_norm(context.model, self.max_grad_norm)
        context.grad_norm = float(norm)


@CallbackFactory.register("gradient_checkpointing")
class GradientCheckpointingCallback(TrainCallback):
    """Activation checkpointing: instances of the given module types (classes, or class names) run their
    forward under `torch.utils.checkpoint` and recompute activations in the backward pass."""

    def __init__(self, modules: list[type | str] | tuple[type | str, ...] | None = None) -> None:
        self.modules = tuple(modules or ())

    def _matches(self, module: nn.Module) -> bool:
        return any(type(module).__name__ == m if isinstance(m, str) else isinstance(module, m) for m in self.modules)

    def on_train_begin(self, context: TrainContext) -> None:
        if not self.modules:
            return
        wrapped = [m for m in context.model.modules() if self._matches(m)]
        if not wrapped:
            names = [m if isinstance(m, str) else m.__name__ for m in self.modules]
            raise ValueError(f"gradient_checkpointing_modules={names}: no module of the model has such a type")
        for module in wrapped:
            _enable(module)

    def on_train_end(self, context: TrainContext) -> None:
        for module in context.model.modules():
            _disable(module)


def _enable(module: nn.Module) -> None:
    if "_original_forward" in module.__dict__:
        return
    original = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # evaluation: nothing to recompute
            return original(*args, **kwargs)
        return checkpoint(original, *args, use_reentrant=False, **kwargs)

    module._original_forward = original
    module.forward = forward


def _disable(module: nn.Module) -> None:
    if "_original_forward" in module.__dict__:
        module.forward = module.__dict__.pop("_original_forward")


@CallbackFactory.register("progress_bar")
class ProgressBarCallback(TrainCallback):
    """A tqdm bar per epoch over its micro-batches, with the last step's loss and lr (rank 0 only)."""

    def __init__(self, num_epoch: int, log_interval: int = 1, file: IO[str] | None = None) -> None:
        self.num_epoch = num_epoch
        self.log_interval = log_interval  # steps between postfix updates
        self.file = file
        self._bar: tqdm | None = None

    def on_epoch_begin(self, context: TrainContext) -> None:
        if context.rank == 0:
            self._bar = tqdm(
                total=len(context.dataloader),
                desc=f"Epoch {context.epoch + 1}/{self.num_epoch}",
                file=self.file or sys.stderr,
                dynamic_ncols=True,
                leave=True,
            )

    def on_batch_end(self, context: TrainContext) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def on_step_end(self, context: TrainContext) -> None:
        if self._bar is not None and context.step % self.log_interval == 0:
            postfix = {"loss": f"{context.loss:.4f}", "lr": f"{context.lr:.2e}"}
            if context.val_loss is not None:
                postfix["val_loss"] = f"{context.val_loss:.4f}"
            self._bar.set_postfix(postfix, refresh=False)

    def on_epoch_end(self, context: TrainContext) -> None:
        self._close()

    def on_train_end(self, context: TrainContext) -> None:
        self._close()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@CallbackFactory.register("validation")
class ValidationCallback(TrainCallback):
    """Every `val_step` optimizer steps: the exact mean loss over the whole validation set, summed over
    ranks with SUM all-reduces (gloo has no AVG), stored in `context.val_loss`. It runs when step N's
    gradients are complete, before its update: N's `val_loss` and training `loss` are of the same weights."""

    def __init__(self, val_step: int | None = None) -> None:
        self.val_step = val_step  # None: TrainConfig.val_step

    def on_optimizer_step(self, context: TrainContext) -> None:
        val_step = context.config.val_step if self.val_step is None else self.val_step
        if context.val_dataloader is None or val_step <= 0 or (context.step + 1) % val_step:
            return  # context.step counts the steps before this one
        self._run_validation(context)

    @torch.no_grad()
    def _run_validation(self, context: TrainContext) -> None:
        strategy, model = context.strategy, context.model
        sampler = context.val_dataloader.sampler
        n, world = len(context.val_dataloader.dataset), sampler.num_replicas
        total = torch.zeros(2, dtype=torch.float64, device=context.device)  # (loss sum, units)
        position = 0  # this rank's index into its share of the padded sample order
        model.eval()
        try:
            for batch in context.val_dataloader:
                size = batch_size(batch)
                # The sampler pads every rank to the same number of samples by repeating the first ones;
                # sample k of rank r is padding when r + k * world >= n. Every rank still runs the
                # forward (FSDP gathers parameters collectively), padding rows only weigh 0.
                keep = context.rank + world * torch.arange(position, position + size) < n
                position += size
                if keep.any() and not keep.all():
                    batch = {k: v[keep] for k, v in batch.items()}
                batch = strategy.prepare(batch)
                with context.precision.autocast():
                    loss_sum = strategy.loss_sum(batch)
                weight = 1.0 if keep.any() else 0.0
                total += weight * torch.stack([loss_sum.double(), strategy.count_units(batch).double()])
        finally:
            model.train()
        if context.world_size > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        context.val_loss = float(total[0] / total[1].clamp(min=1))


# Register the callbacks that live in their own modules. Imported last: they import this module.
from astrai.trainer import checkpoint_callback, metric_logger  # noqa: E402, F401
