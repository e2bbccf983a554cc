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
