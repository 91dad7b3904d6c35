"""Side by side, in one run: the Anderson solver as it is (`hopfield_aa.anderson`) against the solver before
its init/step/terminate split (the version with the whole-batch fast path, read from git), on the problems of
``bench_anderson.py``; process CPU time to tol = 1e-8, medians of interleaved repeats, one thread.

    python analysis/bench_anderson_refactor.py [--base 477ca6a~1] [--repeats 7]

Writes ``analysis/results/bench_anderson_refactor.md`` (refused on a loaded machine: see ``_bench.py``).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _bench as bench
import torch
from bench_anderson import affine_problem, hopfield_problem

from hopfield_aa.anderson import anderson

ROOT = Path(__file__).resolve().parents[1]


def old_solver(base: str):
    """``anderson`` of ``hopfield_aa/anderson.py`` at git revision ``base``, beside the current one."""
    source = subprocess.run(
        ["git", "show", f"{base}:hopfield_aa/anderson.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "anderson_base.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("anderson_base", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["anderson_base"] = module
    spec.loader.exec_module(module)
    return module.anderson


def cpu_time(solve, g, x0, m: int) -> float:
    start = time.process_time()
    solve(g, x0.clone(), m=m, tol=1e-8, max_iter=500, stability_check=False)
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="477ca6a~1", help="git revision of the earlier solver")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "analysis/results/bench_anderson_refactor.md"))
    bench.add_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    solvers = {"before": old_solver(args.base), "now": anderson}
    problems = [hopfield_problem(4.0, 256), hopfield_problem(7.5, 256), affine_problem(256)]
    load = bench.start(args, own_threads=1)
    rows = []
    for prob in problems:
        for m in (1, 5):
            times: dict[str, list[float]] = {name: [] for name in solvers}
            for solve in solvers.values():  # warm-up
                cpu_time(solve, prob.g, prob.x0, m)
            for _ in range(args.repeats):
                for name, solve in solvers.items():
                    times[name].append(cpu_time(solve, prob.g, prob.x0, m))
            before, now = (statistics.median(times[k]) for k in ("before", "now"))
            spread = max((max(v) - min(v)) / statistics.median(v) for v in times.values())
            rows.append(
                f"| {prob.name} | {m} | {before * 1e3:.1f} | {now * 1e3:.1f} | {now / before:.2f}× "
                f"| {spread:.0%} |"
            )
            print(rows[-1], flush=True)
    bench.stop(load)
    text = "\n".join(
        [
            "# Anderson solver: before and after the init/step/terminate split, side by side",
            "",
            "- command: `python analysis/bench_anderson_refactor.py "
            f"--base {args.base} --repeats {args.repeats}`",
            "- batch 256, tol = 1e-8, no stability check, float64, one thread; process CPU time to the "
            "tolerance, medians of interleaved repeats; spread = the larger (max − min)/median of the two",
            "",
            "| problem | m | before ms | now ms | now / before | spread |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    bench.write_table(args.out, text, load, args)


if __name__ == "__main__":
    main()
