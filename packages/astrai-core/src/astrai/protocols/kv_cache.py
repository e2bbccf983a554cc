"""The KV-cache view the model's attention layers call during cached (incremental) forward passes.

The model never imports inference code: an inference engine (or the simple contiguous reference cache in
`astrai.model`) binds its storage for one forward step into an object meeting this protocol and passes it
as `paged_cache`. The batch is ragged: row `b` already holds some cached positions and brings `T_b <= T`
new tokens this step (rows are right-padded to `T`; padding is marked by the model's `input_mask`).

For every layer the attention module:
1. computes the entries of this step's tokens, `k`, `v` of shape (B, T, ...) (for GQA the per-head keys and
   values `(B, T, n_kv_heads, head_dim)`; for MLA the KV latent `(B, T, kv_lora_rank)` and the shared RoPE
   key `(B, T, qk_rope_head_dim)`: MLA caches those, not expanded K/V);
2. calls `write(layer_id, k, v)`; the view stores row b's first `T_b` entries at that row's next positions;
3. calls `gather(layer_id)` for every row's entries so far, `(B, S, ...)` with `S = max(seq_lens)`, rows
   right-padded; positions `>= seq_lens[b]` of row b are padding and must be masked out.

A first prefill (no row had cached entries before this step) needs no gather: the step's own entries are the
whole history, and the model attends causally over them. A step of one token per row (a decode) may skip the
gather too: GQA first asks `attend(layer_id, q, k, v, scale)`, which returns the attention of each row's query
over its positions `0 .. seq_lens[b] - 1` computed where the entries lie, or None when the view has no such
path for this step (then the layer gathers as above).

A view may instead be `packed`: the step's tokens then come as one row, input `(1, N)` holding row 0's new
tokens, then row 1's, and so on (`N = sum(T_b)`, no padding), so prefill chunks of any lengths and one-token
decodes share one forward and every projection runs on exactly `N` tokens. The model builds no mask, takes
the caller's `position_ids`, and every attention layer calls `write` with `(1, N, ...)` entries and then
`attend` with `q` `(N, H, d)`: the view attends each query over its own row's positions up to its own (it
never returns None for a packed step). MLA layers do not take packed steps.

A view may also offer `native_attend()`, outside this protocol: for a packed decode step, an object whose
`function` and `context` are the address of a C function and its first argument, `int f(context, layer, q,
n_heads, k, k_stride, v, v_stride, out, scale)`, that stores one layer's new keys and values (rows of k and v
`k_stride` and `v_stride` elements apart) and attends q (contiguous) into out, as `write` then `attend` would,
returning 0 or an error status that `errors` names; its `dtype`, `rows`, `n_layers`, `n_kv_heads` and `head_dim`
say what it was bound for. None for any other step. The model's CPU decode step then runs every layer in one C
call (`astrai.model.cpu_step`).

Key slot `j` of row `b` holds the token at absolute position `j`. Queries carry their absolute positions
(`position_ids`, which the caller passes when it uses a cache), so query at position `p` attends to keys
`j <= p` with `j < seq_lens[b]`.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class KVCacheView(Protocol):
    @property
    def seq_lens(self) -> Any:
        """(B,) int64 tensor: valid cached positions per row once this step's entries are written."""
        ...

    def write(self, layer_id: int, k: Any, v: Any) -> None:
        """Store this step's entries (B, T, ...) for `layer_id` ((1, N, ...) for a packed step)."""
        ...

    def gather(self, layer_id: int) -> tuple[Any, Any]:
        """Every row's cached entries for `layer_id`, (B, S, ...) each, right-padded."""
        ...

    @property
    def packed(self) -> bool:
        """True when the step's tokens come as one unpadded row (see the module docstring)."""
        ...

    def attend(self, layer_id: int, q: Any, k: Any, v: Any, scale: float) -> Any | None:
        """q (N, H, d): the step's queries in token order (one per row in a padded decode step); k, v (N, ...):
        their entries as just written. Returns (N, H, d), each query attending over its row's positions up to
        its own (query head h reads KV head h // (H // Hkv)), or None when this view cannot compute it in place."""
        ...
