"""`InferenceEngine`: the user-facing inference API over the continuous-batching scheduler.

    engine = InferenceEngine.from_pretrained("path/to/model")        # model + tokenizer from one folder
    engine.generate("Hello", max_tokens=32, temperature=0)           # -> str
    for piece in engine.generate("Hello", stream=True): ...           # -> str pieces as they are produced
    handle = engine.submit(prompt_ids, SamplingParams(...))           # the primitive the HTTP layer uses
    async for event in handle: ...                                    # GenerationEvent, any asyncio loop

Every convenience is built on `submit`, which validates the request in the caller's thread (ValueError for a
bad parameter, QueueFullError when the queue is full) and returns a `RequestHandle`. Text prompts give text,
token-id prompts give token ids, a list of prompts gives a list of results; streams yield pieces, and closing
a stream (or leaving an `async for` early) cancels its requests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from astrai.inference.handle import GenerateResult, RequestHandle
from astrai.inference.params import GenerationRequest, SamplingParams
from astrai.inference.scheduler import InferenceScheduler
from astrai.inference.stream import GenerationEvent

Prompt = str | list[int]
Piece = str | list[int]


class InferenceEngine:
    """A model and its tokenizer served by one background scheduler loop (started on construction).

    `device` / `dtype` (a torch dtype or its name, e.g. "bfloat16") move and cast `model` itself, in place; the
    KV cache follows the model's dtype. `max_prefill_tokens` bounds the prompt tokens computed per step (default
    512 on the CPU, 2048 on a GPU). `pack_weights` (CPU): multiply through packed copies of the weights (a C
    kernel, oneDNN where it does not serve), 1.2-3x faster projections for one more copy of the weights in memory
    (`astrai.model.pack_linear_weights`); dropped at `shutdown()`. `cuda_graphs` (CUDA): decode steps and
    prefill chunks are recorded at start, one graph per shape bucket, and replayed (`astrai.inference.cuda_graphs`).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        max_batch_size: int = 16,
        max_seq_len: int | None = None,
        page_size: int = 16,
        num_pages: int | None = None,
        max_queue: int = 256,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        max_prefill_tokens: int | None = None,
        model_name: str = "astrai",
        pack_weights: bool = True,
        cuda_graphs: bool = True,
    ):
        dtype = _resolve_dtype(dtype)
        if device is not None or dtype is not None:
            model = model.to(device=device, dtype=dtype)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.vocab_size = model.config.vocab_size
        self._eos_ids = frozenset(tokenizer.stop_ids)
        self.scheduler = InferenceScheduler(
            model,
            tokenizer,
            max_batch_size=max_batch_size,
            max_seq_len=max_seq_len,
            page_size=page_size,
            num_pages=num_pages,
            max_queue=max_queue,
            max_prefill_tokens=max_prefill_tokens,
            device=device,
            dtype=dtype,
            pack_weights=pack_weights,
            cuda_graphs=cuda_graphs,
        )
        self.max_seq_len = self.scheduler.max_seq_len
        self.scheduler.start()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        *,
        tokenizer: str | Path | Any | None = None,
        **kwargs: Any,
    ) -> InferenceEngine:
        """Load the model from a folder, and the tokenizer from the same folder or from `tokenizer` (a tokenizer
        folder or an `AutoTokenizer`: for a model folder without one, e.g. a training checkpoint); a model folder
        without tokenizer.json and no `tokenizer` is a ValueError. `model_name` defaults to the folder's name."""
        from astrai.model import AutoModel
        from astrai.tokenize import AutoTokenizer
        from astrai.tokenize.folder import TOKENIZER_FILE

        path = Path(path)
        if tokenizer is None and path.is_dir() and not (path / TOKENIZER_FILE).is_file():
            raise ValueError(
                f"{path} has no tokenizer ({TOKENIZER_FILE}): pass its tokenizer folder, "
                "tokenizer=DIR (astrai generate / serve: --tokenizer DIR)"
            )
        if tokenizer is None or isinstance(tokenizer, (str, Path)):
            tokenizer = AutoTokenizer.from_pretrained(path if tokenizer is None else tokenizer)
        model = AutoModel.from_pretrained(path, dtype=_resolve_dtype(dtype), device=device)
        kwargs.setdefault("model_name", path.resolve().name)
        return cls(model, tokenizer, device=device, dtype=dtype, **kwargs)

    # ---- the primitive ----------------------------------------------------------------------------------

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams) -> RequestHandle:
        """Queue one request; returns its handle. Raises ValueError for a bad prompt or parameter (checked here,
        never in the loop) and QueueFullError when `max_queue` requests already wait."""
        return self._submit(prompt_ids, params)

    def _submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        listener: Callable[[GenerationEvent], None] | None = None,
    ) -> RequestHandle:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        prompt_ids = list(prompt_ids)
        if not prompt_ids:
            raise ValueError("prompt is empty: it must hold at least one token")
        bad = [t for t in prompt_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:8]}: must be integers in [0, {self.vocab_size})")
        bad = [t for t in (params.logit_bias or {}) if not t < self.vocab_size]
        if bad:
            raise ValueError(f"logit_bias token ids {bad[:8]}: must be below the vocabulary size {self.vocab_size}")
        handle = RequestHandle(len(prompt_ids), self.scheduler.remove_task)
        handle.request_id = self.scheduler.add_task(
            prompt_ids,
            stream_callback=handle.deliver if listener is None else listener,
            stop=params.stop,
            **params.task_kwargs(self._eos_ids),
        )
        return handle

    # ---- conveniences -----------------------------------------------------------------------------------

    def generate(
        self,
        prompt: Prompt | list[Prompt],
        stream: bool = False,
        max_tokens: int | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        **sampling: Any,
    ) -> Any:
        """Generate for a prompt (str -> str, token ids -> token ids) or a list of prompts (-> list).

        `stream=True` returns an iterator of pieces instead (for a list of prompts, `(index, piece)` pairs);
        closing it early cancels the requests. Other keywords are `SamplingParams` fields.
        """
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, **sampling)
        prompts, batch, as_text = self._encode_prompts(prompt)
        return self._generate(prompts, batch, as_text, stream, params)

    def generate_async(
        self,
        prompt: Prompt,
        max_tokens: int | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        **sampling: Any,
    ) -> AsyncIterator[Piece]:
        """An async iterator of the pieces of one prompt's output (the request is submitted right away)."""
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, **sampling)
        prompts, batch, as_text = self._encode_prompts(prompt)
        if batch:
            raise ValueError("generate_async takes one prompt (a string or a list of token ids), not a list of them")
        return _async_pieces(self.submit(prompts[0], params), as_text)

    def generate_with_request(self, request: GenerationRequest) -> Any:
        """Render `request.messages` with the chat template and generate text (a str, or str pieces if
        `request.stream`)."""
        ids = self.tokenizer.apply_chat_template(request.messages, tokenize=True, add_generation_prompt=True)
        return self._generate([ids], False, True, request.stream, request.sampling_params())

    def get_stats(self) -> dict[str, Any]:
        return {"model": self.model_name, **self.scheduler.get_stats()}

    def reset_prefix_cache(self) -> None:
        """Requests submitted from now on never reuse KV computed before (call after updating the weights)."""
        self.scheduler.reset_prefix_cache()

    def is_alive(self) -> bool:
        return self.scheduler.is_alive()

    def shutdown(self) -> None:
        """Stop the loop; every request still queued or running ends with a "cancelled" event."""
        self.scheduler.stop()

    def __enter__(self) -> InferenceEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- internals --------------------------------------------------------------------------------------

    def _encode_prompts(self, prompt: Any) -> tuple[list[list[int]], bool, bool]:
        """(token-id prompts, is a batch, prompts were text)."""
        if isinstance(prompt, str):
            return [self._encode(prompt)], False, True
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ValueError(f"prompt={prompt!r}: must be a string, a list of token ids, or a non-empty list of either")
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return [list(prompt)], False, False
        if all(isinstance(p, str) for p in prompt):
            return [self._encode(p) for p in prompt], True, True
        if all(isinstance(p, (list, tuple)) for p in prompt):
            return [list(p) for p in prompt], True, False
        raise ValueError("prompt: a batch must be all strings or all lists of token ids")

    def _encode(self, text: str) -> list[int]:
        if not text:
            raise ValueError("prompt is empty: give some text")
        return self.tokenizer.encode(text)

    def _generate(
        self, prompts: list[list[int]], batch: bool, as_text: bool, stream: bool, params: SamplingParams
    ) -> Any:
        if not batch:
            handle = self.submit(prompts[0], params)
            return _sync_pieces(handle, as_text) if stream else _collect(handle, as_text)
        result = GenerateResult(len(prompts))
        handles: list[RequestHandle] = []
        try:
            for i, ids in enumerate(prompts):
                handles.append(self._submit(ids, params, lambda event, i=i: result.append(event, i)))
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        if stream:
            return _batch_pieces(result, handles, as_text)
        result.wait_completion()
        _raise_errors(result.errors)
        return list(result.results) if as_text else [list(ids) for ids in result.token_ids]


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype={dtype!r}: not a torch dtype (e.g. 'float32', 'bfloat16', 'float16')")
    return resolved


