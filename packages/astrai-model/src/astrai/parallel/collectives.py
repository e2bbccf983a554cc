"""Autograd-aware collectives for tensor parallelism (Megatron-LM's "mappings").

Each forward collective has the adjoint collective as its backward, so gradients flow correctly through
sharded layers:

    function                      forward                      backward
    copy_to_parallel_region       identity                     all-reduce (sum)
    reduce_from_parallel_region   all-reduce (sum)             identity
    scatter_to_parallel_region    keep this rank's last-dim    all-gather along the last dim
                                  chunk
    gather_from_parallel_region   all-gather along last dim    keep this rank's last-dim chunk

All work along the last dimension, which must divide evenly by the group size. With a group of one rank
(or no process group at all) every function is the identity, so the layers also run in a single process.
Collectives never modify their input in place: autograd may still need it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from astrai.parallel.setup import get_rank, get_world_size


def _all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def _all_gather_last(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(get_world_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)  # (..., world * d)


def _split_last(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    world = get_world_size(group)
    if x.shape[-1] % world:
        raise ValueError(f"last dimension {x.shape[-1]} is not divisible by the group size {world}")
    return x.chunk(world, dim=-1)[get_rank(group)].contiguous()  # (..., d / world)


class _CopyToParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce(grad, ctx.group), None


class _ReduceFromParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _ScatterToParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_gather_last(grad, ctx.group), None


class _GatherFromParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return _all_gather_last(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _split_last(grad, ctx.group), None


def copy_to_parallel_region(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Enter a parallel region with a replicated input: the input's gradient is summed over ranks."""
    return x if get_world_size(group) == 1 else _CopyToParallelRegion.apply(x, group)


def reduce_from_parallel_region(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Leave a parallel region by summing the ranks' partial results."""
    return x if get_world_size(group) == 1 else _ReduceFromParallelRegion.apply(x, group)


def scatter_to_parallel_region(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Keep this rank's chunk of the last dimension of a replicated tensor."""
    return x if get_world_size(group) == 1 else _ScatterToParallelRegion.apply(x, group)


def gather_from_parallel_region(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate the ranks' last-dimension chunks into the full, replicated tensor."""
    return x if get_world_size(group) == 1 else _GatherFromParallelRegion.apply(x, group)
