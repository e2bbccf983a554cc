"""Paged KV cache: page bookkeeping, exact-prefix reuse, page tensors, the per-step view the model uses, and the
decode attention kernel that reads the pages in place (`paged_attention`)."""

from astrai.inference.cache import paged_attention
from astrai.inference.cache.allocator import Allocator
from astrai.inference.cache.kv_cache import KVCache
from astrai.inference.cache.page_pool import PagePool
from astrai.inference.cache.prefix_cache import PrefixCache
from astrai.inference.cache.storage import Storage, cache_entry_shapes
from astrai.inference.cache.task_table import TaskTable
from astrai.inference.cache.view import KvcacheView

__all__ = [
    "Allocator",
    "KVCache",
    "KvcacheView",
    "PagePool",
    "PrefixCache",
    "Storage",
    "TaskTable",
    "cache_entry_shapes",
    "paged_attention",
]
