"""`POST /v1/completions`, `/tokenize`, `/detokenize` and `/tokenizer_info` over the real engine.

Generated text is checked against the engine's own greedy generation on the same prompt ids; log-probabilities
against `log_softmax` of one full forward of the model over prompt + output, computed here. The bodies are
validated against the openai SDK's `Completion` model, and the tokenizer endpoints against what
lm-evaluation-harness's remote tokenizer reads.
"""

import httpx
import openai
import pytest
import torch
from openai.types import Completion

from astrai.inference import InferenceEngine
from astrai.model import AutoModel
from astrai.serve import create_app


@pytest.fixture(scope="module")
def model(model_dir):
    return AutoModel.from_pretrained(model_dir).eval()


@pytest.fixture
def server(model_dir, serve_app):
    engine = InferenceEngine.from_pretrained(model_dir, max_batch_size=8, page_size=4, max_seq_len=512)
    with serve_app(create_app(engine, served_model_names=["m"])) as url:
        yield engine, url


def _client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def _log_softmax(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))["logits"][0].float().log_softmax(-1)


def test_text_prompt_matches_the_engines_greedy_generation(server):
    engine, url = server
    prompt = "Once upon a time"
    expected = engine.tokenizer.decode(engine.generate(engine.tokenizer.encode(prompt), max_tokens=6, temperature=0))
    response = _client(url).completions.create(model="m", prompt=prompt, max_tokens=6, temperature=0)
    Completion.model_validate(response.model_dump(), strict=True)
    assert response.object == "text_completion" and response.id.startswith("cmpl-")
    [choice] = response.choices
    assert (choice.index, choice.text, choice.finish_reason) == (0, expected, "length")
    assert choice.logprobs is None
    prompt_tokens = len(engine.tokenizer.encode(prompt))
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (prompt_tokens, 6)


def test_echo_logprobs_score_the_prompt_as_a_full_forward_does(server, model):
    """What lm-eval's local-completions sends for a loglikelihood request, and max_tokens 0 (the prompt alone)."""
    engine, url = server
    ids = engine.tokenizer.encode("The cat sat on the mat.")
    reference = _log_softmax(model, ids)
    for max_tokens in (1, 0):
        body = {"model": "m", "prompt": ids, "max_tokens": max_tokens, "logprobs": 2, "echo": True, "temperature": 0}
        data = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
        [choice] = data["choices"]
        lp = choice["logprobs"]
        # The first token has nothing before it: nulls, as OpenAI and vLLM send them (the SDK's types say numbers).
        lp_after_first = {key: values[1:] for key, values in lp.items()}
        Completion.model_validate({**data, "choices": [{**choice, "logprobs": lp_after_first}]}, strict=True)
        assert len(lp["tokens"]) == len(ids) + max_tokens
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        expected = reference[range(len(ids) - 1), ids[1:]]
        assert lp["token_logprobs"][1 : len(ids)] == pytest.approx(expected.tolist(), abs=1e-4)
        for position, top in enumerate(lp["top_logprobs"][1 : len(ids)]):
            best = reference[position].topk(2)
            for token_id, value in zip(best.indices.tolist(), best.values.tolist(), strict=True):
                assert top[engine.tokenizer.decode([token_id], skip_special_tokens=False)] == pytest.approx(
                    value, abs=1e-4
                )
            assert lp["tokens"][position + 1] in top  # the prompt's own token is always listed
        prompt_text = engine.tokenizer.decode(ids, skip_special_tokens=False)
        assert choice["text"].startswith(prompt_text)
        assert lp["text_offset"][: len(ids)] == [len(engine.tokenizer.decode(ids[:i])) for i in range(len(ids))]
        completion_tokens = data["usage"]["completion_tokens"]
        if max_tokens == 0:
            assert (choice["text"], completion_tokens, choice["finish_reason"]) == (prompt_text, 0, "length")
        else:  # the greedy continuation, scored like the prompt
            next_id = int(reference[-1].argmax())
            assert lp["token_logprobs"][-1] == pytest.approx(float(reference[-1, next_id]), abs=1e-4)
            assert completion_tokens == 1


