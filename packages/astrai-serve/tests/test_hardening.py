"""Requests that must not stall or crash the server: huge bodies, slow or looping chat templates, out-of-range
integers, loosely typed fields, lone surrogates, slow or idle connections, non-ASCII API keys.

Every test runs against a real uvicorn server on a free port.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import httpx
import openai
import pytest

from astrai.serve import create_app
from astrai.serve.limits import default_max_request_bytes
from astrai.serve.server import server_config
from astrai.tokenize import ChatTemplate

LOOPS_FOR_EVER = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
USER = [{"role": "user", "content": "hi"}]
MB = 1 << 20


def _health_latency(url: str) -> float:
    started = time.monotonic()
    r = httpx.get(f"{url}/health", timeout=5)
    assert r.status_code == 200
    return time.monotonic() - started


def _raw_request(url: str, head: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(head.encode())
    return sock


def _read_response(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    )
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1]), json.loads(body)


def _send_body(sock: socket.socket, total: int, chunked: bool, sent: list[int]) -> None:
    """Send `total` bytes of body in 1 MiB pieces (as HTTP chunks when `chunked`) until the server hangs up."""
    piece = b"x" * MB
    with contextlib.suppress(OSError):  # the server closes the connection after refusing
        while sent[0] < total:
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            sent[0] += len(piece)
            time.sleep(0.01)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_20mb_body_is_refused_with_413_while_health_keeps_answering(server, chunked):
    path = "/v1/chat/completions"
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {20 * MB}"
    sock = _raw_request(
        server.url, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{framing}\r\n\r\n"
    )
    sent = [0]
    sender = threading.Thread(target=_send_body, args=(sock, 20 * MB, chunked, sent), daemon=True)
    sender.start()
    latencies = [_health_latency(server.url) for _ in range(5)]
    status, body = _read_response(sock)
    sock.close()
    sender.join(timeout=30)
    assert max(latencies) < 1.0
    assert status == 413
    assert body["error"]["message"] == (
        f"the request body is larger than this server's limit of {default_max_request_bytes(256)} bytes "
        "(--max-request-bytes)"
    )
    assert server.engine.submitted.empty()


def test_the_body_limit_is_configurable_and_in_anthropic_shape_on_its_paths(make_server):
    server = make_server(max_request_bytes=2000)
    big = [{"role": "user", "content": "x" * 3000}]
    r = httpx.post(f"{server.url}/v1/messages", json={"model": "m", "max_tokens": 4, "messages": big}, timeout=10)
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "m", "messages": USER}, timeout=10)
    assert r.status_code == 200
    assert default_max_request_bytes(256) == MB and default_max_request_bytes(131072) == 64 * 131072


def test_text_longer_than_the_context_can_hold_is_refused_before_tokenising(make_server, fake_engine):
    engine = fake_engine(max_seq_len=64)
    calls = []
    render = engine.tokenizer.apply_chat_template
    engine.tokenizer.apply_chat_template = lambda *a, **kw: calls.append(1) or render(*a, **kw)
    server = make_server(engine)
    with pytest.raises(openai.BadRequestError, match="the messages have 2049 characters, more than a prompt"):
        server.openai().chat.completions.create(model="m", messages=[{"role": "user", "content": "x" * 2049}])
    assert calls == []


def test_a_slow_prompt_is_prepared_off_the_event_loop(make_server, fake_engine):
    engine = fake_engine()
    render = engine.tokenizer.apply_chat_template

    def slow_render(*args, **kwargs):
        time.sleep(2)
        return render(*args, **kwargs)

    engine.tokenizer.apply_chat_template = slow_render
    server = make_server(engine)
    done = []
    client = threading.Thread(
        target=lambda: done.append(server.openai().chat.completions.create(model="m", messages=USER)), daemon=True
    )
    client.start()
    time.sleep(0.2)
    assert _health_latency(server.url) < 1.0
    client.join(timeout=30)
    assert done and done[0].choices[0].finish_reason == "stop"


def test_a_chat_template_that_loops_for_ever_fails_its_request_with_400(make_server, fake_engine):
    engine = fake_engine()
    looping = ChatTemplate(LOOPS_FOR_EVER)
    engine.tokenizer.apply_chat_template = lambda messages, **kw: engine.tokenizer.encode(looping.render(messages))
    server = make_server(engine, template_time_limit=0.5)
    started = time.monotonic()
    result = {}

    def ask() -> None:
        with pytest.raises(openai.BadRequestError) as caught:
            server.openai().chat.completions.create(model="m", messages=USER)
        result["error"] = caught.value

    client = threading.Thread(target=ask, daemon=True)
    client.start()
    assert _health_latency(server.url) < 1.0
    client.join(timeout=30)
    assert time.monotonic() - started < 5
    assert "did not finish rendering within 0.5 s" in result["error"].message
    assert result["error"].body["param"] == "messages"


def _post(url: str, body: dict, path: str = "/v1/chat/completions") -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=10)


@pytest.mark.parametrize(
    "field, value",
    [
        ("top_k", 2**63),
        ("top_k", 2**31),
        ("max_tokens", 2**63),
        ("max_completion_tokens", 2**31),
        ("max_tokens", "4"),
        ("max_tokens", True),
        ("max_tokens", 4.0),
        ("stream", "yes"),
        ("stream", 1),
        ("temperature", "0.5"),
        ("n", "2"),
        ("seed", "7"),
    ],
)
def test_out_of_range_or_loosely_typed_openai_fields_are_400(server, field, value):
    r = _post(server.url, {"model": "m", "messages": USER, field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field
    assert server.engine.submitted.empty()


@pytest.mark.parametrize(
    "field, value", [("top_k", 2**63), ("max_tokens", 2**31), ("max_tokens", "4"), ("stream", "yes")]
)
def test_out_of_range_or_loosely_typed_anthropic_fields_are_400(server, field, value):
    body = {"model": "m", "max_tokens": 8, "messages": USER, field: value}
    r = _post(server.url, body, "/v1/messages")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    assert field in r.json()["error"]["message"]


def test_the_largest_accepted_values_still_work(server):
    r = _post(server.url, {"model": "m", "messages": USER, "top_k": 2**31 - 1, "temperature": 1, "seed": 2**63 - 1})
    assert r.status_code == 200, r.text
    r = _post(server.url, {"model": "m", "messages": USER, "logit_bias": {"12": 5}})  # JSON keys are strings
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "messages",
    [[{"role": "user"}], [{"role": "user", "content": None}], [{"role": "system"}, {"role": "user", "content": "x"}]],
)
def test_a_message_without_content_is_400_except_an_assistant_one(server, messages):
    r = _post(server.url, {"model": "m", "messages": messages})
    assert r.status_code == 400 and "must have content" in r.json()["error"]["message"]
    ok = [{"role": "user", "content": "a"}, {"role": "assistant"}, {"role": "user", "content": "b"}]
    assert _post(server.url, {"model": "m", "messages": ok}).status_code == 200


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "a\ud800b"}]}),
        (
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
        ),
        ("/v1/chat/completions", {"model": "m", "messages": USER, "stop": "\ud83d"}),
        ("/v1/messages", {"model": "m", "max_tokens": 4, "messages": USER, "system": "x\udc00"}),
    ],
)
def test_lone_surrogates_get_an_error_that_says_so(server, path, body):
    raw = json.dumps(body)  # ensure_ascii: the surrogate travels as a \\uXXXX escape, as a client would send it
    r = httpx.post(f"{server.url}{path}", content=raw, headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 400
    assert "lone surrogate" in r.json()["error"]["message"]
    assert server.engine.submitted.empty()


def test_a_non_ascii_api_key_matches_its_utf8_bytes(make_server):
    key = "clé-秘密"
    server = make_server(api_key=key)
    for headers in ({"x-api-key": key.encode()}, {"authorization": b"Bearer " + key.encode()}):
        r = httpx.get(f"{server.url}/v1/models", headers=headers, timeout=10)
        assert r.status_code == 200, headers
    r = httpx.get(f"{server.url}/v1/models", headers={"x-api-key": key.encode("latin-1", "replace")}, timeout=10)
    assert r.status_code == 401


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def test_idle_and_slow_header_connections_are_closed(fake_engine, serve_app):
    engine = fake_engine()
    render = engine.tokenizer.apply_chat_template
    engine.tokenizer.apply_chat_template = lambda *a, **kw: time.sleep(1.2) or render(*a, **kw)
    app = create_app(engine)
    config = server_config(app, host="127.0.0.1", port=0, header_timeout=0.5, keep_alive_timeout=0.5)
    with serve_app(app, config) as url:
        idle = _raw_request(url, "")
        slow = _raw_request(url, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        assert _closed_within(idle, 3) and _closed_within(slow, 3)
        # A request whose head arrived in time is served however long it takes (longer than the header timeout)...
        body = json.dumps({"model": "m", "messages": USER})
        head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n{body}"
        kept = _raw_request(url, head)
        status, reply = _read_response(kept)
        assert status == 200 and reply["choices"][0]["finish_reason"] == "stop"
        # ...and the kept-alive connection is closed once it idles past the keep-alive timeout.
        assert _closed_within(kept, 3)
