"""Property tests of THEORY.md §3–4: the decomposition identities, the norm cap, GAG and extrapolation,
fixed-point preservation, divergence at non-common fixed points, the bounded-update inequality, and
"extrapolation is AA(1)"."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hopfield_aa import (
    aa1_gamma,
    anderson_optimal_scale,
    anderson_step,
    decompose,
    extrapolate,
    gag,
    iterate,
    norm_cap,
    retrieve,
)
from hopfield_aa.geometry import ladder_extrapolate
from tests.strategies import betas, finite, memories, scales, vector_pairs

TOL = 1e-9
etas = st.one_of(st.just(math.inf), st.floats(min_value=0.0, max_value=5.0))
zetas = st.floats(min_value=-2.0, max_value=2.0)


@st.composite
def dense_sparse(draw: st.DrawFn, max_dim: int = 8) -> tuple[np.ndarray, np.ndarray]:
    d = draw(st.integers(1, max_dim))
    dense = draw(hnp.arrays(np.float64, (d,), elements=finite))
    sparse = draw(hnp.arrays(np.float64, (d,), elements=finite))
    mode = draw(st.sampled_from(["plain", "equal", "zero_sparse"]))
    if mode == "equal":
        sparse = dense.copy()
    elif mode == "zero_sparse":
        sparse = np.zeros(d)
    return dense, sparse


# --- decomposition -------------------------------------------------------------------------------


@given(vector_pairs())
@example((np.array([1.0, 2.0]), np.array([0.0, 0.0])))
def test_decomposition_parts_sum_to_residual_and_are_orthogonal(pair: tuple[np.ndarray, np.ndarray]) -> None:
    residual, reference = pair
    parallel, orthogonal = decompose(residual, reference)
    assert np.allclose(parallel + orthogonal, residual, atol=TOL)
    scale = 1.0 + np.abs(residual).max() * max(np.linalg.norm(reference), 1.0)
    assert abs(np.dot(orthogonal, reference)) <= 1e-12 * scale
    # Pythagoras: the parts split the squared norm
    assert np.isclose(parallel @ parallel + orthogonal @ orthogonal, residual @ residual, atol=1e-9)


@given(vector_pairs())
def test_decomposition_parallel_part_lies_along_reference(pair: tuple[np.ndarray, np.ndarray]) -> None:
    residual, reference = pair
    parallel, _ = decompose(residual, reference)
    # parallel = c * reference: its component orthogonal to reference vanishes
    _, leftover = decompose(parallel, reference)
    assert np.allclose(leftover, 0.0, atol=1e-9 * (1 + np.abs(residual).max()))


@given(vector_pairs())
def test_decomposition_is_idempotent(pair: tuple[np.ndarray, np.ndarray]) -> None:
    residual, reference = pair
    parallel, _ = decompose(residual, reference)
    par2, orth2 = decompose(parallel, reference)
    assert np.allclose(par2, parallel, atol=1e-9) and np.allclose(orth2, 0.0, atol=1e-9)


def test_decomposition_with_zero_reference_has_no_parallel_part() -> None:
    r = torch.tensor([[1.0, -2.0, 3.0]])
    parallel, orthogonal = decompose(r, torch.zeros(1, 3))
    assert torch.equal(parallel, torch.zeros_like(r)) and torch.equal(orthogonal, r)


def test_decomposition_acts_per_row_on_the_chosen_axis() -> None:
    r = torch.randn(4, 3, 5, dtype=torch.float64)
    u = torch.randn(4, 3, 5, dtype=torch.float64)
    par_last, _ = decompose(r, u)
    par_mid, _ = decompose(r.transpose(1, 2), u.transpose(1, 2), dim=1)
    assert torch.allclose(par_mid.transpose(1, 2), par_last)


# --- norm cap ------------------------------------------------------------------------------------


@given(hnp.arrays(np.float64, st.integers(1, 8), elements=finite), st.floats(min_value=0.0, max_value=10.0))
@example(np.array([3.87339225e-182]), 0.0)  # a norm that underflows: η = 0 must still give zero
def test_norm_cap_bounds_the_norm_and_keeps_the_direction(v: np.ndarray, eta: float) -> None:
    capped = norm_cap(v, eta)
    assert _norm(capped) <= eta + 1e-12
    if eta == 0.0:
        assert np.array_equal(capped, np.zeros_like(v))
    elif _norm(v) <= eta:
        assert np.array_equal(capped, v)
    else:
        assert np.allclose(capped * _norm(v), v * _norm(capped), atol=1e-9)


def _norm(v: np.ndarray) -> float:
    """‖v‖ without the underflow of np.linalg.norm (whose squares vanish below 1e-154)."""
    top = float(np.abs(v).max()) if v.size else 0.0
    return top * float(np.linalg.norm(v / top)) if top > 0 else 0.0


def test_norm_cap_measures_huge_and_tiny_vectors_without_over_or_underflow() -> None:
    """‖(1e30, 1e30)‖ overflowed float32 (the cap returned 0); ‖(1e-283, 1e-283)‖ underflowed float64."""
    big = norm_cap(torch.full((2,), 1e30), 1.0)
    torch.testing.assert_close(big, torch.full((2,), 2**-0.5))
    tiny = np.full(2, 1e-283)
    np.testing.assert_allclose(norm_cap(tiny, 1e-283), tiny / 2**0.5, rtol=1e-12)
    parallel, orthogonal = decompose(torch.full((2,), 1e30), torch.tensor([1e30, 0.0]))
    torch.testing.assert_close(parallel, torch.tensor([1e30, 0.0]))
    torch.testing.assert_close(orthogonal, torch.tensor([0.0, 1e30]))


def test_norm_cap_with_infinite_eta_is_identity() -> None:
    v = torch.randn(3, 4)
    assert torch.equal(norm_cap(v, math.inf), v)


# --- extrapolation and GAG -----------------------------------------------------------------------


@given(dense_sparse(), scales)
def test_extrapolation_is_affine_in_scale_through_dense_and_sparse(pair: tuple, scale: float) -> None:
    dense, sparse = pair
    assert np.array_equal(extrapolate(dense, sparse, 0.0), dense)
    assert np.allclose(extrapolate(dense, sparse, 1.0), sparse, atol=TOL)
    assert np.allclose(extrapolate(dense, sparse, scale), dense + scale * (sparse - dense), atol=TOL)


@given(dense_sparse(), zetas, etas, st.sampled_from(["sparse", "dense"]))
def test_gag_at_zero_scale_is_the_sparse_retrieval(
    pair: tuple, zeta: float, eta: float, reference: str
) -> None:
    dense, sparse = pair
    assert np.array_equal(gag(dense, sparse, 0.0, zeta=zeta, eta=eta, reference=reference), sparse)


@given(dense_sparse(), scales, st.sampled_from(["sparse", "dense", "tensor"]), st.data())
def test_gag_with_full_residual_uncapped_equals_extrapolation_at_scale_plus_one(
    pair: tuple, scale: float, reference: str, data: st.DataObject
) -> None:
    dense, sparse = pair
    ref: object = reference
    if reference == "tensor":
        ref = data.draw(hnp.arrays(np.float64, dense.shape, elements=finite))
    guided = gag(dense, sparse, scale, zeta=1.0, eta=math.inf, reference=ref)
    assert np.allclose(guided, extrapolate(dense, sparse, scale + 1.0), atol=1e-9 * (1 + abs(scale)) * 10)


@given(dense_sparse(), scales, zetas, etas, st.sampled_from(["sparse", "dense", "update"]), st.data())
@example((np.array([1.0, 0.0]), np.array([3.0, 4.0])), 5.0, 0.0, 1.0, "sparse", None)
def test_gag_bounded_update_inequality(
    pair: tuple, scale: float, zeta: float, eta: float, reference: str, data: st.DataObject | None
) -> None:
    """‖G(ξ) − S(ξ)‖ ≤ |λ| (η + |ζ| ‖r_⊥‖)  (Remark 3.8)."""
    dense, sparse = pair
    state = None
    if reference == "update":
        state = (
            np.zeros_like(dense)
            if data is None
            else data.draw(hnp.arrays(np.float64, dense.shape, elements=finite))
        )
    guided = gag(dense, sparse, scale, zeta=zeta, eta=eta, reference=reference, state=state)
    u = {"sparse": sparse, "dense": dense, "update": sparse - (state if state is not None else 0.0)}[
        reference
    ]
    _, orthogonal = decompose(sparse - dense, u)
    bound = 0.0 if scale == 0 else abs(scale) * (eta + abs(zeta) * np.linalg.norm(orthogonal))
    assert np.linalg.norm(guided - sparse) <= bound + 1e-9 * (1 + abs(scale))


def test_gag_bounded_update_fails_for_an_uncapped_rule() -> None:
    """The inequality is not vacuous: without the cap the parallel part can exceed any η."""
    dense, sparse = torch.tensor([1.0, 0.0]), torch.tensor([5.0, 0.0])
    guided = gag(dense, sparse, 1.0, eta=math.inf)
    assert torch.linalg.vector_norm(guided - sparse) > 1.0  # η = 1 would be violated


def test_gag_orthogonal_only_drops_the_parallel_part() -> None:
    dense = torch.tensor([0.0, 0.0])
    sparse = torch.tensor([1.0, 1.0])
    reference = torch.tensor([1.0, 0.0])
    # η = 0 removes the parallel part, ζ = 1 keeps the orthogonal one
    out = gag(dense, sparse, 2.0, zeta=1.0, eta=0.0, reference=reference)
    assert torch.allclose(out, torch.tensor([1.0, 3.0]))


# --- fixed points ----------------------------------------------------------------------------------


@given(memories(), betas, scales, zetas, etas, st.sampled_from([1.5, 2.0, 1.25]))
def test_fixed_point_preservation_at_common_fixed_points(
    memory: np.ndarray, beta: float, scale: float, zeta: float, eta: float, alpha: float
) -> None:
    """Lemma 3.3: at ξ* fixed by D and S, P_λ(ξ*) = G(ξ*) = ξ* for every λ, ζ, η.

    A memory closed under negation, [X; −X], has ξ* = 0 fixed by every T_α (uniform weights on ± pairs)."""
    symmetric = np.concatenate([memory, -memory])
    xi = np.zeros(memory.shape[1])
    dense, sparse = retrieve(xi, symmetric, beta, 1.0), retrieve(xi, symmetric, beta, alpha)
    assert np.allclose(dense, xi, atol=1e-12) and np.allclose(sparse, xi, atol=1e-12)
    assert np.allclose(extrapolate(dense, sparse, scale), xi, atol=1e-11)
    assert np.allclose(gag(dense, sparse, scale, zeta=zeta, eta=eta), xi, atol=1e-11)


@given(memories(max_patterns=6, max_dim=4), st.floats(min_value=0.1, max_value=20.0), scales)
def test_divergence_at_a_dense_fixed_point_is_linear_in_scale(
    memory: np.ndarray, beta: float, scale: float
) -> None:
    """Remark 3.4: at a fixed point ξ* of D, ‖P_λ(ξ*) − ξ*‖ = |λ| ‖r(ξ*)‖."""
    result = iterate(memory.mean(0) + 0.1, memory, beta, 1.0, max_iter=5000)
    if not bool(result.converged):
        return  # only fixed points are in scope; plain iteration may crawl near a bifurcation
    xi = result.state
    dense, sparse = retrieve(xi, memory, beta, 1.0), retrieve(xi, memory, beta, 1.5)
    residual = sparse - dense
    lhs = np.linalg.norm(extrapolate(dense, sparse, scale) - xi)
    fixed_point_error = np.linalg.norm(dense - xi)
    assert abs(lhs - abs(scale) * np.linalg.norm(residual)) <= fixed_point_error + 1e-9


# --- the AA(1) correspondence ----------------------------------------------------------------------


@given(dense_sparse(), scales, st.data())
def test_extrapolation_is_an_anderson_depth_one_step_with_gamma_one_minus_scale(
    pair: tuple, scale: float, data: st.DataObject
) -> None:
    """Prop 3.2: AA(1) with g_{k−1} = D, g_k = S and γ = 1 − λ gives P_λ exactly."""
    dense, sparse = pair
    xi = data.draw(hnp.arrays(np.float64, dense.shape, elements=finite))
    xs = torch.tensor(np.stack([xi, xi]))
    gs = torch.tensor(np.stack([dense, sparse]))
    step = anderson_step(xs, gs, gamma=aa1_gamma(scale))
    assert np.allclose(
        np.asarray(step), extrapolate(dense, sparse, scale), atol=1e-12 * (1 + abs(scale)) * 10
    )


@given(dense_sparse(), st.data())
def test_anderson_optimal_scale_matches_the_closed_form(pair: tuple, data: st.DataObject) -> None:
    dense, sparse = pair
    xi = data.draw(hnp.arrays(np.float64, dense.shape, elements=finite))
    r = sparse - dense
    lam = float(anderson_optimal_scale(xi, dense, sparse))
    assert math.isfinite(lam)
    if r @ r > 1e-12:
        expected = 1.0 - (sparse - xi) @ r / (r @ r)
        assert math.isclose(lam, expected, rel_tol=1e-9, abs_tol=1e-9)

        # λ* minimises the residual norm of the mixed step along the extrapolation line
        def mixed_residual(lam_: float) -> float:
            return float(np.linalg.norm(extrapolate(dense, sparse, lam_) - xi))

        assert mixed_residual(lam) <= min(mixed_residual(lam + 0.1), mixed_residual(lam - 0.1)) + 1e-12


def test_two_rung_ladder_is_plain_extrapolation() -> None:
    dense, sparse = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    assert torch.allclose(ladder_extrapolate([dense, sparse], 2.5), extrapolate(dense, sparse, 2.5))


def test_ladder_recovers_the_limit_of_a_geometric_sequence() -> None:
    """On y_{i+1} = y* + c (y_i − y*) the three-rung Anderson step finds y* exactly (Aitken)."""
    limit = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    y0 = torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)
    rungs = [limit + 0.6**i * (y0 - limit) for i in range(3)]
    out = ladder_extrapolate(rungs, 1.0)
    assert torch.allclose(out, limit, atol=1e-10)


# --- input handling ------------------------------------------------------------------------------


def test_mixed_dtypes_promote_as_torch_does() -> None:
    """The result has the first argument's kind and the dtype all the array arguments promote to."""
    half, double = torch.ones(2, 3, dtype=torch.float16), 2 * torch.ones(2, 3, dtype=torch.float64)
    assert gag(half, double, 1.0).dtype == torch.float64
    assert extrapolate(half, double, 2.0).dtype == torch.float64
    assert gag(half, half, 1.0, reference=double).dtype == torch.float64
    assert decompose(half, double)[0].dtype == torch.float64
    assert extrapolate(half, half.bfloat16(), 2.0).dtype == torch.float32
    out = extrapolate(np.ones(3, dtype=np.float16), torch.ones(3, dtype=torch.float64), 2.0)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64


