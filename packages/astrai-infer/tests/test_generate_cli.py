"""`astrai generate`: one prompt (plain, streamed, chat) and the JSONL batch mode, through the `astrai` command."""

import json

import pytest
import torch

from astrai.cli.main import main

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
