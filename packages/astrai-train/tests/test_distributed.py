"""Two gloo ranks (spawned by the Trainer) match one process exactly: DDP and FSDP2, with gradient
accumulation over SFT batches whose masks train different numbers of tokens, and validation."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from astrai.dataset import DatasetFactory
from astrai.serialization import Checkpoint, latest_checkpoint
from astrai.trainer import Trainer, read_metrics


@pytest.fixture
def val_dataset(tmp_path: Path, make_sft_store):
    # 5 windows over 2 ranks: the sampler pads rank 1 with a repeat, which validation must not count.
    return DatasetFactory.load("sft", make_sft_store(tmp_path / "val", n_windows=5, seed=1), window_size=8)


def test_ddp_and_fsdp_match_one_process(
    tmp_path: Path, monkeypatch, make_lm, make_config, sft_dataset, val_dataset
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two ranks on two cores
    common = dict(val_dataset=val_dataset, val_step=1, metrics=["loss", "val_loss"], batch_per_device=3)

    single = make_lm()
    Trainer(make_config(tmp_path / "single", single, sft_dataset, **{**common, "batch_per_device": 8})).train()
    expected = single.state_dict()
    expected_log = read_metrics(tmp_path / "single" / "logs" / "metrics.jsonl")

    for mode in ("ddp", "fsdp"):
        cfg = make_config(
            tmp_path / mode,
            make_lm(),
            sft_dataset,
            nprocs=2,
            parallel_mode=mode,
            **{**common, "batch_per_device": 2, "grad_accum_steps": 2},
        )
        Trainer(cfg).train()
        ckpt = Checkpoint.load(latest_checkpoint(tmp_path / mode / "ckpt"))
        assert set(ckpt.state_dict) == set(expected)  # unwrapped names: no "module." / FSDP prefixes
        for name, value in expected.items():
            torch.testing.assert_close(ckpt.state_dict[name], value, rtol=0, atol=1e-6, msg=f"{mode}: {name}")
        log = read_metrics(tmp_path / mode / "logs" / "metrics.jsonl")
        assert log[0]["loss"] == pytest.approx(expected_log[0]["loss"], abs=1e-6)
        assert log[0]["val_loss"] == pytest.approx(expected_log[0]["val_loss"], abs=1e-6)
        assert ckpt.meta["world_size"] == 2 and len(ckpt.extra["rng"]["ranks"]) == 2


_TORCHRUN_SCRIPT = """
import sys
import torch
from astrai.config import AutoRegressiveLMConfig, TrainConfig
from astrai.dataset import DatasetFactory
from astrai.model import AutoRegressiveLM
from astrai.trainer import OptimizerFn, Trainer

data, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = AutoRegressiveLM(AutoRegressiveLMConfig(**{config}))
Trainer(TrainConfig(
    model=model, strategy="sft", dataset=DatasetFactory.load("sft", data, window_size=8),
    optimizer_fn=OptimizerFn("sgd", lr=0.5), batch_per_device=4, max_grad_norm=0.0, parallel_mode="ddp",
    nprocs=2, ckpt_dir=out + "/ckpt", ckpt_interval=0, log_dir=out + "/logs", device_type="cpu",
)).train()
"""


def test_torchrun_launch(tmp_path: Path, make_lm, make_config, make_sft_store) -> None:
    """Under torchrun each process is one rank: the Trainer joins the group instead of spawning."""
    store = make_sft_store(tmp_path / "sft")
    single = make_lm()
    Trainer(make_config(tmp_path / "single", single, DatasetFactory.load("sft", store, window_size=8))).train()
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(_TORCHRUN_SCRIPT).replace("{config}", repr(single.config.to_dict())))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(script),
        str(store),
        str(tmp_path / "torchrun"),
    ]
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    ckpt = Checkpoint.load(latest_checkpoint(tmp_path / "torchrun" / "ckpt"))
    assert ckpt.meta["world_size"] == 2
    for name, value in single.state_dict().items():
        torch.testing.assert_close(ckpt.state_dict[name], value, rtol=0, atol=1e-6, msg=name)
