"""The serving names the architecture document places in `astrai.inference`, from the astrai-serve distribution.

`astrai.inference` resolves them on first access (a module `__getattr__`), so astrai-infer never imports
astrai-serve (nor fastapi, pydantic) unless one of them is asked for, and works without it installed; asking
for one then raises an `ImportError` naming the distribution to install.

`app` is the FastAPI app of `astrai.serve.env_app.environment_app()`, configured from `ASTRAI_MODEL` and the
other `ASTRAI_*` variables, built once on first access: `uvicorn astrai.inference:app` serves it.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from astrai.cli.version import providing_distribution

SERVE_MODULE = "astrai.serve"
SERVE_NAMES = frozenset(
    {
        "AnthropicMessage",
        "AnthropicResponseBuilder",
        "ChatCompletionRequest",
        "ChatMessage",
        "GenContext",
        "MessagesRequest",
        "OpenAIResponseBuilder",
        "ProtocolHandler",
        "ResponseBuilder",
        "app",
    }
)

_app: Any = None  # the environment-configured app, once built


def serve_attribute(name: str) -> Any:
    """The value of `astrai.inference.<name>` for a name of `SERVE_NAMES`."""
    global _app
    if name != "app":
        return getattr(_import(SERVE_MODULE, name), name)
    if _app is None:
        _app = _import(f"{SERVE_MODULE}.env_app", name).environment_app()
    return _app


def _import(module: str, name: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (exc.name == SERVE_MODULE or exc.name.startswith(f"{SERVE_MODULE}.")):
            raise  # astrai.serve is there but something it needs is not: that error says what
        dist = providing_distribution(module)
        raise ImportError(
            f"astrai.inference.{name} is provided by the {dist} distribution, which is not installed "
            f"(pip install {dist})",
            name=module,
        ) from exc
