"""``verify`` on Dask: every synthetic case and every selected trace record becomes one task of a
``distributed`` cluster (a ``LocalCluster`` on one machine, or a scheduler address); results stream back
as they finish and reduce, in the serial run's order, into the same report.

Counter-examples: each task keeps the ones its own cases offer (at the run's per-claim cap) in memory and
returns them; the client then offers them, in the serial order, to the run's one
:class:`~hopfield_aa.checks.results.CounterexampleStore`. A task drops only instances that the serial run
would also have dropped (the ``limit`` worse ones of the same claim came before them), so the folder and
every path in results.json are those of a serial run.

Workers must import ``hopfield_aa`` (the same version) and, for traces, read the capture directories at
the path the client gives (a shared file system on a cluster). Install with ``pip install
'hopfield-aa[dask]'``.
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hopfield_aa.checks.results import Case, CheckResult, CounterexampleStore

LOCAL = re.compile(r"^local(?::(\d+))?$")
CONNECT_TIMEOUT_S = 10


class DaskError(RuntimeError):
    """Dask cannot be used as asked: ``distributed`` is missing, the address is malformed or unreachable."""


@dataclass
class _Offer:
    """One counter-example a task's store accepted: claim, margin, the path it had on the worker, files."""

    claim: str
    margin: float
    path: str
    files: dict[str, bytes]


@dataclass
class _UnitResult:
    """What one task returns: per case (the case for trace records, else None), results, fixed-point
    summary and seconds; and the counter-examples its store accepted, in order."""

    index: int
    cases: list[tuple[Case | None, list[CheckResult], dict[str, Any], float]]
    offers: list[_Offer] = field(default_factory=list)


class _RecordingStore(CounterexampleStore):
    """A task's store: the same cap as the run's, files written to a scratch folder and kept as bytes."""

    def __init__(self, directory: Path, limit: int | None) -> None:
        super().__init__(directory, limit)
        self.offers: list[_Offer] = []

    def offer(self, claim: str, margin: float, write: Callable[[Path], str]) -> str | None:
        def recording(folder: Path) -> str:
            path = write(folder)
            json_path = Path(path)
            files = {
                p.name: p.read_bytes()
                for p in (json_path, json_path.with_suffix(".safetensors"))
                if p.is_file()
            }
            self.offers.append(_Offer(claim, margin, path, files))
            return path

        return super().offer(claim, margin, recording)


def parse_dask(spec: str) -> tuple[str, int | None]:
    """``"local"`` / ``"local:N"`` -> ``("local", N or None)``; anything else is a scheduler address."""
    text = spec.strip()
    match = LOCAL.match(text)
    if match:
        n = None if match.group(1) is None else int(match.group(1))
        if n is not None and n < 1:
            raise DaskError(f"local:N needs N >= 1 workers, got {text!r}")
        return "local", n
    if not text or any(c.isspace() for c in text):
        raise DaskError(
            f"expected 'local', 'local:N' or a scheduler address like tcp://host:8786, got {spec!r}"
        )
    return text, None


