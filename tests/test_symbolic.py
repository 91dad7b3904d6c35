"""The symbolic derivations hold for the library's formulas and fail for perturbed ones (so they are real),
and the closed forms they certify agree numerically with what the library computes."""

from __future__ import annotations

import numpy as np
import pytest
import sympy as sp
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from hopfield_aa import symbolic
from hopfield_aa.geometry import anderson_optimal_scale, decompose, extrapolate, gag
from hopfield_aa.normalizers import entmax_jacobian

Q = sp.Symbol("q", positive=True)  # α = 1 + 1/q covers every α > 1 at once


def _dot(a: sp.Matrix, b: sp.Matrix) -> sp.Expr:
    return (a.T * b)[0, 0]


# ---------------------------------------------------------------------------------------------- AA(1)


def test_extrapolation_is_the_aa1_step_with_gamma_one_minus_scale() -> None:
    result = symbolic.aa1_extrapolation()
    assert result.holds, result.residuals


@pytest.mark.parametrize("wrong_gamma", [lambda lam: lam - 1, lambda lam: 1 + lam, lambda lam: -lam])
def test_aa1_derivation_fails_for_a_wrong_gamma(wrong_gamma) -> None:
    result = symbolic.aa1_extrapolation(wrong_gamma)
    assert not result.holds
    assert result.failing() == ["AA(1) step equals extrapolation"]


def test_least_squares_gamma_is_the_closed_form_minimiser() -> None:
    result = symbolic.aa1_least_squares_gamma()
    assert result.holds, result.residuals


def test_least_squares_derivation_fails_for_wrong_closed_forms() -> None:
    no_square = symbolic.aa1_least_squares_gamma(
        gamma_closed_form=lambda f, h: _dot(f, f - h) / sp.sqrt(_dot(f - h, f - h))
    )
    assert no_square.failing() == ["stationary point equals the closed form"]
    wrong_residual = symbolic.aa1_least_squares_gamma(
        gamma_closed_form=lambda f, h: _dot(h, f - h) / _dot(f - h, f - h)
    )
    assert not wrong_residual.holds
    wrong_scale = symbolic.aa1_least_squares_gamma(
        optimal_scale=lambda xi, d, s: _dot(s - xi, s - d) / _dot(s - d, s - d)  # γ*, not 1 − γ*
    )
    assert wrong_scale.failing() == ["lambda* = 1 - gamma* with f_k = S - xi, f_{k-1} = D - xi"]


def test_optimal_scale_closed_form_matches_the_library_numerically() -> None:
    rng = np.random.default_rng(0)
    xi, dense, sparse = (rng.normal(size=(5, 3)) for _ in range(3))
    syms = [sp.Matrix(sp.symbols(f"{n}0:3", real=True)) for n in ("xi", "D", "S")]
    closed = sp.lambdify([*syms[0], *syms[1], *syms[2]], symbolic._default_optimal_scale(*syms))
    expected = np.array([closed(*a, *b, *c) for a, b, c in zip(xi, dense, sparse, strict=True)])
    np.testing.assert_allclose(anderson_optimal_scale(xi, dense, sparse), expected, rtol=1e-10)


# ------------------------------------------------------------------------------------- fixed points


def test_every_rule_preserves_common_fixed_points() -> None:
    result = symbolic.fixed_point_preservation()
    assert result.holds, result.residuals
    assert len(result.residuals) == len(symbolic.DEFAULT_RULES)


def test_fixed_point_derivation_fails_for_rules_that_move_fixed_points() -> None:
    def sparse_plus_scaled_dense(dense, sparse, state, lam, **_):
        return sparse + lam * dense  # not a residual: moves ξ* by λ ξ*

    def gag_plus_reference(dense, sparse, state, lam, *, zeta, cap, reference):
        residual = sparse - dense
        parallel = (_dot(residual, reference) / _dot(reference, reference)) * reference
        return sparse + lam * (cap * parallel + zeta * (residual - parallel)) + lam * cap * reference

    result = symbolic.fixed_point_preservation(
        {"S + lambda D": sparse_plus_scaled_dense, "GAG + lambda c u": gag_plus_reference}
    )
    assert sorted(result.failing()) == sorted(
        ["S + lambda D returns the fixed point", "GAG + lambda c u returns the fixed point"]
    )


def test_displacement_at_a_dense_fixed_point_is_linear_in_scale() -> None:
    result = symbolic.divergence_at_dense_fixed_point()
    assert result.holds, result.residuals
    quadratic = symbolic.divergence_at_dense_fixed_point(lambda d, s, xi, lam, **_: d + lam**2 * (s - d))
    assert not quadratic.holds


