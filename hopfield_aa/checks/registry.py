"""The one registry of the claims ``verify`` checks: for each, its name, kind (claim, identity or measured),
premise, margin, grid, figure, runner and replay. The runner, the report, the counter-example replay and
the theory tables (analysis/theory_tables.py) all read it.

What each claim says (name, kind, source, statement, premise, margin, grid, figure) is data, in
``hopfield_aa/data/claims.toml``; the code that runs and replays it is here, under the same key.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import tomllib

from hopfield_aa.checks import claims as C
from hopfield_aa.checks.fixed_points import FixedPoints, find_fixed_points
from hopfield_aa.checks.results import KINDS, Case, CheckResult, CounterexampleStore, ReplayFn

Runner = Callable[[Case, FixedPoints, CounterexampleStore | None], list[CheckResult]]

ZETAS = (0.0, 0.5, 1.0)


@dataclass(frozen=True)
class Claim:
    """One entry of the registry.

    Attributes
    ----------
    key : str
        The short selector of ``verify --claims``.
    name : str
        The claim's name (rows, JSON, counter-example files).
    kind : {"claim", "identity", "measured"}
        ``claim``: a statement about the dynamics with pass/fail verdicts where its premise holds;
        ``identity``: holds by construction of the library's rule (a regression test, reported apart,
        never counted as evidence); ``measured``: a quantity without a verdict.
    source : str
        Where the paper states it (first version's numbering).
    section : str
        The section of papers/theory.md that states, proves and reports it.
    statement : str
        What is checked, in one line.
    premise : str
        What a state must meet to be counted ("" : every state).
    margin : str
        What the margin (allowed − observed) measures.
    grid : str
        The settings every case runs through.
    figure : str or None
        The report figure that shows it.
    run : callable or None
        ``run(case, fixed_points, store) -> [CheckResult]`` per case; None for the value-space
        measurement, which reads the trace records directly.
    replay : callable or None
        ``replay(tensors, params) -> (margin, details)`` of a saved counter-example.
    """

    key: str
    name: str
    kind: str
    source: str
    section: str
    statement: str
    premise: str
    margin: str
    grid: str
    figure: str | None
    run: Runner | None
    replay: ReplayFn | None


# the code of each claim of data/claims.toml, by key (None: measured without a runner, or nothing to replay)
_RUNNERS: dict[str, Runner | None] = {
    "energy": lambda c, fp, s: [C.check_energy_descent(c, counterexample_dir=s)],
    "contraction": lambda c, fp, s: [
        *(
            C.check_weak_contraction(c, alpha=a, fixed_points=fp, counterexample_dir=s)
            for a in (fp.alpha_dense, fp.alpha_sparse)
        ),
        C.check_guided_contraction(c),
    ],
    "orthogonal": lambda c, fp, s: C.check_orthogonal_errors(c, zetas=ZETAS, counterexample_dir=s),
    "preservation": lambda c, fp, s: [
        C.check_fixed_point_preservation(c, fixed_points=fp, counterexample_dir=s)
    ],
    "divergence": lambda c, fp, s: [C.check_divergence(c, fixed_points=fp, counterexample_dir=s)],
    "aa1": lambda c, fp, s: [C.check_extrapolation_aa1(c, counterexample_dir=s)],
    "bounded": lambda c, fp, s: [C.check_bounded_update(c, counterexample_dir=s)],
    "directional": lambda c, fp, s: [C.check_directional_consistency(c, fixed_points=fp)],
    "ladder": lambda c, fp, s: [C.check_ladder(c, fixed_points=fp)],
    "value": None,  # reads the trace records directly (hopfield_aa.checks.value_space)
}
_REPLAYS: dict[str, ReplayFn | None] = {
    "energy": C._replay_energy,
    "contraction": C._replay_contraction,
    "orthogonal": C._replay_orthogonal,
    "preservation": C._replay_preservation,
    "divergence": C._replay_divergence,
    "aa1": C._replay_aa1,
    "bounded": C._replay_bounded,
    "directional": C._replay_directional,
    "ladder": None,
    "value": None,
}


def _load_claims() -> tuple[Claim, ...]:
    """The claims of data/claims.toml, in its order, each with its runner and replay."""
    text = tomllib.loads((resources.files("hopfield_aa") / "data" / "claims.toml").read_text("utf-8"))
    if list(text) != list(_RUNNERS) or list(text) != list(_REPLAYS):
        raise RuntimeError(f"data/claims.toml lists {list(text)}, the registry's code {list(_RUNNERS)}")
    claims = []
    for key, entry in text.items():
        if entry["kind"] not in KINDS:
            raise RuntimeError(f"data/claims.toml: {key}.kind must be one of {KINDS}, got {entry['kind']!r}")
        claims.append(Claim(key=key, **{"figure": None, **entry}, run=_RUNNERS[key], replay=_REPLAYS[key]))
    return tuple(claims)


_ENTRIES = _load_claims()

REGISTRY: dict[str, Claim] = {claim.name: claim for claim in _ENTRIES}
"""Claim name -> :class:`Claim`, in report order (claims, then identities, then measurements)."""

KEYS: dict[str, Claim] = {claim.key: claim for claim in _ENTRIES}
"""``verify --claims`` selector -> :class:`Claim`."""

CLAIMS = tuple(REGISTRY)
"""Every claim name, in report order."""

VALUE_SPACE = KEYS["value"].name
"""The value-space measurement's name (it has no runner: the report measures it on the trace records)."""


def claim_order(name: str) -> int:
    """The position of claim ``name`` in the report (unknown names last)."""
    return CLAIMS.index(name) if name in REGISTRY else len(CLAIMS)


def run_claims(
    case: Case, claims: Sequence[Claim], store: CounterexampleStore | None
) -> tuple[list[CheckResult], dict[str, Any], float]:
    """Run ``claims`` on one case, sharing one fixed-point search between them.

    Returns the results (in the order of ``claims``), the fixed points' summary and the seconds taken.
    """
    start = time.perf_counter()
    fixed_points = find_fixed_points(case)
    results: list[CheckResult] = []
    for claim in claims:
        assert claim.run is not None
        results.extend(claim.run(case, fixed_points, store))
    return results, fixed_points.summary(), time.perf_counter() - start
