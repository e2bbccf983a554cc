"""`JSONStore` and its writer `save_jsonl`: JSON Lines (one record per line) or one JSON document.

Every record is an object with the same keys; each value becomes one segment of its key. A value is a
list of numbers (token ids, mask flags, rewards), a nested rectangular list (rows of a multi-dimensional
key, e.g. `[[p0, p1, ...]]` for one GRPO prompt row), or a string of text, which is tokenised at load
time with the tokenizer given to `load`. Raw training records (TRL's `messages`, `prompt` / `completion`,
`chosen` / `rejected`, `text` as text or chat messages) are not a store: loading them is a ValueError
saying to run `astrai data build` first. A folder is read file by file in sorted path order (`*.jsonl`
below it); a single `.jsonl` or `.json` file may be named directly. The data is held in RAM.

A `.json` file holds one JSON document, in either layout:

    [{"sequence": [1, 2, 3]}, {"sequence": [4, 5]}]          a list of records
    {"sequence": [[1, 2, 3], [4, 5]]}                         a dict of columns (the original's save_json):
                                                              element i of every column is record i

(a `.json` file that is not one document, but one record per line, is read as JSON Lines).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from astrai.dataset.store import Segment, Store, StoreFactory, list_files

JSON_SUFFIXES = (".jsonl", ".json")


@StoreFactory.register("json")
class JSONStore(Store):
    """Reads JSON Lines files; text values need a tokenizer (an object with `encode(str)`, or a callable)."""

    @classmethod
    def can_load(cls, path: Path) -> bool:
        # A folder is JSON data only through .jsonl files (a meta.json or config.json is not data).
        return bool(list_files(path, JSON_SUFFIXES if path.is_file() else (".jsonl",)))

    def load(self, path: str | Path, tokenizer: Any = None) -> JSONStore:
        path = Path(path)
        files = list_files(path, JSON_SUFFIXES if path.is_file() else (".jsonl",))
        if not files:
            raise ValueError(f"no .jsonl files at {str(path)!r}")
        encode = _encoder(tokenizer)
        raw: dict[str, list[Segment]] = {}
        for file in files:
            for where, record in read_json_document(file) if file.suffix == ".json" else read_jsonl(file):
                if not raw:
                    _refuse_raw_records(record, where, file)
                if raw and set(record) != set(raw):
                    raise ValueError(f"{where}: record keys {sorted(record)} differ from {sorted(raw)}")
                for key, value in record.items():
                    raw.setdefault(key, []).append(_to_tensor(value, key, where, encode))
        for key, segments in raw.items():
            # JSON does not type numbers: [1, 2] and [0.5] in one key must end up one dtype.
            dtype = _common_dtype(s.dtype for s in segments if s.numel())
            raw[key] = [s.to(dtype) for s in segments]
        self._normalize(raw, path)
        return self


def read_jsonl(file: Path) -> Iterable[tuple[str, dict[str, Any]]]:
    with file.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{file}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not a JSON record ({exc.msg})") from None
            if not isinstance(record, dict) or not record:
                raise ValueError(f"{where}: a record must be a non-empty JSON object, got {type(record).__name__}")
            yield where, record


def read_json_document(file: Path) -> Iterable[tuple[str, dict[str, Any]]]:
    """The records of a `.json` file: a list of records or a dict of equally long columns (JSON Lines
    when the file is not one document)."""
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # more than one document: one record per line
            yield from read_jsonl(file)
            return
        raise ValueError(f"{file}: not a JSON document ({exc.msg} at line {exc.lineno})") from None
    if isinstance(document, dict):
        columns = document
        bad = sorted(key for key, column in columns.items() if not isinstance(column, list))
        if not columns or bad:
            raise ValueError(f"{file}: a dict of columns needs a list per key (one element per record); bad: {bad}")
        lengths = {key: len(column) for key, column in columns.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"{file}: columns have different lengths (records): {lengths}")
        document = [dict(zip(columns, values)) for values in zip(*columns.values())]
    if not isinstance(document, list):
        raise ValueError(f"{file}: must hold a list of records or a dict of columns, got {type(document).__name__}")
    for index, record in enumerate(document):
        where = f"{file}[{index}]"
        if not isinstance(record, dict) or not record:
            raise ValueError(f"{where}: a record must be a non-empty JSON object, got {type(record).__name__}")
        yield where, record


# The columns of TRL's dataset formats, and the `astrai data build --kind` that turns them into a store.
RAW_KINDS = {"messages": "sft", "completion": "sft", "chosen": "dpo", "rejected": "dpo", "text": "text"}


def _refuse_raw_records(record: dict[str, Any], where: str, file: Path) -> None:
    """ValueError when `record` is a raw training record (chat messages, prompt / completion, preference
    text), which a store does not hold: it has to be tokenised into one by `astrai data build` first."""
    for key in ("messages", "completion", "chosen", "rejected", "prompt", "text"):
        value = record.get(key)
        if isinstance(value, str) or (isinstance(value, list) and any(isinstance(v, dict) for v in value)):
            kind = next((RAW_KINDS[k] for k in RAW_KINDS if k in record), "grpo" if "responses" in record else "sft")
            raise ValueError(
                f"{where}: {str(file)!r} holds raw records (key {key!r}: {type(value).__name__}), not a built store; "
                f"run `astrai data build --kind {kind} --input {file} --tokenizer DIR --output DIR` first and load "
                f"that folder"
            )


def _encoder(tokenizer: Any) -> Callable[[str], list[int]] | None:
    if tokenizer is None:
        return None
    encode = getattr(tokenizer, "encode", tokenizer)
    if not callable(encode):
        raise TypeError(f"tokenizer must have encode(text) or be callable, got {type(tokenizer).__name__}")
    return encode


def _to_tensor(value: Any, key: str, where: str, encode: Callable[[str], list[int]] | None) -> torch.Tensor:
    if isinstance(value, str):
        if encode is None:
            raise ValueError(f"{where}: key {key!r} holds text; pass a tokenizer to load it")
        return torch.tensor(list(encode(value)), dtype=torch.int64)
    if not isinstance(value, list):
        raise ValueError(f"{where}: key {key!r} must be a list or text, got {type(value).__name__}")
    if not value:
        return torch.empty(0, dtype=torch.int64)  # no rows; dropped when the store is normalised
    try:
        return torch.tensor(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: key {key!r} is not a rectangular list of numbers ({exc})") from None


def _common_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    result = torch.bool
    for dtype in dtypes:
        result = torch.promote_types(result, dtype)
    return result


def save_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write records (values: tensors, arrays, lists or text) to the JSON Lines file `path`; returns it."""
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    with file.open("w", encoding="utf-8") as f:
        for record in records:
            plain = {k: v if isinstance(v, str | list) else v.tolist() for k, v in record.items()}
            f.write(json.dumps(plain, ensure_ascii=False) + "\n")
    return file
