"""The tables of papers/theory.md, generated from a ``hopfield-aa verify`` results.json and from the symbolic
derivations, and inserted between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->`` markers.

The note's measured evidence comes from the committed snapshot ``papers/data/verify/results.json``, written
by ``hopfield-aa verify --out papers/data/verify`` (the bundled traces of the reference model included when
present; ``python analysis/make_all.py --only verify`` regenerates it and drops the counter-examples).
A snapshot, not a fresh run, so the test that compares the note's tables with this script's output
(tests/test_docs.py) is deterministic and fast; regenerate both with ``python analysis/make_all.py``.

Usage:
    python analysis/theory_tables.py                 # rewrite the tables in papers/theory.md
    python analysis/theory_tables.py --check         # exit 1 if the note's tables are out of date
    python analysis/theory_tables.py --results other/results.json --print
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NOTE = ROOT / "papers" / "theory.md"
DEFAULT_RESULTS = ROOT / "papers" / "data" / "verify" / "results.json"
RESULTS_MD = ROOT / "analysis" / "results" / "theory_tables.md"


def _registry() -> dict[str, Any]:
    """The claim registry of ``hopfield_aa.checks`` (name -> entry with kind, premise, section, ...)."""
    from hopfield_aa.checks.registry import REGISTRY

    return dict(REGISTRY)


CLAIM_ORDER = tuple(_registry())
# every claim has its own table except the value-space measurement, whose table is "value-space"
PER_CLAIM = tuple(name for name in CLAIM_ORDER if _registry()[name].run is not None)
VERDICT_ORDER = ("pass", "fail", "premise not met", "identity", "measured")


def slug(name: str) -> str:
    """``"extrapolation is AA(1)"`` -> ``"extrapolation-is-aa-1"``: the marker name of a claim's table."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# --------------------------------------------------------------------------------------------- loading


def load_results(path: str | os.PathLike[str] = DEFAULT_RESULTS) -> dict[str, Any] | None:
    """The results document, or None when the file does not exist (tables then say so)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        return None
    doc = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(doc, dict) or "summary" not in doc:
        raise ValueError(f"{path}: not a results.json written by 'hopfield-aa verify' (no 'summary')")
    return doc


# ------------------------------------------------------------------------------------------ formatting


def _num(value: Any, spec: str = ".2e") -> str:
    if isinstance(value, str):  # JSON has no NaN/inf: results.json may spell them as strings
        try:
            value = float(value)
        except ValueError:
            return value
    if value is None:
        return "–"
    if isinstance(value, float) and math.isnan(value):
        return "–"
    if isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _pct(passed: int, total: int) -> str:
    """Pass rate to 0.1 %, rounded so that a rate with a failure never reads 100.0 % (nor one with a pass
    0.0 %)."""
    if not total:
        return "–"
    if 0 < passed < total:
        tenths = min(max(math.floor(1000.0 * passed / total), 1), 999)
        return f"{tenths / 10:.1f} %"
    return f"{100.0 * passed / total:.1f} %"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _verdict(rows: Sequence[Mapping[str, Any]]) -> str:
    """One claim's groups summed up by verdict: ``pass on 5, fail on 2, premise not met on 1`` (of 8)."""
    counts = {v: sum(1 for r in rows if r["status"] == v) for v in VERDICT_ORDER}
    parts = [f"**{v}** on {n}" if v == "fail" else f"{v} on {n}" for v, n in counts.items() if n]
    return ", ".join(parts) + f" (of {len(rows)} groups)"


def _kind(claim: str) -> str:
    entry = _registry().get(claim)
    return entry.kind if entry is not None else "–"


# ---------------------------------------------------------------------------------------------- tables


