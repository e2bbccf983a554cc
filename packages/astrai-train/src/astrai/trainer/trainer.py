"""`Trainer`: runs a `TrainConfig` in one process, in `nprocs` spawned processes, or under torchrun
(`torchrun --nproc-per-node N script.py`: each process is one rank; the environment's world size rules).

One optimizer step, as the loop below runs it:
1. take the next window of up to `grad_accum_steps` micro-batches (fewer at the end of an epoch: the
   trailing partial window is stepped, never dropped; windows never span epochs);
2. count the step's trained units on every micro-batch and all-reduce the count (SUM) together with the
   ranks' stop flags; a SIGTERM/SIGINT seen by any rank stops all of them here, at a step boundary;
3. forward + backward each micro-batch with loss = its unit-loss sum / the global count (no-sync on all
   but the last, so gradients are reduced once per window);
4. `on_optimizer_step` (clipping, validation), optimizer and scheduler step; then the window's last
   `on_batch_end` (checkpoints, metric records: a step boundary) and `on_step_end`.

`train()` returns a `TrainResult`: a run stopped by a signal says which, so a caller (`astrai train`) can
report the interruption instead of treating the partial run as finished. Spawned CPU ranks share the
machine's cores (one intra-op thread pool each), as torchrun's one thread per rank would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import multiprocessing
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from astrai.config import TrainConfig
from astrai.parallel import spawn_parallel_fn
from astrai.serialization import Checkpoint
from astrai.trainer.callback import CallbackFactory, TrainCallback
from astrai.trainer.context import TrainContext, TrainContextBuilder
from astrai.trainer.data_check import check_data
from astrai.trainer.strategy import batch_size

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclasses.dataclass
class TrainResult:
    """How `Trainer.train()` ended."""

    step: int  # optimizer steps taken (counted from the start of training, resumes included)
    # The signal (SIGINT / SIGTERM) that stopped training early at step `step`, after which a checkpoint was
    # saved; None when training ran to its end. A rank stopped by another rank's signal reports SIGTERM.
    stop_signal: int | None = None


def rank_threads(world_size: int, start_method: str, environ: dict[str, str] | None = None) -> int | None:
    """Intra-op threads for each of `world_size` spawned ranks: the cores this process may use, shared
    (at least 1 each). None (leave torch's default) for one process, when OMP_NUM_THREADS is set (the
    user's choice, or torchrun's), or with "fork" (the launcher runs forked ranks single-threaded)."""
    environ = os.environ if environ is None else environ
    if world_size == 1 or "OMP_NUM_THREADS" in environ or start_method == "fork":
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // world_size)


class Trainer:
    """Trains `train_config.model` with the default callbacks followed by `callbacks`.

    `run_config` (the plain values of a run file) is stored with every checkpoint beside the config."""

    def __init__(
        self,
        train_config: TrainConfig,
        callbacks: list[TrainCallback] | None = None,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        train_config.validate()  # again: strategies/executors registered since the config was built count
        self.train_config = train_config
        self.run_config = run_config
        self.callbacks = self._get_default_callbacks() + list(callbacks or [])

    def _get_default_callbacks(self) -> list[TrainCallback]:
        cfg = self.train_config
        # Order is hook order: clipping records the norm before validation and the logger read the
        # gradients; the step's record is written before the checkpoint that follows it.
        return [
            CallbackFactory.create("gradient_checkpointing", modules=cfg.gradient_checkpointing_modules),
            CallbackFactory.create("gradient_clipping", max_grad_norm=cfg.max_grad_norm),
            CallbackFactory.create("validation"),
            CallbackFactory.create(
                "metric_logger",
                log_dir=cfg.log_dir,
                log_interval=cfg.log_interval,
                metrics=cfg.metrics,
                report_to=cfg.report_to,
                run_name=cfg.run_name,
            ),
            CallbackFactory.create(
                "checkpoint", save_dir=cfg.ckpt_dir, interval=cfg.ckpt_interval, keep=cfg.keep_checkpoints
            ),
            CallbackFactory.create("progress_bar", num_epoch=cfg.n_epoch),
        ]

    def train(self, checkpoint: Checkpoint | str | Path | None = None) -> TrainResult:
        """Train from scratch, or resume from a `Checkpoint` or a checkpoint folder."""
        cfg = self.train_config
        check_data(cfg.model, cfg.dataset, "dataset")
        check_data(cfg.model, cfg.val_dataset, "val_dataset")
        world_size = cfg.nprocs
        under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        if under_torchrun:  # its world rules
            world_size = int(os.environ["WORLD_SIZE"])
            if world_size > 1 and cfg.parallel_mode == "none":
                raise ValueError(
                    f"TrainConfig.parallel_mode='none' under torchrun with WORLD_SIZE={world_size}: use 'ddp' or 'fsdp'"
                )
        device_type = cfg.device_type
        if device_type == "auto":
            device_type = "cuda" if torch.cuda.is_available() else "cpu"
        backend = cfg.backend
        if backend == "auto":
            backend = "nccl" if device_type == "cuda" else "gloo"
        spawning = world_size > 1 and not under_torchrun
        with _forward_signals_to_ranks() if spawning else contextlib.nullcontext():
            results = spawn_parallel_fn(
                self._trainer_loop,
                world_size=world_size,
                backend=backend,
                master_addr=cfg.master_addr,
                master_port=cfg.master_port,
                device_type=device_type,
                start_method=cfg.start_method,
                checkpoint=checkpoint,
                num_threads=rank_threads(world_size, cfg.start_method) if spawning else None,
            )
        stop_signal = next((r.stop_signal for r in results if r.stop_signal is not None), None)
        return TrainResult(step=results[0].step, stop_signal=stop_signal)

    def _trainer_loop(
        self, checkpoint: Checkpoint | str | Path | None = None, num_threads: int | None = None
    ) -> TrainResult:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        if isinstance(checkpoint, (str, Path)):
            checkpoint = Checkpoint.load(checkpoint)
        context = TrainContextBuilder(self.train_config, self.run_config).with_checkpoint(checkpoint).build()
        self._run(context)
        return TrainResult(step=context.step, stop_signal=context.stop_signal)

    def _call(self, hook: str, context: TrainContext) -> None:
        for callback in self.callbacks:
            method = getattr(callback, hook, None)
            if method is not None:
                method(context)

    def _run(self, context: TrainContext) -> None:
        cfg = self.train_config
        try:
            self._call("on_train_begin", context)
            with _stop_on_signals(context):
                context.model.train()
                while context.epoch < cfg.n_epoch:
                    context.sampler.set_epoch(context.epoch)
                    self._call("on_epoch_begin", context)
                    if not self._run_epoch(context):
                        break
                    self._call("on_epoch_end", context)
                    context.epoch += 1
                    context.samples_in_epoch = 0
        except BaseException as exc:
            context.error = exc
            self._call("on_error", context)
            raise
        finally:
            self._call("on_train_end", context)

    def _run_epoch(self, context: TrainContext) -> bool:
        """Train on the rest of the epoch; False when a stop was requested."""
        batches = iter(context.dataloader)
        while window := list(itertools.islice(batches, context.executor.grad_accum_steps)):
            if not self._train_step(context, window):
                return False
        return True

    def _train_step(self, context: TrainContext, window: list[dict[str, torch.Tensor]]) -> bool:
        """One optimizer step over `window`'s micro-batches; False (nothing done) when stopping."""
        strategy, executor, precision = context.strategy, context.executor, context.precision
        if context.world_size == 1 and context.stop_requested:
            return False
        batches = [strategy.prepare(batch) for batch in window]
        units = torch.stack([strategy.count_units(batch) for batch in batches]).sum()
        if context.world_size > 1:
            shared = torch.stack([units, torch.tensor(int(context.stop_requested), device=units.device)])
            dist.all_reduce(shared, op=dist.ReduceOp.SUM)
            units = shared[0]
            if shared[1].item():
                context.stop_requested = True
                context.stop_signal = context.stop_signal or signal.SIGTERM  # stopped by a peer's signal
                return False

        context.in_step = True
        strategy.reset_metrics()  # the step's strategy metrics (DPO rewards, ...) start from nothing
        executor.gradient_state.begin_window(len(batches))
        step_loss = torch.zeros((), dtype=torch.float32, device=units.device)
        for i, (raw, batch) in enumerate(zip(window, batches)):
            self._call("on_batch_begin", context)
            with executor.accumulate(context.model):
                with precision.autocast():
                    loss = strategy.compute_loss(batch, num_units=units)
                executor.backward(precision.scale(loss))
            step_loss += loss.detach().float()
            context.iteration += 1
            context.samples_in_epoch += batch_size(raw)
            context.tokens += strategy.num_input_tokens(batch)
            if i < len(batches) - 1:  # the window's last micro-batch ends after the optimizer step
                self._call("on_batch_end", context)
        if context.world_size > 1:
            dist.all_reduce(step_loss, op=dist.ReduceOp.SUM)
        context.loss = step_loss.item()

        precision.unscale_(context.optimizer)
        self._call("on_optimizer_step", context)
        precision.step(context.optimizer)
        context.optimizer.zero_grad()
        if context.scheduler is not None:
            context.scheduler.step()
        context.step += 1
        context.in_step = False
        strategy.step_end(context.step)
        self._call("on_batch_end", context)  # at a step boundary: checkpoints and metric records
        self._call("on_step_end", context)
        return True


@contextlib.contextmanager
def _stop_on_signals(context: TrainContext) -> Iterator[None]:
    """SIGTERM / SIGINT request a stop at the next step boundary (a checkpoint is saved there); a second
    signal interrupts at once."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return

    def request_stop(signum: int, frame: Any) -> None:
        if context.stop_requested:
            raise KeyboardInterrupt
        context.stop_requested = True
        context.stop_signal = signum

    previous = {sig: signal.signal(sig, request_stop) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _forward_signals_to_ranks() -> Iterator[None]:
    """While this process waits for the ranks it spawned: pass a SIGTERM on to them (each stops at its next
    step boundary and saves) and ignore SIGINT, which Ctrl-C delivers to the ranks themselves (the whole
    foreground process group); a second copy would make them stop at once, unsaved."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum: int, frame: Any) -> None:
        for child in multiprocessing.active_children():
            os.kill(child.pid, signum)

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, forward)}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
