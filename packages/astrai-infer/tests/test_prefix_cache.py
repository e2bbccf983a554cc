"""PrefixCache (exact-prefix page index) and PagePool (allocator + index kept consistent)."""

import pytest

from astrai.inference.cache import PagePool, PrefixCache


def _cache_with(page_size, token_ids, pages):
    cache = PrefixCache(page_size)
    for logical, page in enumerate(pages):
        assert cache.record(page, token_ids, logical)
    return cache


def test_lookup_returns_the_longest_cached_run_of_full_pages():
    cache = _cache_with(2, [1, 2, 3, 4, 5, 6], [7, 8, 9])
    assert cache.lookup([1, 2, 3, 4, 5, 6, 7]) == [7, 8, 9]
    assert cache.lookup([1, 2, 3, 4, 0, 0]) == [7, 8]
    assert cache.lookup([1, 2, 3]) == [7]  # the trailing partial page never matches
    assert cache.lookup([1]) == []
    assert cache.lookup([9, 9, 3, 4]) == []
    cache.check_invariants()


def test_same_page_tokens_after_another_prefix_do_not_match():
    # Defect 3 of the original: a page was keyed by its own tokens only.
    cache = _cache_with(2, [1, 2, 3, 4], [0, 1])
    assert cache.lookup([5, 6, 3, 4]) == []
    # A page recorded at logical position 1 is not offered for position 0.
    assert cache.lookup([3, 4, 1, 2]) == []
    # ...nor a page recorded at position 0 for position 1.
    assert cache.lookup([1, 2, 1, 2]) == [0]


def test_record_needs_the_whole_prefix_cached():
    cache = PrefixCache(2)
    assert not cache.record(5, [1, 2, 3, 4], 1)  # page 0 of this prefix is not cached
    assert len(cache) == 0


def test_a_prefix_is_held_by_one_page_only():
    cache = _cache_with(2, [1, 2], [3])
    assert not cache.record(4, [1, 2], 0)  # another page computed the same prefix
    assert cache.record(3, [1, 2], 0)  # re-recording the indexed page is a no-op
    assert cache.lookup([1, 2]) == [3] and not cache.has_page(4)
    with pytest.raises(RuntimeError, match="another prefix"):
        cache.record(3, [7, 8], 0)
    cache.check_invariants()


def test_record_pages_indexes_a_run_in_one_walk():
    cache = PrefixCache(2)
    assert cache.record_pages([4, 5, 6], [1, 2, 3, 4, 5]) == 2  # the third page is partial
    assert cache.lookup([1, 2, 3, 4, 5, 6]) == [4, 5]
    # A duplicate of page 0 is not indexed, but the walk continues through page 4 and indexes the rest.
    assert cache.record_pages([7, 8, 9], [1, 2, 3, 9, 8, 8]) == 2
    assert cache.lookup([1, 2, 3, 9, 8, 8]) == [4, 8, 9] and not cache.has_page(7)
    # Pages before start_logical_page are only followed: a missing one stops the walk.
    assert cache.record_pages([1, 2], [5, 5, 6, 6], start_logical_page=1) == 0
    assert cache.record_pages([1, 2], [5, 5, 6, 6], start_logical_page=0) == 2
    cache.check_invariants()


def test_record_pages_refills_a_prefix_whose_page_was_evicted():
    cache = PrefixCache(1)
    assert cache.record_pages([0, 1], [3, 4]) == 2
    assert cache.record_pages([2, 3], [3, 4]) == 0  # another task computed the same prefix: pages 0, 1 serve it
    assert cache.evict(0) == [1]
    assert cache.record_pages([2, 3], [3, 4]) == 2  # ...and takes over once they are gone
    assert cache.lookup([3, 4]) == [2, 3]
    cache.check_invariants()


def test_record_rejects_a_page_that_is_not_full():
    cache = PrefixCache(4)
    with pytest.raises(ValueError, match="logical_page_idx=1"):
        cache.record(0, [1, 2, 3, 4, 5], 1)
    with pytest.raises(ValueError, match="logical_page_idx=-1"):
        cache.record(0, [1, 2, 3, 4], -1)


