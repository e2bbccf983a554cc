"""`Storage`: the page tensors holding every layer's cached entries, and vectorised page-table I/O.

The cache is entry-shape agnostic: what the attention layer writes per token is two tensors, `k` and `v`,
whose trailing shapes are fixed at construction (see `cache_entry_shapes`):

- GQA caches per-head keys and values, `k_shape = v_shape = (n_kv_heads, head_dim)`;
- MLA caches the compressed KV latent as `k`, `(kv_lora_rank,)`, and the one shared RoPE key as `v`,
  `(qk_rope_head_dim,)`: that, not expanded per-head K/V, is what makes MLA's cache small.

Layout: `k_cache` is `(n_layers, num_pages + 1, page_size, *k_shape)`, likewise `v_cache`. Token at absolute
position `p` of a sequence lives in physical page `page_table[p // page_size]` at offset `p % page_size`, i.e.
flat slot `page * page_size + p % page_size` of the layer's `(pages * page_size, *shape)` view. The extra page
`num_pages` is scratch: padded (not real) entries of a ragged batch are written there, so a step never needs a
data-dependent mask (no host sync) and never touches another sequence's page.
"""

from __future__ import annotations

import math

import torch

from astrai.config import AutoRegressiveLMConfig


def cache_entry_shapes(config: AutoRegressiveLMConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """`(k_shape, v_shape)` of one token's cache entry for this model's attention type."""
    if config.attn_type == "mla":
        return (config.kv_lora_rank,), (config.qk_rope_head_dim,)
    if config.attn_type == "gqa":
        return (config.n_kv_heads, config.head_dim), (config.n_kv_heads, config.head_dim)
    raise ValueError(f"attn_type={config.attn_type!r}: no KV-cache layout known (allowed: 'gqa', 'mla')")


class Storage:
    """Per-layer page tensors for `k` and `v` entries, addressed through page tables."""

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
        for name, value in (("num_layers", num_layers), ("num_pages", num_pages), ("page_size", page_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: must be a positive integer")
        for name, shape in (("k_shape", k_shape), ("v_shape", v_shape)):
            if len(shape) not in (1, 2) or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
                raise ValueError(f"{name}={shape!r}: must be (dim,) or (heads, dim) of positive integers")
        self.num_layers = num_layers
        self.num_pages = num_pages
        self.page_size = page_size
        self.k_shape = tuple(k_shape)
        self.v_shape = tuple(v_shape)
        # Zero-initialised so that even never-written slots gather as finite numbers.
        self.k_cache = torch.zeros(num_layers, num_pages + 1, page_size, *k_shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(num_layers, num_pages + 1, page_size, *v_shape, dtype=dtype, device=device)
        self.scratch_slot = num_pages * page_size  # first slot of the scratch page

    @property
    def dtype(self) -> torch.dtype:
        return self.k_cache.dtype

    @property
    def device(self) -> torch.device:
        return self.k_cache.device

    @property
    def per_head(self) -> bool:
        """Whether entries are per-head keys and values of one shape, `(heads, dim)` (GQA's layout, not MLA's)."""
        return len(self.k_shape) == 2 and self.k_shape == self.v_shape

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token occupies across all layers (for sizing the page budget)."""
        return (math.prod(self.k_shape) + math.prod(self.v_shape)) * self.k_cache.element_size() * self.num_layers

    def write_index(
        self, page_table: torch.Tensor, start_pos: torch.Tensor | int, lengths: torch.Tensor | None, steps: int
    ) -> torch.Tensor:
        """Flat slots (B, T) for writing `steps` entries per row from `start_pos` (B,) or one int on.

        Row b's entries past `lengths[b]` (default: none) are padding and map to the scratch page.
        """
        batch = page_table.shape[0]
        device = page_table.device
        start = torch.as_tensor(start_pos, device=device).expand(batch)
        offsets = torch.arange(steps, device=device)
        positions = start[:, None] + offsets  # (B, T)
        if lengths is None:
            valid = torch.ones(batch, steps, dtype=torch.bool, device=device)
        else:
            valid = offsets < lengths.to(device)[:, None]
        return self._slots(page_table, positions, valid)

    def read_index(
        self, page_table: torch.Tensor, total_len: torch.Tensor | int, width: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Row indices into the flat k and v caches for positions `0..total_len[b]-1` of every row, S wide.

        S is `width` when the caller knows max(total_len) (saves a device sync), else computed. Positions past
        a row's length read the scratch page. The indices serve every layer (`read_slots`).
        """
        batch = page_table.shape[0]
        device = page_table.device
        lens = torch.as_tensor(total_len, device=device).expand(batch)
        if width is None:
            width = int(lens.max()) if batch else 0
        positions = torch.arange(width, device=device).expand(batch, width)  # (B, S)
        slots = self._slots(page_table, positions, positions < lens[:, None])
        return _entry_rows(slots, self.k_shape), _entry_rows(slots, self.v_shape)

    def write_slots(self, layer_id: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store `k` (B, T, *k_shape) and `v` (B, T, *v_shape) at flat `slots` (B, T) of `layer_id`."""
        flat_k = self.k_cache[layer_id].view(-1, *self.k_shape)  # (pages * page_size, *k_shape)
        flat_v = self.v_cache[layer_id].view(-1, *self.v_shape)
        flat_k[slots] = k
        flat_v[slots] = v

    def read_slots(
        self, layer_id: int, k_rows: torch.Tensor, v_rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Entries of `layer_id` at the indices `read_index` gave, (B, S, *k_shape) and (B, S, *v_shape).

        Entries past a row's length are unspecified finite numbers (attention masks them; zeroing them cost
        as much as the copy itself). Per-head entries come out as a (B, S, heads, dim) view of head-major
        memory, so attention's `transpose(1, 2)` to (B, heads, S, dim) is contiguous and copy-free.
        """
        return (
            _read_entries(self.k_cache[layer_id], k_rows, self.k_shape),
            _read_entries(self.v_cache[layer_id], v_rows, self.v_shape),
        )

    def write(
        self,
        layer_id: int,
        page_table: torch.Tensor,
        start_pos: torch.Tensor | int,
        k: torch.Tensor,
        v: torch.Tensor,
        lengths: torch.Tensor | None = None,
    ) -> None:
        """Write row b's first `lengths[b]` (default T) entries of `k`/`v` (B, T, ...) at `start_pos[b]...`."""
        self.write_slots(layer_id, self.write_index(page_table, start_pos, lengths, k.shape[1]), k, v)

    def gather(
        self, layer_id: int, page_table: torch.Tensor, total_len: torch.Tensor | int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions `0..total_len[b]-1` of every row, (B, S, ...) with S = max(total_len), right-padded."""
        return self.read_slots(layer_id, *self.read_index(page_table, total_len))

    def _slots(self, page_table: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        # Flat slot of each position through its row's page table; padding, and positions whose page the
        # table lacks (-1), go to the scratch page instead of anyone's data.
        ps = self.page_size
        logical = torch.where(valid, positions // ps, 0).clamp_(max=max(page_table.shape[1] - 1, 0))  # (B, T)
        physical = page_table.gather(1, logical)  # (B, T)
        slots = physical * ps + positions % ps
        return torch.where(valid & (physical >= 0), slots, self.scratch_slot)


def _entry_rows(slots: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Rows of the cache viewed as (slots * heads, dim) to read for slots (B, S): (B, S) for one-dimensional
    entries, (B, heads, S) slot-major per head for (heads, dim) entries."""
    if len(shape) == 1:
        return slots
    heads = shape[0]
    return slots[:, None, :] * heads + torch.arange(heads, device=slots.device)[None, :, None]


def _read_entries(cache: torch.Tensor, rows: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """(B, S, *shape) entries of one layer's cache (pages, page_size, *shape) at `_entry_rows` indices."""
    picked = cache.view(-1, shape[-1]).index_select(0, rows.reshape(-1)).view(*rows.shape, shape[-1])
    return picked if len(shape) == 1 else picked.transpose(1, 2)  # (B, heads, S, dim) -> (B, S, heads, dim)
