"""The server over the real `InferenceEngine`: a tiny random `AutoRegressiveLM` with a character tokenizer.

Expected outputs come from the engine itself (`engine.generate` on the same prompt ids, greedy), so these
tests check that the HTTP layer delivers exactly what the engine produces, plus cancellation end to end.
"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from astrai.inference import InferenceEngine
from astrai.serve import create_app

USER = [{"role": "user", "content": "Tell me a story."}]


@pytest.fixture
def real(model_dir, serve_app):
    """(engine, base URL, submitted handles, "submitted" event, "a handle was cancelled" event) for a server
    over a fresh engine whose submit and handle.cancel are recorded."""
    engine = InferenceEngine.from_pretrained(model_dir, max_batch_size=8, page_size=4, max_seq_len=512)
    handles, submitted, cancelled = [], threading.Event(), threading.Event()
    submit = engine.submit

    def recording_submit(prompt_ids, params):
        handle = submit(prompt_ids, params)
        cancel = handle.cancel

        def recording_cancel():
            cancelled.set()
            cancel()

        handle.cancel = recording_cancel
        handles.append(handle)
        submitted.set()
        return handle

    engine.submit = recording_submit
    with serve_app(create_app(engine, served_model_names=["m"])) as url:
        yield engine, url, handles, submitted, cancelled


def _reference(engine, messages, max_tokens):
    """The engine's own greedy output (text, token count) for a chat, without HTTP."""
    ids = engine.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    out = engine.generate(ids, max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return engine.tokenizer.decode(out), len(ids)


def _openai(url):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, _strict_response_validation=True)


def _anthropic(url):
    import anthropic

    return anthropic.Anthropic(base_url=url, api_key="k", max_retries=0, _strict_response_validation=True)


