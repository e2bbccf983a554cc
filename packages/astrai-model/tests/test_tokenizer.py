"""AutoTokenizer on Hugging Face folders, compared token for token with transformers' AutoTokenizer.

The folders are written here: a Llama-3-style one by transformers' own `save_pretrained` (chat template in
chat_template.jinja, bos added by the post-processor, generation_config.json with two eos ids) and a
Qwen-style one by hand in the older transformers-4 layout (AddedToken dicts, added_tokens_decoder, named
chat templates, special_tokens_map.json).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from pydoc_data.topics import topics

import pytest
import transformers
from jinja2.exceptions import TemplateError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from astrai.tokenize import AutoTokenizer, ChatTemplate

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + strftime_now("%Y") + "\\n\\n" }}
{%- if tools is not none %}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception('Only user and assistant roles are supported!') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}"""

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role != 'system' or not loop.first %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}"""
QWEN_TOOL_TEMPLATE = """{{- '<|im_start|>system\\n# Tools\\n<tools>' }}
{%- for tool in tools or [] %}
    {{- '\\n' + tool | tojson }}
{%- endfor %}
{{- '\\n</tools><|im_end|>\\n' }}
{%- for message in messages %}
    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""

TEXTS = [
    "Hello world! The quick brown fox.",
    "  leading spaces and\ttabs\nand newlines  ",
    "你好，世界！こんにちは 🌍🚀 émigré naïve",
    "inline specials <|eot_id|> and <|im_end|> stay text or not",
    "",
]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2? 答えて 🙂"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 + 3?"},
]
TOOLS = [{"type": "function", "function": {"name": "add", "description": "加 two numbers", "parameters": {}}}]


def backend(specials: list[str], extra_text: list[str] = ()) -> Tokenizer:
    """A byte-level BPE (GPT-2 / Llama-3 / Qwen style) trained on CPython's help topics."""
    lines = [line for text in list(topics.values())[:60] for line in text.splitlines() if line.strip()]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([*lines, *extra_text, *TEXTS], trainer)
    return tokenizer


@pytest.fixture(scope="module")
def llama3_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama3")
    tokenizer = backend([*LLAMA3_SPECIALS, "<|eom_id|>"])
    bos = "<|begin_of_text|>"
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token="<|end_of_text|>", chat_template=LLAMA3_TEMPLATE
    )
    hf.save_pretrained(folder)
    eos_ids = [tokenizer.token_to_id("<|end_of_text|>"), tokenizer.token_to_id("<|eot_id|>")]
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": eos_ids}))
    return folder


def added_token(content: str, special: bool = True) -> dict:
    return dict(content=content, lstrip=False, normalized=False, rstrip=False, single_word=False, special=special)


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qwen")
    tokenizer = backend(QWEN_SPECIALS)
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.save(str(folder / "tokenizer.json"))
    n = tokenizer.get_vocab_size()
    config = {
        "add_prefix_space": False,
        # ids 0-2 exist in tokenizer.json; "<tool_call>" does not and must be appended as id n, "<pad>" after it.
        "added_tokens_decoder": {
            **{str(i): added_token(t) for i, t in enumerate(QWEN_SPECIALS)},
            str(n): added_token("<tool_call>", special=False),
        },
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": [
            {"name": "default", "template": QWEN_TEMPLATE},
            {"name": "tool_use", "template": QWEN_TOOL_TEMPLATE},
        ],
        "clean_up_tokenization_spaces": False,
        "eos_token": {"__type": "AddedToken", **added_token("<|im_end|>")},
        "model_max_length": 32768,
        "pad_token": "<pad>",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": tokenizer.token_to_id("<|im_end|>")}))
    return folder


def assert_same_as_transformers(folder: Path, chat_kwargs: list[dict]) -> tuple[AutoTokenizer, object]:
    ours = AutoTokenizer.from_pretrained(folder)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    assert ours.vocab_size == len(hf)
    for name in ("bos", "eos", "pad", "unk"):
        assert getattr(ours, f"{name}_token") == getattr(hf, f"{name}_token"), name
        assert getattr(ours, f"{name}_id") == getattr(hf, f"{name}_token_id"), name
    for text in TEXTS:
        for add_special_tokens in (True, False):
            ids = ours.encode(text, add_special_tokens=add_special_tokens)
            assert ids == hf.encode(text, add_special_tokens=add_special_tokens), (text, add_special_tokens)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    for kwargs in chat_kwargs:
        for add_generation_prompt in (False, True):
            for tokenize in (False, True):
                options = dict(kwargs, add_generation_prompt=add_generation_prompt, tokenize=tokenize)
                expected = hf.apply_chat_template(CHAT, **options)
                if tokenize and not isinstance(expected, list):  # transformers 5 returns a BatchEncoding
                    expected = expected["input_ids"]
                assert ours.apply_chat_template(CHAT, **options) == expected, options
    return ours, hf


