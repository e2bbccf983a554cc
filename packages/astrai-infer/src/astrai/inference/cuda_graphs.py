"""`StepGraphs`: decode steps and one-row prefill chunks recorded once as CUDA graphs and replayed, one graph
per step shape.

A step of a small model on a GPU is launch-bound: a few hundred kernels of microseconds each, issued one by one
from Python (a 0.5B model's decode step: ~27 ms issued eagerly, 2.5 ms replayed on an H200). Replaying a
recorded graph issues them all at once. A graph replays fixed shapes at fixed addresses, so every step is fed
through tensors of one fixed shape per *bucket*:

- a decode step of `rows` tasks, one token each: the rows padded to the next batch bucket (1, 2, 4, ... up to
  `max_batch`);
- a prefill chunk of one task: its tokens padded to the next chunk bucket (16, 32, ... up to `max_chunk`);

and in both the page tables padded to the next page bucket (1, 2, 4, ... up to the pages of `max_seq_len`).
The step's inputs (token ids, positions, write slots, lengths, the rows whose logits are wanted, page tables) are
one int64 tensor on the device, refilled by one host-to-device copy before each replay; the model sees them
through a `StaticStepView` (packed). Padding writes to the cache's scratch page; its logits are never read.

An engine records every bucket's graph when it starts (`record_all`; tens of milliseconds each, into one shared
memory pool). A shape whose recording fails (an operation that cannot be captured, no memory left) runs eagerly
at the same fixed shape. With `capture=False` every step runs so: what the CPU tests check against the engine's
other paths, and the GPU tests against the replayed graphs.

A graph reads the weights at the addresses they had when it was recorded: updates in place (`copy_`, an
optimizer step) are seen, replaced tensors (`load_state_dict(assign=True)`, `param.data = ...`, `.to()`) are not
until `refresh()` (the engine calls it from `reset_prefix_cache()`) records the graphs again. Forward hooks
added after the recording are not part of it.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

import torch
from torch import nn

from astrai.inference.cache import KVCache
from astrai.inference.cache.view import StaticStepView

MIN_CHUNK = 16  # the smallest prefill chunk bucket

logger = logging.getLogger(__name__)


def serves(model: nn.Module, page_cache: KVCache) -> bool:
    """Whether steps of `model` over `page_cache` can run at fixed shape: GQA cache entries and dense
    feed-forward layers (mixture-of-experts routing sizes its work from the data)."""
    config = getattr(model, "config", None)
    return (
        page_cache.storage.per_head
        and getattr(config, "ffn_type", "mlp") == "mlp"
        and getattr(config, "attn_type", "gqa") == "gqa"
    )


def buckets(limit: int, smallest: int = 1) -> list[int]:
    """smallest, 2 * smallest, ... below `limit`, then `limit`."""
    sizes = [min(smallest, limit)]
    while sizes[-1] * 2 < limit:
        sizes.append(sizes[-1] * 2)
    return sizes + [limit] if sizes[-1] < limit else sizes


class _Step:
    """One bucket's fixed-shape step, `rows` rows of `tokens` tokens over `pages` pages: its input tensor, and its
    graph once recorded."""

    def __init__(self, model: nn.Module, page_cache: KVCache, rows: int, tokens: int, pages: int):
        self.model = model
        self.storage = page_cache.storage
        self.rows, self.tokens, self.pages = rows, tokens, pages
        n = rows * tokens
        # ids, positions, write slots (n each), lengths, logit rows (rows each), page tables (rows * pages).
        self.sizes = [n, n, n, rows, rows, rows * pages]
        self.inputs = torch.empty(sum(self.sizes), dtype=torch.int64, device=self.storage.device)
        self.inputs.copy_(torch.tensor(self.values([])))  # all padding
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # (rows, 1, V), the graph's output

    def values(self, chunks: Sequence[tuple[list[int], int, list[int]]]) -> list[int]:
        """`inputs` for rows `(tokens, start, page_table)`: each row's tokens from position `start` through its
        page table (which covers them), padded to the bucket's rows, tokens and pages."""
        ps, scratch_slot, scratch_page = self.storage.page_size, self.storage.scratch_slot, self.storage.num_pages
        ids, positions, slots, lengths, last, tables = [], [], [], [], [], []
        for r, (chunk, start, table) in enumerate(chunks):
            n, pad = len(chunk), self.tokens - len(chunk)
            ids += chunk + [0] * pad
            positions += [*range(start, start + n), *[start + n - 1] * pad]
            slots += [table[p // ps] * ps + p % ps for p in range(start, start + n)] + [scratch_slot] * pad
            lengths.append(start + n)
            last.append(r * self.tokens + n - 1)
            tables += table + [scratch_page] * (self.pages - len(table))
        pad_rows = self.rows - len(chunks)
        n = pad_rows * self.tokens
        return (
            ids + [0] * n
            + positions + [0] * n
            + slots + [scratch_slot] * n
            + lengths + [1] * pad_rows
            + last + [(len(chunks) + r) * self.tokens for r in range(pad_rows)]
            + tables + [scratch_page] * (pad_rows * self.pages)
        )  # fmt: skip

    def forward(self) -> torch.Tensor:
        ids, positions, slots, lengths, last, tables = self.inputs.split(self.sizes)
        view = StaticStepView(
            self.storage, slots, tables.view(self.rows, self.pages), lengths, positions.view(self.rows, self.tokens)
        )
        with torch.inference_mode():
            out = self.model(input_ids=ids[None], position_ids=positions[None], logits_index=last, paged_cache=view)
        return out["logits"]

    def capture(self, pool, stream: torch.cuda.Stream) -> None:
        """Record the step on `stream` (its inputs are padding now: the warm-up run writes only the scratch page).

        As `torch.cuda.graph` does, but without its `gc.collect()` per graph (in some torch versions; a tenth of
        a second each with a large Python heap, and an engine records dozens)."""
        device = self.inputs.device
        stream.wait_stream(torch.cuda.current_stream(device))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.stream(stream):
            self.forward()  # warm-up: lazy initialisations happen outside the capture
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()  # the warm-up's blocks: a capture cannot take cached blocks back
            graph.capture_begin(pool, capture_error_mode="thread_local")
            try:
                logits = self.forward()
            except BaseException:
                try:
                    graph.capture_end()
                except RuntimeError:  # the capture is invalid anyway; report what broke it
                    pass
                raise
            graph.capture_end()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph, self.logits = graph, logits

    def run(self, chunks: Sequence[tuple[list[int], int, list[int]]]) -> torch.Tensor:
        """(len(chunks), V) logits of each row's last token, valid until the next step of any shape (graphs share
        one memory pool; run eagerly, the next run of this step overwrites them)."""
        self.inputs.copy_(torch.tensor(self.values(chunks), dtype=torch.int64))
        if self.graph is not None:
            self.graph.replay()
        elif self.logits is None:
            self.logits = self.forward()
        else:  # eagerly, into the same tensor: what callers get is overwritten by the next run, as with a graph
            with torch.inference_mode():
                self.logits.copy_(self.forward())
        return self.logits[: len(chunks), 0]


class StepGraphs:
    """Fixed-shape steps over `page_cache`: decodes of up to `max_batch` rows and one-row prefill chunks of up to
    `max_chunk` tokens, for sequences of up to `max_seq_len` positions; recorded as CUDA graphs when `capture`
    (the cache must live on a CUDA device), else run eagerly (the reference)."""

    def __init__(
        self,
        model: nn.Module,
        page_cache: KVCache,
        max_batch: int,
        max_chunk: int,
        max_seq_len: int,
        capture: bool = True,
    ):
        if not serves(model, page_cache):
            raise ValueError("steps of this model cannot run at fixed shape (StepGraphs needs GQA + MLP)")
        if capture and page_cache.storage.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA cache; this one is on {page_cache.storage.device}")
        self.model = model
        self.page_cache = page_cache
        self.capture = capture
        self.batch_buckets = buckets(max_batch)
        self.chunk_buckets = buckets(min(max_chunk, max_seq_len), MIN_CHUNK)
        self.page_buckets = buckets(-(-max_seq_len // page_cache.page_size))
        self._steps: dict[tuple[int, int, int], _Step] = {}  # (rows, tokens, pages) -> step
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self._stream = torch.cuda.Stream(device=page_cache.storage.device) if capture else None
        self._weights = self._weight_addresses()  # what the graphs read

    def record_all(self) -> None:
        """Record every bucket's graph now (largest first, so that the smaller ones reuse its memory), so that no
        request waits for one. Chunks are recorded only over the page counts that can hold them (a chunk in a
        bucket of T tokens, but the smallest, brings more than T / 2)."""
        ps, smallest = self.page_cache.page_size, self.chunk_buckets[0]
        shapes = [(rows, 1) for rows in self.batch_buckets]
        shapes += [(1, tokens) for tokens in self.chunk_buckets if tokens > 1]
        for rows, tokens in sorted(shapes, key=lambda shape: -shape[0] * shape[1]):
            for pages in reversed(self.page_buckets):
                if tokens <= smallest or pages * ps > tokens // 2:
                    self._step(rows, tokens, pages)

    def refresh(self) -> None:
        """Record the graphs again if a weight tensor was replaced since they were recorded (see the module doc)."""
        weights = self._weight_addresses()
        if weights == self._weights:
            return
        recorded = list(self._steps)
        self._steps.clear()
        self._weights = weights
        for shape in recorded:
            self._step(*shape)

    def _weight_addresses(self) -> list[tuple[int, torch.dtype, torch.Size]]:
        tensors = itertools.chain(self.model.parameters(), self.model.buffers())
        return [(t.data_ptr(), t.dtype, t.shape) for t in tensors]

    @property
    def recorded(self) -> int:
        """Graphs recorded so far."""
        return sum(step.graph is not None for step in self._steps.values())

    def decode(self, task_ids: Sequence[str], tokens: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """Decode `tokens[b]` at `positions[b]` of task `task_ids[b]` (whose pages cover that position);
        (rows, V) logits, valid until the next step."""
        if not task_ids:
            raise ValueError("a decode step needs at least one row")
        chunks = [self._row(t, [token], pos) for t, token, pos in zip(task_ids, tokens, positions, strict=True)]
        width = _bucket(max(len(table) for *_, table in chunks), self.page_buckets)
        return self._step(_bucket(len(chunks), self.batch_buckets), 1, width).run(chunks)

    def prefill(self, task_id: str, tokens: Sequence[int], start: int) -> torch.Tensor:
        """Feed `tokens` from position `start` of task `task_id` (whose pages cover them); (1, V) logits of the
        last, valid until the next step."""
        if not tokens:
            raise ValueError("a prefill chunk needs at least one token")
        chunk = self._row(task_id, list(tokens), start)
        step = self._step(1, _bucket(len(tokens), self.chunk_buckets), _bucket(len(chunk[2]), self.page_buckets))
        return step.run([chunk])

    def _row(self, task_id: str, tokens: list[int], start: int) -> tuple[list[int], int, list[int]]:
        """(tokens, start, the pages up to the last token's), checked."""
        ps, end = self.page_cache.page_size, start + len(tokens)
        pages = self.page_cache.task_pages(task_id)[: (end - 1) // ps + 1]
        if len(pages) * ps < end:
            raise ValueError(f"task_id={task_id!r}: its pages end before position {end - 1}")
        return tokens, start, pages

    def _step(self, rows: int, tokens: int, pages: int) -> _Step:
        step = self._steps.get((rows, tokens, pages))
        if step is None:
            step = _Step(self.model, self.page_cache, rows, tokens, pages)
            if self.capture:
                try:
                    step.capture(self._pool, self._stream)
                except Exception:  # this shape runs eagerly (a fresh step: nothing of the failed capture)
                    shape = f"{rows} rows x {tokens} tokens x {pages} pages"
                    logger.warning("recording the step of %s failed; it runs without a graph", shape, exc_info=True)
                    step = _Step(self.model, self.page_cache, rows, tokens, pages)
            self._steps[(rows, tokens, pages)] = step
        return step


def _bucket(size: int, sizes: list[int]) -> int:
    for bucket in sizes:
        if bucket >= size:
            return bucket
    raise ValueError(f"{size} exceeds the largest bucket, {sizes[-1]}")
