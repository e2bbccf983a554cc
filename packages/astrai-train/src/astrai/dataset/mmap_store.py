"""`MmapStore` and its writer `save_mmap`: one raw little-endian file per key, memory-mapped.

Layout of a folder:

    meta.json      {key: {"dtype": "int64", "shape": [rows, ...], "offsets": [0, r0, r0 + r1, ..., rows]}}
    <key>.bin      the key's rows back to back, C order, little-endian

`dtype` is a numpy dtype name (int64, int32, uint16, bool, float32, ...). `offsets` is optional: the
cumulative row boundaries of the records (documents) that were written, which become the key's segments;
without it the key is one segment. Loading maps each file once, copy-on-write, and hands torch views of it:
no copy, no RAM beyond the page cache, and the file is never modified.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from astrai.dataset.store import Segment, Store, StoreFactory

META_FILE = "meta.json"


@StoreFactory.register("mmap")
class MmapStore(Store):
    """Memory-maps a `meta.json` + `<key>.bin` folder."""

    _pickle_by_path = True

    def __init__(self) -> None:
        super().__init__()
        self._mmap_refs: list[np.memmap] = []  # keeps the maps open for as long as the store lives

    @classmethod
    def can_load(cls, path: Path) -> bool:
        return path.is_dir() and (path / META_FILE).is_file()

    def load(self, path: str | Path, tokenizer: Any = None) -> MmapStore:
        """Load the folder `path`; `tokenizer` is unused (the files hold token ids already)."""
        path = Path(path)
        if not self.can_load(path):
            raise ValueError(f"{str(path)!r} is not a folder with {META_FILE}")
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError(f"{str(path / META_FILE)!r} must map keys to {{dtype, shape, offsets?}}")
        raw: dict[str, list[Segment]] = {}
        self._mmap_refs = []
        for key, info in meta.items():
            rows = self._map(path, key, info)
            offsets = info.get("offsets", [0, rows.shape[0]])
            if offsets[0] != 0 or offsets[-1] != rows.shape[0] or any(a > b for a, b in zip(offsets, offsets[1:])):
                raise ValueError(
                    f"{str(path / META_FILE)!r}: offsets of {key!r} must rise from 0 to {rows.shape[0]}, "
                    f"got {offsets[:3]}...{offsets[-1:]}"
                )
            raw[key] = [rows[a:b] for a, b in zip(offsets, offsets[1:])]
        self._normalize(raw, path)
        return self

    def _map(self, folder: Path, key: str, info: dict[str, Any]) -> torch.Tensor:
        file = folder / f"{key}.bin"
        try:
            dtype = np.dtype(info["dtype"]).newbyteorder("<")
            shape = tuple(int(n) for n in info["shape"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{str(folder / META_FILE)!r}: entry {key!r} needs dtype and shape ({exc})") from None
        expected = math.prod(shape) * dtype.itemsize
        if not file.is_file() or file.stat().st_size != expected:
            size = file.stat().st_size if file.is_file() else "missing"
            raise ValueError(
                f"{str(file)!r}: expected {expected} bytes for shape {list(shape)} {dtype.name}, got {size}"
            )
        if expected == 0:  # an empty file cannot be mapped
            return torch.from_numpy(np.empty(shape, dtype=dtype.newbyteorder("=")))
        # Copy-on-write ("c") keeps the file untouched while giving torch the writable array it requires.
        array = np.memmap(file, dtype=dtype, mode="c", shape=shape)
        self._mmap_refs.append(array)
        if not dtype.isnative:  # big-endian host: torch needs native byte order, which costs a copy
            return torch.from_numpy(array.astype(dtype.newbyteorder("=")))
        return torch.from_numpy(array)


def save_mmap(path: str | Path, data: dict[str, list[Any]]) -> Path:
    """Write `{key: [segment, ...]}` (arrays or tensors; one segment per record) as an MmapStore folder.

    Segments are streamed to `<key>.bin` one by one; their row counts become the key's `offsets`.
    Returns the folder's path.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    meta: dict[str, dict[str, Any]] = {}
    for key, segments in data.items():
        if not key or "/" in key or "\\" in key or key.startswith("."):
            raise ValueError(f"key {key!r} cannot name a file <key>.bin")
        arrays = [np.asarray(s) for s in segments]
        if not arrays or len({(a.dtype, a.shape[1:]) for a in arrays}) > 1 or arrays[0].ndim == 0:
            found = sorted({(str(a.dtype), a.shape[1:]) for a in arrays})
            raise ValueError(f"segments of key {key!r} need one dtype and row shape, got {found or 'none'}")
        offsets = [0]
        with (folder / f"{key}.bin").open("wb") as f:
            for a in arrays:
                np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tofile(f)
                offsets.append(offsets[-1] + a.shape[0])
        meta[key] = {"dtype": arrays[0].dtype.name, "shape": [offsets[-1], *arrays[0].shape[1:]], "offsets": offsets}
    (folder / META_FILE).write_text(json.dumps(meta), encoding="utf-8")
    return folder
