"""What every ``hopfield-aa`` subcommand shares: the error it raises for bad input it can explain in a line
or two (no traceback), and the way it declares itself and reads its options.
"""

from __future__ import annotations

import argparse
from typing import Any


class UsageError(ValueError):
    """Bad command-line input: ``hopfield-aa`` prints ``hopfield-aa <command>: error: <message>`` and exits
    with status 2, the way argparse reports its own errors."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every default in the help, unless the option's own words give it (a None or on/off default, or a help
    that names its default); text with line breaks (the examples) kept as written, other text wrapped."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def add_command(
    subparsers: Any, name: str, summary: str, description: str, example: str
) -> argparse.ArgumentParser:
    """Add the subcommand ``name``: ``summary`` in the command list; ``description`` and ``example`` (kept as
    written, one command per line) in its ``--help``, formatted by :class:`HelpFormatter`."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name,
        help=summary,
        description=description,
        epilog=example if example.endswith("\n") else example + "\n",
        formatter_class=HelpFormatter,
    )
    return parser


def options(args: argparse.Namespace, *names: str, **renamed: str) -> dict[str, Any]:
    """Parsed options as keyword arguments: each of ``names`` under its own name, and ``keyword=option``
    pairs for the options a function calls otherwise."""
    picked = {name: getattr(args, name) for name in names}
    return {**picked, **{keyword: getattr(args, option) for keyword, option in renamed.items()}}


__all__ = ["HelpFormatter", "UsageError", "add_command", "options"]
