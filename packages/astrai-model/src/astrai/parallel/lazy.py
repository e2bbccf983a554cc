"""Lazy re-exports: names the architecture document puts in one namespace but another distribution provides.

DESIGN.md section 1: every public name of the architecture document is importable from the namespace package the
document puts it in, even where the code lives in another distribution (the executors of astrai-train under
`astrai.parallel`). `lazy_exports` builds the module-level `__getattr__` (PEP 562) and `__dir__` for that: the
providing module is imported on first access, never when the package itself is imported (so it adds no import
edge, and astrai-model still works without astrai-train), and when it is not installed the `ImportError` names
the distribution to install.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from astrai.cli.version import providing_distribution


def lazy_exports(
    package: str, providers: Mapping[str, str], eager: Iterable[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`: `providers` maps each lazy name to the module defining it;
    `eager` are the names the package defines itself (its `__all__`), listed by `__dir__` with the lazy ones."""

    def __getattr__(name: str) -> Any:
        module_name = providers.get(name)
        if module_name is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # Only the providing distribution's absence is translated; a missing dependency of it propagates.
            if exc.name is None or not (module_name == exc.name or module_name.startswith(exc.name + ".")):
                raise
            dist = providing_distribution(module_name) or module_name
            raise ImportError(
                f"{package}.{name} is defined in {module_name}, which the {dist} distribution provides: "
                f"install it (pip install {dist})",
                name=module_name,
            ) from exc
        value = getattr(module, name)
        setattr(sys.modules[package], name, value)  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted({*eager, *providers})

    return __getattr__, __dir__
