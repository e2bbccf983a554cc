"""train_bpe_tokenizer: deterministic byte-level BPE with special tokens and a ChatML template."""

from __future__ import annotations

import json
from pydoc_data.topics import topics

import pytest
import transformers

from astrai.tokenize import AutoTokenizer, train_bpe_tokenizer

LINES = [line for text in list(topics.values())[:80] for line in text.splitlines() if line.strip()]
SAMPLES = ["def f(x): return x ** 2", "你好，世界 🌍 — naïve café", "  spaced\tout\n", ""]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"}]


@pytest.fixture(scope="module")
def tokenizer() -> AutoTokenizer:
    return train_bpe_tokenizer(iter(LINES), vocab_size=800, additional_special_tokens=["<|tool|>"])


def test_special_tokens_come_first_in_a_fixed_order(tokenizer):
    expected = ["<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>", "<|tool|>"]
    assert [tokenizer.id_to_token(i) for i in range(6)] == expected
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.unk_id) == (0, 1, 2, None)
    assert tokenizer.vocab_size == 800
    assert tokenizer.stop_ids == [1, 4]  # eos and <|im_end|>, never pad or bos


def test_encode_prepends_bos_and_round_trips_any_text(tokenizer):
    for text in SAMPLES:
        ids = tokenizer.encode(text)
        assert ids[0] == tokenizer.bos_id and ids[1:] == tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text  # byte-level: no unknown token, exact round trip
    assert tokenizer.encode("<|im_end|>", add_special_tokens=False) == [4]


def test_chatml_template(tokenizer):
    text = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    assert (
        text
        == "<|bos|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi 🙂<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True)
    assert ids[:2] == [0, 3] and ids.count(0) == 1  # one bos: the template writes it, tokenising adds none
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_training_is_deterministic(tokenizer):
    again = train_bpe_tokenizer(iter(LINES), vocab_size=800, additional_special_tokens=["<|tool|>"])
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_training_from_files(tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("\n".join(LINES[: len(LINES) // 2]), encoding="utf-8")
    second.write_text("\n".join(LINES[len(LINES) // 2 :]), encoding="utf-8")
    from_files = train_bpe_tokenizer([first, str(second)], vocab_size=600)
    from_one_file = train_bpe_tokenizer(first, vocab_size=600)
    assert from_files.vocab_size == 600 and from_files.decode(from_files.encode(SAMPLES[1])) == SAMPLES[1]
    assert from_files.backend_tokenizer.to_str() != from_one_file.backend_tokenizer.to_str()


def test_saved_folder_reads_the_same_in_transformers(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert {k: config[k] for k in ("bos_token", "eos_token", "pad_token")} == {
        "bos_token": "<|bos|>",
        "eos_token": "<|eos|>",
        "pad_token": "<|pad|>",
    }
    ours = AutoTokenizer.from_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert ours.stop_ids == tokenizer.stop_ids and ours.vocab_size == len(hf) == 800
    for text in SAMPLES:
        assert ours.encode(text) == hf.encode(text) == tokenizer.encode(text)
        assert ours.decode(ours.encode(text)) == hf.decode(hf.encode(text), skip_special_tokens=True)
    expected = hf.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert ours.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(vocab_size=100), r"vocab_size=100 is too small: the 256 byte symbols and 5 special tokens"),
        (dict(vocab_size=800, special_tokens={"bos": "<s>"}), r"special_tokens needs 'bos' and 'eos'"),
        (dict(vocab_size=800, special_tokens={"bos": "<s>", "eos": "</s>", "sep": "x"}), r"allows 'pad', 'unk'"),
        (dict(vocab_size=800, min_frequency=0), r"min_frequency must be >= 1, got 0"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        train_bpe_tokenizer(iter(LINES[:10]), **kwargs)


def test_a_list_names_files(tmp_path):
    with pytest.raises(ValueError, match=r"training file 'some text' not found \(to train on texts, pass iter"):
        train_bpe_tokenizer(["some text"], vocab_size=400)