# ------------------------------------------------------------------------------------ decomposition


def test_decomposition_identities_hold_for_the_orthogonal_projection() -> None:
    result = symbolic.decomposition_identities()
    assert result.holds, result.residuals


def test_decomposition_identities_fail_for_wrong_projections() -> None:
    unnormalised = symbolic.decomposition_identities(lambda r, u: _dot(r, u) * u)
    assert "orthogonal part is orthogonal to u" in unnormalised.failing()
    assert "Pythagoras" in unnormalised.failing()
    half_norm = symbolic.decomposition_identities(lambda r, u: _dot(r, u) / sp.sqrt(_dot(u, u)) * u)
    assert not half_norm.holds
    along_residual = symbolic.decomposition_identities(lambda r, u: (_dot(r, u) / _dot(r, r)) * r)
    assert "parallel part lies along u" in along_residual.failing()


def test_symbolic_projection_matches_the_library_numerically() -> None:
    rng = np.random.default_rng(1)
    r, u = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    rs, us = sp.Matrix(sp.symbols("r0:3")), sp.Matrix(sp.symbols("u0:3"))
    projection = sp.lambdify([*rs, *us], list(symbolic._projection(rs, us)))
    parallel, _ = decompose(r, u)
    np.testing.assert_allclose(parallel, [projection(*a, *b) for a, b in zip(r, u, strict=True)], rtol=1e-10)


# ----------------------------------------------------------------------------------- bounded update


def test_bounded_update_splits_by_orthogonality_and_the_bound_is_certified() -> None:
    result = symbolic.bounded_update()
    assert result.holds, result.residuals


@pytest.mark.parametrize(
    "wrong_bound",
    [
        pytest.param(lambda lam, eta, zeta, perp: sp.Abs(lam) * eta, id="drops the orthogonal term"),
        pytest.param(lambda lam, eta, zeta, perp: lam * (eta + sp.Abs(zeta) * perp), id="lambda without abs"),
        pytest.param(lambda lam, eta, zeta, perp: sp.Abs(lam) * (eta + zeta * perp), id="zeta without abs"),
        pytest.param(
            lambda lam, eta, zeta, perp: sp.Abs(lam) * (eta / 2 + sp.Abs(zeta) * perp), id="half the cap"
        ),
    ],
)
def test_bounded_update_certificate_fails_for_wrong_bounds(wrong_bound) -> None:
    result = symbolic.bounded_update(wrong_bound)
    assert result.failing() == ["bound and bound^2 - ||G - S||^2 have no negative coefficient"]


def test_the_certified_bound_holds_for_the_library_gag() -> None:
    rng = np.random.default_rng(2)
    dense, sparse = rng.normal(size=(64, 4)), rng.normal(size=(64, 4))
    for scale, zeta, eta in [(2.0, 0.0, 0.1), (-3.0, 0.5, 1.0), (5.0, -1.0, 0.01)]:
        guided = gag(dense, sparse, scale, zeta=zeta, eta=eta)
        _, orthogonal = decompose(sparse - dense, sparse)
        bound = abs(scale) * (eta + abs(zeta) * np.linalg.norm(orthogonal, axis=-1))
        assert np.all(np.linalg.norm(guided - sparse, axis=-1) <= bound * (1 + 1e-12))


# ------------------------------------------------------------------------------- energy and descent


def test_softmax_energy_gradient_is_state_minus_retrieval() -> None:
    result = symbolic.energy_gradient_softmax()
    assert result.holds, result.residuals


def test_softmax_energy_gradient_derivation_fails_without_beta_in_the_scores() -> None:
    def no_beta(xi, patterns, beta):
        weights = (patterns * xi).applyfunc(sp.exp)
        return patterns.T * (weights / sum(weights))

    assert not symbolic.energy_gradient_softmax(no_beta).holds


@pytest.mark.parametrize("support", [1, 2, 3])
def test_sparsemax_energy_gradient_on_a_fixed_support(support: int) -> None:
    result = symbolic.energy_gradient_sparsemax(n_patterns=3, support=support)
    assert result.holds, result.residuals


def test_sparsemax_energy_gradient_derivation_fails_for_a_wrong_threshold() -> None:
    def mean_threshold(xi, patterns, beta, support):
        scores = beta * patterns * xi
        tau = sum(scores[:support]) / support  # forgot the −1: the probabilities do not sum to 1
        return patterns.T * sp.Matrix([scores[i] - tau if i < support else 0 for i in range(patterns.rows)])

    assert not symbolic.energy_gradient_sparsemax(mean_threshold).holds


