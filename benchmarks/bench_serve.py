"""Serving: N concurrent streaming HTTP clients against `astrai.serve`, and the same workload sent straight to
the engine (the peer: what HTTP, SSE framing and JSON add on top of the engine).

The server runs in this process (uvicorn on a free 127.0.0.1 port, real sockets) over one `InferenceEngine`,
as `astrai serve` does; the HTTP clients run in a child process (forked before torch starts any thread), so
their JSON parsing does not compete with the server for this process's GIL. Clients are closed-loop: each of `--clients` workers sends its next request as soon as the previous one ends,
until `--requests` are done. Requests mix prompt lengths (16-256 words) and output lengths (16-128 tokens),
drawn with a fixed seed; sampling is greedy with `ignore_eos`, so every request produces exactly its requested
number of tokens. The HTTP run streams `POST /v1/chat/completions` with `stream_options.include_usage`; the
peer submits the same chat-rendered prompt ids with `engine.submit` and reads the events with `async for`.
The two runs use different words (same lengths), so neither benefits from the other's prefix cache.

Reported: requests/s, output tokens/s, time to first token p50/p99 and inter-token latency p50/p99 (gap
between consecutive streamed pieces). By default the model is a random `AutoRegressiveLM` (about 5M
parameters; `--model DIR` serves a folder of your own, which needs a chat template).

    python benchmarks/bench_serve.py [--quick] [--clients 16] [--requests 64] [--model DIR]   # or: astrai bench serve
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import random
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import torch
import uvicorn

from astrai.config import AutoRegressiveLMConfig
from astrai.inference import InferenceEngine, SamplingParams
from astrai.model import AutoRegressiveLM
from astrai.serve import create_app

VOCAB = 4096
MODEL_CONFIG = dict(vocab_size=VOCAB, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, dim_ffn=768, max_len=1024)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]


class Timing:
    """One request: when it was sent, when each non-empty piece arrived, and how many tokens it produced.

    (A plain class: `astrai bench` loads this file without registering it in sys.modules, which dataclasses need.)
    """

    def __init__(self, sent: float, pieces: list[float] | None = None, tokens: int = 0) -> None:
        self.sent = sent
        self.pieces = pieces if pieces is not None else []
        self.tokens = tokens


def _write_checkpoint(folder: Path) -> None:
    """A random `AutoRegressiveLM` plus a word-level tokenizer (with a chat template) matching its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    AutoRegressiveLM(AutoRegressiveLMConfig(**MODEL_CONFIG)).save_pretrained(folder)
    vocab = {tok: i for i, tok in enumerate(SPECIALS)} | {f"w{i}": i for i in range(len(SPECIALS), VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(folder / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(special))


def _workload(n: int, quick: bool, seed: int) -> list[tuple[int, int]]:
    """(prompt words, output tokens) per request."""
    rng = random.Random(seed)
    outputs = [16, 32] if quick else [16, 32, 64, 128]
    return [(rng.randint(16, 64 if quick else 256), rng.choice(outputs)) for _ in range(n)]


def _messages(words: int, rng: random.Random) -> list[dict[str, str]]:
    text = " ".join(f"w{rng.randrange(len(SPECIALS), VOCAB)}" for _ in range(words))
    return [{"role": "user", "content": text}]


@contextlib.contextmanager
def _serve(app) -> Iterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


async def _closed_loop(jobs: list, clients: int, run_one) -> tuple[list[Timing], float]:
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    timings: list[Timing] = []

    async def worker() -> None:
        while not queue.empty():
            timings.append(await run_one(queue.get_nowait()))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return timings, time.perf_counter() - start


async def _http_run(url: str, jobs: list, clients: int) -> tuple[list[Timing], float]:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one(job: tuple[list[dict[str, str]], int]) -> Timing:
            messages, max_tokens = job
            body = {
                "model": "bench",
                "messages": messages,
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            timing = Timing(time.perf_counter())
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        timing.pieces.append(time.perf_counter())
                    if chunk.get("usage"):
                        timing.tokens = chunk["usage"]["completion_tokens"]
            return timing

        return await _closed_loop(jobs, clients, one)


async def _engine_run(engine: InferenceEngine, jobs: list, clients: int) -> tuple[list[Timing], float]:
    async def one(job: tuple[list[dict[str, str]], int]) -> Timing:
        messages, max_tokens = job
        ids = engine.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        timing = Timing(time.perf_counter())
        handle = engine.submit(ids, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
        async for event in handle:
            if event.text:
                timing.pieces.append(time.perf_counter())
            timing.tokens = event.completion_tokens
        return timing

    return await _closed_loop(jobs, clients, one)


def _client_process(conn) -> None:
    """Child process: receive (url, jobs, clients), run the HTTP load, send back [(sent, pieces, tokens)], s."""
    url, jobs, clients = conn.recv()
    timings, seconds = asyncio.run(_http_run(url, jobs, clients))
    conn.send(([(t.sent, t.pieces, t.tokens) for t in timings], seconds))
    conn.close()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _summary(timings: list[Timing], seconds: float) -> dict[str, float]:
    ttft = [t.pieces[0] - t.sent for t in timings if t.pieces]
    itl = [b - a for t in timings for a, b in zip(t.pieces, t.pieces[1:])]
    return {
        "requests/s": len(timings) / seconds,
        "output tok/s": sum(t.tokens for t in timings) / seconds,
        "TTFT p50": 1e3 * statistics.median(ttft),
        "TTFT p99": 1e3 * _percentile(ttft, 0.99),
        "ITL p50": 1e3 * statistics.median(itl),
        "ITL p99": 1e3 * _percentile(itl, 0.99),
    }


UNITS = {
    "requests/s": "req/s",
    "output tok/s": "tok/s",
    "TTFT p50": "ms",
    "TTFT p99": "ms",
    "ITL p50": "ms",
    "ITL p99": "ms",
}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter requests (a smoke run)")
    parser.add_argument("--clients", type=int, default=None, help="concurrent streaming clients (default 16; quick 8)")
    parser.add_argument("--requests", type=int, default=None, help="requests per run (default 64; quick 16)")
    parser.add_argument(
        "--model", type=Path, default=None, help="model folder (default: a random tiny AutoRegressiveLM)"
    )
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    clients = args.clients or (8 if args.quick else 16)
    n = args.requests or (16 if args.quick else 64)

    fork = multiprocessing.get_context("fork")
    conn, child_conn = fork.Pipe()
    client = fork.Process(target=_client_process, args=(child_conn,), daemon=True)
    client.start()  # before the engine exists: no torch thread is forked
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model
        if folder is None:
            folder = Path(tmp)
            _write_checkpoint(folder)
        engine = InferenceEngine.from_pretrained(
            folder, device=args.device, dtype=args.dtype, max_batch_size=args.max_batch_size
        )
        shape = _workload(n, args.quick, args.seed)
        rng_http, rng_peer = random.Random(args.seed + 1), random.Random(args.seed + 2)
        http_jobs = [(_messages(words, rng_http), out) for words, out in shape]
        peer_jobs = [(_messages(words, rng_peer), out) for words, out in shape]
        app = create_app(engine, served_model_names=["bench"])
        with _serve(app) as url:  # the app's lifespan shuts the engine down at the end
            warm = {"model": "bench", "messages": _messages(8, random.Random(-1)), "max_tokens": 4}
            httpx.post(f"{url}/v1/chat/completions", json=warm, timeout=600).raise_for_status()
            peer = _summary(*asyncio.run(_engine_run(engine, peer_jobs, clients)))
            conn.send((url, http_jobs, clients))
            raw, seconds = conn.recv()
            ours = _summary([Timing(sent, pieces, tokens) for sent, pieces, tokens in raw], seconds)
    client.join(timeout=30)

    label = f"{clients} clients, {n} mixed requests"
    print(f"   {label}: " + ", ".join(f"{k} {ours[k]:.3g} (engine {peer[k]:.3g})" for k in ours))
    return [
        {
            "metric": f"{key}, {label}",
            "unit": UNITS[key],
            "ours": ours[key],
            "peer": peer[key],
            "peer_name": "engine.submit, no HTTP",
        }
        for key in ours
    ]


if __name__ == "__main__":
    main()
