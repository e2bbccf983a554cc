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


# ---------------------------------------------------------------- TRL's dataset formats


def ids_of(out, key="sequence", index=0):
    return out.data[key][index].tolist()


def test_standard_prompt_completion_trains_only_the_completion(tok):
    out = convert_records("sft", numbered([{"prompt": "The sky is", "completion": " blue."}]), tok)
    head = [tok.bos_id, *tok.encode("The sky is", add_special_tokens=False)]
    reply = [*tok.encode(" blue.", add_special_tokens=False), tok.eos_id]
    assert ids_of(out) == head + reply
    assert ids_of(out, "loss_mask") == [False] * len(head) + [True] * len(reply)
    assert out.trained == len(reply) and out.tokens == len(head) + len(reply)


def test_conversational_prompt_completion_trains_only_the_completion(tok):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What color is the sky?"}]
    as_list = {"prompt": prompt, "completion": [{"role": "assistant", "content": "It is blue."}]}
    out = convert_records("sft", numbered([as_list, {**as_list, "completion": "It is blue."}]), tok)
    head = tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)
    ids, mask = np.array(ids_of(out)), np.array(ids_of(out, "loss_mask"))
    assert ids[: len(head)].tolist() == head and not mask[: len(head)].any()
    assert decode(tok, ids[len(head) :]) == "It is blue." + END and mask[len(head) :].all()  # the "\n" after it is cut
    assert ids_of(out, index=1) == ids.tolist()  # an assistant turn given as its text is the same record
    # A whole conversation trains the same tokens, with the template's trailing newline untrained.
    chat = convert_records("sft", numbered([{"messages": prompt + as_list["completion"]}]), tok)
    assert ids_of(chat)[: len(ids)] == ids.tolist() and ids_of(chat, "loss_mask")[: len(ids)] == mask.tolist()


def test_text_in_sft_trains_every_token_and_messages_in_text_are_documents(tok):
    out = convert_records("sft", numbered([{"text": "Plain text."}]), tok)
    assert ids_of(out) == tok.encode("Plain text.") + [tok.eos_id] and all(ids_of(out, "loss_mask"))
    out = convert_records("text", numbered([{"messages": CHAT[1:3]}]), tok)
    assert decode(tok, ids_of(out)) == tok.apply_chat_template(CHAT[1:3]) + "<|eos|>"


def pair_texts(tok, out, index=0):
    """(prompt, chosen completion, rejected completion) of pair `index`, decoded."""
    c, cm = out.data["chosen"][index], out.data["chosen_mask"][index]
    r, rm = out.data["rejected"][index], out.data["rejected_mask"][index]
    start = int(np.argmax(cm))
    return decode(tok, c[:start]), decode(tok, c[cm]), decode(tok, r[rm])


def test_preference_with_an_implicit_prompt_splits_off_the_common_prefix(tok):
    records = [
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},  # TRL's standard implicit-prompt example
        {
            "chosen": [
                {"role": "user", "content": "What color is the sky?"},
                {"role": "assistant", "content": "It is blue."},
            ],
            "rejected": [
                {"role": "user", "content": "What color is the sky?"},
                {"role": "assistant", "content": "It is green."},
            ],
        },
    ]
    out = convert_records("dpo", numbered(records), tok)
    # As TRL's extract_prompt: the space before the cut goes with the completions.
    assert pair_texts(tok, out, 0) == ("<|bos|>The sky is", " blue.<|eos|>", " green.<|eos|>")
    explicit = convert_records(
        "dpo", numbered([{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}]), tok
    )
    assert ids_of(out, "chosen", 0)[: len(ids_of(explicit, "chosen"))] == ids_of(explicit, "chosen")
    head = tok.apply_chat_template(records[1]["chosen"][:1], add_generation_prompt=True)
    assert pair_texts(tok, out, 1) == (head, "It is blue." + END, "It is green." + END)


def test_conversational_preference_with_explicit_prompt_takes_message_lists(tok):
    prompt = [{"role": "user", "content": "What color is the sky?"}]
    listed = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "It is blue."}],
        "rejected": [{"role": "assistant", "content": "It is green."}],
    }
    out = convert_records(
        "dpo", numbered([listed, {"prompt": prompt, "chosen": "It is blue.", "rejected": "It is green."}]), tok
    )
    for key in ("chosen", "rejected", "chosen_mask", "rejected_mask"):
        assert ids_of(out, key, 0) == ids_of(out, key, 1)
    assert pair_texts(tok, out) == (
        tok.apply_chat_template(prompt, add_generation_prompt=True),
        "It is blue." + END,
        "It is green." + END,
    )


