"""IncrementalDetokenizer: streamed pieces concatenate to `decode(all)` and never split a character."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from astrai.tokenize import AutoTokenizer, IncrementalDetokenizer, train_bpe_tokenizer

STREAM = "Streaming 你好，世界！今日は良い天気ですね。🌍🚀👩‍👩‍👧 done, naïve café."
CORPUS = [f"line {i}: the quick brown fox jumps over the lazy dog number {i}" for i in range(300)]


@pytest.fixture(scope="module")
def byte_level() -> AutoTokenizer:
    """A small byte-level BPE that never saw CJK or emoji, so those split into single-byte tokens."""
    return train_bpe_tokenizer(iter(CORPUS), vocab_size=400)


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.push(i) for i in ids] + [detok.flush()]


def test_streamed_cjk_and_emoji_concatenate_to_decode(byte_level):
    ids = byte_level.encode(STREAM, add_special_tokens=False)
    pieces = stream(IncrementalDetokenizer(byte_level), ids)
    assert "".join(pieces) == byte_level.decode(ids) == STREAM
    assert not any("\ufffd" in piece for piece in pieces)
    assert pieces.count("") > 10  # partial characters really were held back
    assert [byte_level.decode([i]) for i in ids].count("\ufffd") > 10  # and decoding alone would break them


def test_special_tokens_are_skipped_or_kept(byte_level):
    ids = [byte_level.bos_id, *byte_level.encode("héllo 世界", add_special_tokens=False), byte_level.eos_id]
    assert "".join(stream(IncrementalDetokenizer(byte_level), ids)) == "héllo 世界"
    kept = stream(IncrementalDetokenizer(byte_level, skip_special_tokens=False), ids)
    assert "".join(kept) == "<|bos|>héllo 世界<|eos|>" == byte_level.decode(ids, skip_special_tokens=False)


def test_flush_returns_an_incomplete_character_as_decode_does(byte_level):
    first_byte = byte_level.encode("世", add_special_tokens=False)[:1]
    detok = IncrementalDetokenizer(byte_level)
    assert detok.push(first_byte[0]) == ""
    assert detok.flush() == byte_level.decode(first_byte) == "\ufffd"
    assert detok.flush() == ""


def test_prompt_ids_give_context_to_sentencepiece_style_decoders():
    """Metaspace decoders drop the leading space of the first token they decode: `decode(["▁world"])` is
    "world". With the prompt as context the first generated piece keeps its space."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"], show_progress=False)
    backend.train_from_iterator(CORPUS, trainer)
    tokenizer = AutoTokenizer(backend)

    prompt = tokenizer.encode("the quick brown", add_special_tokens=False)
    generated = tokenizer.encode("the quick brown fox jumps", add_special_tokens=False)[len(prompt) :]
    assert tokenizer.decode(generated) == "fox jumps"  # the space is lost without context

    pieces = stream(IncrementalDetokenizer(tokenizer, prompt_ids=prompt), generated)
    assert "".join(pieces) == " fox jumps"
    assert pieces[0].startswith(" ")
