"""`Allocator`: bookkeeping of physical KV pages (reference counts, free pages, LRU of cached pages).

Every physical page is in exactly one of three states:

- **free**: reference count 0, holds nothing worth keeping; handed out first by `alloc()`.
- **cached**: reference count 0 but still holds reusable prefix content (the prefix cache knows it); kept in an
  LRU (oldest first) and evicted, oldest first, only when no free page is left.
- **in use**: reference count >= 1 (one per task whose page table lists it).

The allocator knows nothing about content: whoever frees a page says whether to keep it cached, and
`on_evict(idx)` is called when a cached page is reclaimed so the prefix cache can forget it.

Not thread-safe: the inference loop owns the cache and is the only caller.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable


class Allocator:
    """Reference-counted pool of `num_pages` physical pages with an LRU of cached (reusable) pages."""

    def __init__(self, num_pages: int, on_evict: Callable[[int], None] | None = None):
        if isinstance(num_pages, bool) or not isinstance(num_pages, int) or num_pages < 1:
            raise ValueError(f"num_pages={num_pages!r}: must be a positive integer")
        self.num_pages = num_pages
        self.on_evict = on_evict
        self._refs = [0] * num_pages
        # Bit i set: page i is free. The lowest set bit is the next page handed out, so allocation order is
        # deterministic (lowest id first); a Python int does this in a few word operations per call.
        self._free_mask = (1 << num_pages) - 1
        # Cached pages with ref 0, least recently used first; values unused.
        self._lru: OrderedDict[int, None] = OrderedDict()

    @property
    def num_free(self) -> int:
        return self._free_mask.bit_count()

    @property
    def num_cached(self) -> int:
        return len(self._lru)

    @property
    def num_in_use(self) -> int:
        return self.num_pages - self.num_free - self.num_cached

    @property
    def num_available(self) -> int:
        """Pages `alloc()` can still hand out: free ones plus evictable cached ones."""
        return self.num_free + self.num_cached

    def is_cached(self, idx: int) -> bool:
        return idx in self._lru

    def alloc(self) -> int:
        """A page with reference count 1: the lowest free page, else the least recently used cached page."""
        if self._free_mask:
            lowest = self._free_mask & -self._free_mask
            idx = lowest.bit_length() - 1
            self._free_mask ^= lowest
        elif self._lru:
            idx, _ = self._lru.popitem(last=False)
            if self.on_evict is not None:
                self.on_evict(idx)
        else:
            raise RuntimeError(f"no KV page left: all {self.num_pages} pages are in use")
        self._refs[idx] = 1
        return idx

    def free(self, idx: int, keep_cached: bool = False) -> None:
        """Drop one reference; at zero the page becomes cached (MRU end of the LRU) or free."""
        if self._refs[idx] <= 0:
            raise RuntimeError(f"page {idx} freed while not in use (double free)")
        self._refs[idx] -= 1
        if self._refs[idx] == 0:
            if keep_cached:
                self._lru[idx] = None
            else:
                self._release(idx)

    def inc_ref(self, idx: int) -> None:
        """Add a reference to an in-use page, or revive a cached page (it leaves the LRU)."""
        if self._free_mask >> idx & 1:
            raise RuntimeError(f"page {idx} is free: it holds nothing to share")
        self._lru.pop(idx, None)
        self._refs[idx] += 1

    def touch(self, idx: int) -> None:
        """Mark a cached page as recently used; a page that is not an LRU resident is left alone."""
        if idx in self._lru:
            self._lru.move_to_end(idx)

    def uncache(self, idx: int) -> None:
        """A cached page whose content became unreachable goes straight back to the free pages."""
        if idx in self._lru:
            del self._lru[idx]
            self._release(idx)

    def ref_count(self, idx: int) -> int:
        return self._refs[idx]

    def check_invariants(self) -> None:
        """Raise AssertionError unless free, cached and in-use pages partition the pool consistently."""
        free = set(self.free_pages())
        cached = set(self._lru)
        in_use = {i for i, r in enumerate(self._refs) if r > 0}
        _check(self._free_mask >> self.num_pages == 0, "the free mask marks pages past the pool")
        _check(not free & cached and not free & in_use and not cached & in_use, "a page is in two states")
        _check(len(free) + len(cached) + len(in_use) == self.num_pages, "a page is in no state")
        _check(all(r >= 0 for r in self._refs), "negative reference count")

    def free_pages(self) -> list[int]:
        """The free pages, lowest first."""
        return [i for i in range(self.num_pages) if self._free_mask >> i & 1]

    def _release(self, idx: int) -> None:
        self._free_mask |= 1 << idx


def _check(condition: bool, message: str) -> None:
    # Explicit raise rather than `assert`: invariant checks must also run under `python -O`.
    if not condition:
        raise AssertionError(message)
