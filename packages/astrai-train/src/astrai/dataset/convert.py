"""Records in TRL's dataset formats to token arrays for each training kind, and the store that holds them.

Records (standard: strings; conversational: lists of `{"role", "content"}` messages, see TRL's "Dataset
formats and types") and the store keys they become, one segment per record:

| kind | record (any of)                                              | store keys                                  |
|------|--------------------------------------------------------------|---------------------------------------------|
| text | `text`; `messages`                                           | sequence: `[bos] text eos`, or the rendered chat + eos |
| sft  | `messages`; `prompt` + `completion`; `text`                  | sequence, loss_mask                         |
| dpo  | `chosen` + `rejected`, with `prompt` or with the prompt implicit in both | chosen, rejected, chosen_mask, rejected_mask |
| grpo | `prompt` + `responses` (strings) + `rewards` (numbers)       | prompts, prompt_masks, responses, masks, rewards |

Loss masks: `messages` trains the assistant turns; `prompt` + `completion` only the completion (TRL's
completion-only loss; for a conversational completion, its assistant turns); `text` every token. A
completion (`completion`, `chosen`, `rejected`) follows the format of its prompt: a string after a string
prompt (raw text ending with EOS), an assistant message's text or a list of messages starting and ending
with assistant turns after a list of messages. An implicit prompt is, as in TRL's `extract_prompt`, the
longest common prefix of `chosen` and `rejected`: of their characters (less a space it ends with, which
stays with the completions) or of their messages. A record may carry `tools` (a list of JSON schemas, or
that list as a JSON string) for the chat template; see `chat_encoder` for how the template is used and
when a record with tool calls is refused (counted in `Converted.refused`, not fatal).

DPO pairs are padded to one length L (the longest pair), so windows of L rows hold exactly one pair; GRPO
prompts to the longest prompt P and responses to the longest response R. Padding uses the pad token (EOS
when there is none) and is False in every mask. Records are converted in memory before the store is
written.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from astrai.dataset.chat_encoder import ChatEncoder, Messages, RefusedRecord, Tools
from astrai.dataset.h5_store import save_h5
from astrai.dataset.json_store import save_jsonl
from astrai.dataset.mmap_store import save_mmap
from astrai.dataset.records import string_field

BUILD_KINDS = ("text", "sft", "dpo", "grpo")
DATASET_TYPES = {"text": "seq", "sft": "sft", "dpo": "dpo", "grpo": "grpo"}  # kind -> DatasetFactory name
STORE_TYPES = ("mmap", "h5", "json")


@dataclass
class Converted:
    """Arrays ready for a store writer, and counts for the summary."""

    data: dict[str, list[np.ndarray]] = field(default_factory=dict)  # key -> one segment per record
    records: int = 0  # records converted
    tokens: int = 0  # real (not padding) tokens
    trained: int = 0  # tokens under a loss mask
    refused: list[str] = field(default_factory=list)  # why each refused record was refused ("where: reason")

    def add(self, **segments: Sequence[Any]) -> None:
        for key, value in segments.items():
            self.data.setdefault(key, []).append(value)


def _messages(value: Any, key: str, where: str) -> Messages:
    """A non-empty list of messages: string `role`, string `content` (absent or null beside `tool_calls`)."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: key {key!r} must be a non-empty list of messages, got {value!r:.80}")
    for i, m in enumerate(value):
        content_ok = isinstance(m, dict) and (
            isinstance(m.get("content"), str) or (m.get("tool_calls") and m.get("content") is None)
        )
        if not content_ok or not isinstance(m.get("role"), str):
            raise ValueError(f"{where}: {key}[{i}] must be an object with string 'role' and 'content', got {m!r:.80}")
        if "tool_calls" in m and not isinstance(m["tool_calls"], list):
            raise ValueError(f"{where}: {key}[{i}]['tool_calls'] must be a list, got {m['tool_calls']!r:.80}")
    return value


def _prompt(record: dict[str, Any], where: str) -> str | Messages:
    if isinstance(record.get("prompt"), list):
        return _messages(record["prompt"], "prompt", where)
    return string_field(record, "prompt", where)


