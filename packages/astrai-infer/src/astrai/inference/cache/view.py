"""`KvcacheView`: one forward step's window onto the paged cache (meets `astrai.protocols.KVCacheView`).

The batch is ragged. Row b already has `total_len[b] - new_lens[b]` cached positions and brings `new_lens[b]`
new entries this step, right-padded to the step's width T. `write(layer_id, k, v)` stores row b's first
`new_lens[b]` entries at positions `total_len[b] - new_lens[b] ...` of that row's own pages; `gather(layer_id)`
returns positions `0 .. total_len[b] - 1` of every row, right-padded to `S = max(total_len)`. In a decode step
(one new token per row) `attend(layer_id, q, scale)` does the attention where the entries lie instead
(`paged_attention`), so the history is never copied.

Slot indices depend only on the page tables and lengths, not on the layer, so they are computed once per
step (on the first `write`, when T is known, and on the first `gather`) and reused by every layer.
"""

from __future__ import annotations

import torch

from astrai.inference.cache.paged_attention import paged_decode_attention, supports
from astrai.inference.cache.storage import Storage


class KvcacheView:
    """Page tables and lengths of one ragged batch, bound to the cache's `Storage`."""

    def __init__(
        self,
        storage: Storage,
        page_table: torch.Tensor,
        total_len: torch.Tensor,
        new_lens: torch.Tensor,
        max_len: int | None = None,
    ):
        # page_table: (B, P) int64, -1 past each row's pages; total_len, new_lens: (B,) int64;
        # max_len: max(total_len) if the caller knows it (spares a device-to-host sync).
        self._storage = storage
        self._page_table = page_table
        self._total_len = total_len
        self._new_lens = new_lens
        self._start = total_len - new_lens  # (B,) first position written this step
        self._max_len = max_len
        self._read_rows: tuple[torch.Tensor, torch.Tensor] | None = None  # k and v row indices, on first gather
        self._write_slots: torch.Tensor | None = None  # (B, T), set by the first write

    @property
    def seq_lens(self) -> torch.Tensor:
        """(B,) valid positions per row once this step's entries are written."""
        return self._total_len

    @property
    def start_pos(self) -> torch.Tensor:
        """(B,) absolute position of each row's first new entry this step."""
        return self._start

    def write(self, layer_id: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store this step's entries, `k` (B, T, *k_shape) and `v` (B, T, *v_shape), right-padded rows."""
        steps = k.shape[1]
        if self._write_slots is None or self._write_slots.shape[1] != steps:
            self._write_slots = self._storage.write_index(self._page_table, self._start, self._new_lens, steps)
        self._storage.write_slots(layer_id, self._write_slots, k, v)

    def gather(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's entries so far, (B, S, *k_shape) and (B, S, *v_shape); past `seq_lens` unspecified
        (finite; attention masks it)."""
        if self._read_rows is None:
            self._read_rows = self._storage.read_index(self._page_table, self._total_len, self._max_len)
        return self._storage.read_slots(layer_id, *self._read_rows)

    def attend(self, layer_id: int, q: torch.Tensor, scale: float) -> torch.Tensor | None:
        """Decode attention read in place from the pages (`paged_attention`): q (B, H, d), one query per row
        at its last position -> (B, H, d); None where the kernel does not serve this cache (then gather)."""
        storage = self._storage
        if len(storage.k_shape) != 2 or storage.k_shape != storage.v_shape or not supports(q, storage.k_cache):
            return None
        return paged_decode_attention(
            q, storage.k_cache[layer_id], storage.v_cache[layer_id], self._page_table, self._total_len, scale
        )
