"""Raw records from every input format `astrai data build` reads: JSON Lines, JSON, Parquet, datasets' Arrow
files and save_to_disk folders (each written here with pyarrow / datasets, skipped without them), plain
folders, `--field` renaming, and the one-line error naming the extra when a library is missing."""

import json
import sys

import pytest

from astrai.dataset import map_fields, read_records, read_texts
from astrai.dataset.records import HF_DATA_EXTRA, parse_field

CHAT = [
    {"role": "user", "content": "What color is the sky?"},
    {"role": "assistant", "content": "It is blue."},
]
TOOL_CHAT = [
    {"role": "user", "content": "Lights on."},
    {
        "role": "assistant",
        "tool_calls": [{"type": "function", "function": {"name": "light", "arguments": {"room": "hall"}}}],
    },
    {"role": "tool", "name": "light", "content": "on"},
    {"role": "assistant", "content": "Done."},
]
RECORDS = [
    {"prompt": "The sky is", "completion": " blue."},
    {"prompt": "Grass is", "completion": " green."},
]


def records_of(inputs, **kwargs):
    return list(read_records(inputs, **kwargs))


def test_jsonl_and_json_records_name_file_and_line(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    (tmp_path / "b.json").write_text(json.dumps({"prompt": ["Q"], "completion": [" A"]}), encoding="utf-8")
    assert records_of([tmp_path / "a.jsonl", tmp_path / "b.json"]) == [
        (f"{tmp_path / 'a.jsonl'}:1", RECORDS[0]),
        (f"{tmp_path / 'a.jsonl'}:2", RECORDS[1]),
        (f"{tmp_path / 'b.json'}[0]", {"prompt": "Q", "completion": " A"}),
    ]


def test_parquet_rows_are_records_and_nulls_are_absent_fields(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{"messages": CHAT}, {"messages": TOOL_CHAT}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    # Arrow unifies the message structs: the plain messages get tool_calls / name = null, which are dropped.
    assert records_of([tmp_path / "chat.parquet"]) == [
        (f"{tmp_path / 'chat.parquet'}[0]", rows[0]),
        (f"{tmp_path / 'chat.parquet'}[1]", rows[1]),
    ]


def test_arrow_stream_and_file_are_read(tmp_path):
    pa = pytest.importorskip("pyarrow")
    table = pa.Table.from_pylist(RECORDS)
    with pa.OSFile(str(tmp_path / "stream.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    with pa.OSFile(str(tmp_path / "file.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    for name in ("stream.arrow", "file.arrow"):
        assert [r for _, r in records_of([tmp_path / name])] == RECORDS
    (tmp_path / "junk.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(ValueError, match="junk.arrow: not an Arrow IPC stream or file"):
        records_of([tmp_path / "junk.arrow"])


def test_a_datasets_cache_arrow_file_is_read(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "saved"))
    [arrow] = sorted((tmp_path / "saved").glob("*.arrow"))  # the shard datasets wrote (an IPC stream)
    assert [r for _, r in records_of([arrow])] == RECORDS


def test_a_saved_dataset_folder_is_loaded_with_load_from_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(
        [{"chosen": CHAT, "rejected": CHAT[:1]}] + [{"chosen": TOOL_CHAT, "rejected": CHAT}]
    )
    ds.save_to_disk(str(tmp_path / "pref"))
    got = records_of([tmp_path / "pref"])
    assert got == [
        (f"{tmp_path / 'pref'}[0]", {"chosen": CHAT, "rejected": CHAT[:1]}),
        (f"{tmp_path / 'pref'}[1]", {"chosen": TOOL_CHAT, "rejected": CHAT}),
    ]
    # select / shuffle keep an indices mapping that save_to_disk flattens; a loaded one is read in its order.
    ds.select([1, 0]).save_to_disk(str(tmp_path / "swapped"))
    assert [r for _, r in records_of([tmp_path / "swapped"])] == [r for _, r in reversed(got)]


def test_a_saved_dataset_dict_reads_train_or_the_split_named(tmp_path):
    datasets = pytest.importorskip("datasets")
    splits = {"train": RECORDS, "test": RECORDS[:1]}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(
        str(tmp_path / "d")
    )
    assert [r for _, r in records_of([tmp_path / "d"])] == RECORDS
    assert records_of([tmp_path / "d"], split="test") == [(f"{tmp_path / 'd' / 'test'}[0]", RECORDS[0])]
    with pytest.raises(ValueError, match=r"holds the splits \['train', 'test'\]: pick one with --split"):
        records_of([tmp_path / "d"], split="dev")
    datasets.DatasetDict(
        {"a": datasets.Dataset.from_list(RECORDS), "b": datasets.Dataset.from_list(RECORDS)}
    ).save_to_disk(str(tmp_path / "ab"))
    with pytest.raises(ValueError, match="pick one with --split"):
        records_of([tmp_path / "ab"])


def test_a_plain_folder_contributes_its_data_files_in_path_order(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    (tmp_path / "data" / "sub").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(RECORDS[1:]), tmp_path / "data" / "b.parquet")
    (tmp_path / "data" / "sub" / "c.jsonl").write_text(json.dumps({"text": "c"}) + "\n", encoding="utf-8")
    (tmp_path / "data" / "a.jsonl").write_text(json.dumps(RECORDS[0]) + "\n", encoding="utf-8")
    (tmp_path / "data" / "notes.txt").write_text("not data", encoding="utf-8")
    assert [r for _, r in records_of([tmp_path / "data"])] == [*RECORDS, {"text": "c"}]


def test_unsupported_missing_and_empty_inputs_are_errors(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"data.csv': unsupported format '.csv'; allowed .json, .jsonl, .parquet"):
        records_of([tmp_path / "data.csv"])
    with pytest.raises(ValueError, match="does not exist"):
        records_of([tmp_path / "nowhere.jsonl"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .jsonl/.parquet/.arrow files and is not a folder saved by datasets"):
        records_of([tmp_path / "empty"])


@pytest.mark.parametrize(
    ("name", "modules", "what"),
    [("x.parquet", ("pyarrow", "pyarrow.parquet"), "Parquet"), ("x.arrow", ("pyarrow",), "Arrow")],
)
def test_a_missing_pyarrow_names_the_extra(tmp_path, monkeypatch, name, modules, what):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError, as when not installed
    (tmp_path / name).write_bytes(b"PAR1")
    with pytest.raises(ValueError) as info:
        records_of([tmp_path / name])
    assert str(info.value) == f"reading {what} ({tmp_path / name}) needs pyarrow: pip install '{HF_DATA_EXTRA}'"
    assert HF_DATA_EXTRA == "astrai-train[hf-data]"


def test_a_missing_datasets_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "state.json").write_text("{}", encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"saved datasets folder .* needs datasets: pip install 'astrai-train\[hf-data\]'"
    ):
        records_of([tmp_path / "saved"])


def test_fields_rename_columns_to_the_names_the_converter_reads():
    assert parse_field("prompt=question") == ("prompt", "question")
    for bad, message in (("prompt", "expected NAME=COLUMN"), ("input=x", "NAME must be one of")):
        with pytest.raises(ValueError, match=message):
            parse_field(bad)
    records = [("r:1", {"question": "Q?", "answer": "A.", "prompt": "old", "id": 7})]
    assert list(map_fields(records, {"prompt": "question", "completion": "answer"})) == [
        ("r:1", {"id": 7, "prompt": "Q?", "completion": "A."})
    ]
    with pytest.raises(ValueError, match=r"r:1: no column for --field completion=reply \(record has \["):
        list(map_fields(records, {"completion": "reply"}))


def test_read_texts_reads_the_text_of_parquet_and_saved_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist([{"text": "one"}, {"text": "two"}]), tmp_path / "t.parquet")
    datasets.Dataset.from_list([{"text": "three"}]).save_to_disk(str(tmp_path / "saved"))
    assert list(read_texts([tmp_path / "t.parquet", tmp_path / "saved"])) == ["one", "two", "three"]