def _text_or_messages(record: dict[str, Any], key: str, where: str) -> str | Messages:
    return _messages(record[key], key, where) if isinstance(record.get(key), list) else string_field(record, key, where)


def _completion(prompt: str | Messages, value: str | Messages, key: str, where: str) -> str | Messages:
    """`value` checked as a completion of `prompt`: a string after a string, assistant turn(s) after messages."""
    if isinstance(value, list):
        if isinstance(prompt, str):
            raise ValueError(f"{where}: key {key!r} is a list of messages but the prompt is a string")
        if value[0]["role"] != "assistant" or value[-1]["role"] != "assistant":
            roles = [m["role"] for m in value]
            raise ValueError(f"{where}: key {key!r} must start and end with an assistant turn, got roles {roles}")
    return value


def _tools(record: dict[str, Any], where: str) -> Tools:
    """The record's `tools` for the chat template: a list of JSON schemas (or that list as JSON text)."""
    tools = record.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: key 'tools' is a string but not JSON ({exc.msg})") from None
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ValueError(f"{where}: key 'tools' must be a list of JSON schemas (objects), got {tools!r:.80}")
    return tools or None


def _implicit_prompt(chosen: Any, rejected: Any, where: str) -> tuple[Any, Any, Any]:
    """`(prompt, chosen, rejected)`: the longest common prefix of `chosen` and `rejected` split off, as TRL's
    `extract_prompt` does (for strings, a space before the cut goes with the completions)."""
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise ValueError(f"{where}: 'chosen' and 'rejected' must both be strings or both lists of messages")
    shared = next((k for k, (c, r) in enumerate(zip(chosen, rejected)) if c != r), min(len(chosen), len(rejected)))
    if shared == min(len(chosen), len(rejected)):
        raise ValueError(
            f"{where}: 'chosen' and 'rejected' are equal or one extends the other, so no prompt can be split off; "
            f"give the prompt in its own 'prompt' field"
        )
    if isinstance(chosen, str):
        shared -= shared > 0 and chosen[shared - 1] == " "
    elif shared == 0:
        raise ValueError(f"{where}: 'chosen' and 'rejected' share no leading message to use as the prompt")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _sft(enc: ChatEncoder, record: dict[str, Any], where: str) -> tuple[list[int], list[bool]]:
    tools = _tools(record, where)
    if "messages" in record:
        ids, mask = enc.conversation(_messages(record["messages"], "messages", where), where, tools)
        if not any(mask):
            raise ValueError(f"{where}: key 'messages' holds no assistant turn to train on")
        return ids, mask
    if "prompt" in record and "completion" in record:
        prompt = _prompt(record, where)
        completion = _completion(prompt, _text_or_messages(record, "completion", where), "completion", where)
        head = enc.prompt(prompt, tools)
        ids, mask = enc.completion(prompt, completion, where, tools)
        return head + ids, [False] * len(head) + mask
    if "text" in record:
        ids = enc.document(string_field(record, "text", where))
        return ids, [True] * len(ids)
    raise ValueError(
        f"{where}: an sft record needs 'messages', 'prompt' + 'completion' or 'text' (record has {sorted(record)})"
    )


def _pair(enc: ChatEncoder, record: dict[str, Any], where: str) -> tuple[list[int], ...]:
    """One DPO pair: chosen ids, rejected ids and their masks (the prompt is context, not scored)."""
    tools = _tools(record, where)
    chosen, rejected = (_text_or_messages(record, key, where) for key in ("chosen", "rejected"))
    if "prompt" in record:
        prompt = _prompt(record, where)
    else:
        prompt, chosen, rejected = _implicit_prompt(chosen, rejected, where)
    head = enc.prompt(prompt, tools)
    pair = []
    for key, completion in (("chosen", chosen), ("rejected", rejected)):
        ids, mask = enc.completion(prompt, _completion(prompt, completion, key, where), where, tools)
        pair.append((head + ids, [False] * len(head) + mask))
    (c_ids, c_mask), (r_ids, r_mask) = pair
    return c_ids, r_ids, c_mask, r_mask


