"""Parallel building blocks shared by training and inference: process groups, launching, tensor-parallel layers."""

from astrai.parallel.collectives import (
    copy_to_parallel_region,
    gather_from_parallel_region,
    reduce_from_parallel_region,
    scatter_to_parallel_region,
)
from astrai.parallel.launch import spawn_parallel_fn
from astrai.parallel.setup import (
    get_current_device,
    get_local_rank,
    get_rank,
    get_world_size,
    only_on_rank,
    setup_parallel,
)
from astrai.parallel.tensor_parallel import ColumnParallelLinear, ParallelModel, RowParallelLinear

__all__ = [
    "ColumnParallelLinear",
    "ParallelModel",
    "RowParallelLinear",
    "copy_to_parallel_region",
    "gather_from_parallel_region",
    "get_current_device",
    "get_local_rank",
    "get_rank",
    "get_world_size",
    "only_on_rank",
    "reduce_from_parallel_region",
    "scatter_to_parallel_region",
    "setup_parallel",
    "spawn_parallel_fn",
]
