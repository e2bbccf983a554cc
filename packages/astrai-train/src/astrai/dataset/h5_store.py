"""`H5Store` and its writer `save_h5`: HDF5 files with one group per key and one dataset per segment.

Layout of a file: group `<key>` holds datasets `data_0, data_1, ..., data_N`, read in numeric order
(`data_10` after `data_2`); several files in a folder are read in sorted path order. Contiguous,
uncompressed datasets (what `save_h5` writes) are memory-mapped straight from the file, so loading
costs no copy and no RAM; chunked or compressed datasets are read lazily, slice by slice, on `fetch`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from astrai.dataset.store import Segment, Store, StoreFactory, list_files

H5_SUFFIXES = (".h5", ".hdf5")
_SEGMENT_NAME = re.compile(r"data_(\d+)")


class H5Segment:
    """An HDF5 dataset that cannot be mapped (chunked, compressed or foreign byte order), read on demand.

    Reopens its file in each process, because an h5py handle inherited through fork is not safe to use.
    """

    def __init__(self, file: Path, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.file, self.name = file, name
        self.shape = shape
        self._native = dtype.newbyteorder("=")  # torch only takes native byte order
        self.dtype = torch.from_numpy(np.empty(0, dtype=self._native)).dtype
        self._handle: h5py.File | None = None
        self._pid = -1

    def __getitem__(self, rows: slice) -> torch.Tensor:
        if self._pid != os.getpid():
            self._handle, self._pid = h5py.File(self.file, "r"), os.getpid()
        return torch.from_numpy(np.ascontiguousarray(self._handle[self.name][rows], dtype=self._native))


@StoreFactory.register("h5")
class H5Store(Store):
    """Reads `.h5` / `.hdf5` files (a single file or every such file below a folder)."""

    _pickle_by_path = True

    @classmethod
    def can_load(cls, path: Path) -> bool:
        return bool(list_files(path, H5_SUFFIXES))

    def load(self, path: str | Path, tokenizer: Any = None) -> H5Store:
        """Load `path`; `tokenizer` is unused (HDF5 holds token ids already)."""
        path = Path(path)
        files = list_files(path, H5_SUFFIXES)
        if not files:
            raise ValueError(f"no .h5/.hdf5 files at {str(path)!r}")
        raw: dict[str, list[Segment]] = {}
        for file in files:
            # One copy-on-write map of the whole file ("c": the file stays untouched while torch gets the
            # writable array it requires); contiguous datasets become views into it. One map per file, not
            # per dataset, keeps a store of many small documents under the kernel's limit of mappings.
            whole = np.memmap(file, dtype=np.uint8, mode="c")
            with h5py.File(file, "r") as f:
                for key, group in f.items():
                    if not isinstance(group, h5py.Group):
                        raise ValueError(f"{str(file)!r}: top-level {key!r} must be a group of data_<n> datasets")
                    raw.setdefault(key, []).extend(_segment(file, whole, d) for d in _numbered_datasets(file, group))
        self._normalize(raw, path)
        return self


def _numbered_datasets(file: Path, group: h5py.Group) -> list[h5py.Dataset]:
    """The group's `data_<n>` datasets in numeric order of n."""
    numbered = []
    for name, dataset in group.items():
        match = _SEGMENT_NAME.fullmatch(name)
        if match is None or not isinstance(dataset, h5py.Dataset) or dataset.ndim == 0:
            raise ValueError(f"{str(file)!r}: {group.name}/{name} is not a data_<n> dataset of at least one dimension")
        numbered.append((int(match.group(1)), dataset))
    numbered.sort(key=lambda item: item[0])
    return [dataset for _, dataset in numbered]


def _segment(file: Path, whole: np.memmap, dataset: h5py.Dataset) -> Segment:
    offset = dataset.id.get_offset()  # None unless stored contiguously, uncompressed and allocated
    dtype = dataset.dtype
    if offset is None or not dtype.isnative or offset % dtype.itemsize:
        return H5Segment(file, dataset.name, dataset.shape, dtype)
    array = whole[offset : offset + dataset.size * dtype.itemsize].view(dtype).reshape(dataset.shape)
    return torch.from_numpy(array)


def save_h5(path: str | Path, data: dict[str, list[Any]], name: str = "data") -> Path:
    """Write `{key: [segment, ...]}` (tensors or arrays) to `<path>/<name>.h5`; returns the file's path."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / f"{name}.h5"
    with h5py.File(file, "w") as f:
        for key, segments in data.items():
            group = f.create_group(key)
            for i, segment in enumerate(segments):
                group.create_dataset(f"data_{i}", data=np.asarray(segment))
    return file
