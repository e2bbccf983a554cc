"""JSON Lines records to token arrays per kind: exact ids, loss masks located through the chat template,
padding, stores every dataset loads, and errors naming file:line and key."""

import functools
import json

import numpy as np
import pytest

from astrai.dataset import (
    ChatEncoder,
    DatasetFactory,
    builtin_texts,
    convert_records,
    corpus_records,
    read_records,
    read_texts,
    save_store,
)
from astrai.dataset.convert import BUILD_KINDS, DATASET_TYPES, STORE_TYPES
from astrai.tokenize import AutoTokenizer, train_bpe_tokenizer

END = "<|im_end|>"


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(iter(builtin_texts()), vocab_size=400)


def numbered(records):
    return [(f"mem:{i}", r) for i, r in enumerate(records, start=1)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def decode(tok, ids):
    return tok.decode([int(i) for i in ids], skip_special_tokens=False)


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is a tuple?"},
    {"role": "assistant", "content": "An immutable sequence."},
    {"role": "user", "content": "And a list?"},
    {"role": "assistant", "content": "   A mutable one.\n"},  # leading spaces: the pieces are tokenised apart
]


def test_text_documents_are_bos_text_eos(tok):
    out = convert_records("text", numbered([{"text": "Hello world."}, {"text": "Deux\n\nmots"}]), tok)
    assert [s.tolist() for s in out.data["sequence"]] == [
        [tok.bos_id, *tok.encode("Hello world.", add_special_tokens=False), tok.eos_id],
        [tok.bos_id, *tok.encode("Deux\n\nmots", add_special_tokens=False), tok.eos_id],
    ]
    assert out.records == 2 and out.tokens == out.trained == sum(len(s) for s in out.data["sequence"])


def test_sft_mask_covers_exactly_the_assistant_turns(tok):
    out = convert_records("sft", numbered([{"messages": CHAT}]), tok)
    [ids], [mask] = out.data["sequence"], out.data["loss_mask"]
    assert ids.dtype == np.int32 and mask.dtype == np.bool_ and ids.shape == mask.shape
    assert decode(tok, ids) == tok.apply_chat_template(CHAT)
    assert decode(tok, ids[mask]) == "An immutable sequence." + END + "   A mutable one.\n" + END
    # Two spans, each ending on <|im_end|>; the newline after it and everything else is context.
    starts, ends = np.flatnonzero(np.diff(mask.astype(int)) == 1) + 1, np.flatnonzero(np.diff(mask.astype(int)) == -1)
    assert len(starts) == len(ends) == 2
    assert all(ids[e] == tok.token_to_id(END) for e in ends)
    assert out.trained == int(mask.sum()) and out.tokens == len(ids)
    # Every prefix the template renders before an assistant turn tokenises to a prefix of the whole.
    for turns in (CHAT[:2], CHAT[:4]):
        head = tok.apply_chat_template(turns, tokenize=True, add_generation_prompt=True)
        assert ids[: len(head)].tolist() == head and mask[len(head)]


def test_sft_masks_of_the_builtin_corpus(tok):
    records = corpus_records("sft", limit=12, seed=0)
    out = convert_records("sft", numbered(records), tok)
    for record, ids, mask in zip(records, out.data["sequence"], out.data["loss_mask"]):
        replies = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        assert decode(tok, ids[mask]) == "".join(r + END for r in replies)
        assert ids[0] == tok.bos_id and not mask[0]


def test_dpo_pairs_mask_the_completions_and_share_one_length(tok):
    records = [
        {"prompt": [{"role": "user", "content": "Pick one."}], "chosen": "This one.", "rejected": "No."},
        {"prompt": "Raw text prompt:", "chosen": " yes", "rejected": " a longer rejected answer"},
    ]
    out = convert_records("dpo", numbered(records), tok)
    lengths = {len(a) for key in ("chosen", "rejected", "chosen_mask", "rejected_mask") for a in out.data[key]}
    assert len(lengths) == 1  # windows of this length hold exactly one pair
    chat_head = tok.apply_chat_template(records[0]["prompt"], tokenize=True, add_generation_prompt=True)
    c, cm = out.data["chosen"][0], out.data["chosen_mask"][0]
    assert c[: len(chat_head)].tolist() == chat_head and not cm[: len(chat_head)].any()
    assert decode(tok, c[cm]) == "This one." + END
    assert decode(tok, out.data["rejected"][0][out.data["rejected_mask"][0]]) == "No." + END
    # A plain-text prompt is raw text after bos; its completions end with eos.
    raw_head = [tok.bos_id, *tok.encode("Raw text prompt:", add_special_tokens=False)]
    r, rm = out.data["rejected"][1], out.data["rejected_mask"][1]
    assert r[: len(raw_head)].tolist() == raw_head
    assert decode(tok, r[rm]) == " a longer rejected answer<|eos|>"
    assert (r[rm.sum() + len(raw_head) :] == tok.pad_id).all()  # right padding, masked out
    assert out.trained == sum(int(m.sum()) for key in ("chosen_mask", "rejected_mask") for m in out.data[key])


