"""`TaskManager`: the inference loop's queues, and the one thread-safe door into them.

Two sides with different rules:

- **Any thread** calls `add_task` (a new request, a text prompt encoded with `tokenizer` or token ids, enters
  the inbox; `submit` takes an already built `Task` and its `OutputStream`), `remove_task` (raise a task's
  cancellation flag) and `close`. These take the lock, and wake the loop through a condition variable, so the
  loop sleeps when it has nothing to do and no wake-up is ever lost.
- **Only the loop thread** touches `waiting_queue` and `active_tasks`: it moves the inbox into the waiting
  queue (`drain_inbox`, also done by `pull_candidates`), admits (`pull_candidates` / `activate`), preempts
  (`return_to_waiting`) and ends tasks (`finish`, `remove_finished_tasks`). Nothing outside the loop ever
  frees pages or mutates a task's progress (defect 6 of the original).

The `InferenceScheduler` is such a loop; a loop of one's own over a `KVCache` and an `Executor` is another:

    manager = TaskManager(tokenizer)
    manager.add_task("Hello", max_tokens=8, temperature=0)
    for task in manager.pull_candidates(4):      # admit: pages for the prompt, then activate
        cache.task_alloc(task.task_id, task.prompt_ids); task.next_pos = cache.task_cached(task.task_id)
        manager.activate(task)
    executor.execute_prefill(tasks, prompt_len, start_pos); executor.execute_decode(tasks) ...
    for task in manager.remove_finished_tasks(tokenizer.stop_ids):
        cache.task_free(task.task_id)

The queue bound (`max_queue`) counts requests not yet admitted (inbox plus waiting queue): a request beyond
it is refused with `QueueFullError` at submission, so overload is reported instead of queued without end.
"""

from __future__ import annotations

import itertools
import threading
import uuid
from collections import deque
from collections.abc import Callable, Collection, Sequence
from typing import Any

from astrai.inference.stream import OutputStream
from astrai.inference.task import Task, TaskStatus

_FINISHED = ("stop", "stop_sequence", "length")  # the reasons of a FINISHED task; any other ends it ABORTED


class QueueFullError(RuntimeError):
    """Raised at submission when `max_queue` requests already wait for admission."""


class LoopStoppedError(RuntimeError):
    """Raised at submission once the inference loop has stopped (shut down, or died)."""


