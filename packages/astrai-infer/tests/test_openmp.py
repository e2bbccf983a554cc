"""Idle threads hand back their OpenMP worker pools: the real runtime call, and where the engine makes it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import astrai.inference.scheduler as scheduler_module
from astrai.inference import InferenceScheduler, TaskManager


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one intra-op thread: no OpenMP worker pool to release")
def test_release_thread_pool_ends_the_callers_workers():
    # A fresh process, so no other test's threads are counted.
    script = textwrap.dedent(
        """
        import os, torch
        from astrai.inference.openmp import release_thread_pool
        threads = lambda: len(os.listdir("/proc/self/task"))
        before = threads()
        torch.ones(4_000_000).exp_()  # large enough to run as a parallel region
        during = threads()
        released = release_thread_pool()
        print(before, during, threads(), released)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    before, during, after, released = out.stdout.split()
    if released != "True":
        pytest.skip("torch's OpenMP runtime has no omp_pause_resource_all")
    assert int(during) > int(before) and int(after) == int(before)


def test_wait_for_work_runs_on_idle_only_before_sleeping(tokenizer):
    manager = TaskManager(tokenizer, max_queue=4)
    calls = []
    manager.wake()
    manager.wait_for_work(on_idle=lambda: calls.append("idle"))  # work pending: returns at once
    assert calls == []
    waiter = threading.Thread(target=manager.wait_for_work, kwargs={"on_idle": lambda: calls.append("idle")})
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and calls == ["idle"]
    manager.wake()
    waiter.join(5)
    assert not waiter.is_alive() and calls == ["idle"]


def test_scheduler_releases_the_submitters_and_its_own_idle_pool(model, tokenizer, monkeypatch):
    sched = InferenceScheduler(model, tokenizer, max_seq_len=64)
    released = []  # (thread, requests finished by then)

    def record():
        released.append((threading.current_thread(), sched.get_stats()["requests_finished"]))

    monkeypatch.setattr(scheduler_module, "release_thread_pool", record)
    sched.start()
    try:
        done = threading.Event()
        sched.add_task([5, 6, 7], max_tokens=2, temperature=0.0, stream_callback=lambda e: e.finished and done.set())
        assert done.wait(30)
        assert (threading.current_thread(), 0) in released  # the caller, at submission
        for _ in range(500):  # the loop, when it goes idle after finishing the request
            if (sched._loop_thread, 1) in released:
                break
            time.sleep(0.01)
        assert (sched._loop_thread, 1) in released
    finally:
        sched.stop()
