"""Executor's step API of the architecture document: execute_prefill / execute_decode move the tasks' progress,
and a loop of one's own over a TaskManager, a KVCache and an Executor generates what the engine does."""

import pytest

from astrai.inference import Executor, KVCache, Task, TaskManager, TaskStatus

TEXT = "Hello there. How are you"


def _own_loop(manager, cache, executor, stop_ids=()):
    """Admit, prefill (first token from the prefill), decode and retire until every task has ended."""
    ended = []
    while manager.get_active_tasks() or manager.num_waiting:
        for task in manager.pull_candidates(4):
            assert cache.task_alloc(task.task_id, task.prompt_ids)
            task.next_pos = task.cached_tokens = cache.task_cached(task.task_id)
            manager.activate(task)
            assert executor.execute_prefill([task], len(task.prompt_ids)) == [task.output_ids[-1]]
            cache.task_record_hashes(task.task_id, task.prompt_ids)
        ended += _retire(manager, cache, stop_ids)
        running = manager.get_active_tasks()
        if running:
            tokens = executor.execute_decode(running)
            assert tokens == [t.output_ids[-1] for t in running]
        ended += _retire(manager, cache, stop_ids)
    return ended


def _retire(manager, cache, stop_ids):
    ended = manager.remove_finished_tasks(stop_ids)
    for task in ended:
        cache.task_free(task.task_id)
    return ended


def test_text_prompt_through_a_task_manager_loop_matches_the_engine(model, tokenizer, make_engine, naive_greedy):
    engine = make_engine(max_seq_len=64)
    prompt = tokenizer.encode(TEXT)
    want = engine.generate(prompt, max_tokens=6, temperature=0.0, ignore_eos=True)
    assert want == naive_greedy(prompt, 6)
    cache = KVCache.from_config(model.config, num_pages=32, page_size=4)
    executor = Executor(model, tokenizer, cache)
    manager = TaskManager(tokenizer, max_seq_len=64)
    text_id = manager.add_task(TEXT, max_tokens=6, temperature=0.0)
    ids_id = manager.add_task([7, 8, 9], max_tokens=4, temperature=0.0)  # another length: a ragged decode batch
    again_id = manager.add_task(TEXT, max_tokens=6, temperature=0.0)  # admitted after the first: prefix reuse
    ended = {t.task_id: t for t in _own_loop(manager, cache, executor)}
    assert ended[text_id].output_ids == want == ended[again_id].output_ids
    assert ended[again_id].cached_tokens == (len(prompt) - 1) // 4 * 4 > 0  # its prefill starts past them
    assert ended[ids_id].output_ids == naive_greedy([7, 8, 9], 4)
    assert all(t.status is TaskStatus.FINISHED and t.finish_reason == "length" for t in ended.values())
    assert ended[text_id].output_tokens == 6 and ended[text_id].input_tokens == len(prompt)
    assert cache.num_used_pages == 0
    cache.check_invariants()


def test_execute_prefill_in_chunks_then_decode(model, tokenizer, naive_greedy):
    cache = KVCache.from_config(model.config, num_pages=16, page_size=4)
    executor = Executor(model, tokenizer, cache)
    prompt = list(range(30, 41))  # 11 tokens
    task = Task("t", prompt, max_tokens=3, temperature=0.0)
    assert cache.task_alloc("t", prompt)
    assert executor.execute_prefill([task], 5) == [None] and task.next_pos == 5 and task.output_ids == []
    assert executor.execute_prefill([task], 8, start_pos=5) == [None]
    first = executor.execute_prefill([task], 11)  # from next_pos: the rest of the prompt, then the first token
    assert task.next_pos == 11 and first == task.output_ids
    assert executor.execute_decode([task]) + executor.execute_decode([task]) == task.output_ids[1:]
    assert task.output_ids == naive_greedy(prompt, 3) and task.next_pos == 13


def test_step_api_rejects_what_it_cannot_do(model, tokenizer):
    cache = KVCache.from_config(model.config, num_pages=4, page_size=4)
    executor = Executor(model, tokenizer, cache)
    task = Task("t", [1, 2, 3, 4, 5], temperature=0.0)
    assert cache.task_alloc("t", task.prompt_ids)
    with pytest.raises(ValueError, match="prefill of positions 0..5"):
        executor.execute_prefill([task], 6)  # past the task's tokens
    with pytest.raises(ValueError, match="5 tokens not in the cache"):
        executor.execute_decode([task])  # nothing prefilled yet
    executor.execute_prefill([task], 5)
    for _ in range(11):  # the four pages hold 16 positions
        executor.execute_decode([task])
    with pytest.raises(RuntimeError, match="no KV page left for position 16"):
        executor.execute_decode([task])
