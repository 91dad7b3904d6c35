"""Runs every claim of the registry on every family (and on traces) and writes the report folder:
results.json (all results and figure data), report.md (what held, what failed, what could not be tested and
why; identities apart; the value-space measurements) and PNG figures.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hopfield_aa._io import write_text
from hopfield_aa.checks import claims as C
from hopfield_aa.checks.families import FAMILIES, make_family
from hopfield_aa.checks.fixed_points import residual_curves
from hopfield_aa.checks.registry import KEYS, REGISTRY, VALUE_SPACE, claim_order, run_claims
from hopfield_aa.checks.results import (
    KIND_CLAIM,
    KIND_IDENTITY,
    KIND_MEASURED,
    STATUS_FAIL,
    STATUS_IDENTITY,
    STATUS_MEASURED,
    STATUS_PASS,
    STATUS_PREMISE,
    Case,
    CheckResult,
    CounterexampleStore,
    write_json,
)
from hopfield_aa.checks.traces import cases_from_traces

CLAIM_KEYS = tuple(KEYS)
DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
COUNTEREXAMPLES_PER_CLAIM = 5
THEORY_NOTE = "papers/theory.md"


def parse_claims(text: str | Sequence[str] | None) -> list[str]:
    """Claim selectors (``energy,aa1,...`` or full claim names) -> registry keys (None: all)."""
    if text is None:
        return list(CLAIM_KEYS)
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    out = []
    for item in items:
        key = next((k for k, claim in KEYS.items() if item in (k, claim.name)), None)
        if key is None:
            raise ValueError(
                f"unknown claim {item!r}; choose from {', '.join(CLAIM_KEYS)} (or the full claim names)"
            )
        out.append(key)
    return out


def parse_families(text: str | Sequence[str] | None) -> list[str]:
    """Family names (comma-separated) -> list; ``none`` or an empty string: no synthetic family."""
    if text is None:
        return list(FAMILIES)
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if items in ([], ["none"]):
        return []
    for item in items:
        if item not in FAMILIES:
            raise ValueError(f"unknown family {item!r}; choose from {', '.join(FAMILIES)} or 'none'")
    return items


@dataclass
class VerifyConfig:
    """Settings of :func:`run_verification` (the ``verify`` command's flags).

    ``dtype`` is the compute dtype of every check (float16/bfloat16: maps evaluated in that type, solvers
    and eigenvalues in float32; tolerances from that dtype's epsilon). ``max_counterexamples`` caps the
    counter-examples kept per claim over the whole run (None: keep every one the checks save). ``dask``
    runs the cases on a Dask cluster: ``"local"``, ``"local:N"`` (a ``LocalCluster`` of N one-thread
    workers) or a scheduler address (None: in this process).
    """

    quick: bool = False
    seed: int = 0
    families: list[str] = field(default_factory=lambda: list(FAMILIES))
    claims: list[str] = field(default_factory=lambda: list(CLAIM_KEYS))
    traces: str | None = None
    n_states: int | None = None
    max_records: int | None = 8
    progress: bool = True
    dtype: str = "float64"
    max_counterexamples: int | None = COUNTEREXAMPLES_PER_CLAIM
    dask: str | None = None


@dataclass
class CaseOutcome:
    """The results of one case plus its fixed-point classification and time."""

    case: Case
    group: str
    results: list[CheckResult]
    fixed_points: dict[str, Any]
    seconds: float


def _group(case: Case) -> str:
    if "family" in case.data:
        return str(case.data["family"])
    return f"trace:{case.data.get('kind')}"


def _run_serial(
    cases: Sequence[Case], runners: Sequence[Any], store: CounterexampleStore, progress: bool
) -> list[CaseOutcome]:
    outcomes: list[CaseOutcome] = []
    bar = tqdm(cases, desc="verify", unit="case", disable=not progress, leave=False)
    for case in bar:
        bar.set_postfix_str(case.label[:40])
        outcomes.append(CaseOutcome(case, _group(case), *run_claims(case, runners, store)))
    bar.close()
    return outcomes


def _run_dask(
    config: VerifyConfig,
    client: Any,
    synthetic: Sequence[Case],
    max_records: int | None,
    trace_options: dict[str, Any],
    runners: Sequence[Any],
    store: CounterexampleStore,
) -> tuple[list[CaseOutcome], str]:
    """The cases as Dask tasks (:mod:`hopfield_aa.checks.cluster`); the outcomes in the serial order."""
    from hopfield_aa.checks.cluster import connect, run_on_dask
    from hopfield_aa.checks.traces import selected_records

    records = [] if config.traces is None else selected_records(config.traces, max_records)
    close = None
    if client is None:
        assert config.dask is not None
        client, close, executor = connect(config.dask)
    else:
        workers = len(client.scheduler_info().get("workers", {}))
        executor = f"dask scheduler {client.scheduler.address}, {workers} worker(s)"
    try:
        rows = run_on_dask(
            client,
            synthetic,
            records,
            claim_keys=[claim.key for claim in runners],
            trace_options=trace_options,
            store=store,
            progress=config.progress,
        )
    finally:
        if close is not None:
            close()
    outcomes = [CaseOutcome(case, _group(case), results, fp, seconds) for case, results, fp, seconds in rows]
    return outcomes, executor


def _display_path(path: str) -> str:
    """A traces path as the report shows it: the bundled folder by its place in the package, a folder
    below the working directory relative to it, anything else as given (no machine-specific prefix)."""
    from hopfield_aa.checks.traces import BUNDLED_TRACES

    resolved = Path(path).resolve()
    if resolved == BUNDLED_TRACES.resolve():
        return "hopfield_aa/data/traces (bundled)"
    try:
        return resolved.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def run_verification(
    config: VerifyConfig, out: str | os.PathLike[str], *, client: Any = None
) -> dict[str, Any]:
    """Run the selected claims on the selected data and return the results document (results.json).

    Counter-examples are written to ``out/counterexamples`` as they are found, at most
    ``config.max_counterexamples`` per claim (the most negative margins).

    With ``config.dask`` (``"local"``, ``"local:N"`` or a scheduler address) or an open
    ``distributed.Client`` as ``client``, every synthetic case and every selected trace record is a Dask
    task and the document is the serial run's apart from timings and ``environment["executor"]``
    (:mod:`hopfield_aa.checks.cluster`; raises its ``DaskError`` when Dask cannot be used).
    """
    start = time.perf_counter()
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {config.dtype!r}")
    dtype = DTYPES[config.dtype]
    out = Path(out)
    store = CounterexampleStore(out / "counterexamples", config.max_counterexamples)
    synthetic: list[Case] = []
    for name in config.families:
        synthetic.extend(
            make_family(name, config.seed, quick=config.quick, n_states=config.n_states, dtype=dtype)
        )
    n_synthetic = len(synthetic)
    trace_options: dict[str, Any] = {
        "max_heads": (1 if config.quick else 2),
        "max_states": (config.n_states or (12 if config.quick else 32)),
        "dtype": dtype,
    }
    max_records = 4 if config.quick else config.max_records
    selected = [KEYS[key] for key in config.claims]
    runners = [claim for claim in selected if claim.run is not None]
    executor = "serial"
    if config.dask is None and client is None:
        cases = list(synthetic)
        if config.traces is not None:
            cases.extend(cases_from_traces(config.traces, max_records=max_records, **trace_options))
        outcomes = _run_serial(cases, runners, store, config.progress)
    else:
        outcomes, executor = _run_dask(config, client, synthetic, max_records, trace_options, runners, store)
        cases = [o.case for o in outcomes]
    traces_note = "none"
    if config.traces is not None:
        traces_note = f"{_display_path(config.traces)} ({len(cases) - n_synthetic} head cases)"
    # counter-examples displaced by worse ones of the same claim are gone: drop their paths
    kept = store.paths()
    for outcome in outcomes:
        for r in outcome.results:
            r.counterexamples = [p for p in r.counterexamples if p in kept]

    value_space: dict[str, Any] = {}
    value_rows: list[CheckResult] = []
    if config.traces is not None and "value" in config.claims:
        from hopfield_aa.checks.value_space import measure_value_space, value_space_results

        value_space = measure_value_space(config.traces, dtype=dtype)
        value_rows = value_space_results(value_space, config.traces)

    figures = _figures(outcomes, cases[:n_synthetic] or cases, value_space)
    summary = summarise(outcomes, value_rows)
    doc: dict[str, Any] = {
        "format": "hopfield_aa.verify",
        "version": 2,
        "settings": {
            "quick": config.quick,
            "seed": config.seed,
            "families": config.families,
            "claims": config.claims,
            "traces": traces_note,
            "n_states": config.n_states,
            "dtype": config.dtype,
            "max_counterexamples_per_claim": config.max_counterexamples,
        },
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "executor": executor,
        },
        "registry": {
            claim.name: {
                "key": claim.key,
                "kind": claim.kind,
                "source": claim.source,
                "section": claim.section,
                "statement": claim.statement,
                "premise": claim.premise,
                "margin": claim.margin,
                "grid": claim.grid,
                "figure": claim.figure,
            }
            for claim in selected
        },
        "cases": [
            {
                "data": dict(o.case.data),
                "label": o.case.label,
                "group": o.group,
                "form": o.case.form,
                "seconds": o.seconds,
                "fixed_points": o.fixed_points,
                "results": [r.to_dict(with_series=False) for r in o.results],
            }
            for o in outcomes
        ],
        "summary": summary,
        "value_space": value_space,
        "figures": figures,
        "seconds": time.perf_counter() - start,
    }
    # counter-example paths relative to the report folder, so the folder can be moved
    for case_doc in doc["cases"]:
        for r in case_doc["results"]:
            r["counterexamples"] = [os.path.relpath(p, out) for p in r["counterexamples"]]
    for row in doc["summary"]:
        row["counterexamples"] = [os.path.relpath(p, out) for p in row["counterexamples"]]
    return doc


def _representative(cases: Sequence[Case]) -> Case | None:
    for case in cases:
        if case.data.get("family") == "clustered":
            return case
    return cases[0] if cases else None


def _figures(
    outcomes: Sequence[CaseOutcome], synthetic: Sequence[Case], value_space: dict[str, Any]
) -> dict[str, Any]:
    """The data of every figure: curves on one representative case, distributions pooled over cases."""
    figures: dict[str, Any] = {
        "energy": {},
        "orthogonal": {},
        "contraction": {},
        "guided_contraction": {},
        "lambda_star": {},
        "ladder": {},
    }
    rep = _representative(synthetic)
    if rep is not None:
        figures["residuals"] = {"case": rep.label, "curves": residual_curves(rep, alpha=1.0)}
        figures["residuals_sparse"] = {"case": rep.label, "curves": residual_curves(rep, alpha=1.5)}
    for outcome in outcomes:
        is_rep = rep is not None and outcome.case is rep
        for r in outcome.results:
            if r.claim == "energy descent" and is_rep:
                figures["energy"] = {"case": outcome.case.label, "curves": r.series.get("energy", {})}
            elif r.claim == "orthogonal-error convergence":
                pool = figures["orthogonal"].setdefault(
                    r.setting, {"premise_met": [], "offset": [], "rate": [], "radius": []}
                )
                if r.series.get("premise_met"):
                    pool["premise_met"].append(r.series["premise_met"])
                pool["offset"].extend(r.series.get("offset", [])[:100])
                if r.rate is not None:
                    pool["rate"].append(r.rate)
                    pool["radius"].append(r.measured.get("radius", {}).get("median", math.nan))
            elif r.claim == "weak contraction" and r.kind == KIND_MEASURED:
                pool = figures["guided_contraction"].setdefault(
                    outcome.group, {"lambda_c": [], "lambda_c_p": []}
                )
                pool["scales"] = r.series.get("scales", [])
                pool["lambda_c"].append(r.measured["lambda_c"])
                pool["lambda_c_p"].append(r.measured["lambda_c_extrapolation"])
            elif r.claim == "weak contraction":
                pool = figures["contraction"].setdefault(
                    r.setting, {"ratios": [], "lipschitz": [], "bound": []}
                )
                for name in ("ratios", "lipschitz", "bound"):
                    pool[name].extend(r.series.get(name, [])[:400])
            elif r.claim == "extrapolation is AA(1)":
                figures["lambda_star"].setdefault(outcome.group, []).extend(
                    r.series.get("lambda_star", [])[:400]
                )
            elif r.claim == "divergence at non-common fixed points" and r.series:
                if is_rep or "divergence" not in figures:
                    figures["divergence"] = {"case": outcome.case.label, **r.series}
            elif r.claim == C.LADDER and r.series.get("ladder"):
                figures["ladder"][outcome.case.label] = r.series
    figures["common_vs_beta"] = [
        {"beta": o.case.beta, **o.fixed_points} for o in outcomes if o.case.data.get("family") == "beta_sweep"
    ]
    if value_space.get("rows"):
        figures["value_space"] = value_space["rows"]
    return figures


def summarise(outcomes: Sequence[CaseOutcome], extra: Sequence[CheckResult] = ()) -> list[dict[str, Any]]:
    """One row per (claim, setting, data group): cases, states tried, how many met the premise, passed,
    worst margin, tolerance, rate, verdict, why the premise was not met, counter-examples.

    A group's verdict: ``fail`` when any case fails (the premise held for the states counted),
    ``premise not met`` when no case had a state meeting the premise, otherwise ``pass`` (``identity``
    and ``measured`` for those kinds)."""
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    pairs = [(o.group, o.case.label, r) for o in outcomes for r in o.results]
    pairs += [(str(r.data.get("group")), str(r.data.get("kind")), r) for r in extra]
    for group, label, r in pairs:
        key = (r.claim, r.setting, group)
        row = rows.setdefault(
            key,
            {
                "claim": r.claim,
                "kind": r.kind,
                "setting": r.setting,
                "data": group,
                "premise": r.premise,
                "cases": 0,
                "failing_cases": [],
                "cases_premise_not_met": 0,
                "premise_notes": [],
                "n_states": 0,
                "n_premise": 0,
                "n_passed": 0,
                "worst_margin": math.inf,
                "tolerance": math.nan,
                "rates": [],
                "statuses": set(),
                "counterexamples": [],
                "unit": r.unit,
                "measured": [],
            },
        )
        row["cases"] += 1
        row["n_states"] += r.n_states
        row["n_premise"] += r.n_premise
        row["n_passed"] += r.n_passed
        if not math.isnan(r.worst_margin):
            row["worst_margin"] = min(row["worst_margin"], r.worst_margin)
        if not math.isnan(r.tolerance):
            row["tolerance"] = (
                r.tolerance if math.isnan(row["tolerance"]) else max(row["tolerance"], r.tolerance)
            )
        if r.rate is not None and not math.isnan(r.rate):
            row["rates"].append(r.rate)
        row["statuses"].add(r.status)
        if r.status == STATUS_FAIL:
            row["failing_cases"].append(label)
        if r.status == STATUS_PREMISE:
            row["cases_premise_not_met"] += 1
        if r.premise_note:
            row["premise_notes"].append(r.premise_note)
        row["counterexamples"].extend(r.counterexamples)
        row["measured"].append(r.measured)
    out = []
    for row in rows.values():
        statuses = row.pop("statuses")
        if row["kind"] == KIND_MEASURED:
            status = STATUS_MEASURED
        elif STATUS_FAIL in statuses:
            status = STATUS_FAIL
        elif statuses == {STATUS_PREMISE}:
            status = STATUS_PREMISE
        else:
            status = STATUS_IDENTITY if row["kind"] == KIND_IDENTITY else STATUS_PASS
        rates = [x for x in row.pop("rates") if math.isfinite(x)]
        row["rate"] = float(torch.tensor(rates).median()) if rates else None
        row["status"] = status
        row["pass_rate"] = row["n_passed"] / row["n_premise"] if row["n_premise"] else math.nan
        row["premise_note"] = _merge_notes(row.pop("premise_notes"))
        row["measured"] = _merge_measured(row["claim"], row.pop("measured"))
        if math.isinf(row["worst_margin"]):
            row["worst_margin"] = math.nan
        out.append(row)
    out.sort(key=lambda r: (claim_order(r["claim"]), r["setting"], r["data"]))
    return out


def _merge_notes(notes: Sequence[str]) -> str:
    """Add up ``"<count> <reason>"`` notes of several cases; other notes are listed once."""
    counts: dict[str, int] = {}
    other: list[str] = []
    for note in notes:
        for part in note.split("; "):
            head, _, reason = part.partition(" ")
            if head.isdigit() and reason and " of " not in part:
                counts[reason] = counts.get(reason, 0) + int(head)
            elif part not in other:
                other.append(part)
    merged = [f"{n} {reason}" for reason, n in counts.items()]
    if other:
        merged.append(other[0] + (f" (+{len(other) - 1} more cases)" if len(other) > 1 else ""))
    return "; ".join(merged)


def _merge_measured(claim: str, measured: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The few pooled measurements the first screen and the theory tables quote, per group."""

    def values(key: str, sub: str | None = None) -> list[float]:
        out = []
        for m in measured:
            v = m.get(key)
            if sub is not None:
                v = v.get(sub) if isinstance(v, dict) else None
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out.append(float(v))
        return out

    def med(xs: list[float]) -> float:
        return float(torch.tensor(xs).median()) if xs else math.nan

    def med_inf(key: str) -> float:
        xs = [float(m[key]) for m in measured if isinstance(m.get(key), (int, float))]
        return float(torch.tensor(xs).median()) if xs else math.nan

    if claim == "orthogonal-error convergence":
        return {
            "offset_over_M_median": med(values("offset_over_M", "median")),
            "offset_over_M_max": max(values("offset_over_M", "max"), default=math.nan),
            "closed_form_error_over_M": max(values("closed_form_error_over_M"), default=math.nan),
            "radius_median": med(values("radius", "median")),
            "zeta_bound_over_M_max": max(values("zeta_bound_over_M", "max"), default=math.nan),
        }
    if claim == "weak contraction":
        if measured and "lambda_c" in measured[0]:
            return {
                "lambda_c_median": med_inf("lambda_c"),
                "lambda_c_extrapolation_median": med_inf("lambda_c_extrapolation"),
                "lambda_c_finite_cases": len(values("lambda_c")),
            }
        return {
            "repelling_starts": sum(values("repelling_starts")),
            "lipschitz_max": max(values("lipschitz_trajectory", "max"), default=math.nan),
            "lipschitz_share_below_1_median": med(values("lipschitz_share_below_1")),
            "bound_share_below_1_median": med(values("bound_share_below_1")),
            "global_bound_below_1_cases": sum(1 for m in measured if m.get("global_bound_below_1") is True),
            "global_bound_min": min(values("global_bound"), default=math.nan),
        }
    if claim == "fixed-point preservation":
        return {
            "distinct_fixed_points": sum(values("distinct_fixed_points")),
            "distinct_common": sum(values("distinct_common")),
            "premise_beta_min": min(values("premise_beta"), default=math.nan),
            "beta_max": max(values("beta"), default=math.nan),
        }
    if claim == "directional consistency":
        return {
            "share_toward_median": med(values("share_toward_sparse_fixed_point")),
            "share_aligned_median": med(values("share_aligned_with_retrieval")),
        }
    if claim == VALUE_SPACE and measured:
        return dict(measured[0])
    return {}


# --------------------------------------------------------------------------------------------------
# text output


def _fmt(value: Any, spec: str = ".2e") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, str):
        return value
    return format(value, spec)


def _verdict(status: str) -> str:
    return "FAIL" if status == STATUS_FAIL else status


TABLE_COLUMNS = (
    "claim",
    "setting",
    "data",
    "cases",
    "tried",
    "premise met",
    "passed",
    "worst margin",
    "tol",
    "rate",
    "verdict",
)


def table_rows(summary: Sequence[dict[str, Any]]) -> list[list[str]]:
    """The claims table as strings (one list per row, :data:`TABLE_COLUMNS`)."""
    rows = []
    for r in summary:
        rows.append(
            [
                r["claim"],
                r["setting"],
                r["data"],
                str(r["cases"]),
                str(r["n_states"]),
                str(r["n_premise"]),
                "—" if r["n_premise"] == 0 else f"{r['n_passed']}/{r['n_premise']} ({r['pass_rate']:.1%})",
                _fmt(r["worst_margin"]),
                _fmt(r["tolerance"]),
                _fmt(r["rate"], ".3g"),
                _verdict(r["status"]),
            ]
        )
    return rows


def _aligned(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_table(summary: Sequence[dict[str, Any]]) -> str:
    """The claims table as aligned plain text."""
    return _aligned([list(TABLE_COLUMNS), *table_rows(summary)])


def _groups(rows: Sequence[dict[str, Any]]) -> str:
    names = [str(r["data"]) for r in rows]
    return ", ".join(names[:4]) + (f" (+{len(names) - 4})" if len(names) > 4 else "")


def _claim_line(rows: Sequence[dict[str, Any]]) -> list[str]:
    """What held, what failed and what could not be tested (and why) for one claim and setting."""
    held = [r for r in rows if r["status"] in (STATUS_PASS, STATUS_IDENTITY)]
    failed = [r for r in rows if r["status"] == STATUS_FAIL]
    untested = [r for r in rows if r["status"] == STATUS_PREMISE]
    parts = []
    if held:
        n_pass = sum(r["n_passed"] for r in held)
        parts.append(f"held on {_groups(held)} ({n_pass}/{sum(r['n_premise'] for r in held)})")
    if failed:
        n_bad = sum(r["n_premise"] - r["n_passed"] for r in failed)
        parts.append(
            f"FAILED on {_groups(failed)} ({n_bad} of {sum(r['n_premise'] for r in failed)} counted, "
            "premise held for all of them)"
        )
    notes = _merge_notes([r["premise_note"] for r in rows if r["premise_note"]])
    betas = [r["measured"].get("premise_beta_min", math.nan) for r in rows]
    finite = [b for b in betas if isinstance(b, float) and math.isfinite(b)]
    if rows[0]["claim"] == "fixed-point preservation" and finite:
        notes += f"; attainable from β ≈ {min(finite):.3g} on some data"
    if untested:
        parts.append(f"not tested on {_groups(untested)}: premise not met ({notes or 'no state met it'})")
    elif notes:
        parts.append(f"not counted: {notes}")
    return parts


def _measured_line(claim: str, rows: Sequence[dict[str, Any]]) -> str:
    if claim == "directional consistency":
        toward = sum(r["n_passed"] for r in rows)
        return f"r points toward ξ*_S in {toward}/{sum(r['n_premise'] for r in rows)} states"
    if claim == "weak contraction":
        parts = []
        for r in rows:
            m = r["measured"]
            parts.append(
                f"{r['data']} λ_c {_fmt(m.get('lambda_c_median'), '.3g')} "
                f"(P_λ {_fmt(m.get('lambda_c_extrapolation_median'), '.3g')})"
            )
        return "G stops contracting above λ_c (median per group): " + "; ".join(parts)
    if claim == VALUE_SPACE:
        parts = []
        for r in rows:
            m = r["measured"]
            parts.append(
                f"{r['data']}: ‖r⊥‖/‖r‖ median {m['orthogonal_ratio_median']:.2f}, GAG discards "
                f"{m['discarded_share']:.0%} of ‖λr‖², r∥ along the output's change in "
                f"{m['parallel_aligned_share']:.0%} (cos median {m['cos_parallel_change_median']:+.2f})"
            )
        return "; ".join(parts)
    if claim == C.LADDER:
        closer = sum(r["n_passed"] for r in rows)
        return f"the α-ladder is closer to ξ*_S than P_λ in {closer}/{sum(r['n_premise'] for r in rows)}"
    return ""


def first_screen(summary: Sequence[dict[str, Any]], width: int = 110) -> str:
    """Per claim: what held, what failed, what could not be tested and why; measurements; identities."""
    import textwrap

    by_claim: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in summary:
        by_claim.setdefault(r["claim"], {}).setdefault(r["setting"], []).append(r)
    lines = ["CLAIMS (evidence; a fail always had its premise met)"]
    sections = {KIND_CLAIM: lines, KIND_MEASURED: ["MEASURED (no verdict)"], KIND_IDENTITY: []}
    sections[KIND_IDENTITY].append(
        "IDENTITIES (hold by construction of the library's rule: regression tests, not evidence)"
    )
    for claim in sorted(by_claim, key=claim_order):
        for setting, rows in by_claim[claim].items():
            kind = rows[0]["kind"]
            if kind == KIND_MEASURED:
                text = f"{claim} [{setting}]: {_measured_line(claim, rows)}"
            else:
                text = f"{claim} [{setting}]: " + "; ".join(_claim_line(rows))
            sections[kind].extend(textwrap.wrap(text, width, initial_indent="  ", subsequent_indent="      "))
    blocks = [sections[KIND_CLAIM], sections[KIND_MEASURED], sections[KIND_IDENTITY]]
    return "\n".join("\n".join(block) for block in blocks if len(block) > 1)


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in row] for row in rows]
    return "\n".join(
        ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        + ["| " + " | ".join(row) + " |" for row in esc]
    )


