"""`evaluate_perplexity` against naive reference loops, `read_documents`, and `astrai eval perplexity`.

A tiny random LM over the vocabulary of a small byte-level BPE tokenizer trained here on CPython's pydoc
topics. References run in float64, so the library's batched, padded computation must agree to ~1e-12.
"""

from __future__ import annotations

import importlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from astrai.config import AutoRegressiveLMConfig
from astrai.model import (
    AutoModel,
    AutoRegressiveLM,
    evaluate_perplexity,
    read_documents,
    scoring_windows,
    token_stream,
)
from astrai.tokenize import AutoTokenizer, train_bpe_tokenizer

MAX_LEN = 64
DOCUMENTS = ["Héllo wörld — 日本語 text, with multi-byte characters.", "A second, short document."]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A folder with a tiny random `AutoRegressiveLM` and the BPE tokenizer whose vocabulary it uses."""
    from pydoc_data.topics import topics

    folder = tmp_path_factory.mktemp("model")
    corpus = [topics[k] for k in sorted(topics)]
    tokenizer = train_bpe_tokenizer(iter(corpus), vocab_size=600)
    tokenizer.save_pretrained(folder)
    config = AutoRegressiveLMConfig(
        vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, dim_ffn=64, max_len=MAX_LEN
    )
    torch.manual_seed(0)
    AutoRegressiveLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k][:400] for k in ("assert", "break", "continue")] + DOCUMENTS


@pytest.fixture(scope="module")
def model64(model_dir) -> AutoRegressiveLM:
    return AutoModel.from_pretrained(model_dir, dtype=torch.float64)


@pytest.fixture(scope="module")
def tokenizer(model_dir) -> AutoTokenizer:
    return AutoTokenizer.from_pretrained(model_dir)


def expected_stream(tokenizer: AutoTokenizer, documents: list[str]) -> list[int]:
    """bos doc0 eos bos doc1 ... written out by hand."""
    ids = [tokenizer.bos_id, *tokenizer.encode(documents[0], add_special_tokens=False)]
    for doc in documents[1:]:
        ids += [tokenizer.eos_id, tokenizer.bos_id, *tokenizer.encode(doc, add_special_tokens=False)]
    return ids


def nll_by_hand(model: AutoRegressiveLM, window_ids: list[int], n_targets: int) -> float:
    """Summed NLL of the last `n_targets` tokens of one window: full forward, log-softmax by hand."""
    with torch.no_grad():
        logits = model(torch.tensor([window_ids]))["logits"][0]  # (T, V) float64
    log_probs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    targets = torch.tensor(window_ids[1:])
    token_nll = -log_probs[:-1].gather(1, targets[:, None])[:, 0]  # NLL of tokens 1..T-1
    return token_nll[len(window_ids) - 1 - n_targets :].sum().item()


def test_scoring_windows_exact_spans():
    # Non-overlapping: each window's first token unscored; the lone last token (9) is a window with nothing to score.
    assert scoring_windows(10, 3, 3) == [(0, 3, 1), (3, 6, 4), (6, 9, 7)]
    # Sliding: windows of 4 every 2 tokens score only the tokens the previous window did not reach.
    assert scoring_windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert scoring_windows(5, 8, 8) == [(0, 5, 1)]


def test_token_stream_joins_documents_with_bos_and_eos(tokenizer, documents):
    assert token_stream(tokenizer, documents) == expected_stream(tokenizer, documents)
    backend = tokenizer.backend_tokenizer
    a, b = (tokenizer.encode(d, add_special_tokens=False) for d in DOCUMENTS)
    eos = tokenizer.eos_id
    no_bos = AutoTokenizer(backend, eos_token=tokenizer.eos_token)  # eos opens the stream instead
    assert token_stream(no_bos, DOCUMENTS) == [eos, *a, eos, *b]
    same = AutoTokenizer(backend, bos_token=tokenizer.eos_token, eos_token=tokenizer.eos_token)  # GPT-2 style
    assert token_stream(same, DOCUMENTS) == [eos, *a, eos, *b]
    bare = AutoTokenizer(backend)
    assert token_stream(bare, DOCUMENTS) == [*a, *b]


@pytest.mark.parametrize("window", [MAX_LEN, 29])
def test_non_overlapping_windows_match_naive_loop(model64, tokenizer, documents, window):
    result = evaluate_perplexity(model64, tokenizer, documents, window=window, batch_size=3)
    ids = expected_stream(tokenizer, documents)
    nll, count, n_windows = 0.0, 0, 0
    for begin in range(0, len(ids), window):
        chunk = ids[begin : begin + window]
        if len(chunk) > 1:
            nll += nll_by_hand(model64, chunk, len(chunk) - 1)
            count += len(chunk) - 1
            n_windows += 1
    assert len(ids) % window != 0  # the last window is short: padded inside its batch
    assert (result.n_tokens, result.tokens_scored, result.n_windows) == (len(ids), count, n_windows)
    assert (result.window, result.stride) == (window, window)
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-12)
    assert result.mean_nll == pytest.approx(nll / count, rel=1e-12)


def test_sliding_window_matches_hf_recipe(model64, tokenizer, documents):
    window, stride = 48, 20
    documents = documents[1:]
    result = evaluate_perplexity(model64, tokenizer, documents, window=window, stride=stride, batch_size=4)
    ids = expected_stream(tokenizer, documents)
    # transformers' perplexity guide: windows every `stride` tokens; the last `end - prev_end` are targets.
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        n_targets = min(end - prev_end, end - begin - 1)
        nll += nll_by_hand(model64, ids[begin:end], n_targets)
        count += n_targets
        prev_end = end
        if end == len(ids):
            break
    assert result.tokens_scored == count == len(ids) - 1
    assert result.nll_sum == pytest.approx(nll, rel=1e-12)


@pytest.mark.parametrize("stride", [1, 7, 63])
def test_sliding_window_scores_every_token_but_the_first(model64, tokenizer, documents, stride):
    result = evaluate_perplexity(model64, tokenizer, documents[:2], stride=stride, batch_size=32)
    assert result.window == MAX_LEN
    assert result.tokens_scored == result.n_tokens - 1 == len(expected_stream(tokenizer, documents[:2])) - 1


def test_bits_per_byte_counts_utf8_bytes(model64, tokenizer):
    result = evaluate_perplexity(model64, tokenizer, DOCUMENTS)
    n_bytes = len(DOCUMENTS[0].encode("utf-8")) + len(DOCUMENTS[1].encode("utf-8"))
    assert n_bytes > sum(map(len, DOCUMENTS))  # multi-byte characters: bytes, not characters, are counted
    assert (result.n_bytes, result.n_documents) == (n_bytes, 2)
    assert result.bits_per_byte == pytest.approx(result.nll_sum / math.log(2) / n_bytes, rel=1e-15)
    as_dict = result.to_dict()
    assert as_dict["perplexity"] == result.perplexity and as_dict["tokens_scored"] == result.tokens_scored
    json.dumps(as_dict)  # plain numbers only


def test_float32_agrees_with_float64(model_dir, model64, tokenizer, documents):
    model32 = AutoModel.from_pretrained(model_dir)
    got = evaluate_perplexity(model32, tokenizer, documents, stride=16)
    assert got.nll_sum == pytest.approx(evaluate_perplexity(model64, tokenizer, documents, stride=16).nll_sum, rel=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(window=MAX_LEN + 1), "window must be in \\[2, model max_len=64\\], got 65"),
        (dict(window=1), "window must be in"),
        (dict(window=16, stride=17), "stride must be in \\[1, window=16\\], got 17"),
        (dict(stride=0), "stride must be in"),
        (dict(batch_size=0), "batch_size must be >= 1, got 0"),
    ],
)
def test_bad_arguments(model64, tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        evaluate_perplexity(model64, tokenizer, DOCUMENTS, **kwargs)


def test_tokenizer_model_mismatch_and_too_short_text(model_dir, tokenizer):
    config = AutoRegressiveLMConfig(vocab_size=50, dim=32, n_layers=1, n_heads=4, dim_ffn=64, max_len=MAX_LEN)
    with pytest.raises(ValueError, match="outside the model's vocab_size=50"):
        evaluate_perplexity(AutoRegressiveLM(config), tokenizer, DOCUMENTS)
    bare = AutoTokenizer(tokenizer.backend_tokenizer)  # no bos/eos: "a" is one token, nothing to predict
    with pytest.raises(ValueError, match="give 1 token"):
        evaluate_perplexity(AutoModel.from_pretrained(model_dir), bare, ["a"])


def test_read_documents_plain_text_and_jsonl(tmp_path):
    txt = tmp_path / "corpus.txt"
    txt.write_text("line one\nline two\n", encoding="utf-8")
    assert read_documents(txt) == ["line one\nline two\n"]
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text('{"text": "abc", "id": 1}\n\n{"text": ""}\n{"text": "défgh"}\n', encoding="utf-8")
    assert read_documents(jsonl) == ["abc", "défgh"]  # blank lines and empty texts are skipped
    # The limit counts UTF-8 bytes and never splits a character: "é" is 2 bytes, so 5 bytes keep "abc" + "d".
    assert read_documents(jsonl, limit_bytes=5) == ["abc", "d"]
    assert read_documents(jsonl, limit_bytes=6) == ["abc", "dé"]
    assert read_documents(jsonl, limit_bytes=3) == ["abc"]
    txt.write_text("é" * 10, encoding="utf-8")
    assert read_documents(txt, limit_bytes=5) == ["éé"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", "", "empty.txt: no text to score"),
        ("blank.jsonl", "\n  \n", "blank.jsonl: no text to score"),
        (
            "notext.jsonl",
            '{"text": "ok"}\n{"body": "x"}\n',
            'notext.jsonl:2: each line must be a JSON object with a string "text"',
        ),
        ("list.jsonl", '["text"]\n', "list.jsonl:1: each line must be a JSON object"),
        ("broken.jsonl", '{"text": "ok"}\n{"text": \n', "broken.jsonl:2: not valid JSON"),
    ],
)
def test_read_documents_errors_name_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        read_documents(path)


def test_read_documents_missing_binary_and_bad_limit(tmp_path):
    with pytest.raises(ValueError, match="missing.txt: no such file"):
        read_documents(tmp_path / "missing.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt: not UTF-8 text"):
        read_documents(tmp_path / "latin1.txt")
    with pytest.raises(ValueError, match="limit_bytes must be >= 1, got 0"):
        read_documents(tmp_path / "latin1.txt", limit_bytes=0)


def run_cli(model: Path, data: Path, *options: str) -> int:
    argv = ["eval", "perplexity", "--model", str(model), "--data", str(data), *options]
    return importlib.import_module("astrai.cli.main").main(argv)


def test_cli_prints_the_result(model_dir, tokenizer, documents, tmp_path, capsys):
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents), encoding="utf-8")
    assert run_cli(model_dir, data, "--window", "32", "--stride", "24", "--device", "cpu") == 0
    out = capsys.readouterr().out
    expected = evaluate_perplexity(AutoModel.from_pretrained(model_dir), tokenizer, documents, window=32, stride=24)
    assert f"tokens scored  {expected.tokens_scored:,}\n" in out
    assert f"perplexity     {expected.perplexity:.6g}\n" in out
    assert f"bits per byte  {expected.bits_per_byte:.6f}\n" in out
    assert "(window 32, stride 24)" in out


def test_cli_separate_tokenizer_dtype_and_limit(model_dir, tmp_path, capsys):
    data = tmp_path / "corpus.txt"
    data.write_text("x" * 100 + DOCUMENTS[0], encoding="utf-8")
    weights_only = tmp_path / "weights"  # the model without tokenizer files
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, weights_only / name)
    assert run_cli(weights_only, data) == 2
    assert "tokenizer.json not found" in capsys.readouterr().err
    options = ["--tokenizer", str(model_dir), "--dtype", "bfloat16", "--limit-bytes", "40", "--device", "cpu"]
    assert run_cli(weights_only, data, *options) == 0
    out = capsys.readouterr().out
    assert "1 documents, 40 bytes" in out and "torch.bfloat16" in out


def test_cli_errors_are_clean(model_dir, tmp_path, capsys):
    assert run_cli(model_dir, tmp_path / "nope.jsonl") == 2
    assert "nope.jsonl: no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "typo"}\n', encoding="utf-8")
    assert run_cli(model_dir, bad) == 2
    assert f"{bad}:2:" in capsys.readouterr().err
    assert run_cli(tmp_path / "no-model", bad) == 2
    assert "not a folder" in capsys.readouterr().err
