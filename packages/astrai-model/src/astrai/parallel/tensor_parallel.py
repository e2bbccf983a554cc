"""Tensor-parallel linear layers (Megatron-LM style), trainable: gradients flow through the collectives.

    ColumnParallelLinear: W (out, in) split by rows, rank r holds W[r*out/p : (r+1)*out/p, :] and its bias
        slice. y_r = x W_r^T + b_r; with `gather_output` the ranks' y_r are concatenated to the full y.
    RowParallelLinear:    W (out, in) split by columns, rank r holds W[:, r*in/p : (r+1)*in/p]. Each rank
        multiplies its slice of x, the partial products are summed over ranks, and the full bias
        (replicated) is added once.

A Column layer with `gather_output=False` followed by a Row layer with `input_is_parallel=True` is the
usual MLP pair: one all-reduce forward, one backward.

Initialisation is that of `nn.Linear` applied to the *full* weight, then sharded: ranks seeded alike build
the same full matrix, and `torch.manual_seed(s); ColumnParallelLinear(...)` holds exactly the shards of
`torch.manual_seed(s); nn.Linear(...)` (same device). `load_full_weight` loads unsharded tensors.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from astrai.parallel.collectives import (
    copy_to_parallel_region,
    gather_from_parallel_region,
    reduce_from_parallel_region,
    scatter_to_parallel_region,
)
from astrai.parallel.setup import get_rank, get_world_size


class ParallelModel(nn.Module):
    """Base of tensor-parallel modules: the process group and this rank's place in it.

    `process_group=None` means the default group, or a single rank when no group is initialised.
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.process_group = process_group
        self.rank = get_rank(process_group)
        self.world_size = get_world_size(process_group)

    def shard(self, full: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's contiguous slice of `full` along `dim`, which must divide by the group size."""
        if full.shape[dim] % self.world_size:
            raise ValueError(
                f"dimension {dim} of size {full.shape[dim]} is not divisible by world_size {self.world_size}"
            )
        return full.chunk(self.world_size, dim=dim)[self.rank]


class _ParallelLinear(ParallelModel):
    """Shared parameter handling of the two layers: shard dimension of the weight, sharded or replicated bias."""

    weight_shard_dim: int  # 0: split output features (column parallel); 1: split input features (row parallel)
    bias_is_sharded: bool

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        process_group: dist.ProcessGroup | None,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        super().__init__(process_group)
        self.in_features, self.out_features = in_features, out_features
        split_name, split_size = (
            ("out_features", out_features) if self.weight_shard_dim == 0 else ("in_features", in_features)
        )
        if split_size % self.world_size:
            raise ValueError(f"{split_name}={split_size} is not divisible by world_size={self.world_size}")
        # nn.Linear's initialisation on the full matrix, drawing random numbers in the same order.
        full_weight = torch.empty(out_features, in_features, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(full_weight, a=math.sqrt(5))
        self.weight = nn.Parameter(self.shard(full_weight, self.weight_shard_dim).clone())
        if bias:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0.0
            full_bias = torch.empty(out_features, device=device, dtype=dtype).uniform_(-bound, bound)
            self.bias = nn.Parameter(self.shard(full_bias, 0).clone() if self.bias_is_sharded else full_bias)
        else:
            self.register_parameter("bias", None)

    @torch.no_grad()
    def load_full_weight(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Copy this rank's shards of the unsharded `weight` (out, in) and `bias` (out,)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"weight must have shape {(self.out_features, self.in_features)}, got {tuple(weight.shape)}"
            )
        if (bias is None) != (self.bias is None):
            raise ValueError(
                f"bias {'is required' if self.bias is not None else 'was given'} but the layer has bias={self.bias is not None}"
            )
        self.weight.copy_(self.shard(weight, self.weight_shard_dim))
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias must have shape {(self.out_features,)}, got {tuple(bias.shape)}")
            self.bias.copy_(self.shard(bias, 0) if self.bias_is_sharded else bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"rank={self.rank}, world_size={self.world_size}"
        )


class ColumnParallelLinear(_ParallelLinear):
    """y = x W^T + b with W split by output features; input (..., in), output (..., out) or (..., out/p)."""

    weight_shard_dim = 0
    bias_is_sharded = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        gather_output: bool = True,
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, process_group, device, dtype)
        self.gather_output = gather_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in), replicated on every rank; its gradient is the sum of the ranks' partial gradients.
        x = copy_to_parallel_region(x, self.process_group)
        y = F.linear(x, self.weight, self.bias)  # (..., out / p)
        return gather_from_parallel_region(y, self.process_group) if self.gather_output else y


class RowParallelLinear(_ParallelLinear):
    """y = x W^T + b with W split by input features; input (..., in) or (..., in/p), output (..., out)."""

    weight_shard_dim = 1
    bias_is_sharded = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        input_is_parallel: bool = False,
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, process_group, device, dtype)
        self.input_is_parallel = input_is_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_parallel_region(x, self.process_group)  # (..., in) -> (..., in / p)
        partial = F.linear(x, self.weight)  # (..., out), this rank's share of the sum over input features
        y = reduce_from_parallel_region(partial, self.process_group)
        # The bias is replicated: every rank adds it once after the sum and computes the same bias gradient.
        return y if self.bias is None else y + self.bias
