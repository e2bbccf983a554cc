"""Stores: HDF5, JSON Lines and memory-mapped folders, their writers, fetch semantics and detection."""

import json
import pickle

import h5py
import numpy as np
import pytest
import torch

from astrai.dataset import H5Store, JSONStore, MmapStore, StoreFactory, save_h5, save_jsonl, save_mmap
from astrai.dataset.h5_store import H5Segment

SEQUENCE = [torch.arange(0, 5), torch.arange(5, 12), torch.arange(12, 20)]
MASK = [
    torch.tensor([True, False, True, True, False]),
    torch.ones(7, dtype=torch.bool),
    torch.zeros(8, dtype=torch.bool),
]


def write(kind, folder, data):
    """Write `{key: [segments]}` in store format `kind` under `folder`; returns the path to load."""
    if kind == "h5":
        save_h5(folder, data)
    elif kind == "mmap":
        save_mmap(folder, data)
    else:
        n = len(next(iter(data.values())))
        save_jsonl(folder / "part.jsonl", [{k: v[i] for k, v in data.items()} for i in range(n)])
    return folder


@pytest.mark.parametrize("kind", ["h5", "json", "mmap"])
def test_round_trip_and_fetch(tmp_path, kind):
    path = write(kind, tmp_path / kind, {"sequence": SEQUENCE, "loss_mask": MASK})
    assert StoreFactory.detect(path) == kind
    store = StoreFactory.create(kind).load(path)
    assert len(store) == 20
    assert store.keys == (["loss_mask", "sequence"] if kind == "h5" else ["sequence", "loss_mask"])
    assert store.row_shape("sequence") == ()
    assert torch.equal(store.fetch(0, 20, "sequence"), torch.arange(20))
    assert torch.equal(store.fetch(3, 14, "sequence"), torch.arange(3, 14))  # across three segments
    assert torch.equal(store.fetch(5, 12, "sequence"), torch.arange(5, 12))  # exactly one segment
    both = store.fetch(4, 6, ["loss_mask", "sequence"])
    assert torch.equal(both["loss_mask"], torch.tensor([False, True]))
    assert torch.equal(both["sequence"], torch.tensor([4, 5]))
    assert set(store.fetch(0, 1)) == {"sequence", "loss_mask"}
    empty = store.fetch(7, 7, "sequence")
    assert empty.shape == (0,) and empty.dtype == torch.int64
    for begin, end in [(-1, 3), (0, 21), (5, 4), (20, 21)]:
        with pytest.raises(IndexError, match="out of bounds"):
            store.fetch(begin, end, "sequence")
    with pytest.raises(KeyError, match="nope"):
        store.fetch(0, 1, "nope")


@pytest.mark.parametrize("kind", ["h5", "json", "mmap"])
def test_unequal_key_lengths_are_an_error(tmp_path, kind):
    data = {"sequence": [torch.arange(6), torch.arange(4)], "loss_mask": [torch.ones(6, dtype=torch.bool)] * 2}
    path = write(kind, tmp_path, data)
    with pytest.raises(
        ValueError, match=r"unequal lengths.*'sequence': 10.*'loss_mask': 12|'loss_mask': 12.*'sequence': 10"
    ):
        StoreFactory.create(kind).load(path)


@pytest.mark.parametrize("kind", ["h5", "mmap"])
def test_file_backed_fetch_inside_a_segment_is_a_view(tmp_path, kind):
    store = StoreFactory.create(kind).load(write(kind, tmp_path, {"sequence": SEQUENCE}))
    segment = store._data["sequence"][1]
    window = store.fetch(6, 10, "sequence")
    assert window.untyped_storage().data_ptr() == segment.untyped_storage().data_ptr()
    window[0] = -1  # copy-on-write map: the file is not modified
    assert torch.equal(StoreFactory.create(kind).load(tmp_path).fetch(0, 20, "sequence"), torch.arange(20))


def test_h5_segments_in_numeric_order_and_files_sorted(tmp_path):
    segments = [torch.full((2,), i) for i in range(12)]  # data_0 .. data_11: data_10 must follow data_9
    save_h5(tmp_path, {"sequence": segments[6:]}, name="b")
    save_h5(tmp_path, {"sequence": segments[:6]}, name="a")
    store = H5Store().load(tmp_path)
    assert torch.equal(store.fetch(0, 24, "sequence"), torch.arange(12).repeat_interleave(2))
    single = H5Store().load(tmp_path / "b.h5")  # a single file path loads that file
    assert torch.equal(single.fetch(0, 12, "sequence"), torch.arange(6, 12).repeat_interleave(2))


