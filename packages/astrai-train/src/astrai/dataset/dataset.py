"""`BaseDataset` (a torch Dataset over a `Store`) and `DatasetFactory`, which builds one per training type.

The SEQ, SFT and DPO datasets cut windows of `window_size` rows out of the store's flat token stream,
starting every `stride` rows (stride defaults to window_size: no overlap). Item `i` covers rows
`[i * stride, i * stride + window_size)`, plus one more row for datasets whose targets are the next tokens
(`label_shift = 1`); the stream's tail that does not fill a window is not used. Windows run across
document boundaries (stream packing). GRPO items are whole rows instead (see `grpo_dataset`).
Indices out of range raise `IndexError`, so `len()` is exact and plain iteration stops.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.utils.data import Dataset, default_collate

from astrai.dataset.store import Store, StoreFactory
from astrai.factory import BaseFactory

# Datasets return dicts of equally shaped tensors, which torch's default collate stacks into a batch.
collate = default_collate


class BaseDataset(Dataset, ABC):
    """Items of one training type, read from a `Store` with the keys `required_keys`."""

    required_keys: ClassVar[tuple[str, ...]] = ()
    token_keys: ClassVar[tuple[str, ...]] = ()  # the required keys that hold token ids (not masks, rewards)
    label_shift: ClassVar[int] = 0  # extra rows a window reads past its end (1 when targets are next tokens)

    def __init__(self, window_size: int, stride: int | None = None) -> None:
        stride = window_size if stride is None else stride
        for name, value in (("window_size", window_size), ("stride", stride)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{type(self).__name__}.{name}={value!r}: must be an int >= 1")
        self.window_size = window_size
        self.stride = stride
        self.storage: Store | None = None

    def load(self, load_path: str | Path, storage_type: str | None = None, tokenizer: Any = None) -> BaseDataset:
        """Load the data at `load_path` (storage type detected from its contents when None); returns `self`."""
        if storage_type is None:
            storage_type = StoreFactory.detect(load_path)
        store = StoreFactory.create(storage_type)
        store.load(load_path, tokenizer)
        missing = [k for k in self.required_keys if k not in store.keys]
        if missing:
            raise ValueError(
                f"{str(load_path)!r} lacks key(s) {missing} needed by {type(self).__name__}; it has {store.keys}"
            )
        self._check(store, str(load_path))
        self.storage = store
        if len(self) == 0:
            raise ValueError(
                f"{str(load_path)!r} holds {len(store)} rows, too few for one window of {self.window_size}"
                f" (+{self.label_shift}) rows"
            )
        return self

    def _check(self, store: Store, where: str) -> None:
        """Check the shapes of the required keys; token streams are 1-D."""
        for key in self.required_keys:
            if store.row_shape(key) != ():
                raise ValueError(
                    f"{where}: key {key!r} must be a token stream, got rows of shape {store.row_shape(key)}"
                )

    @property
    def _store(self) -> Store:
        if self.storage is None:
            raise RuntimeError(f"{type(self).__name__} has no data; call load() first")
        return self.storage

    def __len__(self) -> int:
        usable = len(self._store) - self.label_shift - self.window_size
        return 0 if usable < 0 else usable // self.stride + 1

    def _window(self, index: int) -> tuple[int, int]:
        """Rows `[begin, end)` of item `index` (negative indices count from the end)."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {n}")
        begin = (index % n) * self.stride
        return begin, begin + self.window_size

    @abstractmethod
    def __getitem__(self, index: int) -> dict[str, torch.Tensor]: ...


class DatasetFactory(BaseFactory[BaseDataset]):
    """Datasets by training type: "seq", "sft", "dpo", "grpo"."""

    kind = "dataset"
    base_class = BaseDataset

    @classmethod
    def create(  # type: ignore[override]
        cls, train_type: str, window_size: int, stride: int | None = None, *args: Any, **kwargs: Any
    ) -> BaseDataset:
        """An empty dataset of `train_type` ("seq", "sft", "dpo", "grpo" or a registered name) cutting windows
        of `window_size` rows every `stride` rows (default: window_size); `load` gives it data."""
        return super().create(train_type, window_size, stride, *args, **kwargs)

    @classmethod
    def load(
        cls,
        train_type: str,
        load_path: str | Path,
        window_size: int,
        stride: int | None = None,
        storage_type: str | None = None,
        tokenizer: Any = None,
    ) -> BaseDataset:
        """Create the dataset for `train_type` and load `load_path` into it."""
        return cls.create(train_type, window_size, stride).load(load_path, storage_type, tokenizer)


# Register the built-in datasets. Imported last: those modules import `BaseDataset` from here.
from astrai.dataset import grpo_dataset, window_datasets  # noqa: E402, F401
