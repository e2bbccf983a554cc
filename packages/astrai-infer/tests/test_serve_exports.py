"""The architecture document's serving names under `astrai.inference`: resolved from astrai-serve on first access,
never imported with astrai.inference itself, and an ImportError naming the distribution when it is absent."""

import subprocess
import sys

import pytest

import astrai.inference

DOCUMENTED = [
    "ChatMessage",
    "ChatCompletionRequest",
    "AnthropicMessage",
    "MessagesRequest",
    "ResponseBuilder",
    "OpenAIResponseBuilder",
    "AnthropicResponseBuilder",
    "ProtocolHandler",
    "GenContext",
    "app",
]


def test_importing_astrai_inference_imports_no_serving_code():
    script = (
        "import sys, astrai.inference\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'pydantic', 'starlette', 'uvicorn')"
        " or m.startswith('astrai.serve')))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
    assert set(DOCUMENTED) == set(astrai.inference.SERVING_EXPORTS)
    assert set(DOCUMENTED) - set(dir(astrai.inference)) == {"app"}  # help() / inspect never build the app
    assert not set(DOCUMENTED) & set(astrai.inference.__all__)  # a star import never needs astrai-serve


@pytest.mark.parametrize("name", [n for n in DOCUMENTED if n != "app"])
def test_serving_names_are_the_astrai_serve_classes(name):
    serve = pytest.importorskip("astrai.serve")
    assert getattr(astrai.inference, name) is getattr(serve, name)
    namespace = {}
    exec(f"from astrai.inference import {name}", namespace)
    assert namespace[name] is getattr(serve, name)


@pytest.mark.parametrize("name", ["ChatMessage", "GenContext", "app"])
def test_without_astrai_serve_the_error_names_the_distribution(monkeypatch, name):
    for module in [m for m in sys.modules if m.startswith("astrai.serve")] + ["astrai.serve"]:
        monkeypatch.setitem(sys.modules, module, None)  # what an environment without astrai-serve sees
    monkeypatch.delitem(vars(astrai.inference), name, raising=False)  # resolved (and kept) by an earlier test
    with pytest.raises(ImportError, match=rf"astrai.inference.{name} is defined in .*the astrai-serve distribution"):
        getattr(astrai.inference, name)


def test_unknown_names_are_attribute_errors():
    with pytest.raises(AttributeError, match="has no attribute 'Nothing'"):
        astrai.inference.Nothing  # noqa: B018
    assert not hasattr(astrai.inference, "create_app")  # only the documented names are re-exported