def claims_table(doc: Mapping[str, Any]) -> str:
    """One row per claim: kind, groups, states tried, how many met the premise, passed among those, worst
    margin, and the verdicts of its (setting, data) groups."""
    by_claim: dict[str, list[Mapping[str, Any]]] = {}
    for row in doc["summary"]:
        by_claim.setdefault(row["claim"], []).append(row)
    order = {name: i for i, name in enumerate(CLAIM_ORDER)}
    out = []
    for claim in sorted(by_claim, key=lambda c: order.get(c, len(order))):
        rows = by_claim[claim]
        tried = sum(int(r["n_states"]) for r in rows)
        met = sum(int(r.get("n_premise", r["n_states"])) for r in rows)
        passed = sum(int(r["n_passed"]) for r in rows)
        margins = [m for m in (_float(r["worst_margin"]) for r in rows) if not math.isnan(m)]
        out.append(
            [
                claim,
                _kind(claim),
                str(len(rows)),
                str(tried),
                str(met),
                _pct(passed, met),
                _num(min(margins)) if margins else "–",
                _verdict(rows),
            ]
        )
    return markdown_table(
        ["claim", "kind", "groups", "tried", "premise met", "passed (of met)", "worst margin", "verdicts"],
        out,
    )


def claim_detail_table(doc: Mapping[str, Any], claim: str) -> str:
    """The summary rows of one claim: setting × data group, with the premise count and why it was not met."""
    rows = [r for r in doc["summary"] if r["claim"] == claim]
    if not rows:
        return f"*No results for “{claim}” in this run.*"
    has_rate = any(r.get("rate") is not None for r in rows)
    header = ["setting", "data", "cases", "tried", "premise met", "passed (of met)", "worst margin"]
    if has_rate:
        header.append("rate (median)")
    header += ["verdict", "premise not met: why"]
    body = []
    for r in rows:
        met = int(r.get("n_premise", r["n_states"]))
        cells = [
            r.get("setting") or "–",
            str(r["data"]),
            str(r["cases"]),
            str(r["n_states"]),
            str(met),
            _pct(int(r["n_passed"]), met),
            _num(r["worst_margin"]),
        ]
        if has_rate:
            cells.append(_num(r.get("rate"), ".3g"))
        cells += [str(r["status"]), r.get("premise_note") or "–"]
        body.append(cells)
    return markdown_table(header, body)


def failures_table(doc: Mapping[str, Any]) -> str:
    """Every failing (claim, setting, data) group, the premise that held for the states it counts, its
    failing cases and saved counter-examples."""
    rows = [r for r in doc["summary"] if r["status"] == "fail"]
    if not rows:
        return "*No claim failed where its premise held in this run.*"
    body = []
    for r in rows:
        cases = list(r.get("failing_cases", []))
        shown = ", ".join(f"`{c}`" for c in cases[:3]) + (f" (+{len(cases) - 3})" if len(cases) > 3 else "")
        met = int(r.get("n_premise", r["n_states"]))
        body.append(
            [
                r["claim"],
                r.get("setting") or "–",
                str(r["data"]),
                f"{met - int(r['n_passed'])} of {met}",
                r.get("premise") or "–",
                _num(r["worst_margin"]),
                shown or "–",
                str(len(r.get("counterexamples", []))),
            ]
        )
    return markdown_table(
        [
            "claim",
            "setting",
            "data",
            "violations (of premise met)",
            "premise (held)",
            "worst margin",
            "failing cases",
            "counter-examples kept",
        ],
        body,
    )


def fixed_points_table(doc: Mapping[str, Any]) -> str:
    """Distinct fixed points per data group, how many are common to D and S, and the β from which some
    pattern is a common fixed point (the premise of preservation), beside the group's largest β."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for case in doc.get("cases", []):
        groups.setdefault(str(case.get("group")), []).append(case)
    body = []
    for group in sorted(groups):
        fixed = [c.get("fixed_points") or {} for c in groups[group]]
        distinct = sum(int(f.get("distinct_fixed_points", 0)) for f in fixed)
        common = sum(int(f.get("distinct_common", 0)) for f in fixed)
        premise = [_float(f.get("premise_beta")) for f in fixed]
        premise = [b for b in premise if not math.isnan(b)]
        betas = [_float(c.get("data", {}).get("beta")) for c in groups[group]]
        body.append(
            [
                group,
                str(len(fixed)),
                str(distinct),
                f"{common} ({_pct(common, distinct)})" if distinct else "0",
                _num(min(premise), ".3g") if premise else "–",
                _num(max(betas), ".3g") if betas else "–",
            ]
        )
    return markdown_table(
        [
            "data",
            "cases",
            "distinct fixed points",
            "common to D and S",
            "premise attainable from β ≈",
            "largest β",
        ],
        body,
    )


def orthogonal_offsets_table(doc: Mapping[str, Any]) -> str:
    """Where G's limit is not a fixed point of S: the measured orthogonal offset and its closed form."""
    rows = [r for r in doc["summary"] if r["claim"] == "orthogonal-error convergence"]
    if not rows:
        return "*No orthogonal-error rows in this run.*"
    body = []
    for r in rows:
        m = r.get("measured") or {}
        body.append(
            [
                r.get("setting") or "–",
                str(r["data"]),
                f"{r.get('n_premise', 0)}/{r['n_states']}",
                _num(m.get("offset_over_M_median"), ".3g"),
                _num(m.get("offset_over_M_max"), ".3g"),
                _num(m.get("closed_form_error_over_M"), ".1e"),
                _num(m.get("radius_median"), ".3g"),
                _num(r.get("rate"), ".3g"),
            ]
        )
    return markdown_table(
        [
            "setting",
            "data",
            "premise met",
            "offset/M (median)",
            "offset/M (max)",
            "closed-form gap/M",
            "ρ(DG(ξ*)) median",
            "rate of ‖e⊥‖ (median)",
        ],
        body,
    )


