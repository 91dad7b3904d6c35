"""Captured attention traces as check data: each head of a record becomes a :class:`Case` with its keys as
memory, its queries as starting states and its recorded scale as β (the auto-associative reading).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hopfield_aa.checks.results import FORM_TRACE, Case

if TYPE_CHECKING:
    from hopfield_aa.traces.loader import TraceSet

BUNDLED_TRACES = Path(__file__).resolve().parent.parent / "data" / "traces"


def capture_dirs(path: str | os.PathLike[str]) -> list[Path]:
    """The capture directories under ``path``: ``path`` itself if it holds a ``manifest.json``, otherwise
    every directory below it (sorted, any depth) that does. Raises ``FileNotFoundError`` if ``path`` is
    missing."""
    root = Path(path)
    if root.is_file() and root.name == "manifest.json":
        return [root.parent]
    if not root.is_dir():
        raise FileNotFoundError(f"traces path {root} does not exist")
    if (root / "manifest.json").is_file():
        return [root]
    return sorted(p.parent for p in root.rglob("manifest.json"))


def bundled_traces() -> Path | None:
    """The bundled traces folder (``hopfield_aa/data/traces``) if it holds a capture, else None."""
    if BUNDLED_TRACES.is_dir() and capture_dirs(BUNDLED_TRACES):
        return BUNDLED_TRACES
    return None


def _spread(n: int, k: int | None) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (all of them when ``k`` is None or ≥ n)."""
    if k is None or k >= n:
        return list(range(n))
    if k <= 0:
        return []
    return sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)})


def cases_from_traces(
    path: str | os.PathLike[str],
    *,
    max_records: int | None = 12,
    max_heads: int = 2,
    max_states: int = 32,
    dtype: torch.dtype = torch.float64,
) -> list[Case]:
    r"""Read captured attention records as Hopfield check cases (papers/theory.md §3 and §13).

    For each selected record and head: memory ``X = K`` (the keys as they entered the softmax),
    starting states ``ξ₀ =`` the head's queries, ``β =`` the recorded scale. The checks then test the
    auto-associative dynamics ``ξ ↦ Kᵀ entmax_α(β K ξ)`` in key space; the attention output itself
    (``Vᵀ softmax(β K q)``) is one hetero-associative step and is not iterated. Keys that the record's mask
    removes (−inf) for every kept query are dropped; a finite additive bias is not part of the Hopfield
    map and is ignored (``data["bias_dropped"]``).

    Parameters
    ----------
    path : str or Path
        A capture directory, or a folder holding several.
    max_records : int or None
        Records kept per capture, spread evenly over its (kind, layer, step) order (None: all).
    max_heads : int
        Heads kept per record (the first captured ones).
    max_states : int
        Queries kept per head, spread evenly over the captured ones.
    dtype : torch.dtype
        Compute dtype (float64: the stored float16/float32 values are exact in it).

    Returns
    -------
    list of Case, ``data`` naming the trace directory, shard file, layer, kind, step, timestep, head,
    batch index and prompt.
    """
    from hopfield_aa.traces.loader import TraceSet

    cases: list[Case] = []
    opened: dict[Path, TraceSet] = {}
    for directory, index in selected_records(path, max_records):
        if directory not in opened:
            opened[directory] = TraceSet(directory)
        traces = opened[directory]
        cases.extend(_record_cases(traces[index], directory, max_heads, max_states, dtype))
    return cases


def selected_records(path: str | os.PathLike[str], max_records: int | None = 12) -> list[tuple[Path, int]]:
    """The records :func:`cases_from_traces` reads, in its order: ``(capture directory, record index)``
    pairs, ``max_records`` per capture spread over its (kind, layer, step) order (only manifests are read)."""
    from hopfield_aa.traces.loader import TraceSet

    out: list[tuple[Path, int]] = []
    for directory in capture_dirs(path):
        entries = TraceSet(directory).entries
        order = sorted(range(len(entries)), key=lambda i: _entry_key(entries[i]))
        out.extend((directory, order[i]) for i in _spread(len(order), max_records))
    return out


def record_cases(
    traces: TraceSet,
    index: int,
    *,
    max_heads: int = 2,
    max_states: int = 32,
    dtype: torch.dtype = torch.float64,
) -> list[Case]:
    """The cases of record ``index`` of an open :class:`~hopfield_aa.traces.TraceSet` (one per kept head),
    exactly as :func:`cases_from_traces` builds them: the unit of work of a distributed ``verify``."""
    return list(_record_cases(traces[index], traces.path, max_heads, max_states, dtype))


def _entry_key(entry: object) -> tuple[str, str, int, int]:
    e = dict(entry)  # type: ignore[call-overload]
    return (str(e.get("kind")), str(e.get("layer")), int(e.get("step", 0)), int(e.get("batch_index", 0) or 0))


def _record_cases(
    record: object, directory: Path, max_heads: int, max_states: int, dtype: torch.dtype
) -> Iterator[Case]:
    from hopfield_aa.traces.record import TraceRecord

    assert isinstance(record, TraceRecord)
    for position in range(min(max_heads, len(record.heads))):
        head = record.hopfield(position)
        rows = _spread(head.states.shape[0], max_states)
        states = head.states[rows].to(dtype)
        memory = head.memory.to(dtype)
        bias_dropped = False
        if head.mask is not None:
            mask = head.mask.to(dtype)
            mask = mask[rows] if mask.shape[0] > 1 else mask
            keep = torch.isfinite(mask).any(dim=0) if mask.ndim == 2 else torch.isfinite(mask)
            bias_dropped = bool((mask[torch.isfinite(mask)] != 0).any())
            memory = memory[keep.reshape(-1)]
        if memory.shape[0] == 0 or states.shape[0] == 0 or not math.isfinite(head.beta) or head.beta <= 0:
            continue
        yield Case(
            patterns=memory,
            states=states,
            beta=float(head.beta),
            data={
                "trace": str(directory),
                "file": Path(record.source).name,
                "layer": record.layer,
                "kind": record.kind,
                "step": int(record.step),
                "timestep": record.timestep,
                "head": int(head.head),
                "batch_index": record.batch_index,
                "prompt_id": record.prompt_id,
                "stored_dtype": str(record.q.dtype).replace("torch.", ""),
                "N": int(memory.shape[0]),
                "d": int(memory.shape[1]),
                "beta": float(head.beta),
                "bias_dropped": bias_dropped,
            },
            form=FORM_TRACE,
        )
