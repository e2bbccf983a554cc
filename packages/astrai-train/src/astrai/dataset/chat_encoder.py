"""`ChatEncoder`: token ids and loss masks of documents, conversations, prompts and completions, through a
tokenizer and its chat template; `RefusedRecord`, for records the template cannot render faithfully.

Chat turns are located by rendering the chat template incrementally, never by searching the text: the chat
is rendered before each assistant turn (with the generation prompt) and after it, each rendering must
extend the previous one, and each rendered piece is tokenised on its own, so the ids of every prefix are a
prefix of the whole by construction. Only assistant turns are cut out; the messages between them (user,
system, tool results) are one piece, so templates that group consecutive tool results still render. An
assistant turn is exactly the ids of its piece; its loss mask runs to and including the turn's first stop
token (`<|im_end|>`), leaving what the template adds after it (a newline) untrained. Tokenising the reply
apart from the generation prompt is also what generation does (the prompt is encoded, the model's tokens
follow it): a reply starting with spaces or a newline is cut the same way in training and in use, where
encoding the whole text would merge it with the prompt's last newline. With templates that put special
tokens between messages (ChatML and the common chat formats) the other cuts fall on special tokens, where
whole-text and piecewise tokenisation agree. A prompt given as a plain string is raw text (no template),
and its completions end with EOS.

Tool use is passed to the template as transformers passes it: assistant messages keep their `tool_calls`,
`role: "tool"` messages their fields, and a record's `tools` (JSON schemas) is the template's `tools`. A
template that fails on them, or renders the same text with and without them (it drops them), cannot train
on the record: it is refused with `RefusedRecord`, which the converter counts instead of stopping.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from jinja2.exceptions import TemplateError

Message = dict[str, Any]
Messages = list[Message]
Tools = list[dict[str, Any]] | None


class RefusedRecord(ValueError):
    """A record whose tool calls, tool results or tools the chat template cannot render."""


class ChatEncoder:
    """Token ids of documents, conversations, prompts and completions, with a tokenizer and its chat template."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.eos_id: int | None = tokenizer.eos_id
        self.pad_id: int | None = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        self.stop_ids = set(tokenizer.stop_ids)

    def encode(self, text: str) -> list[int]:
        """The ids of `text` alone: special-token strings in it are recognised, none are added."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _with_bos(self, ids: list[int]) -> list[int]:
        bos = self.tokenizer.bos_id
        return ids if bos is None or ids[:1] == [bos] else [bos, *ids]

    def document(self, text: str) -> list[int]:
        """A text document as a stream segment: [bos] ids eos."""
        if self.eos_id is None:
            raise ValueError("the tokenizer has no eos token; text documents need one to mark where they end")
        return [*self._with_bos(self.encode(text)), self.eos_id]

    def _render(self, messages: Messages, generation_prompt: bool, tools: Tools = None) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, tools=tools
        )

    def _check_tools(self, messages: Messages, tools: Tools, where: str) -> None:
        """RefusedRecord unless the template renders every tool call, tool result and the tools given."""
        uses_tools = bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
        if not uses_tools:
            return
        try:
            if tools and self._render(messages, False, tools) == self._render(messages, False, None):
                raise RefusedRecord(f"{where}: the chat template does not render the record's tools")
            for i, m in enumerate(messages):
                if m.get("tool_calls"):
                    plain = {k: v for k, v in m.items() if k != "tool_calls"}
                    plain["content"] = plain.get("content") or ""
                    if self._render([*messages[:i], plain], False, tools) == self._render(
                        messages[: i + 1], False, tools
                    ):
                        raise RefusedRecord(
                            f"{where}: the chat template does not render the tool_calls of messages[{i}]"
                        )
                elif m["role"] == "tool" and self._render(messages[:i], False, tools) == self._render(
                    messages[: i + 1], False, tools
                ):
                    raise RefusedRecord(f"{where}: the chat template does not render messages[{i}] (role 'tool')")
        except (TemplateError, TypeError) as exc:  # e.g. `'\n' + None` for an assistant turn with no content
            raise RefusedRecord(
                f"{where}: the chat template cannot render the record's tool messages ({exc})"
            ) from None

    def _pieces(self, messages: Messages, where: str, tools: Tools) -> Iterator[tuple[int, str, bool]]:
        """`(end, text, reply)`: the rendering cut before and after each assistant turn and at the end, where
        `end` is how many messages the rendering so far covers and `reply` marks assistant turns."""
        self._check_tools(messages, tools, where)
        cuts: list[tuple[int, bool, bool]] = []  # (messages rendered, generation prompt, piece is a reply)
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                cuts += [(i, True, False), (i + 1, False, True)]
        if not cuts or cuts[-1][0] != len(messages):
            cuts.append((len(messages), False, False))
        done, done_at = "", 0
        for end, generation_prompt, reply in cuts:
            text = self._render(messages[:end], generation_prompt, tools)
            if not text.startswith(done):
                raise ValueError(
                    f"{where}: the chat template does not render messages[:{end}] as an extension of "
                    f"messages[:{done_at}], so the assistant turns cannot be located"
                )
            yield end, text[len(done) :], reply
            done, done_at = text, end

    def _reply_mask(self, ids: list[int]) -> list[bool]:
        """True up to and including the first stop token (all True when the piece has none)."""
        end = next((k + 1 for k, t in enumerate(ids) if t in self.stop_ids), len(ids))
        return [k < end for k in range(len(ids))]

    def conversation(self, messages: Messages, where: str, tools: Tools = None) -> tuple[list[int], list[bool]]:
        """Ids of a whole conversation and its loss mask (True on assistant turns and their end tokens)."""
        ids: list[int] = []
        mask: list[bool] = []
        for _, text, reply in self._pieces(messages, where, tools):
            piece = self.encode(text)
            ids += piece
            mask += self._reply_mask(piece) if reply else [False] * len(piece)
        with_bos = self._with_bos(ids)
        return with_bos, [False] * (len(with_bos) - len(ids)) + mask

    def prompt(self, prompt: str | Messages, tools: Tools = None) -> list[int]:
        """Ids a completion follows: raw text, or messages rendered with the generation prompt."""
        text = prompt if isinstance(prompt, str) else self._render(prompt, True, tools)
        return self._with_bos(self.encode(text))

    def completion(
        self, prompt: str | Messages, completion: str | Messages, where: str, tools: Tools = None
    ) -> tuple[list[int], list[bool]]:
        """Ids of a completion of `prompt` through its last end token, and its loss mask.

        After raw text the completion is raw text plus EOS, all of it trained. After chat messages it is
        one assistant turn (a string) or messages starting and ending with assistant turns (tool calls and
        tool results between them): the ids the template renders after the prompt's generation prompt, cut
        after the last turn's first stop token; the mask is True on the assistant turns only.
        """
        if isinstance(prompt, str):
            if not isinstance(completion, str):
                raise ValueError(f"{where}: a plain-text prompt takes a string completion, got a list of messages")
            if self.eos_id is None:
                raise ValueError("the tokenizer has no eos token; completions of plain-text prompts need one")
            ids = [*self.encode(completion), self.eos_id]
            return ids, [True] * len(ids)
        turns = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
        ids: list[int] = []
        mask: list[bool] = []
        for end, text, reply in self._pieces([*prompt, *turns], where, tools):
            if end > len(prompt):  # the prompt's pieces, through its generation prompt, are `prompt()`
                piece = self.encode(text)
                ids += piece
                mask += self._reply_mask(piece) if reply else [False] * len(piece)
        last = max(k for k, m in enumerate(mask) if m) + 1 if any(mask) else 0
        return ids[:last], mask[:last]
