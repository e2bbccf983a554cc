"""`astrai data` through the `astrai` command: corpus -> tokenizer -> build -> dataset, and its errors."""

import importlib
import json
import re

import pytest

from astrai.dataset import DatasetFactory, corpus_records
from astrai.dataset.cli import KINDS, STORES
from astrai.dataset.convert import BUILD_KINDS, STORE_TYPES
from astrai.dataset.corpus import CORPUS_KINDS
from astrai.tokenize import AutoTokenizer

cli = importlib.import_module("astrai.cli.main")

ITEM_KEYS = {
    "text": {"input_ids", "target_ids"},
    "sft": {"input_ids", "target_ids", "loss_mask"},
    "dpo": {"chosen", "rejected", "chosen_mask", "rejected_mask"},
    "grpo": {"prompt_ids", "prompt_mask", "response_ids", "response_mask", "rewards"},
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    assert cli.main(["data", "tokenizer", "--builtin-corpus", "--vocab-size", "400", "--output", str(folder)]) == 0
    return folder


def test_the_cli_offers_what_the_library_does():
    assert KINDS == BUILD_KINDS == CORPUS_KINDS
    assert STORES == STORE_TYPES


def test_data_without_an_action_prints_help(capsys):
    assert cli.main(["data"]) == 2
    assert "tokenizer" in capsys.readouterr().out


def test_corpus_writes_the_records(tmp_path, capsys):
    out = tmp_path / "sft.jsonl"
    assert cli.main(["data", "corpus", "--kind", "sft", "--output", str(out), "--limit", "9", "--seed", "4"]) == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert records == corpus_records("sft", limit=9, seed=4)
    assert capsys.readouterr().out == f"astrai data corpus: 9 sft records -> {out}\n"


def test_tokenizer_trains_from_files_and_folders(tmp_path, capsys):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 50, encoding="utf-8")
    lines = [json.dumps({"text": f"record {i}: foxes and dogs"}) for i in range(30)]
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "tok"
    argv = ["data", "tokenizer", "--input", str(tmp_path / "texts"), str(tmp_path / "b.jsonl"), "--vocab-size", "300"]
    assert cli.main([*argv, "--output", str(out)]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.encode("the quick brown fox")
    assert ids[0] == tok.bos_id and tok.decode(ids) == "the quick brown fox"
    assert len(ids) < 8  # merges learnt from the files: far fewer tokens than the 19 bytes
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]).endswith("<|im_end|>\n")
    chars = 50 * 44 + sum(len(json.loads(line)["text"]) for line in lines)
    assert (
        capsys.readouterr().out
        == f"astrai data tokenizer: {tok.vocab_size} tokens trained on {chars:,} characters -> {out}\n"
    )


def test_tokenizer_needs_something_to_train_on(tmp_path, capsys):
    assert cli.main(["data", "tokenizer", "--vocab-size", "300", "--output", str(tmp_path / "t")]) == 2
    assert "nothing to train on" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "typo"}\n', encoding="utf-8")
    argv = ["data", "tokenizer", "--input", str(bad), "--vocab-size", "300", "--output", str(tmp_path / "t")]
    assert cli.main(argv) == 2
    assert "bad.jsonl:2: missing key 'text'" in capsys.readouterr().err


@pytest.mark.parametrize(("kind", "store"), [("text", "mmap"), ("sft", "h5"), ("dpo", "json"), ("grpo", "mmap")])
def test_corpus_build_load_end_to_end(tmp_path, tokenizer_dir, capsys, kind, store):
    data = tmp_path / f"{kind}.jsonl"
    assert cli.main(["data", "corpus", "--kind", kind, "--output", str(data), "--limit", "8"]) == 0
    out = tmp_path / "store"
    argv = ["data", "build", "--kind", kind, "--input", str(data), "--tokenizer", str(tokenizer_dir)]
    assert cli.main([*argv, "--output", str(out), "--store", store]) == 0
    summary = capsys.readouterr().out.splitlines()[-1]
    assert summary.startswith("astrai data build: 8 records, ")
    train_type = {"text": "seq"}.get(kind, kind)
    assert summary.endswith(f"-> {out} ({store} store, dataset type {train_type!r})")
    window = 16
    if kind == "dpo":  # the summary names the length a window must hold
        window = int(re.search(r"pairs of (\d+) tokens", summary).group(1))
    elif kind == "grpo":
        p, r = re.search(r"prompts of (\d+) \+ responses of (\d+) tokens", summary).groups()
        window = int(p) + int(r)
    dataset = DatasetFactory.load(train_type, out, window_size=window)
    assert len(dataset) >= (8 if kind in ("dpo", "grpo") else 1)
    item = dataset[len(dataset) - 1]
    assert set(item) == ITEM_KEYS[kind]
    if kind == "grpo":
        assert tuple(item["response_ids"].shape)[0] == 4 and item["rewards"].sum().item() == 1.0


