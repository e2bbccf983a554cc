"""Shared test helpers: tiny real models, real stores on disk, and a `TrainConfig` around them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from astrai.config import AutoRegressiveLMConfig, TrainConfig
from astrai.dataset import DatasetFactory, save_mmap
from astrai.model import AutoRegressiveLM
from astrai.trainer import OptimizerFn

VOCAB = 64

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine threads spinning
# against other processes make every step many times slower.
torch.set_num_threads(1)


def tiny_config(**overrides: Any) -> AutoRegressiveLMConfig:
    fields = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, dim_ffn=64, max_len=64)
    return AutoRegressiveLMConfig(**{**fields, **overrides})


def tiny_lm(seed: int = 0, **overrides: Any) -> AutoRegressiveLM:
    torch.manual_seed(seed)
    return AutoRegressiveLM(tiny_config(**overrides))


def ragged_sft_store(path: Path, n_windows: int = 8, window: int = 8, seed: int = 0) -> Path:
    """An SFT store of `n_windows` windows whose loss masks train very different numbers of tokens
    (window i trains i + 1 tokens, one of them none at all)."""
    g = torch.Generator().manual_seed(seed)
    total = n_windows * window + 1
    tokens = torch.randint(0, VOCAB, (total,), generator=g)
    mask = torch.zeros(total, dtype=torch.bool)
    for i in range(n_windows):
        trained = 0 if i == 3 else min(i + 1, window)  # labels of window i are rows [i*w+1, i*w+w]
        start = i * window + 1
        mask[start : start + trained] = True
    return save_mmap(path, {"sequence": [tokens], "loss_mask": [mask]})


def text_tokens(n_chars: int) -> torch.Tensor:
    """Real English text (CPython's pydoc topics), as byte tokens."""
    from pydoc_data.topics import topics

    text = "".join(topics[k] for k in sorted(topics))[:n_chars]
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)


def train_config(tmp_path: Path, model: torch.nn.Module, dataset: Any, **overrides: Any) -> TrainConfig:
    fields = dict(
        model=model,
        strategy="sft",
        dataset=dataset,
        optimizer_fn=OptimizerFn("sgd", lr=0.5),
        batch_per_device=8,
        max_grad_norm=0.0,
        ckpt_dir=str(tmp_path / "ckpt"),
        ckpt_interval=0,
        log_dir=str(tmp_path / "logs"),
        log_interval=1,
        device_type="cpu",
    )
    return TrainConfig(**{**fields, **overrides})


@pytest.fixture
def sft_dataset(tmp_path: Path) -> Any:
    return DatasetFactory.load("sft", ragged_sft_store(tmp_path / "sft"), window_size=8)


@pytest.fixture
def make_lm() -> Any:
    """`make_lm(seed=0, **config_overrides)` -> a tiny AutoRegressiveLM."""
    return tiny_lm


@pytest.fixture
def make_config() -> Any:
    """`make_config(tmp_path, model, dataset, **overrides)` -> a TrainConfig for tests (SGD, CPU, no clipping)."""
    return train_config


@pytest.fixture
def make_sft_store() -> Any:
    """`make_sft_store(path, n_windows=8, window=8, seed=0)` -> an SFT store with ragged loss masks."""
    return ragged_sft_store


@pytest.fixture
def make_text_tokens() -> Any:
    """`make_text_tokens(n_chars)` -> real text as byte tokens."""
    return text_tokens