@pytest.mark.parametrize(
    ("kind", "record", "message"),
    [
        (
            "sft",
            {"prompt": "p", "completion": [{"role": "assistant", "content": "c"}]},
            "is a list of messages but the prompt is a string",
        ),
        (
            "sft",
            {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "c"}]},
            "must start and end with an assistant turn",
        ),
        ("sft", {"question": "q"}, "an sft record needs 'messages', 'prompt' \\+ 'completion' or 'text'"),
        ("dpo", {"chosen": "same", "rejected": "same"}, "equal or one extends the other"),
        ("dpo", {"chosen": "text", "rejected": [{"role": "user", "content": "x"}]}, "both be strings or both lists"),
        ("dpo", {"chosen": CHAT[1:3], "rejected": CHAT[2:3]}, "share no leading message"),
        ("sft", {"messages": CHAT[1:3], "tools": "{not json"}, "key 'tools' is a string but not JSON"),
    ],
)
def test_format_errors_name_the_record(tok, kind, record, message):
    with pytest.raises(ValueError, match=f"mem:1: .*{message}"):
        convert_records(kind, numbered([record]), tok)


# ---------------------------------------------------------------- tool calls

# ChatML with tools, after Qwen2.5's template: the tools in a system turn, tool calls as <tool_call> JSON, and
# consecutive tool results grouped in one user turn (so a rendering ending in a tool result is not a prefix of
# one with a second result after it: the chat may only be cut around assistant turns).
TOOL_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user{% endif %}"
    "\n<tool_response>{{ m.content }}</tool_response>"
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>\n{% endif %}"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "light", "parameters": {"type": "object"}}}]
TOOL_CHAT = [
    {"role": "user", "content": "Lights on in the hall and the kitchen."},
    {
        "role": "assistant",
        "tool_calls": [
            {"type": "function", "function": {"name": "light", "arguments": {"room": "hall"}}},
            {"type": "function", "function": {"name": "light", "arguments": {"room": "kitchen"}}},
        ],
    },
    {"role": "tool", "name": "light", "content": "hall on"},
    {"role": "tool", "name": "light", "content": "kitchen on"},
    {"role": "assistant", "content": "Both are on."},
]


def with_template(tok, template):
    return AutoTokenizer(tok.backend_tokenizer, bos_token="<|bos|>", eos_token="<|eos|>", chat_template=template)


def test_tool_calls_and_results_are_rendered_by_the_template_and_only_assistant_turns_train(tok):
    tool_tok = with_template(tok, TOOL_TEMPLATE)
    out = convert_records("sft", numbered([{"messages": TOOL_CHAT, "tools": TOOLS}]), tool_tok)
    ids, mask = out.data["sequence"][0], out.data["loss_mask"][0]
    assert decode(tok, ids) == tool_tok.apply_chat_template(TOOL_CHAT, tools=TOOLS)
    calls = "".join(f"<tool_call>{json.dumps(c['function'])}</tool_call>" for c in TOOL_CHAT[1]["tool_calls"])
    assert decode(tok, ids[mask]) == calls + END + "Both are on." + END
    assert '"name": "light"' in decode(tok, ids[: np.argmax(mask)])  # the tools reached the system turn
    # tools given as JSON text (as datasets often stores them) are the same record.
    again = convert_records("sft", numbered([{"messages": TOOL_CHAT, "tools": json.dumps(TOOLS)}]), tool_tok)
    assert ids_of(again) == ids.tolist() and not out.refused


def test_a_template_that_drops_tool_calls_refuses_the_record_and_counts_it(tok):
    # The built-in ChatML template renders content only: tool calls and tools would vanish from the tokens.
    records = [
        {"messages": CHAT[1:3]},
        {"messages": [TOOL_CHAT[0], {**TOOL_CHAT[1], "content": ""}, TOOL_CHAT[2], TOOL_CHAT[4]]},
        {"messages": TOOL_CHAT},  # no content beside tool_calls: the template fails on it
        {"messages": CHAT[1:3], "tools": TOOLS},
    ]
    out = convert_records("sft", numbered(records), tok)
    assert out.records == 1 and len(out.data["sequence"]) == 1
    first, second, third = out.refused
    assert first == "mem:2: the chat template does not render the tool_calls of messages[1]"
    assert second.startswith("mem:3: the chat template cannot render the record's tool messages (")  # jinja's error
    assert third == "mem:4: the chat template does not render the record's tools"
    with pytest.raises(ValueError, match="all 1 records were refused; the first: mem:1: the chat template does not"):
        convert_records("sft", numbered(records[1:2]), tok)
    # A template that renders tool calls but drops tool results refuses those records too.
    drops_results = TOOL_TEMPLATE.replace("\n<tool_response>{{ m.content }}</tool_response>", "")
    drops_results = drops_results.replace("<|im_start|>user{% endif %}", "{% endif %}").replace(
        "<|im_end|>\n{% endif %}{% else %}", "{% endif %}{% else %}"
    )
    with pytest.raises(ValueError, match=r"mem:1: the chat template does not render messages\[2\] \(role 'tool'\)"):
        convert_records("sft", numbered([{"messages": TOOL_CHAT}]), with_template(tok, drops_results))