class TaskManager:
    """Inbox (any thread) -> waiting queue -> active tasks (loop thread), with a condition that wakes the loop.

    `tokenizer` encodes text prompts and decodes each task's output for its stream; `max_seq_len`, when set,
    bounds prompt + output (a prompt leaving no room is refused, `max_tokens` is capped to the room left).
    """

    def __init__(self, tokenizer: Any, max_queue: int = 256, max_seq_len: int | None = None):
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue={max_queue!r}: must be a positive integer")
        if max_seq_len is not None and (isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int)):
            raise ValueError(f"max_seq_len={max_seq_len!r}: must be a positive integer or None")
        if max_seq_len is not None and max_seq_len < 1:
            raise ValueError(f"max_seq_len={max_seq_len!r}: must be a positive integer or None")
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.max_seq_len = max_seq_len
        self.waiting_queue: deque[Task] = deque()  # loop only; preempted tasks re-enter at the head
        self.active_tasks: list[Task] = []  # loop only; admission order
        self._cond = threading.Condition()
        self._inbox: list[Task] = []  # guarded by _cond
        self._live: dict[str, Task] = {}  # every task not yet retired, by id; guarded by _cond
        self._streams: dict[str, OutputStream] = {}  # the event stream of every live task; guarded by _cond
        self._num_waiting = 0  # inbox + waiting queue; guarded by _cond
        self._closed = False  # guarded by _cond
        self._wake = False  # a cancellation or stop request since the loop last looked; guarded by _cond
        self._ids = itertools.count()
        self._id_prefix = uuid.uuid4().hex[:8]

    # ---- any thread -------------------------------------------------------------------------------------

    def new_task_id(self) -> str:
        return f"req-{self._id_prefix}-{next(self._ids)}"

    def add_task(
        self,
        prompt: str | Sequence[int],
        max_tokens: int | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stream_callback: Callable[..., Any] | None = None,
        stop: Sequence[str] | None = None,
        **sampling: Any,
    ) -> str:
        """Queue a request; returns its task id. `prompt` is text (encoded with `tokenizer`) or token ids;
        its events (`GenerationEvent`) go to `stream_callback`, its output is trimmed before the first of the
        `stop` strings, and `sampling` holds the other `Task` parameters (penalties, seed, logit_bias,
        stop_token_ids). Raises ValueError for a bad request, QueueFullError or LoopStoppedError."""
        if prompt == "":
            raise ValueError("prompt is empty: give some text")
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        room = None if self.max_seq_len is None else self.max_seq_len - len(prompt_ids)
        if room is not None and room < 1:
            raise ValueError(
                f"prompt of {len(prompt_ids)} tokens: leaves no room to generate within max_seq_len={self.max_seq_len}"
            )
        task = Task(
            task_id=self.new_task_id(),
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            stream_callback=stream_callback,
            **sampling,
        )  # validates every parameter
        if room is not None:
            task.max_tokens = room if max_tokens is None else min(max_tokens, room)
        return self.submit(task, OutputStream(task, self.tokenizer, stop))

    def submit(self, task: Task, output: OutputStream) -> str:
        """Queue a built `task` and the stream of its events for admission; raises QueueFullError or
        LoopStoppedError instead of queueing."""
        with self._cond:
            if self._closed:
                raise LoopStoppedError("the inference loop is not running")
            if self._num_waiting >= self.max_queue:
                raise QueueFullError(f"{self._num_waiting} requests are already waiting (max_queue={self.max_queue})")
            self._inbox.append(task)
            self._live[task.task_id] = task
            self._streams[task.task_id] = output
            self._num_waiting += 1
            self._cond.notify()
        return task.task_id

    def remove_task(self, task_id: str) -> list[Task]:
        """Cancel a task: raise its cancellation flag and wake the loop, which ends it ("cancelled") at its
        next step and frees its pages. Returns the task cancelled, [] if it is unknown or already ended."""
        with self._cond:
            task = self._live.get(task_id)
            if task is None:
                return []
            task.cancel()
            self._wake = True
            self._cond.notify()
        return [task]

    def wake(self) -> None:
        with self._cond:
            self._wake = True
            self._cond.notify()

    def close(self) -> None:
        """Refuse new tasks from now on and wake the loop (which then ends every task it still holds)."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed

    @property
    def num_waiting(self) -> int:
        with self._cond:
            return self._num_waiting

    # ---- loop thread ------------------------------------------------------------------------------------

    def wait_for_work(self, on_idle: Callable[[], object] | None = None) -> None:
        """Sleep until there is something to do: a new task, a cancellation, a stop, or queued work.
        `on_idle` runs once before sleeping, if the loop has to sleep at all."""
        with self._cond:
            idle = not self._has_work()
        if idle and on_idle is not None:
            on_idle()  # outside the lock: submitters never wait for it
        with self._cond:
            while not self._has_work():
                self._cond.wait()
            self._wake = False

    def _has_work(self) -> bool:  # under _cond
        return bool(self._inbox or self._wake or self._closed or self.active_tasks or self.waiting_queue)

    def drain_inbox(self) -> list[Task]:
        """Move newly submitted tasks to the tail of the waiting queue; returns them."""
        with self._cond:
            inbox, self._inbox = self._inbox, []
        self.waiting_queue.extend(inbox)
        return inbox

    def pull_candidates(self, n: int) -> list[Task]:
        """Up to `n` tasks from the head of the waiting queue, in order (they leave the queue); tasks
        submitted since the last look join its tail first."""
        self.drain_inbox()
        return [self.waiting_queue.popleft() for _ in range(min(n, len(self.waiting_queue)))]

    def stream(self, task_id: str) -> OutputStream:
        """The event stream of a live task."""
        with self._cond:
            return self._streams[task_id]

    def activate(self, task: Task) -> None:
        """An admitted task: it holds pages now and takes part in every step (RUNNING)."""
        task.status = TaskStatus.RUNNING
        self.active_tasks.append(task)
        with self._cond:
            self._num_waiting -= 1

    def return_to_waiting(self, tasks: list[Task]) -> None:
        """Put tasks back at the head of the waiting queue, keeping their order (preempted or not admitted)."""
        for task in tasks:
            if task in self.active_tasks:
                self.active_tasks.remove(task)
                with self._cond:
                    self._num_waiting += 1
        self.waiting_queue.extendleft(reversed(tasks))

    def finish(self, task: Task, reason: str, error: str | None = None) -> OutputStream | None:
        """End `task` with `reason` (FINISHED for "stop", "stop_sequence" and "length", else ABORTED) and
        forget it, active or waiting. Returns its stream, for the caller to send the final event once it has
        freed the task's pages; None if the task had already ended."""
        if task.status in (TaskStatus.FINISHED, TaskStatus.ABORTED):
            return None
        task.finish(TaskStatus.FINISHED if reason in _FINISHED else TaskStatus.ABORTED, reason, error)
        if task in self.active_tasks:
            self.active_tasks.remove(task)
        elif task in self.waiting_queue:
            self.waiting_queue.remove(task)
            with self._cond:
                self._num_waiting -= 1
        with self._cond:
            self._live.pop(task.task_id, None)
            return self._streams.pop(task.task_id, None)

    def remove_finished_tasks(self, stop_ids: Collection[int] = ()) -> list[Task]:
        """End every cancelled task and every active task that generated a stop token (its own or one of
        `stop_ids`) or `max_tokens` tokens, sending each its final event. Returns them: the pages of those
        that were active are the caller's to free (`KVCache.task_free`)."""
        ended = []
        candidates = [(t, "cancelled" if t.cancelled else t.stop_reason(stop_ids)) for t in self.get_active_tasks()]
        candidates += [(t, "cancelled") for t in self.get_waiting_tasks() if t.cancelled]
        for task, reason in candidates:
            if reason is None:
                continue
            stream = self.finish(task, reason)
            if stream is not None:
                stream.finish(reason)
            ended.append(task)
        return ended

    def get_active_tasks(self) -> list[Task]:
        return list(self.active_tasks)

    def get_waiting_tasks(self) -> list[Task]:
        return list(self.waiting_queue)
