"""The built-in corpus: CPython's own reference documentation, turned into training records of every kind.

CPython ships the text of its language-reference topics as `pydoc_data.topics.topics` (about 80 topics,
roughly half a megabyte), so a model can be trained end to end with nothing downloaded. A topic reads

    The "assert" statement          <- title
    **********************
                                    <- blocks follow, separated by blank lines: paragraphs,
    Assert statements are a ...        indented code, section headings
    ...

and becomes records that `astrai data build` accepts:

| kind | record                                                                                        |
|------|-----------------------------------------------------------------------------------------------|
| text | {"text": a chunk of a topic, at most `max_chars` characters, cut at block boundaries}         |
| sft  | {"messages": a question about the topic's title, answered by the topic's opening blocks}      |
| dpo  | {"prompt": [user question], "chosen": the right topic's opening, "rejected": another topic's}  |
| grpo | {"prompt": [user question], "responses": 4 openings (one right), "rewards": 1.0 right, else 0} |

Records are shuffled with `random.Random(seed)`, which also picks rejected and distracting answers, so a
seed always gives the same records.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from astrai.dataset.json_store import save_jsonl

CORPUS_KINDS = ("text", "sft", "dpo", "grpo")
GRPO_GROUP_SIZE = 4
SYSTEM_PROMPT = "You answer questions about Python from its reference documentation."
QUESTIONS = (
    "What does the Python documentation say about {title}?",
    "Explain {title} in Python.",
    "Summarise the Python reference on {title}.",
)
FOLLOW_UP = "Tell me more."


@dataclass(frozen=True)
class Topic:
    """One documentation topic: its pydoc key, its title and its body as blank-line separated blocks."""

    key: str
    title: str
    blocks: tuple[str, ...]

    def opening(self, max_chars: int = 600) -> str:
        """The first block, and the blocks after it while the text stays within `max_chars`.

        A first block longer than `max_chars` is cut after its last line that fits (at least one line).
        """
        first = self.blocks[0]
        if len(first) > max_chars:
            cut = first.rfind("\n", 0, max_chars + 1)
            cut = cut if cut > 0 else first.find("\n")
            return first if cut < 0 else first[:cut]
        return "\n\n".join(self.blocks[: _fitting(self.blocks, max_chars)])

    def continuation(self, max_chars: int = 600) -> str:
        """The blocks after the opening's, cut the same way ("" when there are none)."""
        rest = self.blocks[_fitting(self.blocks, max_chars) :]
        return Topic(self.key, self.title, rest).opening(max_chars) if rest else ""

    def question_subject(self) -> str:
        """The title as it reads inside a sentence ('The "if" statement' -> 'the "if" statement')."""
        return "the" + self.title[3:] if self.title.startswith("The ") else self.title


def _fitting(blocks: tuple[str, ...], max_chars: int) -> int:
    """How many leading blocks fit in `max_chars` joined by blank lines (at least one)."""
    count, used = 1, len(blocks[0]) if blocks else 0
    while count < len(blocks) and used + 2 + len(blocks[count]) <= max_chars:
        used += 2 + len(blocks[count])
        count += 1
    return min(count, len(blocks))


def builtin_topics() -> list[Topic]:
    """The documentation topics of the running Python, in key order, one per distinct title."""
    from pydoc_data.topics import topics  # the standard library's, imported lazily (about 0.5 MB)

    found: dict[str, Topic] = {}
    for key in sorted(topics):
        title, _, body = topics[key].partition("\n")
        body = body.lstrip("*").strip("\n")  # drop the "****" line under the title
        blocks = tuple(b.strip("\n") for b in body.split("\n\n") if b.strip())
        if blocks and title not in found:  # "if" and "else" share one text
            found[title] = Topic(key, title.strip(), blocks)
    return list(found.values())


def builtin_texts(max_chars: int = 2000) -> list[str]:
    """The topics as plain-text documents of at most `max_chars` characters (a longer single block stays whole).

    Each topic is cut at block boundaries; its first chunk starts with the title.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars={max_chars!r}: must be >= 1")
    texts = []
    for topic in builtin_topics():
        blocks: tuple[str, ...] = (f"{topic.title}\n{'*' * len(topic.title)}", *topic.blocks)
        while blocks:
            n = _fitting(blocks, max_chars)
            texts.append("\n\n".join(blocks[:n]))
            blocks = blocks[n:]
    return texts


def corpus_records(kind: str, limit: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Records of `kind` (one of `CORPUS_KINDS`) from the built-in corpus: shuffled by `seed`, the first `limit`."""
    if kind not in CORPUS_KINDS:
        raise ValueError(f"kind={kind!r}: allowed {list(CORPUS_KINDS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit!r}: must be >= 1")
    rng = random.Random(seed)
    if kind == "text":
        records: list[dict[str, Any]] = [{"text": t} for t in builtin_texts()]
    elif kind == "sft":
        records = [{"messages": m} for topic in builtin_topics() for m in _conversations(topic)]
    else:
        topics = builtin_topics()
        records = [_ranked(kind, topic, question, topics, rng) for topic in topics for question in QUESTIONS]
    rng.shuffle(records)
    return records[:limit]


def _conversations(topic: Topic) -> list[list[dict[str, str]]]:
    """Chat examples about one topic: a plain question, one with a system prompt, and a two-turn one."""
    subject, answer = topic.question_subject(), topic.opening()
    chats = [
        [{"role": "user", "content": QUESTIONS[0].format(title=subject)}, {"role": "assistant", "content": answer}],
        [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": QUESTIONS[1].format(title=subject)},
            {"role": "assistant", "content": answer},
        ],
    ]
    more = topic.continuation()
    if more:
        chats.append(
            [
                {"role": "user", "content": QUESTIONS[2].format(title=subject)},
                {"role": "assistant", "content": answer},
                {"role": "user", "content": FOLLOW_UP},
                {"role": "assistant", "content": more},
            ]
        )
    return chats


def _ranked(kind: str, topic: Topic, question: str, topics: list[Topic], rng: random.Random) -> dict[str, Any]:
    """A DPO pair or a GRPO group for `question` about `topic`; wrong answers are other topics' openings."""
    prompt = [{"role": "user", "content": question.format(title=topic.question_subject())}]
    others = [t for t in topics if t.opening() != topic.opening()]
    if kind == "dpo":
        return {"prompt": prompt, "chosen": topic.opening(), "rejected": rng.choice(others).opening()}
    answers = [(topic.opening(), 1.0)] + [(t.opening(), 0.0) for t in rng.sample(others, GRPO_GROUP_SIZE - 1)]
    rng.shuffle(answers)
    return {"prompt": prompt, "responses": [a for a, _ in answers], "rewards": [r for _, r in answers]}


def write_corpus(kind: str, path: str | Path, limit: int | None = None, seed: int = 0) -> int:
    """Write `corpus_records(kind, limit, seed)` to the JSON Lines file `path`; returns the record count."""
    records = corpus_records(kind, limit, seed)
    save_jsonl(path, records)
    return len(records)
