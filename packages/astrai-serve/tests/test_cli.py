"""`astrai serve` argument handling, and `--tokenizer` for a model folder without one (a training checkpoint)
served by the real command (the rest of serving a real model is covered in test_real_engine.py)."""

import os
import signal
import socket
import subprocess
import sys

import httpx
import pytest
import torch

from astrai.cli.main import main
from astrai.config import AutoRegressiveLMConfig
from astrai.inference import InferenceEngine
from astrai.model import AutoRegressiveLM
from astrai.tokenize import train_bpe_tokenizer


@pytest.fixture(scope="module")
def checkpoint_and_tokenizer(tmp_path_factory):
    """(model folder without tokenizer files, tokenizer folder)."""
    root = tmp_path_factory.mktemp("split")
    tokenizer = train_bpe_tokenizer(iter(["Hello world, the quick brown fox jumps."] * 20), vocab_size=300)
    config = AutoRegressiveLMConfig(vocab_size=300, dim=32, n_layers=1, n_heads=2, dim_ffn=64, max_len=128)
    torch.manual_seed(0)
    AutoRegressiveLM(config).save_pretrained(root / "checkpoint")
    tokenizer.save_pretrained(root / "tokenizer")
    return root / "checkpoint", root / "tokenizer"


def test_serve_is_an_astrai_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    flags = (
        "--model",
        "--tokenizer",
        "--host",
        "--port",
        "--dtype",
        "--device",
        "--max-batch-size",
        "--api-key",
        "--max-queue",
    )
    for flag in (*flags, "--no-pack-weights"):
        assert flag in out


def test_missing_model_folder_is_a_user_error(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "nope")]) == 2
    assert "--model must be a model folder" in capsys.readouterr().err


def test_api_key_defaults_to_the_environment(monkeypatch):
    import argparse

    from astrai.serve.cli import configure

    monkeypatch.setenv("ASTRAI_API_KEY", "from-env")
    parser = argparse.ArgumentParser()
    configure(parser)
    args = parser.parse_args(["--model", "m"])
    assert (args.api_key, args.port, args.host, args.dtype) == ("from-env", 8000, "127.0.0.1", None)
    assert args.pack_weights and not parser.parse_args(["--model", "m", "--no-pack-weights"]).pack_weights
    assert args.cuda_graphs and not parser.parse_args(["--model", "m", "--no-cuda-graphs"]).cuda_graphs


def test_a_folder_without_tokenizer_names_the_option(checkpoint_and_tokenizer, capsys):
    checkpoint, _ = checkpoint_and_tokenizer
    assert main(["serve", "--model", str(checkpoint)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"astrai serve: error: --model {checkpoint} has no tokenizer (tokenizer.json): give its folder with --tokenizer DIR"
    )
    assert main(["serve", "--model", str(checkpoint), "--tokenizer", str(checkpoint)]) == 2
    assert capsys.readouterr().err.strip().endswith("not a tokenizer folder (no tokenizer.json)")


def test_astrai_serve_with_a_separate_tokenizer(checkpoint_and_tokenizer):
    checkpoint, tokenizer = checkpoint_and_tokenizer
    messages = [{"role": "user", "content": "Hello world"}]
    with InferenceEngine.from_pretrained(checkpoint, tokenizer=tokenizer, max_seq_len=128) as engine:
        ids = engine.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        expected = engine.tokenizer.decode(engine.generate(ids, max_tokens=5, temperature=0.0))
    assert expected  # the random model says something
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "astrai.cli.main", "serve", "--model", str(checkpoint), "--port", str(port)]
    cmd += ["--tokenizer", str(tokenizer), "--max-seq-len", "128"]
    proc = subprocess.Popen(cmd, env={**os.environ, "ASTRAI_API_KEY": ""}, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # blocks until uvicorn says it is up (or the process dies: loop ends)
            if "Uvicorn running" in line:
                break
        ask = {"model": "checkpoint", "messages": messages, "max_tokens": 5, "temperature": 0}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=ask, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == expected
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
