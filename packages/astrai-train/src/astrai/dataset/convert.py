"""JSON Lines records to token arrays for each training kind, and the store that holds them.

Records and the store keys they become (one segment per record):

- text: `{"text": str}` -> sequence `[bos] text eos`.
- sft: `{"messages": [{"role", "content"}, ...]}` -> sequence, loss_mask (True on assistant turns).
- dpo: `{"prompt": str or messages, "chosen": str, "rejected": str}` -> chosen, rejected, chosen_mask,
  rejected_mask (True on the completion tokens).
- grpo: `{"prompt": str or messages, "responses": [str] * G, "rewards": [number] * G}` -> prompts (1, P)
  left-padded, prompt_masks (1, P), responses (1, G, R) right-padded, masks (1, G, R), rewards (1, G).

Chat turns are located by rendering the chat template incrementally, never by searching the text: the
chat up to each message (with the generation prompt before an assistant turn) must render to a prefix
of the next rendering, and each rendered piece is tokenised on its own, so the ids of every prefix are
a prefix of the whole by construction. An assistant turn is exactly the ids of its piece; its loss mask
runs to and including the turn's first stop token (`<|im_end|>`), leaving what the template adds after
it (a newline) untrained. Tokenising the reply apart from the generation prompt is also what generation
does (the prompt is encoded, the model's tokens follow it): a reply starting with spaces or a newline is
cut the same way in training and in use, where encoding the whole text would merge it with the prompt's
last newline. With templates that put special tokens between messages (ChatML and the common chat
formats) the other cuts fall on special tokens, where whole-text and piecewise tokenisation agree.
A prompt given as a plain string is raw text (no template), and its completions end with EOS.

DPO pairs are padded to one length L (the longest pair), so windows of L rows hold exactly one pair; GRPO
prompts to the longest prompt P and responses to the longest response R. Padding uses the pad token (EOS
when there is none) and is False in every mask. Records are converted in memory before the store is
written.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from astrai.dataset.h5_store import save_h5
from astrai.dataset.json_store import read_jsonl, save_jsonl
from astrai.dataset.mmap_store import save_mmap
from astrai.dataset.store import list_files

BUILD_KINDS = ("text", "sft", "dpo", "grpo")
DATASET_TYPES = {"text": "seq", "sft": "sft", "dpo": "dpo", "grpo": "grpo"}  # kind -> DatasetFactory name
STORE_TYPES = ("mmap", "h5", "json")
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".jsonl")  # what `read_texts` reads from a folder
_PROGRESS_BYTES = 1 << 20  # inputs at least this large show a progress bar
_TEXT_CHUNK_CHARS = 1 << 20  # plain-text files are handed over in line-aligned pieces of about this size
Messages = list[dict[str, str]]


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

    def _render(self, messages: Messages, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _pieces(self, messages: Messages, where: str) -> Iterator[tuple[str, bool]]:
        """The conversation's rendering cut at each message (and generation prompt); True marks assistant turns."""
        done = ""
        for i, message in enumerate(messages):
            is_reply = message["role"] == "assistant"
            steps = [(self._render(messages[:i], True), False)] if is_reply else []
            steps.append((self._render(messages[: i + 1], False), is_reply))
            for text, reply in steps:
                if not text.startswith(done):
                    raise ValueError(
                        f"{where}: the chat template does not render messages[:{i + 1}] as an extension of "
                        f"messages[:{i}], so the assistant turns cannot be located"
                    )
                yield text[len(done) :], reply
                done = text

    def _reply_mask(self, ids: list[int]) -> list[bool]:
        """True up to and including the first stop token (all True when the piece has none)."""
        end = next((k + 1 for k, t in enumerate(ids) if t in self.stop_ids), len(ids))
        return [k < end for k in range(len(ids))]

    def conversation(self, messages: Messages, where: str) -> tuple[list[int], list[bool]]:
        """Ids of a whole conversation and its loss mask (True on assistant turns and their end tokens)."""
        ids: list[int] = []
        mask: list[bool] = []
        for text, reply in self._pieces(messages, where):
            piece = self.encode(text)
            ids += piece
            mask += self._reply_mask(piece) if reply else [False] * len(piece)
        with_bos = self._with_bos(ids)
        return with_bos, [False] * (len(with_bos) - len(ids)) + mask

    def prompt(self, prompt: str | Messages) -> list[int]:
        """Ids a completion follows: raw text, or messages rendered with the generation prompt."""
        text = prompt if isinstance(prompt, str) else self._render(prompt, True)
        return self._with_bos(self.encode(text))

    def completion(self, prompt: str | Messages, text: str, where: str) -> list[int]:
        """Ids of a reply to `prompt` through its end token: EOS after raw text, the first stop token after chat."""
        if isinstance(prompt, str):
            if self.eos_id is None:
                raise ValueError("the tokenizer has no eos token; completions of plain-text prompts need one")
            return [*self.encode(text), self.eos_id]
        *_, (piece, _) = self._pieces([*prompt, {"role": "assistant", "content": text}], where)
        ids = self.encode(piece)
        return [t for t, keep in zip(ids, self._reply_mask(ids)) if keep]


