"""Process groups, rank helpers and launching: in-process, forked and spawned ranks, and torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

from astrai.parallel import (
    get_current_device,
    get_local_rank,
    get_rank,
    get_world_size,
    only_on_rank,
    setup_parallel,
    spawn_parallel_fn,
)

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def no_launcher_environment(monkeypatch):
    """Tests start outside any launcher, whatever the shell running pytest has set."""
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)


def describe_rank(scale: int) -> dict:
    total = torch.tensor([float(get_rank() + 1) * scale])
    dist.all_reduce(total)
    return dict(
        rank=get_rank(),
        world_size=get_world_size(),
        local_rank=get_local_rank(),
        device=get_current_device(),
        env_rank=os.environ["RANK"],
        total=total.item(),
    )


def test_helpers_outside_any_group():
    assert (get_rank(), get_world_size(), get_local_rank()) == (0, 1, 0)
    assert get_current_device() == ("cuda:0" if torch.cuda.is_available() else "cpu")


@pytest.mark.timeout(60)
def test_spawn_fork_runs_every_rank_in_one_group():
    results = spawn_parallel_fn(describe_rank, world_size=2, start_method="fork", timeout=30, scale=10)
    assert results == [
        dict(rank=0, world_size=2, local_rank=0, device="cpu", env_rank="0", total=30.0),
        dict(rank=1, world_size=2, local_rank=1, device="cpu", env_rank="1", total=30.0),
    ]
    assert not dist.is_initialized() and "RANK" not in os.environ  # nothing leaks into the caller


@pytest.mark.slow  # two fresh interpreters import torch
@pytest.mark.timeout(90)
def test_spawn_start_method_with_an_importable_function():
    assert spawn_parallel_fn(get_world_size, world_size=2) == [2, 2]


def test_world_size_one_runs_in_process_without_a_group():
    seen = []

    def record(value):
        seen.append((value, dist.is_initialized(), get_world_size(), os.environ["LOCAL_RANK"]))
        return value * 2

    assert spawn_parallel_fn(record, world_size=1, value=21) == [42]
    assert seen == [(21, False, 1, "0")]
    assert "LOCAL_RANK" not in os.environ


def failing_rank() -> None:
    if get_rank() == 1:
        raise ValueError("boom from rank 1")
    dist.barrier()  # rank 0 waits for a peer that never comes: it must be terminated, not left hanging


@pytest.mark.timeout(60)
def test_a_failing_rank_propagates_its_traceback_without_hanging():
    with pytest.raises(RuntimeError, match="rank 1 raised an exception") as info:
        spawn_parallel_fn(failing_rank, world_size=2, start_method="fork", timeout=30)
    message = str(info.value)
    assert "Traceback" in message and "ValueError: boom from rank 1" in message and "failing_rank" in message


def rank_plus_one() -> int:
    return get_rank() + 1


def only_rank_one() -> tuple:
    synced = only_on_rank(1, sync=True)(rank_plus_one)
    plain = only_on_rank(0)(rank_plus_one)
    return synced(), plain()


@pytest.mark.timeout(60)
def test_only_on_rank():
    assert spawn_parallel_fn(only_rank_one, world_size=2, start_method="fork", timeout=30) == [(None, 1), (2, None)]
    assert only_on_rank(0)(rank_plus_one)() == 1  # no group: this process is rank 0
    assert only_on_rank(1, sync=True)(rank_plus_one)() is None


def test_setup_parallel_single_rank_sets_and_restores_environment():
    with setup_parallel(0, 1) as group:
        assert group is None
        assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("0", "1", "0")
        assert get_current_device() == "cpu"  # the requested device type, even on a CUDA machine
    assert not any(name in os.environ for name in TORCHRUN_VARS)


def test_setup_parallel_reads_the_torchrun_environment(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with setup_parallel() as group:
        assert group is None and get_local_rank() == 0
    assert os.environ["RANK"] == "0"  # torchrun's own variables are left as they were


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(rank=0, world_size=2, device_type="tpu"), "device_type must be one of"),
        (dict(rank=0, world_size=2, backend="nccl"), "backend='nccl' needs device_type='cuda'"),
        (dict(rank=2, world_size=2, master_port=1234), r"rank must be in \[0, world_size=2\), got 2"),
        (dict(world_size=2), "rank was not given and the environment variable RANK is not set"),
        (dict(rank=0, world_size=2), "master_port was not given and the environment variable MASTER_PORT"),
    ],
)
def test_setup_parallel_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        with setup_parallel(**kwargs):
            pass


def test_spawn_rejects_bad_world_size(monkeypatch):
    with pytest.raises(ValueError, match="world_size must be >= 1, got 0"):
        spawn_parallel_fn(rank_plus_one, world_size=0)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="world_size=2 but this process runs under WORLD_SIZE=4"):
        spawn_parallel_fn(rank_plus_one, world_size=2)


TORCHRUN_SCRIPT = """
    import json, sys, torch, torch.distributed as dist
    from astrai.parallel import get_current_device, get_local_rank, get_rank, get_world_size, spawn_parallel_fn

    def work(scale):
        total = torch.tensor([float(get_rank() + 1) * scale])
        dist.all_reduce(total)
        return [get_rank(), get_world_size(), get_local_rank(), get_current_device(), total.item()]

    # one write per line: both ranks share the pipe, and print() writes the text and the newline separately
    sys.stdout.write("RESULT " + json.dumps(spawn_parallel_fn(work, world_size=2, scale=10)) + "\\n")
    sys.stdout.flush()
"""


@pytest.mark.slow  # torchrun's agent and two workers import torch
@pytest.mark.timeout(120)
def test_spawn_parallel_fn_under_torchrun(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(TORCHRUN_SCRIPT))
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS} | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = sorted(line for line in done.stdout.splitlines() if line.startswith("RESULT"))
    assert lines == ['RESULT [[0, 2, 0, "cpu", 30.0]]', 'RESULT [[1, 2, 1, "cpu", 30.0]]']


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_follows_the_local_rank():
    with setup_parallel(0, 1, device_type="cuda"):
        assert get_current_device() == "cuda:0" and torch.cuda.current_device() == 0