def test_evict_drops_the_page_and_returns_its_descendants():
    cache = _cache_with(1, [1, 2, 3], [10, 11, 12])
    assert cache.record(13, [1, 5], 1)  # a sibling branch under page 10
    assert sorted(cache.evict(11)) == [12]
    assert cache.lookup([1, 2, 3]) == [10]
    assert cache.lookup([1, 5]) == [10, 13]
    assert not cache.has_page(11) and not cache.has_page(12)
    assert sorted(cache.evict(10)) == [13]
    assert len(cache) == 0 and cache.evict(10) == []
    cache.check_invariants()


def test_page_size_must_be_positive():
    with pytest.raises(ValueError, match="page_size"):
        PrefixCache(0)


# PagePool


def test_freed_page_stays_cached_only_if_indexed():
    pool = PagePool(4, 2)
    a, b = pool.alloc(), pool.alloc()
    assert pool.record(a, [1, 2], 0)
    pool.free(a)
    pool.free(b)
    assert (pool.num_free, pool.num_cached, pool.num_in_use) == (3, 1, 0)
    assert pool.lookup([1, 2, 3]) == [a]
    pool.check_invariants()


def test_evicting_a_cached_page_reclaims_its_cached_descendants():
    pool = PagePool(3, 1)
    pages = [pool.alloc() for _ in range(3)]
    for logical, page in enumerate(pages):
        pool.record(page, [1, 2, 3], logical)
    for page in reversed(pages):
        pool.free(page)  # LRU: 2, 1, 0
    assert pool.num_cached == 3
    pool.inc_ref(0)  # revive the root page: the LRU is now 2, 1
    pool.free(0)  # LRU: 2, 1, 0
    # Evict page 2 (a leaf), then page 1: its child is gone already, so only page 1 leaves.
    assert pool.alloc() == 2 and pool.alloc() == 1
    assert pool.lookup([1, 2, 3]) == [0]
    pool.check_invariants()
    assert pool.alloc() == 0  # the root goes last
    assert (pool.num_free, pool.num_cached, pool.num_in_use) == (0, 0, 3)
    pool.check_invariants()


def test_eviction_sends_orphaned_lru_pages_to_the_free_list():
    pool = PagePool(3, 1)
    root, child = pool.alloc(), pool.alloc()
    pool.record(root, [1, 2], 0)
    pool.record(child, [1, 2], 1)
    pool.free(root)  # LRU: root, child (root is the older one)
    pool.free(child)
    other = pool.alloc()  # the free page 2 goes first
    assert other == 2 and pool.num_cached == 2
    assert pool.alloc() == root  # evicting root orphans child
    assert (pool.num_free, pool.num_cached) == (1, 0)
    assert pool.lookup([1, 2]) == []
    pool.check_invariants()


def test_acquire_is_all_or_nothing():
    pool = PagePool(3, 2)
    first = pool.acquire([1, 2, 3, 4], max_hits=1, num_pages=2)
    assert first == ([0, 1], 0)
    pool.record(0, [1, 2, 3, 4], 0)
    pool.record(1, [1, 2, 3, 4], 1)
    pool.free(1)  # page 1 cached, page 0 still in use
    # 4 pages with hits [0, 1] needs 2 fresh ones, but only page 2 is left: cached page 1 is a hit itself.
    assert pool.acquire([1, 2, 3, 4, 5, 6, 7, 8], max_hits=3, num_pages=4) is None
    assert (pool.ref_count(0), pool.ref_count(1), pool.num_cached) == (1, 0, 1)
    # Hits are shared (ref 2 on page 0, page 1 revived), the rest allocated fresh.
    assert pool.acquire([1, 2, 3, 4, 5], max_hits=2, num_pages=3) == ([0, 1, 2], 2)
    assert (pool.ref_count(0), pool.ref_count(1), pool.ref_count(2)) == (2, 1, 1)
    pool.check_invariants()


def test_grow_appends_fresh_pages_or_changes_nothing():
    pool = PagePool(3, 2)
    pages = [pool.alloc()]
    assert pool.grow(pages, 3) and pages == [0, 1, 2]
    assert not pool.grow(pages, 4) and pages == [0, 1, 2]
    assert pool.grow(pages, 2) and pages == [0, 1, 2]  # already long enough
    pool.check_invariants()
