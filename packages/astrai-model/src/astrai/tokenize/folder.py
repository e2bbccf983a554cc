"""Reading the files of a tokenizer folder: ours and Hugging Face's are the same format.

A folder holds `tokenizer.json` (the `tokenizers` library's serialisation, required) and optionally
`tokenizer_config.json` (special tokens as strings or AddedToken dicts, `added_tokens_decoder`,
`add_bos_token` / `add_eos_token`, `chat_template` as a string or a list of `{"name", "template"}`),
`special_tokens_map.json` (older transformers), `chat_template.jinja` plus
`additional_chat_templates/<name>.jinja` (transformers >= 4.50 writes templates there; when present they
replace the config's `chat_template`, as in transformers) and `generation_config.json` (whose
`eos_token_id`, an int or a list, names extra end-of-sequence tokens).
Every malformed file raises a `ValueError` naming it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"

# The named special tokens AutoTokenizer tracks, in transformers' order (which decides the ids of
# tokens that have to be added because tokenizer.json lacks them).
SPECIAL_TOKEN_NAMES = ("bos", "eos", "unk", "pad")


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_tokenizer(folder: Path) -> Tokenizer:
    """`folder/tokenizer.json` as a `tokenizers.Tokenizer`, with any stored padding/truncation switched off."""
    if not folder.is_dir():
        raise ValueError(f"tokenizer folder {folder} does not exist")
    path = folder / TOKENIZER_FILE
    if not path.is_file():
        raise ValueError(f"{path} not found: a tokenizer folder needs {TOKENIZER_FILE}")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception for every parse error
        raise ValueError(f"{path} is not a valid tokenizers file: {e}") from e
    # encode() returns exactly the text's ids; a padding or truncation setting saved by some tool must not
    # silently pad or cut them.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def token_content(value: Any, source: Path, key: str) -> str | None:
    """A special token given as a string or an AddedToken dict (`{"content": ...}`), or None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{source}: {key} must be a string or an AddedToken dict with 'content', got {value!r}")


def read_special_tokens(folder: Path, config: dict[str, Any]) -> dict[str, str | None]:
    """{"bos": ..., "eos": ..., "unk": ..., "pad": ...} from the config, falling back to special_tokens_map.json."""
    fallback = read_json(folder / SPECIAL_TOKENS_MAP_FILE)
    tokens = {}
    for name in SPECIAL_TOKEN_NAMES:
        key = f"{name}_token"
        if key in config:
            source, value = folder / CONFIG_FILE, config[key]
        else:
            source, value = folder / SPECIAL_TOKENS_MAP_FILE, fallback.get(key)
        tokens[name] = token_content(value, source, key)
    return tokens


def read_extra_special_tokens(folder: Path, config: dict[str, Any]) -> list[str]:
    """`additional_special_tokens` (transformers 4) / `extra_special_tokens` (transformers 5, list or dict)."""
    out = []
    for key in ("additional_special_tokens", "extra_special_tokens"):
        value = config.get(key) or []
        items = value.values() if isinstance(value, dict) else value
        out.extend(token_content(item, folder / CONFIG_FILE, key) for item in items)
    return [token for token in out if token is not None]


def read_chat_templates(folder: Path, config: dict[str, Any]) -> dict[str, str]:
    """{name: template source}; the unnamed template is "default"."""
    templates: dict[str, str] = {}
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        templates["default"] = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    if (folder / CHAT_TEMPLATE_DIR).is_dir():
        for path in sorted((folder / CHAT_TEMPLATE_DIR).glob("*.jinja")):
            templates[path.stem] = path.read_text(encoding="utf-8")
    if templates:
        return templates
    value = config.get("chat_template")
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(isinstance(t, dict) and {"name", "template"} <= t.keys() for t in value):
        return {t["name"]: t["template"] for t in value}
    raise ValueError(
        f"{folder / CONFIG_FILE}: chat_template must be a string or a list of {{'name', 'template'}} dicts, "
        f"got {type(value).__name__}"
    )


def read_generation_eos_ids(folder: Path) -> list[int]:
    """`eos_token_id` of generation_config.json as a list (it may be an int, a list or absent)."""
    path = folder / GENERATION_CONFIG_FILE
    value = read_json(path).get("eos_token_id")
    ids = [] if value is None else [value] if isinstance(value, int) else value
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{path}: eos_token_id must be an int or a list of ints, got {value!r}")
    return ids
