"""Parallel building blocks shared by training and inference: process groups, launching, tensor-parallel layers.

The executors and gradient accumulation (`BaseExecutor`, `NoneExecutor`, `DDPExecutor`, `FSDPExecutor`,
`ExecutorFactory`, `GradientState`, `AccumOptimizer`, `AccumScheduler`) are training machinery in astrai-train
(`astrai.trainer`); the architecture document lists them here, so they are importable from here too, loaded on
first use (`astrai.parallel.lazy`): `from astrai.parallel import DDPExecutor` needs astrai-train installed,
`import astrai.parallel` does not.
"""

from astrai.parallel.collectives import (
    copy_to_parallel_region,
    gather_from_parallel_region,
    reduce_from_parallel_region,
    scatter_to_parallel_region,
)
from astrai.parallel.launch import spawn_parallel_fn
from astrai.parallel.lazy import lazy_exports
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

# Provided by astrai-train; not in __all__, so `from astrai.parallel import *` never needs it.
TRAINING_EXPORTS = {
    "BaseExecutor": "astrai.trainer.executor",
    "NoneExecutor": "astrai.trainer.executor",
    "DDPExecutor": "astrai.trainer.executor",
    "FSDPExecutor": "astrai.trainer.executor",
    "ExecutorFactory": "astrai.trainer.executor",
    "GradientState": "astrai.trainer.accumulation",
    "AccumOptimizer": "astrai.trainer.accumulation",
    "AccumScheduler": "astrai.trainer.accumulation",
}
__getattr__, __dir__ = lazy_exports(__name__, TRAINING_EXPORTS, __all__)