@dataclass
class Converted:
    """Arrays ready for a store writer, and counts for the summary."""

    data: dict[str, list[np.ndarray]] = field(default_factory=dict)  # key -> one segment per record
    records: int = 0
    tokens: int = 0  # real (not padding) tokens
    trained: int = 0  # tokens under a loss mask

    def add(self, **segments: Sequence[Any]) -> None:
        for key, value in segments.items():
            self.data.setdefault(key, []).append(value)


def read_records(files: Sequence[str | Path]) -> Iterator[tuple[str, dict[str, Any]]]:
    """`("file:line", record)` for each record of the JSON Lines `files`, with a progress bar for large inputs."""
    paths = [Path(f) for f in files]
    for path in paths:
        if not path.is_file():
            raise ValueError(f"input {str(path)!r} is not a file")
    large = sum(p.stat().st_size for p in paths) >= _PROGRESS_BYTES
    total = sum(_count_lines(p) for p in paths) if large else None
    with tqdm(total=total, unit=" records", desc="records", disable=not large) as bar:
        for path in paths:
            for item in read_jsonl(path):
                yield item
                bar.update()


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(_PROGRESS_BYTES), b""))


def read_texts(inputs: Sequence[str | Path]) -> Iterator[str]:
    """The texts of files and folders: `"text"` of each JSON Lines record, plain files in line-aligned pieces.

    A folder contributes its `TEXT_SUFFIXES` files, in sorted path order; a file named directly is read
    whatever its suffix.
    """
    for item in map(Path, inputs):
        if not item.exists():
            raise ValueError(f"input {str(item)!r} does not exist")
        for file in list_files(item, TEXT_SUFFIXES) if item.is_dir() else [item]:
            if file.suffix == ".jsonl":
                yield from (_string(record, "text", where) for where, record in read_records([file]))
                continue
            with file.open(encoding="utf-8") as f:
                chunk: list[str] = []
                size = 0
                for line in f:
                    chunk.append(line)
                    size += len(line)
                    if size >= _TEXT_CHUNK_CHARS:
                        yield "".join(chunk)
                        chunk, size = [], 0
                if chunk:
                    yield "".join(chunk)


def _string(record: dict[str, Any], key: str, where: str) -> str:
    if key not in record:
        raise ValueError(f"{where}: missing key {key!r} (record has {sorted(record)})")
    if not isinstance(record[key], str):
        raise ValueError(f"{where}: key {key!r} must be a string, got {type(record[key]).__name__}")
    return record[key]


def _messages(value: Any, key: str, where: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: key {key!r} must be a non-empty list of messages, got {value!r:.80}")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: {key}[{i}] must be an object with string 'role' and 'content', got {m!r:.80}")
    return value


def _prompt(record: dict[str, Any], where: str) -> str | Messages:
    if isinstance(record.get("prompt"), list):
        return _messages(record["prompt"], "prompt", where)
    return _string(record, "prompt", where)


def convert_records(kind: str, records: Iterable[tuple[str, dict[str, Any]]], tokenizer: Any) -> Converted:
    """Token arrays of `kind` (one of `BUILD_KINDS`) for `(where, record)` pairs, e.g. from `read_records`."""
    if kind not in BUILD_KINDS:
        raise ValueError(f"kind={kind!r}: allowed {list(BUILD_KINDS)}")
    enc = ChatEncoder(tokenizer)
    out = Converted()
    pairs: list[tuple[list[int], list[int], int]] = []  # dpo: chosen ids, rejected ids, prompt length
    groups: list[tuple[list[int], list[list[int]], list[float]]] = []  # grpo: prompt, responses, rewards
    for where, record in records:
        out.records += 1
        if kind == "text":
            out.add(sequence=np.array(enc.document(_string(record, "text", where)), dtype=np.int32))
        elif kind == "sft":
            ids, mask = enc.conversation(_messages(record.get("messages"), "messages", where), where)
            if not any(mask):
                raise ValueError(f"{where}: key 'messages' holds no assistant turn to train on")
            out.add(sequence=np.array(ids, dtype=np.int32), loss_mask=np.array(mask, dtype=bool))
        elif kind == "dpo":
            prompt = _prompt(record, where)
            head = enc.prompt(prompt)
            chosen, rejected = (
                enc.completion(prompt, _string(record, k, where), where) for k in ("chosen", "rejected")
            )
            pairs.append((head + chosen, head + rejected, len(head)))
        else:
            groups.append(_group(enc, record, where, groups[0][1] if groups else None))
    if kind == "dpo":
        _pad_pairs(out, pairs, enc.pad_id)
    elif kind == "grpo":
        _pad_groups(out, groups, enc.pad_id)
    else:
        out.tokens = sum(len(s) for s in out.data.get("sequence", []))
        out.trained = sum(int(m.sum()) for m in out.data["loss_mask"]) if kind == "sft" else out.tokens
    if not out.records:
        raise ValueError("the input holds no records")
    return out


