"""Process-group setup and rank helpers, shared by training and inference.

`setup_parallel` joins (and on exit destroys) the default process group of one rank. It takes rank,
world size and rendezvous address from its arguments or, when they are left out, from the variables
`torchrun` sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), and it sets those variables
for the rank's lifetime so that code reading them sees the same values.

Devices: with `device_type="cuda"` a rank computes on `cuda:<local rank>`; only nccl is handed a
`device_id` (eager NCCL init). gloo on CPU never touches CUDA. `get_current_device()` works anywhere:
inside `setup_parallel` it honours the requested device type, outside it is the local CUDA device when
there is one, else "cpu".
"""

from __future__ import annotations

import datetime
import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist

F = TypeVar("F", bound=Callable[..., Any])

DEVICE_TYPES = ("cpu", "cuda")
# The device type requested by the enclosing setup_parallel of this process (None outside one).
_device_type: str | None = None


def get_rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank in `group` (default: the world); 0 without a process group."""
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def get_world_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of ranks in `group` (default: the world); 1 without a process group."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def get_local_rank() -> int:
    """Rank within this node (LOCAL_RANK, set by torchrun and by `setup_parallel`); 0 when unset."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def get_current_device() -> str:
    """The device this rank computes on: "cpu" or "cuda:<local rank>"."""
    device_type = _device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    return "cpu" if device_type == "cpu" else f"{device_type}:{get_local_rank()}"


def _env_int(name: str, value: int | str | None) -> int:
    if value is not None:
        return int(value)
    if name not in os.environ:
        raise ValueError(f"{name.lower()} was not given and the environment variable {name} is not set")
    return int(os.environ[name])


@contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore the previous values."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


@contextmanager
def setup_parallel(
    rank: int | None = None,
    world_size: int | None = None,
    backend: str = "gloo",
    master_addr: str | None = None,
    master_port: int | str | None = None,
    device_type: str = "cpu",
    timeout: float | None = None,
) -> Iterator[dist.ProcessGroup | None]:
    """Run the block as one rank of a process group; yields the world group (None when world_size is 1).

    Arguments left as None come from the torchrun environment (MASTER_ADDR defaults to "localhost").
    `timeout` (seconds) bounds every collective, so a rank waiting for a dead peer fails instead of
    hanging. If a default group already exists it is yielded as is and left alone on exit.
    """
    global _device_type
    if device_type not in DEVICE_TYPES:
        raise ValueError(f"device_type must be one of {DEVICE_TYPES}, got {device_type!r}")
    if backend == "nccl" and device_type != "cuda":
        raise ValueError(f"backend='nccl' needs device_type='cuda', got {device_type!r}")
    if dist.is_initialized():
        yield dist.group.WORLD
        return

    rank = _env_int("RANK", rank)
    world_size = _env_int("WORLD_SIZE", world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    # Under torchrun LOCAL_RANK differs from RANK on every node but the first; a single-node spawn has none.
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    env = {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(local_rank)}
    if world_size > 1:
        env["MASTER_ADDR"] = master_addr or os.environ.get("MASTER_ADDR", "localhost")
        env["MASTER_PORT"] = str(_env_int("MASTER_PORT", master_port))

    previous_device_type, _device_type = _device_type, device_type
    try:
        with _environ(**env):
            if device_type == "cuda":
                torch.cuda.set_device(local_rank)
            if world_size == 1:
                yield None
                return
            dist.init_process_group(
                backend=backend,
                init_method=f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}",
                rank=rank,
                world_size=world_size,
                timeout=None if timeout is None else datetime.timedelta(seconds=timeout),
                # Binding a device makes NCCL initialise eagerly on the right GPU; gloo must not get one.
                device_id=torch.device("cuda", local_rank) if backend == "nccl" else None,
            )
            try:
                yield dist.group.WORLD
            finally:
                dist.destroy_process_group()
    finally:
        _device_type = previous_device_type


def only_on_rank(rank: int, sync: bool = False) -> Callable[[F], F]:
    """Decorator: run the function on `rank` only (other ranks get None); `sync` adds a barrier after it."""

    def decorator(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            result = func(*args, **kwargs) if get_rank() == rank else None
            if sync and get_world_size() > 1:
                dist.barrier()
            return result

        return wrapper  # type: ignore[return-value]

    return decorator
