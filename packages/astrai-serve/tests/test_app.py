"""Service endpoints, error shapes of non-generation failures, lifespan, and a schema fuzz test."""

import copy
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from astrai.serve import create_app


def test_health_follows_the_engine_loop(server):
    r = httpx.get(f"{server.url}/health", timeout=10)
    assert (r.status_code, r.json()) == (200, {"status": "ok", "model_loaded": True})
    r = httpx.head(f"{server.url}/health", timeout=10)  # load balancers probe with HEAD
    assert (r.status_code, r.content) == (200, b"")
    server.engine.crash()
    r = httpx.get(f"{server.url}/health", timeout=10)
    assert (r.status_code, r.json()["status"]) == (503, "unavailable")
    assert httpx.head(f"{server.url}/health", timeout=10).status_code == 503


def test_stats_and_metrics(server):
    server.openai().chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    stats = httpx.get(f"{server.url}/stats", timeout=10).json()
    assert stats == json.loads(json.dumps(server.engine.get_stats()))
    assert (stats["requests_finished"], stats["generation_tokens_total"]) == (1, 19)
    r = httpx.get(f"{server.url}/metrics", timeout=10)
    assert r.headers["content-type"] == "text/plain; version=1.0.0; charset=utf-8"  # prometheus_client's
    lines = r.text.splitlines()
    assert "astrai_requests_finished_total 1.0" in lines and "astrai_generation_tokens_total 19.0" in lines
    assert "astrai_time_to_first_token_seconds_count 1.0" in lines
    assert 'vllm:generation_tokens_total{engine="0",model_name="m"} 19.0' in lines


def test_models_in_both_shapes(make_server):
    server = make_server(model_name="served-name")
    assert [m.id for m in server.openai().models.list()] == ["served-name"]
    page = server.anthropic().models.list()
    assert [(m.id, m.type) for m in page.data] == [("served-name", "model")]
    r = server.openai().chat.completions.create(model="served-name", messages=[{"role": "user", "content": "x"}])
    assert r.model == "served-name"


def test_requests_for_a_model_not_served_get_404_in_each_protocol(make_server):
    import anthropic
    import openai

    server = make_server(served_model_names=["main", "alias"])
    assert [m.id for m in server.openai().models.list()] == ["main", "alias"]
    assert [m.id for m in server.anthropic().models.list().data] == ["main", "alias"]
    r = server.openai().chat.completions.create(model="alias", messages=[{"role": "user", "content": "x"}])
    assert r.model == "main"  # as vLLM: responses report the first served name
    with pytest.raises(openai.NotFoundError) as caught:
        server.openai().chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert caught.value.body == {
        "message": "The model `gpt-4o` does not exist.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "not_found",
    }
    with pytest.raises(anthropic.NotFoundError) as caught:
        server.anthropic().messages.create(model="claude-x", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    assert caught.value.body["error"] == {"type": "not_found_error", "message": "The model `claude-x` does not exist."}
    with pytest.raises(anthropic.NotFoundError):
        server.anthropic().messages.count_tokens(model="claude-x", messages=[{"role": "user", "content": "x"}])
    assert server.engine.submitted.qsize() == 1  # only the request for "alias"
    assert server.openai().models.retrieve("alias").id == "alias"
    assert server.anthropic().models.retrieve("main").id == "main"
    with pytest.raises(openai.NotFoundError, match="The model `gpt-4o` does not exist"):
        server.openai().models.retrieve("gpt-4o")
    with pytest.raises(anthropic.NotFoundError):
        server.anthropic().models.retrieve("claude-x")


def test_version_reports_the_installed_distribution(server):
    import importlib.metadata

    r = httpx.get(f"{server.url}/version", timeout=10)
    assert r.json() == {"version": importlib.metadata.version("astrai-serve")}


def test_unknown_paths_and_methods_in_each_protocol_shape(server):
    r = httpx.get(f"{server.url}/v1/nothing", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.post(f"{server.url}/v1/messages/nothing", json={}, timeout=10)
    assert r.status_code == 404 and r.json() == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "Not Found"},
    }
    r = httpx.get(f"{server.url}/v1/messages", timeout=10)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    assert r.headers["allow"] == "POST"  # RFC 9110: a 405 lists the methods the resource allows


def test_openapi_documents_the_400_the_server_sends(server):
    schema = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    for path, error_schema in (("/v1/chat/completions", "OpenAIErrorBody"), ("/v1/messages", "AnthropicErrorBody")):
        responses = schema["paths"][path]["post"]["responses"]
        assert "422" not in responses
        assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith(error_schema)
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": []}, timeout=10)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_lifespan_shuts_the_engine_down(serve_app, fake_engine):
    engine = fake_engine()
    with serve_app(create_app(engine)) as url:
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        assert engine.is_alive()
    assert not engine.is_alive()


def test_invalid_max_queue_is_refused(fake_engine):
    engine = fake_engine()
    with pytest.raises(ValueError, match="max_queue must be >= 1"):
        create_app(engine, max_queue=0)
    engine.shutdown()


# ---- fuzz: malformed bodies never produce a 5xx ---------------------------------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
OPENAI_VALID = {
    "model": "m",
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 8,
    "temperature": 0.5,
    "top_p": 0.9,
    "n": 1,
    "stop": ["x"],
    "stream": False,
    "logit_bias": {"3": 1.0},
    "seed": 1,
    "presence_penalty": 0.1,
    "stream_options": None,
}
ANTHROPIC_VALID = {
    "model": "m",
    "max_tokens": 8,
    "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    "system": "s",
    "temperature": 0.5,
    "top_k": 2,
    "stop_sequences": ["x"],
    "stream": False,
}
ROLES = st.sampled_from(["user", "assistant", "system", "developer", "tool", ""])
MESSAGE = st.fixed_dictionaries({}, optional={"role": ROLES | JSON, "content": JSON, "name": JSON})


@st.composite
def mutated(draw, valid: dict) -> dict:
    body = copy.deepcopy(valid)
    for _ in range(draw(st.integers(1, 3))):
        field = draw(st.sampled_from([*valid, "extra"]))
        action = draw(st.sampled_from(["replace", "drop", "message"]))
        if action == "drop":
            body.pop(field, None)
        elif action == "message":
            body["messages"] = draw(st.lists(MESSAGE, max_size=3))
        else:
            body[field] = draw(JSON)
    return body


BODIES = st.one_of(
    st.tuples(st.just("/v1/chat/completions"), mutated(OPENAI_VALID).map(json.dumps)),
    st.tuples(st.just("/v1/messages"), mutated(ANTHROPIC_VALID).map(json.dumps)),
    st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/messages"]), JSON.map(json.dumps)),
    st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/messages"]), st.binary(max_size=40)),
)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=10) as client:  # one keep-alive connection for all examples
        yield client


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=BODIES)
def test_fuzzed_bodies_never_get_a_5xx(http, case):
    path, content = case
    r = http.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        body = r.json()
        if path == "/v1/messages":
            assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
        else:
            assert set(body["error"]) == {"message", "type", "param", "code"}
