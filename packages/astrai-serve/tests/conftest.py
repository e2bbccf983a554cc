"""Test doubles and a live-server fixture for astrai.serve.

`FakeEngine` follows the `InferenceEngine` contract (submit -> handle with async / sync iteration and
idempotent cancel, get_stats, is_alive, shutdown, tokenizer, model_name, max_seq_len) with a scheduler
loop thread of its own, so the server is exercised exactly as with the real engine: events arrive from
another thread, requests queue, cancellation is a flag the loop honours at its next step. Its "model"
is deterministic: the reply to a prompt is `reply(last user text)`, one character per token, then EOS.
Stop strings go through the engine's own `StopChecker` (held back across pieces, trimmed before the match).

`model_dir` is a real model folder for the tests over the real `InferenceEngine`: a tiny random
`AutoRegressiveLM` with a character tokenizer (ASCII) and a chat template that refuses an assistant first turn.

`serve(app)` runs uvicorn on a real 127.0.0.1 socket in a background thread. The socket is bound and
listening before the thread starts, so clients can connect at once (the kernel queues the connection
until uvicorn accepts it): no polling for readiness.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import queue
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
import torch
import uvicorn
from tokenizers import Tokenizer, decoders, models

from astrai.config import AutoRegressiveLMConfig
from astrai.inference import GenerationEvent, LoopStoppedError, QueueFullError, SamplingParams, StopChecker
from astrai.model import AutoRegressiveLM

SPECIALS = ["<unk>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHARS = [chr(c) for c in range(32, 127)] + ["\n", "é", "世", "界", "🙂"]
PAGE_SIZE = 4  # granularity of the fake prefix cache


class FakeTokenizer:
    """Character-level tokenizer (a real `tokenizers.Tokenizer`) with a tiny chat template."""

    def __init__(self) -> None:
        vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
        self._tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
        self._tok.add_special_tokens(SPECIALS)
        self._tok.decoder = decoders.Fuse()
        self.vocab_size = len(vocab)
        self.eos_id = vocab["<eos>"]
        self.stop_ids = [self.eos_id, vocab["<|end|>"]]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    @staticmethod
    def render(messages: list[dict[str, str]]) -> str:
        return "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages) + "<|assistant|>"

    def apply_chat_template(
        self, messages: list[dict[str, str]], tokenize: bool = True, add_generation_prompt: bool = True
    ) -> list[int] | str:
        assert add_generation_prompt
        text = self.render(messages)
        return self.encode(text) if tokenize else text


def echo_reply(user_text: str) -> str:
    return f"You said: {user_text}. Bye!"


def last_user_text(prompt: str) -> str:
    """The content of the last user turn of a prompt rendered by `FakeTokenizer.render`."""
    return prompt.rsplit("<|user|>", 1)[-1].split("<|end|>", 1)[0]


class FakeHandle:
    """A submitted request: events pushed by the engine thread, consumed by one async or sync reader."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, plan: list[int]) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.plan = plan  # token ids the fake model will produce, in order
        self.cached = 0  # prompt tokens "served from the prefix cache"
        self.cancelled = threading.Event()
        self.done = threading.Event()  # the final event was produced
        self.final: GenerationEvent | None = None
        self.produced: list[int] = []
        self.stop = StopChecker(params.stop)  # the engine's own stop-string hold-back and trimming
        self._events: collections.deque[GenerationEvent] = collections.deque()
        self._cond = threading.Condition()
        self._wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def push(self, event: GenerationEvent) -> None:
        with self._cond:
            self._events.append(event)
            if event.finished:
                self.final = event
                self.done.set()
            self._cond.notify_all()
            wakers = list(self._wakers)
        for loop, wake in wakers:
            loop.call_soon_threadsafe(wake.set)

    def cancel(self) -> None:
        self.cancelled.set()

    async def __aiter__(self):
        wake = asyncio.Event()
        with self._cond:
            self._wakers.append((asyncio.get_running_loop(), wake))
        while True:
            with self._cond:
                event = self._events.popleft() if self._events else None
            if event is None:
                await wake.wait()
                wake.clear()
                continue
            yield event
            if event.finished:
                return

    def iter_sync(self) -> Iterator[GenerationEvent]:
        while True:
            with self._cond:
                while not self._events:
                    self._cond.wait()
                event = self._events.popleft()
            yield event
            if event.finished:
                return


