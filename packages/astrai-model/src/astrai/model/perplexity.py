"""Perplexity and bits per byte of a causal language model over a corpus of documents.

Definition (what `evaluate_perplexity` computes and `astrai eval perplexity` prints):

1. Token stream. Each document is encoded without special tokens and preceded by the tokenizer's bos token;
   consecutive documents are separated by its eos token (written once when bos and eos are the same token).
   A tokenizer without bos starts the stream with eos instead, so that the first text token is scored too
   (lm-evaluation-harness' convention for rolling log-likelihoods); with neither, the stream is the bare
   concatenation and its first token goes unscored.
2. Windows (Hugging Face's perplexity recipe). Windows of at most `window` tokens start every `stride` tokens
   until one reaches the end of the stream; each is a separate forward pass with positions 0..len-1. A window
   scores only the tokens the previous window did not reach, so with `stride < window` every token but the
   stream's first is scored once, with at least `window - stride` tokens of context. With `stride == window`
   (the default) windows do not overlap and the first token of each window has no context and is not scored.
3. Figures. NLL of a scored token = -ln p(token | the earlier tokens of its window), in nats.
       mean NLL      = total NLL / tokens scored                      (nats / token)
       perplexity    = exp(mean NLL)
       bits per byte = total NLL / ln 2 / UTF-8 bytes of the documents
   Bits per byte divides by the length of the text rather than the number of tokens, so it compares models
   with different tokenizers; the separator tokens' NLL counts towards the total (predicting where a document
   ends is part of modelling the text).

`read_documents` reads the corpus: a plain-text file is one document, a `.jsonl` file one document per line
(its "text" field).
"""

from __future__ import annotations

import codecs
import json
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from astrai.model.transformer import AutoRegressiveLM
from astrai.tokenize import AutoTokenizer

DEFAULT_MAX_WINDOW = 1024  # default window: min(model max_len, this)


@dataclass(frozen=True)
class PerplexityResult:
    """Totals of one evaluation; the figures of the module docstring are properties."""

    nll_sum: float  # total NLL of the scored tokens, nats
    tokens_scored: int
    n_tokens: int  # length of the token stream (text tokens plus bos/eos)
    n_bytes: int  # UTF-8 bytes of the documents
    n_documents: int
    n_windows: int
    window: int
    stride: int

    @property
    def mean_nll(self) -> float:
        """Nats per scored token."""
        return self.nll_sum / self.tokens_scored

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)

    @property
    def bits_per_byte(self) -> float:
        return self.nll_sum / math.log(2) / self.n_bytes

    def to_dict(self) -> dict[str, float | int]:
        """The totals and the derived figures, ready for JSON."""
        return asdict(self) | {
            "mean_nll": self.mean_nll,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
        }


def read_documents(path: str | Path, limit_bytes: int | None = None) -> list[str]:
    """The non-empty documents of a plain-text file (one document) or a `.jsonl` file (one "text" per line).

    `limit_bytes` keeps only the first that many UTF-8 bytes of text (the document reaching the limit is cut at
    a character boundary) and stops reading there. Errors name the file, and the line for JSONL.
    """
    path = Path(path)
    if limit_bytes is not None and limit_bytes < 1:
        raise ValueError(f"limit_bytes must be >= 1, got {limit_bytes}")
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    budget = math.inf if limit_bytes is None else limit_bytes
    documents = []
    for text in _jsonl_texts(path) if path.suffix == ".jsonl" else _plain_text(path, limit_bytes):
        data = text.encode("utf-8")
        reached = len(data) >= budget
        if reached:
            text = _decode_prefix(data[: int(budget)])
        if text:
            documents.append(text)
        if reached:
            break
        budget -= len(data)
    if not documents:
        raise ValueError(f"{path}: no text to score (the file holds no non-empty document)")
    return documents


def _decode_prefix(data: bytes) -> str:
    """UTF-8 text of `data`, dropping an incomplete character at its end (left by a byte limit)."""
    return codecs.getincrementaldecoder("utf-8")().decode(data, final=False)


def _plain_text(path: Path, limit_bytes: int | None) -> Iterator[str]:
    with path.open("rb") as f:
        data = f.read(-1 if limit_bytes is None else limit_bytes)
    try:
        yield data.decode("utf-8") if limit_bytes is None else _decode_prefix(data)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from None


