"""`AutoTokenizer`: a `tokenizers.Tokenizer` plus special tokens, stop tokens and chat templates.

It reads and writes Hugging Face tokenizer folders (see `folder.py`), and interprets them the way
transformers does, so `encode`, `decode` and `apply_chat_template` give exactly transformers' results on
the same folder: special tokens named in the config but missing from `tokenizer.json` are appended,
the post-processor of `tokenizer.json` decides which special tokens `encode` adds, and a rendered chat
is tokenised without adding special tokens again (the template writes them).

One deliberate difference: when `tokenizer.json` has no post-processor at all, the config's
`add_bos_token` / `add_eos_token` build one (as transformers 4's Llama tokenizer did); transformers 5
ignores those flags whenever a tokenizer.json exists, so on such a folder it adds nothing.

`stop_ids` are the end-of-sequence tokens only: `eos`, the `eos_token_id`s of generation_config.json,
and the end-of-turn markers (`<|im_end|>`, `<|eot_id|>`, ...) that the chat templates actually use.
Padding, unknown and begin-of-sequence tokens are never stop tokens.

Attributes this class does not define are looked up by `__getattr__` (the architecture document's dynamic
attributes): `<name>_id` is the id of a special token set as `<name>_token` (`bos_id`, `eos_id`, `pad_id` are
properties; `tok.sep_token = "<sep>"` makes `tok.sep_id` work too), and anything else is delegated to the
wrapped `tokenizers.Tokenizer` (`get_vocab()`, `get_vocab_size()`, `normalizer`, `add_tokens(...)`, ...).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateSyntaxError
from tokenizers import AddedToken, Tokenizer, processors

from astrai.tokenize.chat_template import ChatTemplate
from astrai.tokenize.folder import (
    CHAT_TEMPLATE_DIR,
    CHAT_TEMPLATE_FILE,
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    SPECIAL_TOKEN_NAMES,
    SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_FILE,
    read_chat_templates,
    read_extra_special_tokens,
    read_generation_eos_ids,
    read_json,
    read_special_tokens,
    read_tokenizer,
)

# End-of-turn markers of common chat formats (ChatML, Llama 3, Phi-3, Gemma, OpenChat). One counts as a
# stop token when a chat template of the tokenizer writes it and the vocabulary holds it.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>")


class AutoTokenizer:
    """Text <-> token ids, special tokens and chat rendering; `from_pretrained(path)` to load a folder."""

    def __init__(
        self,
        tokenizer: Tokenizer | None = None,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | ChatTemplate | Mapping[str, str] | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self._templates: dict[str, ChatTemplate] = {}
        self._generation_eos_ids: list[int] = []
        if chat_template is not None:
            self.set_chat_template(chat_template)

    # ---------------------------------------------------------------- folders

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> AutoTokenizer:
        return cls().load(path)

    def load(self, path: str | os.PathLike) -> AutoTokenizer:
        """Replace this tokenizer's state with the folder's; returns self."""
        folder = Path(path)
        tokenizer = read_tokenizer(folder)
        config = read_json(folder / CONFIG_FILE)
        specials = read_special_tokens(folder, config)
        _add_missing_tokens(tokenizer, config, specials, read_extra_special_tokens(folder, config))
        if tokenizer.post_processor is None and ("add_bos_token" in config or "add_eos_token" in config):
            tokenizer.post_processor = _bos_eos_processor(tokenizer, specials, config)
        templates = {}
        for name, source in read_chat_templates(folder, config).items():
            try:
                templates[name] = ChatTemplate(source, name)
            except TemplateSyntaxError as e:
                raise ValueError(f"{folder}: chat template {name!r} does not compile: {e}") from e

        self._tokenizer = tokenizer
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = (specials[n] for n in SPECIAL_TOKEN_NAMES)
        self._templates = templates
        self._generation_eos_ids = read_generation_eos_ids(folder)
        return self

    def save_pretrained(self, save_path: str | os.PathLike) -> None:
        """Write tokenizer.json, tokenizer_config.json (special tokens, chat templates) and special_tokens_map.json,
        readable by transformers 4 and 5; the generation_config.json eos ids it was loaded with go there too."""
        tokenizer = self._require()
        folder = Path(save_path)
        folder.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(folder / TOKENIZER_FILE))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            # transformers 4 would otherwise "clean up" spaces before punctuation when decoding.
            "clean_up_tokenization_spaces": False,
        }
        specials = {f"{n}_token": t for n in SPECIAL_TOKEN_NAMES if (t := getattr(self, f"{n}_token")) is not None}
        config.update(specials)
        if list(self._templates) == ["default"]:
            config["chat_template"] = self._templates["default"].template_str
        elif self._templates:
            config["chat_template"] = [{"name": t.name, "template": t.template_str} for t in self._templates.values()]
        # Template files take precedence over the config on load; stale ones must not shadow what we write.
        (folder / CHAT_TEMPLATE_FILE).unlink(missing_ok=True)
        for stale in (folder / CHAT_TEMPLATE_DIR).glob("*.jinja"):
            stale.unlink()
        _write_json(folder / CONFIG_FILE, config)
        # transformers 4 writes the special tokens a second time, as AddedToken dicts; older readers want it.
        _write_json(folder / SPECIAL_TOKENS_MAP_FILE, {key: self._added_token(t) for key, t in specials.items()})
        if self._generation_eos_ids:
            path = folder / GENERATION_CONFIG_FILE
            _write_json(path, {**read_json(path), "eos_token_id": self._generation_eos_ids})

    # ---------------------------------------------------------------- vocabulary

    @property
    def backend_tokenizer(self) -> Tokenizer:
        """The wrapped `tokenizers.Tokenizer`."""
        return self._require()

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (0 before anything is loaded)."""
        return 0 if self._tokenizer is None else self._tokenizer.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self._require().token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._require().id_to_token(token_id)

    @property
    def bos_id(self) -> int | None:
        return self._id_of(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self._id_of(self.eos_token)

    @property
    def unk_id(self) -> int | None:
        return self._id_of(self.unk_token)

    @property
    def pad_id(self) -> int | None:
        return self._id_of(self.pad_token)

    @property
    def stop_ids(self) -> list[int]:
        """End-of-sequence ids, in order: eos, generation_config eos ids, end-of-turn tokens the templates use."""
        ids = [self.eos_id, *self._generation_eos_ids]
        sources = [t.template_str for t in self._templates.values()]
        ids += [self._id_of(token) for token in END_OF_TURN_TOKENS if any(token in s for s in sources)]
        return list(dict.fromkeys(i for i in ids if i is not None))

    # ---------------------------------------------------------------- encode / decode

    def encode(
        self, tokens: str | Sequence[str], *, out_ids: bool = True, add_special_tokens: bool = True
    ) -> list[int] | list[str] | list[list[int]] | list[list[str]]:
        """Ids of a text (a list of texts gives a list of lists); `out_ids=False` gives token strings."""
        tokenizer = self._require()
        if isinstance(tokens, str):
            encoding = tokenizer.encode(tokens, add_special_tokens=add_special_tokens)
            return encoding.ids if out_ids else encoding.tokens
        encodings = tokenizer.encode_batch(list(tokens), add_special_tokens=add_special_tokens)
        return [e.ids if out_ids else e.tokens for e in encodings]

    def decode(
        self, tokens: Sequence[int] | Sequence[Sequence[int]], skip_special_tokens: bool = True
    ) -> str | list[str]:
        """Text of a list of ids (a list of lists gives a list of texts)."""
        tokenizer = self._require()
        if tokens and isinstance(tokens[0], Sequence):
            return tokenizer.decode_batch([list(t) for t in tokens], skip_special_tokens=skip_special_tokens)
        return tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------- chat

    @property
    def chat_template(self) -> ChatTemplate | None:
        """The template `apply_chat_template` uses when no name is given (None when there is none)."""
        return self._select_template(None, None) if self._templates else None

    @property
    def chat_templates(self) -> dict[str, ChatTemplate]:
        return dict(self._templates)

    def set_chat_template(self, template: str | ChatTemplate | Mapping[str, str]) -> None:
        """Replace the chat templates: one template (a string or `ChatTemplate`), or {name: source}."""
        if isinstance(template, str):
            self._templates = {"default": ChatTemplate(template)}
        elif isinstance(template, ChatTemplate):
            self._templates = {template.name: template}
        elif isinstance(template, Mapping):
            self._templates = {name: ChatTemplate(source, name) for name, source in template.items()}
        else:
            raise TypeError(f"chat template must be a str, ChatTemplate or mapping, got {type(template).__name__}")

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        tokenize: bool = False,
        add_generation_prompt: bool = False,
        *,
        system_prompt: str | None = None,
        chat_template: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> str | list[int]:
        """Render `messages` with the chat template; the ids of the rendering when `tokenize`.

        `chat_template` picks a template by name; with `tools` the "tool_use" template is preferred when
        there is one. The special tokens (`bos_token`, `eos_token`, ...) are template variables, and
        `extra` adds more (e.g. `enable_thinking=False`).
        """
        template = self._select_template(chat_template, tools)
        variables = {f"{n}_token": t for n in SPECIAL_TOKEN_NAMES if (t := getattr(self, f"{n}_token")) is not None}
        text = template.render(
            messages, system_prompt, add_generation_prompt=add_generation_prompt, tools=tools, **{**variables, **extra}
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def __getattr__(self, name: str) -> Any:
        """Called only for names not found normally: `<name>_id` of a `<name>_token`, else the backend's attribute."""
        # Private names never delegate: copy and pickle probe them on an instance whose __init__ has not run.
        if not name.startswith("_"):
            state = self.__dict__
            if name.endswith("_id") and f"{name[:-3]}_token" in state:
                return self._id_of(state[f"{name[:-3]}_token"])
            backend = state.get("_tokenizer")
            if backend is not None and hasattr(backend, name):
                return getattr(backend, name)
            if backend is None and hasattr(Tokenizer, name):
                raise AttributeError(f"AutoTokenizer.{name}: no vocabulary loaded (use AutoTokenizer.from_pretrained)")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ---------------------------------------------------------------- internals

    def _require(self) -> Tokenizer:
        if self._tokenizer is None:
            raise RuntimeError("AutoTokenizer has no vocabulary: use AutoTokenizer.from_pretrained(path) or load(path)")
        return self._tokenizer

    def _added_token(self, token: str) -> dict[str, Any]:
        """`token` as transformers writes an AddedToken (its flags from tokenizer.json when it is an added token)."""
        added = next((t for t in self._require().get_added_tokens_decoder().values() if t.content == token), None)
        flags = ("lstrip", "normalized", "rstrip", "single_word")
        return {"content": token, **{f: getattr(added, f) if added else False for f in flags}}

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None or self._tokenizer is None else self._tokenizer.token_to_id(token)

    def _select_template(self, name: str | None, tools: list[dict[str, Any]] | None) -> ChatTemplate:
        if not self._templates:
            raise ValueError("this tokenizer has no chat template; set one with set_chat_template(template)")
        if name is not None:
            if name not in self._templates:
                raise ValueError(f"chat_template={name!r} is not one of {sorted(self._templates)}")
            return self._templates[name]
        if tools is not None and "tool_use" in self._templates:
            return self._templates["tool_use"]
        if "default" in self._templates:
            return self._templates["default"]
        if len(self._templates) == 1:
            return next(iter(self._templates.values()))
        raise ValueError(
            f"several chat templates and none named 'default': pass chat_template=one of {sorted(self._templates)}"
        )

    def __repr__(self) -> str:
        specials = ", ".join(f"{n}_token={getattr(self, f'{n}_token')!r}" for n in SPECIAL_TOKEN_NAMES)
        return f"AutoTokenizer(vocab_size={self.vocab_size}, {specials}, chat_templates={sorted(self._templates)})"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _add_missing_tokens(
    tokenizer: Tokenizer, config: dict[str, Any], specials: dict[str, str | None], extras: list[str]
) -> None:
    """Append tokens the config declares but tokenizer.json lacks, in transformers' order (so ids agree)."""
    to_add: list[AddedToken] = []
    decoder = config.get("added_tokens_decoder") or {}
    for _, entry in sorted(decoder.items(), key=lambda item: int(item[0])):
        if tokenizer.token_to_id(entry["content"]) is None:
            options = {k: entry[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in entry}
            to_add.append(AddedToken(entry["content"], **options))
    seen = {t.content for t in to_add}
    for token in [*specials.values(), *extras]:
        if token is not None and token not in seen and tokenizer.token_to_id(token) is None:
            to_add.append(AddedToken(token, special=True))
            seen.add(token)
    if to_add:
        tokenizer.add_tokens(to_add)


def _bos_eos_processor(
    tokenizer: Tokenizer, specials: dict[str, str | None], config: dict[str, Any]
) -> processors.TemplateProcessing:
    """The post-processor transformers builds from add_bos_token / add_eos_token (a flag without its token is off)."""
    bos = specials["bos"] if config.get("add_bos_token") else None
    eos = specials["eos"] if config.get("add_eos_token") else None
    single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
    pair = " ".join([single, *([f"{bos}:1"] if bos else []), "$B:1", *([f"{eos}:1"] if eos else [])])
    special_tokens = [(t, tokenizer.token_to_id(t)) for t in (bos, eos) if t]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special_tokens)