def test_completions_of_the_builtin_corpus_decode_exactly(tok):
    dpo = corpus_records("dpo", limit=10, seed=0)
    out = convert_records("dpo", numbered(dpo), tok)
    for record, c, cm, r, rm in zip(
        dpo, *(out.data[k] for k in ("chosen", "chosen_mask", "rejected", "rejected_mask"))
    ):
        assert decode(tok, c[cm]) == record["chosen"] + END and decode(tok, r[rm]) == record["rejected"] + END
    grpo = corpus_records("grpo", limit=4, seed=0)
    out = convert_records("grpo", numbered(grpo), tok)
    for record, ids, masks in zip(grpo, out.data["responses"], out.data["masks"]):
        assert [decode(tok, i[m]) for i, m in zip(ids[0], masks[0])] == [t + END for t in record["responses"]]


def test_grpo_groups_are_padded_to_fixed_shapes(tok):
    records = [
        {"prompt": [{"role": "user", "content": "2+2?"}], "responses": ["4", "five", "22"], "rewards": [1, 0, 0.5]},
        {
            "prompt": [{"role": "user", "content": "A much longer question?"}],
            "responses": ["a", "b", "c"],
            "rewards": [0, 0, 1],
        },
    ]
    out = convert_records("grpo", numbered(records), tok)
    prompts, pmasks = np.concatenate(out.data["prompts"]), np.concatenate(out.data["prompt_masks"])
    responses, masks = np.concatenate(out.data["responses"]), np.concatenate(out.data["masks"])
    assert prompts.shape == pmasks.shape and prompts.shape[0] == 2
    assert responses.shape == masks.shape and responses.shape[:2] == (2, 3)
    assert np.concatenate(out.data["rewards"]).tolist() == [[1.0, 0.0, 0.5], [0.0, 0.0, 1.0]]
    for i, record in enumerate(records):
        head = tok.apply_chat_template(record["prompt"], tokenize=True, add_generation_prompt=True)
        assert prompts[i][pmasks[i]].tolist() == head
        assert pmasks[i].tolist() == sorted(pmasks[i].tolist())  # left padding: False before True
        for g, text in enumerate(record["responses"]):
            assert decode(tok, responses[i, g][masks[i, g]]) == text + END
            assert masks[i, g].tolist() == sorted(masks[i, g].tolist(), reverse=True)  # right padding
    assert pmasks[0].sum() < pmasks.shape[1] == pmasks[1].sum()  # the longest prompt sets P


@pytest.mark.parametrize("store", STORE_TYPES)
def test_every_kind_loads_back_from_every_store(tok, tmp_path, store):
    for kind in BUILD_KINDS:
        out = convert_records(kind, numbered(corpus_records(kind, limit=6, seed=1)), tok)
        folder = tmp_path / f"{kind}-{store}"
        save_store(out.data, folder, store)
        if kind == "grpo":
            window = out.data["prompts"][0].shape[1] + out.data["responses"][0].shape[2]
        else:
            window = len(out.data[next(iter(out.data))][0])  # one record
        dataset = DatasetFactory.load(DATASET_TYPES[kind], folder, window_size=window)
        item = dataset[0]
        if kind == "dpo":  # one pair per window, exactly as written
            assert item["chosen"].tolist() == out.data["chosen"][0].tolist()
            assert item["rejected_mask"].tolist() == out.data["rejected_mask"][0].tolist()
        elif kind == "grpo":
            assert len(dataset) == 6
            assert item["response_ids"].tolist() == out.data["responses"][0][0].tolist()
            assert item["prompt_mask"].tolist() == out.data["prompt_masks"][0][0].tolist()
        else:
            first = out.data["sequence"][0]  # window = the first record; labels run one token past it
            assert item["input_ids"].tolist() == first.tolist()
            assert item["target_ids"][:-1].tolist() == first[1:].tolist()
            if kind == "sft":
                assert item["loss_mask"][:-1].tolist() == out.data["loss_mask"][0][1:].tolist()


def test_save_store_refuses_a_non_empty_output(tok, tmp_path):
    out = convert_records("text", numbered([{"text": "x"}]), tok)
    (tmp_path / "old.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an empty folder"):
        save_store(out.data, tmp_path, "mmap")
    with pytest.raises(ValueError, match="store='npz'"):
        save_store(out.data, tmp_path / "new", "npz")


