"""What GAG acts on in a diffusion model: the attention *output* (value space). For every captured head and
query, ``r = S·V − D·V`` is split against ``S·V``; measured per layer and denoising step: ``‖r⊥‖/‖r‖``, the
share of the extrapolation update GAG (ζ = 0) discards, and whether ``r∥`` points along the change of the
attention output from one captured step to the next.
"""

from __future__ import annotations

import itertools
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from hopfield_aa.checks.results import FORM_TRACE, KIND_MEASURED, STATUS_MEASURED, CheckResult
from hopfield_aa.geometry import _decompose
from hopfield_aa.normalizers import _entmax_tensor

FORM_VALUE = "hetero-associative attention output: D·V = softmax(β Q Kᵀ) V, S·V = entmax_α(β Q Kᵀ) V per head"


def _norm(v: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(v, dim=-1)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1) / (_norm(a) * _norm(b)).clamp(min=1e-300)


def head_quantities(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
    alpha_sparse: float = 1.5,
) -> dict[str, torch.Tensor]:
    r"""Per head and query: the dense and sparse outputs and the split of ``r = S·V − D·V`` against ``S·V``.

    Parameters
    ----------
    q, k, v : Tensor, shape (heads, queries, d), (heads, keys, d), (heads, keys, d_v)
    scale : float
        β (the softmax scale of the layer).
    mask : Tensor, optional
        Additive score bias broadcastable to (heads, queries, keys).

    Returns
    -------
    dict with ``dense``, ``sparse``, ``parallel``, ``orthogonal`` (heads, queries, d_v) and ``ratio``
    ``‖r⊥‖/‖r‖`` (heads, queries; NaN where ``r = 0``).
    """
    scores = scale * (q @ k.mT)
    if mask is not None:
        scores = scores + mask
    dense = torch.softmax(scores, dim=-1) @ v
    sparse = _entmax_tensor(scores, alpha_sparse, -1) @ v
    residual = sparse - dense
    parallel, orthogonal = _decompose(residual, sparse)
    size = _norm(residual)
    ratio = torch.where(size > 0, _norm(orthogonal) / size.clamp(min=1e-300), torch.nan)
    return {"dense": dense, "sparse": sparse, "parallel": parallel, "orthogonal": orthogonal, "ratio": ratio}


def _records(path: str | os.PathLike[str]) -> Iterable[Any]:
    from hopfield_aa.checks.traces import capture_dirs
    from hopfield_aa.traces.loader import TraceSet

    for directory in capture_dirs(path):
        yield from TraceSet(directory)


