"""Executors: how the model is distributed (`none`, `ddp`, `fsdp`) and how gradients accumulate.

The strategies already divide every micro-batch's loss by the global number of trained units of the
optimizer step (REFERENCE D), so each rank's gradient is its share of the exact global mean. Data
parallelism must therefore SUM gradients over ranks, not average them: DDP gets an all-reduce-sum comm
hook and FSDP2 a gradient divide factor of 1. Splitting a step across micro-batches or ranks then leaves
the gradient unchanged.

State always leaves an executor under the unwrapped module's parameter names (no `module.` prefix; FSDP
gathers the full tensors), so checkpoints load into a plain model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from astrai.factory import BaseFactory
from astrai.protocols import OptimizerProtocol, SchedulerProtocol
from astrai.trainer.accumulation import AccumOptimizer, AccumScheduler, GradientState


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 and `nn.Module.compile` keep the module itself)."""
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class BaseExecutor:
    """Prepares the model for one parallel mode and runs the accumulation window's micro-batches."""

    def __init__(self, grad_accum_steps: int = 1) -> None:
        self.gradient_state = GradientState(grad_accum_steps)

    # --- preparation -------------------------------------------------------------------------------------

    def prepare(
        self,
        model: nn.Module,
        optimizer: OptimizerProtocol | None = None,
        dataloader: Any = None,
        scheduler: SchedulerProtocol | None = None,
    ) -> tuple[nn.Module, AccumOptimizer | None, Any, AccumScheduler | None]:
        """Wrap the model for this mode and the optimizer/scheduler for accumulation."""
        model = self.prepare_model(model)
        if optimizer is not None:
            self._check_optimizer(model, optimizer)
        return model, self.wrap_optimizer(optimizer), dataloader, self.wrap_scheduler(scheduler)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The model wrapped or sharded for this mode (a model already prepared is returned as is)."""
        if isinstance(model, nn.parallel.DistributedDataParallel) or any(
            isinstance(m, FSDPModule) for m in model.modules()
        ):
            return model
        return self._prepare_model(model)

    def _prepare_model(self, model: nn.Module) -> nn.Module:
        return model

    def _check_optimizer(self, model: nn.Module, optimizer: OptimizerProtocol) -> None:
        """Raise if `optimizer` cannot drive the prepared model."""

    def wrap_optimizer(self, optimizer: OptimizerProtocol | None) -> AccumOptimizer | None:
        if optimizer is None or isinstance(optimizer, AccumOptimizer):
            return optimizer
        return AccumOptimizer(optimizer, self.gradient_state)

    def wrap_scheduler(self, scheduler: SchedulerProtocol | None) -> AccumScheduler | None:
        if scheduler is None or isinstance(scheduler, AccumScheduler):
            return scheduler
        return AccumScheduler(scheduler, self.gradient_state)

    # --- the accumulation window -------------------------------------------------------------------------

    @contextlib.contextmanager
    def accumulate(self, model: nn.Module) -> Iterator[None]:
        """Run one micro-batch; gradients are reduced across ranks only on the window's last one."""
        self.gradient_state.advance()
        if self.gradient_state.sync_gradients:
            yield
        else:
            with self._no_sync(model):
                yield

    @contextlib.contextmanager
    def _no_sync(self, model: nn.Module) -> Iterator[None]:
        yield

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        return unwrap(model)

    @property
    def use_distributed(self) -> bool:
        return _world_size() > 1

    @property
    def sync_gradients(self) -> bool:
        return self.gradient_state.sync_gradients

    @property
    def grad_accum_steps(self) -> int:
        return self.gradient_state.num_steps

    # --- gradients and state -----------------------------------------------------------------------------

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Total L2 norm of all gradients (over every shard); clipped to `max_norm` when it is > 0."""
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros(())
        total = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
        if isinstance(total, DTensor):  # FSDP: per-shard partial norms -> the global norm
            total = total.full_tensor()
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    def model_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Full weights under unwrapped names, on CPU (every rank must call; all ranks receive them)."""
        return {k: v.detach().to("cpu") for k, v in self.unwrap_model(model).state_dict().items()}

    def optimizer_state_dict(self, model: nn.Module, optimizer: OptimizerProtocol) -> dict[str, Any]:
        return _inner(optimizer).state_dict()

    def load_optimizer_state_dict(self, model: nn.Module, optimizer: OptimizerProtocol, state: dict[str, Any]) -> None:
        _inner(optimizer).load_state_dict(state)


def _inner(optimizer: OptimizerProtocol) -> OptimizerProtocol:
    return optimizer.optimizer if isinstance(optimizer, AccumOptimizer) else optimizer


class ExecutorFactory(BaseFactory[BaseExecutor]):
    """Executors by `TrainConfig.parallel_mode`: "none", "ddp", "fsdp"."""

    kind = "executor"
    base_class = BaseExecutor

    @classmethod
    def create(cls, parallel_mode: str, *args: Any, **kwargs: Any) -> BaseExecutor:
        """The executor registered as `parallel_mode` ("none", "ddp", "fsdp"), built with exactly these
        arguments (e.g. grad_accum_steps and `TrainConfig.executor_kwargs`)."""
        return super().create(parallel_mode, *args, **kwargs)