def test_a_list_of_prompts_gets_n_choices_each_in_order(server):
    engine, url = server
    prompts = ["Hello there", "A much longer second prompt"]
    response = _client(url).completions.create(model="m", prompt=prompts, max_tokens=4, temperature=0, n=2)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    for i, prompt in enumerate(prompts):
        expected = engine.tokenizer.decode(
            engine.generate(engine.tokenizer.encode(prompt), max_tokens=4, temperature=0)
        )
        assert [c.text for c in response.choices[2 * i : 2 * i + 2]] == [expected, expected]
    assert response.usage.prompt_tokens == sum(len(engine.tokenizer.encode(p)) for p in prompts)
    assert response.usage.completion_tokens == 16
    ids = [engine.tokenizer.encode(p) for p in prompts]  # the same prompts as token ids
    by_ids = _client(url).completions.create(model="m", prompt=ids, max_tokens=4, temperature=0)
    assert [c.text for c in by_ids.choices] == [response.choices[0].text, response.choices[2].text]


def test_stream_with_echo_stop_and_usage(server):
    engine, url = server
    prompt = "Stream me"
    full = _client(url).completions.create(model="m", prompt=prompt, max_tokens=12, temperature=0)
    stop = full.choices[0].text[3:5]
    plain = _client(url).completions.create(model="m", prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
    stream = _client(url).completions.create(
        model="m",
        prompt=prompt,
        max_tokens=12,
        temperature=0,
        stop=[stop],
        echo=True,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].text == prompt  # the echo first
    assert "".join(c.choices[0].text for c in chunks if c.choices) == prompt + plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop" == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_streamed_logprobs_are_the_non_streamed_ones(server):
    _, url = server
    args = {"model": "m", "prompt": "Numbers:", "max_tokens": 5, "temperature": 0, "logprobs": 3}
    plain = _client(url).completions.create(**args).choices[0].logprobs
    chunks = [c for c in _client(url).completions.create(**args, stream=True) if c.choices and c.choices[0].logprobs]
    streamed = [value for c in chunks for value in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(plain.token_logprobs, abs=1e-6) and len(streamed) == 5
    assert [o for c in chunks for o in c.choices[0].logprobs.text_offset] == plain.text_offset
    assert plain.text_offset[0] == len("Numbers:")  # offsets count in prompt + completion


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"prompt": "x", "max_tokens": 0}, "only allowed with echo"),
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
        ({"prompt": "x", "echo": True, "logprobs": 1, "stream": True}, "not supported when streaming"),
        ({"prompt": [], "max_tokens": 1}, "prompt"),
        ({"prompt": ["ok", ""]}, "must not be empty"),
        ({"prompt": [5, 10**6]}, "must be integers in"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "max_tokens": 600}, "exceeds the model's context length"),
    ],
)
def test_bad_completion_requests_are_400s_naming_the_problem(server, body, message):
    _, url = server
    response = httpx.post(f"{url}/v1/completions", json={"model": "m", **body}, timeout=30)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


def test_tokenize_detokenize_and_tokenizer_info(server):
    engine, url = server
    info = httpx.get(f"{url}/tokenizer_info").json()
    assert info["eos_token"] == "<eos>" and info["model_max_length"] == 512
    assert "<|assistant|>" in info["chat_template"]
    tokens = httpx.post(f"{url}/tokenize", json={"prompt": "Hi there", "add_special_tokens": False}).json()
    assert tokens["tokens"] == engine.tokenizer.encode("Hi there", add_special_tokens=False)
    assert (tokens["count"], tokens["max_model_len"], tokens["token_strs"]) == (8, 512, None)
    chat = httpx.post(
        f"{url}/tokenize", json={"messages": [{"role": "user", "content": "Hi"}], "return_token_strs": True}
    ).json()
    rendered = "<|user|>Hi<|end|><|assistant|>"
    assert chat["tokens"] == engine.tokenizer.encode(rendered, add_special_tokens=False)
    assert "".join(chat["token_strs"]) == rendered
    back = httpx.post(f"{url}/detokenize", json={"tokens": chat["tokens"]}).json()
    assert back == {"prompt": rendered}
    refused = httpx.post(f"{url}/detokenize", json={"tokens": [10**6]})
    assert refused.status_code == 400 and "vocabulary size" in refused.json()["error"]["message"]
    both = httpx.post(f"{url}/tokenize", json={"prompt": "a", "messages": [{"role": "user", "content": "b"}]})
    assert both.status_code == 400 and "exactly one of prompt and messages" in both.json()["error"]["message"]
