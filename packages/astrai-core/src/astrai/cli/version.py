"""`astrai version`: the installed AstrAI distributions and their versions."""

from __future__ import annotations

import argparse
import platform
from importlib.metadata import distributions


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
