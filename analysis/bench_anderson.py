"""Benchmark of hopfield_aa.anderson against scipy.optimize.anderson, torchdeq's anderson_solver and
plain iteration on batched Hopfield retrieval (β = 4, 7.5) and an affine contraction.

Run: ``python analysis/bench_anderson.py`` (``--quick`` for a smoke run); writes
analysis/results/bench_anderson.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import cast

import _bench as bench
import numpy as np
import scipy
import scipy.optimize
import torch
from torchdeq.solver.anderson import anderson_solver

from hopfield_aa.anderson import anderson

F64 = torch.float64
TOL = 1e-8  # relative residual ‖g(x) − x‖ ≤ TOL · ‖g(x0) − x0‖ per row


class Problem:
    def __init__(self, name: str, g: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor) -> None:
        self.name, self.g, self.x0 = name, g, x0
        self.f0 = (g(x0) - x0).norm(dim=1)
        self.top_eig: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.reference: torch.Tensor | None = None  # where plain iteration ends


def hopfield_problem(beta: float, batch: int, seed: int = 0) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.randn(64, 32, generator=gen, dtype=F64)
    patterns = patterns / patterns.norm(dim=1, keepdim=True)
    # states start at noisy stored patterns: pattern + Gaussian noise of norm ≈ 0.5
    idx = torch.randint(0, 64, (batch,), generator=gen)
    x0 = patterns[idx] + 0.5 * torch.randn(batch, 32, generator=gen, dtype=F64) / 32**0.5

    def g(xi: torch.Tensor) -> torch.Tensor:
        return torch.softmax(beta * xi @ patterns.T, dim=-1) @ patterns

    def top_eig(xi: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(beta * xi @ patterns.T, dim=-1)
        jac = beta * patterns.T @ (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) @ patterns
        return torch.linalg.eigvalsh(jac)[:, -1]

    prob = Problem(f"Hopfield β={beta:g} (N=64, d=32)", g, x0)
    prob.top_eig = top_eig
    x = x0.clone()
    for _ in range(5000):
        x = g(x)
    prob.reference = x
    return prob


def affine_problem(batch: int, n: int = 200, seed: int = 0) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=gen, dtype=F64)
    a = a * (0.95 / torch.linalg.eigvals(a).abs().max())  # non-symmetric, spectral radius 0.95
    c = torch.randn(n, generator=gen, dtype=F64)
    at = a.T.contiguous()
    x0 = torch.randn(batch, n, generator=gen, dtype=F64)  # rows differ in their starting point
    prob = Problem(f"affine, n={n}, ρ(A)=0.95", lambda x: x @ at + c, x0)
    prob.reference = torch.linalg.solve(torch.eye(n, dtype=F64) - a, c).expand(batch, n)
    return prob


# ---------------------------------------------------------------------------------------------------
# Solvers: each returns (final x (B, n), evaluations to TOL per row (nan if never), CPU seconds)


def first_hit(residuals: list[torch.Tensor], f0: torch.Tensor) -> torch.Tensor:
    """Per row, the 1-based index of the first evaluation with ‖f‖ ≤ TOL ‖f0‖ (nan if none)."""
    r = torch.stack(residuals)
    hit = r <= TOL * f0
    first = hit.float().argmax(0).double() + 1
    return torch.where(hit.any(0), first, torch.full_like(first, float("nan")))


def run_ours(prob: Problem, m: int, stability: bool) -> tuple[torch.Tensor, torch.Tensor, float, dict]:
    t = time.process_time()
    res = anderson(prob.g, prob.x0, m=m, tol=TOL, max_iter=2000, stability_check=stability)
    wall = time.process_time() - t
    # the result's arrays are of the kind of x0: tensors here
    x, converged, n_evals = (cast(torch.Tensor, a) for a in (res.x, res.converged, res.n_evals))
    nan = torch.full(n_evals.shape, float("nan"), dtype=F64)
    return x, torch.where(converged, n_evals.double(), nan), wall, {"calls": res.n_calls}


def run_plain(prob: Problem, max_iter: int = 5000) -> tuple[torch.Tensor, torch.Tensor, float, dict]:
    t = time.process_time()
    x = prob.x0.clone()
    res: list[torch.Tensor] = []
    for _ in range(max_iter):
        gx = prob.g(x)
        r = (gx - x).norm(dim=1)
        res.append(r)
        if bool((r <= TOL * prob.f0).all()):
            break
        x = gx
    wall = time.process_time() - t
    return x, first_hit(res, prob.f0), wall, {}


def run_torchdeq(prob: Problem, m: int, lam: float) -> tuple[torch.Tensor, torch.Tensor, float, dict]:
    res: list[torch.Tensor] = []

    def g(x: torch.Tensor) -> torch.Tensor:
        gx = prob.g(x)
        res.append((gx - x).norm(dim=1))
        return gx

    t = time.process_time()
    try:
        # torchdeq's m counts stored iterates: ours m difference columns = its m + 1 iterates
        z, _, _ = anderson_solver(
            g, prob.x0, max_iter=2000, tol=TOL * float(prob.f0.min()), stop_mode="abs", m=m + 1, lam=lam
        )
        note = ""
    except (RuntimeError, torch.linalg.LinAlgError) as err:
        z, note = prob.x0, f"error: {type(err).__name__}"
    wall = time.process_time() - t
    return z, first_hit(res, prob.f0), wall, {"note": note}


def run_scipy(prob: Problem, m: int, rows: int) -> tuple[torch.Tensor, torch.Tensor, float, dict]:
    xs, evals = [], []
    t = time.process_time()
    for i in range(rows):
        f0 = float(prob.f0[i])
        x0 = prob.x0[i].numpy()
        count, hit = [0], [float("nan")]

        def F(x: np.ndarray, f0: float = f0, count: list = count, hit: list = hit) -> np.ndarray:
            gx = prob.g(torch.from_numpy(x)[None])[0].numpy()
            count[0] += 1
            r = gx - x
            if np.isnan(hit[0]) and np.linalg.norm(r) <= TOL * f0:
                hit[0] = count[0]
            return r

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                # scipy's M keeps M difference pairs (= our m); alpha = 1 makes its first step g(x0)
                x = scipy.optimize.anderson(
                    F, x0, M=m, alpha=1.0, f_tol=TOL * f0, tol_norm=np.linalg.norm, maxiter=2000
                )
            except (scipy.optimize.NoConvergence, ValueError, np.linalg.LinAlgError) as err:
                x = err.args[0] if isinstance(err, scipy.optimize.NoConvergence) else x0
        xs.append(torch.as_tensor(np.asarray(x)))
        evals.append(hit[0])
    wall = time.process_time() - t
    return torch.stack(xs), torch.tensor(evals, dtype=F64), wall, {"rows": rows}


# ---------------------------------------------------------------------------------------------------


def summarise(prob: Problem, x: torch.Tensor, evals: torch.Tensor) -> dict:
    rows = x.shape[0]
    assert prob.reference is not None  # every problem sets it
    ref = prob.reference[:rows]
    finite = torch.isfinite(x).all(1)
    any_hit = bool(torch.isfinite(evals).any())
    same = ((x - ref).norm(dim=1) <= 1e-6 * (1 + ref.norm(dim=1))) & finite
    out = {
        "converged": int(torch.isfinite(evals).sum()),
        "rows": rows,
        "evals_med": float(np.nanmedian(evals.numpy())) if any_hit else float("nan"),
        "evals_max": float(np.nanmax(evals.numpy())) if any_hit else float("nan"),
        "at_plain": float(same.double().mean()),
    }
    if prob.top_eig is not None:
        xx = torch.where(finite[:, None], x, torch.zeros_like(x))
        out["stable"] = float(((prob.top_eig(xx) < 1) & finite).double().mean())
    return out


def map_time(prob: Problem, reps: int, calls: int = 20) -> float:
    x = prob.x0
    times = []
    for _ in range(reps):
        t = time.process_time()
        for _ in range(calls):
            prob.g(x)
        times.append((time.process_time() - t) / calls)
    return statistics.median(times)


def iteration_time(prob: Problem, m: int = 5) -> tuple[float, float, int]:
    """CPU seconds of one more iteration of ours with every row active (a 10- against a 4-iteration run,
    tol = 0), and the 4-iteration run's seconds and map calls."""
    seconds, calls = [], []
    for max_iter in (4, 10):
        t = time.process_time()
        res = anderson(prob.g, prob.x0, m=m, tol=0.0, max_iter=max_iter)
        seconds.append(time.process_time() - t)
        calls.append(res.n_calls)
    return (seconds[1] - seconds[0]) / (calls[1] - calls[0]), seconds[0], calls[0]


