"""`Executor`: one batched model forward over a ragged batch of tasks, and the sampling of their next tokens.

Every row of a step is one task feeding `n_b` tokens starting at its position `task.next_pos` (a prefill
chunk, or `n_b = 1` for a decode). The batch is right-padded to `T = max(n_b)`:

    input_ids    (B, T)  the tokens, 0 in padding
    input_mask   (B, T)  1 for real tokens
    position_ids (B, T)  next_pos_b + t; padding repeats the row's last position (never used, always valid)

The KV view is bound with each row's start and length, so row b's new entries land at positions
`next_pos_b ..` of its own pages (padding goes to the cache's scratch page). The LM head runs only at each row's
last real token (`logits_index`): that is where the next token of a finished prefill or of a decode comes from.

When the cache takes packed steps (`KVCache.packs_steps`: the CPU paged attention kernel serves it), the batch
is not padded: `input_ids` and `position_ids` are (1, sum(n_b)), row after row, and the view is bound packed,
so every projection runs on exactly the step's tokens (`astrai.protocols.KVCacheView`).

With `static_steps`, decode steps and prefill chunks run at fixed shapes instead (`astrai.inference.cuda_graphs`;
a prefill of several rows as one step per row): recorded once per shape as CUDA graphs on a CUDA device and
replayed, or run eagerly elsewhere (the reference the tests use).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from astrai.inference import cuda_graphs
from astrai.inference.cache import KVCache
from astrai.inference.sampling import GREEDY_TEMPERATURE, SamplingPipeline
from astrai.inference.task import Task
from astrai.model import pack_linear_weights
from astrai.model.native import fused


class Executor:
    """Runs `model` on batches of tasks over `page_cache`; stateless between steps."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        page_cache: KVCache,
        device: torch.device | None = None,
        pack_weights: bool = False,
        static_steps: bool = False,
        max_batch_size: int = 16,
        max_chunk: int = 512,
        max_seq_len: int | None = None,
    ):
        # static_steps: decodes of up to `max_batch_size` rows and prefill chunks of up to `max_chunk` tokens, of
        # sequences up to `max_seq_len`, at fixed shapes (cuda_graphs.StepGraphs; CUDA graphs on a CUDA device),
        # where the model allows (cuda_graphs.serves).
        self.model = model
        self.tokenizer = tokenizer
        self.page_cache = page_cache
        self.device = device if device is not None else next(model.parameters()).device
        self.packed_layers = pack_linear_weights(model) if pack_weights else 0  # CPU only; see astrai.model.linear
        # Asking builds (or loads) the C kernels now, not in a request: paged attention where it serves this cache,
        # and the model's fused CPU kernels (astrai.model.native.fused) on the CPU.
        self.packs_steps = page_cache.packs_steps
        self.fused_kernels = self.device.type == "cpu" and fused.available()
        self.graphs: cuda_graphs.StepGraphs | None = None
        if static_steps and cuda_graphs.serves(model, page_cache):
            seq_len = max_seq_len if max_seq_len is not None else model.config.max_len
            capture = self.device.type == "cuda"
            self.graphs = cuda_graphs.StepGraphs(model, page_cache, max_batch_size, max_chunk, seq_len, capture)
            if capture:
                self.graphs.record_all()  # at start, as the kernels are built: no request waits

    def close(self) -> None:
        """Drop the packed weight copies and the recorded graphs (if any)."""
        if self.packed_layers:
            pack_linear_weights(self.model, enable=False)
            self.packed_layers = 0
        self.graphs = None

    def weights_updated(self) -> None:
        """The model's weights changed (`InferenceEngine.reset_prefix_cache`): graphs that read weight tensors
        since replaced (not updated in place) are recorded again."""
        if self.graphs is not None:
            self.graphs.refresh()

    def forward(self, tasks: Sequence[Task], num_tokens: Sequence[int]) -> torch.Tensor:
        """Feed `num_tokens[b]` tokens of each task's sequence from `task.next_pos` (a decoding task feeds its
        one pending token); (B, V) last-token logits. Moves no task's progress (the scheduler does)."""
        chunks = [t.all_ids[t.next_pos : t.next_pos + n] for t, n in zip(tasks, num_tokens, strict=True)]
        graphs = self.graphs
        if graphs is not None and max(num_tokens) <= graphs.chunk_buckets[-1]:
            if len(tasks) == 1:
                return graphs.prefill(tasks[0].task_id, chunks[0], tasks[0].next_pos)
            # One step per row, each row's logits copied before the next step can overwrite them.
            pairs = zip(tasks, chunks, strict=True)
            return torch.cat([graphs.prefill(t.task_id, chunk, t.next_pos).clone() for t, chunk in pairs])
        return self._forward(tasks, chunks)

    def forward_decode(self, tasks: Sequence[Task]) -> torch.Tensor:
        """Feed each task's last sampled token at its next position; (B, V) logits."""
        tokens = [t.all_ids[t.next_pos] for t in tasks]
        if self.graphs is not None:
            return self.graphs.decode([t.task_id for t in tasks], tokens, [t.next_pos for t in tasks])
        return self._forward(tasks, [[token] for token in tokens])

    # ---- the architecture document's step API: the tasks' progress moves with each call -----------------

    def execute_prefill(self, tasks: Sequence[Task], prompt_len: int, start_pos: int | None = None) -> list[int | None]:
        """Compute positions `start_pos .. prompt_len - 1` of every task's sequence in one forward (default
        start: each task's `next_pos`, where its cached prefix ends) and move `next_pos` to `prompt_len`.

        A task whose whole sequence is then in the cache samples its next token from this forward's logits (the
        first generated token comes from the prefill itself) and appends it; returns the token per task, None
        for a task that is still prefilling (`prompt_len` short of its sequence). The tasks must hold pages for
        `prompt_len` positions (`KVCache.task_alloc`); positions served by the prefix cache are never written.
        """
        starts = [t.next_pos if start_pos is None else start_pos for t in tasks]
        for task, start in zip(tasks, starts, strict=True):
            cached = self.page_cache.task_cached(task.task_id)
            if not cached <= start < prompt_len <= len(task.prompt_ids) + len(task.output_ids):
                raise ValueError(
                    f"task {task.task_id!r}: prefill of positions {start}..{prompt_len - 1} must lie within its "
                    f"{len(task.all_ids)} tokens, from its {cached} cached ones on"
                )
            task.next_pos = start
        logits = self.forward(tasks, [prompt_len - start for start in starts])
        for task in tasks:
            task.next_pos = prompt_len
        ready = [b for b, t in enumerate(tasks) if len(t.prompt_ids) + len(t.output_ids) == prompt_len]
        tokens: list[int | None] = [None] * len(tasks)
        if ready:
            for b, token in zip(ready, self.sample([tasks[b] for b in ready], logits[ready]), strict=True):
                tasks[b].append_token(token)
                tokens[b] = token
        return tokens

    def execute_decode(self, tasks: Sequence[Task]) -> list[int]:
        """One decode step: feed each task's last token at its `next_pos` (growing its pages to cover it),
        sample the next token with the task's parameters, append it and return them, one per task."""
        for task in tasks:
            pending = len(task.prompt_ids) + len(task.output_ids) - task.next_pos
            if pending != 1:
                raise ValueError(f"task {task.task_id!r}: {pending} tokens not in the cache; a decode feeds one")
            if not self.page_cache.task_extend(task.task_id, task.next_pos):
                raise RuntimeError(f"task {task.task_id!r}: no KV page left for position {task.next_pos}")
        logits = self.forward_decode(tasks)
        for task in tasks:
            task.next_pos += 1
        tokens = self.sample(tasks, logits)
        for task, token in zip(tasks, tokens, strict=True):
            task.append_token(token)
        return tokens

    def sample(self, tasks: Sequence[Task], logits: torch.Tensor) -> list[int]:
        """One token per task from its logits row (B, V), with that task's sampling parameters and seed."""
        if all(t.temperature <= GREEDY_TEMPERATURE for t in tasks):  # no draw needed: every row is greedy
            tokens = SamplingPipeline.for_tasks(tasks, logits.device, greedy=True).apply(logits.float()).argmax(-1)
        else:
            tokens = SamplingPipeline.for_tasks(tasks, logits.device).sample(logits)
        return tokens.tolist()

    def sequence_logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """(T, V) logits at every position of `token_ids`, from the model's reference forward (no KV cache):
        what prompt log-probabilities are read from."""
        with torch.inference_mode():
            return self.model(torch.tensor([list(token_ids)], device=self.device))["logits"][0]

    def _forward(self, tasks: Sequence[Task], chunks: list[list[int]]) -> torch.Tensor:
        lens = [len(c) for c in chunks]
        starts = [t.next_pos for t in tasks]
        inputs = _packed_inputs(chunks, starts, lens) if self.packs_steps else _padded_inputs(chunks, starts, lens)
        view = self.page_cache.bind_tasks([t.task_id for t in tasks], starts, lens, packed=self.packs_steps)
        with torch.inference_mode():
            out = self.model(**{name: t.to(self.device) for name, t in inputs.items()}, paged_cache=view)
            return out["logits"][:, 0]  # (B, V)


