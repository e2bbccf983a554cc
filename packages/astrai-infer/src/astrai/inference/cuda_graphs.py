"""`DecodeGraphs`: decode steps recorded once as CUDA graphs and replayed, one graph per step shape.

A decode step of a small model on a GPU is launch-bound: a few hundred kernels of microseconds each, issued one
by one from Python. Replaying a recorded graph issues them all at once. A graph replays fixed shapes and fixed
addresses, so every step of `rows` decodes is fed through tensors of one fixed shape per *bucket*: the batch is
padded to the next batch bucket (1, 2, 4, ... up to `max_batch`) and the page tables to the next page bucket
(1, 2, 4, ... up to the pages of `max_seq_len`). The step's inputs (token ids, positions, write slots, lengths,
page tables) are one int64 tensor on the device, refilled by one host-to-device copy before each replay; the
model sees them through a `StaticDecodeView` (packed, one token per row). Padding rows write to the cache's
scratch page and attend over it; their logits are dropped.

An engine records every bucket's graph when it starts (`record_all`; a few tens of milliseconds each, into one
shared memory pool); a `DecodeGraphs` used alone records each on first use.
With `capture=False` the same fixed-shape step runs eagerly: what the CPU tests check against the engine's
other paths, and the GPU tests against the replayed graphs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from astrai.inference.cache import KVCache
from astrai.inference.cache.view import StaticDecodeView

logger = logging.getLogger(__name__)


class CaptureError(RuntimeError):
    """Recording a decode step as a CUDA graph failed (an operation that cannot be captured); the caller runs
    its steps eagerly instead."""


def serves(model: nn.Module, page_cache: KVCache) -> bool:
    """Whether decode steps of `model` over `page_cache` can run at fixed shape: GQA cache entries and dense
    feed-forward layers (mixture-of-experts routing sizes its work from the data)."""
    storage = page_cache.storage
    config = getattr(model, "config", None)
    return (
        len(storage.k_shape) == 2
        and storage.k_shape == storage.v_shape
        and getattr(config, "ffn_type", "mlp") == "mlp"
        and getattr(config, "attn_type", "gqa") == "gqa"
    )


def buckets(limit: int) -> list[int]:
    """1, 2, 4, ... below `limit`, then `limit`."""
    sizes = [1]
    while sizes[-1] * 2 < limit:
        sizes.append(sizes[-1] * 2)
    return sizes + [limit] if limit > 1 else sizes


class _Step:
    """One bucket's fixed-shape decode step: its input tensor, and its graph once recorded."""

    def __init__(self, model: nn.Module, page_cache: KVCache, batch: int, pages: int):
        storage = page_cache.storage
        self.model = model
        self.storage = storage
        self.batch, self.pages = batch, pages
        device = storage.device
        # ids, positions, write slots, lengths (batch each), then the page tables (batch * pages).
        self.inputs = torch.empty(4 * batch + batch * pages, dtype=torch.int64, device=device)
        self.inputs.copy_(torch.tensor(self.values([], [], [])))  # all padding
        self.last_rows = torch.arange(batch, device=device)  # every row's one token gives logits
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # (batch, 1, V), the graph's output

    def values(self, tokens: list[int], positions: list[int], tables: list[list[int]]) -> list[int]:
        """`inputs` for decoding `tokens[b]` at `positions[b]` through page table `tables[b]` (which covers it),
        padded to the bucket's rows and pages."""
        pad = self.batch - len(tokens)
        ps, scratch_page = self.storage.page_size, self.storage.num_pages
        return (
            [*tokens, *[0] * pad]
            + [*positions, *[0] * pad]
            + [t[p // ps] * ps + p % ps for t, p in zip(tables, positions, strict=True)]
            + [self.storage.scratch_slot] * pad
            + [p + 1 for p in positions]
            + [1] * pad
            + [page for t in tables for page in t + [scratch_page] * (self.pages - len(t))]
            + [scratch_page] * (pad * self.pages)
        )

    def forward(self) -> torch.Tensor:
        batch, pages = self.batch, self.pages
        ids, positions, slots, lengths, tables = self.inputs.split([batch] * 4 + [batch * pages])
        view = StaticDecodeView(self.storage, slots, tables.view(batch, pages), lengths)
        with torch.inference_mode():
            out = self.model(
                input_ids=ids[None], position_ids=positions[None], logits_index=self.last_rows, paged_cache=view
            )
        return out["logits"]

    def capture(self, pool) -> None:
        """Record the step (its inputs are padding rows now: the warm-up run writes only the scratch page).

        As `torch.cuda.graph` does, but without its `gc.collect()` per graph (a tenth of a second each with a
        large Python heap, and an engine records dozens)."""
        device = self.inputs.device
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            self.forward()  # warm-up: lazy initialisations happen outside the capture
            torch.cuda.synchronize(device)
            graph.capture_begin(pool, capture_error_mode="thread_local")
            try:
                self.logits = self.forward()
            finally:
                graph.capture_end()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = graph

    def run(self, values: list[int]) -> torch.Tensor:
        self.inputs.copy_(torch.tensor(values, dtype=torch.int64))
        if self.graph is None:
            return self.forward()
        self.graph.replay()
        return self.logits


class DecodeGraphs:
    """Fixed-shape decode steps for up to `max_batch` rows over `page_cache`, recorded as CUDA graphs when
    `capture` (the cache must live on a CUDA device), else run eagerly (the reference)."""

    def __init__(self, model: nn.Module, page_cache: KVCache, max_batch: int, max_seq_len: int, capture: bool = True):
        if not serves(model, page_cache):
            raise ValueError("decode steps of this model cannot run at fixed shape (DecodeGraphs needs GQA + MLP)")
        if capture and page_cache.storage.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA cache; this one is on {page_cache.storage.device}")
        self.model = model
        self.page_cache = page_cache
        self.capture = capture
        self.batch_buckets = buckets(max_batch)
        self.page_buckets = buckets(-(-max_seq_len // page_cache.page_size))
        self._steps: dict[tuple[int, int], _Step] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None

    def record_all(self) -> None:
        """Record every bucket's graph now (largest first, so that the smaller ones reuse its memory), so that no
        request waits for one; raises CaptureError."""
        for batch in reversed(self.batch_buckets):
            for pages in reversed(self.page_buckets):
                self._step(batch, pages)

    @property
    def recorded(self) -> int:
        """Graphs recorded so far."""
        return sum(step.graph is not None for step in self._steps.values())

    def run(self, task_ids: Sequence[str], tokens: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """Decode `tokens[b]` at `positions[b]` of task `task_ids[b]` (whose pages cover that position);
        (rows, V) logits, valid until the next call."""
        rows = len(task_ids)
        if rows == 0:
            raise ValueError("a decode step needs at least one row")
        ps = self.page_size
        tables = []
        for task_id, pos in zip(task_ids, positions, strict=True):
            pages = self.page_cache.task_pages(task_id)[: pos // ps + 1]
            if len(pages) * ps <= pos:
                raise ValueError(f"task_id={task_id!r}: its pages end before position {pos}")
            tables.append(pages)
        batch = _bucket(rows, self.batch_buckets)
        width = _bucket(max(len(t) for t in tables), self.page_buckets)
        step = self._step(batch, width)
        return step.run(step.values(list(tokens), list(positions), tables))[:rows, 0]

    @property
    def page_size(self) -> int:
        return self.page_cache.page_size

    def _step(self, batch: int, pages: int) -> _Step:
        step = self._steps.get((batch, pages))
        if step is None:
            step = _Step(self.model, self.page_cache, batch, pages)
            if self.capture:
                try:
                    with torch.cuda.device(step.inputs.device):
                        step.capture(self._pool)
                except Exception as exc:
                    raise CaptureError(f"recording the decode step of {batch} rows x {pages} pages: {exc}") from exc
                logger.debug("recorded the decode graph of %d rows x %d pages", batch, pages)
            self._steps[(batch, pages)] = step
        return step


def _bucket(size: int, sizes: list[int]) -> int:
    for bucket in sizes:
        if bucket >= size:
            return bucket
    raise ValueError(f"{size} exceeds the largest bucket, {sizes[-1]}")
