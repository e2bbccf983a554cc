"""lm-evaluation-harness scores a multiple-choice task through `astrai serve` exactly as through its `hf` backend.

One small random model is exported in the Hugging Face format (with its tokenizer); lm-eval's `hf` backend loads
that folder with transformers, and `astrai serve` serves the same folder, scored with lm-eval's `local-completions`
(token-id prompts, `echo` + `logprobs` on `/v1/completions`, the server's tokenizer through `/tokenize` and
`/tokenizer_info`). The task (JSONL + YAML) is written here. Both runs must give the same accuracy and the same
log-likelihood for every choice of every question.
"""

import json
import socket
import subprocess
import sys
import time
from itertools import repeat

import httpx
import pytest
import torch

from astrai.config import AutoRegressiveLMConfig
from astrai.model import AutoRegressiveLM
from astrai.tokenize import train_bpe_tokenizer

lm_eval = pytest.importorskip("lm_eval")

CORPUS = "the cat sat on the mat and the dog ran to the park while the bird sang in the tree"
QUESTIONS = [
    ("the cat sat on the", ["mat", "tree", "dog", "park"], 0),
    ("the dog ran to the", ["bird", "park", "mat", "cat"], 1),
    ("the bird sang in the", ["cat", "dog", "tree", "sat"], 2),
    ("while the bird", ["ran", "mat", "on", "sang"], 3),
    ("the cat sat", ["on", "in", "to", "the"], 0),
    ("and the dog", ["sang", "ran", "sat", "mat"], 1),
]
TASK_YAML = """\
task: astrai_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf-model")
    tokenizer = train_bpe_tokenizer(repeat(CORPUS, 20), 300)
    torch.manual_seed(0)
    config = AutoRegressiveLMConfig(
        vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, dim_ffn=128, max_len=128
    )
    AutoRegressiveLM(config).save_pretrained(folder, format="hf", tokenizer=tokenizer)
    return folder


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm-eval-task")
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps({"context": c, "choices": ch, "label": y}) + "\n" for c, ch, y in QUESTIONS))
    (folder / "astrai_tiny_mc.yaml").write_text(TASK_YAML.format(data=data))
    return folder


@pytest.fixture(scope="module")
def server(hf_model_dir):
    port = _free_port()
    command = [sys.executable, "-m", "astrai.cli.main", "serve", "--model", str(hf_model_dir), "--port", str(port)]
    process = subprocess.Popen([*command, "--served-model-name", "tiny"], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, "astrai serve exited"
            assert time.monotonic() < deadline, "astrai serve did not come up"
            time.sleep(0.25)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def _evaluate(model: str, model_args: dict, task_dir) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["astrai_tiny_mc"],
        task_manager=TaskManager(include_path=str(task_dir)),
        log_samples=True,
        batch_size=1,
    )


@pytest.mark.timeout(600)
def test_local_completions_through_the_server_equals_the_hf_backend(hf_model_dir, task_dir, server):
    # local-completions tokenises without special tokens (lm-eval's default for API models): so does hf here
    hf_args = {"pretrained": str(hf_model_dir), "dtype": "float32", "device": "cpu", "add_bos_token": False}
    reference = _evaluate("hf", hf_args, task_dir)
    served = _evaluate(
        "local-completions",
        {"model": "tiny", "base_url": f"{server}/v1/completions", "tokenizer_backend": "remote", "max_retries": 1},
        task_dir,
    )

    def loglikelihoods(results: dict) -> list[list[float]]:
        samples = sorted(results["samples"]["astrai_tiny_mc"], key=lambda s: s["doc_id"])
        return [[float(r[0][0]) for r in sample["resps"]] for sample in samples]

    expected, got = loglikelihoods(reference), loglikelihoods(served)
    assert len(got) == len(QUESTIONS) and all(len(row) == 4 for row in got)
    assert got == [pytest.approx(row, abs=1e-3) for row in expected]
    accuracy = [r["results"]["astrai_tiny_mc"]["acc,none"] for r in (reference, served)]
    assert accuracy[0] == accuracy[1]
