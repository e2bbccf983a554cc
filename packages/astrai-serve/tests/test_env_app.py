"""`environment_app`: an engine configured by ASTRAI_* variables behind `create_app`, and
`uvicorn astrai.inference:app` serving a saved model."""

import os
import signal
import socket
import subprocess
import sys

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from astrai.config import AutoRegressiveLMConfig
from astrai.model import AutoRegressiveLM
from astrai.serve.env_app import engine_options, environment_app
from astrai.tokenize import train_bpe_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-env-model")
    tokenizer = train_bpe_tokenizer(iter(["Hello world, how are you today?"] * 20), vocab_size=300)
    config = AutoRegressiveLMConfig(
        vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, dim_ffn=64, max_len=64
    )
    torch.manual_seed(0)
    AutoRegressiveLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_engine_options_read_the_variables(model_dir):
    env = {
        "ASTRAI_MODEL": str(model_dir),
        "ASTRAI_DEVICE": "cpu",
        "ASTRAI_DTYPE": "float32",
        "ASTRAI_MAX_BATCH_SIZE": "3",
        "ASTRAI_PAGE_SIZE": "8",
        "ASTRAI_PACK_WEIGHTS": "0",
        "ASTRAI_MODEL_NAME": "tiny",
    }
    options = engine_options(env)
    assert options == {
        "path": str(model_dir),
        "device": "cpu",
        "dtype": "float32",
        "max_batch_size": 3,
        "max_seq_len": None,
        "page_size": 8,
        "num_pages": None,
        "max_queue": 256,
        "pack_weights": False,
        "cuda_graphs": True,
        "model_name": "tiny",
    }


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, r"\$ASTRAI_MODEL is not set"),
        ({"ASTRAI_MODEL": "/no/such/folder"}, "not a model folder"),
        ({"ASTRAI_MODEL": "{model}", "ASTRAI_PAGE_SIZE": "big"}, r"\$ASTRAI_PAGE_SIZE='big': must be an integer"),
        ({"ASTRAI_MODEL": "{model}", "ASTRAI_DTYPE": "int8"}, r"\$ASTRAI_DTYPE='int8': allowed"),
        ({"ASTRAI_MODEL": "{model}", "ASTRAI_CUDA_GRAPHS": "maybe"}, r"\$ASTRAI_CUDA_GRAPHS='maybe'"),
    ],
)
def test_bad_variables_are_value_errors_naming_them(model_dir, env, message):
    with pytest.raises(ValueError, match=message):
        engine_options({name: value.format(model=model_dir) for name, value in env.items()})


def test_environment_app_serves_the_configured_engine(model_dir):
    env = {"ASTRAI_MODEL": str(model_dir), "ASTRAI_MAX_BATCH_SIZE": "2", "ASTRAI_MODEL_NAME": "tiny"}
    app = environment_app({**env, "ASTRAI_API_KEY": "env-key"})
    engine = app.state.engine
    assert engine.scheduler.max_batch_size == 2 and engine.model_name == "tiny"
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/v1/models").status_code == 401
        models = client.get("/v1/models", headers={"x-api-key": "env-key"}).json()
        assert [m["id"] for m in models["data"]] == ["tiny"]
    assert not engine.is_alive()  # the app's lifespan shut the engine down


def test_uvicorn_serves_astrai_inference_app(model_dir):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "ASTRAI_MODEL": str(model_dir), "ASTRAI_DEVICE": "cpu"}
    env.pop("ASTRAI_API_KEY", None)
    cmd = [sys.executable, "-m", "uvicorn", "astrai.inference:app", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # blocks until uvicorn says it is up (or the process dies: loop ends)
            if "Uvicorn running" in line:
                break
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)
        assert health.status_code == 200 and health.json()["status"] == "ok"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
