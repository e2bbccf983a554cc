"""Fixtures for the engine tests: a tiny random AutoRegressiveLM and a small trained BPE tokenizer in one folder.

`model_dir` is a real model folder (`save_pretrained` of both), so `InferenceEngine.from_pretrained` and the
`astrai generate` command load exactly what the in-memory fixtures hold. `make_engine(**kwargs)` builds
engines over the shared model and shuts every one down at the end of the test. `naive_greedy` is the
reference every greedy output is checked against: recompute the whole sequence each step, take the argmax.
"""

from __future__ import annotations

import pytest
import torch

from astrai.config import AutoRegressiveLMConfig
from astrai.inference import InferenceEngine
from astrai.model import AutoRegressiveLM
from astrai.tokenize import train_bpe_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A paged KV cache stores keys and values in fixed-size pages.",
    "Continuous batching lets requests at different positions decode together.",
    "Hello world! Hello there. How are you today?",
    "日本語のテキストと絵文字 🙂🚀 も含めます。",
    "Ünïcödé chäracters: café, naïve, Zürich, Ελληνικά, русский.",
    "def generate(prompt):\n    return model(prompt)\n",
] * 20


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Run these tests with one intra-op thread: the models are tiny, so parallel regions only add barrier
    overhead, and on a shared 2-core machine a descheduled OpenMP worker stalls every op (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    return train_bpe_tokenizer(iter(CORPUS), vocab_size=400)


@pytest.fixture(scope="session")
def model(tokenizer):
    # Heads of 16 channels: decode attention runs in the paged attention kernel (astrai.inference.cache).
    config = AutoRegressiveLMConfig(
        vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, dim_ffn=64, max_len=128
    )
    torch.manual_seed(0)
    return AutoRegressiveLM(config).eval()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, model, tokenizer):
    folder = tmp_path_factory.mktemp("tiny-lm")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def make_engine(model, tokenizer):
    """`make_engine(**kwargs)` -> an InferenceEngine over the shared tiny model, shut down after the test."""
    engines = []

    def make(**kwargs):
        engine = InferenceEngine(model, tokenizer, **kwargs)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown()


@pytest.fixture
def naive_greedy(model):
    """`naive_greedy(prompt_ids, n, stop_ids=(), model=the shared model)` -> up to n greedy tokens by full
    recomputation each step (a stop token ends the output and is not included)."""
    default = model

    def run(prompt_ids, n, stop_ids=(), model=default):
        device = next(model.parameters()).device
        ids, out = list(prompt_ids), []
        with torch.no_grad():  # F.linear: the slow reference for the engine's CPU kernels
            for _ in range(n):
                token = int(model(torch.tensor([ids], device=device))["logits"][0, -1].argmax())
                if token in stop_ids:
                    break
                out.append(token)
                ids.append(token)
        return out

    return run
