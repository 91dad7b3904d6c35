"""Benchmark hygiene for every ``analysis/bench_*.py``: a table is only as good as the machine was quiet.

Each benchmark wraps its timed work in :func:`quiet_machine`, which

1. waits (up to ``--wait-quiet`` seconds) until the 1-minute load average is at most 0.5 per core,
2. records the load average before and after the run, and
3. decides whether the table may be published: the load of *other* jobs (the load average minus the
   benchmark's own busy threads, which the kernel counts too) must stay at or below 0.5 per core.

:func:`start` also makes the allocator steadier (:func:`steady_allocator`): with glibc's defaults a buffer
of 32 MiB or more is mapped fresh from the OS on every allocation and page-faulted in on first touch (about
2 µs per 4 KiB page on this VM), so ``torch.softmax`` on 8192×1024 float32 took 22–23 ms per call, and
5.2–5.8 ms with mmap off (three processes each, quiet machine). Smaller buffers can still fault in either
mode, depending on the process's allocation history (32768×77: 2.4 or 7.1–7.4 ms), so a ratio is only
read between calls timed interleaved in one process.

:func:`write_table` then writes the table atomically, or refuses (exit status 3, the table printed but not
written) when the machine was loaded; ``--allow-load`` writes it anyway under a red banner, so a loaded
table can never pass for a quiet one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QUIET_PER_CORE = 0.5
"""Most load of other jobs per core under which a timing is published."""


def _fmt(load: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.2f}" for x in load)


@dataclass
class LoadRecord:
    """The load average (1, 5, 15 min) around one benchmark run and the verdict on it.

    ``own_threads`` is how many threads the benchmark itself keeps busy (its torch threads): the kernel
    counts them in the load average, so they are subtracted before the per-core rule is applied.
    """

    own_threads: int
    cores: int = field(default_factory=lambda: os.cpu_count() or 1)
    allocator: str = "default"
    before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    waited_s: float = 0.0

    @property
    def other_load(self) -> float:
        """The largest 1-minute load of other jobs seen: before the run, and after it less our own threads."""
        return max(self.before[0], self.after[0] - self.own_threads)

    @property
    def quiet(self) -> bool:
        return self.other_load <= QUIET_PER_CORE * self.cores

    def lines(self) -> list[str]:
        """Markdown lines for the table's header: the numbers, and a red banner when it was loaded."""
        verdict = (
            f"quiet (other jobs ≤ {QUIET_PER_CORE} per core)"
            if self.quiet
            else f"LOADED: other jobs {self.other_load / self.cores:.2f} per core > {QUIET_PER_CORE}"
        )
        out = [
            f"- load average (1/5/15 min) before {_fmt(self.before)}, after {_fmt(self.after)} on "
            f"{self.cores} cores; the benchmark's own {self.own_threads} thread(s) counted out of 'after': "
            f"{verdict}",
            f"- allocator: {self.allocator}",
        ]
        if not self.quiet:
            out.insert(
                0,
                '<p style="color:red"><b>Measured on a loaded machine: these timings are not evidence; '
                "re-run on a quiet machine.</b></p>\n",
            )
        return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--wait-quiet`` and ``--allow-load``, the same in every benchmark."""
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=180.0,
        metavar="SECONDS",
        help="wait up to this long for the 1-min load average to fall to 0.5 per core (default 180)",
    )
    parser.add_argument(
        "--allow-load",
        action="store_true",
        help="write the table even if the machine was loaded (it is then marked in red)",
    )


def wait_until_quiet(timeout_s: float, cores: int | None = None, poll_s: float = 5.0) -> float:
    """Sleep until the 1-min load average is at most 0.5 per core or ``timeout_s`` passed; seconds waited."""
    cores = cores or os.cpu_count() or 1
    start = time.monotonic()
    while os.getloadavg()[0] > QUIET_PER_CORE * cores and time.monotonic() - start < timeout_s:
        print(
            f"waiting for a quiet machine: load {os.getloadavg()[0]:.2f} on {cores} cores",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(poll_s)
    return time.monotonic() - start


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (glibc malloc.h)


def steady_allocator() -> str:
    """Serve every allocation from the heap and never give it back (glibc ``mallopt``: no mmap, no trim),
    so that buffers of 32 MiB and more are not mapped and page-faulted in per call; a description for the
    table. Elsewhere than glibc, nothing is changed and the description says so."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError):
        ok = False
    if ok:
        return "glibc malloc without mmap or trimming (buffers of ≥ 32 MiB are not mapped afresh per call)"
    return "the platform's default (no glibc mallopt): large buffers may be mapped afresh per call"


def start(args: argparse.Namespace, own_threads: int = 1) -> LoadRecord:
    """Make the allocator steady, wait for a quiet machine (``--wait-quiet``), then record the load
    average before the timed work."""
    record = LoadRecord(own_threads=own_threads, allocator=steady_allocator())
    record.waited_s = wait_until_quiet(getattr(args, "wait_quiet", 0.0), record.cores)
    record.before = os.getloadavg()
    return record


def stop(record: LoadRecord) -> LoadRecord:
    """Record the load average after the timed work."""
    record.after = os.getloadavg()
    return record


@contextmanager
def quiet_machine(args: argparse.Namespace, own_threads: int = 1) -> Iterator[LoadRecord]:
    """:func:`start` and :func:`stop` around a ``with`` block."""
    record = start(args, own_threads)
    try:
        yield record
    finally:
        stop(record)


def write_table(
    path: str | os.PathLike[str], text: str, record: LoadRecord, args: argparse.Namespace
) -> bool:
    """Print ``text``; write it to ``path`` (atomically) if the machine was quiet or ``--allow-load``.

    The load lines of ``record`` are inserted after the table's title line. Returns whether it was written;
    a refused table exits the process with status 3 after printing it.
    """
    from hopfield_aa._io import write_text

    title, _, rest = text.partition("\n")
    text = "\n".join([title, "", *record.lines(), rest.lstrip("\n")])
    print(text)
    if not record.quiet and not getattr(args, "allow_load", False):
        print(
            f"not written: the machine was loaded ({record.other_load:.2f} from other jobs on {record.cores} "
            f"cores); re-run when it is quiet, or pass --allow-load to write it marked in red",
            file=sys.stderr,
        )
        raise SystemExit(3)
    write_text(Path(path), text if text.endswith("\n") else text + "\n")
    return True


def peak_allocated(fn: Callable[[], object]) -> int:
    """Peak bytes of CPU tensor memory alive during one call of ``fn``, above what was alive before it.

    From torch.profiler's memory events in time order (each op's own allocations less its frees, and
    the frees between ops); a temporary that one ATen op allocates and frees inside itself is not seen,
    so this is a lower bound of the allocator's peak, exact for chains of ops that do not.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def top_ops_table(events: Any, per: float = 1.0, label: str = "call", top: int = 12) -> list[str]:
    """Markdown rows of the ``top`` ops by self CPU time in torch.profiler's ``key_averages()``
    ``events``: calls and self CPU µs per ``label`` (the run held ``per`` of them) and the share of all
    self CPU time. The profiler adds its own cost to every op, so the shares are the reading."""
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ranked) or 1.0
    lines = [f"| op | calls per {label} | self CPU µs per {label} | share |", "|---|---:|---:|---:|"]
    for e in ranked[:top]:
        lines.append(
            f"| `{e.key}` | {e.count / per:.3g} | {e.self_cpu_time_total / per:.0f} "
            f"| {e.self_cpu_time_total / total:.1%} |"
        )
    return lines