def _padded_inputs(chunks: list[list[int]], starts: list[int], lens: list[int]) -> dict[str, torch.Tensor]:
    """(B, T) right-padded ids, mask and positions, and each row's last real token."""
    width = max(lens)
    ids = torch.zeros(len(chunks), width, dtype=torch.int64)
    for row, chunk in enumerate(chunks):
        ids[row, : len(chunk)] = torch.tensor(chunk, dtype=torch.int64)
    new_lens = torch.tensor(lens, dtype=torch.int64)
    steps = torch.arange(width)
    # Padding repeats the row's last real position: a valid position that causes no extra work.
    positions = torch.tensor(starts, dtype=torch.int64)[:, None] + torch.minimum(steps[None, :], new_lens[:, None] - 1)
    return dict(
        input_ids=ids, input_mask=steps[None, :] < new_lens[:, None], position_ids=positions, logits_index=new_lens - 1
    )


def _packed_inputs(chunks: list[list[int]], starts: list[int], lens: list[int]) -> dict[str, torch.Tensor]:
    """(1, N) ids and positions of the rows back to back, and the index of each row's last token."""
    ids = torch.tensor([token for chunk in chunks for token in chunk], dtype=torch.int64)
    positions = torch.tensor([p for s, n in zip(starts, lens, strict=True) for p in range(s, s + n)])
    last = torch.tensor(list(itertools.accumulate(lens)), dtype=torch.int64) - 1
    return dict(input_ids=ids[None], position_ids=positions[None], logits_index=last)
