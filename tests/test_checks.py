"""Each check of papers/theory.md both ways: it passes where its claim holds and fails (with a replayable
counter-example) on a constructed case where the claim must fail, so no check can pass vacuously; premises
and verdicts in tests/test_claims_verdicts.py."""

from __future__ import annotations

import math

import pytest
import torch

from hopfield_aa import checks
from hopfield_aa.checks import Case, find_fixed_points, make_family, replay_counterexample
from hopfield_aa.checks.families import FAMILIES
from hopfield_aa.geometry import _extrapolate, _gag, _ladder_extrapolate
from hopfield_aa.hopfield import _retrieve

F64 = torch.float64


@pytest.fixture(scope="module")
def toy() -> Case:
    """Gaussian N = 16, d = 8 at β = 1/√d: no common fixed point, every dense fixed point non-common."""
    return make_family("gaussian", seed=0, quick=True, n_states=8)[1]


@pytest.fixture(scope="module")
def toy_fp(toy: Case):
    return find_fixed_points(toy)


@pytest.fixture(scope="module")
def saturated() -> Case:
    """16 unit patterns at β = 1000: softmax saturates, every fixed point is common to D and S."""
    return make_family("beta_sweep", seed=0, n_states=8)[-1]


def saddle_case() -> tuple[Case, torch.Tensor]:
    """Patterns ±e₁ at β = 4: ξ* = 0 is fixed by D with DT(0) = β e₁e₁ᵀ, spectral radius 4 (a saddle)."""
    patterns = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=F64)
    states = torch.tensor([[0.3, 0.1]], dtype=F64)
    return Case(patterns, states, 4.0, {"family": "saddle", "N": 2, "d": 2, "beta": 4.0}), torch.zeros(
        1, 2, dtype=F64
    )


# ------------------------------------------------------------------------------------ families


def test_families_are_reproducible_from_the_seed_and_span_toy_to_attention_size() -> None:
    for name in FAMILIES:
        a, b = make_family(name, seed=3, quick=True), make_family(name, seed=3, quick=True)
        c = make_family(name, seed=4, quick=True)
        assert all(
            torch.equal(x.patterns, y.patterns) and torch.equal(x.states, y.states)
            for x, y in zip(a, b, strict=False)
        )
        assert any(not torch.equal(x.states, z.states) for x, z in zip(a, c, strict=False))
    sizes = {(c.data["N"], c.data["d"]) for c in make_family("gaussian")}
    assert (2, 2) in sizes and (1024, 64) in sizes
    betas = [c.beta for c in make_family("beta_sweep")]
    assert min(betas) <= 0.1 and max(betas) >= 1000


def test_unknown_family_is_rejected_by_name() -> None:
    with pytest.raises(ValueError, match="family"):
        make_family("uniform")


# ------------------------------------------------------------------------------------ fixed points


def test_fixed_points_are_common_only_once_softmax_saturates(toy_fp, saturated: Case) -> None:
    assert int(toy_fp.dense_converged.sum()) == toy_fp.dense.shape[0]
    assert int(toy_fp.dense_common.sum()) == 0 and int(toy_fp.dense_non_common.sum()) == toy_fp.dense.shape[0]
    fp = find_fixed_points(saturated)
    assert bool(fp.dense_common.all()) and bool(fp.sparse_common.all())
    assert fp.summary()["common_share"] == 1.0


# ------------------------------------------------------------------------------------ energy descent


def test_energy_descent_holds_for_the_retrieval_map(toy: Case) -> None:
    result = checks.check_energy_descent(toy, steps=4)
    assert result.status == "pass" and result.n_states == 8 * 4 * 4 and result.worst_margin >= 0


def test_energy_descent_fails_for_an_over_relaxed_step(toy: Case, tmp_path) -> None:
    def over_relaxed(x, patterns, beta, alpha):
        return x + 3.0 * (_retrieve(x, patterns, beta, alpha) - x)

    result = checks.check_energy_descent(toy, steps=3, step=over_relaxed, counterexample_dir=tmp_path)
    assert result.status == "fail" and result.worst_margin < 0 and result.counterexamples
    with pytest.raises(ValueError, match="rule"):
        replay_counterexample(result.counterexamples[0])
    replay = replay_counterexample(result.counterexamples[0], step=over_relaxed)
    assert not replay.holds and replay.margin == pytest.approx(replay.recorded_margin, rel=1e-9)
    # the same instance under the true retrieval map satisfies the claim
    assert replay_counterexample(result.counterexamples[0], step="library").holds


# ------------------------------------------------------------------------------------ extrapolation is AA(1)


def test_extrapolation_is_an_aa1_step(toy: Case) -> None:
    result = checks.check_extrapolation_aa1(toy)
    assert result.status == "identity" and result.n_states == 8
    assert result.measured["lambda_star"]["min"] <= result.measured["lambda_star"]["max"]


def test_gag_is_not_an_aa1_step(toy: Case) -> None:
    result = checks.check_extrapolation_aa1(toy, rule=lambda d, s, lam: _gag(d, s, lam))
    assert result.status == "fail" and result.n_passed < result.n_states


# ------------------------------------------------------------------------------- fixed-point preservation


def test_rules_preserve_common_fixed_points(saturated: Case) -> None:
    result = checks.check_fixed_point_preservation(saturated)
    assert result.status == "identity" and result.n_premise > 0


def test_preservation_is_not_applicable_without_common_fixed_points(toy: Case, toy_fp) -> None:
    result = checks.check_fixed_point_preservation(toy, fixed_points=toy_fp)
    assert result.status == "premise not met" and result.n_premise == 0 and math.isnan(result.pass_rate)
    assert result.n_states == result.measured["distinct_fixed_points"] > 0


