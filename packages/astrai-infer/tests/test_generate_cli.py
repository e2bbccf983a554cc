"""`astrai generate`: one prompt (plain, streamed, chat) and the JSONL batch mode, through the `astrai` command;
`--tokenizer` for a model folder without one; a Hugging Face export generates the same in transformers."""

import copy
import json

import pytest
import torch
import transformers

from astrai.cli.main import main
from astrai.inference import InferenceEngine

GREEDY = ["--temperature", "0", "--max-tokens", "6"]


def _generate(model_dir, *args):
    return main(["generate", "--model", str(model_dir), *args])


def test_single_prompt_prints_the_greedy_output(model_dir, make_engine, capsys):
    expected = make_engine(max_seq_len=128).generate("Hello world", max_tokens=6, temperature=0.0)
    assert _generate(model_dir, "--prompt", "Hello world", *GREEDY) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert _generate(model_dir, "--prompt", "Hello world", "--stream", *GREEDY) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert _generate(model_dir, "--prompt", "Hello world", "--no-pack-weights", *GREEDY) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert _generate(model_dir, "--prompt", "Hello world", "--no-cuda-graphs", *GREEDY) == 0  # a no-op on the CPU
    assert capsys.readouterr().out == expected + "\n"


def test_chat_mode_uses_the_chat_template(model_dir, make_engine, tokenizer, capsys):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True, add_generation_prompt=True)
    engine = make_engine(max_seq_len=128)
    expected = tokenizer.decode(engine.generate(ids, max_tokens=6, temperature=0.0))
    assert _generate(model_dir, "--prompt", "Hi", "--chat", *GREEDY) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_jsonl_batch_writes_one_line_per_prompt_in_order(model_dir, make_engine, tmp_path):
    prompts = ["Hello world", "The quick brown fox", "日本語"]
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts) + "\n")
    target = tmp_path / "out.jsonl"
    assert _generate(model_dir, "--input", str(source), "--output", str(target), *GREEDY, "--seed", "3") == 0
    rows = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    engine = make_engine(max_seq_len=128)
    assert [r["prompt"] for r in rows] == prompts
    assert [r["output"] for r in rows] == engine.generate(prompts, max_tokens=6, temperature=0.0)
    for row in rows:
        assert row["finish_reason"] in ("length", "stop") and 1 <= row["completion_tokens"] <= 6


def test_bad_arguments_are_reported_without_a_traceback(model_dir, tmp_path, capsys):
    assert _generate(model_dir, "--prompt", "Hi", "--top-p", "0") == 2
    assert "top_p" in capsys.readouterr().err
    assert _generate(tmp_path / "missing", "--prompt", "Hi") == 2
    assert "not a folder" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n[1, 2]\n')
    assert _generate(model_dir, "--input", str(bad)) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert _generate(model_dir, "--input", str(tmp_path / "nope.jsonl")) == 2
    assert capsys.readouterr().err.strip() == f"astrai generate: error: --input {tmp_path / 'nope.jsonl'}: no such file"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_device_without_cuda_is_one_line(model_dir, capsys):
    assert _generate(model_dir, "--prompt", "Hi", "--device", "cuda") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("astrai generate: error: device 'cuda': CUDA is not available on this machine")
    assert "\n" not in err


def test_tokenizer_option_for_a_folder_without_tokenizer(model, tokenizer, make_engine, tmp_path, capsys):
    model.save_pretrained(tmp_path / "ckpt")  # a model folder without tokenizer files, as a training checkpoint
    tokenizer.save_pretrained(tmp_path / "tok")
    expected = make_engine(max_seq_len=128).generate("Hello world", max_tokens=6, temperature=0.0)
    assert _generate(tmp_path / "ckpt", "--tokenizer", str(tmp_path / "tok"), "--prompt", "Hello world", *GREEDY) == 0
    assert capsys.readouterr().out == expected + "\n"

    assert _generate(tmp_path / "ckpt", "--prompt", "Hello world", *GREEDY) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"astrai generate: error: --model {tmp_path / 'ckpt'} has no tokenizer (tokenizer.json): "
        "give its folder with --tokenizer DIR"
    )
    assert _generate(tmp_path / "ckpt", "--tokenizer", str(tmp_path), "--prompt", "Hi") == 2
    assert "--tokenizer" in capsys.readouterr().err


def test_from_pretrained_takes_the_tokenizer_separately(model, tokenizer, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "tok")
    with pytest.raises(ValueError, match=r"ckpt has no tokenizer \(tokenizer.json\).*tokenizer=DIR.*--tokenizer"):
        InferenceEngine.from_pretrained(tmp_path / "ckpt")
    for given in (tmp_path / "tok", str(tmp_path / "tok"), tokenizer):
        with InferenceEngine.from_pretrained(tmp_path / "ckpt", tokenizer=given, max_seq_len=128) as engine:
            assert engine.tokenizer.encode("Hello") == tokenizer.encode("Hello")
            assert engine.model_name == "ckpt"


def _stops_after(model, prompt_ids, greedy, stop_id):
    """A copy of `model` whose greedy continuation of `prompt_ids` is `greedy[:k]` then `stop_id`: ids t and
    `stop_id` trade places in the embedding and the head, which permutes the outputs and nothing else.
    t = greedy[k], the first token that is new (not in the prompt nor earlier) with no stop id before it."""
    k = next(j for j in range(2, len(greedy)) if greedy[j] not in [*prompt_ids, *greedy[:j]])
    t = greedy[k]
    assert stop_id not in [*prompt_ids, *greedy[: k + 1]]
    swapped = copy.deepcopy(model)
    with torch.no_grad():
        for weight in (swapped.embed_tokens.weight, swapped.lm_head.weight):
            weight[[t, stop_id]] = weight[[stop_id, t]]
    return swapped, greedy[:k]


def test_hf_export_generates_what_astrai_generate_does(model, tokenizer, naive_greedy, tmp_path, capsys):
    ids = tokenizer.encode("Hello world")
    stops = set(tokenizer.stop_ids)
    greedy = naive_greedy(ids, 12, stop_ids=stops)
    assert len(greedy) == 12  # the random model never stops by itself on this prompt
    im_end = tokenizer.token_to_id("<|im_end|>")  # the second stop id: transformers must get the list
    swapped, before_stop = _stops_after(model, ids, greedy, im_end)
    swapped.save_pretrained(tmp_path / "hf", format="hf", tokenizer=tokenizer)

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    inputs = hf_tok("Hello world", return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == ids
    with torch.no_grad():
        out = hf_model.generate(**inputs, do_sample=False, max_new_tokens=12)
    assert out[0, len(ids) :].tolist() == [*before_stop, im_end]  # stopped on <|im_end|>, not on an eos of 2

    with InferenceEngine.from_pretrained(tmp_path / "hf", max_seq_len=128) as engine:
        result = engine.generate(ids, max_tokens=12, temperature=0.0)
    assert result == before_stop
    assert _generate(tmp_path / "hf", "--prompt", "Hello world", "--temperature", "0", "--max-tokens", "12") == 0
    assert capsys.readouterr().out == hf_tok.decode(out[0, len(ids) :], skip_special_tokens=True) + "\n"