def connect(spec: str) -> tuple[Any, Callable[[], None], str]:
    """Open a ``distributed.Client`` for ``spec``: ``local[:N]`` starts a ``LocalCluster`` of N worker
    processes (default: one per CPU core) with one thread each; an address connects to that scheduler.

    Returns ``(client, close, description)``; ``close()`` shuts the client (and a local cluster) down.
    Raises :class:`DaskError` when ``distributed`` is not installed or the scheduler cannot be reached.
    """
    target, n_workers = parse_dask(spec)
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise DaskError(
            "the Dask scheduler client is not installed: pip install 'hopfield-aa[dask]' "
            "(or 'dask[distributed]')"
        ) from exc
    if target == "local":
        n = n_workers or os.cpu_count() or 1
        cluster = LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=40
        )
        client = Client(cluster)

        def close_local() -> None:
            client.close()
            cluster.close()

        return client, close_local, f"dask LocalCluster, {n} worker(s) x 1 thread"
    try:
        client = Client(target, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        raise DaskError(
            f"cannot reach a Dask scheduler at {target} within {CONNECT_TIMEOUT_S} s ({exc}); start one "
            "with 'dask scheduler' and workers with 'dask worker ADDRESS', or use local[:N]"
        ) from exc
    n = len(client.scheduler_info().get("workers", {}))
    return client, client.close, f"dask scheduler {target}, {n} worker(s)"


@functools.lru_cache(maxsize=8)
def _open_traces(directory: str, stamp: tuple[int, int]) -> Any:
    """A worker's open TraceSet of a capture (one per manifest version: ``stamp`` is its mtime and size)."""
    from hopfield_aa.traces.loader import TraceSet

    del stamp  # part of the cache key only
    return TraceSet(directory)


def _run_unit(
    index: int,
    unit: Case | tuple[str, int],
    claim_keys: Sequence[str],
    trace_options: dict[str, Any],
    limit: int | None,
    threads: int,
) -> _UnitResult:
    """The task: run the claims on a synthetic case, or on every kept head of one trace record."""
    from hopfield_aa.checks.registry import KEYS, run_claims
    from hopfield_aa.checks.traces import record_cases

    torch.set_num_threads(threads)
    if isinstance(unit, Case):
        cases: list[Case] = [unit]
    else:
        directory, record = unit
        manifest = os.stat(Path(directory) / "manifest.json")
        traces = _open_traces(directory, (manifest.st_mtime_ns, manifest.st_size))
        cases = record_cases(traces, record, **trace_options)
    runners = [KEYS[key] for key in claim_keys]
    out = _UnitResult(index, [])
    with tempfile.TemporaryDirectory(prefix="hopfield-aa-verify-") as scratch:
        store = _RecordingStore(Path(scratch), limit)
        for case in cases:
            kept_case = None if isinstance(unit, Case) else case
            out.cases.append((kept_case, *run_claims(case, runners, store)))
        out.offers = store.offers
    return out


def run_on_dask(
    client: Any,
    synthetic: Sequence[Case],
    trace_records: Sequence[tuple[Path, int]],
    *,
    claim_keys: Sequence[str],
    trace_options: dict[str, Any],
    store: CounterexampleStore,
    progress: bool = True,
) -> list[tuple[Case, list[CheckResult], dict[str, Any], float]]:
    """Run every unit on ``client``'s cluster; return ``(case, results, fixed-point summary, seconds)`` per
    case in the serial order, with the counter-examples written to ``store`` as a serial run writes them."""
    from distributed import as_completed
    from tqdm.auto import tqdm

    units: list[Case | tuple[str, int]] = [*synthetic, *((str(d), i) for d, i in trace_records)]
    threads = torch.get_num_threads()
    futures = [
        client.submit(
            _run_unit,
            i,
            unit,
            list(claim_keys),
            trace_options,
            store.limit,
            threads,
            key=f"hopfield-aa-verify-{i}-{os.getpid()}-{id(store)}",
            pure=False,
        )
        for i, unit in enumerate(units)
    ]
    done: dict[int, _UnitResult] = {}
    bar = tqdm(total=len(futures), desc="verify (dask)", unit="task", disable=not progress, leave=False)
    for future in as_completed(futures):
        result: _UnitResult = future.result()
        done[result.index] = result
        future.release()
        bar.update(1)
    bar.close()
    out: list[tuple[Case, list[CheckResult], dict[str, Any], float]] = []
    for i, unit in enumerate(units):
        result = done[i]
        renamed = _replay_offers(result.offers, store)
        for case, results, summary, seconds in result.cases:
            for r in results:
                r.counterexamples = [kept for p in r.counterexamples if (kept := renamed.get(p))]
            out.append((unit if isinstance(unit, Case) else _required(case), results, summary, seconds))
    return out


def _required(case: Case | None) -> Case:
    assert case is not None
    return case


def _replay_offers(offers: Sequence[_Offer], store: CounterexampleStore) -> dict[str, str | None]:
    """Offer a task's counter-examples to the run's store in order; worker path -> path kept (or None)."""
    renamed: dict[str, str | None] = {}
    for offer in offers:

        def write(folder: Path, offer: _Offer = offer) -> str:
            from hopfield_aa._io import write_bytes

            for name, data in offer.files.items():
                write_bytes(folder / name, data)
            return str(folder / Path(offer.path).name)

        renamed[offer.path] = store.offer(offer.claim, offer.margin, write)
    return renamed


__all__ = ["DaskError", "connect", "parse_dask", "run_on_dask"]
