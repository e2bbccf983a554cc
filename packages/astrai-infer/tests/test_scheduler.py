"""InferenceScheduler: chunked prefill, packed or padded steps, ragged decode batches, first token from the
prefill, preemption order, cancellation owned by the loop, and the TaskManager's thread-safe door."""

import threading
from collections import deque

import pytest

import astrai.inference.cache.paged_attention as paged_attention
import astrai.inference.cache.view as view_module
from astrai.inference import (
    InferenceScheduler,
    LoopStoppedError,
    OutputStream,
    QueueFullError,
    Task,
    TaskManager,
    TaskStatus,
)


class _Recorder:
    """Collects one task's events; `done` is set by its final event."""

    def __init__(self):
        self.events = []
        self.done = threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if event.finished:
            self.done.set()

    def ids(self):
        assert self.done.wait(30)
        return [t for e in self.events for t in e.token_ids]


@pytest.fixture
def scheduler(model, tokenizer):
    """`scheduler(start=True, **kwargs)` -> an InferenceScheduler whose executor calls are logged in `.calls`
    (`start=False`: queue tasks first, so they are admitted together, then call `.start()`)."""
    made = []

    def make(start=True, **kwargs):
        sched = InferenceScheduler(model, tokenizer, **kwargs)
        sched.calls = []
        executor = sched.executor
        prefill, decode = executor.forward, executor.forward_decode

        def logged_prefill(tasks, lens):
            sched.calls.append(("prefill", [(t.task_id, t.next_pos, n) for t, n in zip(tasks, lens)]))
            return prefill(tasks, lens)

        def logged_decode(tasks):
            sched.calls.append(("decode", [(t.task_id, t.next_pos, 1) for t in tasks]))
            return decode(tasks)

        executor.forward, executor.forward_decode = logged_prefill, logged_decode
        if start:
            sched.start()
        made.append(sched)
        return sched

    yield make
    for sched in made:
        sched.stop()


def _add(sched, prompt, n, **kwargs):
    rec = _Recorder()
    task_id = sched.add_task(prompt, max_tokens=n, temperature=0.0, stream_callback=rec, **kwargs)
    return task_id, rec


def test_long_prompts_are_prefilled_in_chunks_of_the_budget(scheduler, naive_greedy):
    sched = scheduler(max_seq_len=64, max_prefill_tokens=8)
    prompt = list(range(40, 70))  # 30 tokens
    task_id, rec = _add(sched, prompt, 3)
    assert rec.ids() == naive_greedy(prompt, 3)
    chunks = [(pos, n) for kind, rows in sched.calls if kind == "prefill" for tid, pos, n in rows if tid == task_id]
    assert chunks == [(0, 8), (8, 8), (16, 8), (24, 6)]


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_a_step_runs_one_unpadded_forward_or_pads_only_a_little(scheduler, naive_greedy, monkeypatch, packed):
    if not packed:  # where the kernel does not serve the cache, steps are padded
        monkeypatch.setattr(view_module, "supports_cache", lambda cache: False)
    elif not paged_attention.available():
        pytest.skip("no paged attention kernel here (no C compiler)")
    sched = scheduler(start=False, max_seq_len=64)
    assert sched.executor.packs_steps is packed
    prompts = [list(range(10, 40)), list(range(50, 78)), [7, 8, 9], [4, 5]]  # 30, 28, 3 and 2 tokens
    recs = [_add(sched, p, 2 + 4 * (i == 3)) for i, p in enumerate(prompts)]
    sched.start()
    for i, (prompt, (_, rec)) in enumerate(zip(prompts, recs)):
        assert rec.ids() == naive_greedy(prompt, 2 + 4 * (i == 3))
    prefills = [[n for _, _, n in rows] for kind, rows in sched.calls if kind == "prefill"]
    if packed:  # every chunk in one forward, no padding
        assert prefills[0] == [30, 28, 3, 2]
    else:  # padding 3 tokens to 30 would waste most of a forward
        assert prefills[:2] == [[30, 28], [3, 2]]


def test_decodes_ride_along_with_a_packed_prefill(scheduler, naive_greedy):
    if not paged_attention.available():
        pytest.skip("no paged attention kernel here (no C compiler)")
    sched = scheduler(start=False, max_seq_len=64, max_prefill_tokens=8)
    short, long_ = [5, 6], list(range(20, 50))  # the long prompt takes 4 steps of 8 tokens
    (a, rec_a), (b, rec_b) = _add(sched, short, 6), _add(sched, long_, 3)
    sched.start()
    assert rec_a.ids() == naive_greedy(short, 6) and rec_b.ids() == naive_greedy(long_, 3)
    mixed = [rows for kind, rows in sched.calls if kind == "prefill" and {r[0] for r in rows} == {a, b}]
    # the short task decodes (1 token) in the same forward as the long task's next chunk
    assert len(mixed) >= 2 and all(dict((r[0], r[2]) for r in rows)[a] == 1 for rows in mixed[1:])