@ExecutorFactory.register("none")
class NoneExecutor(BaseExecutor):
    """One process: the model runs as given."""


def _allreduce_sum_hook(process_group, bucket):  # unannotated: DDP checks the annotations' objects
    """DDP comm hook: sum gradients over ranks (DDP's default divides by the world size).
    `process_group`: the group to reduce over (None: WORLD); `bucket`: a `dist.GradBucket`."""
    group = process_group if process_group is not None else dist.group.WORLD
    future = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return future.then(lambda fut: fut.value()[0])


@ExecutorFactory.register("ddp")
class DDPExecutor(BaseExecutor):
    """Data parallel: every rank holds the whole model; gradients are summed once per window."""

    def __init__(
        self,
        grad_accum_steps: int = 1,
        forward_sync_buffers: bool = True,
        bucket_cap_mb: float = 25.0,
        find_unused_parameters: bool = False,
        gradient_as_bucket_view: bool = False,
    ) -> None:
        super().__init__(grad_accum_steps)
        self.ddp_kwargs = {
            "forward_sync_buffers": forward_sync_buffers,
            "bucket_cap_mb": bucket_cap_mb,
            "find_unused_parameters": find_unused_parameters,
            "gradient_as_bucket_view": gradient_as_bucket_view,
        }

    def _prepare_model(self, model: nn.Module) -> nn.Module:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "parallel_mode='ddp' needs an initialised process group (launch with nprocs>1 or torchrun)"
            )
        device = next(model.parameters()).device
        # CUDA: the local device (never the global rank: wrong on multi-node); CPU: no device ids.
        device_ids = [device.index] if device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **self.ddp_kwargs)
        wrapped.register_comm_hook(state=None, hook=_allreduce_sum_hook)
        return wrapped

    @contextlib.contextmanager
    def _no_sync(self, model: nn.Module) -> Iterator[None]:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            with model.no_sync():
                yield
        else:
            yield


@ExecutorFactory.register("fsdp")
class FSDPExecutor(BaseExecutor):
    """Fully sharded data parallel (FSDP2 `fully_shard`): parameters, gradients and optimizer state are
    sharded over ranks. Each module whose class name is in `shard_modules` (default: every block of a
    `layers` ModuleList) becomes its own unit, then the root (or, for a class FSDP2 cannot extend, each
    remaining child of the root). Gradients are summed over ranks: the loss is already normalised."""

    def __init__(
        self,
        grad_accum_steps: int = 1,
        reshard_after_forward: bool = True,
        shard_modules: list[str] | None = None,
    ) -> None:
        super().__init__(grad_accum_steps)
        self.reshard_after_forward = reshard_after_forward
        self.shard_modules = None if shard_modules is None else tuple(shard_modules)

    def _units(self, model: nn.Module) -> list[nn.Module]:
        if self.shard_modules is not None:
            return [m for m in model.modules() if type(m).__name__ in self.shard_modules and m is not model]
        layers = getattr(model, "layers", None)
        return list(layers) if isinstance(layers, nn.ModuleList) else []

    def _prepare_model(self, model: nn.Module) -> nn.Module:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "parallel_mode='fsdp' needs an initialised process group (launch with nprocs>1 or torchrun)"
            )
        device_type = next(model.parameters()).device.type
        # An explicit mesh of the params' device type: with a gloo group on a GPU machine, FSDP2 would
        # otherwise move CPU params to CUDA (pytorch#132471).
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
        units = self._units(model)
        for unit in units:
            fully_shard(unit, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        fully_shard(model, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)  # sum over ranks; the loss is already normalised
                module.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)
        return model

    def _check_optimizer(self, model: nn.Module, optimizer: OptimizerProtocol) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if any(not isinstance(p, DTensor) for p in params):
            raise ValueError("FSDP shards the parameters in place: build the optimizer after prepare_model(model)")

    @contextlib.contextmanager
    def _no_sync(self, model: nn.Module) -> Iterator[None]:
        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.set_requires_gradient_sync(False, recurse=False)
        try:
            yield
        finally:
            for unit in units:
                unit.set_requires_gradient_sync(True, recurse=False)

    def model_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        options = StateDictOptions(full_state_dict=True)
        return {k: v.detach().to("cpu") for k, v in get_model_state_dict(model, options=options).items()}

    def optimizer_state_dict(self, model: nn.Module, optimizer: OptimizerProtocol) -> dict[str, Any]:
        # Full (gathered) state keyed by parameter name; offloaded to CPU, kept on rank 0 only.
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(model, _inner(optimizer), options=options)

    def load_optimizer_state_dict(self, model: nn.Module, optimizer: OptimizerProtocol, state: dict[str, Any]) -> None:
        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(model, _inner(optimizer), state, options=options)
