"""`train_bpe_tokenizer`: train a byte-level BPE tokenizer with special tokens and a ChatML chat template.

The result is what `astrai data tokenizer` and the quick start use:
- byte-level BPE over NFC-normalised text (GPT-2 / Qwen pre-tokenisation, no prefix space), so any text
  encodes without an unknown token and decodes back exactly;
- special tokens first, in a fixed order: bos, eos, pad (default "<|bos|>", "<|eos|>", "<|pad|>"), then
  "<|im_start|>", "<|im_end|>" for the chat format, then any `additional_special_tokens`;
- `encode(text)` prepends bos (a template post-processor, so transformers does the same);
- a ChatML chat template: `<|bos|><|im_start|>role\\n...<|im_end|>\\n`, so `stop_ids` = [eos, <|im_end|>].
Training is deterministic: the same input gives the same `tokenizer.json` byte for byte.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from astrai.tokenize.tokenizer import AutoTokenizer

DEFAULT_SPECIAL_TOKENS = {"bos": "<|bos|>", "eos": "<|eos|>", "pad": "<|pad|>"}
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")

CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_bpe_tokenizer(
    files_or_iterator: str | os.PathLike | Sequence[str | os.PathLike] | Iterable[str],
    vocab_size: int,
    special_tokens: Mapping[str, str] = DEFAULT_SPECIAL_TOKENS,
    min_frequency: int = 2,
    additional_special_tokens: Sequence[str] = (),
) -> AutoTokenizer:
    """Train on text files or on an iterator of texts.

    `files_or_iterator`: a path or a list/tuple of paths (UTF-8 text files), or any other iterable of
    strings (pass `iter(texts)` to train on a list of texts). `special_tokens` maps "bos", "eos", "pad"
    (and optionally "unk") to token strings; bos and eos are required.
    """
    unknown = sorted(set(special_tokens) - {"bos", "eos", "pad", "unk"})
    if unknown or not {"bos", "eos"} <= special_tokens.keys():
        raise ValueError(f"special_tokens needs 'bos' and 'eos' and allows 'pad', 'unk'; got {dict(special_tokens)}")
    named = [special_tokens[n] for n in ("bos", "eos", "pad", "unk") if n in special_tokens]
    all_special = list(dict.fromkeys([*named, *CHAT_TOKENS, *additional_special_tokens]))
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(all_special) + len(alphabet):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the {len(alphabet)} byte symbols and "
            f"{len(all_special)} special tokens alone need {len(all_special) + len(alphabet)}"
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=all_special,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    files = _as_files(files_or_iterator)
    if files is None:
        tokenizer.train_from_iterator(files_or_iterator, trainer)
    else:
        tokenizer.train(files, trainer)

    bos = special_tokens["bos"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    return AutoTokenizer(
        tokenizer,
        bos_token=bos,
        eos_token=special_tokens["eos"],
        pad_token=special_tokens.get("pad"),
        unk_token=special_tokens.get("unk"),
        chat_template=CHATML_TEMPLATE,
    )


def _as_files(source: object) -> list[str] | None:
    """The training files when `source` names files (a path, or a list/tuple of paths), else None."""
    if isinstance(source, (str, os.PathLike)):
        paths = [source]
    elif isinstance(source, (list, tuple)):
        paths = list(source)
    else:
        return None
    for path in paths:
        if not Path(path).is_file():
            raise ValueError(f"training file {str(path)[:200]!r} not found (to train on texts, pass iter(texts))")
    return [str(p) for p in paths]
