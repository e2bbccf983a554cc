"""`astrai serve` argument handling (serving a real model is covered in test_real_engine.py)."""

import pytest

from astrai.cli.main import main


def test_serve_is_an_astrai_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    flags = ("--model", "--host", "--port", "--dtype", "--device", "--max-batch-size", "--api-key", "--max-queue")
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