def test_h5_compressed_datasets_are_read_lazily(tmp_path):
    with h5py.File(tmp_path / "c.h5", "w") as f:
        group = f.create_group("sequence")
        group.create_dataset("data_0", data=np.arange(10, dtype=np.int32), compression="gzip")
        group.create_dataset("data_1", data=np.arange(10, 16, dtype=np.int32), chunks=(2,))
        group.create_dataset("data_2", data=np.arange(16, 20, dtype=">i4"))  # big-endian: not mappable
    store = H5Store().load(tmp_path)
    assert all(isinstance(s, H5Segment) for s in store._data["sequence"])
    got = store.fetch(8, 18, "sequence")
    assert got.dtype == torch.int32 and torch.equal(got, torch.arange(8, 18, dtype=torch.int32))


def test_h5_rejects_unexpected_layout(tmp_path):
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f.create_group("sequence").create_dataset("chunk_0", data=np.arange(3))
    with pytest.raises(ValueError, match="chunk_0"):
        H5Store().load(tmp_path)


def test_jsonl_reads_one_record_per_line_in_sorted_files(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"ids": [4, 5]}\n\n{"ids": [6]}\n')
    (tmp_path / "a.jsonl").write_text('{"ids": [1, 2, 3]}\n')
    (tmp_path / "config.json").write_text('{"ids": [99]}')  # not data: folders read only .jsonl
    store = JSONStore().load(tmp_path)
    assert torch.equal(store.fetch(0, 6, "ids"), torch.tensor([1, 2, 3, 4, 5, 6]))
    assert [len(s) for s in store._data["ids"]] == [3, 2, 1]  # one segment per record


def test_a_json_document_is_a_list_of_records_or_a_dict_of_columns(tmp_path):
    (tmp_path / "records.json").write_text('[{"ids": [1, 2, 3], "m": [1, 0, 1]},\n {"ids": [4], "m": [1]}]')
    (tmp_path / "columns.json").write_text('{\n  "ids": [[1, 2, 3], [4]],\n  "m": [[1, 0, 1], [1]]\n}')
    (tmp_path / "lines.json").write_text('{"ids": [1, 2, 3], "m": [1, 0, 1]}\n{"ids": [4], "m": [1]}\n')
    for name in ("records.json", "columns.json", "lines.json"):
        store = JSONStore().load(tmp_path / name)
        assert store.fetch(0, 4, "ids").tolist() == [1, 2, 3, 4] and store.fetch(0, 4, "m").tolist() == [1, 0, 1, 1]
        assert [len(s) for s in store._data["ids"]] == [3, 1]  # one segment per record
        assert StoreFactory.detect(tmp_path / name) == "json"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"ids": [[1], [2]], "m": [[1]]}', r"bad\.json: columns have different lengths"),
        ('{"ids": 3}', r"bad\.json: a dict of columns needs a list per key"),
        ("[1, 2]", r"bad\.json\[0\]: a record must be a non-empty JSON object"),
        ('"text"', r"bad\.json: must hold a list of records or a dict of columns"),
        ('[{"ids": [1]}, {"x": [1]}]', r"bad\.json\[1\]: record keys \['x'\] differ"),
        ("[{", r"bad\.json: not a JSON document"),
    ],
)
def test_json_document_errors_name_the_file(tmp_path, text, message):
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        JSONStore().load(tmp_path / "bad.json")


def test_jsonl_text_is_tokenised_with_the_tokenizer(tmp_path):
    class ByteTokenizer:
        def encode(self, text):
            return list(text.encode("utf-8"))

    save_jsonl(tmp_path / "t.jsonl", [{"sequence": "hé"}, {"sequence": [1, 2]}])
    store = JSONStore().load(tmp_path, tokenizer=ByteTokenizer())
    assert store.fetch(0, 5, "sequence").tolist() == [104, 195, 169, 1, 2]
    with pytest.raises(ValueError, match=r"t\.jsonl:1: key 'sequence' holds text; pass a tokenizer"):
        JSONStore().load(tmp_path)


def test_jsonl_numbers_share_one_dtype_per_key(tmp_path):
    save_jsonl(tmp_path / "r.jsonl", [{"r": [1, 2]}, {"r": []}, {"r": [0.5]}])
    assert torch.equal(JSONStore().load(tmp_path).fetch(0, 3, "r"), torch.tensor([1.0, 2.0, 0.5]))


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ('{"a": [1]}\n{"a": [1]\n', r"bad\.jsonl:2: not a JSON record"),
        ('{"a": [1]}\n[1, 2]\n', r"bad\.jsonl:2: a record must be a non-empty JSON object"),
        ('{"a": [1]}\n{"b": [1]}\n', r"bad\.jsonl:2: record keys \['b'\] differ from \['a'\]"),
        ('{"a": 3}\n', r"bad\.jsonl:1: key 'a' must be a list or text"),
        ('{"a": [[1, 2], [3]]}\n', r"bad\.jsonl:1: key 'a' is not a rectangular list"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, lines, message):
    (tmp_path / "bad.jsonl").write_text(lines)
    with pytest.raises(ValueError, match=message):
        JSONStore().load(tmp_path)


