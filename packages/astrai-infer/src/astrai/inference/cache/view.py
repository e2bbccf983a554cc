"""`KvcacheView`: one forward step's window onto the paged cache (meets `astrai.protocols.KVCacheView`).

The batch is ragged. Row b already has `total_len[b] - new_lens[b]` cached positions and brings `new_lens[b]`
new entries this step, right-padded to the step's width T. `write(layer_id, k, v)` stores row b's first
`new_lens[b]` entries at positions `total_len[b] - new_lens[b] ...` of that row's own pages; `gather(layer_id)`
returns positions `0 .. total_len[b] - 1` of every row, right-padded to `S = max(total_len)`. In a decode step
(one new token per row) `attend(layer_id, q, k, v, scale)` does the attention where the entries lie instead
(`paged_attention`), so the history is never copied.

A packed view (`packed_rows` given: each row's first position and new-token count, on the host) takes the
step's tokens as one unpadded row, `(1, N, ...)`, row after row (see `astrai.protocols.KVCacheView`), and
attends every query itself (`_PackedStep`), in place through the kernel: decodes one query per row, prefill
chunks causally over their row's pages. A packed view needs the kernel (`in_place_supported`); the engine binds
padded steps otherwise.

Slot indices depend only on the page tables and lengths, not on the layer, so they are computed once per
step (padded: on the first `write`, when T is known, and on the first `gather`; packed: when bound) and reused
by every layer.

`StaticStepView` is a step over tensors of fixed shape whose contents the caller refills each step, so that the
step can be recorded once and replayed as a CUDA graph (`astrai.inference.cuda_graphs`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from astrai.inference.cache.paged_attention import DecodeStep, PagedChunks, PagedRows, supports_cache
from astrai.inference.cache.storage import Storage
from astrai.model.sdpa import grouped_attention


def in_place_supported(storage: Storage) -> bool:
    """Whether `attend` can read this storage in place: per-head entries, equal for k and v (GQA's layout),
    in a dtype, head size and device the kernel serves."""
    return storage.per_head and supports_cache(storage.k_cache)


class KvcacheView:
    """Page tables and lengths of one ragged batch, bound to the cache's `Storage`."""

    def __init__(
        self,
        storage: Storage,
        page_table: torch.Tensor,
        total_len: torch.Tensor | int,
        new_lens: torch.Tensor | None = None,
        max_len: int | None = None,
        packed_rows: Sequence[tuple[int, int]] | None = None,
    ):
        # page_table: (B, P) int64, -1 past each row's pages; total_len: (B,) int64, or one int for every row;
        # new_lens: (B,) int64, or None: every row writes the step's whole width T (known at the first write);
        # max_len: max(total_len) if the caller knows it (spares a device-to-host sync);
        # packed_rows: (first position, new tokens) of every row for a packed step, None for a padded one.
        if not isinstance(total_len, torch.Tensor):
            max_len = total_len if max_len is None else max_len
            total_len = torch.full((page_table.shape[0],), total_len, dtype=torch.int64, device=page_table.device)
        self._storage = storage
        self._page_table = page_table
        self._total_len = total_len
        self._new_lens = new_lens
        self._start = None if new_lens is None else total_len - new_lens  # (B,) first position written this step
        self._max_len = max_len
        self._read_rows: tuple[torch.Tensor, torch.Tensor] | None = None  # k and v row indices, on first gather
        self._write_slots: torch.Tensor | None = None  # (B, T), set by the first write of a padded step
        self._decode_rows: PagedRows | None = None  # a padded decode step's rows for the kernel, on first attend
        self._packed = None if packed_rows is None else _PackedStep(storage, page_table, packed_rows)

    @property
    def seq_lens(self) -> torch.Tensor:
        """(B,) valid positions per row once this step's entries are written."""
        return self._total_len

    @property
    def packed(self) -> bool:
        """True when the step's tokens come as one unpadded row (1, N, ...), row after row."""
        return self._packed is not None

    @property
    def start_pos(self) -> torch.Tensor:
        """(B,) absolute position of each row's first new entry this step."""
        if self._start is None:
            raise RuntimeError("bound without new_lens: the first write gives the step's width, and its start")
        return self._start

    def write(self, layer_id: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store this step's entries, `k` (B, T, *k_shape) and `v` (B, T, *v_shape), right-padded rows (a
        packed step: (1, N, ...), row after row)."""
        if self._packed is not None:
            self._storage.write_slots(layer_id, self._packed.slots, k[0], v[0])
            return
        steps = k.shape[1]
        if self._new_lens is None:  # bound without new_lens: each row brings the step's whole width
            self._new_lens = torch.full_like(self._total_len, steps)
            self._start = self._total_len - self._new_lens
        if self._write_slots is None or self._write_slots.shape[1] != steps:
            self._write_slots = self._storage.write_index(self._page_table, self._start, self._new_lens, steps)
        self._storage.write_slots(layer_id, self._write_slots, k, v)

    def gather(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's entries so far, (B, S, *k_shape) and (B, S, *v_shape); past `seq_lens` unspecified
        (finite; attention masks it)."""
        if self._read_rows is None:
            self._read_rows = self._storage.read_index(self._page_table, self._total_len, self._max_len)
        return self._storage.read_slots(layer_id, *self._read_rows)

    def attend(
        self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor | None:
        """Attention read in place from the pages (`paged_attention`): q (N, H, d) the step's queries, k, v
        (N, Hkv, d) their entries as written -> (N, H, d). A padded step must be a decode (one query per row,
        at its last position); it gets None where the kernel does not serve this cache (then gather)."""
        storage = self._storage
        if self._packed is not None:
            return self._packed.attend(layer_id, q, k, v, scale)
        if not (in_place_supported(storage) and q.dtype == storage.dtype and q.device == storage.device):
            return None
        if self._decode_rows is None:
            self._decode_rows = PagedRows(self._page_table, self._total_len, storage.page_size)
        return self._decode_rows.attend(q, storage.k_cache[layer_id], storage.v_cache[layer_id], scale)

    def native_attend(self) -> DecodeStep | None:
        """A packed decode step (one token per row) bound for C code that runs every layer of the step itself
        (`PagedRows.bind_layers`: the store and attention of each layer's entries as one C call); None for
        any other step."""
        return None if self._packed is None else self._packed.native()


class _PackedStep:
    """Where a packed step's tokens go and how each query attends: computed once, used by every layer.

    A row bringing one token (a decode) attends through `PagedRows`; a row bringing a chunk of several (a prefill
    chunk, first or continued) through `PagedChunks`, causally over its row's pages up to each query's position.
    Both read the pages in place, after the step's entries are written.
    """

    def __init__(self, storage: Storage, page_table: torch.Tensor, rows: Sequence[tuple[int, int]]):
        if not in_place_supported(storage):
            raise ValueError("a packed step needs the paged attention kernel for this cache (in_place_supported)")
        if any(n < 1 for _, n in rows):
            raise ValueError(f"packed rows {list(rows)}: every row brings at least one token")
        self._storage = storage
        # A step has a few dozen rows and a few hundred tokens: their slots are cheaper in Python than as a dozen
        # small tensor operations.
        ps, tables = storage.page_size, page_table.tolist()
        slots = []
        for table, (start, n) in zip(tables, rows, strict=True):
            pages = table[: (start + n - 1) // ps + 1]  # every page up to the row's last position
            if len(pages) * ps < start + n or min(pages) < 0:
                raise ValueError(f"packed row {(start, n)}: its page table {table} lacks a page up to {start + n - 1}")
            slots += [table[p // ps] * ps + p % ps for p in range(start, start + n)]
        device = page_table.device
        self.slots = torch.tensor(slots, dtype=torch.int64, device=device)  # (N,) flat write slots

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        self.decode_tokens: torch.Tensor | None = None  # the decodes' tokens; None: every token is one
        self.decodes: PagedRows | None = None
        self.chunks: PagedChunks | None = None
        self._native: DecodeStep | None = None  # a decode step's binding for C callers, made on first use
        if all(n == 1 for _, n in rows):  # a decode step: one token per row
            self.decodes = PagedRows(page_table, tensor([start + 1 for start, _ in rows]), ps)
            return
        firsts = list(itertools.accumulate((n for _, n in rows), initial=0))  # each row's first token
        chunked = [b for b, (_, n) in enumerate(rows) if n > 1]
        self.chunks = PagedChunks(
            page_table[tensor(chunked)],
            tensor([rows[b][0] for b in chunked]),
            tensor([rows[b][1] for b in chunked]),
            tensor([firsts[b] for b in chunked]),
            ps,
        )
        decoded = [b for b, (_, n) in enumerate(rows) if n == 1]
        if decoded:
            self.decode_tokens = tensor([firsts[b] for b in decoded])
            self.decodes = PagedRows(page_table[tensor(decoded)], tensor([rows[b][0] + 1 for b in decoded]), ps)

    def native(self) -> DecodeStep | None:
        """`KvcacheView.native_attend`'s binding: a decode step's, None for a step with prefill chunks."""
        if self.chunks is not None:
            return None
        if self._native is None:
            storage = self._storage
            self._native = self.decodes.bind_layers(storage.k_cache, storage.v_cache, self.slots)
        return self._native

    def attend(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q (N, H, d), this step's k, v (N, Hkv, d), already written -> (N, H, d)."""
        k_cache, v_cache = self._storage.k_cache[layer_id], self._storage.v_cache[layer_id]
        if self.chunks is None:
            return self.decodes.attend(q, k_cache, v_cache, scale)
        q = q.contiguous()
        out = torch.empty_like(q)
        self.chunks.attend(q, k_cache, v_cache, scale, out)
        if self.decodes is not None:
            tokens = self.decode_tokens
            out[tokens] = self.decodes.attend(q[tokens], k_cache, v_cache, scale)
        return out


class StaticStepView:
    """A packed step of R rows bringing T tokens each, over caller-owned tensors of fixed shape: no host sync and
    no shape that depends on the data, so the step can be captured as a CUDA graph and replayed after the
    caller refills the tensors in place. A decode step is T = 1; a prefill chunk of one row is R = 1.

    Token t of row r (flat index r * T + t) writes its entry at `slots[r * T + t]` and attends over the positions
    `j <= positions[r, t]` of the pages `page_table[r]` (R, P): all P pages are gathered, the rest masked, and
    values from `seq_lens[r]` (one past the row's last position) on are zeroed (stale entries may be non-finite). Padding (rows, or tokens past a row's chunk) writes to `storage.scratch_slot`; a padding
    token repeats its row's last position and a padding row reads scratch pages (`storage.num_pages`) with
    length 1. Needs per-head entries, equal for k and v (GQA's layout)."""

    packed = True

    def __init__(
        self,
        storage: Storage,
        slots: torch.Tensor,
        page_table: torch.Tensor,
        seq_lens: torch.Tensor,
        positions: torch.Tensor,
    ):
        if not storage.per_head:
            raise ValueError(f"a static step needs GQA cache entries; got {storage.k_shape}, {storage.v_shape}")
        self._storage = storage
        self._slots = slots  # (R * T,) int64
        self._page_table = page_table  # (R, P) int64
        self._seq_lens = seq_lens  # (R,) int64
        self._positions = positions  # (R, T) int64
        self._mask: torch.Tensor | None = None  # (R, 1, T, P * page_size), made by the first attend
        self._stale: torch.Tensor | None = None  # (R, 1, P * page_size, 1): slots past each row's end

    @property
    def seq_lens(self) -> torch.Tensor:
        return self._seq_lens

    def write(self, layer_id: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the step's entries, (1, R * T, Hkv, d) each."""
        self._storage.write_slots(layer_id, self._slots, k[0], v[0])

    def gather(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError("a static step view is packed: the model calls attend, never gather")

    def attend(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q (R * T, H, d) -> (R * T, H, d) over each row's pages, read after this step's entries are written."""
        storage = self._storage
        rows, tokens = self._positions.shape
        width = self._page_table.shape[1] * storage.page_size
        if self._mask is None:
            keys = torch.arange(width, device=self._positions.device)
            self._mask = (keys <= self._positions[:, :, None])[:, None]  # (R, 1, T, S); the row ends at its last
            self._stale = (keys >= self._seq_lens[:, None])[:, None, :, None]
        keys, values = (
            cache[layer_id][self._page_table].view(rows, width, *storage.k_shape).transpose(1, 2)
            for cache in (storage.k_cache, storage.v_cache)
        )  # (R, Hkv, S, d) each
        # A masked key's weight is 0, but 0 * inf is NaN: a freed page's old entries, never attended, add nothing.
        values = values.masked_fill(self._stale, 0)
        q = q.view(rows, tokens, *q.shape[1:]).transpose(1, 2)  # (R, H, T, d)
        out = grouped_attention(q, keys, values, self._mask, scale)  # (R, H, T, d)
        return out.transpose(1, 2).contiguous().view(rows * tokens, out.shape[1], out.shape[3])
