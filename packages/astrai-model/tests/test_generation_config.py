"""Special-token ids through save / load: a Hugging Face export with a tokenizer is complete for transformers
(tokenizer files, generation_config.json, ids in config.json), and a Qwen3 checkpoint's ids survive a round trip.
(transformers' `generate()` on an export against our engine's greedy output: astrai-infer's test_generate_cli.py.)"""

from __future__ import annotations

import json

import pytest
import transformers

from astrai.model import AutoModel, AutoRegressiveLM
from astrai.tokenize import AutoTokenizer, train_bpe_tokenizer

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world! How are you today?"] * 10


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(iter(CORPUS), vocab_size=300)


def read(path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_hf_export_with_a_tokenizer_is_complete_for_transformers(tmp_path, lm_config, tokenizer):
    model = AutoRegressiveLM(lm_config(vocab_size=tokenizer.vocab_size)).eval()
    model.save_pretrained(tmp_path, format="hf", tokenizer=tokenizer)
    bos, eos, pad, im_end = (tokenizer.token_to_id(t) for t in ("<|bos|>", "<|eos|>", "<|pad|>", "<|im_end|>"))
    assert tokenizer.stop_ids == [eos, im_end]
    ids = {"bos_token_id": bos, "eos_token_id": [eos, im_end], "pad_token_id": pad}
    assert read(tmp_path / "generation_config.json") == ids
    assert read(tmp_path / "config.json").items() >= ids.items()
    assert read(tmp_path / "special_tokens_map.json")["eos_token"]["content"] == "<|eos|>"

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    config = hf_model.generation_config
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (bos, [eos, im_end], pad)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (bos, eos, pad)
    chat = [{"role": "user", "content": "Hi"}]
    expected = tokenizer.apply_chat_template(chat, add_generation_prompt=True)
    assert hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == expected
    assert hf_tok("Hello world")["input_ids"] == tokenizer.encode("Hello world")

    ours = AutoModel.from_pretrained(tmp_path)  # and back: same ids, same stop ids
    assert ours.generation_config == ids
    assert AutoTokenizer.from_pretrained(tmp_path).stop_ids == [eos, im_end]


def test_our_format_keeps_the_ids_too(tmp_path, lm_config, tokenizer):
    model = AutoRegressiveLM(lm_config(vocab_size=tokenizer.vocab_size))
    model.save_pretrained(tmp_path, tokenizer=tokenizer)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "tokenizer_config.json").is_file()
    assert AutoModel.from_pretrained(tmp_path).generation_config["eos_token_id"] == tokenizer.stop_ids
    AutoModel.from_pretrained(tmp_path).save_pretrained(tmp_path / "hf", format="hf")  # no tokenizer: ids kept
    assert read(tmp_path / "hf" / "config.json")["eos_token_id"] == tokenizer.stop_ids


def test_qwen3_round_trip_keeps_the_ids(tmp_path, hf_checkpoint):
    ids = {"bos_token_id": 5, "eos_token_id": [6, 7], "pad_token_id": 8}
    hf_checkpoint(tmp_path / "hf", "Qwen3", head_dim=16, **ids)
    generation = read(tmp_path / "hf" / "generation_config.json") | {"temperature": 0.6, "top_k": 20}
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps(generation))  # Qwen3's sampling defaults
    ours = AutoModel.from_pretrained(tmp_path / "hf")
    assert ours.generation_config.items() >= (ids | {"temperature": 0.6, "top_k": 20}).items()
    ours.save_pretrained(tmp_path / "export", format="hf")
    assert read(tmp_path / "export" / "config.json").items() >= ids.items()
    exported = read(tmp_path / "export" / "generation_config.json")
    assert exported.items() >= (ids | {"temperature": 0.6, "top_k": 20}).items()
    assert "transformers_version" not in exported
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert (hf_model.config.eos_token_id, hf_model.generation_config.eos_token_id) == ([6, 7], [6, 7])


def test_ids_from_config_json_when_there_is_no_generation_config(tmp_path, hf_checkpoint):
    hf_checkpoint(tmp_path, "Qwen3", head_dim=16, bos_token_id=5, eos_token_id=6)
    (tmp_path / "generation_config.json").unlink()
    assert AutoModel.from_pretrained(tmp_path).generation_config == {"bos_token_id": 5, "eos_token_id": 6}


def test_unknown_ids_are_null_not_transformers_defaults(tmp_path, lm_config):
    AutoRegressiveLM(lm_config()).save_pretrained(tmp_path, format="hf")  # a Llama: eos would default to 2
    config = read(tmp_path / "config.json")
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (None, None, None)
    assert not (tmp_path / "generation_config.json").exists()
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path).generation_config.eos_token_id is None


def test_a_tokenizer_without_bos_keeps_the_stored_bos(tmp_path, hf_checkpoint, tokenizer):
    hf_checkpoint(tmp_path / "hf", "Qwen3", head_dim=16, vocab_size=tokenizer.vocab_size, bos_token_id=5)
    no_bos = AutoTokenizer(tokenizer.backend_tokenizer, eos_token="<|eos|>")
    AutoModel.from_pretrained(tmp_path / "hf").save_pretrained(tmp_path / "out", format="hf", tokenizer=no_bos)
    ids = {"bos_token_id": 5, "eos_token_id": no_bos.eos_id, "pad_token_id": None}
    assert {k: read(tmp_path / "out" / "config.json")[k] for k in ids} == ids


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, lm_config, tokenizer):
    small = AutoRegressiveLM(lm_config(vocab_size=tokenizer.vocab_size - 1))
    with pytest.raises(ValueError, match=f"tokenizer has {tokenizer.vocab_size} tokens.*vocab_size is"):
        small.save_pretrained(tmp_path, format="hf", tokenizer=tokenizer)
    assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.mark.parametrize("value", ["6", [6, "7"], True, []])
def test_a_malformed_token_id_names_the_file(tmp_path, lm_config, value):
    AutoRegressiveLM(lm_config()).save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": value}))
    with pytest.raises(ValueError, match=r"generation_config.json: eos_token_id must be a token id"):
        AutoModel.from_pretrained(tmp_path)


def test_tokenizer_keeps_its_generation_eos_ids_when_saved(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "a")
    extra = tokenizer.token_to_id("<|pad|>")  # any id: generation_config.json says it ends a reply
    (tmp_path / "a" / "generation_config.json").write_text(json.dumps({"eos_token_id": [extra], "top_k": 3}))
    loaded = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert extra in loaded.stop_ids
    loaded.save_pretrained(tmp_path / "b")
    assert AutoTokenizer.from_pretrained(tmp_path / "b").stop_ids == loaded.stop_ids