def test_openai_plain_and_stream_match_the_engine(real):
    engine, url, *_ = real
    expected, prompt_tokens = _reference(engine, USER, 12)
    client = _openai(url)
    greedy = {"temperature": 0, "max_tokens": 12, "extra_body": {"ignore_eos": True}}
    r = client.chat.completions.create(model="m", messages=USER, **greedy)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (expected, "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_tokens, 12)
    assert r.model == "m"  # the served name, not the folder's
    chunks = list(
        client.chat.completions.create(
            model="m", messages=USER, stream=True, stream_options={"include_usage": True}, **greedy
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again: prefix cache hit


def test_openai_logprobs_are_the_engines_plain_and_streamed(real):
    from astrai.inference import SamplingParams

    engine, url, *_ = real
    ids = engine.tokenizer.apply_chat_template(USER, tokenize=True, add_generation_prompt=True)
    events = list(
        engine.submit(ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=2)).iter_sync(60)
    )
    expected = [lp for e in events for lp in e.logprobs]

    def as_wire(lp):  # what the server must send for one engine TokenLogprob
        text = lambda i: engine.tokenizer.decode([i], skip_special_tokens=False)  # noqa: E731
        return (text(lp.token_id), lp.logprob, [(text(i), v) for i, v in lp.top])

    client = _openai(url)
    ask = {"temperature": 0, "max_tokens": 8, "logprobs": True, "top_logprobs": 2, "extra_body": {"ignore_eos": True}}
    r = client.chat.completions.create(model="m", messages=USER, **ask)
    content = r.choices[0].logprobs.content
    got = [(c.token, c.logprob, [(t.token, t.logprob) for t in c.top_logprobs]) for c in content]
    assert got == [as_wire(lp) for lp in expected]
    assert all(c.bytes == list(c.token.encode()) for c in content)
    assert "".join(c.token for c in content) == r.choices[0].message.content
    chunks = list(client.chat.completions.create(model="m", messages=USER, stream=True, **ask))
    streamed = [c for chunk in chunks for choice in chunk.choices if choice.logprobs for c in choice.logprobs.content]
    assert [(c.token, c.logprob) for c in streamed] == [as_wire(lp)[:2] for lp in expected]
    plain = client.chat.completions.create(model="m", messages=USER, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_stop_sequence_matches_the_engine(real):
    engine, url, *_ = real
    text, _ = _reference(engine, USER, 24)
    stop = text[6:8]
    expected = text[: text.index(stop)]
    client = _openai(url)
    greedy = {"temperature": 0, "max_tokens": 24, "extra_body": {"ignore_eos": True}}
    r = client.chat.completions.create(model="m", messages=USER, stop=[stop], **greedy)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (expected, "stop")
    stream = client.chat.completions.create(model="m", messages=USER, stop=[stop], stream=True, **greedy)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == expected
    m = _anthropic(url).messages.create(
        model="m", max_tokens=24, messages=USER, stop_sequences=[stop], extra_body={"temperature": 0}
    )
    if m.stop_reason == "stop_sequence":  # greedy without ignore_eos: EOS could come first
        assert (m.content[0].text, m.stop_sequence) == (expected, stop)


def test_chat_template_refusal_is_a_400(real):
    import anthropic
    import openai

    _, url, handles, *_ = real
    messages = [{"role": "assistant", "content": "Hello"}, *USER]
    with pytest.raises(openai.BadRequestError, match="the assistant cannot speak first") as err:
        _openai(url).chat.completions.create(model="m", messages=messages)
    assert err.value.body["param"] == "messages"
    with pytest.raises(anthropic.BadRequestError, match="the assistant cannot speak first"):
        _anthropic(url).messages.create(model="m", max_tokens=8, messages=messages)
    assert handles == []


def test_anthropic_stream_matches_non_stream(real):
    _, url, *_ = real
    client = _anthropic(url)
    args = {"model": "m", "max_tokens": 10, "messages": USER, "extra_body": {"temperature": 0}}
    plain = client.messages.create(**args)
    with client.messages.stream(**args) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == plain.content[0].text
    assert (final.stop_reason, final.usage.output_tokens) == (plain.stop_reason, plain.usage.output_tokens)


def test_concurrent_streams_match_sequential_references(real):
    engine, url, *_ = real
    chats = [[{"role": "user", "content": f"Question number {i}?"}] for i in range(6)]
    expected = [_reference(engine, chat, 10)[0] for chat in chats]

    async def run():
        import openai

        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)

        async def one(chat):
            stream = await client.chat.completions.create(
                model="m", messages=chat, stream=True, temperature=0, max_tokens=10, extra_body={"ignore_eos": True}
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream])

        return await asyncio.gather(*(one(chat) for chat in chats))

    assert asyncio.run(run()) == expected


def test_streaming_disconnect_cancels_in_the_engine(real):
    engine, url, handles, submitted, cancelled = real
    body = {"model": "m", "messages": USER, "stream": True, "max_tokens": 400, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                break  # the first generated piece
    assert cancelled.wait(30)
    final = list(handles[0].iter_sync(timeout=30))[-1]  # nobody else reads the handle any more
    assert final.finished and final.finish_reason == "cancelled" and final.completion_tokens < 400


def test_non_streaming_disconnect_cancels_in_the_engine(real):
    engine, url, handles, submitted, cancelled = real
    body = json.dumps({"model": "m", "messages": USER, "max_tokens": 400, "ignore_eos": True}).encode()
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert submitted.wait(30)
    assert cancelled.wait(30)
    final = list(handles[0].iter_sync(timeout=30))[-1]
    assert final.finish_reason == "cancelled" and final.completion_tokens < 400


def test_health_stats_and_metrics_from_the_real_engine(real):
    engine, url, *_ = real
    client = _openai(url)
    greedy = {"temperature": 0, "extra_body": {"ignore_eos": True}}
    for max_tokens in (4, 6, 1):
        client.chat.completions.create(model="m", messages=USER, max_tokens=max_tokens, **greedy)
    assert httpx.get(f"{url}/health", timeout=10).json() == {"status": "ok", "model_loaded": True}
    stats = httpx.get(f"{url}/stats", timeout=10).json()
    assert stats["requests_finished"] == 3 and stats["loop_alive"] is True
    r = httpx.get(f"{url}/metrics", timeout=10)
    assert r.headers["content-type"].startswith("text/plain; version=")
    samples = {  # read as Prometheus does, with prometheus_client's own parser
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }
    labels = (("engine", "0"), ("model_name", "m"))
    assert samples[("vllm:request_success_total", (*labels[:1], ("finished_reason", "length"), labels[1]))] == 3
    assert samples[("vllm:generation_tokens_total", labels)] == 11
    assert samples[("vllm:request_generation_tokens_sum", labels)] == 11
    assert samples[("vllm:inter_token_latency_seconds_count", labels)] == 3 + 5 + 0
    assert samples[("vllm:time_per_output_token_seconds_count", labels)] == 2  # requests with 2+ tokens
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "request_prefill_time_seconds", "request_decode_time_seconds", "request_prompt_tokens"):  # fmt: skip
        assert samples[(f"vllm:{name}_count", labels)] == 3, name
    e2e, ttft = (
        samples[("vllm:e2e_request_latency_seconds_sum", labels)],
        samples[("vllm:time_to_first_token_seconds_sum", labels)],
    )
    assert 0 < ttft <= e2e
    assert samples[("vllm:num_requests_running", labels)] == 0
    assert samples[("astrai_engine_loop_alive", ())] == 1
    assert samples[("astrai_time_to_first_token_seconds_count", ())] == 3


def test_astrai_serve_command(model_dir):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "ASTRAI_API_KEY": "cli-key"}
    cmd = [sys.executable, "-m", "astrai.cli.main", "serve", "--model", str(model_dir), "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # blocks until uvicorn says it is up (or the process dies: loop ends)
            if "Uvicorn running" in line:
                break
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
        models = httpx.get(f"{url}/v1/models", headers={"x-api-key": "cli-key"}, timeout=10).json()
        assert models["data"][0]["id"] == model_dir.name
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


def test_astrai_serve_names_limits_and_timeouts(model_dir):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "astrai.cli.main", "serve", "--model", str(model_dir), "--port", str(port)]
    cmd += ["--served-model-name", "tiny", "tiny-alias", "--max-request-bytes", "4000", "--timeout-header", "0.5"]
    proc = subprocess.Popen(cmd, env={**os.environ, "ASTRAI_API_KEY": ""}, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if "Uvicorn running" in line:
                break
        url = f"http://127.0.0.1:{port}"
        assert [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]] == ["tiny", "tiny-alias"]
        ask = {"model": "tiny-alias", "messages": USER, "max_tokens": 2}
        r = httpx.post(f"{url}/v1/chat/completions", json=ask, timeout=30)
        assert (r.status_code, r.json()["model"]) == (200, "tiny")
        r = httpx.post(f"{url}/v1/chat/completions", json={**ask, "model": model_dir.name}, timeout=30)
        assert r.status_code == 404
        big = {**ask, "messages": [{"role": "user", "content": "x" * 5000}]}
        assert httpx.post(f"{url}/v1/chat/completions", json=big, timeout=30).status_code == 413
        with socket.create_connection(("127.0.0.1", port), timeout=5) as idle:
            idle.sendall(b"GET /health HTTP/1.1\r\n")  # a head that never completes
            assert idle.recv(100) == b""  # closed by the server after the 0.5 s header timeout
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