def measure_value_space(
    path: str | os.PathLike[str], *, alpha_sparse: float = 1.5, dtype: torch.dtype = torch.float64
) -> dict[str, Any]:
    r"""The value-space quantities over every record of the captures under ``path``.

    For each record, head and captured query: ``ρ = ‖r⊥‖/‖r‖`` (what GAG with ζ = 0 drops, per vector), and
    pooled per (kind, layer, step) the *discarded share* ``Σ‖r⊥‖² / Σ‖r‖²`` (the part of the squared
    extrapolation update ``λ r`` that GAG discards: ``P_{λ+1} − G = λ r⊥``), the update's size
    ``‖r‖/‖D·V‖``, and, for queries captured at this step and at the next captured step of the same run
    (layer, prompt, batch row), the cosines of ``r∥``, ``r⊥`` and ``r`` at this step with the change of the
    attention output ``Δ = D·V(next) − D·V(now)``.

    Returns
    -------
    dict with ``rows`` (one per kind, layer and step: medians and shares) and ``kinds`` (per kind: the
    pooled values used for the summary row), JSON-ready.
    """
    acc: dict[tuple[str, str, int], dict[str, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
    runs: dict[tuple[str, str, Any, Any], dict[int, Any]] = defaultdict(dict)
    # records of one layer share their shapes: one batched evaluation per (kind, layer, shapes, scale)
    groups: dict[tuple[Any, ...], list[Any]] = defaultdict(list)
    for record in _records(path):
        shapes = (tuple(record.q.shape), tuple(record.k.shape), tuple(record.v.shape), record.mask is None)
        groups[(record.kind, record.layer, float(record.scale), shapes)].append(record)
    for (kind, layer, scale, shapes), records in groups.items():
        q, k, v = (torch.stack([getattr(r, name) for r in records]).to(dtype) for name in ("q", "k", "v"))
        mask = None if shapes[-1] else torch.stack([r.mask for r in records]).to(dtype)
        out = head_quantities(q, k, v, scale, mask, alpha_sparse)
        r_sq = _norm(out["parallel"]) ** 2 + _norm(out["orthogonal"]) ** 2
        size = r_sq.sqrt() / _norm(out["dense"]).clamp(min=1e-300)
        for i, record in enumerate(records):
            bucket = acc[(kind, layer, int(record.step))]
            bucket["ratio"].append(out["ratio"][i].reshape(-1))
            bucket["orth_sq"].append((_norm(out["orthogonal"][i]) ** 2).reshape(-1))
            bucket["r_sq"].append(r_sq[i].reshape(-1))
            bucket["size"].append(size[i].reshape(-1))
            runs[(kind, layer, record.prompt_id, record.batch_index)][int(record.step)] = (
                record.query_indices,
                {name: out[name][i] for name in ("dense", "parallel", "orthogonal")},
            )
    # alignment with the change of the output to the next captured step of the same run
    for (kind, layer, _, _), by_step in runs.items():
        steps = sorted(by_step)
        for now, nxt in itertools.pairwise(steps):
            idx_now, out_now = by_step[now]
            idx_next, out_next = by_step[nxt]
            common, pos_now, pos_next = _common(idx_now, idx_next)
            if common == 0:
                continue
            change = out_next["dense"][:, pos_next] - out_now["dense"][:, pos_now]
            bucket = acc[(kind, layer, now)]
            for part in ("parallel", "orthogonal"):
                bucket[f"cos_{part}"].append(_cos(out_now[part][:, pos_now], change).reshape(-1))
            residual = out_now["parallel"][:, pos_now] + out_now["orthogonal"][:, pos_now]
            bucket["cos_residual"].append(_cos(residual, change).reshape(-1))
    rows = []
    pooled: dict[str, dict[str, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
    for (kind, layer, step), bucket in sorted(acc.items()):
        values = {name: torch.cat(parts) for name, parts in bucket.items()}
        for name, value in values.items():
            pooled[kind][name].append(value)
        rows.append({"kind": kind, "layer": layer, "step": step, **_summary(values)})
    kinds = {kind: _summary({n: torch.cat(p) for n, p in parts.items()}) for kind, parts in pooled.items()}
    return {"form": FORM_VALUE, "alpha_sparse": alpha_sparse, "rows": rows, "kinds": kinds}


def _common(a: torch.Tensor, b: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Positions in ``a`` and ``b`` of the values they share."""
    where_b = {int(x): i for i, x in enumerate(b.tolist())}
    pairs = [(i, where_b[int(x)]) for i, x in enumerate(a.tolist()) if int(x) in where_b]
    if not pairs:
        return 0, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    first, second = zip(*pairs, strict=False)
    return len(pairs), torch.tensor(first), torch.tensor(second)


def _median(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(x.median()) if x.numel() else math.nan


def _share_positive(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float((x > 0).double().mean()) if x.numel() else math.nan


def _summary(values: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    ratio = values["ratio"]
    empty = torch.zeros(0, dtype=ratio.dtype)
    cos_par = values.get("cos_parallel", empty)
    return {
        "vectors": int(ratio.numel()),
        "orthogonal_ratio_median": _median(ratio),
        "orthogonal_ratio_p10": float(torch.nanquantile(ratio, 0.1)) if ratio.numel() else math.nan,
        "orthogonal_ratio_p90": float(torch.nanquantile(ratio, 0.9)) if ratio.numel() else math.nan,
        "discarded_share": float(values["orth_sq"].sum() / values["r_sq"].sum().clamp(min=1e-300)),
        "update_over_output_median": _median(values["size"]),
        "pairs": int(cos_par.numel()),
        "cos_parallel_change_median": _median(cos_par),
        "parallel_aligned_share": _share_positive(cos_par),
        "cos_orthogonal_change_median": _median(values.get("cos_orthogonal", empty)),
        "cos_residual_change_median": _median(values.get("cos_residual", empty)),
    }


def value_space_results(doc: Mapping[str, Any], traces: str) -> list[CheckResult]:
    """One ``measured`` row per attention kind for the claims table (the per-step rows stay in ``doc``)."""
    from hopfield_aa.checks.registry import VALUE_SPACE

    results = []
    for kind, s in sorted(doc.get("kinds", {}).items()):
        aligned = s["parallel_aligned_share"]
        results.append(
            CheckResult(
                claim=VALUE_SPACE,
                data={"trace": traces, "kind": kind, "group": f"trace:{kind}"},
                form=FORM_VALUE + "; " + FORM_TRACE.split(":")[0],
                status=STATUS_MEASURED,
                kind=KIND_MEASURED,
                premise="",
                n_states=int(s["pairs"]),
                n_premise=int(s["pairs"]),
                n_passed=0 if math.isnan(aligned) else round(aligned * s["pairs"]),
                worst_margin=math.nan,
                tolerance=math.nan,
                tolerance_factor=0.0,
                tolerance_note="measured",
                unit="head × query with a next step (passed: r∥ along the output's change)",
                setting="S·V vs D·V",
                rate=s["orthogonal_ratio_median"],
                rate_note="median ‖r⊥‖/‖r‖ in value space",
                measured=dict(s),
            )
        )
    return results
