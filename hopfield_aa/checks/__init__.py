"""Checks of every claim of papers/theory.md on synthetic memories and captured traces, and the verify report.

One registry (:data:`REGISTRY`) names each claim, its kind (claim, identity or measured), premise,
margin, grid, figure, runner and replay; one function per claim returns a :class:`CheckResult` with a
verdict from :data:`VERDICTS` and saves its worst counter-examples, which :func:`replay_counterexample`
re-evaluates; :func:`find_fixed_points` finds and classifies the fixed points the claims need;
:func:`make_family` builds the seeded synthetic memories; :func:`cases_from_traces` reads captured
attention as check data; :func:`measure_value_space` measures what GAG acts on in value space;
:func:`run_verification` / :func:`write_report` make the report.
"""

from hopfield_aa.checks.claims import (
    LADDER,
    check_bounded_update,
    check_directional_consistency,
    check_divergence,
    check_energy_descent,
    check_extrapolation_aa1,
    check_fixed_point_preservation,
    check_guided_contraction,
    check_ladder,
    check_orthogonal_error,
    check_weak_contraction,
)
from hopfield_aa.checks.families import FAMILIES, make_family, starting_states
from hopfield_aa.checks.fixed_points import (
    FixedPoints,
    find_fixed_points,
    lipschitz_bounds,
    premise_beta,
    residual_curves,
)
from hopfield_aa.checks.registry import CLAIMS, REGISTRY, Claim
from hopfield_aa.checks.results import (
    FORM_SYNTHETIC,
    FORM_TRACE,
    VERDICTS,
    Case,
    CheckResult,
    CounterexampleStore,
    Replay,
    case_results,
    replay_counterexample,
    save_counterexample,
)
from hopfield_aa.checks.traces import bundled_traces, cases_from_traces
from hopfield_aa.checks.value_space import measure_value_space

__all__ = [
    "CLAIMS",
    "FAMILIES",
    "FORM_SYNTHETIC",
    "FORM_TRACE",
    "LADDER",
    "REGISTRY",
    "VERDICTS",
    "Case",
    "CheckResult",
    "Claim",
    "CounterexampleStore",
    "FixedPoints",
    "Replay",
    "VerifyConfig",
    "bundled_traces",
    "case_results",
    "cases_from_traces",
    "check_bounded_update",
    "check_directional_consistency",
    "check_divergence",
    "check_energy_descent",
    "check_extrapolation_aa1",
    "check_fixed_point_preservation",
    "check_guided_contraction",
    "check_ladder",
    "check_orthogonal_error",
    "check_weak_contraction",
    "find_fixed_points",
    "format_table",
    "lipschitz_bounds",
    "make_family",
    "measure_value_space",
    "premise_beta",
    "replay_counterexample",
    "residual_curves",
    "run_verification",
    "save_counterexample",
    "starting_states",
    "write_report",
]

_REPORT_NAMES = frozenset({"VerifyConfig", "format_table", "run_verification", "write_report"})


def __getattr__(name: str) -> object:
    # The runner and the report import matplotlib and the trace loader: load them on first use.
    if name in _REPORT_NAMES:
        from hopfield_aa.checks import report

        return getattr(report, name)
    raise AttributeError(f"module 'hopfield_aa.checks' has no attribute {name!r}")
