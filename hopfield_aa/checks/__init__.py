"""Checks of every claim of THEORY.md §5 on synthetic memories and captured traces, and the verify report.

One function per claim (each returns a :class:`CheckResult` and saves its worst counter-examples, which
:func:`replay_counterexample` re-evaluates); :func:`find_fixed_points` finds and classifies the fixed points
the claims need; :func:`make_family` builds the seeded synthetic memories; :func:`cases_from_traces` reads
captured attention as check data; :func:`run_verification` / :func:`write_report` make the report.
"""

from hopfield_aa.checks.claims import (
    CLAIMS,
    LADDER,
    check_bounded_update,
    check_directional_consistency,
    check_divergence,
    check_energy_descent,
    check_extrapolation_aa1,
    check_fixed_point_preservation,
    check_ladder,
    check_orthogonal_error,
    check_weak_contraction,
)
from hopfield_aa.checks.families import FAMILIES, make_family, starting_states
from hopfield_aa.checks.fixed_points import (
    FixedPoints,
    find_fixed_points,
    residual_curves,
)
from hopfield_aa.checks.report import VerifyConfig, format_table, run_verification, write_report
from hopfield_aa.checks.results import (
    FORM_SYNTHETIC,
    FORM_TRACE,
    Case,
    CheckResult,
    Replay,
    replay_counterexample,
    save_counterexample,
)
from hopfield_aa.checks.traces import bundled_traces, cases_from_traces

__all__ = [
    "CLAIMS",
    "FAMILIES",
    "FORM_SYNTHETIC",
    "FORM_TRACE",
    "LADDER",
    "Case",
    "CheckResult",
    "FixedPoints",
    "Replay",
    "VerifyConfig",
    "bundled_traces",
    "cases_from_traces",
    "check_bounded_update",
    "check_directional_consistency",
    "check_divergence",
    "check_energy_descent",
    "check_extrapolation_aa1",
    "check_fixed_point_preservation",
    "check_ladder",
    "check_orthogonal_error",
    "check_weak_contraction",
    "find_fixed_points",
    "format_table",
    "make_family",
    "replay_counterexample",
    "residual_curves",
    "run_verification",
    "save_counterexample",
    "starting_states",
    "write_report",
]
