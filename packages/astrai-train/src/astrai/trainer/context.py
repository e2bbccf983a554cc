"""`TrainContext` (the state one training process shares with its callbacks) and `TrainContextBuilder`.

The builder's order matters:
1. the model gets its LoRA adapters, then moves to this rank's device;
2. the strategy is built from the *initial* weights, so a DPO/GRPO reference copy is the starting policy
   even when resuming;
3. checkpoint weights are loaded into the plain module, before it is compiled or wrapped;
4. the executor wraps (DDP) or shards (FSDP) the model, and only then is the optimizer built, because
   FSDP replaces the parameters;
5. the sampler resumes at the samples the checkpoint had consumed; the DataLoader gets its own generator
   so that creating an iterator never draws from the global RNG (which the checkpoint restores).
Optimizer, scheduler, scaler, strategy and RNG states are restored by `CheckpointCallback.on_train_begin`.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from astrai.config import BaseModelConfig, TrainConfig
from astrai.dataset import ResumableDistributedSampler
from astrai.parallel import get_current_device, get_rank, get_world_size
from astrai.serialization import Checkpoint
from astrai.trainer.executor import BaseExecutor, ExecutorFactory, unwrap
from astrai.trainer.lora import apply_lora, has_lora, load_lora_state_dict
from astrai.trainer.precision import MixedPrecision
from astrai.trainer.strategy import BaseStrategy, StrategyFactory


@dataclasses.dataclass
class TrainContext:
    """Everything the training loop and its callbacks read and update."""

    model: nn.Module
    strategy: BaseStrategy
    dataloader: DataLoader
    optimizer: Any
    scheduler: Any
    checkpoint: Checkpoint | None
    config: TrainConfig
    executor: BaseExecutor
    epoch: int = 0
    iteration: int = 0  # micro-batches consumed since the start of training
    loss: float = 0.0  # the last optimizer step's loss (its exact mean over all micro-batches and ranks)
    val_dataloader: DataLoader | None = None
    val_loss: float | None = None
    world_size: int = 1
    rank: int = 0
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # free space for user callbacks
    step: int = 0  # optimizer steps taken
    samples_in_epoch: int = 0  # samples this rank consumed in the current epoch (resume position)
    tokens: int = 0  # input tokens fed to the model on this rank
    grad_norm: float | None = None
    sampler: ResumableDistributedSampler | None = None
    precision: MixedPrecision | None = None
    device: torch.device = torch.device("cpu")
    run_config: dict[str, Any] | None = None  # the plain run-file values, stored with each checkpoint
    stop_requested: bool = False  # set by SIGTERM/SIGINT: stop at the next optimizer-step boundary
    stop_signal: int | None = None  # the signal that requested the stop
    in_step: bool = False  # between the start of a window and its optimizer step: no checkpoint possible
    error: BaseException | None = None  # the exception that is ending training, if any

    def sampler_state(self) -> dict[str, Any]:
        """The sampler position after the samples consumed so far (not the DataLoader's read-ahead)."""
        state = self.sampler.state_dict()
        epoch, consumed = self.epoch, self.samples_in_epoch
        if consumed >= self.sampler.num_samples:
            epoch, consumed = epoch + 1, 0
        return {**state, "epoch": epoch, "iter": consumed}

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


class TrainContextBuilder:
    """Builds the `TrainContext` of one process from a `TrainConfig`, optionally resuming a checkpoint."""

    def __init__(self, config: TrainConfig, run_config: dict[str, Any] | None = None) -> None:
        self.config = config
        self.run_config = run_config
        self._checkpoint: Checkpoint | None = None

    def with_checkpoint(self, checkpoint: Checkpoint | None) -> TrainContextBuilder:
        self._checkpoint = checkpoint
        return self

    def build(self) -> TrainContext:
        cfg, ckpt = self.config, self._checkpoint
        device = torch.device(get_current_device())
        executor = ExecutorFactory.create(
            cfg.parallel_mode, grad_accum_steps=cfg.grad_accum_steps, **cfg.executor_kwargs
        )
        model = cfg.model
        if any(p.is_shared() for p in model.parameters()):
            # Spawned ranks receive the model through shared memory: without a private copy every rank
            # would update the same weights.
            model = copy.deepcopy(model)
        if cfg.lora is not None and not has_lora(model):
            apply_lora(model, cfg.lora)
        model.to(device)
        strategy = StrategyFactory.create(cfg.strategy, model, device, **cfg.extra_kwargs)
        if ckpt is not None:
            _load_weights(model, ckpt)
        if cfg.compile:
            model.compile()
        model = executor.prepare_model(model)
        strategy.model = model
        optimizer = cfg.optimizer_fn(executor.unwrap_model(model))
        scheduler = cfg.scheduler_fn(optimizer) if cfg.scheduler_fn is not None else None
        optimizer, scheduler = executor.wrap_optimizer(optimizer), executor.wrap_scheduler(scheduler)

        sampler = ResumableDistributedSampler(
            cfg.dataset,
            start_epoch=cfg.start_epoch,
            start_iter=cfg.start_batch * cfg.batch_per_device,
            seed=cfg.random_seed,
            shuffle=True,
        )
        epoch, iteration, step = sampler.epoch, 0, 0
        if ckpt is not None:
            if "sampler" in ckpt.extra:
                sampler.load_state_dict(ckpt.extra["sampler"])
            epoch, iteration, step = sampler.epoch, ckpt.iteration, ckpt.step
        ctx = TrainContext(
            model=model,
            strategy=strategy,
            dataloader=self._loader(cfg.dataset, sampler),
            optimizer=optimizer,
            scheduler=scheduler,
            checkpoint=ckpt,
            config=cfg,
            executor=executor,
            epoch=epoch,
            iteration=iteration,
            step=step,
            samples_in_epoch=sampler.iter,
            world_size=get_world_size(),
            rank=get_rank(),
            sampler=sampler,
            precision=MixedPrecision(cfg.mixed_precision, device.type),
            device=device,
            run_config=self.run_config,
        )
        if cfg.val_dataset is not None:
            val_sampler = ResumableDistributedSampler(cfg.val_dataset, shuffle=False)
            ctx.val_dataloader = self._loader(cfg.val_dataset, val_sampler)
        return ctx

    def _loader(self, dataset: Any, sampler: ResumableDistributedSampler) -> DataLoader:
        cfg = self.config
        generator = torch.Generator()
        generator.manual_seed(cfg.random_seed)
        return DataLoader(
            dataset,
            batch_size=cfg.batch_per_device,
            sampler=sampler,
            num_workers=cfg.num_workers,
            pin_memory=cfg.pin_memory,
            prefetch_factor=cfg.prefetch_factor,
            generator=generator,
        )


def _load_weights(model: nn.Module, ckpt: Checkpoint) -> None:
    if ckpt.adapter_config is not None:
        load_lora_state_dict(model, ckpt.state_dict)
        return
    result = unwrap(model).load_state_dict(ckpt.state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"checkpoint weights do not match the model: missing {result.missing_keys[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}"
        )


def model_config_dict(model: nn.Module) -> dict[str, Any] | None:
    """The model's config as config.json content, when the model carries a `BaseModelConfig`."""
    config = getattr(unwrap(model), "config", None)
    return config.to_dict() if isinstance(config, BaseModelConfig) else None