def test_first_token_is_sampled_from_the_prefill_logits(scheduler, naive_greedy):
    sched = scheduler(max_seq_len=64)
    _, rec = _add(sched, [11, 12, 13, 14, 15], 1)
    assert rec.ids() == naive_greedy([11, 12, 13, 14, 15], 1)
    assert [kind for kind, _ in sched.calls] == ["prefill"]  # no decode step re-fed the last prompt token


def test_tasks_at_different_positions_decode_in_one_forward(scheduler, naive_greedy):
    sched = scheduler(start=False, max_seq_len=64)
    short, long_ = [5, 6], list(range(20, 37))
    (a, rec_a), (b, rec_b) = _add(sched, short, 8), _add(sched, long_, 8)
    sched.start()
    assert rec_a.ids() == naive_greedy(short, 8) and rec_b.ids() == naive_greedy(long_, 8)
    ragged = [rows for kind, rows in sched.calls if kind == "decode" and {r[0] for r in rows} == {a, b}]
    assert ragged and all(len({pos for _, pos, _ in rows}) == 2 for rows in ragged)


def test_page_shortage_preempts_the_newest_task_and_recomputes_it(scheduler, naive_greedy):
    # 8 pages of 4 tokens: each task grows to 20 tokens (5 pages), so both cannot hold their pages at once.
    sched = scheduler(start=False, max_seq_len=32, page_size=4, num_pages=8)
    preempted = []
    real = sched._preempt
    sched._preempt = lambda task: (preempted.append(task.task_id), real(task))
    old, rec_old = _add(sched, [1, 2, 3, 4], 16)
    new, rec_new = _add(sched, [9, 8, 7, 6], 16)
    sched.start()
    assert rec_old.ids() == naive_greedy([1, 2, 3, 4], 16)
    assert rec_new.ids() == naive_greedy([9, 8, 7, 6], 16)
    assert preempted and set(preempted) == {new}
    assert sched.get_stats()["preemptions"] == len(preempted)
    # After preemption it was prefilled again: prompt + generated-so-far (its own full pages came back from
    # the prefix cache), continuing where it stopped.
    prefills = [(pos, n) for kind, rows in sched.calls if kind == "prefill" for tid, pos, n in rows if tid == new]
    assert prefills[0] == (0, 4) and len(prefills) >= 2 and all(pos + n > 5 for pos, n in prefills[1:])
    assert sched.page_cache.num_used_pages == 0
    sched.page_cache.check_invariants()


def test_cancellation_is_only_a_flag_until_the_loop_acts(scheduler):
    sched = scheduler(max_seq_len=64)
    entered, release = threading.Event(), threading.Event()
    decode = sched.executor.forward_decode

    def gated(tasks):
        entered.set()
        release.wait()
        return decode(tasks)

    sched.executor.forward_decode = gated
    task_id, rec = _add(sched, [1, 2, 3], 30)
    assert entered.wait(10)
    assert sched.remove_task(task_id)
    assert sched.page_cache.num_used_pages > 0  # the loop is busy: nothing was freed behind its back
    assert [t.task_id for t in sched.task_manager.get_active_tasks()] == [task_id]
    release.set()
    assert rec.done.wait(10) and rec.events[-1].finish_reason == "cancelled"
    assert sched.page_cache.num_used_pages == 0
    assert not sched.remove_task(task_id)  # already retired


def test_constructor_validates_its_budget(model, tokenizer):
    with pytest.raises(ValueError, match="num_pages"):
        InferenceScheduler(model, tokenizer, max_seq_len=64, page_size=16, num_pages=3)
    with pytest.raises(ValueError, match="max_batch_size"):
        InferenceScheduler(model, tokenizer, max_batch_size=0)
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        InferenceScheduler(model, tokenizer, max_prefill_tokens=-1)


