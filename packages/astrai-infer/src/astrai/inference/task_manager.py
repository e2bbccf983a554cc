"""`TaskManager`: the inference loop's queues, and the one thread-safe door into them.

Two sides with different rules:

- **Any thread** calls `add_task` (a new request enters the inbox), `cancel` (raise a task's cancellation
  flag) and `close`. These take the lock, and wake the loop through a condition variable, so the loop sleeps
  when it has nothing to do and no wake-up is ever lost.
- **Only the loop thread** touches `waiting_queue` and `active_tasks`: it moves the inbox into the waiting
  queue (`drain_inbox`), admits (`pull_candidates` / `activate`), preempts (`return_to_waiting`) and retires
  tasks. Nothing outside the loop ever frees pages or mutates a task's progress (defect 6 of the original).

The queue bound (`max_queue`) counts requests not yet admitted (inbox plus waiting queue): a request beyond
it is refused with `QueueFullError` at submission, so overload is reported instead of queued without end.
"""

from __future__ import annotations

import itertools
import threading
import uuid
from collections import deque
from collections.abc import Callable

from astrai.inference.stream import OutputStream
from astrai.inference.task import Task


class QueueFullError(RuntimeError):
    """Raised at submission when `max_queue` requests already wait for admission."""


class LoopStoppedError(RuntimeError):
    """Raised at submission once the inference loop has stopped (shut down, or died)."""


class TaskManager:
    """Inbox (any thread) -> waiting queue -> active tasks (loop thread), with a condition that wakes the loop."""

    def __init__(self, max_queue: int = 256):
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue={max_queue!r}: must be a positive integer")
        self.max_queue = max_queue
        self.waiting_queue: deque[Task] = deque()  # loop only; preempted tasks re-enter at the head
        self.active_tasks: list[Task] = []  # loop only; admission order
        self._cond = threading.Condition()
        self._inbox: list[tuple[Task, OutputStream]] = []  # guarded by _cond
        self._live: dict[str, Task] = {}  # every task not yet retired, by id; guarded by _cond
        self._num_waiting = 0  # inbox + waiting queue; guarded by _cond
        self._closed = False  # guarded by _cond
        self._wake = False  # a cancellation or stop request since the loop last looked; guarded by _cond
        self._ids = itertools.count()
        self._id_prefix = uuid.uuid4().hex[:8]

    # ---- any thread -------------------------------------------------------------------------------------

    def new_task_id(self) -> str:
        return f"req-{self._id_prefix}-{next(self._ids)}"

    def add_task(self, task: Task, output: OutputStream) -> str:
        """Queue `task` (and the stream of its events) for admission; raises QueueFullError or
        LoopStoppedError instead of queueing."""
        with self._cond:
            if self._closed:
                raise LoopStoppedError("the inference loop is not running")
            if self._num_waiting >= self.max_queue:
                raise QueueFullError(f"{self._num_waiting} requests are already waiting (max_queue={self.max_queue})")
            self._inbox.append((task, output))
            self._live[task.task_id] = task
            self._num_waiting += 1
            self._cond.notify()
        return task.task_id

    def cancel(self, task_id: str) -> bool:
        """Raise the task's cancellation flag and wake the loop; False if the task is unknown or retired."""
        with self._cond:
            task = self._live.get(task_id)
            if task is None:
                return False
            task.cancel()
            self._wake = True
            self._cond.notify()
        return True

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

    def drain_inbox(self) -> list[tuple[Task, OutputStream]]:
        """Move newly submitted tasks to the tail of the waiting queue; returns them with their streams."""
        with self._cond:
            inbox, self._inbox = self._inbox, []
        self.waiting_queue.extend(task for task, _ in inbox)
        return inbox

    def pull_candidates(self, n: int) -> list[Task]:
        """Up to `n` tasks from the head of the waiting queue, in order (they leave the queue)."""
        return [self.waiting_queue.popleft() for _ in range(min(n, len(self.waiting_queue)))]

    def activate(self, task: Task) -> None:
        """An admitted task: it holds pages now and takes part in every step."""
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

    def retire(self, task: Task) -> None:
        """Forget a finished task (it may be active or waiting)."""
        if task in self.active_tasks:
            self.active_tasks.remove(task)
        else:
            self.waiting_queue.remove(task)
            with self._cond:
                self._num_waiting -= 1
        with self._cond:
            self._live.pop(task.task_id, None)

    def get_active_tasks(self) -> list[Task]:
        return list(self.active_tasks)

    def get_waiting_tasks(self) -> list[Task]:
        return list(self.waiting_queue)
