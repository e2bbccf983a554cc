"""A model folder's `generation_config.json`: the special-token ids (bos, eos, pad) generation relies on.

transformers reads `eos_token_id` (an int, or a list of every id that ends a reply) from this file, and falls
back to the `*_token_id` fields of `config.json`, then to its family defaults (Llama: eos 2) when both lack
them. So an exported model must carry its tokenizer's ids in both, or `generate()` stops on the wrong token.

A loaded model keeps the file as `model.generation_config` (a plain dict; for a Hugging Face folder without
one, the ids of its `config.json`, as transformers does), and `save_pretrained` writes it back, with the ids
of the tokenizer it is given taking precedence: eos becomes the list of the tokenizer's stop ids (eos plus
end-of-turn markers such as `<|im_end|>`) when there are several. Other keys (Qwen3's sampling defaults,
...) pass through unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from astrai.config import read_json_object

GENERATION_CONFIG_FILE = "generation_config.json"
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
# Bookkeeping transformers adds on save; it describes the writer, not the model.
_WRITER_KEYS = ("transformers_version", "_from_model_config")


class SpecialTokenSource(Protocol):
    """What the export needs from a tokenizer (`astrai.tokenize.AutoTokenizer` is one)."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    stop_ids: list[int]

    def save_pretrained(self, save_path: str | Path) -> None: ...


def read_generation_config(folder: Path, hf_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """`folder/generation_config.json` (or {}), its missing token ids taken from a Hugging Face `config.json`."""
    path = folder / GENERATION_CONFIG_FILE
    generation = read_json_object(path) if path.is_file() else {}
    for key in TOKEN_ID_KEYS:
        source = path
        if generation.get(key) is None and (hf_config or {}).get(key) is not None:
            source, generation[key] = folder / "config.json", hf_config[key]
        if not _is_token_id(generation.get(key), allow_list=key == "eos_token_id"):
            raise ValueError(f"{source}: {key} must be a token id (eos: an id or a list), got {generation[key]!r}")
    return {k: v for k, v in generation.items() if k not in _WRITER_KEYS and v is not None}


def generation_config_with(
    generation: dict[str, Any], tokenizer: SpecialTokenSource | None, vocab_size: int | None
) -> dict[str, Any]:
    """`generation` with the tokenizer's bos / eos (its stop ids) / pad ids in place of the stored ones."""
    out = dict(generation)
    if tokenizer is None:
        return out
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {vocab_size}: "
            "they do not belong together"
        )
    stop_ids = list(tokenizer.stop_ids)
    ids = {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": stop_ids if len(stop_ids) > 1 else stop_ids[0] if stop_ids else None,
        "pad_token_id": tokenizer.pad_id,
    }
    out.update({key: value for key, value in ids.items() if value is not None})
    return out


def write_generation_config(folder: Path, generation: dict[str, Any]) -> None:
    """Write `generation_config.json` (nothing when there is nothing to say)."""
    if generation:
        text = json.dumps(generation, indent=2, ensure_ascii=False)
        (folder / GENERATION_CONFIG_FILE).write_text(text + "\n", encoding="utf-8")


def _is_token_id(value: Any, allow_list: bool) -> bool:
    if value is None:
        return True
    if allow_list and isinstance(value, list):
        return bool(value) and all(_is_token_id(v, allow_list=False) and v is not None for v in value)
    # any int: some published configs carry pad_token_id -1 ("none"), which must not stop them loading
    return isinstance(value, int) and not isinstance(value, bool)