def test_task_manager_bounds_the_queue_and_refuses_after_close(tokenizer):
    manager = TaskManager(tokenizer, max_queue=2)

    def task():
        t = Task(task_id=manager.new_task_id(), prompt_ids=[1, 2])
        return t, OutputStream(t, tokenizer)

    first, second = task(), task()
    manager.submit(*first)
    manager.submit(*second)
    with pytest.raises(QueueFullError):
        manager.submit(*task())
    with pytest.raises(QueueFullError):
        manager.add_task("one more")
    assert manager.num_waiting == 2
    assert manager.drain_inbox() == [first[0], second[0]]
    manager.activate(manager.pull_candidates(1)[0])
    assert manager.num_waiting == 1
    manager.submit(*task())  # room again
    assert manager.remove_task(first[0].task_id) == [first[0]] and first[0].cancelled
    assert manager.remove_task("req-unknown") == []
    manager.close()
    with pytest.raises(LoopStoppedError):
        manager.submit(*task())
    with pytest.raises(ValueError, match="max_queue"):
        TaskManager(tokenizer, max_queue=0)


def test_task_manager_add_task_encodes_text_and_caps_max_tokens(tokenizer):
    manager = TaskManager(tokenizer, max_seq_len=20)
    assert manager.tokenizer is tokenizer
    events = []
    text_id = manager.add_task("Hello world", max_tokens=100, temperature=0.0, stream_callback=events.append)
    ids_id = manager.add_task([5, 6, 7], top_k=3, seed=1)
    text, ids = manager.pull_candidates(5)
    assert (text.task_id, ids.task_id) == (text_id, ids_id) and manager.waiting_queue == deque()
    assert text.prompt_ids == tokenizer.encode("Hello world") and text.temperature == 0.0
    assert text.max_tokens == 20 - len(text.prompt_ids)  # capped to the room max_seq_len leaves
    assert (ids.prompt_ids, ids.max_tokens, ids.top_k, ids.seed) == ([5, 6, 7], 17, 3, 1)
    with pytest.raises(ValueError, match="no room to generate"):
        manager.add_task(list(range(20)))
    with pytest.raises(ValueError, match="prompt is empty"):
        manager.add_task("")
    with pytest.raises(ValueError, match="prompt_ids"):
        manager.add_task([])
    with pytest.raises(ValueError, match="top_p"):
        manager.add_task("x", top_p=2.0)


def test_remove_finished_tasks_ends_stopped_and_cancelled_tasks(tokenizer):
    manager = TaskManager(tokenizer)
    events = {}
    ids = [manager.add_task([1, 2], max_tokens=2, stream_callback=events.setdefault(i, []).append) for i in range(4)]
    done, stopped, running, waiting = manager.pull_candidates(4)
    manager.return_to_waiting([waiting])
    for task in (done, stopped, running):
        manager.activate(task)
    assert [t.status for t in (done, running, waiting)] == [TaskStatus.RUNNING, TaskStatus.RUNNING, TaskStatus.PENDING]
    done.append_token(3)
    done.append_token(4)  # max_tokens reached
    stopped.append_token(9)  # a stop token of the caller's
    running.append_token(3)
    manager.remove_task(waiting.task_id)
    ended = manager.remove_finished_tasks(stop_ids={9})
    assert ended == [done, stopped, waiting] and manager.get_active_tasks() == [running]
    assert [(t.status, t.finish_reason) for t in ended] == [
        (TaskStatus.FINISHED, "length"),
        (TaskStatus.FINISHED, "stop"),
        (TaskStatus.ABORTED, "cancelled"),
    ]
    assert [events[i][-1].finish_reason for i in (0, 1, 3)] == ["length", "stop", "cancelled"] and events[2] == []
    assert manager.num_waiting == 0 and manager.remove_task(ids[0]) == [] and manager.remove_finished_tasks() == []


def test_text_prompt_through_the_task_manager_matches_the_token_id_path(scheduler, tokenizer, naive_greedy):
    sched = scheduler(max_seq_len=64)
    prompt = tokenizer.encode("Hello there. How are you")
    rec, direct = _Recorder(), _Recorder()
    sched.task_manager.add_task("Hello there. How are you", max_tokens=6, temperature=0.0, stream_callback=rec)
    sched.add_task("Hello there. How are you", max_tokens=6, temperature=0.0, stream_callback=direct)
    assert rec.ids() == direct.ids() == naive_greedy(prompt, 6)
    assert rec.events[-1].prompt_tokens == len(prompt) and rec.events[-1].finish_reason == "length"


def test_stop_without_start_still_ends_queued_tasks(scheduler):
    sched = scheduler(start=False, max_seq_len=64)
    _, rec = _add(sched, [1, 2, 3], 4)
    sched.stop()
    assert rec.done.is_set() and rec.events[-1].finish_reason == "cancelled"
    assert not sched.is_alive()
