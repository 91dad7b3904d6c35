"""The verdict vocabulary: a check counts only the states that meet its claim's premise, says why the others
do not, never reports a premise violation as a failure, and reports identities and measurements apart."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hopfield_aa.checks import (
    REGISTRY,
    VERDICTS,
    Case,
    CounterexampleStore,
    check_directional_consistency,
    check_fixed_point_preservation,
    check_guided_contraction,
    check_orthogonal_error,
    check_weak_contraction,
    find_fixed_points,
    lipschitz_bounds,
    make_family,
    premise_beta,
    replay_counterexample,
)
from hopfield_aa.checks.fixed_points import spectral_radius_fd
from hopfield_aa.checks.results import tolerance
from hopfield_aa.hopfield import _local_lipschitz, _retrieve

F64 = torch.float64
ZETAS = (0.0, 0.5, 1.0)
ROOT = Path(__file__).resolve().parents[1]
OLD_COUNTEREXAMPLES = ROOT / "analysis" / "results" / "reference_traces_counterexamples" / "previous_model"


def memory(seed: int, n: int, d: int, beta: float, states: int = 6) -> Case:
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.randn(n, d, generator=gen, dtype=F64)
    xi = torch.randn(states, d, generator=gen, dtype=F64)
    return Case(patterns, xi, beta, {"family": "test", "N": n, "d": d, "beta": beta})


# ------------------------------------------------------------------------------------ vocabulary


def test_tolerance_uses_the_epsilon_of_the_dtype_itself() -> None:
    assert tolerance(torch.float16, 1.0) == torch.finfo(torch.float16).eps
    assert tolerance(torch.bfloat16, 2.0) == 2 * torch.finfo(torch.bfloat16).eps
    assert tolerance(torch.float16, 1.0) > 1000 * tolerance(torch.float32, 1.0)


def test_registry_names_kind_premise_and_replay_of_every_claim() -> None:
    kinds = {claim.kind for claim in REGISTRY.values()}
    assert kinds == {"claim", "identity", "measured"}
    identities = {n for n, c in REGISTRY.items() if c.kind == "identity"}
    assert identities == {
        "extrapolation is AA(1)",
        "bounded update",
        "divergence at non-common fixed points",
        "fixed-point preservation",
    }
    assert REGISTRY["directional consistency"].kind == "measured"
    for claim in REGISTRY.values():
        assert claim.statement and claim.margin and claim.grid
        assert claim.run is not None or claim.key == "value"


# ------------------------------------------------------------------------------------ orthogonal error


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    d=st.integers(2, 6),
    beta=st.floats(0.05, 50.0),
    zeta=st.sampled_from(ZETAS),
)
def test_one_pattern_memory_gives_orthogonal_error_pass_for_every_zeta(
    seed: int, d: int, beta: float, zeta: float
) -> None:
    """One stored pattern: every retrieval is that pattern, a common fixed point, and G reaches it."""
    case = memory(seed, 1, d, beta)
    result = check_orthogonal_error(case, zeta=zeta, trajectory_steps=6)
    assert result.status == "pass"
    assert result.n_premise == result.n_states == 6 and result.n_passed == 6


@pytest.mark.parametrize("zeta", ZETAS)
def test_common_fixed_points_at_large_beta_pass(zeta: float) -> None:
    saturated = make_family("beta_sweep", seed=0, n_states=8)[
        -1
    ]  # β = 1000: D and S share their fixed points
    fp = find_fixed_points(saturated)
    assert bool(fp.sparse_common.all())
    result = check_orthogonal_error(saturated, zeta=zeta, trajectory_steps=8)
    assert result.status == "pass" and result.n_premise > 0
    assert result.measured["radius"]["max"] < 1


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), beta=st.floats(0.1, 1.0), zeta=st.sampled_from(ZETAS))
def test_a_point_with_nonzero_residual_is_premise_not_met_never_fail(
    seed: int, beta: float, zeta: float
) -> None:
    """At a dense fixed point with r(ξ*) ≠ 0, G(ξ*) ≠ ξ* (and S(ξ*) ≠ ξ*): the theorem does not apply."""
    case = memory(seed, 8, 4, beta)
    fp = find_fixed_points(case)
    points = fp.dense[fp.dense_non_common]
    if points.shape[0] == 0:
        return
    sub = Case(case.patterns, case.states[fp.dense_non_common], beta, case.data)
    result = check_orthogonal_error(sub, zeta=zeta, targets=points, trajectory_steps=4)
    assert result.status == "premise not met" and result.n_premise == 0 and result.n_passed == 0
    assert "without a limit" in result.premise_note or "not fixed" in result.premise_note
    # and on the limits of G itself, whatever they are, the verdict is never a failure
    assert check_orthogonal_error(case, zeta=zeta, trajectory_steps=8).status in ("pass", "premise not met")


def test_the_offset_of_a_limit_not_fixed_by_s_matches_its_closed_form() -> None:
    case = make_family("gaussian", seed=0, quick=True, n_states=8)[1]
    for zeta in ZETAS:
        result = check_orthogonal_error(case, zeta=zeta)
        assert result.status == "premise not met"
        assert "limits not fixed by S" in result.premise_note
        assert result.measured["closed_form_error_over_M"] < 1e-9
        if zeta > 0:  # λζ r⊥(ξ∞) ≠ 0: a real offset, not rounding (ζ = 0 here: single-pattern supports)
            assert result.measured["offset_over_M"]["max"] > 1e-6


def test_orthogonal_error_fails_when_it_contracts_slower_than_the_linear_rate(tmp_path: Path) -> None:
    """A rule equal to S within 1e-3 of S(ξ) (so DG(ξ*) = DS(ξ*) ≈ 0 at the common fixed points of a
    saturated memory) that only shrinks ξ − S(ξ) by 0.99 per step further out: the premise holds (ξ* is an
    attracting fixed point of G and S, and the starts are near it), the orthogonal error contracts at 0.99,
    far slower than ρ(DG(ξ*))."""
    saturated = make_family("beta_sweep", seed=0, n_states=6)[-1]
    points = find_fixed_points(saturated).sparse
    offset = torch.zeros_like(points)
    offset[:, 0] = 1.0
    offset = offset - (offset * points).sum(-1, keepdim=True) * points / (points**2).sum(-1, keepdim=True)
    offset = offset / torch.linalg.vector_norm(offset, dim=-1, keepdim=True)
    case = Case(saturated.patterns, points + 5e-3 * offset, saturated.beta, saturated.data)

    def slow(dense, sparse, scale, zeta, eta, reference, state):
        away = state - sparse
        inside = torch.linalg.vector_norm(away, dim=-1, keepdim=True) <= 1e-3
        return torch.where(inside, sparse, sparse + 0.99 * away)

    result = check_orthogonal_error(
        case, targets=points, rule=slow, trajectory_steps=10, counterexample_dir=tmp_path
    )
    assert result.status == "fail" and result.n_premise == result.n_states and result.counterexamples
    assert result.rate == pytest.approx(0.99, abs=1e-3) and result.measured["radius"]["max"] < 0.05
    replay = replay_counterexample(result.counterexamples[0], rule=slow)
    assert replay.verdict == "fail" and replay.premise_met


# ------------------------------------------------------------------------------------ weak contraction


def test_weak_contraction_at_a_saddle_is_premise_not_met() -> None:
    patterns = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=F64)
    case = Case(patterns, torch.tensor([[0.0, 0.3]], dtype=F64), 4.0, {"family": "saddle"})
    result = check_weak_contraction(case, points=torch.zeros(1, 2, dtype=F64))
    assert result.status == "premise not met" and result.n_premise == 0
    assert "repelling" in result.premise_note and result.measured["repelling_starts"] == 1


def test_weak_contraction_fails_for_a_map_that_expands_before_it_contracts(tmp_path: Path) -> None:
    """T(ξ) = Aξ with eigenvalues 0.5 (attracting) but ‖A‖ ≈ 3: the distance to 0 grows at first."""
    a = torch.tensor([[0.5, 3.0], [0.0, 0.5]], dtype=F64)
    case = Case(
        torch.eye(2, dtype=F64), torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=F64), 1.0, {"family": "shear"}
    )

    def shear(x, patterns, beta, alpha):
        return x @ a.T

    result = check_weak_contraction(
        case, points=torch.zeros(1, 2, dtype=F64), retrieval=shear, counterexample_dir=tmp_path
    )
    assert result.status == "fail" and result.n_premise == result.n_states
    assert result.measured["radius_at_limit"]["max"] == pytest.approx(0.5, rel=1e-6)
    replay = replay_counterexample(result.counterexamples[0], retrieval=shear)
    assert replay.verdict == "fail" and replay.details["ratio"] > 1


@pytest.mark.parametrize("alpha", [1.0, 1.5])
def test_retrieval_contracts_along_its_trajectories_toward_attracting_fixed_points(alpha: float) -> None:
    case = make_family("normalised", seed=0, quick=True, n_states=8)[0]
    result = check_weak_contraction(case, alpha=alpha)
    assert result.status == "pass" and result.n_premise > 0 and result.rate < 1


def test_n_independent_bounds_hold_and_do_not_grow_with_copies_of_the_memory() -> None:
    case = memory(3, 12, 5, 0.7, states=10)
    for alpha in (1.0, 1.5):
        _, local = lipschitz_bounds(case.states, case.patterns, case.beta, alpha)
        exact = _local_lipschitz(case.states, case.patterns, case.beta, alpha)
        assert bool((exact <= local * (1 + 1e-9) + 1e-12).all())
    doubled = torch.cat([case.patterns, case.patterns])
    assert lipschitz_bounds(case.states, doubled, 0.7, 1.0)[0] == pytest.approx(
        lipschitz_bounds(case.states, case.patterns, 0.7, 1.0)[0]
    )


def test_guided_contraction_reports_where_g_stops_contracting() -> None:
    case = make_family("gaussian", seed=0, quick=True, n_states=6)[1]
    result = check_guided_contraction(case, scales=(0.5, 64.0), steps=12)
    assert result.status == "measured" and result.n_states == 12
    assert result.measured["lambda_c"] in (0.5, 64.0, math.inf)
    # λ = 64 flings the iteration around: it does not contract from every start
    assert result.measured["share_contracting_at_64"] < 1.0


def test_spectral_radius_by_differences_matches_the_exact_jacobian() -> None:
    case = memory(5, 6, 3, 0.8, states=4)
    fd = spectral_radius_fd(lambda x: _retrieve(x, case.patterns, 0.8, 1.0), case.states, 1.0)
    assert torch.allclose(fd, _local_lipschitz(case.states, case.patterns, 0.8, 1.0), rtol=1e-6)


# ------------------------------------------------------------------------------------ fixed points


def test_preservation_counts_distinct_fixed_points_and_says_when_the_premise_is_attainable() -> None:
    toy = make_family("gaussian", seed=0, quick=True, n_states=8)[1]
    result = check_fixed_point_preservation(toy)
    assert result.status == "premise not met" and result.kind == "identity"
    assert 0 < result.measured["distinct_fixed_points"] <= 16  # distinct points, not 8 × 2 limits
    assert result.measured["premise_beta"] > toy.beta
    saturated = make_family("beta_sweep", seed=0, n_states=8)[-1]
    held = check_fixed_point_preservation(saturated)
    assert held.status == "identity" and held.n_premise == held.measured["distinct_common"] > 0
    assert premise_beta(saturated.patterns, 1e-13) <= saturated.beta


def test_premise_beta_is_where_a_pattern_becomes_a_common_fixed_point() -> None:
    patterns = torch.eye(3, dtype=F64)
    beta = premise_beta(patterns, 1e-12)
    for b, common in ((0.8 * beta, False), (1.2 * beta, True)):
        x = patterns[:1]
        dense = torch.linalg.vector_norm(_retrieve(x, patterns, b, 1.0) - x)
        sparse = torch.linalg.vector_norm(_retrieve(x, patterns, b, 1.5) - x)
        assert bool(max(dense, sparse) <= 1e-12) is common


def test_directional_consistency_is_measured_without_a_verdict() -> None:
    result = check_directional_consistency(make_family("gaussian", seed=0, quick=True, n_states=8)[1])
    assert result.status == "measured" and result.status in VERDICTS and not result.counterexamples


# ------------------------------------------------------------------------------------ counter-examples


def test_the_store_keeps_only_the_worst_counterexamples_per_claim(tmp_path: Path) -> None:
    store = CounterexampleStore(tmp_path, limit=2)

    def writer(name: str):
        def write(folder: Path) -> str:
            path = folder / f"{name}.json"
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text("{}")
            return str(path)

        return write

    for i, margin in enumerate((-1.0, -3.0, -2.0, -0.5)):
        store.offer("c", margin, writer(f"x{i}"))
    assert sorted(Path(p).name for p in store.paths()) == ["x1.json", "x2.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x1.json", "x2.json"]


@pytest.mark.skipif(not OLD_COUNTEREXAMPLES.is_dir(), reason="no saved counter-examples of the wide run")
def test_orthogonal_counterexamples_of_the_old_check_are_premise_violations() -> None:
    paths = sorted(OLD_COUNTEREXAMPLES.glob("orthogonal-error-convergence__*.json"))
    assert paths
    for path in paths:
        replay = replay_counterexample(path)
        assert replay.verdict == "premise not met" and not replay.premise_met
        assert replay.details["sparse_residual"] > 1e-6


def test_weak_contraction_measures_each_step_against_its_own_trajectorys_limit(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """ξ* must be the limit of the trajectory (the premise says so): on the β = 30 sweep memory, 6 of the
    256 steps from 32 starts were counted as violations when ξ* was the fixed point an accelerated solve
    from ξ₀ found, a different one from where the plain iteration from those starts ends (0.6 away). With ξ*
    the plain iteration's own limit, every counted step contracts, in either kernel form."""
    from hopfield_aa import _jit
    from hopfield_aa.checks import claims
    from hopfield_aa.checks.families import beta_sweep

    (case,) = beta_sweep(0, betas=(30.0,))
    result = check_weak_contraction(case, alpha=1.0)
    assert result.n_premise > 0 and result.n_passed == result.n_premise and result.status == "pass"
    with _jit.disabled():
        assert check_weak_contraction(case, alpha=1.0).status == "pass"
    # without the plain limit, the check measures some steps against another fixed point, and they fail
    monkeypatch.setattr(
        claims, "_plain_limit", lambda fn, start, *a: (start, torch.full(start.shape[:1], float("inf")))
    )
    stale = check_weak_contraction(case, alpha=1.0)
    assert stale.n_passed < stale.n_premise
