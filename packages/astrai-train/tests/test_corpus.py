"""The built-in corpus: CPython's documentation topics as text, SFT, DPO and GRPO records."""

import json
from pydoc_data.topics import topics as pydoc_topics

import pytest

from astrai.dataset import Topic, builtin_texts, builtin_topics, corpus_records, write_corpus
from astrai.dataset.corpus import CORPUS_KINDS, FOLLOW_UP, GRPO_GROUP_SIZE, QUESTIONS, SYSTEM_PROMPT


@pytest.fixture(scope="module")
def topics():
    return builtin_topics()


def by_question(topics):
    """Topic of each question the corpus can ask: question text -> Topic."""
    return {q.format(title=t.question_subject()): t for t in topics for q in QUESTIONS}


def test_topics_parse_pydoc_titles_and_blocks(topics):
    assert len({t.title for t in topics}) == len(topics)  # one per distinct title ("if" and "else" share one)
    assert len(topics) == len({v.partition("\n")[0] for v in pydoc_topics.values()})
    assert all(t.key in pydoc_topics and t.blocks for t in topics)
    assert_stmt = next(t for t in topics if t.key == "assert")
    assert assert_stmt.title == 'The "assert" statement'
    assert assert_stmt.question_subject() == 'the "assert" statement'
    assert (
        assert_stmt.blocks[0]
        == "Assert statements are a convenient way to insert debugging assertions\ninto a program:"
    )
    assert assert_stmt.blocks[1] == '   assert_stmt ::= "assert" expression ["," expression]'
    assert not any("*****" in b for t in topics for b in t.blocks[:1])


def test_opening_takes_whole_blocks_within_the_limit():
    topic = Topic("k", "Title", ("a" * 10, "b" * 10, "c" * 10))
    assert topic.opening(10) == "a" * 10
    assert topic.opening(22) == "a" * 10 + "\n\n" + "b" * 10
    assert topic.opening(33) == "a" * 10 + "\n\n" + "b" * 10
    assert topic.opening(34) == "\n\n".join(topic.blocks)
    assert topic.continuation(10) == "b" * 10
    assert topic.continuation(22) == "c" * 10
    assert topic.continuation(34) == ""


def test_opening_cuts_a_long_first_block_at_a_line_end():
    topic = Topic("k", "Title", ("line one\nline two\nline three", "next"))
    assert topic.opening(18) == "line one\nline two"
    assert topic.opening(3) == "line one"  # at least one line
    assert Topic("k", "T", ("no line break here",)).opening(5) == "no line break here"


def test_builtin_texts_cover_every_block_once_in_chunks(topics):
    texts = builtin_texts(max_chars=1500)
    assert texts == builtin_texts(max_chars=1500)
    blocks = [b for text in texts for b in text.split("\n\n")]
    expected = [b for t in topics for b in (f"{t.title}\n{'*' * len(t.title)}", *t.blocks)]
    assert "\n\n".join(blocks) == "\n\n".join(expected)
    # A chunk exceeds the limit only when it is one block that is longer on its own.
    assert all(len(text) <= 1500 or "\n\n" not in text for text in texts)
    assert sum(text.startswith(f"{t.title}\n***") for t in topics for text in texts) >= len(topics)
    with pytest.raises(ValueError, match="max_chars=0"):
        builtin_texts(0)


def test_records_are_deterministic_for_a_seed():
    for kind in CORPUS_KINDS:
        assert corpus_records(kind, limit=5, seed=3) == corpus_records(kind, limit=5, seed=3)
        assert corpus_records(kind, seed=3) != corpus_records(kind, seed=4)
        assert len(corpus_records(kind, limit=5)) == 5


def test_text_records_are_the_builtin_texts():
    records = corpus_records("text", seed=1)
    assert sorted(r["text"] for r in records) == sorted(builtin_texts())


def test_sft_records_answer_with_the_topic_opening(topics):
    records = corpus_records("sft")
    asked = by_question(topics)
    shapes = set()
    for record in records:
        messages = record["messages"]
        roles = tuple(m["role"] for m in messages)
        shapes.add(roles)
        first_user = next(m for m in messages if m["role"] == "user")
        topic = asked[first_user["content"]]
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        assert replies[0] == topic.opening()
        if len(replies) == 2:
            assert messages[2] == {"role": "user", "content": FOLLOW_UP}
            assert replies[1] == topic.continuation() != ""
        if roles[0] == "system":
            assert messages[0]["content"] == SYSTEM_PROMPT
    assert shapes == {
        ("user", "assistant"),
        ("system", "user", "assistant"),
        ("user", "assistant", "user", "assistant"),
    }
    assert len(records) == 2 * len(topics) + sum(bool(t.continuation()) for t in topics)


def test_dpo_records_prefer_the_right_topic(topics):
    asked = by_question(topics)
    records = corpus_records("dpo", seed=2)
    assert len(records) == len(QUESTIONS) * len(topics)
    for record in records:
        [message] = record["prompt"]
        topic = asked[message["content"]]
        assert message["role"] == "user"
        assert record["chosen"] == topic.opening()
        assert record["rejected"] != record["chosen"]
        assert record["rejected"] in {t.opening() for t in topics}


def test_grpo_records_reward_only_the_right_topic(topics):
    asked = by_question(topics)
    openings = {t.opening() for t in topics}
    for record in corpus_records("grpo", seed=5):
        topic = asked[record["prompt"][0]["content"]]
        responses, rewards = record["responses"], record["rewards"]
        assert len(responses) == len(rewards) == GRPO_GROUP_SIZE == len(set(responses))
        assert sorted(rewards) == [0.0] * (GRPO_GROUP_SIZE - 1) + [1.0]
        assert responses[rewards.index(1.0)] == topic.opening()
        assert set(responses) <= openings


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="kind='chat'"):
        corpus_records("chat")
    with pytest.raises(ValueError, match="limit=0"):
        corpus_records("sft", limit=0)


def test_write_corpus_writes_json_lines(tmp_path):
    path = tmp_path / "sub" / "dpo.jsonl"
    assert write_corpus("dpo", path, limit=7, seed=1) == 7
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == corpus_records("dpo", limit=7, seed=1)
