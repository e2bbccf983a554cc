"""`Store`: keyed, row-aligned data held as segments, and `StoreFactory`, which picks a store by name or by
what a path contains.

A store maps each key to a list of segments (usually one per document or file). Segments of a key are one
logical array along their first axis, the *row* axis: for token streams a row is one token (segments of
shape `(n,)`), for GRPO a row is one prompt with its group of responses (segments of shape `(n, P)`,
`(n, G, R)`, ...). Every key must have the same number of rows; `fetch(begin, end)` returns rows
`[begin, end)` of each key, a view of the segment when the range lies inside one segment and a
concatenation otherwise.
"""

from __future__ import annotations

import bisect
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from astrai.factory import BaseFactory


class Segment(Protocol):
    """What a store keeps per segment: a tensor, or a lazily read array with the same slicing behaviour."""

    shape: Sequence[int]
    dtype: torch.dtype

    def __getitem__(self, rows: slice) -> torch.Tensor: ...


class Store(ABC):
    """Keyed segments with row-aligned keys. Subclasses implement `load`, which ends with `_normalize`."""

    # Stores backed by files on disk pickle as their path and reload on unpickling, so that handing a
    # dataset to spawned workers never copies the data through the pickle.
    _pickle_by_path: ClassVar[bool] = False

    def __init__(self) -> None:
        self._data: dict[str, list[Segment]] = {}
        self._cum: dict[str, list[int]] = {}  # key -> [0, rows(seg0), rows(seg0)+rows(seg1), ..., total]
        self._length = 0
        self._path: Path | None = None

    @classmethod
    def can_load(cls, path: Path) -> bool:
        """Whether `path` holds data in this store's format (used to detect the storage type)."""
        return False

    @abstractmethod
    def load(self, path: str | Path, tokenizer: Any = None) -> Store:
        """Read the data at `path` (a file or a folder); returns `self`."""

    @property
    def keys(self) -> list[str]:
        return list(self._data)

    def __len__(self) -> int:
        return self._length

    def row_shape(self, key: str) -> tuple[int, ...]:
        """Shape of one row of `key`: `()` for a token stream, `(G, R)` for GRPO responses."""
        return tuple(self._data[key][0].shape[1:])

    def max_value(self, key: str) -> int | float:
        """The largest value `key` holds (one pass over its rows; file-backed stores read them once)."""
        return max(segment[:].max().item() for segment in self._data[key])

    def fetch(
        self, begin: int, end: int, keys: str | Sequence[str] | None = None
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Rows `[begin, end)`: a tensor for one key given as a string, else a dict (all keys when None)."""
        if not 0 <= begin <= end <= self._length:
            raise IndexError(f"fetch({begin}, {end}) out of bounds for a store of {self._length} rows")
        if isinstance(keys, str):
            return self._fetch_key(keys, begin, end)
        names = self.keys if keys is None else list(keys)
        return {key: self._fetch_key(key, begin, end) for key in names}

    def _fetch_key(self, key: str, begin: int, end: int) -> torch.Tensor:
        if key not in self._data:
            raise KeyError(f"store has no key {key!r}; keys: {self.keys}")
        segments, cum = self._data[key], self._cum[key]
        if begin == end:
            return torch.empty((0, *self.row_shape(key)), dtype=segments[0].dtype)
        # Segment i holds rows [cum[i], cum[i+1]); empty segments were dropped, so cum is strictly increasing.
        first = bisect.bisect_right(cum, begin) - 1
        last = bisect.bisect_left(cum, end) - 1
        if first == last:
            return segments[first][begin - cum[first] : end - cum[first]]
        pieces = [segments[first][begin - cum[first] :]]
        pieces += [segments[i][:] for i in range(first + 1, last)]
        pieces.append(segments[last][: end - cum[last]])
        return torch.cat(pieces)

    def _normalize(self, raw: dict[str, list[Segment]], path: Path) -> None:
        """Install `{key: [segments]}` read from `path` after checking it is one consistent table."""
        if not raw:
            raise ValueError(f"no data found at {str(path)!r}")
        data: dict[str, list[Segment]] = {}
        cum: dict[str, list[int]] = {}
        for key, segments in raw.items():
            kept = [s for s in segments if s.shape[0] > 0]  # empty segments add no rows
            if not kept:
                raise ValueError(f"key {key!r} at {str(path)!r} holds no rows")
            shapes = {tuple(s.shape[1:]) for s in kept}
            dtypes = {s.dtype for s in kept}
            if len(shapes) > 1 or len(dtypes) > 1:
                raise ValueError(
                    f"segments of key {key!r} at {str(path)!r} disagree: row shapes {sorted(shapes)}, "
                    f"dtypes {sorted(map(str, dtypes))}"
                )
            data[key] = kept
            cum[key] = [0]
            for s in kept:
                cum[key].append(cum[key][-1] + s.shape[0])
        lengths = {key: c[-1] for key, c in cum.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"keys at {str(path)!r} have unequal lengths (rows): {lengths}")
        self._data, self._cum = data, cum
        self._length = next(iter(lengths.values()))
        self._path = path

    def __getstate__(self) -> dict[str, Any]:
        if self._pickle_by_path and self._path is not None:
            return {"_path": self._path}
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        if self._pickle_by_path and set(state) == {"_path"}:
            self.__init__()
            self.load(state["_path"])
        else:
            self.__dict__.update(state)


class StoreFactory(BaseFactory[Store]):
    """Stores by name: "h5", "json", "mmap"."""

    kind = "store"
    base_class = Store

    @classmethod
    def create(cls, storage_type: str, *args: Any, **kwargs: Any) -> Store:  # type: ignore[override]
        """An empty store of `storage_type` ("h5", "json", "mmap" or a registered name); `load` fills it."""
        return super().create(storage_type, *args, **kwargs)

    @classmethod
    def detect(cls, path: str | Path) -> str:
        """The name of the one registered store that can load `path`; ValueError naming the path otherwise."""
        path = Path(path)
        if not path.exists():
            raise ValueError(f"data path {str(path)!r} does not exist")
        names = [n for n in cls.list_registered() if cls.get_component_class(n).can_load(path)]
        if not names:
            raise ValueError(
                f"no loadable data at {str(path)!r}: expected .h5/.hdf5 files, .jsonl files, "
                f"or a folder with meta.json and <key>.bin files (raw records, e.g. Parquet, Arrow or a saved "
                f"datasets folder, become a store with `astrai data build` first)"
            )
        if len(names) > 1:
            raise ValueError(f"data at {str(path)!r} matches several storage types {names}; pass storage_type")
        return names[0]


def list_files(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """`path` itself if it is a file with one of `suffixes`, else such files below it, sorted by path."""
    if path.is_file():
        return [path] if path.suffix in suffixes else []
    return sorted(p for p in path.rglob("*") if p.suffix in suffixes and p.is_file())


# Register the built-in stores. Imported last: each module imports `Store` and `StoreFactory` from here.
from astrai.dataset import h5_store, json_store, mmap_store  # noqa: E402, F401
