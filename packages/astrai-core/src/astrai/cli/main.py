"""Entry point of the `astrai` command: discovers sub-commands and dispatches to them.

A sub-command is an entry point in the `astrai.commands` group whose object is `configure(parser)`: it adds
its arguments to `parser` and sets `parser.set_defaults(run=fn)`, where `fn(args) -> int | None` does the
work. The first line of `configure`'s docstring is the command's one-line help. Modules behind entry points
should import heavy dependencies (torch) inside `fn`, so that `astrai --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import EntryPoint, entry_points

COMMAND_GROUP = "astrai.commands"


def _commands() -> list[EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=COMMAND_GROUP):
        found.setdefault(ep.name, ep)  # the same distribution seen twice (e.g. editable + site) counts once
    return sorted(found.values(), key=lambda ep: ep.name)


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The `astrai` parser. With `selected`, only that command's entry point is loaded (the others are listed
    by name), so running one command never imports the other distributions (torch takes seconds to import)."""
    parser = argparse.ArgumentParser(
        prog="astrai",
        description="AstrAI: build, train and serve language models.",
        epilog="Run 'astrai COMMAND --help' for a command's options. "
        "Installed AstrAI distributions contribute commands.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for ep in _commands():
        if selected is not None and ep.name != selected:
            sub.add_parser(ep.name)
            continue
        try:
            configure = ep.load()
        except Exception as exc:  # a broken distribution must not take the whole command down
            print(f"astrai: command {ep.name!r} from {ep.value} failed to load: {exc}", file=sys.stderr)
            continue
        summary = (configure.__doc__ or "").strip().splitlines()
        help_text = summary[0] if summary else None
        configure(sub.add_parser(ep.name, help=help_text, description=help_text))
    return parser


def _selected_command(argv: list[str]) -> str | None:
    """The command named on the command line, if any (the first argument that is not an option)."""
    names = {ep.name for ep in _commands()}
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in names else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_selected_command(argv))
    args = parser.parse_args(argv)
    run = getattr(args, "run", None)
    if run is None:
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        code = run(args)
    except KeyboardInterrupt:
        return 130
    except ValueError as exc:  # a user's mistake: say what, without a traceback
        print(f"astrai {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
