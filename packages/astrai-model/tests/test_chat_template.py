"""ChatTemplate: transformers-identical rendering, message normalisation, sandboxing, compile-once."""

from __future__ import annotations

import sys
import threading
import time
from datetime import datetime

import pytest
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from transformers.utils.chat_template_utils import render_jinja_template

from astrai.tokenize import ChatTemplate
from astrai.tokenize.chat_template import render_time_limit

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Exercises trim_blocks / lstrip_blocks, namespaces, loop controls, tojson with indent, tools,
# `{% generation %}` blocks and special-token variables: the features Hub templates rely on.
RICH = """{{- bos_token }}
{%- set ns = namespace(turns=0) %}
{%- if tools is not none %}
    {%- for tool in tools %}
tool: {{ tool | tojson(indent=2) }}
    {%- endfor %}
{%- endif %}
{% for message in messages %}
    {% if message.role == 'stop' %}{% break %}{% endif %}
    {% set ns.turns = ns.turns + 1 %}
    <{{ message.role }}>
    {% if message.role == 'assistant' %}
{% generation %}{{ message.content | trim }}{% endgeneration %}{{ eos_token }}
    {% else %}
{{ message.content }}
    {% endif %}
{% endfor %}
turns={{ ns.turns }}
{%- if add_generation_prompt %}<assistant>{% endif %}"""

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello, 世界 🌍"},
    {"role": "assistant", "content": "  Hi!  "},
    {"role": "stop", "content": "never rendered"},
    {"role": "user", "content": "unreachable"},
]
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "查找 a word", "parameters": {}}}]


def hf_render(template: str, messages, **variables) -> str:
    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template, **variables)
    return rendered[0]


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("tools", [None, TOOLS])
def test_renders_exactly_like_transformers(add_generation_prompt, tools):
    variables = dict(add_generation_prompt=add_generation_prompt, tools=tools, bos_token="<s>", eos_token="</s>")
    expected = hf_render(RICH, CONVERSATION, **variables)
    assert ChatTemplate.from_string(RICH).render(CONVERSATION, **variables) == expected
    assert ("查找" in expected) == (tools is not None)  # tojson keeps non-ASCII text
    assert "turns=3" in expected and "unreachable" not in expected  # the loop broke at "stop"


def test_chatml_rendering():
    text = ChatTemplate(CHATML).render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_system_prompt_becomes_the_first_message():
    template = ChatTemplate(CHATML)
    text = template.render([{"role": "user", "content": "hi"}], system_prompt="Be brief.")
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    with pytest.raises(ValueError, match="messages\\[0\\] is already a system message"):
        template.render([{"role": "system", "content": "x"}], system_prompt="Be brief.")


def test_text_parts_are_flattened_and_none_values_dropped():
    template = ChatTemplate(CHATML + "{{ messages[0].get('tool_calls', 'no tool calls') }}")
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    plain = [{"role": "user", "content": "a\nb", "tool_calls": None}]
    assert template.render(parts) == template.render(plain) == "<|im_start|>user\na\nb<|im_end|>\nno tool calls"


def test_non_text_parts_and_malformed_messages_are_rejected():
    template = ChatTemplate(CHATML)
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(ValueError, match="messages\\[0\\].content has a part of type 'image_url'"):
        template.render(image)
    with pytest.raises(ValueError, match="messages\\[1\\] must be a mapping with a 'role'"):
        template.render([{"role": "user", "content": "hi"}, {"content": "no role"}])


@pytest.mark.parametrize(
    "payload",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__ }}",  # plain Jinja would print nothing here; we refuse the lookup itself
        "{{ messages.__class__.__init__.__globals__ }}",
        "{{ raise_exception.__globals__ }}",
        "{% set x = messages.append({'role': 'user'}) %}",  # the immutable sandbox forbids mutation
    ],
)
def test_attribute_walking_raises_a_security_error(payload):
    template = ChatTemplate(payload)
    with pytest.raises(SecurityError):
        template.render([{"role": "user", "content": "hi"}])


def test_raise_exception_and_strftime_now():
    template = ChatTemplate(
        "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}"
        "{{ strftime_now('%Y') }}"
    )
    assert template.render([{"role": "user", "content": "x"}]) == datetime.now().strftime("%Y")
    with pytest.raises(TemplateError, match="first message must be from the user"):
        template.render([{"role": "assistant", "content": "x"}])


def test_each_template_is_compiled_once():
    first, second = ChatTemplate(RICH), ChatTemplate.from_string(RICH, name="other")
    assert first.compiled is second.compiled
    assert first.compiled is not ChatTemplate(CHATML).compiled


def test_bad_templates_fail_at_construction():
    with pytest.raises(TemplateSyntaxError):
        ChatTemplate("{% for message in messages %}")
    with pytest.raises(TypeError, match="template_str must be a str, got int"):
        ChatTemplate(3)


LOOPS_FOR_EVER = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}done"


def test_render_time_limit_stops_a_template_that_loops_for_ever():
    template = ChatTemplate(LOOPS_FOR_EVER)
    started = time.monotonic()
    with render_time_limit(0.3), pytest.raises(TemplateError, match="did not finish rendering within 0.3 s"):
        template.render([{"role": "user", "content": "hi"}])
    assert time.monotonic() - started < 2


def test_render_time_limit_leaves_renders_unchanged_and_restores_the_tracer():
    template = ChatTemplate("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    messages = [{"role": "user", "content": "héllo"}, {"role": "assistant", "content": "世界"}]
    tracer = sys.gettrace()
    with render_time_limit(5):
        limited = template.render(messages)
        assert sys.gettrace() is tracer
    assert limited == template.render(messages) == "<user>héllo<assistant>世界"
    with pytest.raises(ValueError, match="render time limit must be > 0"):
        with render_time_limit(0):
            pass


def test_render_time_limit_is_per_thread():
    """A limit set in one thread does not bound renders in another (the server sets it per worker call)."""
    template = ChatTemplate("{% for i in range(20000) %}{{ i % 2 }}{% endfor %}")
    results = []
    with render_time_limit(1e-9):
        worker = threading.Thread(target=lambda: results.append(len(template.render([]))))
        worker.start()
        worker.join()
        with pytest.raises(TemplateError):
            template.render([])
    assert results == [20000]