def test_decompose_on_a_leading_axis_with_a_broadcast_reference() -> None:
    residual = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    reference = torch.tensor([1.0, 0.0], dtype=torch.float64)  # broadcast over rows: u = (1, 1) per column
    parallel, orthogonal = decompose(residual, reference, dim=0)
    torch.testing.assert_close(parallel, torch.tensor([[2.0, 0.0], [2.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(parallel + orthogonal, residual)


def test_numpy_in_numpy_out_and_dtype_kept() -> None:
    d = np.ones((2, 3), dtype=np.float32)
    assert isinstance(gag(d, 2 * d, 1.0), np.ndarray) and gag(d, 2 * d, 1.0).dtype == np.float32
    t = torch.ones(2, 3, dtype=torch.bfloat16)
    assert gag(t, 2 * t, 1.0).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: gag(torch.ones(3), torch.ones(4), 1.0), "sparse"),
        (lambda: gag(torch.ones(3), torch.ones(3), 1.0, eta=-1.0), "eta"),
        (lambda: gag(torch.ones(3), torch.ones(3), float("nan")), "scale"),
        (lambda: gag(torch.ones(3), torch.ones(3), 1.0, reference="query"), "reference"),
        (lambda: gag(torch.ones(3), torch.ones(3), 1.0, reference="update"), "state"),
        (lambda: gag(torch.ones(3), torch.tensor([1.0, float("nan"), 0.0]), 1.0), "sparse"),
        (lambda: extrapolate([1.0], torch.ones(1), 1.0), "dense"),
        (lambda: decompose(torch.ones(3), torch.ones(2)), "reference"),
        (lambda: norm_cap(torch.ones(3), -0.5), "eta"),
        # issue 12: these raised torch's IndexError
        (lambda: decompose(torch.ones(3), torch.ones(3), dim=5), "dim"),
        (lambda: decompose(torch.ones(2, 3), torch.ones(3), dim=-3), "dim"),
        (lambda: decompose(torch.ones(3), torch.ones(3), dim=0.5), "dim"),
        (lambda: norm_cap(torch.ones(3), 1.0, dim=1), "dim"),
    ],
)
def test_bad_input_names_the_argument(call, name: str) -> None:
    with pytest.raises((ValueError, TypeError), match=name):
        call()
