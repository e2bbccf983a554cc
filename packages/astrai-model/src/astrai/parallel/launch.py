"""`spawn_parallel_fn`: run a function on every rank of a fresh process group and collect the results.

Three ways to run, chosen from the situation:
- under `torchrun` (RANK and WORLD_SIZE in the environment): this process is already one rank, so the
  function runs here inside `setup_parallel` and nothing is spawned;
- `world_size == 1`: the function runs here, in-process, without a process group;
- otherwise `world_size` processes are started (`torch.multiprocessing`), each joins the group on a free
  port and runs the function. When a rank raises, the others are terminated (no rank is left waiting in a
  collective) and the caller gets a `RuntimeError` naming the rank and carrying its traceback.

Each rank's return value is saved with `torch.save` to a temporary folder and loaded by the caller after
all ranks have finished (a pipe would block a rank that returns more than the pipe buffer).
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from astrai.parallel.setup import setup_parallel


def _free_port(host: str) -> int:
    """A TCP port that is free on `host` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _run_rank(
    rank: int,
    func: Callable[..., Any],
    kwargs: dict[str, Any],
    group_kwargs: dict[str, Any],
    results_dir: str,
    start_method: str,
) -> None:
    """Body of one spawned rank (torch.multiprocessing passes the rank first)."""
    if start_method == "fork":
        # libgomp's thread pool does not survive fork: a forked child that runs a multi-threaded op after the
        # parent has used OpenMP deadlocks. One intra-op thread per rank avoids it.
        torch.set_num_threads(1)
    with setup_parallel(rank, **group_kwargs):
        try:
            result = func(**kwargs)
        except BaseException:
            # The first rank to fail is the cause; its peers then fail in collectives ("connection reset"), and
            # the one the parent notices first is not necessarily the cause. Record when each failed, before
            # leaving the group (which is what makes the peers fail).
            (Path(results_dir) / f"rank{rank}.error").write_text(f"{time.time_ns()}\n{traceback.format_exc()}")
            raise
    torch.save(result, Path(results_dir) / f"rank{rank}.pt")


def _first_failure(results_dir: str) -> tuple[int, str] | None:
    """(rank, traceback) of the rank that failed first, from the error files ranks left behind."""
    failures = []
    for path in Path(results_dir).glob("rank*.error"):
        stamp, _, text = path.read_text().partition("\n")
        failures.append((int(stamp), int(path.stem.removeprefix("rank")), text))
    if not failures:
        return None
    _, rank, text = min(failures)
    return rank, text


def spawn_parallel_fn(
    func: Callable[..., Any],
    world_size: int,
    backend: str = "gloo",
    master_addr: str = "localhost",
    master_port: int | str | None = None,
    device_type: str = "cpu",
    start_method: str = "spawn",
    timeout: float | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run `func(**kwargs)` on every rank; returns the results of the ranks run by this process, by rank.

    That is every rank's result when this call spawned them, and only this process's under torchrun.
    With start_method "spawn" (the default) `func` and `kwargs` must be picklable and `func` importable by
    name; "fork" is much faster to start and runs one intra-op thread per rank. `timeout` (seconds) bounds
    every collective. Results must be loadable with `torch.load(weights_only=False)`.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    group_kwargs = dict(backend=backend, master_addr=master_addr, device_type=device_type, timeout=timeout)

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if int(os.environ["WORLD_SIZE"]) != world_size:
            raise ValueError(
                f"world_size={world_size} but this process runs under WORLD_SIZE={os.environ['WORLD_SIZE']}"
            )
        # torchrun's rendezvous address (MASTER_ADDR / MASTER_PORT) rules; setup_parallel reads it.
        group_kwargs.update(master_addr=None)
        with setup_parallel(None, world_size, **group_kwargs):
            return [func(**kwargs)]

    if world_size == 1:
        with setup_parallel(0, 1, **group_kwargs):
            return [func(**kwargs)]

    group_kwargs.update(world_size=world_size, master_port=master_port or _free_port(master_addr))
    with tempfile.TemporaryDirectory(prefix="astrai-spawn-") as results_dir:
        try:
            mp.start_processes(
                _run_rank,
                args=(func, kwargs, group_kwargs, results_dir, start_method),
                nprocs=world_size,
                join=True,
                start_method=start_method,
            )
        except mp.ProcessRaisedException as e:
            rank, message = _first_failure(results_dir) or (e.error_index, e.msg)
            raise RuntimeError(f"rank {rank} raised an exception:\n{message.strip()}") from e
        except mp.ProcessExitedException as e:
            raise RuntimeError(f"rank {e.error_index} died: {e}") from e
        return [torch.load(Path(results_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
