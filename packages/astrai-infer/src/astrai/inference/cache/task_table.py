"""`TaskTable`: each live task's page table (logical page -> physical page) and its prefix-cache hit count."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


class TaskTable:
    """Page tables of the tasks that currently hold KV pages."""

    def __init__(self) -> None:
        self._pages: dict[str, list[int]] = {}
        self._cached: dict[str, int] = {}  # prompt tokens served from the prefix cache

    def __contains__(self, task_id: str) -> bool:
        return task_id in self._pages

    def __len__(self) -> int:
        return len(self._pages)

    def __iter__(self) -> Iterator[str]:
        return iter(self._pages)

    def set(self, task_id: str, page_table: list[int], cached: int) -> None:
        if task_id in self._pages:
            raise ValueError(f"task_id={task_id!r}: already holds KV pages")
        self._pages[task_id] = page_table
        self._cached[task_id] = cached

    def get(self, task_id: str) -> list[int]:
        """A copy of the task's page table."""
        return list(self._pages[task_id])

    def get_ref(self, task_id: str) -> list[int]:
        """The task's live page table (the cache appends to it when the task grows)."""
        return self._pages[task_id]

    def get_cached(self, task_id: str) -> int:
        return self._cached[task_id]

    def pop(self, task_id: str) -> tuple[list[int], int]:
        return self._pages.pop(task_id), self._cached.pop(task_id)

    def table_tensor(self, task_ids: Sequence[str], device: torch.device | str | None = None) -> torch.Tensor:
        """int64 (B, max_pages) page tables of `task_ids`, right-padded with -1."""
        tables = [self._pages[t] for t in task_ids]
        width = max((len(t) for t in tables), default=0)
        padded = [t + [-1] * (width - len(t)) for t in tables]
        return torch.tensor(padded, dtype=torch.int64, device=device).view(len(tables), width)
