"""Randomized stress: hundreds of requests, random cancellations, a tiny page budget. Every request ends exactly
once (complete or cancelled), and afterwards no page is held and the cache's invariants hold."""

import random
import threading

from astrai.inference import SamplingParams


def test_random_requests_and_cancels_leave_no_page_behind(make_engine):
    rng = random.Random(7)
    # 16 pages of 4 tokens hold just one full-length (64-token) sequence: admission waits, preemption is constant.
    engine = make_engine(
        max_batch_size=8, max_seq_len=64, page_size=4, num_pages=16, max_prefill_tokens=24, max_queue=400
    )
    system = [rng.randrange(10, 300) for _ in range(9)]  # a shared prefix longer than two pages
    handles, cancel_after = [], []
    for i in range(300):
        prefix = system if rng.random() < 0.5 else []
        prompt = prefix + [rng.randrange(1, 300) for _ in range(rng.randrange(1, 30))]
        params = SamplingParams(
            max_tokens=rng.randrange(1, 24),
            temperature=rng.choice([0.0, 0.7, 1.0]),
            top_k=rng.choice([0, 20]),
            top_p=rng.choice([1.0, 0.9]),
            seed=rng.choice([None, i]),
            stop=rng.choice([None, ["e"], ["the", "ab"]]),
        )
        handles.append(engine.submit(prompt, params))
        cancel_after.append(rng.choice([None, None, None, 0, 1, 3]))  # cancel after reading k events

    finals = [None] * len(handles)

    def read(indices):
        for i in indices:
            for k, event in enumerate(handles[i].iter_sync(timeout=60)):
                if cancel_after[i] == k:
                    handles[i].cancel()
                if event.finished:
                    finals[i] = event

    # Some requests are cancelled before anyone reads them at all.
    for i in rng.sample(range(len(handles)), 30):
        handles[i].cancel()
    readers = [threading.Thread(target=read, args=(range(r, len(handles), 3),)) for r in range(3)]
    for t in readers:
        t.start()
    for t in readers:
        t.join(90)
    assert all(f is not None for f in finals), "a request never got its final event"
    reasons = {f.finish_reason for f in finals}
    assert reasons <= {"stop", "stop_sequence", "length", "cancelled"}, reasons
    assert "cancelled" in reasons and "length" in reasons
    stats = engine.get_stats()
    assert stats["requests_finished"] + stats["requests_cancelled"] == len(handles)
    assert stats["requests_failed"] == 0 and stats["preemptions"] > 0 and stats["prefix_hit_tokens"] > 0
    assert stats["pages_used"] == 0 and stats["running"] == 0 and stats["waiting"] == 0
    assert engine.is_alive()
    engine.scheduler.page_cache.check_invariants()
