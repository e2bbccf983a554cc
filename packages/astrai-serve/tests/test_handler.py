"""Request lifecycle: overload (429 / 529), client disconnects, concurrency, engine shutdown."""

import asyncio
import json
import socket
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import anthropic
import httpx
import openai
import pytest

USER = [{"role": "user", "content": "hi"}]
REPLY = "You said: hi. Bye!"  # FakeEngine's reply to "hi"


def _post_and_keep_open(url: str, path: str, body: dict) -> socket.socket:
    """Send a complete HTTP request on a raw socket and return the socket without reading the answer."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    payload = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    sock.sendall(head.encode() + payload)
    return sock


def test_full_engine_queue_answers_429_and_529_with_retry_after(make_server, fake_engine):
    engine = fake_engine(max_queue=2)
    server = make_server(engine)
    engine.pause()
    with ThreadPoolExecutor(2) as pool:
        queued = [pool.submit(server.openai().chat.completions.create, model="m", messages=USER) for _ in range(2)]
        [engine.submitted.get(timeout=10) for _ in range(2)]
        with pytest.raises(openai.RateLimitError) as err:
            server.openai().chat.completions.create(model="m", messages=USER)
        assert err.value.response.headers["retry-after"] == "1"
        assert (err.value.body["type"], err.value.body["code"]) == ("rate_limit_error", "rate_limit_exceeded")
        with pytest.raises(anthropic.OverloadedError) as err:
            server.anthropic().messages.create(model="m", max_tokens=16, messages=USER)
        assert err.value.status_code == 529 and err.value.response.headers["retry-after"] == "1"
        assert err.value.body["error"]["type"] == "overloaded_error"
        engine.resume()
        assert [f.result(timeout=10).choices[0].message.content for f in queued] == [REPLY, REPLY]


def test_app_max_queue_counts_waiting_requests_and_choices(make_server):
    server = make_server(max_queue=2)
    engine = server.engine
    with pytest.raises(openai.RateLimitError):
        server.openai().chat.completions.create(model="m", messages=USER, n=3)
    engine.pause()
    with ThreadPoolExecutor(1) as pool:
        queued = pool.submit(server.openai().chat.completions.create, model="m", messages=USER, n=2)
        [engine.submitted.get(timeout=10) for _ in range(2)]
        with pytest.raises(openai.RateLimitError):
            server.openai().chat.completions.create(model="m", messages=USER)
        engine.resume()
        assert len(queued.result(timeout=10).choices) == 2


def test_refused_choice_cancels_the_choices_already_submitted(make_server, fake_engine):
    engine = fake_engine(max_queue=2)
    server = make_server(engine)
    engine.pause()
    with pytest.raises(openai.RateLimitError):
        server.openai().chat.completions.create(model="m", messages=USER, n=3)
    submitted = [engine.submitted.get(timeout=10) for _ in range(2)]
    assert all(h.cancelled.is_set() for h in submitted)
    engine.resume()
    assert all(h.done.wait(10) and h.final.finish_reason == "cancelled" for h in submitted)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"model": "m", "messages": USER}),
        ("/v1/messages", {"model": "m", "max_tokens": 16, "messages": USER}),
    ],
)
def test_non_streaming_client_disconnect_while_queued_cancels(make_server, path, body):
    server = make_server()
    server.engine.pause()
    sock = _post_and_keep_open(server.url, path, body)
    handle = server.engine.submitted.get(timeout=10)
    assert not handle.cancelled.is_set()
    sock.close()
    assert handle.cancelled.wait(10)
    server.engine.resume()
    assert handle.done.wait(10) and handle.final.finish_reason == "cancelled"


@pytest.mark.parametrize(
    ("path", "body", "first_event"),
    [
        ("/v1/chat/completions", {"model": "m", "messages": USER, "stream": True}, "data: "),
        ("/v1/messages", {"model": "m", "max_tokens": 16, "messages": USER, "stream": True}, "event: message_start"),
    ],
)
def test_streaming_client_disconnect_before_any_token_cancels(make_server, path, body, first_event):
    server = make_server()
    server.engine.pause()  # "prefill" never ends
    with httpx.stream("POST", f"{server.url}{path}", json=body, timeout=10) as r:
        assert next(r.iter_lines()).startswith(first_event)
    handle = server.engine.submitted.get(timeout=10)
    assert handle.cancelled.wait(10)


def test_streaming_client_disconnect_mid_generation_cancels(make_server):
    server = make_server()
    server.engine.pause_after = 5
    body = {"model": "m", "messages": USER, "stream": True, "max_tokens": 200, "ignore_eos": True}
    text = ""
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=10) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                text += json.loads(line[6:])["choices"][0]["delta"].get("content", "")
            if len(text) == 5:
                break
    handle = server.engine.submitted.get(timeout=10)
    assert handle.cancelled.wait(10)
    server.engine.pause_after = None
    server.engine.resume()
    assert handle.done.wait(10) and handle.final.finish_reason == "cancelled"
    assert len(handle.produced) == 5  # nothing was generated after the client left


def test_32_concurrent_streaming_clients(make_server, fake_engine):
    server = make_server(fake_engine(max_batch_size=32))

    async def run() -> list[str]:
        oa, an = server.async_openai(), server.async_anthropic()

        async def via_openai(i: int) -> str:
            messages = [{"role": "user", "content": f"client {i}"}]
            stream = await oa.chat.completions.create(model="m", messages=messages, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream])

        async def via_anthropic(i: int) -> str:
            messages = [{"role": "user", "content": f"client {i}"}]
            async with an.messages.stream(model="m", max_tokens=64, messages=messages) as stream:
                return "".join([t async for t in stream.text_stream])

        return await asyncio.gather(*(via_openai(i) if i % 2 else via_anthropic(i) for i in range(32)))

    assert asyncio.run(run()) == [f"You said: client {i}. Bye!" for i in range(32)]
    assert server.engine.get_stats()["requests_finished"] == 32


def test_engine_shutdown_fails_waiting_requests(make_server):
    server = make_server()
    engine = server.engine
    engine.pause()
    with ThreadPoolExecutor(2) as pool:
        plain = pool.submit(server.openai().chat.completions.create, model="m", messages=USER)

        def stream() -> str:
            with server.anthropic().messages.stream(model="m", max_tokens=16, messages=USER) as s:
                return "".join(s.text_stream)

        streamed = pool.submit(stream)
        [engine.submitted.get(timeout=10) for _ in range(2)]
        engine.shutdown()
        with pytest.raises(openai.InternalServerError) as err:
            plain.result(timeout=10)
        assert err.value.status_code == 503 and "shutting down" in err.value.message
        with pytest.raises(anthropic.APIStatusError, match="shutting down"):
            streamed.result(timeout=10)


def test_stopped_engine_refuses_new_requests(server):
    server.engine.crash()
    with pytest.raises(openai.InternalServerError) as err:
        server.openai().chat.completions.create(model="m", messages=USER)
    assert err.value.status_code == 503 and "not generating" in err.value.message
    with pytest.raises(anthropic.OverloadedError):
        server.anthropic().messages.create(model="m", max_tokens=16, messages=USER)
