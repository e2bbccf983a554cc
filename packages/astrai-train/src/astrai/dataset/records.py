"""Raw records for `astrai data build` and `astrai data tokenizer`: the files ML engineers already have.

`read_records(inputs)` yields `(where, record)` for each record, `where` naming its file and line
(`data.jsonl:3`) or row (`train.parquet[2]`), from:

| input                                             | read with                                     |
|---------------------------------------------------|-----------------------------------------------|
| `.jsonl` (one JSON object a line)                 | json                                          |
| `.json` (a list of records or a dict of columns)  | json                                          |
| `.parquet`                                        | pyarrow                                       |
| `.arrow` (a `datasets` cache / shard file)        | pyarrow (IPC stream, as `datasets` writes it, or IPC file) |
| a folder saved by `Dataset(Dict).save_to_disk`    | `datasets.load_from_disk` (a split of a `DatasetDict`) |
| any other folder                                  | its `.jsonl`, `.parquet` and `.arrow` files, in sorted path order |

pyarrow and datasets are the optional extra `astrai-train[hf-data]`; a format that needs one of them
when it is missing is a one-line ValueError naming the extra. Arrow has no "absent field", only null:
records read through Arrow drop their null fields (at every depth), so a message that had no
`tool_calls` in the original data does not reach the chat template as `tool_calls: None`.

`map_fields(records, {"prompt": "question", ...})` renames columns to the field names the converter
reads (`astrai data build --field prompt=question`).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from astrai.dataset.json_store import read_json_document, read_jsonl
from astrai.dataset.store import list_files

HF_DATA_EXTRA = "astrai-train[hf-data]"
FOLDER_SUFFIXES = (".jsonl", ".parquet", ".arrow")  # what a plain folder contributes
FILE_SUFFIXES = (".json", *FOLDER_SUFFIXES)  # what a file named directly may be
SAVED_DATASET_FILES = ("state.json", "dataset_dict.json")  # written by Dataset / DatasetDict.save_to_disk
FIELDS = ("text", "messages", "prompt", "completion", "chosen", "rejected", "responses", "rewards", "tools")
TEXT_SUFFIXES = (".txt", ".md", ".rst", *FOLDER_SUFFIXES)  # what `read_texts` reads from a folder
_PROGRESS_BYTES = 1 << 20  # inputs at least this large show a progress bar
_TEXT_CHUNK_CHARS = 1 << 20  # plain-text files are handed over in line-aligned pieces of about this size
_BATCH_ROWS = 1024  # Arrow rows turned into Python records at a time


def read_records(inputs: Sequence[str | Path], split: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """`(where, record)` for each record of the files and folders `inputs`, with a progress bar for large inputs.

    `split` picks the split of a saved `DatasetDict` (default: "train", or its only split).
    """
    files: list[Path] = []
    for item in map(Path, inputs):
        if not item.exists():
            raise ValueError(f"input {str(item)!r} does not exist")
        if item.is_dir() and not _is_saved_dataset(item):
            found = list_files(item, FOLDER_SUFFIXES)
            if not found:
                raise ValueError(
                    f"input folder {str(item)!r} holds no {'/'.join(FOLDER_SUFFIXES)} files and is not a folder "
                    f"saved by datasets' save_to_disk"
                )
            files += found
        elif item.is_file() and item.suffix not in FILE_SUFFIXES:
            raise ValueError(
                f"input {str(item)!r}: unsupported format {item.suffix or '(no suffix)'!r}; allowed "
                f"{', '.join(FILE_SUFFIXES)} files and folders (datasets' save_to_disk, or folders of such files)"
            )
        else:
            files.append(item)
    size = sum(p.stat().st_size for f in files for p in ([f] if f.is_file() else f.rglob("*")) if p.is_file())
    with tqdm(unit=" records", desc="records", disable=size < _PROGRESS_BYTES) as bar:
        for path in files:
            for item in _read(path, split):
                yield item
                bar.update()


def _read(path: Path, split: str | None) -> Iterable[tuple[str, dict[str, Any]]]:
    if path.is_dir():
        return _read_saved_dataset(path, split)
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    if path.suffix == ".json":
        return read_json_document(path)
    if path.suffix == ".parquet":
        parquet = _require("pyarrow.parquet", "Parquet", path)
        return _rows(str(path), parquet.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS))
    return _read_arrow(path)


def _read_arrow(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    pa = _require("pyarrow", "Arrow", path)
    source = pa.memory_map(str(path))
    try:  # datasets writes its .arrow files as IPC streams; Feather v2 / IPC files are read too
        reader = pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        try:
            reader = pa.ipc.open_file(source)
        except pa.ArrowInvalid:
            raise ValueError(f"{path}: not an Arrow IPC stream or file") from None
        batches: Iterable[Any] = (reader.get_batch(i) for i in range(reader.num_record_batches))
    else:
        batches = reader
    yield from _rows(str(path), batches)


def _read_saved_dataset(path: Path, split: str | None) -> Iterator[tuple[str, dict[str, Any]]]:
    datasets = _require("datasets", "a saved datasets folder", path)
    loaded = datasets.load_from_disk(str(path))
    where = str(path)
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        if split is None:
            split = "train" if "train" in loaded else names[0] if len(names) == 1 else None
        if split not in loaded:
            raise ValueError(f"{where} holds the splits {names}: pick one with --split (got {split!r})")
        loaded, where = loaded[split], f"{path}/{split}"
    elif split is not None:
        raise ValueError(f"{where} is one Dataset, not a DatasetDict: --split {split!r} does not apply")
    # Arrow batches (select / shuffle indices applied), turned into records like a Parquet file's rows.
    yield from _rows(where, loaded.with_format("arrow").iter(batch_size=_BATCH_ROWS))


def _rows(where: str, batches: Iterable[Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    index = 0
    for batch in batches:
        for row in batch.to_pylist():
            record = _without_nulls(row)
            if not record:
                raise ValueError(f"{where}[{index}]: a record must have a non-null field")
            yield f"{where}[{index}]", record
            index += 1


def _without_nulls(value: Any) -> Any:
    """`value` with the null fields of its dicts dropped, at every depth (list elements are kept)."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _is_saved_dataset(path: Path) -> bool:
    return any((path / name).is_file() for name in SAVED_DATASET_FILES)