def test_a_rule_that_does_not_vanish_with_the_residual_breaks_preservation(saturated: Case, tmp_path) -> None:
    def drift(dense, sparse, scale, zeta, eta, reference, state):
        return sparse + 1e-3 * scale * sparse

    result = checks.check_fixed_point_preservation(saturated, rule=drift, counterexample_dir=tmp_path)
    assert result.status == "fail" and result.n_passed == 0 and result.n_premise > 0
    assert not replay_counterexample(result.counterexamples[0], rule=drift).holds


# ------------------------------------------------------------------------------------ divergence


def test_extrapolation_leaves_non_common_fixed_points_linearly(toy: Case, toy_fp) -> None:
    result = checks.check_divergence(toy, fixed_points=toy_fp)
    assert result.status == "identity" and 0 < result.n_premise <= 8
    assert result.rate is not None and result.rate > 0


def test_divergence_law_fails_away_from_fixed_points(toy: Case, tmp_path) -> None:
    result = checks.check_divergence(toy, points=toy.states, counterexample_dir=tmp_path)
    assert result.status == "fail" and result.counterexamples
    replay = replay_counterexample(result.counterexamples[0])
    assert not replay.holds and replay.margin == pytest.approx(replay.recorded_margin, rel=1e-9)


# ------------------------------------------------------------------------------------ weak contraction


@pytest.mark.parametrize("alpha", [1.0, 1.5])
def test_retrieval_contracts_along_its_trajectories(toy: Case, toy_fp, alpha: float) -> None:
    result = checks.check_weak_contraction(toy, alpha=alpha, fixed_points=toy_fp)
    assert result.status == "pass" and result.n_states == 8 * 8 and result.rate < 1
    assert (result.measured["global_bound"] == math.inf) == (alpha > 1)


def test_an_expanding_map_has_a_repelling_fixed_point_not_a_failure(toy: Case) -> None:
    result = checks.check_weak_contraction(
        toy, points=torch.zeros(1, toy.patterns.shape[1], dtype=F64), retrieval=lambda x, p, b, a: 2.0 * x
    )
    assert result.status == "premise not met" and result.measured["repelling_starts"] == 8


# ------------------------------------------------------------------------------------ orthogonal error


def test_orthogonal_error_passes_at_common_fixed_points(saturated: Case) -> None:
    result = checks.check_orthogonal_error(saturated, zeta=0.0, trajectory_steps=5)
    assert result.status == "pass" and result.n_states == 8 and result.n_premise > 0


# ------------------------------------------------------------------------------------ bounded update


def test_gag_update_is_bounded(toy: Case) -> None:
    assert checks.check_bounded_update(toy).status == "identity"


def test_an_uncapped_rule_violates_the_bound(toy: Case, tmp_path) -> None:
    def uncapped(dense, sparse, scale, zeta, eta, reference, state):
        return _gag(dense, sparse, scale, zeta, math.inf, reference, state)

    result = checks.check_bounded_update(toy, rule=uncapped, counterexample_dir=tmp_path)
    assert result.status == "fail" and result.kind == "identity"
    assert not replay_counterexample(result.counterexamples[0], rule=uncapped).holds


# ------------------------------------------------------------------------------------ directional consistency


def test_residual_points_toward_the_sparse_fixed_point_when_retrieval_is_sharp() -> None:
    case = make_family("normalised", seed=0, quick=True, n_states=8)[0]
    result = checks.check_directional_consistency(case)
    assert result.status == "measured" and result.n_premise > 0
    assert result.measured["share_toward_sparse_fixed_point"] == 1.0


def test_directional_consistency_counts_none_for_a_target_behind_the_dense_retrieval(toy: Case) -> None:
    dense = _retrieve(toy.states, toy.patterns, toy.beta, 1.0)
    sparse = _retrieve(toy.states, toy.patterns, toy.beta, 1.5)
    result = checks.check_directional_consistency(toy, targets=dense - (sparse - dense))
    assert result.status == "measured" and result.n_passed == 0
    assert result.worst_margin == pytest.approx(-1.0, abs=1e-9)


# ------------------------------------------------------------------------------------ ladder


def test_ladder_measurement_counts_states_where_the_mixed_output_is_closer(toy: Case, toy_fp) -> None:
    scales = (1.0, 2.0)
    result = checks.check_ladder(toy, fixed_points=toy_fp, scales=scales)
    assert result.status == "measured" and result.n_states == 8 * len(scales)
    xi, target = toy.states, toy_fp.sparse
    rungs = [_retrieve(xi, toy.patterns, toy.beta, a) for a in (1.0, 1.25, 1.5, 2.0)]
    sparse = _retrieve(xi, toy.patterns, toy.beta, 1.5)
    expected = sum(
        int(
            (
                torch.linalg.vector_norm(_ladder_extrapolate(rungs, lam) - target, dim=-1)
                < torch.linalg.vector_norm(_extrapolate(rungs[0], sparse, lam) - target, dim=-1)
            ).sum()
        )
        for lam in scales
    )
    assert result.n_passed == expected


def test_the_claims_data_and_the_registry_code_describe_the_same_claims() -> None:
    from hopfield_aa.checks.registry import KEYS, REGISTRY, VALUE_SPACE

    assert checks.LADDER in REGISTRY and VALUE_SPACE in REGISTRY
    assert [key for key, claim in KEYS.items() if claim.run is None] == ["value"]
    assert all(claim.statement and claim.margin and claim.grid for claim in REGISTRY.values())