def convert_records(kind: str, records: Iterable[tuple[str, dict[str, Any]]], tokenizer: Any) -> Converted:
    """Token arrays of `kind` (one of `BUILD_KINDS`) for `(where, record)` pairs, e.g. from `read_records`.

    A record the chat template cannot render (see `RefusedRecord`) is skipped and listed in `refused`.
    """
    if kind not in BUILD_KINDS:
        raise ValueError(f"kind={kind!r}: allowed {list(BUILD_KINDS)}")
    enc = ChatEncoder(tokenizer)
    out = Converted()
    pairs: list[tuple[list[int], ...]] = []  # dpo: chosen ids, rejected ids, chosen mask, rejected mask
    groups: list[tuple[list[int], list[list[int]], list[float]]] = []  # grpo: prompt, responses, rewards
    for where, record in records:
        try:
            if kind == "text":
                if "messages" in record and "text" not in record:
                    ids, _ = enc.conversation(
                        _messages(record["messages"], "messages", where), where, _tools(record, where)
                    )
                    if enc.eos_id is None:
                        raise ValueError("the tokenizer has no eos token; documents need one to mark where they end")
                    ids = [*ids, enc.eos_id]
                else:
                    ids = enc.document(string_field(record, "text", where))
                out.add(sequence=np.array(ids, dtype=np.int32))
            elif kind == "sft":
                ids, mask = _sft(enc, record, where)
                out.add(sequence=np.array(ids, dtype=np.int32), loss_mask=np.array(mask, dtype=bool))
            elif kind == "dpo":
                pairs.append(_pair(enc, record, where))
            else:
                groups.append(_group(enc, record, where, groups[0][1] if groups else None))
        except RefusedRecord as exc:
            out.refused.append(str(exc))
            continue
        out.records += 1
    if not out.records:
        if out.refused:
            raise ValueError(f"all {len(out.refused)} records were refused; the first: {out.refused[0]}")
        raise ValueError("the input holds no records")
    if kind == "dpo":
        _pad_pairs(out, pairs, enc.pad_id)
    elif kind == "grpo":
        _pad_groups(out, groups, enc.pad_id)
    else:
        out.tokens = sum(len(s) for s in out.data["sequence"])
        out.trained = sum(int(m.sum()) for m in out.data["loss_mask"]) if kind == "sft" else out.tokens
    return out


def _group(enc: ChatEncoder, record: dict[str, Any], where: str, first: list[list[int]] | None) -> tuple:
    """One GRPO record's prompt ids, response ids and rewards; its group size must match the first record's."""
    prompt = _prompt(record, where)
    tools = _tools(record, where)
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
    completions = [enc.completion(prompt, r, where, tools)[0] for r in responses]
    return enc.prompt(prompt, tools), completions, [float(r) for r in rewards]


def _padded(ids: list[int], length: int, pad_id: int, left: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """`ids` padded to `length` with `pad_id`, and the mask of the real tokens."""
    pad = length - len(ids)
    real = [True] * len(ids)
    if left:
        return np.array([pad_id] * pad + ids, dtype=np.int32), np.array([False] * pad + real)
    return np.array(ids + [pad_id] * pad, dtype=np.int32), np.array(real + [False] * pad)


def _pad_pairs(out: Converted, pairs: list[tuple[list[int], ...]], pad_id: int) -> None:
    length = max((max(len(c), len(r)) for c, r, _, _ in pairs), default=0)
    for chosen, rejected, c_mask, r_mask in pairs:
        c_ids, _ = _padded(chosen, length, pad_id)
        r_ids, _ = _padded(rejected, length, pad_id)
        pad = [False] * length
        out.add(
            chosen=c_ids,
            rejected=r_ids,
            chosen_mask=np.array(c_mask + pad[len(c_mask) :]),
            rejected_mask=np.array(r_mask + pad[len(r_mask) :]),
        )
        out.tokens += len(chosen) + len(rejected)
        out.trained += sum(c_mask) + sum(r_mask)


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
