"""Allocator: page states (free / cached / in use), reference counts, LRU eviction."""

import pytest

from astrai.inference.cache import Allocator


def test_alloc_hands_out_lowest_free_page_with_one_reference():
    alloc = Allocator(4)
    assert [alloc.alloc() for _ in range(3)] == [0, 1, 2]
    assert [alloc.ref_count(i) for i in range(4)] == [1, 1, 1, 0]
    assert (alloc.num_free, alloc.num_cached, alloc.num_in_use) == (1, 0, 3)
    alloc.free(1)
    assert alloc.alloc() == 1  # freed pages come back lowest first
    alloc.check_invariants()


def test_free_mask_has_a_bit_per_free_page():
    alloc = Allocator(5)
    assert alloc._free_mask == 0b11111  # bit i set: page i is free (the architecture document's int mask)
    pages = [alloc.alloc() for _ in range(3)]
    assert alloc._free_mask == 0b11000 and alloc.free_pages() == [3, 4]
    alloc.free(pages[1])
    alloc.free(pages[2], keep_cached=True)  # cached, not free
    assert alloc._free_mask == 0b11010 and alloc.num_free == 3 and alloc.alloc() == 1
    alloc.check_invariants()


def test_free_keep_cached_puts_page_in_lru_and_inc_ref_revives_it():
    alloc = Allocator(3)
    page = alloc.alloc()
    alloc.free(page, keep_cached=True)
    assert alloc.is_cached(page) and alloc.ref_count(page) == 0
    assert (alloc.num_free, alloc.num_cached, alloc.num_in_use, alloc.num_available) == (2, 1, 0, 3)
    alloc.inc_ref(page)
    assert not alloc.is_cached(page) and alloc.ref_count(page) == 1
    assert (alloc.num_free, alloc.num_cached, alloc.num_in_use) == (2, 0, 1)
    alloc.check_invariants()


def test_shared_page_needs_every_reference_dropped():
    alloc = Allocator(2)
    page = alloc.alloc()
    alloc.inc_ref(page)
    alloc.free(page)
    assert alloc.ref_count(page) == 1 and alloc.num_free == 1
    alloc.free(page)
    assert alloc.ref_count(page) == 0 and alloc.num_free == 2
    alloc.check_invariants()


def test_alloc_evicts_least_recently_used_cached_page_only_when_nothing_is_free():
    evicted = []
    alloc = Allocator(3, on_evict=evicted.append)
    pages = [alloc.alloc() for _ in range(3)]
    for p in pages:
        alloc.free(p, keep_cached=True)  # LRU order: 0, 1, 2
    alloc.touch(0)  # LRU order: 1, 2, 0
    assert alloc.num_free == 0
    assert alloc.alloc() == 1
    assert alloc.alloc() == 2
    assert evicted == [1, 2]
    assert alloc.ref_count(1) == 1 and alloc.is_cached(0)
    alloc.check_invariants()


def test_free_pages_go_before_cached_ones():
    evicted = []
    alloc = Allocator(2, on_evict=evicted.append)
    alloc.free(alloc.alloc(), keep_cached=True)  # page 0 cached
    assert alloc.alloc() == 1
    assert evicted == []


def test_touch_leaves_pages_outside_the_lru_alone():
    # Defect 2 of the original: touching a page still referenced by a live task raised KeyError.
    alloc = Allocator(2)
    page = alloc.alloc()
    alloc.touch(page)
    alloc.touch(1)  # a free page
    assert alloc.ref_count(page) == 1 and alloc.num_cached == 0
    alloc.check_invariants()


def test_uncache_returns_a_cached_page_to_the_free_pages():
    alloc = Allocator(2)
    page = alloc.alloc()
    alloc.free(page, keep_cached=True)
    alloc.uncache(page)
    assert (alloc.num_free, alloc.num_cached) == (2, 0)
    alloc.uncache(page)  # no longer cached: nothing happens
    assert alloc.num_free == 2
    alloc.check_invariants()


def test_misuse_is_refused():
    alloc = Allocator(1)
    with pytest.raises(RuntimeError, match="double free"):
        alloc.free(0)
    with pytest.raises(RuntimeError, match="is free"):
        alloc.inc_ref(0)
    alloc.alloc()
    with pytest.raises(RuntimeError, match="no KV page left"):
        alloc.alloc()
    alloc.check_invariants()


@pytest.mark.parametrize("num_pages", [0, -3, 2.0, True])
def test_num_pages_must_be_a_positive_integer(num_pages):
    with pytest.raises(ValueError, match="num_pages"):
        Allocator(num_pages)


def test_check_invariants_detects_corrupted_state():
    alloc = Allocator(2)
    alloc.alloc()
    alloc._refs[0] = 0  # page 0 is now in no state
    with pytest.raises(AssertionError, match="no state"):
        alloc.check_invariants()
