"""`astrai version`: the installed AstrAI distributions and their versions; which distribution provides which module."""

from __future__ import annotations

import argparse
import platform
from importlib.metadata import distributions

# The `astrai.<module>` packages each distribution ships (DESIGN.md section 1); the wheels are checked against it.
DISTRIBUTION_MODULES = {
    "astrai-core": ("cli", "config", "factory", "protocols"),
    "astrai-model": ("model", "tokenize", "parallel"),
    "astrai-train": ("trainer", "dataset", "serialization"),
    "astrai-infer": ("inference",),
    "astrai-serve": ("serve",),
}


def providing_distribution(module: str) -> str | None:
    """The AstrAI distribution that ships `module` (e.g. "astrai.trainer.muon" -> "astrai-train"), if any."""
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "astrai":
        return None
    return next((dist for dist, modules in DISTRIBUTION_MODULES.items() if parts[1] in modules), None)


def installed_distributions() -> dict[str, str]:
    """Name -> version of every installed distribution named `astrai-*`."""
    found: dict[str, str] = {}
    for dist in distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("astrai-"):
            found.setdefault(name, dist.version)
    return dict(sorted(found.items()))


def _run(args: argparse.Namespace) -> int:
    for name, version in installed_distributions().items():
        print(f"{name:<14} {version}")
    print(f"{'python':<14} {platform.python_version()}")
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    """Show the installed AstrAI distributions and their versions."""
    parser.set_defaults(run=_run)