def _group(enc: ChatEncoder, record: dict[str, Any], where: str, first: list[list[int]] | None) -> tuple:
    """One GRPO record's prompt ids, response ids and rewards; its group size must match the first record's."""
    prompt = _prompt(record, where)
    responses, rewards = record.get("responses"), record.get("rewards")
    if not isinstance(responses, list) or not responses or not all(isinstance(r, str) for r in responses):
        raise ValueError(f"{where}: key 'responses' must be a non-empty list of strings, got {responses!r:.80}")
    if not isinstance(rewards, list) or not all(
        isinstance(r, int | float) and not isinstance(r, bool) for r in rewards
    ):
        raise ValueError(f"{where}: key 'rewards' must be a list of numbers, got {rewards!r:.80}")
    if len(rewards) != len(responses):
        raise ValueError(f"{where}: {len(responses)} responses but {len(rewards)} rewards")
    if first is not None and len(responses) != len(first):
        raise ValueError(
            f"{where}: a group of {len(responses)} responses; every record needs the first record's {len(first)}"
        )
    return enc.prompt(prompt), [enc.completion(prompt, r, where) for r in responses], [float(r) for r in rewards]


def _padded(ids: list[int], length: int, pad_id: int, left: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """`ids` padded to `length` with `pad_id`, and the mask of the real tokens."""
    pad = length - len(ids)
    real = [True] * len(ids)
    if left:
        return np.array([pad_id] * pad + ids, dtype=np.int32), np.array([False] * pad + real)
    return np.array(ids + [pad_id] * pad, dtype=np.int32), np.array(real + [False] * pad)


def _pad_pairs(out: Converted, pairs: list[tuple[list[int], list[int], int]], pad_id: int) -> None:
    length = max((max(len(c), len(r)) for c, r, _ in pairs), default=0)
    for chosen, rejected, head in pairs:
        (c_ids, c_real), (r_ids, r_real) = _padded(chosen, length, pad_id), _padded(rejected, length, pad_id)
        c_real[:head] = r_real[:head] = False  # the prompt is context, not scored
        out.add(chosen=c_ids, rejected=r_ids, chosen_mask=c_real, rejected_mask=r_real)
        out.tokens += len(chosen) + len(rejected)
        out.trained += len(chosen) + len(rejected) - 2 * head


def _pad_groups(out: Converted, groups: list[tuple], pad_id: int) -> None:
    p_len = max((len(p) for p, _, _ in groups), default=0)
    r_len = max((len(r) for _, responses, _ in groups for r in responses), default=0)
    for prompt, responses, rewards in groups:
        p_ids, p_mask = _padded(prompt, p_len, pad_id, left=True)  # (P,): prompts end where responses begin
        padded = [_padded(r, r_len, pad_id) for r in responses]
        out.add(
            prompts=p_ids[None],  # (1, P)
            prompt_masks=p_mask[None],
            responses=np.stack([ids for ids, _ in padded])[None],  # (1, G, R)
            masks=np.stack([mask for _, mask in padded])[None],
            rewards=np.array([rewards], dtype=np.float32),  # (1, G)
        )
        trained = sum(len(r) for r in responses)
        out.tokens += len(prompt) + trained
        out.trained += trained


def save_store(data: dict[str, list[np.ndarray]], output: str | Path, store: str) -> Path:
    """Write converted arrays as a store of type `store` ("mmap", "h5", "json") in the folder `output`."""
    if store not in STORE_TYPES:
        raise ValueError(f"store={store!r}: allowed {list(STORE_TYPES)}")
    folder = check_output(output)
    if store == "mmap":
        return save_mmap(folder, data)
    if store == "h5":
        return save_h5(folder, data)
    count = len(next(iter(data.values())))
    return save_jsonl(folder / "data.jsonl", ({key: segs[i] for key, segs in data.items()} for i in range(count)))


def check_output(output: str | Path) -> Path:
    """`output` as a Path, if it is free for a new store: absent, or an empty folder."""
    folder = Path(output)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ValueError(f"output {str(folder)!r} exists and is not an empty folder")
    return folder