def contraction_table(doc: Mapping[str, Any]) -> str:
    """Weak contraction beside the N-independent bounds, and where G stops contracting."""
    rows = [r for r in doc["summary"] if r["claim"] == "weak contraction"]
    if not rows:
        return "*No weak-contraction rows in this run.*"
    body = []
    for r in rows:
        m = r.get("measured") or {}
        if "lambda_c_median" in m:
            body.append(
                [
                    r.get("setting") or "–",
                    str(r["data"]),
                    "–",
                    "–",
                    "–",
                    _num(m.get("lambda_c_median"), ".3g"),
                    _num(m.get("lambda_c_extrapolation_median"), ".3g"),
                ]
            )
        else:
            body.append(
                [
                    r.get("setting") or "–",
                    str(r["data"]),
                    _num(m.get("lipschitz_max"), ".3g"),
                    _num(m.get("lipschitz_share_below_1_median"), ".2f"),
                    f"{int(m.get('global_bound_below_1_cases', 0))} of {r['cases']}"
                    if r.get("setting") == "α=1"
                    else _num(m.get("bound_share_below_1_median"), ".2f"),
                    "–",
                    "–",
                ]
            )
    return markdown_table(
        [
            "setting",
            "data",
            "max ‖DT(ξ_t)‖₂",
            "share ‖DT‖ < 1 (median)",
            "β D²/4 < 1 (cases) / β σ D_S²/4 < 1 (share)",
            "λ_c of G (median)",
            "λ_c of P_λ (median)",
        ],
        body,
    )


def value_space_table(doc: Mapping[str, Any]) -> str:
    """Value space per attention kind and denoising step (medians over layers of the per-layer values)."""
    vs = doc.get("value_space") or {}
    rows = vs.get("rows") or []
    if not rows:
        return NO_TRACES
    grouped: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for row in rows:
        grouped.setdefault((str(row["kind"]), int(row["step"])), []).append(row)

    def med(items: Sequence[Mapping[str, Any]], key: str) -> float:
        values = sorted(v for v in (_float(i.get(key)) for i in items) if not math.isnan(v))
        if not values:
            return math.nan
        mid = len(values) // 2
        return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])

    body = [
        [
            kind,
            str(step),
            str(len(items)),
            _num(med(items, "orthogonal_ratio_median"), ".3f"),
            _num(med(items, "discarded_share"), ".3f"),
            _num(med(items, "update_over_output_median"), ".3f"),
            _num(med(items, "cos_parallel_change_median"), "+.3f"),
            _num(med(items, "parallel_aligned_share"), ".2f"),
            _num(med(items, "cos_residual_change_median"), "+.3f"),
        ]
        for (kind, step), items in sorted(grouped.items())
    ]
    return markdown_table(
        [
            "kind",
            "step",
            "layers",
            "‖r⊥‖/‖r‖",
            "discarded share",
            "‖r‖/‖D·V‖",
            "cos(r∥, Δ)",
            "r∥ along Δ",
            "cos(r, Δ)",
        ],
        body,
    )


