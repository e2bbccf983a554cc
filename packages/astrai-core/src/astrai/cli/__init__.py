"""The `astrai` command (`astrai.cli.main:main`). Sub-commands come from the `astrai.commands` entry-point
group, so each distribution adds its own (astrai-serve adds `astrai serve`) without this package knowing it."""

from astrai.cli.main import COMMAND_GROUP, build_parser

__all__ = ["COMMAND_GROUP", "build_parser"]