def test_build_errors_name_the_line_and_leave_no_store(tmp_path, tokenizer_dir, capsys):
    data = tmp_path / "dpo.jsonl"
    data.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p", "chosen": "c"}\n')
    out = tmp_path / "store"
    argv = ["data", "build", "--kind", "dpo", "--input", str(data), "--tokenizer", str(tokenizer_dir)]
    assert cli.main([*argv, "--output", str(out)]) == 2
    assert f"{data}:2: missing key 'rejected'" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()
    (out / "meta.json").write_text("{}")
    assert cli.main([*argv, "--output", str(out)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err


QA = [{"question": f"What is {a} + {b}?", "answer": f" {a + b}."} for a, b in ((1, 2), (3, 4), (5, 6))]


def write_input(fmt, folder, records):
    """`records` written in format `fmt`; the path to pass to --input."""
    if fmt == "jsonl":
        path = folder / "qa.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    elif fmt == "json":
        path = folder / "qa.json"
        path.write_text(json.dumps(records), encoding="utf-8")
    elif fmt == "parquet":
        pa = pytest.importorskip("pyarrow")
        path = folder / "qa.parquet"
        pytest.importorskip("pyarrow.parquet").write_table(pa.Table.from_pylist(records), path)
    elif fmt == "arrow":  # a datasets shard: an Arrow IPC stream
        pa = pytest.importorskip("pyarrow")
        table = pa.Table.from_pylist(records)
        path = folder / "qa.arrow"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    else:
        path = folder / "saved"
        pytest.importorskip("datasets").Dataset.from_list(records).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "arrow", "saved"])
def test_build_reads_every_format_with_fields_mapped(tmp_path, tokenizer_dir, capsys, fmt):
    data = write_input(fmt, tmp_path, QA)
    out = tmp_path / "store"
    argv = ["data", "build", "--kind", "sft", "--input", str(data), "--tokenizer", str(tokenizer_dir)]
    argv += ["--field", "prompt=question", "--field", "completion=answer", "--output", str(out)]
    assert cli.main(argv) == 0
    summary = capsys.readouterr().out.splitlines()[-1]
    assert summary.startswith("astrai data build: 3 records, ") and "refused" not in summary
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    dataset = DatasetFactory.load("sft", out, window_size=4)
    ids = dataset.storage.fetch(0, len(dataset.storage), "sequence").tolist()
    mask = dataset.storage.fetch(0, len(dataset.storage), "loss_mask").tolist()
    # Prompt-completion trains only the completions: " 3.<|eos|>", " 7.<|eos|>", " 11.<|eos|>".
    assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == "".join(
        r["answer"] + "<|eos|>" for r in QA
    )
    assert tok.decode(ids) == "".join(r["question"] + r["answer"] for r in QA)


def test_build_counts_refused_tool_records_in_the_summary(tmp_path, tokenizer_dir, capsys):
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}
    tool_chat = [
        {"role": "user", "content": "1 + 2?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "name": "add", "content": "3"},
        {"role": "assistant", "content": "3."},
    ]
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    data = write_input("jsonl", tmp_path, [{"messages": plain}, {"messages": tool_chat}, {"messages": plain}])
    out = tmp_path / "store"
    argv = [
        "data",
        "build",
        "--kind",
        "sft",
        "--input",
        str(data),
        "--tokenizer",
        str(tokenizer_dir),
        "--output",
        str(out),
    ]
    assert cli.main(argv) == 0
    summary = capsys.readouterr().out.splitlines()[-1]
    assert summary.startswith("astrai data build: 2 records, ")
    assert summary.endswith(
        f"; 1 records refused (first: {data}:2: the chat template does not render the tool_calls of messages[1])"
    )


def test_build_names_the_extra_when_pyarrow_is_missing(tmp_path, tokenizer_dir, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "qa.parquet").write_bytes(b"PAR1")
    argv = [
        "data",
        "build",
        "--kind",
        "sft",
        "--input",
        str(tmp_path / "qa.parquet"),
        "--tokenizer",
        str(tokenizer_dir),
    ]
    assert cli.main([*argv, "--output", str(tmp_path / "store")]) == 2
    assert capsys.readouterr().err == (
        f"astrai data: error: reading Parquet ({tmp_path / 'qa.parquet'}) needs pyarrow: "
        "pip install 'astrai-train[hf-data]'\n"
    )


def test_build_rejects_a_bad_field(tmp_path, tokenizer_dir, capsys):
    argv = ["data", "build", "--kind", "sft", "--input", "x.jsonl", "--tokenizer", str(tokenizer_dir)]
    with pytest.raises(SystemExit):
        cli.main([*argv, "--output", str(tmp_path / "s"), "--field", "answer"])
    assert "expected NAME=COLUMN" in capsys.readouterr().err
