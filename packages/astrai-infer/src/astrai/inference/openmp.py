"""Handing back a thread's OpenMP worker pool, so that a waiting thread's idle workers never slow the engine.

An OpenMP runtime keeps a pool of worker threads for every thread that has run a parallel region. GNU OpenMP
(the runtime of torch's Linux wheels) counts all of them, and once a process holds more than it has CPUs it cuts
its busy-wait to about a hundred spins, so every parallel region must wake sleeping workers. A caller's pool plus
the engine loop's pool is enough to cross that line: on a 2-core machine the loop's forward ran 1.5x (prefill)
to 2x (batch-1 decode) slower than the same forward with one pool. The engine therefore releases the loop's pool
whenever the loop goes idle, and the submitting thread's pool when a request arrives (that thread is about to
wait for the engine); a thread that computes again simply gets a new pool.

`release_thread_pool()` calls `omp_pause_resource_all` (OpenMP 5.0) of the runtime torch loaded; where torch
has none or the runtime lacks the call it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
from pathlib import Path

import torch

_OMP_PAUSE_SOFT = 1  # omp_pause_soft: free the calling thread's pool, keep the runtime usable


@functools.cache
def _pause_resource_all() -> Callable[[int], int] | None:
    if not torch.backends.openmp.is_available():
        return None
    lib_dir = Path(torch.__file__).parent / "lib"
    for path in sorted(lib_dir.glob("lib*omp*")):
        try:  # RTLD_NOLOAD: only the runtime torch already runs, never a second copy
            lib = ctypes.CDLL(str(path), mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        except (OSError, AttributeError):
            continue
        pause = getattr(lib, "omp_pause_resource_all", None)
        if pause is not None:
            pause.argtypes = [ctypes.c_int]
            pause.restype = ctypes.c_int
            return pause
    return None


def release_thread_pool() -> bool:
    """Free the calling thread's OpenMP worker pool; True if the runtime did."""
    pause = _pause_resource_all()
    return pause is not None and pause(_OMP_PAUSE_SOFT) == 0