@pytest.mark.parametrize(
    "alpha", [sp.Rational(4, 3), sp.Rational(3, 2), 2, 3, 1.25, pytest.param(1 + 1 / Q, id="alpha=1+1/q")]
)
def test_conjugate_gradient_is_entmax(alpha) -> None:
    result = symbolic.conjugate_gradient_is_entmax(alpha=alpha, support=2 if alpha == 1 + 1 / Q else 3)
    assert result.holds, result.residuals


def test_conjugate_derivation_fails_for_a_wrong_threshold_term() -> None:
    def wrong(probs, tau, alpha):
        return sum(p**alpha for p in probs) / alpha + tau / alpha + 1 / (alpha * (alpha - 1))

    assert not symbolic.conjugate_gradient_is_entmax(wrong).holds


def test_descent_margin_is_the_bregman_gap() -> None:
    result = symbolic.energy_descent_margin()
    assert result.holds, result.residuals
    assert not symbolic.energy_descent_margin(lambda xi, t: _dot(t - xi, t - xi)).holds


# -------------------------------------------------------------------------------------- Jacobians


def test_softmax_jacobian_is_diag_minus_outer() -> None:
    assert symbolic.softmax_jacobian().holds
    assert not symbolic.softmax_jacobian(lambda p: sp.diag(*p)).holds
    assert not symbolic.softmax_jacobian(lambda p: sp.diag(*p) - p * p.T / 2).holds


@pytest.mark.parametrize(
    ("alpha", "support", "inactive"),
    [
        (sp.Rational(3, 2), 3, 1),
        (2, 3, 1),
        (3, 2, 1),
        (sp.Rational(5, 4), 2, 2),
        pytest.param(1 + 1 / Q, 2, 1, id="alpha=1+1/q"),
    ],
)
def test_entmax_jacobian_by_implicit_differentiation(alpha, support: int, inactive: int) -> None:
    result = symbolic.entmax_jacobian(alpha=alpha, support=support, inactive=inactive)
    assert result.holds, result.residuals


def test_entmax_jacobian_derivation_fails_for_wrong_formulas() -> None:
    def no_normalisation(probs, alpha):
        s = [p ** (2 - alpha) if p != 0 else 0 for p in probs]
        return sp.diag(*s) - sp.Matrix(s) * sp.Matrix(s).T

    def wrong_exponent(probs, alpha):  # p^(α−1): the same as p^(2−α) at α = 3/2 only
        s = [p ** (alpha - 1) if p != 0 else 0 for p in probs]
        return sp.diag(*s) - sp.Matrix(s) * sp.Matrix(s).T / sum(s)

    def support_ignored(probs, alpha):  # p^(2−α) off the support is 0^0 = 1 at α = 2
        s = [p ** (2 - alpha) for p in probs]
        return sp.diag(*s) - sp.Matrix(s) * sp.Matrix(s).T / sum(s)

    assert not symbolic.entmax_jacobian(no_normalisation).holds
    assert not symbolic.entmax_jacobian(wrong_exponent, alpha=sp.Rational(4, 3)).holds
    assert symbolic.entmax_jacobian(wrong_exponent, alpha=sp.Rational(3, 2)).holds
    assert not symbolic.entmax_jacobian(support_ignored, alpha=2).holds


def test_retrieval_jacobian_is_beta_times_a_weighted_covariance() -> None:
    result = symbolic.retrieval_jacobian()
    assert result.holds, result.residuals
    without_beta = symbolic.retrieval_jacobian(lambda x, p, beta: x.T * (sp.diag(*p) - p * p.T) * x)
    assert not without_beta.holds


def test_symbolic_entmax_jacobian_matches_the_library() -> None:
    normalizers = pytest.importorskip("hopfield_aa.normalizers")
    alpha = 1.5
    probs = sp.symbols("p0:3", positive=True)
    formula = sp.lambdify(probs, symbolic._entmax_jacobian_formula(list(probs), sp.Rational(3, 2)))
    scores = torch.tensor([[0.9, 0.5, 0.2, -2.0]], dtype=torch.float64)
    p = normalizers.entmax(scores, alpha=alpha)
    assert int((p > 0).sum()) == 3  # the set-up: three in the support, one out
    expected = np.zeros((4, 4))
    expected[:3, :3] = formula(*p[0, :3].tolist())
    np.testing.assert_allclose(normalizers.entmax_jacobian(scores, alpha=alpha)[0], expected, atol=1e-12)


# ---------------------------------------------------------------------------------------- registry


