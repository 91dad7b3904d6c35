"""Runs every check on every family (and on traces), and writes the report folder: results.json (all
results and figure data), report.md (the claims table, failures with counter-example paths) and PNG figures.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hopfield_aa.checks import claims as C
from hopfield_aa.checks.families import FAMILIES, make_family
from hopfield_aa.checks.fixed_points import FixedPoints, find_fixed_points, residual_curves
from hopfield_aa.checks.results import (
    STATUS_FAIL,
    STATUS_MEASURED,
    STATUS_NA,
    STATUS_PASS,
    Case,
    CheckResult,
    atomic_write_json,
    atomic_write_text,
)
from hopfield_aa.checks.traces import cases_from_traces

# short selector -> (claim name, runner(case, fixed_points, counterexample_dir) -> results)
Runner = Callable[[Case, FixedPoints, "str | None"], list[CheckResult]]

ZETAS = (0.0, 0.5, 1.0)


def _runners() -> dict[str, tuple[str, Runner]]:
    return {
        "energy": ("energy descent", lambda c, fp, d: [C.check_energy_descent(c, counterexample_dir=d)]),
        "aa1": (
            "extrapolation is AA(1)",
            lambda c, fp, d: [C.check_extrapolation_aa1(c, counterexample_dir=d)],
        ),
        "preservation": (
            "fixed-point preservation",
            lambda c, fp, d: [C.check_fixed_point_preservation(c, fixed_points=fp, counterexample_dir=d)],
        ),
        "divergence": (
            "divergence at non-common fixed points",
            lambda c, fp, d: [C.check_divergence(c, fixed_points=fp, counterexample_dir=d)],
        ),
        "contraction": (
            "weak contraction",
            lambda c, fp, d: [
                C.check_weak_contraction(c, alpha=a, fixed_points=fp, counterexample_dir=d)
                for a in (fp.alpha_dense, fp.alpha_sparse)
            ],
        ),
        "orthogonal": (
            "orthogonal-error convergence",
            lambda c, fp, d: [
                C.check_orthogonal_error(c, zeta=z, fixed_points=fp, counterexample_dir=d) for z in ZETAS
            ],
        ),
        "bounded": ("bounded update", lambda c, fp, d: [C.check_bounded_update(c, counterexample_dir=d)]),
        "directional": (
            "directional consistency",
            lambda c, fp, d: [C.check_directional_consistency(c, fixed_points=fp, counterexample_dir=d)],
        ),
        "ladder": (C.LADDER, lambda c, fp, d: [C.check_ladder(c, fixed_points=fp)]),
    }


CLAIM_KEYS = tuple(_runners())


def parse_claims(text: str | Sequence[str] | None) -> list[str]:
    """Claim selectors (``energy,aa1,...`` or full claim names) -> keys of :data:`CLAIM_KEYS` (None: all)."""
    if text is None:
        return list(CLAIM_KEYS)
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    runners = _runners()
    out = []
    for item in items:
        key = next((k for k, (name, _) in runners.items() if item in (k, name)), None)
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
    """Settings of :func:`run_verification` (the ``verify`` command's flags)."""

    quick: bool = False
    seed: int = 0
    families: list[str] = field(default_factory=lambda: list(FAMILIES))
    claims: list[str] = field(default_factory=lambda: list(CLAIM_KEYS))
    traces: str | None = None
    n_states: int | None = None
    max_records: int | None = 8
    progress: bool = True


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


def run_verification(config: VerifyConfig, out: str | os.PathLike[str]) -> dict[str, Any]:
    """Run the selected checks on the selected data and return the results document.

    The document is what :func:`write_report` writes as results.json.

    Counter-examples are written to ``out/counterexamples`` as they are found.
    """
    start = time.perf_counter()
    out = Path(out)
    cx_dir = out / "counterexamples"
    cases: list[Case] = []
    for name in config.families:
        cases.extend(make_family(name, config.seed, quick=config.quick, n_states=config.n_states))
    n_synthetic = len(cases)
    traces_note = "none"
    if config.traces is not None:
        trace_cases = cases_from_traces(
            config.traces,
            max_records=(4 if config.quick else config.max_records),
            max_heads=(1 if config.quick else 2),
            max_states=(config.n_states or (12 if config.quick else 32)),
        )
        cases.extend(trace_cases)
        traces_note = f"{config.traces} ({len(trace_cases)} head cases)"
    runners = _runners()
    outcomes: list[CaseOutcome] = []
    figures: dict[str, Any] = {
        "energy": {},
        "orthogonal": {},
        "contraction": {},
        "lambda_star": {},
        "ladder": {},
    }
    bar = tqdm(cases, desc="verify", unit="case", disable=not config.progress, leave=False)
    for case in bar:
        bar.set_postfix_str(case.label[:40])
        t0 = time.perf_counter()
        fp = find_fixed_points(case)
        results: list[CheckResult] = []
        for key in config.claims:
            results.extend(runners[key][1](case, fp, str(cx_dir)))
        outcomes.append(CaseOutcome(case, _group(case), results, fp.summary(), time.perf_counter() - t0))
    bar.close()

    # figure data: curves on one representative case, distributions pooled over every case
    rep = _representative(cases[:n_synthetic] or cases)
    if rep is not None:
        figures["residuals"] = {"case": rep.label, "curves": residual_curves(rep, alpha=1.0)}
        figures["residuals_sparse"] = {"case": rep.label, "curves": residual_curves(rep, alpha=1.5)}
    for outcome in outcomes:
        for r in outcome.results:
            _collect_figure(figures, outcome, r, rep)
    figures["common_vs_beta"] = [
        {"beta": o.case.beta, **o.fixed_points} for o in outcomes if o.case.data.get("family") == "beta_sweep"
    ]
    doc: dict[str, Any] = {
        "format": "hopfield_aa.verify",
        "version": 1,
        "settings": {
            "quick": config.quick,
            "seed": config.seed,
            "families": config.families,
            "claims": config.claims,
            "traces": traces_note,
            "n_states": config.n_states,
            "dtype": "float64",
        },
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
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
        "summary": summarise(outcomes),
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


def _collect_figure(figures: dict[str, Any], outcome: CaseOutcome, r: CheckResult, rep: Case | None) -> None:
    is_rep = rep is not None and outcome.case is rep
    if r.claim == "energy descent" and is_rep:
        figures["energy"] = {"case": outcome.case.label, "curves": r.series.get("energy", {})}
    elif r.claim == "orthogonal-error convergence" and is_rep and r.series:
        figures["orthogonal"][r.setting] = {"case": outcome.case.label, **r.series}
    elif r.claim == "weak contraction":
        pool = figures["contraction"].setdefault(r.setting, {"ratios": [], "lipschitz": []})
        pool["ratios"].extend(r.series.get("ratios", [])[:400])
        pool["lipschitz"].extend(r.series.get("lipschitz", [])[:400])
    elif r.claim == "extrapolation is AA(1)":
        figures["lambda_star"].setdefault(outcome.group, []).extend(r.series.get("lambda_star", [])[:400])
    elif r.claim == "divergence at non-common fixed points" and r.series:
        # the representative case's curves, else the first case that has non-common fixed points
        if is_rep or "divergence" not in figures:
            figures["divergence"] = {"case": outcome.case.label, **r.series}
    elif r.claim == C.LADDER and r.series.get("ladder"):
        figures["ladder"][outcome.case.label] = r.series


def summarise(outcomes: Sequence[CaseOutcome]) -> list[dict[str, Any]]:
    """One row per (claim, setting, data group): cases, states tried, passed, worst margin, tolerance, rate,
    status, counter-example count. A group fails when any of its cases fails."""
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for o in outcomes:
        for r in o.results:
            key = (r.claim, r.setting, o.group)
            row = rows.setdefault(
                key,
                {
                    "claim": r.claim,
                    "setting": r.setting,
                    "data": o.group,
                    "cases": 0,
                    "failing_cases": [],
                    "n_states": 0,
                    "n_passed": 0,
                    "worst_margin": math.inf,
                    "tolerance": math.nan,
                    "rates": [],
                    "statuses": set(),
                    "counterexamples": [],
                    "unit": r.unit,
                },
            )
            row["cases"] += 1
            row["n_states"] += r.n_states
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
                row["failing_cases"].append(o.case.label)
            row["counterexamples"].extend(r.counterexamples)
    out = []
    for row in rows.values():
        statuses = row.pop("statuses")
        if STATUS_MEASURED in statuses:
            status = STATUS_MEASURED
        elif STATUS_FAIL in statuses:
            status = STATUS_FAIL
        elif statuses == {STATUS_NA}:
            status = STATUS_NA
        else:
            status = STATUS_PASS
        rates = row.pop("rates")
        row["rate"] = float(torch.tensor(rates).median()) if rates else None
        row["status"] = status
        row["pass_rate"] = row["n_passed"] / row["n_states"] if row["n_states"] else math.nan
        if math.isinf(row["worst_margin"]):
            row["worst_margin"] = math.nan
        out.append(row)
    order = {name: i for i, name in enumerate((*C.CLAIMS, C.LADDER))}
    out.sort(key=lambda r: (order.get(r["claim"], 99), r["setting"], r["data"]))
    return out


# --------------------------------------------------------------------------------------------------
# text output


def _fmt(value: Any, spec: str = ".2e") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, str):
        return value
    return format(value, spec)


TABLE_COLUMNS = (
    "claim",
    "setting",
    "data",
    "cases",
    "tried",
    "pass rate",
    "worst margin",
    "tol",
    "rate",
    "status",
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
                "—" if r["n_states"] == 0 else f"{r['n_passed']}/{r['n_states']} ({r['pass_rate']:.1%})",
                _fmt(r["worst_margin"]),
                _fmt(r["tolerance"]),
                _fmt(r["rate"], ".3g"),
                r["status"].upper() if r["status"] == STATUS_FAIL else r["status"],
            ]
        )
    return rows