def test_llama3_folder_saved_by_transformers(llama3_folder):
    assert (llama3_folder / "chat_template.jinja").is_file()  # transformers >= 4.50 layout
    ours, _ = assert_same_as_transformers(llama3_folder, [{}, {"tools": TOOLS}])
    ids = ours.encode("hi")
    assert ids[0] == ours.bos_id and ours.encode("hi", add_special_tokens=False) == ids[1:]
    # eos, then generation_config's ids, then the end-of-turn token the template writes. <|eom_id|> is in the
    # vocabulary but the template never writes it; bos is never a stop token.
    assert ours.stop_ids == [ours.eos_id, ours.token_to_id("<|eot_id|>")]


def test_llama3_template_errors_like_transformers(llama3_folder):
    ours = AutoTokenizer.from_pretrained(llama3_folder)
    with pytest.raises(TemplateError, match="Only user and assistant roles are supported"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


def test_qwen_folder_in_transformers4_layout(qwen_folder):
    ours, hf = assert_same_as_transformers(qwen_folder, [{}, {"tools": TOOLS}, {"chat_template": "tool_use"}])
    n = Tokenizer.from_file(str(qwen_folder / "tokenizer.json")).get_vocab_size()
    assert (ours.token_to_id("<tool_call>"), ours.token_to_id("<pad>")) == (n, n + 1)  # appended in that order
    assert ours.decode([n + 1]) == "" and ours.decode([n]) == "<tool_call>"  # special vs plain added token
    assert ours.stop_ids == [ours.token_to_id("<|im_end|>")]  # eos == <|im_end|>; pad and <|endoftext|> are not
    assert sorted(ours.chat_templates) == ["default", "tool_use"]
    assert ours.apply_chat_template(CHAT, tools=TOOLS).startswith("<|im_start|>system\n# Tools")
    assert "加 two numbers" in ours.apply_chat_template(CHAT, tools=TOOLS)  # tojson keeps non-ASCII text


def test_special_tokens_map_and_add_bos_token(tmp_path):
    tokenizer = backend(["<s>", "</s>"])  # no post-processor in tokenizer.json
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    ours, _ = assert_same_as_transformers(tmp_path, [])
    assert (ours.bos_id, ours.eos_id, ours.stop_ids, ours.chat_template) == (0, 1, [1], None)
    assert ours.encode("hi")[0] != ours.bos_id

    # With no post-processor in tokenizer.json the config's flags decide (transformers 5 ignores them).
    config = {"add_bos_token": True, "add_eos_token": True, "tokenizer_class": "PreTrainedTokenizerFast"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = AutoTokenizer.from_pretrained(tmp_path)
    plain = ours.encode("hi", add_special_tokens=False)
    assert ours.encode("hi") == [0, *plain, 1]


def test_save_pretrained_round_trip_is_read_identically_by_transformers(llama3_folder, tmp_path):
    ours = AutoTokenizer.from_pretrained(llama3_folder)
    (tmp_path / "chat_template.jinja").write_text("stale {{ messages }}")  # must not shadow what we write
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == LLAMA3_TEMPLATE and config["eos_token"] == "<|end_of_text|>"
    assert not (tmp_path / "chat_template.jinja").exists()
    reloaded, _ = assert_same_as_transformers(tmp_path, [{}])
    assert reloaded.backend_tokenizer.to_str() == ours.backend_tokenizer.to_str()
    # generation_config.json belongs to the model and is not written; the template still names <|eot_id|>.
    assert reloaded.stop_ids == ours.stop_ids


def test_named_templates_are_saved_as_a_list(qwen_folder, tmp_path):
    AutoTokenizer.from_pretrained(qwen_folder).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"]
    assert saved == [
        {"name": "default", "template": QWEN_TEMPLATE},
        {"name": "tool_use", "template": QWEN_TOOL_TEMPLATE},
    ]


def test_batches_token_strings_and_set_chat_template(qwen_folder):
    tok = AutoTokenizer.from_pretrained(qwen_folder)
    assert tok.encode(TEXTS[:2]) == [tok.encode(TEXTS[0]), tok.encode(TEXTS[1])]
    assert tok.decode([tok.encode(TEXTS[0]), tok.encode(TEXTS[1])]) == TEXTS[:2]
    pieces = tok.encode("Hello world", out_ids=False)
    assert "".join(pieces).replace("Ġ", " ") == "Hello world"
    tok.set_chat_template("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    assert tok.apply_chat_template([{"role": "user", "content": "a"}]) == "[a]"
    assert tok.stop_ids == [tok.eos_id]  # the new template writes no end-of-turn marker
    tok.set_chat_template(ChatTemplate("x", name="only"))
    assert tok.chat_template.name == "only" and tok.apply_chat_template([]) == "x"
    with pytest.raises(ValueError, match=r"chat_template='missing' is not one of \['only'\]"):
        tok.apply_chat_template([], chat_template="missing")
    tok.set_chat_template({"a": "A", "b": "B"})
    with pytest.raises(ValueError, match="none named 'default'"):
        tok.apply_chat_template([])
    with pytest.raises(TypeError, match="got int"):
        tok.set_chat_template(3)


def test_empty_tokenizer():
    tok = AutoTokenizer()
    assert tok.vocab_size == 0 and tok.bos_id is None and tok.stop_ids == [] and tok.chat_template is None
    with pytest.raises(RuntimeError, match="from_pretrained"):
        tok.encode("x")
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def write_folder(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir()
    backend(["<s>"]).save(str(folder / "tokenizer.json"))
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"tokenizer_config.json": "{not json"}, r"tokenizer_config.json is not valid JSON"),
        ({"tokenizer_config.json": "[1]"}, r"tokenizer_config.json must hold a JSON object, got list"),
        ({"tokenizer_config.json": '{"eos_token": 3}'}, r"tokenizer_config.json: eos_token must be a string"),
        ({"special_tokens_map.json": '{"bos_token": [1]}'}, r"special_tokens_map.json: bos_token must be a string"),
        ({"tokenizer_config.json": '{"chat_template": 3}'}, r"chat_template must be a string or a list"),
        ({"tokenizer_config.json": '{"chat_template": "{% if %}"}'}, r"chat template 'default' does not compile"),
        ({"generation_config.json": '{"eos_token_id": "2"}'}, r"generation_config.json: eos_token_id must be an int"),
        ({"tokenizer.json": "{}"}, r"tokenizer.json is not a valid tokenizers file"),
    ],
)
def test_corrupt_folders_name_the_file(tmp_path, files, message):
    folder = write_folder(tmp_path / "tok", files)
    with pytest.raises(ValueError, match=message):
        AutoTokenizer.from_pretrained(folder)


