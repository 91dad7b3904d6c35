"""The error a command raises for bad input it can explain in a line or two (no traceback)."""

from __future__ import annotations


class UsageError(ValueError):
    """Bad command-line input: ``hopfield-aa`` prints ``hopfield-aa <command>: error: <message>`` and exits
    with status 2, the way argparse reports its own errors."""


__all__ = ["UsageError"]