def _relative(text: str) -> str:
    """``text`` with absolute checkout paths removed (paths in results.json are absolute, and the snapshot
    may have been written in another checkout than the one reading it)."""
    text = text.replace(str(ROOT) + os.sep, "").replace(str(ROOT), ".")
    return re.sub(r"(?:/[^/\s|()]+)+/(hopfield_aa/)", r"\1", text)


def _is_trace(data: Any) -> bool:
    return str(data).startswith("trace:")


NO_TRACES = (
    "*This snapshot has no trace rows: it was made without the bundled traces of the reference model "
    "(`hopfield-aa verify` reads them from `hopfield_aa/data/traces` when they are present).*"
)


def trace_data_table(doc: Mapping[str, Any]) -> str:
    """One row per trace group (attention kind): head cases, layers, steps, memory sizes, β, and how many
    dense fixed points reached from the queries the sparse map fixes too."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for case in doc.get("cases", []):
        if _is_trace(case.get("group")):
            groups.setdefault(str(case["group"]), []).append(case)
    if not groups:
        return NO_TRACES
    body = []
    for group in sorted(groups):
        cases = groups[group]
        data = [c.get("data", {}) for c in cases]
        sizes = sorted({(int(x["N"]), int(x["d"])) for x in data if "N" in x and "d" in x})
        betas = sorted({round(float(x["beta"]), 3) for x in data if "beta" in x})
        steps = sorted({int(x["step"]) for x in data if x.get("step") is not None})
        fixed = [c.get("fixed_points") or {} for c in cases]
        distinct = sum(int(f.get("distinct_fixed_points", 0)) for f in fixed)
        common = sum(int(f.get("distinct_common", 0)) for f in fixed)
        body.append(
            [
                group,
                str(len(cases)),
                str(len({x.get("layer") for x in data})),
                ", ".join(map(str, steps)) or "–",
                ", ".join(f"{n}×{d}" for n, d in sizes) or "–",
                ", ".join(f"{b:g}" for b in betas) or "–",
                f"{common} of {distinct}",
            ]
        )
    return markdown_table(
        ["data", "head cases", "layers", "steps", "N × d", "β", "distinct fixed points common to D and S"],
        body,
    )


def trace_claims_table(doc: Mapping[str, Any]) -> str:
    """The summary rows on traces only: claim × setting × attention kind."""
    rows = [r for r in doc["summary"] if _is_trace(r["data"])]
    if not rows:
        return NO_TRACES
    order = {name: i for i, name in enumerate(CLAIM_ORDER)}
    rows.sort(key=lambda r: (order.get(r["claim"], len(order)), str(r.get("setting")), str(r["data"])))
    body = [
        [
            r["claim"],
            r.get("setting") or "–",
            str(r["data"]),
            str(r["cases"]),
            f"{r.get('n_premise', r['n_states'])}/{r['n_states']}",
            f"{r['n_passed']}/{r.get('n_premise', r['n_states'])}" if int(r.get("n_premise", 0)) else "–",
            _num(r["worst_margin"]),
            _num(r.get("rate"), ".3g"),
            str(r["status"]),
        ]
        for r in rows
    ]
    return markdown_table(
        [
            "claim",
            "setting",
            "data",
            "cases",
            "premise met",
            "passed",
            "worst margin",
            "rate (median)",
            "verdict",
        ],
        body,
    )


def provenance_table(doc: Mapping[str, Any]) -> str:
    settings, env = doc.get("settings", {}), doc.get("environment", {})
    rows = [
        [
            "command",
            "`hopfield-aa verify"
            + (" --quick" if settings.get("quick") else "")
            + f" --seed {settings.get('seed')}`",
        ],
        ["synthetic families", ", ".join(settings.get("families", [])) or "none"],
        ["traces", _relative(str(settings.get("traces")))],
        ["cases", str(len(doc.get("cases", [])))],
        ["compute dtype", str(settings.get("dtype"))],
        ["counter-examples kept per claim", str(settings.get("max_counterexamples_per_claim"))],
        ["torch", str(env.get("torch"))],
    ]
    return markdown_table(["", "value"], rows)


def derivations_table() -> str:
    """One row per symbolic derivation of :mod:`hopfield_aa.symbolic`, run now."""
    from hopfield_aa import symbolic

    body = []
    for name, derive in symbolic.DERIVATIONS.items():
        result = derive()
        body.append(
            [
                name,
                f"`hopfield_aa.symbolic.{derive.__name__}`",
                str(len(result.residuals)),
                "0 (holds)" if result.holds else "non-zero: " + ", ".join(result.failing()),
            ]
        )
    return markdown_table(["derivation", "function", "steps", "residual"], body)


def render_tables(doc: Mapping[str, Any] | None, *, derivations: bool = True) -> dict[str, str]:
    """Every table of the note, by marker name."""
    tables: dict[str, str] = {}
    if derivations:
        tables["derivations"] = derivations_table()
    if doc is None:
        where = DEFAULT_RESULTS.parent.relative_to(ROOT)
        missing = f"*No verify results yet: run `hopfield-aa verify --out {where}`.*"
        tables["provenance"] = tables["claims"] = tables["failures"] = missing
        tables["trace-data"] = tables["trace-claims"] = missing
        for name in ("fixed-points", "orthogonal-offsets", "contraction", "value-space"):
            tables[name] = missing
        for claim in PER_CLAIM:
            tables[f"claim-{slug(claim)}"] = missing
        return tables
    tables["provenance"] = provenance_table(doc)
    tables["claims"] = claims_table(doc)
    tables["failures"] = failures_table(doc)
    tables["fixed-points"] = fixed_points_table(doc)
    tables["orthogonal-offsets"] = orthogonal_offsets_table(doc)
    tables["contraction"] = contraction_table(doc)
    tables["value-space"] = value_space_table(doc)
    tables["trace-data"] = trace_data_table(doc)
    tables["trace-claims"] = trace_claims_table(doc)
    for claim in CLAIM_ORDER:
        if claim in PER_CLAIM:
            tables[f"claim-{slug(claim)}"] = claim_detail_table(doc, claim)
    return tables


# ------------------------------------------------------------------------------------------- insertion


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- table:{re.escape(name)} -->\n)(.*?)(<!-- /table:{re.escape(name)} -->)", re.S)


def extract_table(text: str, name: str) -> str | None:
    """The text between the markers of table ``name`` (stripped), or None without markers."""
    match = _pattern(name).search(text)
    return None if match is None else match.group(2).strip()


def insert_tables(text: str, tables: Mapping[str, str], *, require_all: bool = True) -> str:
    """Replace what is between each table's markers; a table without markers raises ``ValueError``."""
    for name, body in tables.items():
        pattern = _pattern(name)
        if not pattern.search(text):
            if require_all:
                raise ValueError(
                    f"no <!-- table:{name} --> ... <!-- /table:{name} --> markers for table {name!r}"
                )
            continue

        def replace(match: re.Match[str], table: str = body) -> str:
            return match.group(1) + table.strip() + "\n" + match.group(3)

        text = pattern.sub(replace, text)
    return text


