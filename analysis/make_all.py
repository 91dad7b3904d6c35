"""Regenerate every figure and table of papers/ and docs/ with one command, by running the analysis scripts
and ``hopfield-aa verify`` in dependency order.

Usage:
    python analysis/make_all.py                 # everything, full size
    python analysis/make_all.py --quick         # everything, small (minutes on a laptop CPU)
    python analysis/make_all.py --only verify,theory_tables
    python analysis/make_all.py --list          # the steps, their outputs, and which scripts are missing

A step whose script does not exist is reported as missing (and the exit status is 2 unless
``--allow-missing``), never skipped silently; a step that fails makes the exit status 1.

The committed verify snapshot (papers/data/verify) keeps results.json, report.md and the figures; the
counter-examples ``hopfield-aa verify`` writes beside them (megabytes of tensors) are removed after the
step, since any run regenerates them (``hopfield-aa verify --out DIR`` keeps them in DIR/counterexamples).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ANALYSIS = ROOT / "analysis"
VERIFY_OUT = "papers/data/verify"


@dataclass(frozen=True)
class Step:
    """One regeneration step: a script of analysis/ (or a ``hopfield-aa`` subcommand) and what it writes."""

    name: str
    command: tuple[str, ...]
    outputs: str
    script: str | None = None  # path relative to the repository root that must exist
    quick_flag: tuple[str, ...] = ("--quick",)
    prune: tuple[str, ...] = ()  # paths (relative to the root) removed after the step succeeds

    def path(self) -> Path | None:
        return None if self.script is None else ROOT / self.script

    def missing(self) -> bool:
        path = self.path()
        return path is not None and not path.is_file()

    def argv(self, quick: bool) -> list[str]:
        argv = [sys.executable, *self.command]
        if quick and self.quick_flag:
            argv += list(self.quick_flag)
        return argv

    def prune_outputs(self) -> list[Path]:
        """Remove the paths of ``prune`` that exist; return what was removed."""
        removed = []
        for relative in self.prune:
            path = ROOT / relative
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            else:
                continue
            removed.append(path)
        return removed


def _script(name: str, outputs: str, *extra: str) -> Step:
    return Step(name, (f"analysis/{name}.py", *extra), outputs, script=f"analysis/{name}.py")


# In dependency order: the shipped weights, the traces captured from them, verify on those traces, the
# theory tables from verify's results; then the model and guidance evaluations and the benchmarks.
STEPS: tuple[Step, ...] = (
    Step(
        "export_reference",
        ("-m", "hopfield_aa", "train-reference", "--export", "hopfield_aa/data/reference"),
        "hopfield_aa/data/reference/ (the shipped pipeline, from the committed training checkpoint)",
        quick_flag=(),
    ),
    Step(
        "capture_reference_traces",
        ("analysis/capture_reference_traces.py",),
        "hopfield_aa/data/traces/ (the bundled traces, from the shipped pipeline)",
        script="analysis/capture_reference_traces.py",
        quick_flag=(),
    ),
    Step(
        "verify",
        ("-m", "hopfield_aa", "verify", "--out", VERIFY_OUT, "--no-progress"),
        f"{VERIFY_OUT}/ (results.json, report.md, figures; counter-examples removed)",
        prune=(f"{VERIFY_OUT}/counterexamples",),
    ),
    Step(
        "theory_tables",
        ("analysis/theory_tables.py",),
        "tables in papers/theory.md",
        "analysis/theory_tables.py",
        (),
    ),
    _script("docs_figures", "docs/figures/*.png"),
    _script("bench_entmax", "analysis/results/bench_entmax.md"),
    _script("bench_anderson", "analysis/results/bench_anderson.md"),
    _script("bench_capture", "analysis/results/bench_capture.md"),
    _script("eval_reference", "analysis/results/reference_eval.md"),
    Step(
        "diagnose_reference",
        ("analysis/diagnose_reference.py", "--out", "analysis/results/reference_diagnosis.json"),
        "analysis/results/reference_diagnosis.json",
        script="analysis/diagnose_reference.py",
        quick_flag=("--n", "16"),
    ),
    _script("eval_guidance", "papers/reproduction.md tables and figures"),
    _script("bench_guidance_overhead", "analysis/results/guidance_overhead.md"),
)
STEP_NAMES = tuple(step.name for step in STEPS)


def select(only: str | None) -> list[Step]:
    """The steps named in ``only`` (comma-separated), in dependency order; all when None."""
    if not only:
        return list(STEPS)
    wanted = [name.strip() for name in only.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in STEP_NAMES]
    if unknown:
        raise SystemExit(f"unknown step(s) {', '.join(unknown)}; steps are: {', '.join(STEP_NAMES)}")
    return [step for step in STEPS if step.name in wanted]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Example: python analysis/make_all.py --quick --only verify,theory_tables",
    )
    parser.add_argument("--quick", action="store_true", help="pass --quick to every step that has it")
    parser.add_argument("--only", default=None, help=f"comma-separated steps ({', '.join(STEP_NAMES)})")
    parser.add_argument("--list", action="store_true", help="list the steps and whether their scripts exist")
    parser.add_argument(
        "--allow-missing", action="store_true", help="exit 0 even if some scripts are missing"
    )
    parser.add_argument("--keep-going", action="store_true", help="run the remaining steps after a failure")
    args = parser.parse_args(argv)
    steps = select(args.only)

    if args.list:
        for step in steps:
            state = "missing" if step.missing() else "ready"
            print(f"{step.name:<24} {state:<8} {shlex.join(step.argv(args.quick)[1:])}  ->  {step.outputs}")
        return 0

    report: list[tuple[str, str, float]] = []
    failed = False
    for step in steps:
        if step.missing():
            report.append((step.name, f"missing ({step.script} does not exist)", 0.0))
            continue
        if failed and not args.keep_going:
            report.append((step.name, "not run (an earlier step failed)", 0.0))
            continue
        argv_step = step.argv(args.quick)
        print(f"==> {step.name}: {shlex.join(argv_step[1:])}", flush=True)
        start = time.perf_counter()
        code = subprocess.call(argv_step, cwd=ROOT)
        seconds = time.perf_counter() - start
        if code == 0:
            for path in step.prune_outputs():
                print(f"    removed {path.relative_to(ROOT)} (regenerated by any run of the step)")
        report.append((step.name, "ok" if code == 0 else f"FAILED (exit {code})", seconds))
        failed = failed or code != 0

    print("\nstep                     result")
    for name, result, seconds in report:
        print(f"{name:<24} {result}" + (f"  ({seconds:.0f} s)" if seconds else ""))
    missing = [name for name, result, _ in report if result.startswith("missing")]
    if failed:
        return 1
    if missing and not args.allow_missing:
        print(f"\nmissing scripts: {', '.join(missing)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
