"""`check_data`: a run's data fits its model, checked before training starts.

Without it a token id beyond the vocabulary surfaces as an `IndexError` from the embedding, mid-step, and
a window longer than the model's `max_len` as a position error. The check is cheap: one max over each
token-id key of the store (memory-mapped or HDF5 arrays, read once), nothing per sample.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from astrai.dataset import BaseDataset
from astrai.trainer.executor import unwrap


def check_data(model: nn.Module, dataset: Any, name: str = "dataset") -> None:
    """Raise `ValueError` when `dataset` (a loaded `BaseDataset`; others are not inspected) holds token
    ids >= the model's `vocab_size` or windows longer than its `max_len`. `name` says which data it is."""
    config = getattr(unwrap(model), "config", None)
    if not isinstance(dataset, BaseDataset) or dataset.storage is None or config is None:
        return
    max_len = getattr(config, "max_len", None)
    if max_len is not None and dataset.window_size > max_len:
        raise ValueError(f"{name}: window_size={dataset.window_size} exceeds the model's max_len={max_len}")
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is None:
        return
    for key in dataset.token_keys:
        top = dataset.storage.max_value(key)
        if top >= vocab_size:
            raise ValueError(
                f"{name}: store key {key!r} holds token id {top}, but the model's vocab_size is {vocab_size}"
                " (ids must be < vocab_size: was the data tokenised for another model?)"
            )
