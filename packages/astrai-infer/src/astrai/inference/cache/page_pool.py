"""`PagePool`: the `Allocator` and the `PrefixCache` kept consistent with each other.

Rules it enforces:
- a page that is freed to reference count 0 stays cached only if the prefix cache indexes it;
- a cached page that the allocator reclaims is forgotten by the prefix cache, and so are the pages cached
  below it (their prefix became incomplete); those that sit unreferenced in the LRU go back to the free pages;
- `acquire` looks up a prefix, takes references on the hits and allocates the remaining pages as one step,
  all or nothing, so no allocation can evict a hit between the lookup and the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

from astrai.inference.cache.allocator import Allocator
from astrai.inference.cache.prefix_cache import PrefixCache


class PagePool:
    """Physical pages with reference counts, an LRU of reusable pages and an exact-prefix index."""

    def __init__(self, num_pages: int, page_size: int):
        self._alloc = Allocator(num_pages, on_evict=self._on_evict)
        self._prefix = PrefixCache(page_size)

    @property
    def num_pages(self) -> int:
        return self._alloc.num_pages

    @property
    def page_size(self) -> int:
        return self._prefix.page_size

    @property
    def num_free(self) -> int:
        return self._alloc.num_free

    @property
    def num_cached(self) -> int:
        return self._alloc.num_cached

    @property
    def num_in_use(self) -> int:
        return self._alloc.num_in_use

    @property
    def num_available(self) -> int:
        """Pages that can still be allocated (free or evictable)."""
        return self._alloc.num_available

    def alloc(self) -> int:
        return self._alloc.alloc()

    def free(self, idx: int) -> None:
        """Drop one reference; an unreferenced page stays cached iff it holds indexed prefix content."""
        keep = self._prefix.has_page(idx)
        self._alloc.free(idx, keep_cached=keep)

    def inc_ref(self, idx: int) -> None:
        self._alloc.inc_ref(idx)

    def ref_count(self, idx: int) -> int:
        return self._alloc.ref_count(idx)

    def lookup(self, token_ids: Sequence[int]) -> list[int]:
        """Cached pages for the leading full pages of `token_ids` (no reference is taken)."""
        return self._prefix.lookup(token_ids)

    def record(self, page_idx: int, token_ids: Sequence[int], logical_page_idx: int) -> bool:
        return self._prefix.record(page_idx, token_ids, logical_page_idx)

    def record_pages(self, pages: Sequence[int], token_ids: Sequence[int], start_logical_page: int = 0) -> int:
        return self._prefix.record_pages(pages, token_ids, start_logical_page)

    def acquire(self, token_ids: Sequence[int], max_hits: int, num_pages: int) -> tuple[list[int], int] | None:
        """Pages for a new sequence: up to `max_hits` cached prefix pages of `token_ids`, then fresh pages,
        `num_pages` in all. Returns `(pages, hits)`, or None, with nothing changed, if pages are short."""
        hits = self._prefix.lookup(token_ids)[: max(0, min(max_hits, num_pages))]
        # Hits sitting in the LRU stop being evictable once referenced, so they don't count as available.
        revived = sum(1 for p in hits if self._alloc.is_cached(p))
        if num_pages - len(hits) > self._alloc.num_available - revived:
            return None
        for p in hits:
            self._alloc.touch(p)
            self._alloc.inc_ref(p)
        pages = hits + [self._alloc.alloc() for _ in range(num_pages - len(hits))]
        return pages, len(hits)

    def grow(self, pages: list[int], num_pages: int) -> bool:
        """Append fresh pages to `pages` until it holds `num_pages`; False, with nothing changed, if short."""
        missing = num_pages - len(pages)
        if missing > self._alloc.num_available:
            return False
        pages.extend(self._alloc.alloc() for _ in range(missing))
        return True

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (e.g. after the weights changed): unreferenced cached pages become free;
        pages in use stay with their tasks and are freed, not cached, when those end."""
        for page in self._prefix.clear():
            self._alloc.uncache(page)

    def check_invariants(self) -> None:
        """Raise AssertionError unless allocator states and the prefix index agree."""
        self._alloc.check_invariants()
        self._prefix.check_invariants()
        for p in range(self.num_pages):
            cached, indexed = self._alloc.is_cached(p), self._prefix.has_page(p)
            if cached and not indexed:
                raise AssertionError(f"page {p} is cached in the LRU but holds no indexed prefix")
            if indexed and not cached and self._alloc.ref_count(p) == 0:
                raise AssertionError(f"page {p} is indexed by the prefix cache but free")

    def _on_evict(self, idx: int) -> None:
        # `idx` is being reclaimed by the allocator; pages below it lose their prefix.
        for orphan in self._prefix.evict(idx):
            self._alloc.uncache(orphan)
