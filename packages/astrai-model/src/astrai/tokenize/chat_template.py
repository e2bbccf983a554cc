"""`ChatTemplate`: a Jinja2 chat template rendered the way Hugging Face transformers renders it, but safely.

Chat templates ship inside model folders (`tokenizer_config.json`, `chat_template.jinja`), so they are
untrusted code. They are compiled in an `ImmutableSandboxedEnvironment` whose unsafe attribute lookups
(`''.__class__.__mro__`, `list.append`, ...) raise `jinja2.exceptions.SecurityError` at once instead of
evaluating to an undefined value, and each distinct template source is compiled once per process.

The environment follows transformers' conventions so that Hub templates render byte for byte the same:
`trim_blocks` / `lstrip_blocks`, the `loopcontrols` extension, a `tojson` filter that keeps non-ASCII
text, the globals `raise_exception(message)` and `strftime_now(format)`, the variables `messages`,
`add_generation_prompt`, `tools`, `documents` (plus whatever the caller passes, e.g. `bos_token`), and
`{% generation %}...{% endgeneration %}` blocks (rendered as their body). Messages whose `content` is a
list of `{"type": "text", "text": ...}` parts are flattened to one string before rendering.

The sandbox stops attribute walks, not loops: `{% for i in range(100000) %}{% for j in range(100000) %}`
is a legal template that never finishes. A server renders client messages with templates it did not write,
so `render_time_limit(seconds)` bounds every render in its block (in the calling thread): past the limit
the render stops with a `TemplateError`. The limit is enforced by a line tracer on the rendering frames,
which a loop cannot escape; without a limit nothing is traced and rendering runs at full speed.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, except that touching an unsafe attribute fails immediately.

    Jinja's default turns an unsafe lookup into an `Undefined` that only raises when used further, so
    `{{ ''.__class__ }}` would silently print nothing. An attribute walk is never legitimate in a chat
    template, so we refuse it outright.
    """

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"chat template accessed unsafe attribute {attribute!r} of a {type(obj).__name__} object")


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}body{% endgeneration %}`: transformers marks assistant spans with it; we render the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own `tojson` escapes HTML characters and non-ASCII text; chat templates want plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=64)
def _compile(source: str) -> jinja2.Template:
    """Compile a template source once per process (many requests render the same few templates)."""
    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


_limits = threading.local()  # .seconds: the render time limit of this thread, or None


@contextlib.contextmanager
def render_time_limit(seconds: float | None) -> Iterator[None]:
    """Within the block, `ChatTemplate.render` in this thread fails with `TemplateError` after `seconds`."""
    if seconds is not None and not seconds > 0:
        raise ValueError(f"render time limit must be > 0 seconds or None, got {seconds!r}")
    previous = getattr(_limits, "seconds", None)
    _limits.seconds = seconds
    try:
        yield
    finally:
        _limits.seconds = previous


def _render_within(template: jinja2.Template, seconds: float, variables: dict[str, Any]) -> str:
    """`template.render(**variables)`, stopped with `TemplateError` once it has run for `seconds`."""
    deadline = time.monotonic() + seconds

    def on_line(frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise TemplateError(f"the chat template did not finish rendering within {seconds:g} s")
        return on_line

    previous = sys.gettrace()  # a debugger's or coverage's tracer comes back afterwards
    sys.settrace(lambda frame, event, arg: on_line)  # line events for every frame the render enters
    try:
        return template.render(**variables)
    finally:
        sys.settrace(previous)


def _normalize_message(index: int, message: Mapping[str, Any]) -> dict[str, Any]:
    """A plain dict without None values (OpenAI sends `content: null` on tool calls) and with string content."""
    if not isinstance(message, Mapping) or "role" not in message:
        raise ValueError(f"messages[{index}] must be a mapping with a 'role', got {message!r}")
    out = {key: value for key, value in message.items() if value is not None}
    content = out.get("content")
    if isinstance(content, Sequence) and not isinstance(content, str):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ValueError(
                    f"messages[{index}].content has a part of type {kind!r}; only 'text' parts are supported"
                )
            texts.append(part["text"])
        # Several text parts join with newlines, as vLLM's "string" content format does.
        out["content"] = "\n".join(texts)
    return out


@dataclass(frozen=True)
class ChatTemplate:
    """A named, compiled chat template. Construction compiles it (syntax errors surface here, not at render)."""

    template_str: str
    name: str = "default"
    compiled: jinja2.Template = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.template_str, str):
            raise TypeError(f"template_str must be a str, got {type(self.template_str).__name__}")
        object.__setattr__(self, "compiled", _compile(self.template_str))

    @classmethod
    def from_string(cls, template: str, name: str = "default") -> ChatTemplate:
        return cls(template, name)

    def render(
        self, messages: Sequence[Mapping[str, Any]], system_prompt: str | None = None, **extra_variables: Any
    ) -> str:
        """Render `messages`; a `system_prompt` becomes a leading system message.

        `extra_variables` reach the template as variables (`add_generation_prompt`, `tools`, `bos_token`,
        `enable_thinking`, ...); `add_generation_prompt` defaults to False and `tools`/`documents` to None.
        """
        chat = [_normalize_message(i, m) for i, m in enumerate(messages)]
        if system_prompt:
            if chat and chat[0]["role"] == "system":
                raise ValueError("system_prompt was given but messages[0] is already a system message")
            chat.insert(0, {"role": "system", "content": system_prompt})
        variables = {"add_generation_prompt": False, "tools": None, "documents": None, **extra_variables}
        limit = getattr(_limits, "seconds", None)
        if limit is None:
            return self.compiled.render(messages=chat, **variables)
        return _render_within(self.compiled, limit, {"messages": chat, **variables})
