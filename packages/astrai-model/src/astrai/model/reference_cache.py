"""`ContiguousKVCache`: a simple preallocated KV cache for incremental decoding without an inference engine.

Each layer keeps one (batch, max_len, ...) buffer for keys and one for values, allocated on the first write
with whatever per-token shape the attention stores ((n_kv_heads, head_dim) for GQA; the latent and the
shared RoPE key for MLA). Row `b`'s slot `j` holds its token at absolute position `j`.

One forward step:

    view = cache.bind(n_new)           # n_new[b]: real (right-padded) tokens row b brings this step
    out = model(ids, input_mask, paged_cache=view)

`bind` advances the cached lengths; the returned view meets `astrai.protocols.KVCacheView`, so the model
derives positions and masks from `view.seq_lens`. The batch may be ragged (rows of different lengths).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class ContiguousKVCache:
    """Per-layer contiguous K/V storage for `batch_size` sequences of at most `max_len` tokens."""

    def __init__(self, n_layers: int, batch_size: int, max_len: int, device: torch.device | str | None = None) -> None:
        for name, value in (("n_layers", n_layers), ("batch_size", batch_size), ("max_len", max_len)):
            if value <= 0:
                raise ValueError(f"ContiguousKVCache {name}={value!r}: must be positive")
        self.n_layers, self.batch_size, self.max_len = n_layers, batch_size, max_len
        self.device = torch.device(device or "cpu")
        self.lens = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # cached tokens per row
        self.keys: list[Tensor | None] = [None] * n_layers  # (B, max_len, ...) each, allocated on first write
        self.values: list[Tensor | None] = [None] * n_layers

    def reset(self) -> None:
        """Forget every cached token (storage is kept)."""
        self.lens.zero_()

    def bind(self, n_new: Tensor | Sequence[int] | int) -> ContiguousKVView:
        """The view for one forward step in which row b brings `n_new[b]` tokens; advances the lengths."""
        n_new = torch.as_tensor(n_new, dtype=torch.long, device=self.device).expand(self.batch_size)
        end = self.lens + n_new
        if bool((n_new < 0).any()) or int(end.max()) > self.max_len:
            raise ValueError(
                f"ContiguousKVCache: cached {self.lens.tolist()} + new {n_new.tolist()} tokens per row "
                f"does not fit max_len={self.max_len}"
            )
        view = ContiguousKVView(self, start=self.lens.clone(), n_new=n_new.clone())
        self.lens = end
        return view

    def _storage(self, layer_id: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.keys[layer_id] is None:
            B, L = self.batch_size, self.max_len
            self.keys[layer_id] = k.new_zeros(B, L, *k.shape[2:])
            self.values[layer_id] = v.new_zeros(B, L, *v.shape[2:])
        return self.keys[layer_id], self.values[layer_id]


class ContiguousKVView:
    """One step's view of a `ContiguousKVCache` (meets `astrai.protocols.KVCacheView`)."""

    def __init__(self, cache: ContiguousKVCache, start: Tensor, n_new: Tensor) -> None:
        self.cache = cache
        self.start = start  # (B,) first slot written this step
        self.n_new = n_new  # (B,) real new tokens per row
        self._seq_lens = start + n_new
        self._S = int(self._seq_lens.max())  # gather width

    @property
    def seq_lens(self) -> Tensor:
        return self._seq_lens

    def write(self, layer_id: int, k: Tensor, v: Tensor) -> None:
        """Store row b's first n_new[b] entries of k, v (B, T, ...) at slots start[b] .. start[b] + n_new[b] - 1."""
        keys, values = self.cache._storage(layer_id, k, v)
        T = k.shape[1]
        steps = torch.arange(T, device=k.device)
        real = steps[None, :] < self.n_new[:, None]  # (B, T): right padding is not written
        rows = torch.arange(k.shape[0], device=k.device)[:, None].expand(-1, T)[real]
        slots = (self.start[:, None] + steps[None, :])[real]
        keys[rows, slots] = k[real].to(keys.dtype)
        values[rows, slots] = v[real].to(values.dtype)

    def gather(self, layer_id: int) -> tuple[Tensor, Tensor]:
        """(B, S, ...) keys and values with S = max(seq_lens); slots >= seq_lens[b] are stale padding."""
        return self.cache.keys[layer_id][:, : self._S], self.cache.values[layer_id][:, : self._S]

    @property
    def packed(self) -> bool:
        return False  # rows come right-padded

    def attend(self, layer_id: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> None:
        """No in-place path: attention gathers (the buffers are contiguous already, so gathering is free)."""
        return None
