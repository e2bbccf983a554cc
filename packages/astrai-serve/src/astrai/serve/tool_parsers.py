"""Tool-call parsers: turn a model's full output into (content, tool calls), as vLLM's parsers of the same names do.

`hermes`: Hermes / Qwen `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks; the text before the
first block is the content. `llama3_json`: Llama-3 JSON `{"name": ..., "parameters": {...}}` objects, optionally
after `<|python_tag|>`, separated by `;`. Output that does not parse stays content, with no calls.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON string, as in OpenAI's `function.arguments`


ParseResult = tuple[str | None, list[ToolCall]]

_HERMES_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)\Z", re.DOTALL)


def _call(obj: object, args_key: str) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", {}))
    return ToolCall(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


def parse_hermes(text: str) -> ParseResult:
    if "<tool_call>" not in text:
        return text, []
    calls = []
    try:
        for match in _HERMES_BLOCK.finditer(text):
            call = _call(json.loads((match.group(1) or match.group(2) or "").strip()), "arguments")
            if call is None:
                return text, []
            calls.append(call)
    except json.JSONDecodeError:
        return text, []
    content = text[: text.index("<tool_call>")]
    return (content if content.strip() else None), calls


def parse_llama3_json(text: str) -> ParseResult:
    body = text.strip()
    if body.startswith("<|python_tag|>"):
        body = body[len("<|python_tag|>") :].lstrip()
    if not body.startswith("{"):
        return text, []
    decoder = json.JSONDecoder()
    calls, pos = [], 0
    try:
        while pos < len(body):
            obj, end = decoder.raw_decode(body, pos)
            call = _call(obj, "parameters")
            if call is None:
                return text, []
            calls.append(call)
            rest = body[end:].lstrip()
            if not rest:
                break
            if not rest.startswith(";"):
                return text, []
            pos = len(body) - len(rest[1:].lstrip())
    except json.JSONDecodeError:
        return text, []
    return None, calls


TOOL_PARSERS: dict[str, Callable[[str], ParseResult]] = {"hermes": parse_hermes, "llama3_json": parse_llama3_json}


def get_tool_parser(name: str) -> Callable[[str], ParseResult]:
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r}; choose one of {sorted(TOOL_PARSERS)}") from None