def _jsonl_texts(path: Path) -> Iterator[str]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{where}: not UTF-8 text ({exc})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f'{where}: each line must be a JSON object with a string "text" field')
            yield record["text"]


def token_stream(tokenizer: AutoTokenizer, documents: Sequence[str]) -> list[int]:
    """The documents' ids joined as in the module docstring: bos doc eos bos doc ... (step 1)."""
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    start = bos if bos is not None else eos
    stream: list[int] = []
    for i, ids in enumerate(tokenizer.encode(list(documents), add_special_tokens=False)):
        if i > 0 and eos is not None:
            stream.append(eos)
        if start is not None and not (i > 0 and start == eos):  # bos == eos: the separator opens the document
            stream.append(start)
        stream.extend(ids)
    return stream


def scoring_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) of each window (step 2): it reads stream[begin:end] and scores the
    tokens stream[first_target:end], each predicted from the logits one position earlier."""
    spans = []
    scored_up_to = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        first_target = max(scored_up_to, begin + 1)  # a window's first token has no context
        if first_target < end:
            spans.append((begin, end, first_target))
        scored_up_to = end
        if end == n_tokens:
            break
    return spans


@torch.inference_mode()
def evaluate_perplexity(
    model: AutoRegressiveLM,
    tokenizer: AutoTokenizer,
    documents: Sequence[str],
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 4,
    show_progress: bool = False,
) -> PerplexityResult:
    """Score `documents` with `model` (see the module docstring for the exact definition).

    window: tokens per forward pass (default min(model max_len, 1024)); stride: tokens between window starts
    (default `window`, i.e. no overlap); batch_size: windows per forward pass.
    """
    max_len = model.config.max_len
    window = min(max_len, DEFAULT_MAX_WINDOW) if window is None else window
    stride = window if stride is None else stride
    if not 2 <= window <= max_len:
        raise ValueError(f"window must be in [2, model max_len={max_len}], got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = token_stream(tokenizer, documents)
    if len(ids) < 2:
        raise ValueError(f"the documents give {len(ids)} token(s): at least 2 are needed to score one")
    if max(ids) >= model.config.vocab_size:
        raise ValueError(
            f"the tokenizer produced id {max(ids)}, outside the model's vocab_size={model.config.vocab_size}: "
            "tokenizer and model do not match"
        )

    spans = scoring_windows(len(ids), window, stride)
    stream = torch.tensor(ids)
    device = next(model.parameters()).device
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    batches = range(0, len(spans), batch_size)
    for i in tqdm(batches, desc="windows", unit="batch", disable=not show_progress, file=sys.stderr):
        nll_sum += _batch_nll(model, stream, spans[i : i + batch_size], device)
    return PerplexityResult(
        nll_sum=nll_sum.item(),
        tokens_scored=sum(end - first for _, end, first in spans),
        n_tokens=len(ids),
        n_bytes=sum(len(d.encode("utf-8")) for d in documents),
        n_documents=len(documents),
        n_windows=len(spans),
        window=window,
        stride=stride,
    )


def _batch_nll(
    model: AutoRegressiveLM, stream: torch.Tensor, spans: list[tuple[int, int, int]], device: torch.device
) -> torch.Tensor:
    """Summed NLL (float64 scalar) of the scored tokens of `spans`, one forward pass for all of them."""
    length = max(end - begin for begin, end, _ in spans)
    input_ids = torch.zeros(len(spans), length, dtype=torch.long)  # (b, L); a short last window is right-padded
    input_mask = torch.zeros(len(spans), length, dtype=torch.bool)
    rows, cols, targets = [], [], []
    for r, (begin, end, first) in enumerate(spans):
        input_ids[r, : end - begin] = stream[begin:end]
        input_mask[r, : end - begin] = True
        rows.append(torch.full((end - first,), r))
        cols.append(torch.arange(first - begin - 1, end - begin - 1))  # logits at t predict token t + 1
        targets.append(stream[first:end])
    logits = model(input_ids.to(device), input_mask.to(device))["logits"]  # (b, L, V)
    scored = logits[torch.cat(rows).to(device), torch.cat(cols).to(device)]  # (n, V)
    # Softmax in at least float32: bf16 logits would lose ~3 digits of every log-probability.
    scored = scored.to(torch.promote_types(scored.dtype, torch.float32))
    nll = F.cross_entropy(scored, torch.cat(targets).to(device), reduction="none")  # (n,)
    return nll.double().sum()
