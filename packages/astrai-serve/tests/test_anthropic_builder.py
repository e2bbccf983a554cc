"""POST /v1/messages through the official anthropic client (strict response validation)."""

import json

import anthropic
import httpx
import pytest

from astrai.inference import SamplingParams

USER = [{"role": "user", "content": "hi"}]
REPLY = "You said: hi. Bye!"  # FakeEngine's reply to "hi": 18 characters, then EOS (19 tokens)


def _parse_sse(text):
    """[(event name, data dict)] of a raw SSE body; every event must end with a blank line."""
    assert text.endswith("\n\n")
    events = []
    for block in text.split("\n\n")[:-1]:
        name, data = block.split("\n")
        events.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return events


def test_plain_message(server):
    m = server.anthropic().messages.create(model="m", max_tokens=64, messages=USER)
    assert m.id.startswith("msg_") and m.type == "message" and m.role == "assistant" and m.model == "m"
    assert [(b.type, b.text) for b in m.content] == [("text", REPLY)]
    assert (m.stop_reason, m.stop_sequence) == ("end_turn", None)
    prompt = len(server.engine.tokenizer.apply_chat_template(USER))
    assert (m.usage.input_tokens, m.usage.cache_read_input_tokens, m.usage.output_tokens) == (prompt, 0, 19)
    again = server.anthropic().messages.create(model="m", max_tokens=64, messages=USER)
    assert (again.usage.input_tokens, again.usage.cache_read_input_tokens) == (prompt - 4, 4)


def test_stream_event_sequence_and_final_message(server):
    body = {"model": "m", "max_tokens": 64, "messages": USER, "stream": True}
    r = httpx.post(f"{server.url}/v1/messages", json=body, headers={"x-api-key": "k"}, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _parse_sse(r.text)
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert all(data["type"] == name for name, data in events)
    assert "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta") == REPLY
    assert events[-2][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert events[-2][1]["usage"]["output_tokens"] == 19
    with server.anthropic().messages.stream(model="m", max_tokens=64, messages=USER) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(texts) == REPLY and final.content[0].text == REPLY and final.stop_reason == "end_turn"
    assert (final.usage.output_tokens, final.usage.cache_read_input_tokens) == (19, 4)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequences_and_max_tokens(server, stream):
    client = server.anthropic()

    def create(**kw):
        if not stream:
            return client.messages.create(model="m", messages=USER, **kw)
        with client.messages.stream(model="m", messages=USER, **kw) as s:
            return s.get_final_message()

    m = create(max_tokens=64, stop_sequences=["nope", ". B"])
    assert (m.content[0].text, m.stop_reason, m.stop_sequence) == ("You said: hi", "stop_sequence", ". B")
    assert m.usage.output_tokens == 15  # every sampled token counts, including the trimmed stop string
    m = create(max_tokens=5)
    assert (m.content[0].text, m.stop_reason, m.stop_sequence, m.usage.output_tokens) == (
        "You s",
        "max_tokens",
        None,
        5,
    )


@pytest.mark.parametrize(
    ("system", "rendered"),
    [("Be brief.", "Be brief."), ([{"type": "text", "text": "A"}, {"type": "text", "text": "B"}], "A\nB")],
)
def test_system_and_blocks_are_rendered(server, system, rendered):
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "one", "cache_control": {"type": "ephemeral"}}]},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"},
    ]
    m = server.anthropic().messages.create(model="m", max_tokens=64, system=system, messages=messages)
    assert m.content[0].text == "You said: three. Bye!"
    prompt = server.engine.tokenizer.decode(server.engine.submitted.get(timeout=5).prompt_ids, False)
    assert prompt == (
        f"<|system|>{rendered}<|end|><|user|>one<|end|><|assistant|>two<|end|><|user|>three<|end|><|assistant|>"
    )


def test_sampling_parameters_reach_the_engine(server):
    # anthropic SDK 2.x dropped temperature / top_p / top_k from its signature; older clients send them.
    server.anthropic().messages.create(
        model="m",
        max_tokens=30,
        messages=USER,
        stop_sequences=["x"],
        extra_body={"temperature": 0.0, "top_p": 0.5, "top_k": 3},
    )
    assert server.engine.submitted.get(timeout=5).params == SamplingParams(
        max_tokens=30, temperature=0.0, top_p=0.5, top_k=3, stop=["x"]
    )


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"max_tokens": None}, "max_tokens: Field required"),
        ({"temperature": 1.5}, "temperature: Input should be less than or equal to 1"),
        ({"max_tokens": 300}, "exceeds the model's context length of 256"),
        ({"stop_sequences": [""]}, "non-empty"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "'text'"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"tools": [{"name": "f", "input_schema": {"type": "object"}}]}, "tool use is not supported"),
    ],
)
def test_invalid_requests_get_400_in_anthropic_shape(server, kwargs, needle):
    body = {"model": "m", "max_tokens": 64, "messages": USER, **kwargs}
    body = {k: v for k, v in body.items() if v is not None}
    r = httpx.post(f"{server.url}/v1/messages", json=body, timeout=10)
    assert r.status_code == 400
    error = r.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert needle in error["error"]["message"]
    with pytest.raises(anthropic.BadRequestError):
        server.anthropic().messages.create(model="m", max_tokens=64, messages=USER, extra_body=kwargs)
    assert server.engine.submitted.empty()


def test_engine_failure_mid_stream_is_an_error_event(server):
    server.engine.fail_after = 2
    received = []
    with pytest.raises(anthropic.APIStatusError, match="fake engine failure"):
        with server.anthropic().messages.stream(model="m", max_tokens=64, messages=USER) as stream:
            for text in stream.text_stream:
                received.append(text)
    assert "".join(received) == "Yo"
    with pytest.raises(anthropic.InternalServerError) as err:
        server.anthropic().messages.create(model="m", max_tokens=64, messages=USER)
    assert err.value.status_code == 500 and err.value.body["error"]["type"] == "api_error"


def test_count_tokens(server):
    count = server.anthropic().messages.count_tokens(model="m", system="S", messages=USER)
    rendered = [{"role": "system", "content": "S"}, *USER]
    assert count.input_tokens == len(server.engine.tokenizer.apply_chat_template(rendered))