def test_mmap_layout_offsets_and_multi_dimensional_rows(tmp_path):
    prompts = [torch.arange(6).view(2, 3), torch.arange(6, 9).view(1, 3)]
    rewards = [torch.tensor([[1.0, 0.0], [0.5, 0.5]]), torch.tensor([[0.0, 1.0]])]
    save_mmap(tmp_path, {"prompts": prompts, "rewards": rewards})
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["prompts"] == {"dtype": "int64", "shape": [3, 3], "offsets": [0, 2, 3]}
    assert meta["rewards"] == {"dtype": "float32", "shape": [3, 2], "offsets": [0, 2, 3]}
    assert (tmp_path / "prompts.bin").read_bytes() == np.arange(9, dtype="<i8").tobytes()
    store = MmapStore().load(tmp_path)
    assert len(store) == 3 and store.row_shape("prompts") == (3,) and store.row_shape("rewards") == (2,)
    assert torch.equal(store.fetch(1, 3, "prompts"), torch.tensor([[3, 4, 5], [6, 7, 8]]))
    assert torch.equal(store.fetch(2, 3, "rewards"), torch.tensor([[0.0, 1.0]]))


def test_mmap_without_offsets_is_one_segment(tmp_path):
    np.arange(7, dtype="<u2").tofile(tmp_path / "sequence.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"sequence": {"dtype": "uint16", "shape": [7]}}))
    store = MmapStore().load(tmp_path)
    assert len(store._data["sequence"]) == 1
    assert store.fetch(2, 5, "sequence").tolist() == [2, 3, 4]


def test_mmap_errors_name_the_file(tmp_path):
    save_mmap(tmp_path, {"sequence": [np.arange(4)]})
    (tmp_path / "sequence.bin").write_bytes(b"\0" * 8)
    with pytest.raises(ValueError, match=r"sequence\.bin.*expected 32 bytes.*got 8"):
        MmapStore().load(tmp_path)
    (tmp_path / "sequence.bin").unlink()
    with pytest.raises(ValueError, match=r"sequence\.bin.*missing"):
        MmapStore().load(tmp_path)
    with pytest.raises(ValueError, match="one dtype and row shape"):
        save_mmap(tmp_path, {"x": [np.arange(2), np.ones(2)]})


def test_detect_rejects_empty_missing_unknown_and_ambiguous_paths(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no loadable data at .*empty"):
        StoreFactory.detect(tmp_path / "empty")
    with pytest.raises(ValueError, match="does not exist"):
        StoreFactory.detect(tmp_path / "nowhere")
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"no loadable data at .*data\.txt"):
        StoreFactory.detect(tmp_path / "data.txt")
    save_h5(tmp_path / "mixed", {"sequence": [torch.arange(3)]})
    save_jsonl(tmp_path / "mixed" / "x.jsonl", [{"sequence": [1, 2, 3]}])
    with pytest.raises(ValueError, match=r"several storage types \['h5', 'json'\]"):
        StoreFactory.detect(tmp_path / "mixed")
    with pytest.raises(ValueError, match="no .jsonl files"):
        JSONStore().load(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown store 'bin'"):
        StoreFactory.create("bin")


@pytest.mark.parametrize("kind", ["h5", "json", "mmap"])
def test_store_factory_create_by_storage_type(tmp_path, kind):
    path = write(kind, tmp_path / kind, {"sequence": SEQUENCE})
    store = StoreFactory.create(storage_type=kind)  # the architecture document's keyword
    assert type(store) is {"h5": H5Store, "json": JSONStore, "mmap": MmapStore}[kind] and len(store) == 0
    assert store.load(path).fetch(3, 9, "sequence").tolist() == list(range(3, 9))
    with pytest.raises(ValueError, match="unexpected argument"):
        StoreFactory.create(kind, compression="gzip")  # a misspelt or unknown keyword is an error


@pytest.mark.parametrize("kind", ["h5", "mmap"])
def test_file_backed_stores_pickle_as_their_path(tmp_path, kind):
    data = {"sequence": [torch.arange(50_000)]}
    store = StoreFactory.create(kind).load(write(kind, tmp_path, data))
    blob = pickle.dumps(store)
    assert len(blob) < 1_000  # the data (400 kB) is not in the pickle
    clone = pickle.loads(blob)
    assert torch.equal(clone.fetch(100, 200, "sequence"), torch.arange(100, 200))


@pytest.mark.parametrize(
    ("record", "kind"),
    [
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "sft"),
        ({"text": "plain text"}, "text"),
        ({"prompt": "p", "chosen": "c", "rejected": "r"}, "dpo"),
    ],
)
def test_raw_records_are_not_a_store_and_say_to_build_one(tmp_path, record, kind):
    from astrai.dataset import DatasetFactory

    save_jsonl(tmp_path / "raw.jsonl", [record])
    with pytest.raises(
        ValueError,
        match=rf"raw\.jsonl:1: .* holds raw records .* not a built store; run `astrai data build --kind {kind} ",
    ):
        DatasetFactory.load("sft", tmp_path / "raw.jsonl", window_size=4, tokenizer=lambda text: [1, 2])
