"""Tool-call parsers (astrai.serve.tool_parsers)."""

import json

import pytest

from astrai.serve.tool_parsers import ToolCall, get_tool_parser


def test_hermes_single_and_multiple_calls():
    parse = get_tool_parser("hermes")
    text = 'Let me check.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    content, calls = parse(text)
    assert content == "Let me check.\n"
    assert calls == [ToolCall("f", '{"x": 1}')]
    two = '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b", "arguments": {"y": "z"}}</tool_call>'
    content, calls = parse(two)
    assert content is None
    assert [c.name for c in calls] == ["a", "b"] and json.loads(calls[1].arguments) == {"y": "z"}


def test_hermes_malformed_stays_content():
    parse = get_tool_parser("hermes")
    for text in ["plain answer", '<tool_call>{"name": "f", "arguments": </tool_call>', "<tool_call>[1]</tool_call>"]:
        assert parse(text) == (text, [])


def test_llama3_json():
    parse = get_tool_parser("llama3_json")
    content, calls = parse('<|python_tag|>{"name": "a", "parameters": {"q": 1}}; {"name": "b", "parameters": {}}')
    assert content is None
    assert calls == [ToolCall("a", '{"q": 1}'), ToolCall("b", "{}")]
    for text in ["hello", '{"name": "a", "parameters": ', '{"foo": 1}']:
        assert parse(text) == (text, [])


def test_unknown_parser():
    with pytest.raises(ValueError, match="unknown tool call parser"):
        get_tool_parser("nope")


class ToolTokenizer:
    """Wraps the conftest FakeTokenizer with a template that renders `tools` and tool calls, recording the text."""

    def __init__(self, base) -> None:
        self.base = base
        self.rendered: list[str] = []

    def __getattr__(self, name):
        return getattr(self.base, name)

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=True, tools=None):
        head = "".join(f"[tool {t['function']['name']}]" for t in tools or [])
        parts = []
        for m in messages:
            extra = "".join(
                f"[call {c['function']['name']} {c['function']['arguments']!r}]" for c in m.get("tool_calls", [])
            )
            if "tool_call_id" in m:
                extra += f"[answers {m['tool_call_id']}]"
            parts.append(f"<|{m['role']}|>{m['content']}{extra}<|end|>")
        text = head + "".join(parts) + "<|user|>next<|end|><|assistant|>"
        self.rendered.append(text)
        return self.base.encode(text) if tokenize else text


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}]


def test_tool_history_reaches_template(make_server, fake_engine):
    engine = fake_engine()
    engine.tokenizer = ToolTokenizer(engine.tokenizer)
    srv = make_server(engine)
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    for choice in ["auto", "required", {"type": "function", "function": {"name": "get_weather"}}]:
        resp = srv.openai().chat.completions.create(
            model="m", messages=messages, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False
        )
        assert resp.choices[0].message.content
        text = engine.tokenizer.rendered[-1]
        assert "[tool get_weather]" in text
        assert "[call get_weather {'city': 'Paris'}]" in text  # arguments parsed into a dict
        assert "<|tool|>sunny[answers c1]" in text
    srv.openai().chat.completions.create(model="m", messages=messages, tools=TOOLS, tool_choice="none")
    assert "[tool" not in engine.tokenizer.rendered[-1]
