"""The Trainer in one process: exact accumulation, the trailing window, real pre-training, mixed
precision, and clear errors for bad configs and data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from astrai.dataset import DatasetFactory, save_mmap
from astrai.serialization import Checkpoint, latest_checkpoint
from astrai.trainer import OptimizerFn, SchedulerFn, Trainer, read_metrics
from astrai.trainer.trainer import rank_threads


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_accumulation_is_exact_with_ragged_masks(tmp_path: Path, make_lm, make_config, sft_dataset) -> None:
    """One optimizer step over 8 SFT windows that train 0..8 tokens each: batch 8 x 1 micro-batch and
    batch 2 x 4 micro-batches give the same weights (SGD shows any gradient difference)."""
    results = {}
    for batch, accum in ((8, 1), (2, 4)):
        model = make_lm()
        cfg = make_config(
            tmp_path / f"{batch}x{accum}", model, sft_dataset, batch_per_device=batch, grad_accum_steps=accum
        )
        Trainer(cfg).train()
        results[(batch, accum)] = (
            _weights(model),
            read_metrics(tmp_path / f"{batch}x{accum}" / "logs" / "metrics.jsonl"),
        )
    (w1, log1), (w2, log2) = results[(8, 1)], results[(2, 4)]
    assert [r["step"] for r in log1] == [r["step"] for r in log2] == [1]
    assert log1[0]["loss"] == pytest.approx(log2[0]["loss"], abs=1e-6)
    initial = _weights(make_lm())
    for name in w1:
        assert not torch.equal(w1[name], initial[name])  # the step did change every weight
        torch.testing.assert_close(w1[name], w2[name], rtol=0, atol=1e-6)


def test_trailing_partial_window_is_stepped(tmp_path: Path, make_lm, make_config, make_sft_store) -> None:
    dataset = DatasetFactory.load("sft", make_sft_store(tmp_path / "d", n_windows=5), window_size=8)
    cfg = make_config(tmp_path, make_lm(), dataset, batch_per_device=1, grad_accum_steps=2, n_epoch=2)
    Trainer(cfg).train()
    log = read_metrics(tmp_path / "logs" / "metrics.jsonl")
    # 5 micro-batches per epoch: windows of 2, 2 and 1; windows never span the epoch boundary.
    assert [(r["step"], r["epoch"], r["iter"]) for r in log] == [
        (1, 0, 2),
        (2, 0, 4),
        (3, 0, 5),
        (4, 1, 7),
        (5, 1, 9),
        (6, 1, 10),
    ]


def test_pretraining_on_real_text_lowers_the_loss(tmp_path: Path, make_lm, make_config, make_text_tokens) -> None:
    save_mmap(tmp_path / "text", {"sequence": [make_text_tokens(12_000)]})
    dataset = DatasetFactory.load("seq", tmp_path / "text", window_size=32)
    model = make_lm(vocab_size=256)
    cfg = make_config(
        tmp_path,
        model,
        dataset,
        strategy="seq",
        batch_per_device=16,
        n_epoch=2,
        max_grad_norm=1.0,
        optimizer_fn=OptimizerFn("adamw", lr=1e-2),
        scheduler_fn=SchedulerFn("cosine", warmup_steps=3, lr_decay_steps=45),
    )
    Trainer(cfg).train()
    losses = [r["loss"] for r in read_metrics(tmp_path / "logs" / "metrics.jsonl")]
    assert len(losses) == 2 * (len(dataset) // 16 + 1)
    assert losses[0] > 5.0  # ~ln(256) at random init
    assert sum(losses[-5:]) / 5 < losses[0] - 2.0


def test_mixed_precision_keeps_fp32_master_weights(tmp_path: Path, make_lm, make_config, sft_dataset) -> None:
    losses = {}
    for precision in ("no", "bf16", "fp16"):
        model = make_lm()
        Trainer(make_config(tmp_path / precision, model, sft_dataset, mixed_precision=precision)).train()
        assert all(p.dtype == torch.float32 for p in model.parameters())
        losses[precision] = read_metrics(tmp_path / precision / "logs" / "metrics.jsonl")[0]["loss"]
        scaler = Checkpoint.load(latest_checkpoint(tmp_path / precision / "ckpt")).extra.get("scaler")
        assert (scaler is not None) == (precision == "fp16")  # the fp16 loss scale is resumed too
    for precision in ("bf16", "fp16"):
        assert losses[precision] != losses["no"]  # low-precision matmuls really ran ...
        assert losses[precision] == pytest.approx(losses["no"], rel=2e-2)  # ... and agree to their precision


def test_bad_config_and_data_errors(tmp_path: Path, make_lm, make_config, sft_dataset, make_text_tokens) -> None:
    with pytest.raises(ValueError, match=r"TrainConfig.strategy='ppo'"):
        make_config(tmp_path, make_lm(), sft_dataset, strategy="ppo")
    with pytest.raises(ValueError, match=r"TrainConfig.mixed_precision='fp8'"):
        make_config(tmp_path, make_lm(), sft_dataset, mixed_precision="fp8")
    with pytest.raises(ValueError, match=r"TrainConfig.parallel_mode='none'"):
        make_config(tmp_path, make_lm(), sft_dataset, nprocs=2)
    save_mmap(tmp_path / "seq", {"sequence": [make_text_tokens(200)]})
    seq_data = DatasetFactory.load("seq", tmp_path / "seq", window_size=8)
    with pytest.raises(ValueError, match="loss_mask"):  # SFT strategy on pre-training data (byte ids < 256)
        Trainer(make_config(tmp_path, make_lm(vocab_size=256), seq_data)).train()
    with pytest.raises(ValueError, match="no module of the model"):
        Trainer(make_config(tmp_path, make_lm(), sft_dataset, gradient_checkpointing_modules=["Nope"])).train()
    with pytest.raises(ValueError, match="optimizer 'adamw' got unexpected argument"):
        OptimizerFn("adamw", learning_rate=1e-3)


def test_data_that_does_not_fit_the_model_fails_before_training(
    tmp_path: Path, make_lm, make_config, sft_dataset
) -> None:
    tokens = torch.arange(40) % 8
    tokens[17] = 70  # beyond the vocabulary of 64
    save_mmap(tmp_path / "big_ids", {"sequence": [tokens], "loss_mask": [torch.ones(40, dtype=torch.bool)]})
    data = DatasetFactory.load("sft", tmp_path / "big_ids", window_size=8)
    message = "val_dataset: store key 'sequence' holds token id 70, but the model's vocab_size is 64"
    with pytest.raises(ValueError, match=message):
        Trainer(make_config(tmp_path, make_lm(), sft_dataset, val_dataset=data)).train()
    with pytest.raises(ValueError, match="dataset: window_size=8 exceeds the model's max_len=4"):
        Trainer(make_config(tmp_path, make_lm(max_len=4), data)).train()
    with pytest.raises(ValueError, match=message.removeprefix("val_")):
        Trainer(make_config(tmp_path, make_lm(), data)).train()
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "logs").exists()  # nothing started


def test_spawned_ranks_share_the_cores(monkeypatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert rank_threads(4, "spawn", {}) == 4
    assert rank_threads(32, "spawn", {}) == 1
    assert rank_threads(1, "spawn", {}) is None  # one process keeps torch's default
    assert rank_threads(4, "spawn", {"OMP_NUM_THREADS": "2"}) is None  # the user's (or torchrun's) choice
    assert rank_threads(4, "fork", {}) is None  # forked ranks run single-threaded (launch.py)