def _require(module: str, what: str, path: Path) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.partition(".")[0]
        raise ValueError(f"reading {what} ({path}) needs {top}: pip install '{HF_DATA_EXTRA}'") from None


def parse_field(spec: str) -> tuple[str, str]:
    """`NAME=COLUMN` (the `--field` argument) as `(NAME, COLUMN)`; NAME must be one of `FIELDS`."""
    name, sep, column = spec.partition("=")
    if not sep or not column:
        raise ValueError(f"--field {spec!r}: expected NAME=COLUMN, e.g. prompt=question")
    if name not in FIELDS:
        raise ValueError(f"--field {spec!r}: NAME must be one of {list(FIELDS)}")
    return name, column


def map_fields(
    records: Iterable[tuple[str, dict[str, Any]]], fields: Mapping[str, str]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Records with column `fields[name]` renamed to `name` (replacing any column already called `name`)."""
    if not fields:
        yield from records
        return
    for where, record in records:
        missing = [f"{name}={column}" for name, column in fields.items() if column not in record]
        if missing:
            raise ValueError(f"{where}: no column for --field {', '.join(missing)} (record has {sorted(record)})")
        renamed = {k: v for k, v in record.items() if k not in fields and k not in fields.values()}
        yield where, {**renamed, **{name: record[column] for name, column in fields.items()}}


def read_texts(inputs: Sequence[str | Path]) -> Iterator[str]:
    """The texts of files and folders: `"text"` of each record, plain files in line-aligned pieces.

    A folder contributes its `TEXT_SUFFIXES` files, in sorted path order (a saved datasets folder its
    records); a file named directly is read as records when its suffix is one of `FILE_SUFFIXES`, as
    plain text otherwise.
    """
    for item in map(Path, inputs):
        if not item.exists():
            raise ValueError(f"input {str(item)!r} does not exist")
        if item.is_dir() and _is_saved_dataset(item):
            files = [item]
        else:
            files = list_files(item, TEXT_SUFFIXES) if item.is_dir() else [item]
        for file in files:
            if file.is_dir() or file.suffix in FILE_SUFFIXES:
                yield from (string_field(record, "text", where) for where, record in read_records([file]))
                continue
            with file.open(encoding="utf-8") as f:
                chunk: list[str] = []
                size = 0
                for line in f:
                    chunk.append(line)
                    size += len(line)
                    if size >= _TEXT_CHUNK_CHARS:
                        yield "".join(chunk)
                        chunk, size = [], 0
                if chunk:
                    yield "".join(chunk)


def string_field(record: dict[str, Any], key: str, where: str) -> str:
    """`record[key]`, which must be a string; ValueError naming `where` and the key otherwise."""
    if key not in record:
        raise ValueError(f"{where}: missing key {key!r} (record has {sorted(record)})")
    if not isinstance(record[key], str):
        raise ValueError(f"{where}: key {key!r} must be a string, got {type(record[key]).__name__}")
    return record[key]