def iteration_profile(prob: Problem, m: int = 5, iterations: int = 20, top: int = 12) -> list[str]:
    """What one iteration of ours spends its time on: torch.profiler's top ops by self CPU over a run of
    ``iterations`` (every row active, tol = 0), per map call, next to the map's own ops."""
    from torch.profiler import ProfilerActivity, profile

    anderson(prob.g, prob.x0, m=m, tol=0.0, max_iter=iterations)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        res = anderson(prob.g, prob.x0, m=m, tol=0.0, max_iter=iterations)
    with profile(activities=[ProfilerActivity.CPU]) as map_prof:
        for _ in range(res.n_calls):
            prob.g(prob.x0)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    map_total = sum(e.self_cpu_time_total for e in map_prof.key_averages())
    ops = sum(e.count for e in events) / res.n_calls
    map_ops = sum(e.count for e in map_prof.key_averages()) / res.n_calls
    lines = [
        f"### Where an iteration goes: {prob.name}, m = {m}, torch.profiler over {res.n_calls} map calls",
        "",
        f"Per map call: {ops:.0f} profiler-counted ops and {total / res.n_calls:.0f} µs in the solver run "
        f"(the map alone: {map_ops:.0f} ops, {map_total / res.n_calls:.0f} µs; the profiler adds its own "
        "cost to every op, so the shares are the reading). On CPU the solver's own arithmetic runs in "
        "native kernels (numba), which are not aten ops: the table lists the ops around them, and their "
        "time is the rest of the µs per map call.",
        "",
        *bench.top_ops_table(events, per=res.n_calls, label="map call", top=top),
    ]
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small batch, m in {1, 5}, one repeat")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_anderson.md"))
    bench.add_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = bench.start(args, own_threads=1)
    batch = 32 if args.quick else 256
    depths = [1, 5] if args.quick else [1, 3, 5, 10]
    repeats = 1 if args.quick else 3
    scipy_rows = 16 if args.quick else 64

    problems = [hopfield_problem(4.0, batch), hopfield_problem(7.5, batch), affine_problem(batch)]
    record: dict[tuple[str, str, int], dict] = {}
    lines = [
        "# Anderson acceleration: hopfield_aa vs scipy, torchdeq, plain iteration",
        "",
        f"Command: `python analysis/bench_anderson.py{' --quick' if args.quick else ''}`. "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__} (1 thread), "
        f"scipy {scipy.__version__}, float64, CPU; the machine's 2 cores are shared with other jobs, so "
        "times are process CPU time (time.process_time), "
        f"medians of {repeats} interleaved repeats and the spread (max−min)/median is shown.",
        "",
        f"Batch {batch} rows. Hopfield: N = 64 random unit-norm patterns in d = 32, "
        "T(ξ) = Xᵀ softmax(β X ξ), each state started at a stored pattern plus Gaussian noise of norm ≈ 0.5. "
        "Affine: g(x) = A x + b, "
        "A random non-symmetric n = 200 with spectral radius 0.95, one b, random x0 per row. "
        "Converged: ‖g(x) − x‖ ≤ 1e-8 "
        "‖g(x0) − x0‖ at some evaluation (first hit counted from an instrumented map). 'evals' are map "
        "evaluations per row to that point (median / max over converged rows); ours counts only rows still "
        "active. 'at plain FP': final x within 1e-6 of where 5000 plain iterations end (affine: of the "
        "linear solve). 'stable': exact top eigenvalue of β Xᵀ(diag p − ppᵀ)X < 1 at the final x. "
        f"scipy is looped over the first {scipy_rows} rows only (CPU time scaled ×{batch // scipy_rows} "
        "to the batch). Depth m is ours (difference columns); torchdeq gets m + 1 stored iterates; scipy's M "
        "keeps M difference pairs, so M = m.",
        "",
    ]
    for prob in problems:
        lines += [f"## {prob.name}", ""]
        lines.append("| method | m | converged | evals med / max | at plain FP | stable | CPU ms (spread) |")
        lines.append("|---|---|---|---|---|---|---|")
        methods: list[tuple[str, int, Callable]] = [("plain iteration", 0, lambda p=prob: run_plain(p))]
        for m in depths:
            methods += [
                ("ours", m, lambda p=prob, m=m: run_ours(p, m, False)),
                ("ours + stability check", m, lambda p=prob, m=m: run_ours(p, m, True)),
                ("torchdeq λ=1e-4 (default)", m, lambda p=prob, m=m: run_torchdeq(p, m, 1e-4)),
                ("torchdeq λ=0", m, lambda p=prob, m=m: run_torchdeq(p, m, 0.0)),
                ("scipy.optimize.anderson", m, lambda p=prob, m=m: run_scipy(p, m, scipy_rows)),
            ]
        walls: dict[int, list[float]] = {i: [] for i in range(len(methods))}
        results: dict[int, tuple] = {}
        for _ in range(repeats):  # interleave methods inside each repeat
            for i, (_, _, fn) in enumerate(methods):
                x, evals, wall, extra = fn()
                walls[i].append(wall)
                results[i] = (x, evals, extra)
        for i, (name, m, _) in enumerate(methods):
            x, evals, extra = results[i]
            s = summarise(prob, x, evals)
            med = statistics.median(walls[i])
            spread = (max(walls[i]) - min(walls[i])) / med if med > 0 else 0.0
            scale = batch / extra["rows"] if "rows" in extra else 1.0
            stable = f"{s['stable']:.0%}" if "stable" in s else "n/a"
            note = f" {extra['note']}" if extra.get("note") else ""
            record[(prob.name, name, m)] = {**s, "wall": med * scale}
            lines.append(
                f"| {name}{note} | {m} | {s['converged']}/{s['rows']} "
                f"| {s['evals_med']:.0f} / {s['evals_max']:.0f} | {s['at_plain']:.0%} | {stable} "
                f"| {1e3 * med * scale:.1f} ({spread:.0%}) |"
            )
        lines.append("")

    # per-iteration overhead of ours at batch 256 (m = 5), against one batched map evaluation
    lines += ["## Per-iteration overhead (ours, m = 5, all rows active)", ""]
    lines.append(
        "Marginal cost of one iteration: (CPU time of a 10-iteration run − that of a 4-iteration run) / "
        "(difference in batched map calls), tol = 0 so every row stays active; the fixed cost "
        "(input checks, buffers, first evaluation, result) is the 4-iteration run minus 5 iterations; "
        "rows stay active through 10 iterations on every problem here."
    )
    lines.append("")
    lines.append(
        "| problem | map eval µs | ours per iteration µs | overhead µs | overhead / map eval | fixed µs |"
    )
    lines.append("|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(1)
    big_patterns = torch.randn(2048, 128, generator=gen, dtype=F64) / 128**0.5
    big = Problem(
        "Hopfield N=2048, d=128 (heavier map)",
        lambda x: torch.softmax(4.0 * x @ big_patterns.T, dim=-1) @ big_patterns,
        big_patterns[:batch] + 0.1 * torch.randn(batch, 128, generator=gen, dtype=F64) / 128**0.5,
    )
    ratios = {}
    for prob in [*problems, big]:
        maps, per, fixed = [], [], []
        for _ in range(repeats + 4):  # interleaved: one map timing, one solver timing
            maps.append(map_time(prob, 1))
            it, t_short, calls_short = iteration_time(prob)
            per.append(it)
            fixed.append(t_short - calls_short * it)
        t_map, t_it = statistics.median(maps), statistics.median(per)
        ratios[prob.name] = (t_it - t_map) / t_map
        lines.append(
            f"| {prob.name} | {1e6 * t_map:.0f} | {1e6 * t_it:.0f} | {1e6 * (t_it - t_map):.0f} "
            f"| {ratios[prob.name]:.2f}x | {1e6 * statistics.median(fixed):.0f} |"
        )
    lines.append("")
    lines += iteration_profile(problems[0])

    # the targets, checked on this run's numbers
    peers = ["torchdeq λ=1e-4 (default)", "torchdeq λ=0", "scipy.optimize.anderson"]
    lines += ["## Targets on this run", ""]
    for prob in (problems[0], problems[2]):
        for m in depths:
            ours = record[(prob.name, "ours", m)]["evals_med"]
            best = min(record[(prob.name, peer, m)]["evals_med"] for peer in peers)
            verdict = "met" if ours <= best else "NOT met"
            lines.append(f"- {prob.name}, m={m}: ours {ours:.0f} evals vs best peer {best:.0f}: {verdict}")
    hard = problems[1]
    for variant in ("ours", "ours + stability check"):
        ok = all(
            record[(hard.name, variant, m)]["converged"] == batch
            and record[(hard.name, variant, m)]["stable"] == 1
            for m in depths
        )
        lines.append(f"- {hard.name}, {variant}: all rows converged to stable fixed points for every m: {ok}")
    speedups = [
        record[(prob.name, "scipy.optimize.anderson", m)]["wall"] / record[(prob.name, "ours", m)]["wall"]
        for prob in problems
        for m in depths
    ]
    lines.append(
        f"- batched vs scipy looped over rows: {min(speedups):.1f}x to {max(speedups):.1f}x "
        "faster (target 20x)"
    )
    lines.append(
        "- per-iteration overhead / map evaluation (target ≤ 1.5x at batch 256): "
        + ", ".join(f"{name}: {r:.2f}x ({'met' if r <= 1.5 else 'NOT met'})" for name, r in ratios.items())
    )
    lines.append("")
    bench.stop(load)
    bench.write_table(args.out, "\n".join(lines) + "\n", load, args)


if __name__ == "__main__":
    main()
