"""The ``hopfield-aa`` command: one subcommand per job, each defined beside the code it runs."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence

from hopfield_aa import __version__

# Each module listed here defines ``add_parsers(subparsers)``, which adds its subcommands and sets
# ``func`` (taking the parsed arguments, returning an exit code) as the parser default.
_COMMAND_MODULES = (
    "hopfield_aa.checks.cli",
    "hopfield_aa.traces.cli",
    "hopfield_aa.reference.cli",
    "hopfield_aa.evaluation.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hopfield-aa",
        description=(
            "Attention-space diffusion guidance as Hopfield dynamics and Anderson acceleration: "
            "verify the theory's claims, capture attention traces, train the reference model, "
            "and evaluate Geometry-Aware Attention Guidance."
        ),
        epilog="Example: hopfield-aa verify --quick --out report/",
    )
    parser.add_argument("--version", action="version", version=f"hopfield-aa {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        if importlib.util.find_spec(name) is None:
            continue
        importlib.import_module(name).add_parsers(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    from hopfield_aa._errors import UsageError

    try:
        return int(args.func(args) or 0)
    except UsageError as err:
        print(f"hopfield-aa {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
