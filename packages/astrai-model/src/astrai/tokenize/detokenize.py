"""`IncrementalDetokenizer`: turn a stream of token ids into a stream of text pieces.

Decoding each token alone breaks text: a byte-level BPE token may hold half of a UTF-8 character (CJK,
emoji), and SentencePiece-style decoders drop the leading space of the first token they see. So we use
the prefix-offset technique of vLLM and TGI: keep two offsets into the ids,

    ids:  ........ [prefix_offset ........ read_offset) [new tokens ...)
                    text already emitted, kept as context

decode `ids[prefix_offset:read_offset]` and `ids[prefix_offset:]`, and emit the difference. While the
longer decode ends in U+FFFD (an incomplete character) nothing is emitted and the offsets stay, so the
missing bytes can arrive with later tokens. The concatenated pieces equal `decode(all ids)`.
"""

from __future__ import annotations

from collections.abc import Sequence

from astrai.tokenize.tokenizer import AutoTokenizer

_REPLACEMENT_CHAR = "\ufffd"
# Tokens of the prompt kept as decoding context for the first generated tokens (as vLLM / TGI do).
_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    """Push ids one by one; each `push` returns only the text completed by that id."""

    def __init__(self, tokenizer: AutoTokenizer, skip_special_tokens: bool = True, prompt_ids: Sequence[int] = ()):
        """`prompt_ids`: the ids the streamed ones continue; they give context and are never emitted."""
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids)
        self._read_offset = len(self.ids)
        self._prefix_offset = max(len(self.ids) - _PROMPT_CONTEXT, 0)

    def push(self, token_id: int) -> str:
        """Add one id; the newly completed text ("" while a character is incomplete or nothing shows)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self.ids))
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes to U+FFFD here, as `decode` gives it)."""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self.ids))
        self._prefix_offset = self._read_offset = len(self.ids)
        return new_text[len(prefix_text) :]

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=self.skip_special_tokens)