def _atomic_write(path: Path, text: str) -> None:
    from hopfield_aa._io import write_text

    write_text(path, text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="a verify results.json")
    parser.add_argument("--note", type=Path, default=NOTE, help="the Markdown file with table markers")
    parser.add_argument("--check", action="store_true", help="exit 1 if the note's tables are out of date")
    parser.add_argument("--print", action="store_true", help="print the tables instead of writing")
    args = parser.parse_args(argv)
    tables = render_tables(load_results(args.results))
    if args.print:
        for name, body in tables.items():
            print(f"## {name}\n\n{body}\n")
        return 0
    text = args.note.read_text(encoding="utf-8")
    updated = insert_tables(text, tables)
    if args.check:
        stale = [n for n, b in tables.items() if extract_table(text, n) != b.strip()]
        if stale:
            print("out of date: " + ", ".join(stale), file=sys.stderr)
            return 1
        print("theory tables up to date")
        return 0
    _atomic_write(args.note, updated)
    summary = "\n\n".join(f"## {name}\n\n{body}" for name, body in tables.items())
    _atomic_write(RESULTS_MD, "# Tables of papers/theory.md\n\n" + summary + "\n")
    shown = args.note.relative_to(ROOT) if args.note.is_relative_to(ROOT) else args.note
    print(f"wrote {len(tables)} tables into {shown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
