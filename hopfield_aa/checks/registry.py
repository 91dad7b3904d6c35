"""The one registry of the claims ``verify`` checks: for each, its name, kind (claim, identity or measured),
premise, margin, grid, figure, runner and replay. The runner, the report, the counter-example replay and
the theory tables (analysis/theory_tables.py) all read it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hopfield_aa.checks import claims as C
from hopfield_aa.checks.fixed_points import FixedPoints, find_fixed_points
from hopfield_aa.checks.results import (
    KIND_CLAIM,
    KIND_IDENTITY,
    KIND_MEASURED,
    Case,
    CheckResult,
    CounterexampleStore,
    ReplayFn,
)

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


VALUE_SPACE = "what GAG acts on (value space)"

_ENTRIES = (
    Claim(
        key="energy",
        name="energy descent",
        kind=KIND_CLAIM,
        source="Thm 3.1",
        section="§3",
        statement="E_α(T_α ξ) ≤ E_α(ξ) − ½‖T_α ξ − ξ‖² along the trajectories of T_α",
        premise="",
        margin="tol − (E(Tξ) − E(ξ) + ½‖Tξ − ξ‖²)",
        grid="α ∈ {1, 1.25, 1.5, 2}, 12 steps from every start",
        figure="energy.png",
        run=lambda c, fp, s: [C.check_energy_descent(c, counterexample_dir=s)],
        replay=C._replay_energy,
    ),
    Claim(
        key="contraction",
        name="weak contraction",
        kind=KIND_CLAIM,
        source="§3 (weak contraction)",
        section="§4",
        statement="‖T(ξ_t) − ξ*‖ ≤ ‖ξ_t − ξ*‖ along the trajectories from the starting states, for D and S; "
        "for G the λ above which it stops contracting (measured)",
        premise="ξ* is an attracting fixed point (ρ(DT(ξ*)) < 1)",
        margin="‖ξ_t − ξ*‖ + tol − ‖T(ξ_t) − ξ*‖",
        grid="T ∈ {D, S}, 8 steps; G and P_λ at λ ∈ {0.5, 1, 2, 4, 8, 16}, ζ = 0",
        figure="contraction.png",
        run=lambda c, fp, s: [
            *(
                C.check_weak_contraction(c, alpha=a, fixed_points=fp, counterexample_dir=s)
                for a in (fp.alpha_dense, fp.alpha_sparse)
            ),
            C.check_guided_contraction(c),
        ],
        replay=C._replay_contraction,
    ),
    Claim(
        key="orthogonal",
        name="orthogonal-error convergence",
        kind=KIND_CLAIM,
        source="Thm 3.7",
        section="§10",
        statement="near a fixed point ξ* of G, ‖e⊥_t‖ contracts per step at the linear rate ρ(DG(ξ*))",
        premise="G's limit is an attracting fixed point of G and a fixed point of S",
        margin="ρ(DG(ξ*)) + slack − (per-step factor of ‖e⊥‖)",
        grid="λ = 1, η = ∞, reference S, ζ ∈ {0, ½, 1}",
        figure="orthogonal_error.png",
        run=lambda c, fp, s: C.check_orthogonal_errors(c, zetas=ZETAS, counterexample_dir=s),
        replay=C._replay_orthogonal,
    ),
    Claim(
        key="preservation",
        name="fixed-point preservation",
        kind=KIND_IDENTITY,
        source="Lemma 3.3",
        section="§6",
        statement="P_λ(ξ*) = G(ξ*) = ξ* at distinct common fixed points",
        premise="ξ* is a fixed point of both D and S",
        margin="tol − max(‖G(ξ*) − ξ*‖, ‖P_λ(ξ*) − ξ*‖)",
        grid="λ ∈ {−1, ½, 2, 5} × ζ ∈ {0, ½, 1} × η ∈ {0.1M, ∞} × reference ∈ {S, D, S − ξ}",
        figure="common_vs_beta.png",
        run=lambda c, fp, s: [C.check_fixed_point_preservation(c, fixed_points=fp, counterexample_dir=s)],
        replay=C._replay_preservation,
    ),
    Claim(
        key="divergence",
        name="divergence at non-common fixed points",
        kind=KIND_IDENTITY,
        source="Remark 3.4",
        section="§7",
        statement="‖P_λ(ξ*) − ξ*‖ = |λ| ‖r(ξ*)‖ at distinct dense fixed points",
        premise="ξ* is a dense fixed point with S(ξ*) ≠ ξ*",
        margin="tol − |‖P_λ(ξ*) − ξ*‖ − |λ| ‖r(ξ*)‖|",
        grid="λ ∈ {0, ½, 1, 2, 4, 8}",
        figure="divergence.png",
        run=lambda c, fp, s: [C.check_divergence(c, fixed_points=fp, counterexample_dir=s)],
        replay=C._replay_divergence,
    ),
    Claim(
        key="aa1",
        name="extrapolation is AA(1)",
        kind=KIND_IDENTITY,
        source="Prop 3.2",
        section="§5",
        statement="‖P_λ(ξ) − AA₁(D, S; γ = 1 − λ)‖ ≤ tol; the Anderson-optimal λ* measured",
        premise="",
        margin="tol − ‖P_λ − AA₁‖",
        grid="λ ∈ {−1, ½, 1, 2, 4, 8}",
        figure="lambda_star.png",
        run=lambda c, fp, s: [C.check_extrapolation_aa1(c, counterexample_dir=s)],
        replay=C._replay_aa1,
    ),
    Claim(
        key="bounded",
        name="bounded update",
        kind=KIND_IDENTITY,
        source="Remark 3.8",
        section="§9",
        statement="‖G(ξ) − S(ξ)‖ ≤ |λ| (η + |ζ| ‖r⊥‖)",
        premise="",
        margin="bound + tol − ‖G − S‖",
        grid="λ ∈ {−2, ½, 1, 3, 8} × ζ ∈ {0, ½, 1} × η ∈ {0.01, 0.1, 1}·M × reference ∈ {S, D, S − ξ}",
        figure=None,
        run=lambda c, fp, s: [C.check_bounded_update(c, counterexample_dir=s)],
        replay=C._replay_bounded,
    ),
    Claim(
        key="directional",
        name="directional consistency",
        kind=KIND_MEASURED,
        source="later version",
        section="§11",
        statement="share of states with ⟨r, ξ*_S − D(ξ)⟩ > 0, and with ⟨r, S(ξ)⟩ > 0",
        premise="the sparse iteration from ξ converged",
        margin="cosine − 16·eps·d",
        grid="α = 1.5",
        figure=None,
        run=lambda c, fp, s: [C.check_directional_consistency(c, fixed_points=fp)],
        replay=C._replay_directional,
    ),
    Claim(
        key="ladder",
        name=C.LADDER,
        kind=KIND_MEASURED,
        source="§4 (deeper AA)",
        section="§12",
        statement="share of (start, λ) where the α-ladder L_λ is closer to ξ*_S than P_λ",
        premise="the sparse iteration from ξ converged",
        margin="(‖P_λ − ξ*_S‖ − ‖L_λ − ξ*_S‖)/M",
        grid="α ∈ {1, 1.25, 1.5, 2}, λ ∈ {1, 1.5, 2, 3, 5}",
        figure="ladder.png",
        run=lambda c, fp, s: [C.check_ladder(c, fixed_points=fp)],
        replay=None,
    ),
    Claim(
        key="value",
        name=VALUE_SPACE,
        kind=KIND_MEASURED,
        source="§3 (what GAG acts on)",
        section="§13",
        statement="on real heads, per layer and step, in value space (S·V vs D·V): ‖r⊥‖/‖r‖, the share of "
        "the extrapolation update GAG discards, and the alignment of r∥ with the change of the output",
        premise="trace records with values",
        margin="(no margin: measured)",
        grid="every layer and captured step of the bundled traces, reference S·V",
        figure="value_space.png",
        run=None,
        replay=None,
    ),
)

REGISTRY: dict[str, Claim] = {claim.name: claim for claim in _ENTRIES}
"""Claim name -> :class:`Claim`, in report order (claims, then identities, then measurements)."""

KEYS: dict[str, Claim] = {claim.key: claim for claim in _ENTRIES}
"""``verify --claims`` selector -> :class:`Claim`."""

CLAIMS = tuple(REGISTRY)
"""Every claim name, in report order."""


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