def format_table(summary: Sequence[dict[str, Any]]) -> str:
    """The claims table as aligned plain text."""
    rows = [list(TABLE_COLUMNS), *table_rows(summary)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in row] for row in rows]
    return "\n".join(
        ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        + ["| " + " | ".join(row) + " |" for row in esc]
    )


def markdown_report(doc: dict[str, Any], figures: Sequence[str]) -> str:
    """report.md: settings, the claims table, what fails where (with counter-example paths), fixed points
    vs β, the ladder row, per-trace results, figures, and a per-case appendix."""
    s = doc["settings"]
    lines = [
        "# hopfield-aa verify: the claims of THEORY.md §5, measured",
        "",
        f"Families: {', '.join(s['families']) or 'none'}; traces: {s['traces']}; seed {s['seed']}; "
        f"{'quick' if s['quick'] else 'full'} run; compute dtype {s['dtype']}; "
        f"checks' wall time {doc['seconds']:.1f} s on {doc['environment']['threads']} thread(s), "
        f"torch {doc['environment']['torch']}.",
        "",
        "Margins are (allowed − observed): negative is a violation. Tolerances are a stated factor of the",
        "dtype's epsilon times a stated scale (see each check's docstring); `M` is the largest pattern norm.",
        "A row fails when any of its cases fails; `n/a` means no state the claim applies to (e.g. no fixed",
        "point common to the dense and sparse maps); `measured` rows report a quantity without a verdict.",
        "",
        "## Claims table",
        "",
        _markdown_table(TABLE_COLUMNS, table_rows(doc["summary"])),
        "",
    ]
    failing = [r for r in doc["summary"] if r["status"] == STATUS_FAIL]
    lines += ["## What fails where", ""]
    if not failing:
        lines.append("Every claim held on every case it applies to.")
    for r in failing:
        cx = r["counterexamples"]
        lines.append(
            f"- **{r['claim']}** ({r['setting']}) on *{r['data']}*: "
            f"{r['n_states'] - r['n_passed']} of {r['n_states']} failing, "
            f"worst margin {_fmt(r['worst_margin'])}; failing cases: {', '.join(r['failing_cases'][:6])}"
            + (" …" if len(r["failing_cases"]) > 6 else "")
        )
        for path in cx[:3]:
            lines.append(
                f"  - counter-example: `{path}` (replay: `hopfield_aa.checks.replay_counterexample(path)`)"
            )
    lines.append("")
    sweep = doc["figures"].get("common_vs_beta") or []
    if sweep:
        lines += [
            "## Fixed points common to the dense and sparse maps, by β (beta_sweep family)",
            "",
            _markdown_table(
                (
                    "β",
                    "dense fixed points",
                    "common (dense)",
                    "non-common (dense)",
                    "sparse fixed points",
                    "common (sparse)",
                    "common share",
                ),
                [
                    [
                        f"{p['beta']:g}",
                        str(p["dense_converged"]),
                        str(p["dense_common"]),
                        str(p["dense_non_common"]),
                        str(p["sparse_converged"]),
                        str(p["sparse_common"]),
                        f"{p['common_share']:.2f}",
                    ]
                    for p in sweep
                ],
            ),
            "",
        ]
    trace_cases = [c for c in doc["cases"] if "trace" in c["data"]]
    if trace_cases:
        lines += [
            "## Traces, per layer / step / attention kind",
            "",
            f"Form tested: {trace_cases[0]['form']}.",
            "",
        ]
        rows = []
        for c in trace_cases:
            d = c["data"]
            for r in c["results"]:
                rows.append(
                    [
                        str(d.get("kind")),
                        str(d.get("layer")),
                        str(d.get("step")),
                        str(d.get("head")),
                        f"{d.get('N')}×{d.get('d')}",
                        f"{d.get('beta'):.3g}",
                        r["claim"],
                        r["setting"],
                        "—" if not r["n_states"] else f"{r['n_passed']}/{r['n_states']}",
                        _fmt(r["worst_margin"]),
                        _fmt(r["rate"], ".3g"),
                        r["status"],
                    ]
                )
        lines += [
            _markdown_table(
                (
                    "kind",
                    "layer",
                    "step",
                    "head",
                    "N×d",
                    "β",
                    "claim",
                    "setting",
                    "passed",
                    "worst margin",
                    "rate",
                    "status",
                ),
                rows,
            ),
            "",
        ]
    if figures:
        lines += ["## Figures", ""]
        for fig in figures:
            lines += [f"![{Path(fig).stem}]({Path(fig).name})", ""]
    lines += ["## Per case", ""]
    rows = []
    for c in doc["cases"]:
        for r in c["results"]:
            rows.append(
                [
                    c["label"],
                    r["claim"],
                    r["setting"],
                    "—" if not r["n_states"] else f"{r['n_passed']}/{r['n_states']}",
                    _fmt(r["worst_margin"]),
                    _fmt(r["tolerance"]),
                    _fmt(r["rate"], ".3g"),
                    r["status"],
                ]
            )
    lines += [
        _markdown_table(
            ("case", "claim", "setting", "passed", "worst margin", "tol", "rate", "status"), rows
        ),
        "",
    ]
    return "\n".join(lines)


def write_report(doc: dict[str, Any], out: str | os.PathLike[str]) -> list[str]:
    """Write results.json, the figures and report.md into ``out``; return the figure paths."""
    from hopfield_aa.plotting import draw_all

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", doc)
    figures = draw_all(doc["figures"], out)
    atomic_write_text(out / "report.md", markdown_report(doc, figures))
    return figures