class FakeEngine:
    """Deterministic stand-in for `InferenceEngine`; see the module docstring."""

    def __init__(
        self,
        *,
        reply: Callable[[str], str] = echo_reply,
        max_seq_len: int = 256,
        max_batch_size: int = 64,
        max_queue: int = 256,
        model_name: str = "m",  # the name the tests ask for
    ) -> None:
        self.tokenizer = FakeTokenizer()
        self.reply = reply
        self.max_seq_len = max_seq_len
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.model_name = model_name
        self.fail_after: int | None = None  # produce this many tokens, then finish with "error"
        self.pause_after: int | None = None  # pause() once a request has produced this many tokens
        self._paused = False  # see pause()
        self.submitted: queue.Queue[FakeHandle] = queue.Queue()  # every handle, for tests to pick up
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._waiting: collections.deque[FakeHandle] = collections.deque()
        self._running: list[FakeHandle] = []
        self._seen_prompts: list[list[int]] = []
        self._stopping = False
        self._crash = False
        self.stats = collections.Counter()
        self._thread = threading.Thread(target=self._loop, name="fake-engine", daemon=True)
        self._thread.start()

    # ---- contract -------------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams) -> FakeHandle:
        if not prompt_ids:
            raise ValueError("prompt_ids must not be empty")
        for token_id in params.logit_bias or {}:
            if not 0 <= token_id < self.tokenizer.vocab_size:
                raise ValueError(f"logit_bias token id {token_id} is outside the vocabulary")
        max_tokens = params.max_tokens or self.max_seq_len - len(prompt_ids)
        if len(prompt_ids) + max_tokens > self.max_seq_len:
            raise ValueError(f"prompt + max_tokens exceeds max_seq_len {self.max_seq_len}")
        reply_ids = self.tokenizer.encode(self.reply(last_user_text(self.tokenizer.decode(prompt_ids, False))))
        plan = (reply_ids * (max_tokens // max(len(reply_ids), 1) + 1)) if params.ignore_eos else reply_ids
        plan = [*plan, self.tokenizer.eos_id][:max_tokens]
        with self._cond:
            if self._stopping or self._crash:
                raise LoopStoppedError("the fake engine loop is not running")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests are waiting (max_queue={self.max_queue})")
            handle = FakeHandle(f"req-{next(self._ids)}", list(prompt_ids), params, plan)
            handle.cached = self._cached_prefix(prompt_ids)
            self._seen_prompts.append(list(prompt_ids))
            self._waiting.append(handle)
            self._cond.notify_all()
        self.submitted.put(handle)
        return handle

    def get_stats(self) -> dict:
        with self._cond:
            return {
                "running": len(self._running),
                "waiting": len(self._waiting),
                "pages_total": 64,
                "pages_used": 4 * len(self._running),
                "pages_cached": 2,
                "pages_free": 62 - 4 * len(self._running),
                "prefix_hit_tokens": self.stats["prefix_hit_tokens"],
                "prompt_tokens_total": self.stats["prompt_tokens_total"],
                "generation_tokens_total": self.stats["generation_tokens_total"],
                "preemptions": 0,
                "requests_finished": self.stats["requests_finished"],
                "tokens_per_s": 12.5,
                "loop_alive": self.is_alive(),
                "ttft_sum": 0.25,
                "ttft_count": self.stats["requests_finished"],
            }

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    # ---- test controls ------------------------------------------------------------------------------------
    def pause(self) -> None:
        """Stop making progress after the current step: new requests stay queued, running ones stall."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def crash(self) -> None:
        """Make the loop thread exit as if it had died (for /health)."""
        with self._cond:
            self._crash = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    # ---- the loop -------------------------------------------------------------------------------------------
    def _cached_prefix(self, prompt_ids: list[int]) -> int:
        best = 0
        for seen in self._seen_prompts:
            common = 0
            for a, b in zip(seen, prompt_ids):
                if a != b:
                    break
                common += 1
            best = max(best, common)
        return min(best, len(prompt_ids) - 1) // PAGE_SIZE * PAGE_SIZE

    def _loop(self) -> None:
        while True:
            with self._cond:
                has_work = lambda: not self._paused and (self._waiting or self._running)  # noqa: E731
                while not (has_work() or self._stopping or self._crash):
                    self._cond.wait()
                if self._crash:
                    return
                if self._stopping:
                    for handle in [*self._waiting, *self._running]:
                        self._finish(handle, "cancelled")
                    return
                while self._waiting and len(self._running) < self.max_batch_size:
                    self._running.append(self._waiting.popleft())
                running = list(self._running)
            for handle in running:
                self._step(handle)
            with self._cond:
                self._running = [h for h in self._running if not h.done.is_set()]

    def _finish(self, handle: FakeHandle, reason: str, text: str = "", stop: str | None = None, error=None) -> None:
        self.stats["requests_finished"] += 1
        handle.push(self._event(handle, text, [], True, reason, stop, error))

    def _event(self, handle, text, token_ids, finished, reason=None, stop=None, error=None) -> GenerationEvent:
        return GenerationEvent(
            text=text,
            token_ids=token_ids,
            finished=finished,
            finish_reason=reason,
            stop_sequence=stop,
            prompt_tokens=len(handle.prompt_ids),
            cached_tokens=handle.cached,
            completion_tokens=len(handle.produced),
            error=error,
        )

    def _step(self, handle: FakeHandle) -> None:
        """Produce one token for `handle` (or finish it)."""
        if handle.cancelled.is_set():
            self._finish(handle, "cancelled")
            return
        if not handle.produced:
            self.stats["prompt_tokens_total"] += len(handle.prompt_ids)
            self.stats["prefix_hit_tokens"] += handle.cached
        if self.fail_after is not None and len(handle.produced) >= self.fail_after:
            self._finish(handle, "error", error="fake engine failure")
            return
        token = handle.plan[len(handle.produced)]
        handle.produced.append(token)
        self.stats["generation_tokens_total"] += 1
        if token in self.tokenizer.stop_ids and not handle.params.ignore_eos:
            self._finish(handle, "stop", handle.stop.flush())
            return
        text = handle.stop.push(self.tokenizer.decode([token]))
        if handle.stop.matched is not None:
            self._finish(handle, "stop_sequence", text, handle.stop.matched)
        elif len(handle.produced) == len(handle.plan):
            self._finish(handle, "length", text + handle.stop.flush())
        else:
            if text:  # like the engine: a non-final event only when it carries text
                handle.push(self._event(handle, text, [token], False))
            if self.pause_after is not None and len(handle.produced) >= self.pause_after:
                self.pause()


@contextlib.contextmanager
def serve(app, config: uvicorn.Config | None = None) -> Iterator[str]:
    """Run `app` (or the app of `config`, whose host and port are ignored) under uvicorn on a free 127.0.0.1 port
    in a thread; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    config = config or uvicorn.Config(app, lifespan="on", timeout_graceful_shutdown=5)
    config.log_level = "warning"
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


class Server:
    """A running app over a FakeEngine: `url`, `engine`, and SDK clients built for it."""

    def __init__(self, url: str, engine: FakeEngine, api_key: str = "test-key") -> None:
        self.url = url
        self.engine = engine
        self.api_key = api_key

    def openai(self, **kw):
        import openai

        kw.setdefault("api_key", self.api_key)
        return openai.OpenAI(base_url=f"{self.url}/v1", max_retries=0, _strict_response_validation=True, **kw)

    def async_openai(self, **kw):
        import openai

        kw.setdefault("api_key", self.api_key)
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", max_retries=0, _strict_response_validation=True, **kw)

    def anthropic(self, **kw):
        import anthropic

        kw.setdefault("api_key", self.api_key)
        return anthropic.Anthropic(base_url=self.url, max_retries=0, _strict_response_validation=True, **kw)

    def async_anthropic(self, **kw):
        import anthropic

        kw.setdefault("api_key", self.api_key)
        return anthropic.AsyncAnthropic(base_url=self.url, max_retries=0, _strict_response_validation=True, **kw)


@pytest.fixture
def make_server():
    """`make_server(engine=None, **create_app_kwargs)` -> a running `Server`; all stopped at teardown."""
    from astrai.serve import create_app

    stack = contextlib.ExitStack()

    def make(engine: FakeEngine | None = None, **app_kwargs) -> Server:
        engine = engine or FakeEngine()
        url = stack.enter_context(serve(create_app(engine, **app_kwargs)))
        return Server(url, engine, app_kwargs.get("api_key") or "test-key")

    with stack:
        yield make


@pytest.fixture
def server(make_server) -> Server:
    return make_server()


@pytest.fixture
def serve_app():
    """The `serve(app)` context manager, for tests that control the server's lifetime themselves."""
    return serve


@pytest.fixture
def fake_engine() -> type[FakeEngine]:
    """The FakeEngine class, for tests that need one with non-default settings."""
    return FakeEngine


REAL_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('the assistant cannot speak first') }}{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A real model folder: see the module docstring."""
    folder = tmp_path_factory.mktemp("tiny-model")
    vocab = {tok: i for i, tok in enumerate(SPECIALS + [chr(c) for c in range(32, 127)])}
    config = AutoRegressiveLMConfig(
        vocab_size=len(vocab), dim=64, n_layers=2, n_heads=4, n_kv_heads=2, dim_ffn=128, max_len=512
    )
    torch.manual_seed(0)
    AutoRegressiveLM(config).save_pretrained(folder)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(SPECIALS)
    tok.decoder = decoders.Fuse()
    tok.save(str(folder / "tokenizer.json"))
    tokenizer_config = {"eos_token": "<eos>", "unk_token": "<unk>", "chat_template": REAL_CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder
