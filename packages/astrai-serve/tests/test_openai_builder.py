"""POST /v1/chat/completions through the official openai client (strict response validation)."""

import json

import httpx
import openai
import pytest

from astrai.inference import SamplingParams

USER = [{"role": "user", "content": "hi"}]
REPLY = "You said: hi. Bye!"  # FakeEngine's reply to "hi": 18 characters, then EOS (19 tokens)


def _prompt_len(engine, messages):
    return len(engine.tokenizer.apply_chat_template(messages))


def _stream_text(chunks, index=0):
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == index)


def test_plain_completion(server):
    r = server.openai().chat.completions.create(model="m", messages=USER)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == "m"
    assert [(c.index, c.message.role, c.message.content, c.finish_reason) for c in r.choices] == [
        (0, "assistant", REPLY, "stop")
    ]
    prompt = _prompt_len(server.engine, USER)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (prompt, 19, prompt + 19)
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    again = server.openai().chat.completions.create(model="m", messages=USER)
    assert again.usage.prompt_tokens_details.cached_tokens == 4  # the fake's page-rounded prefix hit


def test_stream_with_usage_matches_plain(server):
    chunks = list(
        server.openai().chat.completions.create(
            model="m", messages=USER, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert len({(c.id, c.created, c.model) for c in chunks}) == 1
    assert _stream_text(chunks) == REPLY
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-2].usage is None
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 19
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_sse_framing_without_usage(server):
    body = {"model": "m", "messages": USER, "stream": True}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"authorization": "Bearer k"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = r.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: {") and "\n" not in e for e in events[:-2])
    assert not any("usage" in p for p in payloads)  # only stream_options.include_usage adds usage fields
    assert "".join(p["choices"][0]["delta"].get("content", "") for p in payloads) == REPLY


@pytest.mark.parametrize("stop", ["Bye", ["zzz", "said"], ". B"])
def test_stop_sequences_trim_output_identically_when_streamed(server, stop):
    expected = REPLY[: REPLY.index(stop if isinstance(stop, str) else "said")]
    client = server.openai()
    plain = client.chat.completions.create(model="m", messages=USER, stop=stop)
    assert (plain.choices[0].message.content, plain.choices[0].finish_reason) == (expected, "stop")
    chunks = list(client.chat.completions.create(model="m", messages=USER, stop=stop, stream=True))
    assert _stream_text(chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_max_tokens_gives_length(server):
    client = server.openai()
    r = client.chat.completions.create(model="m", messages=USER, max_tokens=5)
    assert (r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens) == (
        "You s",
        "length",
        5,
    )
    r = client.chat.completions.create(model="m", messages=USER, max_tokens=50, max_completion_tokens=3)
    assert r.choices[0].message.content == "You"
    chunks = list(client.chat.completions.create(model="m", messages=USER, max_completion_tokens=3, stream=True))
    assert _stream_text(chunks) == "You" and chunks[-1].choices[0].finish_reason == "length"


def test_n_choices_plain_and_streamed(server):
    client = server.openai()
    r = client.chat.completions.create(model="m", messages=USER, n=3, seed=7)
    assert [(c.index, c.message.content) for c in r.choices] == [(i, REPLY) for i in range(3)]
    assert r.usage.completion_tokens == 3 * 19
    seeds = sorted(server.engine.submitted.get(timeout=5).params.seed for _ in range(3))
    assert seeds == [7, 8, 9]  # choices sample with different seeds
    chunks = list(client.chat.completions.create(model="m", messages=USER, n=2, stream=True))
    assert [_stream_text(chunks, i) for i in range(2)] == [REPLY, REPLY]
    finishes = [(c.choices[0].index, c.choices[0].finish_reason) for c in chunks if c.choices[0].finish_reason]
    assert sorted(finishes) == [(0, "stop"), (1, "stop")]


def test_system_developer_and_text_parts_are_rendered(server):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "No"}, {"type": "text", "text": "jokes."}]},
        {"role": "user", "content": [{"type": "text", "text": "hello"}]},
    ]
    r = server.openai().chat.completions.create(model="m", messages=messages)
    assert r.choices[0].message.content == "You said: hello. Bye!"
    prompt = server.engine.tokenizer.decode(server.engine.submitted.get(timeout=5).prompt_ids, False)
    assert prompt == "<|system|>Be brief.<|end|><|system|>No\njokes.<|end|><|user|>hello<|end|><|assistant|>"


def test_sampling_parameters_reach_the_engine(server):
    server.openai().chat.completions.create(
        model="m",
        messages=USER,
        temperature=0.5,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=-1.0,
        logit_bias={"12": 5.0, "7": -100},
        seed=3,
        stop="!",
        max_tokens=40,
        user="alice",
        extra_body={"top_k": 4, "repetition_penalty": 1.1, "ignore_eos": True},
    )
    assert server.engine.submitted.get(timeout=5).params == SamplingParams(
        max_tokens=40,
        temperature=0.5,
        top_p=0.9,
        top_k=4,
        presence_penalty=0.5,
        frequency_penalty=-1.0,
        repetition_penalty=1.1,
        logit_bias={12: 5.0, 7: -100.0},
        seed=3,
        stop=["!"],
        ignore_eos=True,
    )


@pytest.mark.parametrize(
    ("kwargs", "param", "needle"),
    [
        ({"temperature": 2.5}, "temperature", "less than or equal to 2"),
        ({"n": 0}, "n", "greater than or equal to 1"),
        ({"logit_bias": {"x": 1}}, "logit_bias", "logit_bias.x.[key]: Input should be a valid integer"),
        ({"logit_bias": {"5": 101}}, "logit_bias", "[-100, 100]"),
        ({"logit_bias": {"100000": 1}}, None, "outside the vocabulary"),  # refused by engine.submit
        ({"stop": ["ok", ""]}, "stop", "non-empty"),
        ({"max_tokens": 1000}, "max_tokens", "exceeds the model's context length of 256"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream"),
        ({"top_logprobs": 2}, None, "top_logprobs requires logprobs to be true"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
        # the test tokenizer's template takes no tools: a template that cannot render them is a 400
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "messages", "cannot render"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages",
            "'text'",
        ),
        ({"messages": []}, "messages", "at least 1 item"),
    ],
)
def test_invalid_requests_get_400_in_openai_shape(server, kwargs, param, needle):
    args = {"model": "m", "messages": USER, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        server.openai().chat.completions.create(**args)
    error = err.value.body  # the SDK unwraps {"error": {...}}
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert needle in error["message"]
    if param is not None:
        assert error["param"] == param
    assert server.engine.stats["requests_finished"] == 0 and server.engine.submitted.empty()


def test_malformed_json_gets_400_in_openai_shape(server):
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b'{"model": "m", "messages": [', timeout=10)
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith("the request body is not valid JSON")


def test_engine_failure_mid_stream_is_an_error_event(server):
    server.engine.fail_after = 3
    stream = server.openai().chat.completions.create(model="m", messages=USER, stream=True)
    received = []
    with pytest.raises(openai.APIError, match="fake engine failure"):
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "You"
    with pytest.raises(openai.InternalServerError) as err:
        server.openai().chat.completions.create(model="m", messages=USER)
    assert err.value.status_code == 500 and err.value.body["type"] == "server_error"