def _kind_rows(summary: Sequence[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in summary if r["kind"] == kind]


def _md_header(doc: dict[str, Any]) -> list[str]:
    """Title, what was run, how to read the verdicts, and the first screen."""
    s = doc["settings"]
    env = doc["environment"]
    load = env.get("load_average")
    return [
        f"# hopfield-aa verify: the claims of {THEORY_NOTE}, measured",
        "",
        f"Families: {', '.join(s['families']) or 'none'}; traces: {s['traces']}; seed {s['seed']}; "
        f"{'quick' if s['quick'] else 'full'} run; compute dtype {s['dtype']}; "
        f"checks' wall time {doc['seconds']:.1f} s on {env['threads']} thread(s)"
        + (f" (load average {load[0]:.2f} at the end)" if load else "")
        + f", torch {env['torch']}.",
        "",
        "Verdicts: `pass` and `fail` count only the states that met the claim's premise (a `fail` always had",
        "it met); `premise not met` means no state tried met it, and says why; `identity` rows hold by",
        "construction of the library's rule and are regression tests, never evidence; `measured` rows have",
        "no verdict. Margins are (allowed − observed): negative is a violation; tolerances are a stated",
        "factor of the dtype's epsilon times a stated scale (`M`, the largest pattern norm).",
        "",
        "## At a glance",
        "",
        "```",
        first_screen(doc["summary"], width=100),
        "```",
        "",
    ]


def _md_kind_tables(summary: Sequence[dict[str, Any]]) -> list[str]:
    """The claims table split by kind: evidence, measurements, identities."""
    lines: list[str] = []
    for title, kind in (
        ("## Claims (evidence)", KIND_CLAIM),
        ("## Measured (no verdict)", KIND_MEASURED),
        ("## Identities (regression tests of the library's rule, not evidence)", KIND_IDENTITY),
    ):
        rows = _kind_rows(summary, kind)
        if rows:
            lines += [title, "", _markdown_table(TABLE_COLUMNS, table_rows(rows)), ""]
    return lines


def _md_failures(summary: Sequence[dict[str, Any]], settings: dict[str, Any]) -> list[str]:
    """Each failing row with its worst margin, failing cases and counter-examples to replay."""
    failing = [r for r in summary if r["status"] == STATUS_FAIL]
    lines = ["## What fails where", ""]
    if not failing:
        lines.append("No claim failed where its premise held.")
    for r in failing:
        lines.append(
            f"- **{r['claim']}** ({r['setting']}) on *{r['data']}*: {r['n_premise'] - r['n_passed']} of "
            f"{r['n_premise']} counted states violate it (premise held: {r['premise']}); worst margin "
            f"{_fmt(r['worst_margin'])}; failing cases: {', '.join(r['failing_cases'][:6])}"
            + (" …" if len(r["failing_cases"]) > 6 else "")
        )
        for path in r["counterexamples"][:3]:
            lines.append(
                f"  - counter-example: `{path}` (replay: `hopfield_aa.checks.replay_counterexample(path)`)"
            )
    lines += [
        "",
        f"Counter-examples kept: at most {settings.get('max_counterexamples_per_claim')} per claim "
        "(`verify --all-counterexamples` keeps every one).",
        "",
    ]
    return lines


def _md_premises(summary: Sequence[dict[str, Any]]) -> list[str]:
    """Where each claim's premise was not met and why."""
    lines = ["## Premise not met: where and why", ""]
    notes = [r for r in summary if r["premise_note"] and r["kind"] != KIND_MEASURED]
    if notes:
        lines.append(
            _markdown_table(
                ("claim", "setting", "data", "premise", "premise met", "why not"),
                [
                    [
                        r["claim"],
                        r["setting"],
                        r["data"],
                        r["premise"],
                        f"{r['n_premise']}/{r['n_states']}",
                        r["premise_note"],
                    ]
                    for r in notes
                ],
            )
        )
    else:
        lines.append("Every state tried met its claim's premise.")
    lines.append("")
    return lines


def _md_orthogonal_offsets(summary: Sequence[dict[str, Any]]) -> list[str]:
    """The orthogonal offset of G's limit where it is not a fixed point of S, beside its closed form."""
    orth = [r for r in summary if r["claim"] == "orthogonal-error convergence"]
    if not orth:
        return []
    return [
        "### Orthogonal error where G's limit is not a fixed point of S",
        "",
        "The limit keeps an orthogonal offset from the sparse fixed point; its closed form is",
        "λζ r⊥(ξ∞) − P⊥ ξ*_S (reference S). Measured offset and the largest gap to the closed form:",
        "",
        _markdown_table(
            (
                "setting",
                "data",
                "offset / M (median)",
                "offset / M (max)",
                "closed-form gap / M",
                "ρ(DG) median (premise met)",
            ),
            [
                [
                    r["setting"],
                    r["data"],
                    _fmt(r["measured"].get("offset_over_M_median"), ".3g"),
                    _fmt(r["measured"].get("offset_over_M_max"), ".3g"),
                    _fmt(r["measured"].get("closed_form_error_over_M"), ".1e"),
                    _fmt(r["measured"].get("radius_median"), ".3g"),
                ]
                for r in orth
            ],
        ),
        "",
    ]


def _md_beta_sweep(sweep: Sequence[dict[str, Any]]) -> list[str]:
    """Distinct and common fixed points per β of the beta_sweep family."""
    if not sweep:
        return []
    return [
        "## Distinct fixed points and the common ones, by β (beta_sweep family)",
        "",
        _markdown_table(
            ("β", "distinct fixed points", "common", "common share", "premise attainable from β ≈"),
            [
                [
                    f"{p['beta']:g}",
                    str(p["distinct_fixed_points"]),
                    str(p["distinct_common"]),
                    _fmt(p["distinct_common_share"], ".2f"),
                    _fmt(p["premise_beta"], ".3g"),
                ]
                for p in sweep
            ],
        ),
        "",
    ]


def _md_value_space(vs: dict[str, Any]) -> list[str]:
    """What GAG acts on in value space, per attention kind, layer and step."""
    if not vs.get("rows"):
        return []
    return [
        "## What GAG acts on: value space, per layer and step",
        "",
        f"Form: {vs['form']}. r = S·V − D·V split against S·V; *discarded* is Σ‖r⊥‖²/Σ‖r‖², the",
        "part of the squared extrapolation update λr that GAG (ζ = 0) drops; *cos(r∥, Δ)* compares r∥",
        "at a step with the change of the attention output D·V to the next captured step (same query).",
        "",
        _markdown_table(
            (
                "kind",
                "layer",
                "step",
                "vectors",
                "‖r⊥‖/‖r‖ median",
                "discarded",
                "‖r‖/‖D·V‖",
                "pairs",
                "cos(r∥, Δ) median",
                "r∥ along Δ",
                "cos(r, Δ) median",
            ),
            [
                [
                    row["kind"],
                    row["layer"],
                    str(row["step"]),
                    str(row["vectors"]),
                    _fmt(row["orthogonal_ratio_median"], ".3f"),
                    _fmt(row["discarded_share"], ".3f"),
                    _fmt(row["update_over_output_median"], ".3f"),
                    str(row["pairs"]),
                    _fmt(row["cos_parallel_change_median"], "+.3f"),
                    _fmt(row["parallel_aligned_share"], ".2f"),
                    _fmt(row["cos_residual_change_median"], "+.3f"),
                ]
                for row in vs["rows"]
            ],
        ),
        "",
    ]


def _passed_cell(r: dict[str, Any]) -> str:
    return "—" if not r["n_premise"] else f"{r['n_passed']}/{r['n_premise']}"


def _md_traces(cases: Sequence[dict[str, Any]]) -> list[str]:
    """Every result on a trace head, with its layer, step, attention kind and head."""
    trace_cases = [c for c in cases if "trace" in c["data"]]
    if not trace_cases:
        return []
    trace_rows = [
        [
            str(c["data"].get("kind")),
            str(c["data"].get("layer")),
            str(c["data"].get("step")),
            str(c["data"].get("head")),
            f"{c['data'].get('N')}×{c['data'].get('d')}",
            r["claim"],
            r["setting"],
            _passed_cell(r),
            f"{r['n_premise']}/{r['n_states']}",
            _fmt(r["rate"], ".3g"),
            _verdict(r["status"]),
        ]
        for c in trace_cases
        for r in c["results"]
    ]
    header = ("kind", "layer", "step", "head", "N×d", "claim", "setting", "passed", "premise met", "rate")
    return [
        "## Traces, per layer / step / attention kind",
        "",
        f"Form tested: {trace_cases[0]['form']}.",
        "",
        _markdown_table((*header, "verdict"), trace_rows),
        "",
    ]


def _md_figures(figures: Sequence[str]) -> list[str]:
    if not figures:
        return []
    lines = ["## Figures", ""]
    for fig in figures:
        lines += [f"![{Path(fig).stem}]({Path(fig).name})", ""]
    return lines


def _md_per_case(cases: Sequence[dict[str, Any]]) -> list[str]:
    """The appendix: every result of every case."""
    case_rows = [
        [
            c["label"],
            r["claim"],
            r["setting"],
            _passed_cell(r),
            f"{r['n_premise']}/{r['n_states']}",
            _fmt(r["worst_margin"]),
            _fmt(r["tolerance"]),
            _fmt(r["rate"], ".3g"),
            _verdict(r["status"]),
        ]
        for c in cases
        for r in c["results"]
    ]
    header = ("case", "claim", "setting", "passed", "premise met", "worst margin", "tol", "rate", "verdict")
    return ["## Per case", "", _markdown_table(header, case_rows), ""]


def markdown_report(doc: dict[str, Any], figures: Sequence[str]) -> str:
    """report.md: the first screen, claims / measured / identities tables, failures, premises not met,
    fixed points vs β, what GAG acts on in value space, per-trace results, figures, a per-case appendix."""
    summary = doc["summary"]
    sections = (
        _md_header(doc),
        _md_kind_tables(summary),
        _md_failures(summary, doc["settings"]),
        _md_premises(summary),
        _md_orthogonal_offsets(summary),
        _md_beta_sweep(doc["figures"].get("common_vs_beta") or []),
        _md_value_space(doc.get("value_space") or {}),
        _md_traces(doc["cases"]),
        _md_figures(figures),
        _md_per_case(doc["cases"]),
    )
    return "\n".join(line for lines in sections for line in lines)


def write_report(doc: dict[str, Any], out: str | os.PathLike[str]) -> list[str]:
    """Write results.json, the figures and report.md into ``out``; return the figure paths."""
    from hopfield_aa.checks.plots import draw_report_figures

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", doc)
    figures = draw_report_figures(doc["figures"], out)
    write_text(out / "report.md", markdown_report(doc, figures))
    return figures


__all__ = [
    "CLAIM_KEYS",
    "DTYPES",
    "REGISTRY",
    "VerifyConfig",
    "first_screen",
    "format_table",
    "markdown_report",
    "parse_claims",
    "parse_families",
    "run_verification",
    "summarise",
    "write_report",
]
