"""API keys: Bearer or x-api-key, 401 in each protocol's shape, /health public."""

import anthropic
import httpx
import openai
import pytest

from astrai.serve import APIKeyMiddleware

USER = [{"role": "user", "content": "hi"}]
KEY = "s3cret-key"


def test_openai_client_needs_the_key(make_server):
    server = make_server(api_key=KEY)
    r = server.openai(api_key=KEY).chat.completions.create(model="m", messages=USER)
    assert r.choices[0].message.content == "You said: hi. Bye!"
    with pytest.raises(openai.AuthenticationError) as err:
        server.openai(api_key="wrong").chat.completions.create(model="m", messages=USER)
    assert err.value.status_code == 401
    assert err.value.body == {
        "message": "invalid or missing API key",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }


def test_anthropic_client_needs_the_key(make_server):
    server = make_server(api_key=KEY)
    m = server.anthropic(api_key=KEY).messages.create(model="m", max_tokens=32, messages=USER)
    assert m.content[0].text == "You said: hi. Bye!"
    with pytest.raises(anthropic.AuthenticationError) as err:
        server.anthropic(api_key="wrong").messages.create(model="m", max_tokens=32, messages=USER)
    assert err.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "invalid or missing API key"},
    }


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"authorization": f"Bearer {KEY}"}, 200),
        ({"Authorization": f"bearer  {KEY}"}, 200),
        ({"x-api-key": KEY}, 200),
        ({"x-api-key": "nope", "authorization": f"Bearer {KEY}"}, 200),
        ({"authorization": KEY}, 401),
        ({"authorization": f"Basic {KEY}"}, 401),
        ({"x-api-key": KEY + "x"}, 401),
        ({}, 401),
    ],
)
def test_key_headers(make_server, headers, status):
    server = make_server(api_key=KEY)
    r = httpx.get(f"{server.url}/v1/models", headers=headers, timeout=10)
    assert r.status_code == status


def test_every_path_but_health_is_protected(make_server):
    server = make_server(api_key=KEY)
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    for path in ("/stats", "/metrics", "/v1/models", "/no/such/path"):
        r = httpx.get(f"{server.url}{path}", timeout=10)
        assert (r.status_code, r.json()["error"]["code"]) == (401, "invalid_api_key")
    r = httpx.post(f"{server.url}/v1/messages", content=b"not even json", timeout=10)
    assert (r.status_code, r.json()["error"]["type"]) == (401, "authentication_error")  # before the body is read
    assert server.engine.submitted.empty()


def test_without_a_key_any_client_is_served(server):
    r = server.openai(api_key="whatever").chat.completions.create(model="m", messages=USER)
    assert r.choices[0].finish_reason == "stop"
    assert httpx.get(f"{server.url}/stats", timeout=10).status_code == 200


def test_empty_key_is_refused():
    with pytest.raises(ValueError, match="api_key must be a non-empty string"):
        APIKeyMiddleware(None, api_key="", reject=None)