def _piece(event: GenerationEvent, as_text: bool) -> Piece:
    return event.text if as_text else event.token_ids


def _raise_errors(errors: Sequence[str | None]) -> None:
    failed = [e for e in errors if e is not None]
    if failed:
        raise RuntimeError(f"generation failed: {failed[0]}")


def _collect(handle: RequestHandle, as_text: bool) -> Piece:
    text, ids = [], []
    for event in handle.iter_sync():
        text.append(event.text)
        ids += event.token_ids
        _raise_errors([event.error])
    return "".join(text) if as_text else ids


def _sync_pieces(handle: RequestHandle, as_text: bool) -> Iterator[Piece]:
    try:
        for event in handle.iter_sync():
            _raise_errors([event.error])
            piece = _piece(event, as_text)
            if piece:
                yield piece
    finally:
        handle.cancel()  # no-op once finished; stops the request if the reader closed the stream early


def _batch_pieces(result: GenerateResult, handles: list[RequestHandle], as_text: bool) -> Iterator[tuple[int, Piece]]:
    try:
        while True:
            result.wait()
            events = result.pop_events()
            if not events and result.done:
                return
            for idx, event in events:
                _raise_errors([event.error])
                piece = _piece(event, as_text)
                if piece:
                    yield idx, piece
    finally:
        for handle in handles:
            handle.cancel()


async def _async_pieces(handle: RequestHandle, as_text: bool) -> AsyncIterator[Piece]:
    try:
        async for event in handle:
            _raise_errors([event.error])
            piece = _piece(event, as_text)
            if piece:
                yield piece
    finally:
        handle.cancel()