def test_derive_all_runs_every_registered_derivation_and_all_hold() -> None:
    results = symbolic.derive_all()
    assert set(results) == set(symbolic.DERIVATIONS)
    assert all(result.holds for result in results.values()), {k: v.failing() for k, v in results.items()}


def test_extrapolation_formula_matches_the_library_numerically() -> None:
    lam = sp.Symbol("lambda")
    dense, sparse = sp.Matrix(sp.symbols("D0:2")), sp.Matrix(sp.symbols("S0:2"))
    step = sparse - symbolic.aa1_extrapolation.__defaults__[0](lam) * (sparse - dense)  # type: ignore[index]
    f = sp.lambdify([lam, *dense, *sparse], list(step))
    d, s = np.array([0.3, -1.0]), np.array([1.2, 0.4])
    np.testing.assert_allclose(extrapolate(d, s, 2.5), f(2.5, *d, *s), rtol=1e-12)


# ------------------------------------------------- the constant L_α of the global Lipschitz bound (a probe)
#
# THEORY.md §2: L_α = sup_z ‖J_entmax_α(z)‖₂ is ½ for softmax and 1 for sparsemax, and numerically 2^(α−2)
# for α ∈ [1, 2]: an open conjecture. A two-way tie attains the value (s = (½)^(2−α) on both entries, and
# J = diag(s) − ssᵀ/Σs has the eigenvalue s along (1, −1)). These tests probe the conjecture numerically
# with the library's Jacobian; they are evidence, not a proof. Above α = 2 there is no finite bound.


@st.composite
def _scores_and_alpha(draw: st.DrawFn) -> tuple[np.ndarray, float]:
    n = draw(st.integers(2, 8))
    values = draw(st.lists(st.floats(-8.0, 8.0, allow_nan=False), min_size=n, max_size=n))
    ties = draw(st.integers(0, n - 1))  # copy the first score onto some others: ties are the hard case
    z = np.array(values, dtype=np.float64)
    z[1 : 1 + ties] = z[0] + draw(st.sampled_from([0.0, 1e-9, 1e-3]))
    return z, draw(st.floats(1.0, 2.0))


@given(_scores_and_alpha())
@example((np.array([0.0, 0.0]), 1.5))
@example((np.array([0.3, 0.3, -7.0, -7.0]), 1.25))
@example((np.array([1.0, 1.0 + 1e-9, 1.0, -3.0]), 2.0))
def test_entmax_jacobian_norm_is_at_most_two_to_the_alpha_minus_two(case: tuple[np.ndarray, float]) -> None:
    """‖J_entmax_α(z)‖₂ ≤ 2^(α−2) for α ∈ [1, 2] (the conjectured L_α; ½ softmax, 1 sparsemax)."""
    z, alpha = case
    norm = float(torch.linalg.matrix_norm(entmax_jacobian(torch.from_numpy(z), alpha), ord=2))
    assert norm <= 2.0 ** (alpha - 2.0) * (1 + 1e-9) + 1e-12, (norm, 2.0 ** (alpha - 2.0))


@pytest.mark.parametrize("alpha", [1.0, 1.1, 1.25, 1.5, 1.75, 2.0])
def test_a_two_way_tie_attains_two_to_the_alpha_minus_two(alpha: float) -> None:
    """The conjectured bound is sharp: two tied top scores (others out of the support) reach it."""
    z = torch.tensor([0.7, 0.7, -torch.inf, -torch.inf], dtype=torch.float64)
    norm = float(torch.linalg.matrix_norm(entmax_jacobian(z, alpha), ord=2))
    assert norm == pytest.approx(2.0 ** (alpha - 2.0), rel=1e-12)


@pytest.mark.parametrize("alpha", [2.5, 3.0])
def test_above_alpha_two_the_jacobian_norm_is_unbounded(alpha: float) -> None:
    """For α > 2, s_i = p_i^(2−α) grows without bound as p_i → 0 on the support: no finite L_α.

    With z = (0, −g, −g), the two low scores stay in the support while (α − 1) g < 1 and their weight
    p → 0 as (α − 1) g → 1; J has the eigenvalue p^(2−α) along (0, 1, −1)."""
    norms = []
    for closeness in (0.9, 0.99, 0.999):
        z = torch.tensor([0.0, -closeness / (alpha - 1.0), -closeness / (alpha - 1.0)], dtype=torch.float64)
        norms.append(float(torch.linalg.matrix_norm(entmax_jacobian(z, alpha), ord=2)))
    assert norms[0] < norms[1] < norms[2]
    assert norms[2] > 10 * 2.0 ** (alpha - 2.0)