def test_missing_folder_or_tokenizer_json(tmp_path):
    with pytest.raises(ValueError, match=r"tokenizer folder .*nowhere does not exist"):
        AutoTokenizer.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"tokenizer.json not found"):
        AutoTokenizer().load(tmp_path)


def test_getattr_special_ids_and_backend_delegation(qwen_folder):
    """Architecture document: `__getattr__(name)` gives the special-token ids and the backend's attributes."""
    tok = AutoTokenizer.from_pretrained(qwen_folder)
    assert (tok.eos_id, tok.pad_id) == (tok.token_to_id("<|im_end|>"), tok.token_to_id("<pad>"))
    assert tok.bos_id is None and tok.stop_ids == [tok.eos_id]
    tok.sep_token = "<|im_start|>"
    assert tok.sep_id == tok.token_to_id("<|im_start|>")
    assert tok.get_vocab() == tok.backend_tokenizer.get_vocab()  # delegated to tokenizers.Tokenizer
    assert tok.get_vocab_size() == tok.vocab_size and tok.normalizer is tok.backend_tokenizer.normalizer
    with pytest.raises(AttributeError, match="'AutoTokenizer' object has no attribute 'cls_id'"):
        _ = tok.cls_id
    with pytest.raises(AttributeError, match="no vocabulary loaded"):
        AutoTokenizer().get_vocab()
    assert copy.copy(tok).get_vocab() == tok.get_vocab()  # copy probes dunders on a bare instance
