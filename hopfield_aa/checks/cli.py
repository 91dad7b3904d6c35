"""The ``verify`` and ``plot`` subcommands: run every check and write the report, or re-draw its figures."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from hopfield_aa._errors import add_command

EXAMPLE_VERIFY = (
    "Example: hopfield-aa verify --quick --out report/ --claims energy,contraction --families gaussian"
)
EXAMPLE_PLOT = "Example: hopfield-aa plot report/results.json --out report/"


def add_parsers(subparsers: Any) -> None:
    """Add ``verify`` and ``plot`` to the ``hopfield-aa`` command."""
    from hopfield_aa.checks.families import FAMILIES
    from hopfield_aa.checks.report import CLAIM_KEYS

    verify = add_command(
        subparsers,
        "verify",
        "check every claim of the theory on synthetic memories and traces; write a report",
        "Run every claim of papers/theory.md on the synthetic families and on captured traces, print "
        "what held, what failed and what could not be tested (and why), and write a report folder "
        "(report.md, results.json, PNG figures, at most 5 counter-examples per claim). Exits 0 "
        "whatever the claims' outcome; non-zero only on errors.",
        EXAMPLE_VERIFY,
    )
    verify.add_argument("--quick", action="store_true", help="fewer sizes, β values and states (seconds)")
    verify.add_argument("--out", default="verify-report", help="report folder (default: verify-report)")
    verify.add_argument("--seed", type=int, default=0, help="seed of every synthetic draw (default 0)")
    verify.add_argument(
        "--families",
        default=None,
        help=f"comma-separated synthetic families, or 'none' (default: all of {', '.join(FAMILIES)})",
    )
    verify.add_argument(
        "--claims", default=None, help=f"comma-separated claims (default: all of {', '.join(CLAIM_KEYS)})"
    )
    verify.add_argument(
        "--traces",
        default=None,
        help="a trace capture directory (or a folder of them); 'none' skips traces "
        "(default: the bundled traces in hopfield_aa/data/traces when present)",
    )
    verify.add_argument(
        "--states", type=int, default=None, help="starting states per case (default 32, quick 12)"
    )
    verify.add_argument(
        "--max-records",
        type=int,
        default=8,
        help="trace records read per capture, spread over its layers and steps; 0 reads all (default 8)",
    )
    verify.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the work is many small ops, which extra threads only slow down)",
    )
    verify.add_argument(
        "--dtype",
        default="float64",
        choices=("float64", "float32", "float16", "bfloat16"),
        help="compute dtype of every check, tolerances from its epsilon (float16/bfloat16: maps in that "
        "type, solvers and eigenvalues in float32; default float64)",
    )
    verify.add_argument(
        "--all-counterexamples",
        action="store_true",
        help="keep every counter-example the checks save (default: the 5 worst per claim)",
    )
    verify.add_argument(
        "--dask",
        default=None,
        metavar="ADDRESS|local[:N]",
        help="run the cases as Dask tasks: 'local:N' starts a LocalCluster of N one-thread workers ('local': "
        "one per CPU core), an address (tcp://host:8786) connects to a running scheduler; same report as "
        "the serial run (needs the [dask] extra; default: in this process)",
    )
    verify.add_argument("--no-progress", action="store_true", help="no progress bar")
    verify.set_defaults(func=run_verify)

    plot = subparsers.add_parser(
        "plot",
        help="re-draw the report figures from a results.json",
        description="Re-draw the figures of a verify report from its results.json (no check is re-run).",
        epilog=EXAMPLE_PLOT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plot.add_argument("results", help="path of a results.json written by 'hopfield-aa verify'")
    plot.add_argument("--out", default=None, help="folder for the PNGs (default: beside results.json)")
    plot.set_defaults(func=run_plot)


def _fail(message: str) -> int:
    print(f"hopfield-aa: error: {message}", file=sys.stderr)
    return 2


def run_verify(args: argparse.Namespace) -> int:
    """Run ``verify``: 0 whatever the claims' outcome, 2 on bad input (other errors propagate)."""
    import torch

    from hopfield_aa._errors import UsageError
    from hopfield_aa.checks.cluster import DaskError, parse_dask
    from hopfield_aa.checks.report import (
        COUNTEREXAMPLES_PER_CLAIM,
        VerifyConfig,
        first_screen,
        format_table,
        parse_claims,
        parse_families,
        run_verification,
        write_report,
    )
    from hopfield_aa.checks.traces import bundled_traces, capture_dirs

    torch.set_num_threads(max(1, args.threads))
    try:
        families = parse_families(args.families)
        claims = parse_claims(args.claims)
    except ValueError as exc:
        return _fail(str(exc))
    if args.dask is not None:
        try:
            parse_dask(args.dask)
        except DaskError as exc:
            raise UsageError(f"--dask {args.dask}: {exc}") from exc
    if args.states is not None and args.states < 1:
        return _fail(f"--states must be >= 1, got {args.states}")
    traces: str | None
    if args.traces is None:
        bundled = bundled_traces()
        traces = None if bundled is None else str(bundled)
        if traces is None:
            print(
                "traces: no bundled traces in hopfield_aa/data/traces; synthetic families only",
                file=sys.stderr,
            )
    elif args.traces.lower() == "none":
        traces = None
    else:
        try:
            if not capture_dirs(args.traces):
                return _fail(f"--traces {args.traces}: no trace capture (manifest.json) found there")
        except FileNotFoundError as exc:
            return _fail(str(exc))
        traces = args.traces
    if not families and traces is None:
        return _fail("nothing to check: no family selected and no traces")
    config = VerifyConfig(
        quick=args.quick,
        seed=args.seed,
        families=families,
        claims=claims,
        traces=traces,
        n_states=args.states,
        max_records=None if args.max_records == 0 else args.max_records,
        progress=not args.no_progress,
        dtype=args.dtype,
        max_counterexamples=None if args.all_counterexamples else COUNTEREXAMPLES_PER_CLAIM,
        dask=args.dask,
    )
    start = time.perf_counter()
    try:
        doc = run_verification(config, args.out)
    except DaskError as exc:
        raise UsageError(f"--dask {args.dask}: {exc}") from exc
    figures = write_report(doc, args.out)
    print(first_screen(doc["summary"]))
    print()
    print(format_table(doc["summary"]))
    failing = [r for r in doc["summary"] if r["status"] == "fail"]
    print()
    print(
        f"{len(doc['cases'])} cases in {args.dtype}, "
        f"{sum(r['n_states'] for r in doc['summary'])} states tried; "
        f"{len(failing)} rows fail where their premise held "
        f"(counter-examples in {Path(args.out) / 'counterexamples'})"
    )
    print(
        f"report: {Path(args.out) / 'report.md'} ({len(figures)} figures); "
        f"{time.perf_counter() - start:.1f} s"
    )
    return 0


def run_plot(args: argparse.Namespace) -> int:
    """Run ``plot``: re-draw the figures of a results.json."""
    from hopfield_aa.checks.plots import draw_report_figures
    from hopfield_aa.checks.results import from_jsonable

    path = Path(args.results)
    if path.is_dir():
        path = path / "results.json"
    try:
        doc = from_jsonable(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return _fail(f"{path}: no such file")
    except json.JSONDecodeError as exc:
        return _fail(f"{path}: not valid JSON ({exc})")
    if not isinstance(doc, dict) or doc.get("format") != "hopfield_aa.verify":
        return _fail(f"{path}: not a results.json written by 'hopfield-aa verify'")
    out = Path(args.out) if args.out else path.parent
    for figure in draw_report_figures(doc.get("figures", {}), out):
        print(figure)
    return 0