@pytest.mark.parametrize(
    ("kind", "record", "message"),
    [
        ("text", {"body": "x"}, "missing key 'text'"),
        ("text", {"text": 3}, "key 'text' must be a string, got int"),
        ("sft", {"messages": "hi"}, "key 'messages' must be a non-empty list"),
        ("sft", {"messages": [{"role": "user"}]}, r"messages\[0\] must be an object with string 'role' and 'content'"),
        ("sft", {"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        ("dpo", {"prompt": "p", "chosen": "c"}, "missing key 'rejected'"),
        ("dpo", {"prompt": 5, "chosen": "c", "rejected": "r"}, "key 'prompt' must be a string"),
        ("grpo", {"prompt": "p", "responses": ["a", "b"], "rewards": [1.0]}, "2 responses but 1 rewards"),
        ("grpo", {"prompt": "p", "responses": ["a"], "rewards": ["1"]}, "key 'rewards' must be a list of numbers"),
        ("grpo", {"prompt": "p", "responses": [], "rewards": []}, "key 'responses' must be a non-empty list"),
    ],
)
def test_bad_records_name_file_line_and_key(tok, tmp_path, kind, record, message):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "fine", "messages": [], "prompt": "p"}, record])
    with pytest.raises(ValueError, match=f"in.jsonl:2: .*{message}"):
        convert_records(kind, [item for i, item in enumerate(read_records([path])) if i], tok)


def test_grpo_groups_must_have_equal_size(tok, tmp_path):
    good = {"prompt": "p", "responses": ["a", "b"], "rewards": [1, 0]}
    path = write_jsonl(tmp_path / "g.jsonl", [good, good, {**good, "responses": ["a"], "rewards": [1]}])
    with pytest.raises(ValueError, match=r"g.jsonl:3: a group of 1 responses; every record needs the first record's 2"):
        convert_records("grpo", read_records([path]), tok)


def test_a_template_that_does_not_extend_its_prefixes_is_an_error(tok):
    counting = "{% for m in messages %}[{{ messages | length }}]{{ m['content'] }}<|im_end|>{% endfor %}"
    odd = AutoTokenizer(tok.backend_tokenizer, bos_token="<|bos|>", eos_token="<|eos|>", chat_template=counting)
    with pytest.raises(ValueError, match="mem:1: the chat template does not render messages"):
        convert_records("sft", numbered([{"messages": CHAT[1:3]}]), odd)


def test_a_template_without_special_tokens_still_masks_exactly_the_reply(tok):
    # "th" then the generation prompt "e:" reads "the:", which BPE cuts differently from "th" + "e:". The
    # chat is cut only around assistant turns: the prompt is tokenised whole, as generation encodes it, and
    # the reply apart from it, so the reply's tokens are still exactly its own.
    glued = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}e:{% endif %}{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}e:{% endif %}"
    )
    odd = AutoTokenizer(tok.backend_tokenizer, bos_token="<|bos|>", eos_token="<|eos|>", chat_template=glued)
    encode = functools.partial(odd.encode, add_special_tokens=False)
    assert encode("the:") != encode("th") + encode("e:")
    chat = [{"role": "user", "content": "th"}, {"role": "assistant", "content": "is"}]
    out = convert_records("sft", numbered([{"messages": chat}]), odd)
    [ids], [mask] = out.data["sequence"], out.data["loss_mask"]
    assert ids.tolist() == [tok.bos_id, *encode("the:"), *encode("is")]
    assert decode(tok, ids[mask]) == "is"  # no stop token in the piece: all of it is the reply


def test_chat_encoder_without_eos_refuses_raw_text(tok):
    no_eos = AutoTokenizer(tok.backend_tokenizer, bos_token="<|bos|>")
    encoder = ChatEncoder(no_eos)
    with pytest.raises(ValueError, match="no eos token"):
        encoder.document("text")
    with pytest.raises(ValueError, match="no eos token"):
        encoder.completion("prompt", "reply", "mem:1")


def test_empty_input_and_unknown_kind_are_errors(tok, tmp_path):
    with pytest.raises(ValueError, match="no records"):
        convert_records("text", [], tok)
    with pytest.raises(ValueError, match="kind='chat'"):
        convert_records("chat", [], tok)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(ValueError, match="broken.jsonl:2: not a JSON record"):
        list(read_records([broken]))
    with pytest.raises(ValueError, match="missing.jsonl' does not exist"):
        list(read_records([tmp_path / "missing.jsonl"]))


def test_read_texts_reads_files_jsonl_and_folders(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text("second\n", encoding="utf-8")
    (tmp_path / "docs" / "a.txt").write_text("first\nline\n", encoding="utf-8")
    (tmp_path / "docs" / "skip.bin").write_text("not text", encoding="utf-8")
    write_jsonl(tmp_path / "docs" / "c.jsonl", [{"text": "third"}, {"text": "fourth"}])
    (tmp_path / "named.data").write_text("any suffix when named", encoding="utf-8")
    assert list(read_texts([tmp_path / "docs", tmp_path / "named.data"])) == [
        "first\nline\n",
        "second\n",
        "third",
        "fourth",
        "any suffix when named",
    ]
    with pytest.raises(ValueError, match="does not exist"):
        list(read_texts([tmp_path / "nope"]))
    write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"content": "x"}])
    with pytest.raises(ValueError, match="bad.jsonl:2: missing key 'text'"):
        list(read_texts([tmp_path / "bad.jsonl"]))
