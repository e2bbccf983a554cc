"""Exact resume: a run stopped mid-epoch (SIGTERM, checkpoint at the step boundary) and resumed in a new
process ends bit-identical to the run done straight through, with AdamW and with Muon."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from astrai.dataset import save_mmap
from astrai.serialization import Checkpoint, latest_checkpoint
from astrai.trainer import read_metrics

VARIANTS = ("adamw", "muon", "fsdp-adamw")
STOP_AT = 5  # 15 micro-batches per epoch in windows of 2: step 5 ends mid-epoch, after 20 of 30 samples
# (2 ranks: 15 samples each, 8 micro-batches, 4 steps per epoch: step 5 is 4 samples into epoch 1)

_RUN = """
import os, signal, sys
from pathlib import Path
import torch
from astrai.config import AutoRegressiveLMConfig, TrainConfig
from astrai.dataset import DatasetFactory
from astrai.model import AutoRegressiveLM
from astrai.serialization import latest_checkpoint
from astrai.trainer import OptimizerFn, SchedulerFn, Trainer

torch.set_num_threads(1)
variants = {  # name: (optimizer, distribution)
    "adamw": (OptimizerFn("adamw", lr=3e-3, weight_decay=0.1), {}),
    "muon": (OptimizerFn("muon", lr=0.02, adamw_lr=3e-3), {}),
    "fsdp-adamw": (OptimizerFn("adamw", lr=3e-3, weight_decay=0.1), {"nprocs": 2, "parallel_mode": "fsdp"}),
}


class StopAt:
    def on_step_end(self, ctx):
        if ctx.step == {stop_at}:
            os.kill(os.getpid(), signal.SIGTERM)  # as a cluster scheduler would


def main():
    root, data, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    for name, (optimizer_fn, distribution) in variants.items():
        run = root / ("straight" if mode == "straight" else "split") / name
        torch.manual_seed(0)
        model = AutoRegressiveLM(AutoRegressiveLMConfig(vocab_size=256, dim=32, n_layers=2, n_heads=4, dim_ffn=64, max_len=32))
        config = TrainConfig(
            model=model, strategy="seq", dataset=DatasetFactory.load("seq", data, window_size=16),
            optimizer_fn=optimizer_fn, scheduler_fn=SchedulerFn("cosine", warmup_steps=2, lr_decay_steps=14),
            n_epoch=2, batch_per_device=2, grad_accum_steps=2, ckpt_dir=str(run / "ckpt"), ckpt_interval=3,
            log_dir=str(run / "logs"), log_interval=1, device_type="cpu", random_seed=7, **distribution,
        )
        callbacks = [StopAt()] if mode == "stop" else []
        checkpoint = latest_checkpoint(run / "ckpt") if mode == "resume" else None
        Trainer(config, callbacks=callbacks).train(checkpoint)


if __name__ == "__main__":  # spawned ranks import this file
    main()
"""


def _run(script: Path, root: Path, data: Path, mode: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(script), str(root), str(data), mode],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"the {mode!r} run exited with {done.returncode}:\n{done.stderr[-6000:]}"


def _assert_identical(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("resume")
    text = "".join(topics[k] for k in sorted(topics))[:481]  # 30 windows of 16 tokens (+1 label)
    save_mmap(root / "data", {"sequence": [torch.tensor(list(text.encode()))]})
    script = root / "run.py"
    script.write_text(textwrap.dedent(_RUN).replace("{stop_at}", str(STOP_AT)))
    for mode in ("straight", "stop", "resume"):  # each in a new process
        _run(script, root, root / "data", mode)
    return root


@pytest.mark.parametrize("variant", VARIANTS)
def test_resumed_run_is_bit_identical(runs: Path, variant: str) -> None:
    straight, split = runs / "straight" / variant, runs / "split" / variant
    stopped = Checkpoint.load(split / "ckpt" / f"step_{STOP_AT:08d}")
    expected = {"epoch": 1, "iter": 4} if variant.startswith("fsdp") else {"epoch": 0, "iter": 20}
    assert {k: stopped.extra["sampler"][k] for k in expected} == expected  # mid-epoch

    a, b = Checkpoint.load(latest_checkpoint(straight / "ckpt")), Checkpoint.load(latest_checkpoint(split / "ckpt"))
    assert a.step == b.step and a.epoch == b.epoch
    _assert_identical(a.state_dict, b.state_dict, "weights")
    _assert_identical(a.extra["optimizer"], b.extra["optimizer"], "optimizer")
    _assert_identical(a.extra["scheduler"], b.extra["scheduler"], "scheduler")
    _assert_identical(a.extra["sampler"], b.extra["sampler"], "sampler")

    log_a, log_b = read_metrics(straight / "logs" / "metrics.jsonl"), read_metrics(split / "logs" / "metrics.jsonl")
    assert [r["step"] for r in log_b] == list(range(1, a.step + 1))  # the resumed log reads as one run
    assert [(r["loss"], r["lr"]) for r in log_a] == [(r["loss"], r["lr"]) for r in log_b]
