"""`KVCache`: the paged KV cache the inference loop talks to (pages, prefix reuse, page tables, views).

It combines a `PagePool` (reference-counted physical pages, LRU of reusable pages, exact-prefix index), a
`Storage` (the page tensors) and a `TaskTable` (each task's logical -> physical page list). Per step the
loop binds the batch's page tables (`bind_tasks`, padded or packed) into a `KvcacheView` and hands it to the
model as `paged_cache`.

Life of a task's pages:
1. `task_alloc(task_id, prompt_ids)` takes the longest cached prefix (whole pages, exact tokens) and fresh
   pages for the rest of the prompt, all or nothing. The last prompt token is never served from the cache,
   so the model always computes logits for it: at most `(len(prompt) - 1) // page_size` pages are reused.
2. After the prompt's KV is written, `task_record_hashes` indexes the task's full prompt pages so later
   tasks can reuse them. Shared pages are read-only: a task writes only positions >= its cached length,
   which always fall in pages it allocated itself.
3. `task_extend(task_id, pos)` grows the page table before position `pos` is written.
4. `task_free(task_id)` drops the task's references; indexed pages stay cached (LRU) until space is needed.

Not thread-safe: the inference loop owns the cache and is the only caller.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from astrai.config import AutoRegressiveLMConfig
from astrai.inference.cache.page_pool import PagePool
from astrai.inference.cache.storage import Storage, cache_entry_shapes
from astrai.inference.cache.task_table import TaskTable
from astrai.inference.cache.view import KvcacheView, in_place_supported


class KVCache:
    """Paged KV cache with exact-prefix page reuse, shared by the tasks of one inference loop."""

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        k_shape: tuple[int, ...],
        v_shape: tuple[int, ...],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        self._storage = Storage(num_layers, num_pages, page_size, k_shape, v_shape, dtype, device)
        self._pool = PagePool(num_pages, page_size)
        self._table = TaskTable()
        self.page_size = page_size

    @classmethod
    def from_config(
        cls,
        config: AutoRegressiveLMConfig,
        num_pages: int,
        page_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """A cache whose entries fit `config`'s attention (GQA: per-head K/V; MLA: latent + RoPE key)."""
        k_shape, v_shape = cache_entry_shapes(config)
        return cls(config.n_layers, num_pages, page_size, k_shape, v_shape, dtype, device)

    @property
    def storage(self) -> Storage:
        return self._storage

    @property
    def num_pages(self) -> int:
        return self._pool.num_pages

    @property
    def num_free_pages(self) -> int:
        """Pages holding nothing."""
        return self._pool.num_free

    @property
    def num_cached_pages(self) -> int:
        """Unreferenced pages kept for prefix reuse (evicted when space is needed)."""
        return self._pool.num_cached

    @property
    def num_used_pages(self) -> int:
        """Pages referenced by at least one task."""
        return self._pool.num_in_use

    @property
    def num_available_pages(self) -> int:
        """Pages that allocation can still hand out (free plus cached)."""
        return self._pool.num_available

    def pages_for(self, num_tokens: int) -> int:
        """Pages needed to hold `num_tokens` positions."""
        return -(-num_tokens // self.page_size)

    def task_alloc(self, task_id: str, prompt_ids: Sequence[int]) -> bool:
        """Pages for the prompt, reusing cached prefix pages; False, with nothing changed, if pages are short."""
        if task_id in self._table:
            raise ValueError(f"task_id={task_id!r}: already holds KV pages")
        if len(prompt_ids) == 0:
            raise ValueError(f"task_id={task_id!r}: prompt_ids is empty")
        max_hits = (len(prompt_ids) - 1) // self.page_size  # keep the last prompt token uncached
        got = self._pool.acquire(prompt_ids, max_hits, self.pages_for(len(prompt_ids)))
        if got is None:
            return False
        pages, hits = got
        self._table.set(task_id, pages, hits * self.page_size)
        return True

    def task_free(self, task_id: str) -> None:
        """Release every page of the task; indexed prompt pages stay cached for reuse."""
        pages, _ = self._table.pop(task_id)
        # Deepest page first, so it reaches the LRU first and is evicted before the pages its prefix needs.
        for page in reversed(pages):
            self._pool.free(page)

    def task_extend(self, task_id: str, pos: int) -> bool:
        """Make the task's pages cover positions `0..pos`; False, with nothing changed, if pages are short."""
        return self._pool.grow(self._table.get_ref(task_id), pos // self.page_size + 1)

    def task_cached(self, task_id: str) -> int:
        """Prompt tokens whose KV came from the prefix cache (their positions need no prefill)."""
        return self._table.get_cached(task_id)

    def task_pages(self, task_id: str) -> list[int]:
        return self._table.get(task_id)

    def task_record_hashes(self, task_id: str, prompt_ids: Sequence[int], start_logical_page: int = 0) -> None:
        """Index the task's full pages of `prompt_ids` (the prompt, and generated tokens if wanted) from
        `start_logical_page` on, so later tasks can reuse them. Call it once the KV of those tokens is written.

        Costs one walk over `token_ids`, so calling it after every prefill chunk is fine. Pages whose prefix
        another page already holds are not indexed (the other page serves it).
        """
        self._pool.record_pages(self._table.get_ref(task_id), prompt_ids, start_logical_page)

    def make_table_tensor(self, task_ids: Sequence[str], device: torch.device | str | None = None) -> torch.Tensor:
        """int64 (B, max_pages) page tables of `task_ids`, right-padded with -1 (default: the cache's device)."""
        return self._table.table_tensor(task_ids, self._storage.device if device is None else device)

    def bind(
        self,
        page_table: torch.Tensor,
        total_len: torch.Tensor | int,
        new_lens: torch.Tensor | None = None,
        max_len: int | None = None,
    ) -> KvcacheView:
        """A view for one step: row b ends at `total_len[b]` (one int: every row) after writing `new_lens[b]`
        new entries (None: every row writes the whole width T of the step's `k` and `v`, so they end at
        `total_len`, as a batch of equal rows does).

        The page tables must cover every row's positions (see `bind_tasks` for a checked version); `max_len`
        is max(total_len) when known.
        """
        return KvcacheView(self._storage, page_table, total_len, new_lens, max_len)

    @property
    def packs_steps(self) -> bool:
        """Whether steps can be bound `packed` (one unpadded row of tokens; `KvcacheView`): the paged
        attention kernel serves this cache."""
        return in_place_supported(self._storage)

    def bind_tasks(
        self,
        task_ids: Sequence[str],
        start_positions: Sequence[int],
        new_lens: Sequence[int],
        packed: bool = False,
    ) -> KvcacheView:
        """A view for one step where task `task_ids[b]` writes `new_lens[b]` entries from `start_positions[b]`;
        `packed`: the model gets the step's tokens as one unpadded row (needs `packs_steps`)."""
        if not len(task_ids) == len(start_positions) == len(new_lens):
            raise ValueError(
                f"task_ids, start_positions and new_lens differ in length: "
                f"{len(task_ids)}, {len(start_positions)}, {len(new_lens)}"
            )
        for task_id, start, n in zip(task_ids, start_positions, new_lens, strict=True):
            if start < 0 or n < 0:
                raise ValueError(f"task_id={task_id!r}: start_position={start} and new_len={n} must be >= 0")
            held = len(self._table.get_ref(task_id)) * self.page_size
            if start + n > held:
                raise ValueError(f"task_id={task_id!r}: positions up to {start + n - 1} exceed its {held} slots")
        device = self._storage.device
        totals = [s + n for s, n in zip(start_positions, new_lens, strict=True)]
        total = torch.tensor(totals, dtype=torch.int64, device=device)
        new = torch.tensor(list(new_lens), dtype=torch.int64, device=device)
        table = self.make_table_tensor(task_ids)
        if packed:
            rows = list(zip(start_positions, new_lens, strict=True))
            return KvcacheView(self._storage, table, total, new, max(totals, default=0), packed_rows=rows)
        return self.bind(table, total, new, max(totals, default=0))

    def reset_prefix_cache(self) -> None:
        """Never reuse KV computed so far for new tasks (call after the model's weights changed)."""
        self._pool.reset_prefix_cache()

    def check_invariants(self) -> None:
        """Raise AssertionError unless pages are consistently free, cached or in use by the listed tasks."""
        self._pool.check_invariants()
        refs = Counter(p for task_id in self._table for p in self._table.get_ref(task_id))
        for page in range(self.num_pages):
            if self._pool.ref_count(page) != refs[page]:
                raise AssertionError(
                    f"page {page}: ref count {self._pool.ref_count(page)} but {refs[page]} task references"
                )
        for task_id in self._table:
            pages = self._table.get_ref(task_id)
            if len(set(pages)) != len(pages):
                raise AssertionError(f"task {task_id!r} lists a page twice: {pages}")
            if self._table.get_cached(task_id) > (len(pages) - 1) * self.page_size:
                raise AssertionError(f"task {task_id!r} has more cached tokens than its shared pages hold")
