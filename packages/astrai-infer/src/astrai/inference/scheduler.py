"""`InferenceScheduler`: the continuous-batching loop. One thread owns the cache, the queues and every task.

A step, repeated while there is work (the thread sleeps on a condition otherwise, never polls):

1. **Intake**: move newly submitted tasks into the waiting queue; retire cancelled tasks (their flag is set
   by any thread, acted on only here) and free their pages.
2. **Plan**, oldest running task first. A task with one token pending (its last sampled token) decodes: its
   page table is grown to cover the new position; if no page is left, the *newest* running task is preempted
   (pages freed, back to the head of the waiting queue, recomputed later from prompt + generated-so-far)
   until the page fits. A task with more pending tokens is prefilling: it gets a chunk of at most the
   remaining per-step prefill budget (`max_prefill_tokens`), so a long prompt is spread over several steps
   and never stalls the decoders for long.
3. **Admit** waiting tasks, first come first served, while the batch has room, the step's prefill budget is
   not spent and the cache can hold the task's whole sequence (its longest cached prefix is reused). A task
   that does not fit waits at the head; the loop retries when the next step has changed something.
4. **Run** one forward for the whole step when the cache takes packed steps (the CPU paged attention
   kernel serves it): every prefill chunk and every decode, back to back in one unpadded row, so no token is
   padding and the decodes ride along with the prefill. Otherwise (MLA, CUDA, float16, head sizes the kernel
   does not take, no C compiler, `ASTRAI_NATIVE_KERNELS=0`) the prefill chunks run first, sharing a forward
   only while right-padding them to the longest wastes at most a quarter of its tokens (on a CPU prefill is
   compute-bound, so padding is pure loss; a lone long chunk runs alone), then one forward for all decodes
   (one token per row, each row at its own position). On CUDA each of these steps replays a recorded graph
   (`astrai.inference.cuda_graphs`; a prefill forward one per chunk). A task whose sequence is now fully in the
   cache samples its next token from the logits of its last token, so the first generated token comes from the
   prefill itself (defect 1 of the original).
5. **Emit**: each sampled token is checked against the task's stop tokens, `max_tokens` and stop strings and
   streamed as text; finished tasks free their pages (their full pages stay in the prefix cache).

Failures stay local: an exception while handling one task fails that task ("error"); a batched forward that
fails is run again in parts (each prefill chunk alone, the decodes together; a forward's cache writes are
idempotent) and the part that fails again fails its tasks; anything else fails the running tasks; the loop
carries on.
When the loop stops (`stop()`), every task it still holds gets a final "cancelled" event.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from astrai.inference.cache import KVCache
from astrai.inference.executor import Executor
from astrai.inference.openmp import release_thread_pool
from astrai.inference.stats import SchedulerStats
from astrai.inference.stream import GenerationEvent, TokenLogprob, token_logprobs
from astrai.inference.task import Task, TaskStatus
from astrai.inference.task_manager import TaskManager

logger = logging.getLogger(__name__)

_MAX_PADDING = 0.25  # prefill chunks share a forward while padding stays below this share of its tokens
_PREFILL_TOKENS_CPU = 512  # default prompt tokens per step: prefill is compute-bound there, decodes wait on it
_PREFILL_TOKENS_GPU = 2048


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: must be a positive integer")
    return value


class InferenceScheduler:
    """Continuous batching over a paged KV cache, run by one background thread (`start()` / `stop()`)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        max_batch_size: int = 16,
        max_seq_len: int | None = None,
        page_size: int = 16,
        num_pages: int | None = None,
        max_queue: int = 256,
        max_prefill_tokens: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        pack_weights: bool = True,
        cuda_graphs: bool = True,
    ):
        config = model.config
        self.max_batch_size = _positive_int("max_batch_size", max_batch_size)
        self.max_seq_len = _positive_int("max_seq_len", max_seq_len if max_seq_len is not None else config.max_len)
        self.page_size = _positive_int("page_size", page_size)
        param = next(model.parameters())
        device = torch.device(device) if device is not None else param.device
        if max_prefill_tokens is None:  # a GPU computes a long chunk in the time it launches a short one
            max_prefill_tokens = _PREFILL_TOKENS_CPU if device.type == "cpu" else _PREFILL_TOKENS_GPU
        self.max_prefill_tokens = _positive_int("max_prefill_tokens", max_prefill_tokens)
        pages_per_seq = -(-self.max_seq_len // self.page_size)
        num_pages = self.max_batch_size * pages_per_seq if num_pages is None else num_pages
        if _positive_int("num_pages", num_pages) < pages_per_seq:
            raise ValueError(
                f"num_pages={num_pages}: the cache must hold one sequence of max_seq_len={self.max_seq_len} "
                f"tokens, i.e. at least {pages_per_seq} pages of {self.page_size}"
            )
        self._page_cache = KVCache.from_config(config, num_pages, self.page_size, dtype or param.dtype, device)
        self._executor = Executor(
            model,
            tokenizer,
            self._page_cache,
            device,
            pack_weights,
            static_steps=cuda_graphs and device.type == "cuda",
            max_batch_size=self.max_batch_size,
            max_chunk=self.max_prefill_tokens,
            max_seq_len=self.max_seq_len,
        )
        self._task_mgr = TaskManager(tokenizer, max_queue, self.max_seq_len)
        self._running = False
        self._loop_thread: threading.Thread | None = None
        self._reset_prefix = threading.Event()  # set by reset_prefix_cache (any thread), applied by the loop
        self._stats = SchedulerStats(self.max_seq_len)
        self._publish_stats()

    @property
    def page_cache(self) -> KVCache:
        return self._page_cache

    @property
    def executor(self) -> Executor:
        return self._executor

    @property
    def task_manager(self) -> TaskManager:
        return self._task_mgr

    # ---- any thread -------------------------------------------------------------------------------------

    def add_task(
        self,
        prompt: str | Sequence[int],
        max_tokens: int | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stream_callback: Callable[[GenerationEvent], None] | None = None,
        stop: Sequence[str] | None = None,
        **sampling: Any,
    ) -> str:
        """Queue a request (text, encoded with the tokenizer, or token ids); its events go to
        `stream_callback`. Returns the task id (`TaskManager.add_task`).

        `max_tokens` is capped so that prompt + output fit `max_seq_len`; `sampling` holds the other `Task`
        parameters (penalties, seed, logit_bias, stop_token_ids). Raises ValueError for a bad request,
        QueueFullError when the queue is full, LoopStoppedError once the loop has stopped.
        """
        task_id = self._task_mgr.add_task(
            prompt, max_tokens, temperature, top_p, top_k, stream_callback=stream_callback, stop=stop, **sampling
        )
        if threading.current_thread() is not self._loop_thread:
            release_thread_pool()  # the caller now waits for the loop: its idle workers would crowd the loop's
        return task_id

    def remove_task(self, task_id: str) -> bool:
        """Cancel a task: the loop ends it at its next step ("cancelled") and frees its pages."""
        return bool(self._task_mgr.remove_task(task_id))

    def start(self) -> None:
        if self._loop_thread is not None:
            return
        self._running = True
        self._loop_thread = threading.Thread(target=self._loop, name="astrai-inference-loop", daemon=True)
        self._loop_thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the loop; every task still queued or running gets a final "cancelled" event."""
        self._task_mgr.close()
        if self._loop_thread is None:
            self._end_all("cancelled")  # never started: no loop to do it, and none will touch the queues
            self._executor.close()
        elif self._loop_thread is not threading.current_thread():
            self._loop_thread.join(timeout)

    def reset_prefix_cache(self) -> None:
        """Tasks submitted after this call never reuse KV computed before it (the loop applies it at its next
        step, before admitting anything). Call it after changing the model's weights, e.g. between RL steps."""
        self._reset_prefix.set()
        self._task_mgr.wake()

    def is_alive(self) -> bool:
        return self._loop_thread is not None and self._loop_thread.is_alive() and self._running

    def get_stats(self) -> dict[str, Any]:
        """Counters and gauges as of the last step (see `SchedulerStats`), plus queue depth and liveness."""
        stats = self._stats.snapshot()
        stats["waiting"] = self._task_mgr.num_waiting
        stats["loop_alive"] = self.is_alive()
        return stats

    # ---- the loop ---------------------------------------------------------------------------------------

    def _loop(self) -> None:
        reason = "cancelled"
        try:
            while True:
                self._task_mgr.wait_for_work(on_idle=release_thread_pool)  # see astrai.inference.openmp
                if self._task_mgr.closed:
                    break
                try:
                    self._step()
                except Exception as exc:  # a bug outside per-task handling: fail what runs, keep serving
                    logger.exception("inference step failed")
                    self._fail(self._task_mgr.get_active_tasks(), f"{type(exc).__name__}: {exc}")
                self._publish_stats()
        except BaseException:
            reason = "error"
            logger.exception("inference loop died")
            raise
        finally:
            self._running = False
            self._task_mgr.close()
            self._end_all(reason)
            self._executor.close()
            self._publish_stats()

    def _step(self) -> None:
        if self._reset_prefix.is_set():
            self._reset_prefix.clear()
            self._page_cache.reset_prefix_cache()
            self._executor.weights_updated()
        self._task_mgr.drain_inbox()
        for task in self._task_mgr.get_active_tasks() + self._task_mgr.get_waiting_tasks():
            if task.cancelled:
                self._finish(task, "cancelled")
        prefill, chunk_lens, decode = self._plan()
        generated = 0
        if prefill and self._executor.packs_steps:  # one unpadded forward for the whole step
            generated += self._run(prefill, chunk_lens, decode)
        else:
            for tasks, lens in _padding_groups(prefill, chunk_lens):
                generated += self._run(tasks, lens, [])
            if decode:
                generated += self._run([], [], decode)
        self._stats.step(generated)

    def _plan(self) -> tuple[list[Task], list[int], list[Task]]:
        """This step's prefill chunks (tasks and lengths) and decodes, after growth, preemption and admission."""
        budget = self.max_prefill_tokens
        prefill: list[Task] = []
        chunk_lens: list[int] = []
        decode: list[Task] = []
        preemptions = self._stats.counters["preemptions"]
        for task in self._task_mgr.get_active_tasks():
            if task.status is not TaskStatus.RUNNING:
                continue  # preempted earlier in this loop
            pending = _pending(task)
            if pending == 1:
                if self._grow(task):
                    decode.append(task)
            elif budget > 0:
                n = min(pending, budget)
                budget -= n
                prefill.append(task)
                chunk_lens.append(n)
        # Preemption may have removed tasks already planned.
        keep = [i for i, t in enumerate(prefill) if t.status is TaskStatus.RUNNING]
        prefill, chunk_lens = [prefill[i] for i in keep], [chunk_lens[i] for i in keep]
        decode = [t for t in decode if t.status is TaskStatus.RUNNING]

        if self._stats.counters["preemptions"] > preemptions:
            return prefill, chunk_lens, decode  # pages ran short this step: admitting now would only thrash
        while budget > 0 and self._task_mgr.waiting_queue and len(self._task_mgr.active_tasks) < self.max_batch_size:
            task = self._task_mgr.waiting_queue[0]
            if not self._page_cache.task_alloc(task.task_id, task.all_ids):
                break
            self._admit(self._task_mgr.pull_candidates(1)[0])
            pending = _pending(task)
            if pending == 1:
                decode.append(task)  # the whole sequence but its last token came from the prefix cache
            else:
                n = min(pending, budget)
                budget -= n
                prefill.append(task)
                chunk_lens.append(n)
        return prefill, chunk_lens, decode

    def _admit(self, task: Task) -> None:
        cached = self._page_cache.task_cached(task.task_id)
        task.status = TaskStatus.RUNNING
        if task.scheduled_time is None:
            task.scheduled_time = time.monotonic()
        task.cached_tokens = cached
        task.next_pos = cached
        self._task_mgr.activate(task)
        self._stats.count("prefix_hit_tokens", cached)
        if not task.output_ids:  # first admission (not a recomputation after preemption)
            self._task_mgr.stream(task.task_id).cached_tokens = min(cached, task.input_tokens)
            self._stats.count("prompt_tokens_total", task.input_tokens)

    def _grow(self, task: Task) -> bool:
        """Give `task` a page for its next position, preempting the newest tasks if needed; False if `task`
        itself was preempted."""
        while not self._page_cache.task_extend(task.task_id, task.next_pos):
            running = [t for t in self._task_mgr.active_tasks if t.status is TaskStatus.RUNNING]
            victim = max(running, key=lambda t: t.arrival_time)
            self._preempt(victim)
            if victim is task:
                return False
        return True

    def _preempt(self, task: Task) -> None:
        self._release_pages(task)
        task.status = TaskStatus.PENDING
        task.next_pos = 0
        self._task_mgr.return_to_waiting([task])
        self._stats.count("preemptions")

    def _run(self, prefill: list[Task], chunk_lens: list[int], decode: list[Task]) -> int:
        """One batched forward of prefill chunks (`chunk_lens[i]` tokens of `prefill[i]`) and decodes, then
        sampling and streaming for every task whose sequence is complete. Returns the tokens generated."""
        tasks = prefill + decode
        lens = chunk_lens + [1] * len(decode)
        try:
            if prefill:
                logits = self._executor.forward(tasks, lens)
            else:
                logits = self._executor.forward_decode(decode)
        except Exception as exc:
            if prefill and len(tasks) > 1:  # find the culprit: each chunk alone, the decodes together
                logger.warning("batched forward failed for %d tasks (%s); running its parts alone", len(tasks), exc)
                parts = [([task], [n], []) for task, n in zip(prefill, chunk_lens, strict=True)]
                return sum(self._run(*part) for part in parts + ([([], [], decode)] if decode else []))
            logger.exception("batched forward failed for %d tasks", len(tasks))
            self._fail(tasks, f"model forward failed: {type(exc).__name__}: {exc}")
            return 0
        for task, n in zip(tasks, lens, strict=True):
            task.next_pos += n
        for task in prefill:  # publish the freshly computed full pages to the prefix cache
            self._page_cache.task_record_hashes(task.task_id, task.all_ids[: task.next_pos])
        rows = [i for i, t in enumerate(tasks) if _pending(t) == 0]
        if not rows:
            return 0
        ready = [tasks[i] for i in rows]
        tokens = self._sample(ready, logits[rows])
        logprobs = _token_logprobs(ready, logits[rows], tokens)
        generated = 0
        for task, token, logprob in zip(ready, tokens, logprobs, strict=True):
            if token is not None:
                self._accept(task, token, logprob)
                generated += 1
        return generated

    def _sample(self, tasks: list[Task], logits: torch.Tensor) -> list[int | None]:
        try:
            return self._executor.sample(tasks, logits)
        except Exception:
            pass  # some row's parameters broke the batch: sample row by row to find and fail it alone
        tokens: list[int | None] = []
        for row, task in enumerate(tasks):
            try:
                tokens += self._executor.sample([task], logits[row : row + 1])
            except Exception as exc:
                self._finish(task, "error", f"sampling failed: {type(exc).__name__}: {exc}")
                tokens.append(None)
        return tokens

    def _accept(self, task: Task, token: int, logprob: TokenLogprob | None = None) -> None:
        """Record a sampled token, stream it, and finish the task if it hit a stop condition."""
        try:
            previous = task.last_token_time
            task.append_token(token)
            output = self._task_mgr.stream(task.task_id)
            if previous is None:
                self._stats.first_token(task.first_token_time - task.arrival_time)
                if task.prompt_logprobs is not None:  # sent with the first event
                    output.prompt_logprobs = self._prompt_logprobs(task)
            else:
                self._stats.next_token(task.last_token_time - previous)
            self._stats.count("generation_tokens_total")
            reason = task.stop_reason()
            output.push(token, visible=reason != "stop", logprob=logprob)
            if output.matched_stop is not None:
                self._finish(task, "stop_sequence")
            elif reason is not None:
                self._finish(task, reason)
        except Exception as exc:
            logger.exception("handling the output of task %s failed", task.task_id)
            self._finish(task, "error", f"{type(exc).__name__}: {exc}")

    def _prompt_logprobs(self, task: Task) -> list[TokenLogprob]:
        """Log-probabilities of the prompt's tokens after the first, from one reference forward over the prompt."""
        logits = self._executor.sequence_logits(task.prompt_ids)[:-1]  # position t predicts token t + 1
        return token_logprobs(logits, task.prompt_ids[1:], [task.prompt_logprobs] * (len(task.prompt_ids) - 1))

    def _finish(self, task: Task, reason: str, error: str | None = None) -> None:
        """Retire `task` with `reason`: free its pages, drop it from the queues, send its final event."""
        if task.status in (TaskStatus.FINISHED, TaskStatus.ABORTED):
            return
        if task.status is TaskStatus.RUNNING:
            self._release_pages(task)
        output = self._task_mgr.finish(task, reason, error)
        counter = {"cancelled": "requests_cancelled", "error": "requests_failed"}.get(reason, "requests_finished")
        self._stats.count(counter)
        self._stats.request_finished(task)
        if output is None:
            return
        self._publish_stats()  # whoever reads the final event then sees stats that include it
        try:
            output.finish(reason, error)
        except Exception:
            logger.exception("delivering the final event of task %s failed", task.task_id)

    def _fail(self, tasks: list[Task], error: str) -> None:
        for task in tasks:
            try:
                self._finish(task, "error", error)
            except Exception:  # even bookkeeping broke for this task: drop it rather than stop the loop
                logger.exception("failing task %s failed", task.task_id)
                if task in self._task_mgr.active_tasks:
                    self._task_mgr.active_tasks.remove(task)

    def _release_pages(self, task: Task) -> None:
        # Keep what was computed reusable: full pages of the cached sequence go to the prefix index first.
        self._page_cache.task_record_hashes(task.task_id, task.all_ids[: task.next_pos])
        self._page_cache.task_free(task.task_id)

    def _end_all(self, reason: str) -> None:
        """The loop is stopping: end every task still queued or running."""
        self._task_mgr.drain_inbox()
        for task in self._task_mgr.get_active_tasks() + self._task_mgr.get_waiting_tasks():
            try:
                self._finish(task, reason)
            except Exception:
                logger.exception("ending task %s failed", task.task_id)
        self._task_mgr.active_tasks.clear()
        self._task_mgr.waiting_queue.clear()

    def _publish_stats(self) -> None:
        cache = self._page_cache
        self._stats.publish(
            running=len(self._task_mgr.active_tasks),
            pages_total=cache.num_pages,
            pages_used=cache.num_used_pages,
            pages_cached=cache.num_cached_pages,
            pages_free=cache.num_free_pages,
            max_batch_size=self.max_batch_size,
            max_seq_len=self.max_seq_len,
            page_size=self.page_size,
        )


def _pending(task: Task) -> int:
    """Tokens of the task's sequence not yet in the cache (1 for a decoding task: its last sampled token)."""
    return len(task.prompt_ids) + len(task.output_ids) - task.next_pos


def _padding_groups(tasks: list[Task], lens: list[int]) -> list[tuple[list[Task], list[int]]]:
    """Split prefill chunks into forwards, longest first, each padded to its longest chunk by at most
    `_MAX_PADDING` of its tokens."""
    groups: list[list[int]] = []
    for i in sorted(range(len(tasks)), key=lambda i: -lens[i]):
        group = groups[-1] if groups else None
        if group is not None and lens[group[0]] * (len(group) + 1) <= (1 + _MAX_PADDING) * (
            sum(lens[j] for j in group) + lens[i]
        ):
            group.append(i)
        else:
            groups.append([i])
    return [([tasks[i] for i in g], [lens[i] for i in g]) for g in groups]


def _token_logprobs(tasks: list[Task], logits: torch.Tensor, tokens: list[int | None]) -> list[TokenLogprob | None]:
    """Each sampled token's log-probability (log-softmax of the model's logits, before the sampling filters) and
    the task's `logprobs` most likely tokens, for the tasks that asked; None for the others."""
    rows = [i for i, (task, token) in enumerate(zip(tasks, tokens, strict=True))
            if task.logprobs is not None and token is not None]  # fmt: skip
    out: list[TokenLogprob | None] = [None] * len(tasks)
    found = token_logprobs(logits[rows], [tokens[i] for i in rows], [tasks[i].logprobs for i in rows])
    for i, logprob in zip(rows, found, strict=True):
        out[i] = logprob
    return out
