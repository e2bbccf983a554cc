"""Paged KV cache: page bookkeeping, exact-prefix reuse, page tensors and the per-step view the model uses."""

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
]
