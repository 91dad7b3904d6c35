"""The CUDA paths on a GPU, in one prepared run of a few minutes: α-entmax against softmax and the
``entmax`` package, guided attention against stock attention at Stable-Diffusion shapes, and Anderson's
per-iteration overhead against one evaluation of the Hopfield map.

Run it as one script on a GPU machine (it needs nothing but this checkout and an installed package)::

    python analysis/bench_gpu.py                      # writes analysis/results/bench_gpu.md
    python analysis/bench_gpu.py --device cpu --quick # a smoke run of the same code on a CPU

Times are CUDA-event times (median of ``--repeats`` calls after warm-up, each call synchronised); peak
memory is ``torch.cuda.max_memory_allocated`` above the inputs. Every ratio is measured side by side in
this one run, and the load average is recorded around it as in every benchmark (``_bench``). Until a
GPU has been available, ``bench_gpu.md`` says that the GPU table is owed and what it will hold.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import _bench as bench
import torch
import torch.nn.functional as F

from hopfield_aa.anderson import anderson
from hopfield_aa.guidance.attention import guided_attention
from hopfield_aa.guidance.rules import extrapolate_rule, gag_rule
from hopfield_aa.normalizers import entmax_backend, entmax_tensor

ROOT = Path(__file__).resolve().parent.parent
ENTMAX_SHAPES = [(32768, 77), (16384, 256), (8192, 1024)]
ALPHAS = (1.5, 2.0, 1.25)


class Timer:
    """Median time of a call in ms: CUDA events on a GPU, ``perf_counter`` elsewhere."""

    def __init__(self, device: torch.device, repeats: int, warmup: int = 3) -> None:
        self.device, self.repeats, self.warmup = device, repeats, warmup

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # Callable[..., object]: fn is called without arguments, but the callers' lambdas bind loop variables
    # as defaults (lambda z=z: ...), which mypy cannot infer against Callable[[], object]
    def __call__(self, fn: Callable[..., object]) -> float:
        for _ in range(self.warmup):
            fn()
        self.sync()
        times = []
        for _ in range(self.repeats):
            if self.device.type == "cuda":
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                stop.record()
                stop.synchronize()
                times.append(start.elapsed_time(stop))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    def peak_mib(self, fn: Callable[[], object]) -> float:
        """Peak memory allocated by one call above what was allocated before it (CUDA only; NaN else)."""
        if self.device.type != "cuda":
            return math.nan
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        fn()
        self.sync()
        return (torch.cuda.max_memory_allocated(self.device) - before) / 2**20


def entmax_section(timer: Timer, shapes: list[tuple[int, int]], dtype: torch.dtype) -> list[str]:
    """Forward time of ours (eager, compiled backend) and the ``entmax`` package, as ratios to softmax."""
    try:
        import entmax as package
    except ImportError:  # the bench extra is not installed
        package = None
    package_fns: dict[float, Callable[[torch.Tensor], torch.Tensor]] = {}
    if package is not None:
        package_fns = {
            1.5: lambda x: package.entmax15(x, dim=-1),
            2.0: lambda x: package.sparsemax(x, dim=-1),
            1.25: lambda x: package.entmax_bisect(x, 1.25, dim=-1),
        }
    lines = [
        f"### α-entmax forward, {str(dtype).removeprefix('torch.')}: ratio to softmax",
        "",
        "| rows × n | softmax (ms) | α | ours | ours, compiled backend | `entmax` package "
        "| ours vs package |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    gen = torch.Generator(device="cpu").manual_seed(0)
    for rows, n in shapes:
        z = (3 * torch.randn(rows, n, generator=gen)).to(timer.device, dtype)
        soft = timer(lambda z=z: torch.softmax(z, -1))
        for alpha in ALPHAS:
            ours = timer(lambda z=z, a=alpha: entmax_tensor(z, a, -1))
            try:
                with entmax_backend("compiled"):
                    compiled = timer(lambda z=z, a=alpha: entmax_tensor(z, a, -1))
            except Exception as error:  # the compiler's failures are not one exception type
                print(f"compiled backend failed at α = {alpha}: {error}", file=sys.stderr)
                compiled = math.nan
            fn = package_fns.get(alpha)
            pkg = timer(lambda z=z, fn=fn: fn(z)) if fn is not None else math.nan
            lines.append(
                f"| {rows} × {n} | {soft:.3f} | {alpha:g} | {ours / soft:.2f}× | {compiled / soft:.2f}× "
                f"| {pkg / soft:.2f}× | {pkg / ours:.1f}× faster |"
            )
    return lines


def attention_section(timer: Timer, batch: int, heads: int, queries: int, keys: int, dim: int) -> list[str]:
    """Guided attention (GAG defaults, extrapolation; eager and compiled) against stock SDPA, fp16."""
    dtype = torch.float16 if timer.device.type == "cuda" else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (
        torch.randn(batch, heads, n, dim, generator=gen).to(timer.device, dtype)
        for n in (queries, keys, keys)
    )
    scale = dim**-0.5
    calls: dict[str, Callable[[], object]] = {
        "stock SDPA": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale),
        "GAG ζ=0 (default), eager": lambda: guided_attention(
            q, k, v, lambda r: gag_rule(r, 1.0), (1.0, 1.5), scale=scale
        ),
        "GAG ζ=0 (default), compiled": lambda: guided_attention(
            q, k, v, lambda r: gag_rule(r, 1.0), (1.0, 1.5), scale=scale, compiled=True
        ),
        "extrapolate λ=2, eager": lambda: guided_attention(
            q, k, v, lambda r: extrapolate_rule(r, 2.0), (1.0, 1.5), scale=scale
        ),
    }
    lines = [
        f"### Guided attention, {batch} × {heads} heads × {queries} queries × {keys} keys × d {dim}, "
        f"{str(dtype).removeprefix('torch.')}",
        "",
        "| call | time (ms) | ratio to stock | peak memory above inputs (MiB) |",
        "|---|---:|---:|---:|",
    ]
    times = {name: timer(fn) for name, fn in calls.items()}
    for name, fn in calls.items():
        ms = times[name]
        stock = times["stock SDPA"]
        lines.append(f"| {name} | {ms:.3f} | {ms / stock:.2f}× | {timer.peak_mib(fn):.1f} |")
    score_mib = batch * heads * queries * keys * 4 / 2**20
    lines += ["", f"One float32 score matrix is {score_mib:.1f} MiB at this shape."]
    return lines


def anderson_section(timer: Timer, batch: int, beta: float = 7.5) -> list[str]:
    """Anderson's time per iteration (all rows active) against one evaluation of the Hopfield map: the
    problem of ``bench_anderson.hopfield_problem``, built here on the device (that module imports scipy
    and torchdeq, which this run does not need)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    patterns = torch.randn(64, 32, generator=gen, dtype=torch.float64)
    patterns = (patterns / patterns.norm(dim=1, keepdim=True)).to(timer.device)
    x0 = patterns[torch.randint(0, 64, (batch,), generator=gen).to(timer.device)]
    x0 = x0 + 0.5 * torch.randn(batch, 32, generator=gen, dtype=torch.float64).to(timer.device) / 32**0.5

    def g(xi: torch.Tensor) -> torch.Tensor:
        return torch.softmax(beta * xi @ patterns.T, dim=-1) @ patterns

    map_ms = timer(lambda: g(x0))
    lines = [
        f"### Anderson acceleration, Hopfield map β = {beta:g} (N = 64, d = 32, float64), batch {batch}",
        "",
        "| m | map evaluation (ms) | one iteration (ms) | iteration / map |",
        "|---:|---:|---:|---:|",
    ]
    for m in (1, 5):
        short = timer(lambda m=m: anderson(g, x0, m=m, tol=0.0, max_iter=4))
        long = timer(lambda m=m: anderson(g, x0, m=m, tol=0.0, max_iter=10))
        per_iteration = (long - short) / 6
        lines.append(f"| {m} | {map_ms:.3f} | {per_iteration:.3f} | {per_iteration / map_ms:.2f}× |")
    result = anderson(g, x0, m=5, max_iter=200)
    lines += ["", f"Rows converged at β = {beta:g}, m = 5: {int(result.converged.sum())}/{batch}."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="small shapes, 3 repeats: a smoke run")
    parser.add_argument("--out", default=str(ROOT / "analysis/results/bench_gpu.md"))
    bench.add_arguments(parser)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (use --device cpu for a smoke run)")
    timer = Timer(device, 3 if args.quick else args.repeats)
    load = bench.start(args, own_threads=1)
    shapes = [(256, 77), (64, 256)] if args.quick else ENTMAX_SHAPES
    attention = (1, 2, 256, 77, 64) if args.quick else (2, 10, 4096, 77, 64)
    start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    sections = [
        "# GPU timings: entmax, guided attention, Anderson",
        "",
        f"Device: {name}; torch {torch.__version__}. Command: `python analysis/bench_gpu.py"
        f"{' --quick' if args.quick else ''}{'' if device.type == 'cuda' else ' --device ' + args.device}`. "
        f"Median of {timer.repeats} calls after warm-up, side by side in one run.",
    ]
    for dtype in (torch.float32, torch.float16) if device.type == "cuda" else (torch.float32,):
        sections += ["", *entmax_section(timer, shapes, dtype)]
        print("\n".join(sections[-len(shapes) * len(ALPHAS) - 4 :]), flush=True)
    sections += ["", *attention_section(timer, *attention)]
    sections += ["", *anderson_section(timer, 32 if args.quick else 256)]
    sections += ["", f"Wall time of the whole run: {time.perf_counter() - start:.0f} s."]
    bench.stop(load)
    bench.write_table(args.out, "\n".join(sections) + "\n", load, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
