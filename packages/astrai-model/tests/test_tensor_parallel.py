"""Tensor-parallel layers on two real gloo ranks against the unsharded `nn.Linear` / dense MLP.

Each rank returns its outputs and gradients; the test process computes the dense reference from the same
seed and checks that the shards tile it (forward, input gradient, weight and bias gradients).
Ranks are forked (fast; test functions are not importable by name under --import-mode=importlib).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from astrai.parallel import (
    ColumnParallelLinear,
    ParallelModel,
    RowParallelLinear,
    get_rank,
    spawn_parallel_fn,
)

TOL = dict(rtol=0, atol=1e-6)
IN, OUT, HIDDEN = 8, 6, 16


def run_on_two_ranks(func, **kwargs):
    return spawn_parallel_fn(func, world_size=2, start_method="fork", timeout=30, **kwargs)


def dense_reference(in_features: int, out_features: int):
    """nn.Linear, input and output gradient drawn in the order the rank functions draw them."""
    torch.manual_seed(0)
    dense = nn.Linear(in_features, out_features)
    x = torch.randn(3, 4, in_features, requires_grad=True)
    grad_out = torch.randn(3, 4, out_features)
    y = dense(x)
    y.backward(grad_out)
    return dense, x, y.detach()


def column_rank(gather_output: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    layer = ColumnParallelLinear(IN, OUT, gather_output=gather_output)
    x = torch.randn(3, 4, IN, requires_grad=True)
    grad_out = torch.randn(3, 4, OUT)
    if not gather_output:
        grad_out = grad_out.chunk(2, dim=-1)[get_rank()]
    y = layer(x)
    y.backward(grad_out)
    return dict(y=y.detach(), x_grad=x.grad, w=layer.weight.detach(), w_grad=layer.weight.grad, b_grad=layer.bias.grad)


def row_rank(input_is_parallel: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    layer = RowParallelLinear(IN, OUT, input_is_parallel=input_is_parallel)
    x = torch.randn(3, 4, IN)
    grad_out = torch.randn(3, 4, OUT)
    if input_is_parallel:
        x = x.chunk(2, dim=-1)[get_rank()].clone()
    x.requires_grad_(True)
    y = layer(x)
    y.backward(grad_out)
    return dict(y=y.detach(), x_grad=x.grad, w=layer.weight.detach(), w_grad=layer.weight.grad, b_grad=layer.bias.grad)


def mlp_rank() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    up = ColumnParallelLinear(IN, HIDDEN, gather_output=False)
    down = RowParallelLinear(HIDDEN, IN, input_is_parallel=True)
    x = torch.randn(3, 4, IN, requires_grad=True)
    grad_out = torch.randn(3, 4, IN)
    y = down(F.gelu(up(x)))  # (3, 4, IN), hidden (3, 4, HIDDEN / 2) per rank
    y.backward(grad_out)
    return dict(
        y=y.detach(), x_grad=x.grad, up_w_grad=up.weight.grad, up_b_grad=up.bias.grad, down_w_grad=down.weight.grad
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("gather_output", [True, False])
def test_column_parallel_matches_linear(gather_output):
    dense, x, y = dense_reference(IN, OUT)
    ranks = run_on_two_ranks(column_rank, gather_output=gather_output)

    for r, got in enumerate(ranks):
        assert torch.equal(got["w"], dense.weight.detach().chunk(2, dim=0)[r])  # nn.Linear's init, sharded
        torch.testing.assert_close(got["x_grad"], x.grad, **TOL)  # all-reduced over ranks
    outputs = [got["y"] for got in ranks]
    for out in outputs if gather_output else [torch.cat(outputs, dim=-1)]:
        torch.testing.assert_close(out, y, **TOL)
    torch.testing.assert_close(torch.cat([g["w_grad"] for g in ranks], dim=0), dense.weight.grad, **TOL)
    torch.testing.assert_close(torch.cat([g["b_grad"] for g in ranks], dim=0), dense.bias.grad, **TOL)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("input_is_parallel", [False, True])
def test_row_parallel_matches_linear(input_is_parallel):
    dense, x, y = dense_reference(IN, OUT)
    ranks = run_on_two_ranks(row_rank, input_is_parallel=input_is_parallel)

    for r, got in enumerate(ranks):
        assert torch.equal(got["w"], dense.weight.detach().chunk(2, dim=1)[r])
        torch.testing.assert_close(got["y"], y, **TOL)  # summed over ranks, full bias added once
        torch.testing.assert_close(got["b_grad"], dense.bias.grad, **TOL)  # replicated bias, same gradient
    x_grads = [got["x_grad"] for got in ranks]
    for x_grad in [torch.cat(x_grads, dim=-1)] if input_is_parallel else x_grads:
        torch.testing.assert_close(x_grad, x.grad, **TOL)
    torch.testing.assert_close(torch.cat([g["w_grad"] for g in ranks], dim=1), dense.weight.grad, **TOL)


@pytest.mark.timeout(60)
def test_column_row_mlp_matches_dense_mlp():
    torch.manual_seed(0)
    up, down = nn.Linear(IN, HIDDEN), nn.Linear(HIDDEN, IN)
    x = torch.randn(3, 4, IN, requires_grad=True)
    grad_out = torch.randn(3, 4, IN)
    y = down(F.gelu(up(x)))
    y.backward(grad_out)

    ranks = run_on_two_ranks(mlp_rank)

    for got in ranks:
        torch.testing.assert_close(got["y"], y.detach(), **TOL)
        torch.testing.assert_close(got["x_grad"], x.grad, **TOL)
    torch.testing.assert_close(torch.cat([g["up_w_grad"] for g in ranks], dim=0), up.weight.grad, **TOL)
    torch.testing.assert_close(torch.cat([g["up_b_grad"] for g in ranks], dim=0), up.bias.grad, **TOL)
    torch.testing.assert_close(torch.cat([g["down_w_grad"] for g in ranks], dim=1), down.weight.grad, **TOL)


def load_full_weight_rank() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    weight = torch.arange(24.0).reshape(OUT, 4)
    bias = torch.arange(6.0)
    column = ColumnParallelLinear(4, OUT, gather_output=False)
    column.load_full_weight(weight, bias)
    row = RowParallelLinear(4, OUT)
    row.load_full_weight(weight, bias)
    return column.weight.detach(), column.bias.detach(), row.weight.detach()


@pytest.mark.timeout(60)
def test_load_full_weight_takes_this_ranks_shard():
    weight = torch.arange(24.0).reshape(OUT, 4)
    (col0, bias0, row0), (col1, bias1, row1) = run_on_two_ranks(load_full_weight_rank)
    assert torch.equal(col0, weight[:3]) and torch.equal(col1, weight[3:])
    assert torch.equal(bias0, torch.arange(3.0)) and torch.equal(bias1, torch.arange(3.0, 6.0))
    assert torch.equal(row0, weight[:, :2]) and torch.equal(row1, weight[:, 2:])


def indivisible_rank() -> None:
    ColumnParallelLinear(IN, 5)


@pytest.mark.timeout(60)
def test_indivisible_shard_size_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"out_features=5 is not divisible by world_size=2"):
        run_on_two_ranks(indivisible_rank)


def test_single_process_layers_equal_nn_linear():
    """Without a process group the layers are one shard: the plain linear, collectives skipped."""
    torch.manual_seed(0)
    dense = nn.Linear(IN, OUT)
    x = torch.randn(5, IN)
    for cls in (ColumnParallelLinear, RowParallelLinear):
        torch.manual_seed(0)
        layer = cls(IN, OUT)
        assert (layer.rank, layer.world_size) == (0, 1)
        assert torch.equal(layer.weight, dense.weight) and torch.equal(layer.bias, dense.bias)
        torch.testing.assert_close(layer(x), dense(x), rtol=0, atol=0)


def test_load_full_weight_validates_shapes():
    layer = ColumnParallelLinear(IN, OUT)
    with pytest.raises(ValueError, match=r"weight must have shape \(6, 8\), got \(8, 6\)"):
        layer.load_full_weight(torch.zeros(IN, OUT), torch.zeros(OUT))
    with pytest.raises(ValueError, match="bias is required"):
        layer.load_full_weight(torch.zeros(OUT, IN))
    no_bias = RowParallelLinear(IN, OUT, bias=False)
    no_bias.load_full_weight(torch.ones(OUT, IN))
    assert no_bias.bias is None and torch.equal(no_bias.weight, torch.ones(OUT, IN))


def test_parallel_model_shard_without_group():
    model = ParallelModel()
    full = torch.arange(6)
    assert torch.equal(model.shard(full, 0), full)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_layers_on_cuda_match_nn_linear():
    torch.manual_seed(0)
    dense = nn.Linear(IN, OUT, device="cuda")
    torch.manual_seed(0)
    layer = ColumnParallelLinear(IN, OUT, device="cuda")
    x = torch.randn(5, IN, device="cuda")
    assert torch.equal(layer.weight, dense.weight)
    torch.testing.assert_close(layer(x), dense(x))
