"""`CheckpointCallback`: saves the full training state every `interval` optimizer steps and at the end,
keeps the newest `keep` checkpoints, and restores the state when training resumes.

A checkpoint is only ever taken at an optimizer-step boundary (never with a half-accumulated window), so
weights, optimizer, scheduler, sampler position and RNG all describe the same instant and a resumed run
continues bit-identically. The default saved state:

    weights     unwrapped names, full tensors (FSDP gathers them); LoRA runs save the adapters only
    optimizer   the optimizer's state (FSDP: gathered, keyed by parameter name)
    scheduler   the LR scheduler's state
    sampler     epoch + samples this rank consumed (not the DataLoader's read-ahead)
    rng         every rank's Python / NumPy / torch / CUDA generator states
    scaler      the fp16 GradScaler's state, when there is one
    strategy    strategy state, when it has any (e.g. a re-synced GRPO reference)
    meta.json   the TrainConfig (`to_dict`) and the plain run-file values; config.json the model config

Every rank takes part in gathering the state; rank 0 writes it; all ranks wait for the write.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from astrai.serialization import (
    Checkpoint,
    checkpoint_dir,
    get_rng_state,
    mark_latest,
    prune_checkpoints,
    set_rng_state,
)
from astrai.trainer.callback import CallbackFactory, TrainCallback
from astrai.trainer.context import model_config_dict
from astrai.trainer.lora import has_lora, lora_state_dict

if TYPE_CHECKING:
    from torch import nn

    from astrai.trainer.context import TrainContext

logger = logging.getLogger(__name__)


@CallbackFactory.register("checkpoint")
class CheckpointCallback(TrainCallback):
    """Save to `save_dir/step_<N>` every `interval` optimizer steps (<= 0: only at the end of training)
    and point `save_dir/latest` at it; with `keep`, older step folders than the newest `keep` are deleted.
    `weight_only` saves weights and meta without training state."""

    def __init__(
        self,
        save_dir: str,
        interval: int,
        weight_only: bool = False,
        state_dict_fn: Callable[[nn.Module], dict[str, Any]] | None = None,
        save_extra_fn: Callable[[TrainContext], dict[str, Any]] | None = None,
        load_extra_fn: Callable[[dict[str, Any], TrainContext], None] | None = None,
        keep: int | None = None,
    ) -> None:
        self.save_dir = save_dir
        self.interval = interval
        self.weight_only = weight_only
        self.keep = keep
        self.state_dict_fn = state_dict_fn
        self.save_extra_fn = save_extra_fn or self.save_extra
        self.load_extra_fn = load_extra_fn or self.load_extra
        self.last_saved_step: int | None = None

    # --- saving ------------------------------------------------------------------------------------------

    def _save_checkpoint(self, context: TrainContext) -> None:
        """Save the state at the current step boundary (all ranks must call)."""
        if context.in_step:
            raise RuntimeError("a checkpoint must be taken at an optimizer-step boundary")
        model = context.executor.unwrap_model(context.model)
        lora = context.config.lora if has_lora(model) else None
        if self.state_dict_fn is not None:
            state = self.state_dict_fn(model)
        elif lora is not None:
            state = lora_state_dict(model)
        else:
            state = context.executor.model_state_dict(context.model)
        extra = {} if self.weight_only else self.save_extra_fn(context)
        if context.rank == 0:
            ckpt = Checkpoint(
                state_dict=state,
                epoch=context.epoch,
                iteration=context.iteration,
                step=context.step,
                extra=extra,
                meta={
                    "train_config": context.config.to_dict(),
                    "run": context.run_config,
                    "world_size": context.world_size,
                },
                model_config=model_config_dict(model),
                adapter_config=lora.to_dict() if lora is not None else None,
            )
            path = ckpt.save(checkpoint_dir(self.save_dir, context.step))
            mark_latest(path)
            if self.keep is not None:
                prune_checkpoints(self.save_dir, self.keep)
            context.checkpoint = ckpt
        if context.world_size > 1:
            dist.barrier()
        self.last_saved_step = context.step

    @staticmethod
    def save_extra(context: TrainContext) -> dict[str, Any]:
        """The training state besides the weights (collective: every rank calls)."""
        extra: dict[str, Any] = {
            "optimizer": context.executor.optimizer_state_dict(context.model, context.optimizer),
            "sampler": context.sampler_state(),
        }
        if context.scheduler is not None:
            extra["scheduler"] = context.scheduler.state_dict()
        rng = get_rng_state()
        if context.world_size > 1:
            states: list[Any] = [None] * context.world_size
            dist.all_gather_object(states, rng)
            extra["rng"] = {"ranks": states}
        else:
            extra["rng"] = {"ranks": [rng]}
        if context.precision.scaler is not None:
            extra["scaler"] = context.precision.state_dict()
        strategy_state = context.strategy.state_dict()
        if strategy_state:
            extra["strategy"] = strategy_state
        return extra

    # --- restoring ---------------------------------------------------------------------------------------

    @staticmethod
    def load_extra(extra: dict[str, Any], context: TrainContext) -> None:
        """Restore what `save_extra` saved (the sampler was restored when the context was built)."""
        if "optimizer" in extra:
            context.executor.load_optimizer_state_dict(context.model, context.optimizer, extra["optimizer"])
        if "scheduler" in extra and context.scheduler is not None:
            context.scheduler.load_state_dict(extra["scheduler"])
        if "scaler" in extra:
            context.precision.load_state_dict(extra["scaler"])
        if "strategy" in extra:
            context.strategy.load_state_dict(extra["strategy"])
        if "rng" in extra:
            ranks = extra["rng"]["ranks"]
            if len(ranks) == context.world_size:
                set_rng_state(ranks[context.rank])
            else:
                logger.warning(
                    "checkpoint has RNG states of %d ranks, this run has %d: not restored",
                    len(ranks),
                    context.world_size,
                )

    # --- hooks -------------------------------------------------------------------------------------------

    def on_train_begin(self, context: TrainContext) -> None:
        if context.checkpoint is not None:
            self.load_extra_fn(context.checkpoint.extra, context)
        self.last_saved_step = context.step  # a resumed run does not re-save the step it resumed from

    def on_batch_end(self, context: TrainContext) -> None:
        # Mid-window micro-batches are skipped; the window's last one ends at a step boundary.
        if not context.in_step and self.interval > 0 and context.step % self.interval == 0:
            self._save_checkpoint(context)

    def on_train_end(self, context: TrainContext) -> None:
        # Also reached when a stop signal ended training early: the state is that of a step boundary.
        if context.error is None and self.last_saved_step is not None and context.step != self.last_saved_step:
            self._save_checkpoint(context)

    def on_error(self, context: TrainContext) -> None:
        # Only a single process at a step boundary can save safely: other ranks may be stuck in a
        # collective, and mid-window state is not resumable. Otherwise the latest checkpoint stands.
        began = self.last_saved_step is not None  # on_train_begin ran: the state is a training state
        at_boundary = not context.in_step
        if began and context.world_size == 1 and at_boundary and context.step != self.last_saved_step:
            self._save_checkpoint(context)
