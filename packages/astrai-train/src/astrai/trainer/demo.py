"""`astrai demo`: the quick start. Trains a tokenizer and a small model on the built-in corpus, generates a
sample, serves the model and asks it one question over HTTP, all on this machine's CPU.

Each step is an `astrai` command a user can run by hand (the README's tour runs the same ones):

    astrai data corpus --kind text --output WORK/corpus.jsonl
    astrai data tokenizer --builtin-corpus --vocab-size V --output WORK/tokenizer
    astrai data build --kind text --input WORK/corpus.jsonl --tokenizer WORK/tokenizer --output WORK/data
    astrai train --config WORK/run.yaml --overwrite      (writes the servable model to WORK/model)
    astrai generate --model WORK/model --prompt ...       (needs astrai-infer)
    astrai serve --model WORK/model --port P --served-model-name demo   (needs astrai-serve; one request is sent)

The data and training steps run in this process; generation and serving run as child processes, as they
would on a serving box (training code never imports inference code).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from astrai.cli.main import main as cli_main

# Two sizes: the default trains for a few minutes on 2 CPU cores; --quick is the CI smoke run (< 2 min).
# `steps` (optimizer steps the run takes on the built-in corpus) sizes the cosine decay.
SIZES = {
    "full": dict(
        vocab=4096,
        docs=None,
        dim=192,
        n_layers=4,
        n_heads=6,
        n_kv_heads=2,
        dim_ffn=512,
        window=128,
        batch=16,
        epochs=4,
        steps=220,
        lr=3e-3,
    ),
    "quick": dict(
        vocab=1024,
        docs=40,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        dim_ffn=192,
        window=64,
        batch=16,
        epochs=2,
        steps=46,
        lr=5e-3,
    ),
}
PROMPT = "The for statement"
QUESTION = "What does the Python documentation say about the with statement?"


def _cli(argv: list[str]) -> None:
    """Run an `astrai` command in this process, failing loudly like the shell would."""
    code = cli_main(argv)
    if code:
        raise RuntimeError(f"'astrai {' '.join(argv)}' exited with {code}")


def _installed(dist: str) -> bool:
    try:
        version(dist)
    except PackageNotFoundError:
        return False
    return True


def _run_file(work: Path, size: dict) -> Path:
    run = {
        "seed": 0,
        "model": {
            "config": {
                "vocab_size": size["vocab"],
                "dim": size["dim"],
                "n_layers": size["n_layers"],
                "n_heads": size["n_heads"],
                "n_kv_heads": size["n_kv_heads"],
                "dim_ffn": size["dim_ffn"],
                "max_len": 512,
                "tie_weight": True,
            }
        },
        "tokenizer": "tokenizer",
        "data": {"path": "data", "window_size": size["window"]},
        "optimizer": {"name": "adamw", "lr": size["lr"], "weight_decay": 0.1},
        "schedule": {"type": "cosine", "warmup_steps": 10, "lr_decay_steps": size["steps"], "min_rate": 0.1},
        "train": {
            "strategy": "seq",
            "n_epoch": size["epochs"],
            "batch_per_device": size["batch"],
            "ckpt_dir": "checkpoints",
            "log_dir": "logs",
            "log_interval": 5,
            "ckpt_interval": 0,
            "device_type": "cpu",
        },
        "output": "model",
    }
    path = work / "run.json"
    path.write_text(json.dumps(run, indent=2) + "\n")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode} before answering")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"the server did not answer {url}/health within {timeout:.0f} s")


def _ask(url: str, question: str) -> str:
    body = json.dumps(
        {
            "model": "demo",
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 48,
            "temperature": 0.8,
            "seed": 0,
        }
    ).encode()
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as resp:
        return json.load(resp)["choices"][0]["message"]["content"]


def _usage(url: str) -> str:
    return f"""
Call it yourself while it runs (`astrai serve --model MODEL`, or `astrai demo --serve`):

  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "demo", "messages": [{{"role": "user", "content": "Hello"}}], "max_tokens": 32}}'

  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key="unused")
  client.chat.completions.create(model="demo", messages=[{{"role": "user", "content": "Hello"}}], max_tokens=32)

  from anthropic import Anthropic
  client = Anthropic(base_url="{url}", api_key="unused")
  client.messages.create(model="demo", max_tokens=32, messages=[{{"role": "user", "content": "Hello"}}])
"""


def _serve(model: Path, keep_serving: bool) -> str:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "astrai.cli", "serve", "--model", str(model), "--port", str(port)]
    command += ["--served-model-name", "demo"]  # the name the requests below use
    print(f"\n== serving: astrai serve --model {model} --port {port} --served-model-name demo", flush=True)
    server = subprocess.Popen(command)
    try:
        _wait_healthy(url, server, timeout=120)
        answer = _ask(url, QUESTION)
        print(f"\nuser: {QUESTION}\nassistant: {answer!r}")
        print(_usage(url))
        if keep_serving:
            print(f"serving on {url} (Ctrl-C to stop)", flush=True)
            server.wait()
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
    return answer


def _run(args: argparse.Namespace) -> int:
    size = SIZES["quick" if args.quick else "full"]
    work = Path(args.workdir).resolve()
    if work.exists() and any(work.iterdir()):
        if not args.force:
            raise ValueError(f"--workdir {work} is not empty (pass --force to replace it)")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    print(f"== data: the built-in corpus (CPython's pydoc topics) -> {work}", flush=True)
    limit = ["--limit", str(size["docs"])] if size["docs"] else []
    _cli(["data", "corpus", "--kind", "text", "--output", str(work / "corpus.jsonl"), *limit])
    _cli(
        [
            "data",
            "tokenizer",
            "--builtin-corpus",
            "--vocab-size",
            str(size["vocab"]),
            "--output",
            str(work / "tokenizer"),
        ]
    )
    _cli(
        [
            "data",
            "build",
            "--kind",
            "text",
            "--input",
            str(work / "corpus.jsonl"),
            "--tokenizer",
            str(work / "tokenizer"),
            "--output",
            str(work / "data"),
        ]
    )

    print("\n== train", flush=True)
    # --overwrite: --force replaced the folder, but a run re-started in it must never mix checkpoints.
    _cli(["train", "--config", str(_run_file(work, size)), "--overwrite"])
    model = work / "model"

    if not _installed("astrai-infer"):
        print(f"\nastrai-infer is not installed: skipping generation and serving. Model: {model}")
        return 0
    print(f"\n== generate: astrai generate --model {model} --prompt {PROMPT!r}", flush=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "astrai.cli",
            "generate",
            "--model",
            str(model),
            "--prompt",
            PROMPT,
            "--max-tokens",
            "40",
            "--temperature",
            "0.7",
            "--seed",
            "0",
        ],
        check=True,
    )
    answered = "not served (astrai-serve is not installed)"
    if _installed("astrai-serve"):
        _serve(model, args.serve)
        answered = "the server answered a chat request"
    elapsed = time.monotonic() - started
    print(f"astrai demo: done in {elapsed:.0f} s: model {model}, loss curve {work / 'logs' / 'loss.png'}, {answered}")
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    """The quick start: train a small model on the built-in corpus, then generate and serve it."""
    parser.add_argument("--workdir", default="astrai-demo", help="where to put data, checkpoints and the model")
    parser.add_argument("--quick", action="store_true", help="a tiny model and a short run (the CI smoke test)")
    parser.add_argument("--serve", action="store_true", help="keep serving after the demo request")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --workdir")
    parser.set_defaults(run=_run)
