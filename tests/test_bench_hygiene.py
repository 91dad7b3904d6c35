"""The benchmarks' hygiene rule (analysis/_bench.py): a table measured on a loaded machine is marked."""

from __future__ import annotations

from pathlib import Path

import pytest

ANALYSIS = Path(__file__).resolve().parent.parent / "analysis"


def test_a_table_is_refused_when_other_jobs_loaded_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The load of other jobs (after the run, less the benchmark's own threads) above 0.5 per core marks
    the record loaded and puts the red banner first; at or below, it is quiet."""
    monkeypatch.syspath_prepend(str(ANALYSIS))
    import _bench

    quiet = _bench.LoadRecord(own_threads=1, cores=2, before=(0.9, 0.0, 0.0), after=(1.9, 0.0, 0.0))
    loaded = _bench.LoadRecord(own_threads=1, cores=2, before=(0.2, 0.0, 0.0), after=(2.3, 0.0, 0.0))
    assert quiet.quiet and not loaded.quiet
    assert "quiet" in quiet.lines()[0] and "LOADED" in loaded.lines()[1]
    assert "color:red" in loaded.lines()[0]
    assert all(any(line.startswith("- allocator: ") for line in r.lines()) for r in (quiet, loaded))


def test_peak_allocated_follows_allocations_and_frees_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three 1 MiB tensors alive at once, then two freed and one more made: the peak is 3 MiB."""
    monkeypatch.syspath_prepend(str(ANALYSIS))
    import _bench
    import torch

    mib = 1 << 20

    def steps() -> None:
        a = torch.ones(mib // 4)
        b = a * 2
        c = b + 1
        del a, b
        d = c.exp()
        del c, d

    peak = _bench.peak_allocated(steps)
    assert 3 * mib <= peak < 3 * mib + 4096
