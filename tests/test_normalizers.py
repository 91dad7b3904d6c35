"""Property tests of THEORY.md §1 for hopfield_aa.normalizers: simplex output, invariances, exact zeros,
α → 1 continuity, agreement with the `entmax` package and the sort-based algorithms, Jacobian, JVP,
conjugate, half precision, input handling."""

# mypy: disable-error-code="union-attr,arg-type,operator,index,call-overload,misc,return-value"
from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import entmax as entmax_pkg
import numpy as np
import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hopfield_aa.normalizers import (
    _entmax_tensor,
    entmax,
    entmax15,
    entmax_backend,
    entmax_conjugate,
    entmax_jacobian,
    entmax_jvp,
    entmax_threshold,
    get_backend,
    set_backend,
    softmax,
    sparsemax,
)
from hopfield_aa.normalizers import compiled as compiled_backend
from hopfield_aa.normalizers.blocked import forward as forward_eager
from hopfield_aa.normalizers.exact import entmax15_sort_rows as exact_sort_rows
from tests._oracles import entmax15_sort as _entmax15_sort
from tests._oracles import entmax_bisect as _entmax_bisect
from tests._oracles import sparsemax_sort as _sparsemax_sort

F64 = torch.float64
TOL = 1e-9
ALPHAS = st.one_of(st.sampled_from([1.0, 1.5, 2.0, 1.0 + 1e-6]), st.floats(min_value=1.0, max_value=3.0))
SPARSE_ALPHAS = st.one_of(st.sampled_from([1.5, 2.0]), st.floats(min_value=1.05, max_value=2.5))


@st.composite
def score_rows(draw: st.DrawFn, max_n: int = 12, allow_neg_inf: bool = True) -> np.ndarray:
    """Score rows (B, N) in float64 reaching ties, tiny differences, huge logits (1e4), N = 1 and −inf."""
    n = draw(st.integers(1, max_n))
    b = draw(st.integers(1, 3))
    scale = draw(st.sampled_from([1e-3, 1.0, 10.0, 1e4]))
    z = draw(hnp.arrays(np.float64, (b, n), elements=st.floats(-3.0, 3.0))) * scale
    mode = draw(st.sampled_from(["plain", "tie", "tiny", "constant", "neg_inf"]))
    if mode == "tie" and n > 1:
        z[:, -1] = z[:, 0]
    elif mode == "tiny" and n > 1:
        z[:, 1] = z[:, 0] + 1e-12
    elif mode == "constant":
        z[:] = z[0, 0]
    elif mode == "neg_inf" and allow_neg_inf and n > 1:
        z[:, draw(st.integers(1, n - 1))] = -np.inf
    return z


def _t(z: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(z)


def _package(z: torch.Tensor, alpha: float) -> torch.Tensor:
    if alpha == 1.5:
        return entmax_pkg.entmax15(z, dim=-1)
    if alpha == 2.0:
        return entmax_pkg.sparsemax(z, dim=-1)
    return entmax_pkg.entmax_bisect(z, alpha=alpha, dim=-1, n_iter=100)


# ------------------------------------------------------------------------------------------ simplex


@given(score_rows(), ALPHAS)
@example(np.array([[1e4, -1e4, 0.0]]), 1.0 + 1e-6)
@example(np.array([[0.0, -np.inf]]), 2.0)
def test_output_is_nonnegative_and_sums_to_one(z: np.ndarray, alpha: float) -> None:
    p = entmax(_t(z), alpha)
    assert bool((p >= 0).all())
    torch.testing.assert_close(p.sum(-1), torch.ones(z.shape[0], dtype=F64), atol=1e-9, rtol=0)
    assert bool((p[_t(z) == -math.inf] == 0).all()), "masked (-inf) entries must get probability 0"


@given(score_rows(), ALPHAS, st.sampled_from([-1e3, -1.0, 0.5, 7.0, 1e3]))
def test_shift_invariance_entmax_of_z_plus_c_is_entmax_of_z(z: np.ndarray, alpha: float, c: float) -> None:
    p = entmax(_t(z), alpha)
    q = entmax(_t(z) + c, alpha)
    torch.testing.assert_close(q, p, atol=1e-7, rtol=0)


@given(score_rows(), ALPHAS, st.randoms(use_true_random=False))
def test_permutation_equivariance(z: np.ndarray, alpha: float, rnd: object) -> None:
    perm = torch.tensor(rnd.sample(range(z.shape[1]), z.shape[1]))  # type: ignore[attr-defined]
    p = entmax(_t(z), alpha)
    torch.testing.assert_close(entmax(_t(z)[:, perm], alpha), p[:, perm], atol=1e-9, rtol=0)


@given(score_rows(allow_neg_inf=False), SPARSE_ALPHAS)
@example(np.array([[3.0, 0.0, -5.0]]), 1.5)
def test_exact_zeros_support_is_where_alpha_minus_1_times_z_exceeds_tau(z: np.ndarray, alpha: float) -> None:
    zt = _t(z)
    p = entmax(zt, alpha)
    tau = entmax_threshold(zt, alpha)
    gap = (alpha - 1) * zt - tau
    scale = 1e-9 * (1 + (alpha - 1) * zt.abs().amax(-1, keepdim=True))
    # entries clearly below the threshold are exactly zero; clearly above are positive
    assert bool((p[gap < -scale] == 0).all())
    assert bool((p[gap > scale] > 0).all())
    closed = gap.clamp(min=0).pow(1 / (alpha - 1))
    torch.testing.assert_close(p, closed, atol=1e-7, rtol=0)


@given(score_rows(max_n=8, allow_neg_inf=False))
def test_alpha_to_one_recovers_softmax(z: np.ndarray) -> None:
    zt = _t(z)
    ref = torch.softmax(zt, -1)
    torch.testing.assert_close(entmax(zt, 1.0 + 1e-6), ref, atol=1e-5, rtol=0)
    # continuity: the distance to softmax shrinks as α → 1
    d1 = (entmax(zt, 1.01) - ref).abs().max()
    d2 = (entmax(zt, 1.0001) - ref).abs().max()
    assert d2 <= d1 + 1e-12


def test_alpha_very_large_still_gives_a_distribution() -> None:
    z = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    for alpha in (5.0, 50.0):
        p = entmax(z, alpha)
        assert not bool(torch.isnan(p).any())
        torch.testing.assert_close(p.sum(-1), torch.ones(64), atol=1e-6, rtol=0)
        assert bool((p >= 0).all())


# ------------------------------------------------------------------ agreement with other algorithms


@given(score_rows(), st.sampled_from([1.5, 2.0, 1.3, 1.7]))
@example(np.array([[1e4, 1e4, -1e4, 0.0]]), 1.5)
@example(np.array([[0.0, -np.inf, 0.0]]), 2.0)
def test_agrees_with_entmax_package(z: np.ndarray, alpha: float) -> None:
    zt = _t(z)
    torch.testing.assert_close(entmax(zt, alpha), _package(zt, alpha), atol=1e-7, rtol=0)


@given(score_rows(max_n=40))
def test_sort_free_solvers_agree_with_sort_based_exact_algorithms(z: np.ndarray) -> None:
    zt = _t(z)
    torch.testing.assert_close(entmax15(zt), _entmax15_sort(zt), atol=1e-12, rtol=0)
    torch.testing.assert_close(sparsemax(zt), _sparsemax_sort(zt), atol=1e-12, rtol=0)
    # the Newton solver for general α, run at α = 1.5 and 2 through tiny offsets, matches too
    torch.testing.assert_close(entmax(zt, 1.5 + 1e-9), _entmax15_sort(zt), atol=1e-7, rtol=0)


@given(score_rows(allow_neg_inf=False), st.floats(min_value=1.05, max_value=2.9))
def test_newton_agrees_with_bisection(z: np.ndarray, alpha: float) -> None:
    zt = _t(z)
    torch.testing.assert_close(entmax(zt, alpha), _entmax_bisect(zt, alpha), atol=1e-8, rtol=0)


def test_float32_attention_shape_within_1e_6_of_float64() -> None:
    z = 2 * torch.randn(512, 77, generator=torch.Generator().manual_seed(0))
    for alpha in (1.5, 2.0, 1.3):
        err = (_entmax_tensor(z, alpha).double() - _package(z.double(), alpha)).abs().max()
        assert err <= 1e-6, (alpha, float(err))


# ------------------------------------------------------------------------------ Jacobian and JVP


@given(score_rows(max_n=6, allow_neg_inf=False), ALPHAS)
def test_jacobian_matches_finite_differences(z: np.ndarray, alpha: float) -> None:
    zt = _t(z)[:1]
    jac = entmax_jacobian(zt, alpha)[0]
    h = 1e-6
    fd = torch.stack(
        [
            (entmax(zt + h * e, alpha) - entmax(zt - h * e, alpha))[0] / (2 * h)
            for e in torch.eye(zt.shape[1], dtype=F64)
        ],
        dim=1,
    )
    # finite differences are wrong only where an entry sits within h of the support boundary
    tau = entmax_threshold(zt, alpha)
    if alpha > 1 and bool((((alpha - 1) * zt - tau).abs() < 1e-4).any()):
        return
    torch.testing.assert_close(jac, fd, atol=1e-4, rtol=1e-4)


@given(score_rows(max_n=6), ALPHAS)
def test_jacobian_matches_autograd(z: np.ndarray, alpha: float) -> None:
    zt = _t(z)[0]
    auto = torch.autograd.functional.jacobian(lambda x: entmax(x, alpha), zt)
    torch.testing.assert_close(entmax_jacobian(zt, alpha), auto, atol=1e-10, rtol=0)


@given(score_rows(), ALPHAS, st.integers(0, 2**31 - 1))
def test_jvp_equals_dense_jacobian_times_vector(z: np.ndarray, alpha: float, seed: int) -> None:
    zt = _t(z)
    v = torch.randn(zt.shape, dtype=F64, generator=torch.Generator().manual_seed(seed))
    p = entmax(zt, alpha)
    dense = (entmax_jacobian(zt, alpha) @ v.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(entmax_jvp(p, v, alpha), dense, atol=1e-10, rtol=0)


@given(
    score_rows(max_n=8, allow_neg_inf=False),
    st.one_of(st.sampled_from([2.5, 4.0, 10.0]), st.floats(2.0, 12.0, exclude_min=True)),
    st.sampled_from([torch.float64, torch.float32]),
    st.integers(0, 2**31 - 1),
)
@example(np.array([[0.3457, 0.8218, 0.3303, -1.3027, 0.9053]]), 10.0, torch.float16, 0)  # s spans 1e12
@example(np.array([[0.0, -0.1111011]]), 10.0, torch.float32, 1)  # p = 1e-5: s = 1e40 overflows float32
def test_large_alpha_jacobian_rows_sum_to_zero_and_jvp_is_the_dense_product(
    z: np.ndarray, alpha: float, dtype: torch.dtype, seed: int
) -> None:
    """For α > 2 the weights s = p^{2−α} span many decades (and overflow float32 for p < 2e-5), yet J still
    annihilates constants (its rows sum to 0: entmax is shift invariant) and J v is the dense J times v,
    wherever the true entries of J are representable."""
    zt = _t(z).to(dtype)
    jac = entmax_jacobian(zt, alpha).double()
    assume(bool(torch.isfinite(jac).all()))
    rel = 1e-2 if dtype == torch.float16 else 64 * torch.finfo(dtype).eps * zt.shape[-1]
    scale = jac.abs().amax((-2, -1), keepdim=True).squeeze(-1)
    assert bool((jac.sum(-1).abs() <= rel * scale).all())
    v = torch.randn(zt.shape, dtype=F64, generator=torch.Generator().manual_seed(seed))
    jvp = entmax_jvp(entmax(zt, alpha), v.to(dtype), alpha).double()
    dense = (jac @ v.to(dtype).double().unsqueeze(-1)).squeeze(-1)
    size = (jac.abs() @ v.abs().unsqueeze(-1)).squeeze(-1)
    assert bool(((jvp - dense).abs() <= rel * size + 1e-300).all())


@given(score_rows(allow_neg_inf=False), ALPHAS)
@example(np.array([[-20.0, 0.0, 0.0]]), 1.000001)  # a support entry of size e^-20: numerical rank
@example(np.array([[20.0, 0.0]]), 1.0)  # eigenvalue 0 computed from entries of size 1 − 1e-9
def test_jacobian_is_symmetric_psd_with_rank_support_minus_one(z: np.ndarray, alpha: float) -> None:
    zt = _t(z)
    jac = entmax_jacobian(zt, alpha)
    torch.testing.assert_close(jac, jac.mT, atol=0, rtol=0)
    p = entmax(zt, alpha)
    s = torch.where(p > 0, p, 1.0).pow(2 - alpha) * (p > 0)
    s_max = s.amax(-1, keepdim=True)
    eig = torch.linalg.eigvalsh(jac)
    # entries are computed to ~eps·max s, so eigenvalues are exact to a few n·eps·max s
    assert bool((eig >= -1e-13 * zt.shape[-1] * s_max).all())
    if alpha > 1:
        # the rank is |support| − 1 where every support weight s_i is numerically resolvable
        resolvable = ((s == 0) | (s > 1e-6 * s_max)).all(-1)
        rank = torch.linalg.matrix_rank(jac, rtol=1e-10)
        assert torch.equal(rank[resolvable], ((p > 0).sum(-1) - 1)[resolvable])


@pytest.mark.parametrize("alpha", [1.0, 1.3, 1.5, 2.0, 2.5])
def test_autograd_backward_passes_gradcheck(alpha: float) -> None:
    z = torch.randn(3, 7, dtype=F64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: entmax(x, alpha, dim=0), (z,))
    assert torch.autograd.gradcheck(lambda x: _entmax_tensor(x, alpha, -1), (z,))


# ------------------------------------------------------------------------------------- conjugate


@given(score_rows(max_n=6, allow_neg_inf=False), ALPHAS)
def test_conjugate_gradient_is_entmax_by_finite_differences(z: np.ndarray, alpha: float) -> None:
    zt = _t(z)[0]
    zt = zt / zt.abs().max().clamp(min=1.0)  # keep the step small relative to the scores
    h = 1e-6
    fd = torch.stack(
        [
            (entmax_conjugate(zt + h * e, alpha) - entmax_conjugate(zt - h * e, alpha)) / (2 * h)
            for e in torch.eye(zt.shape[0], dtype=F64)
        ]
    )
    torch.testing.assert_close(fd, entmax(zt, alpha), atol=1e-6, rtol=0)


def _omega(p: torch.Tensor, alpha: float) -> torch.Tensor:
    if alpha == 1.0:
        return torch.special.xlogy(p, p).sum(-1)
    return (p.pow(alpha).sum(-1) - 1) / (alpha * (alpha - 1))


@given(score_rows(allow_neg_inf=False), ALPHAS)
def test_conjugate_equals_max_of_inner_product_minus_tsallis_entropy(z: np.ndarray, alpha: float) -> None:
    zt = _t(z)
    p = entmax(zt, alpha)
    value = (p * zt).sum(-1) - _omega(p, alpha)
    scale = 1 + zt.abs().amax(-1)
    assert bool(((entmax_conjugate(zt, alpha) - value).abs() <= 1e-9 * scale).all())


@given(score_rows(max_n=6, allow_neg_inf=False), ALPHAS)
def test_autograd_through_inner_product_minus_entropy_gives_entmax(z: np.ndarray, alpha: float) -> None:
    zt = _t(z).clone().requires_grad_(True)
    p = entmax(zt, alpha)
    value = ((p * zt).sum(-1) - _omega(p.clamp(min=1e-300) if alpha == 1.0 else p, alpha)).sum()
    (grad,) = torch.autograd.grad(value, zt)
    torch.testing.assert_close(grad, p.detach(), atol=1e-7, rtol=0)


@given(score_rows(), st.just(1.0))
def test_conjugate_at_alpha_one_is_logsumexp(z: np.ndarray, alpha: float) -> None:
    zt = _t(z)
    torch.testing.assert_close(entmax_conjugate(zt, alpha), torch.logsumexp(zt, -1), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(entmax_conjugate(zt, 1.0 + 1e-7), torch.logsumexp(zt, -1), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------- dtypes and input


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0, 1.3])
def test_half_precision_peaked_logits_no_nan_and_close_to_float64(dtype: torch.dtype, alpha: float) -> None:
    z = (100 * torch.randn(256, 77, generator=torch.Generator().manual_seed(2))).to(dtype)
    p = entmax(z, alpha)
    assert p.dtype == dtype
    assert not bool(torch.isnan(p).any())
    ref = entmax(z.double(), alpha)
    tol = 4 * torch.finfo(dtype).eps
    assert float((p.double() - ref).abs().max()) <= tol


@given(score_rows(), ALPHAS)
def test_numpy_in_numpy_out_and_any_dim(z: np.ndarray, alpha: float) -> None:
    out = entmax(z, alpha)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    np.testing.assert_allclose(out, entmax(_t(z), alpha).numpy(), atol=0)
    np.testing.assert_allclose(entmax(z.T.copy(), alpha, dim=0), out.T, atol=1e-12)
    z3 = np.stack([z, z + 1.0])
    np.testing.assert_allclose(entmax(z3, alpha, dim=-1)[1], out, atol=1e-9)
    assert isinstance(softmax(z.astype(np.float32)), np.ndarray)


def test_public_functions_accept_numpy_and_keep_kind() -> None:
    z = np.array([[1.0, 0.5, -2.0]], dtype=np.float32)
    assert entmax_jacobian(z).shape == (1, 3, 3)
    assert entmax_conjugate(z).shape == (1,)
    assert entmax_threshold(z, 1.5).shape == (1, 1)
    p = entmax(z)
    assert isinstance(entmax_jvp(p, np.ones_like(p)), np.ndarray)


@pytest.mark.parametrize(
    ("scores", "alpha", "name"),
    [
        (torch.tensor([0.0, float("nan")]), 1.5, "scores"),
        (torch.tensor([0.0, float("inf")]), 1.5, "scores"),
        (torch.tensor([-float("inf"), -float("inf")]), 1.5, "scores"),
        (torch.tensor([0.0, 1.0]), 0.5, "alpha"),
        (torch.tensor([0.0, 1.0]), float("nan"), "alpha"),
        (torch.tensor([1, 2]), 1.5, "scores"),
        ([0.0, 1.0], 1.5, "scores"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(scores: object, alpha: float, name: str) -> None:
    with pytest.raises((ValueError, TypeError), match=name):
        entmax(scores, alpha)


@pytest.mark.parametrize("alpha", [1.25, 1.5, 2.0, 3.0, 1.0])
@pytest.mark.parametrize(
    ("dtype", "big"),
    [(torch.float32, 1e8), (torch.float32, 1e30), (torch.bfloat16, 1e8), (torch.float64, 1e17)],
)
def test_logits_too_large_for_the_candidate_reach_give_the_one_hot_distribution(
    dtype: torch.dtype, big: float, alpha: float
) -> None:
    """|z| ≥ 1e8 (float32, bfloat16) or 1e17 (float64): z_max − 1/(α−1) rounds to z_max. Issue 12: this
    raised "The expanded size of the tensor (1) must match the existing size (0)" for α ∉ {1, 1.5, 2}."""
    for z in (
        torch.tensor([big, 0.0], dtype=dtype),
        torch.tensor([[0.0, -big, big, 1.0], [-big, big, 0.0, -math.inf]], dtype=dtype),
        torch.tensor([big, big, -big], dtype=dtype),  # a tie at the top
    ):
        p = entmax(z, alpha)
        assert p.dtype == dtype and bool(torch.isfinite(p).all()) and bool((p >= 0).all())
        assert torch.allclose(p.double().sum(-1), torch.ones(p.shape[:-1], dtype=torch.float64), atol=1e-2)
        top = z.double().amax(-1, keepdim=True)
        # all the mass on the maximal entries (equally on ties), none on the others
        want = (z.double() == top).double()
        want = want / want.sum(-1, keepdim=True)
        torch.testing.assert_close(p.double(), want, atol=1e-2 if dtype == torch.bfloat16 else 1e-6, rtol=0)


def _edge_entmax(gap: float, alpha: float, ties: int = 1) -> float:
    """The probability t of each of ``ties`` entries at −gap in α-entmax([0, −gap, …]), from
    (1 − ties·t)^{α−1} − t^{α−1} = (α−1)·gap: decreasing in t and well conditioned even where
    t^{α−1} is below rounding level."""
    if (alpha - 1) * gap >= 1.0:
        return 0.0
    lo, hi = 0.0, 1.0 / (ties + 1)
    for _ in range(200):
        t = 0.5 * (lo + hi)
        if (1 - ties * t) ** (alpha - 1) - t ** (alpha - 1) > (alpha - 1) * gap:
            lo = t
        else:
            hi = t
    return 0.5 * (lo + hi)


@pytest.mark.parametrize("alpha", [2.5, 3.0, 5.0, 10.0, 20.0])
def test_large_alpha_entries_at_the_edge_of_the_support_keep_their_mass(alpha: float) -> None:
    """For α > 2 an entry carrying p = 0.01 has p^{α−1} below rounding level (α = 10: 1e-18), so the
    threshold form p = [1 + (α−1)(z − λ)]^{1/(α−1)} cannot resolve it. Found by the fuzz:
    entmax([0.2008, 0.1028], α=10) gave [1, 0] instead of [0.986, 0.014]."""
    reach = 1.0 / (alpha - 1)
    for frac in (0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 1 - 1e-6):
        gap = frac * reach
        for ties in (1, 2):
            want = _edge_entmax(gap, alpha, ties)
            for top in (0.0, 0.2008):
                z = torch.tensor([top] + [top - gap] * ties, dtype=torch.float64)
                p = entmax(z, alpha)
                # the tied entries' total is well conditioned (how they split it is not: J = diag(s) −
                # s sᵀ/Σs has entries of size s = p^{2−α} between them), and equal inputs split it equally
                # (1e-5, not 1e-12: an entry with p^{α−1} a little above rounding level, e.g. 1e-13, is
                # still resolved only to about eps/p^{α−1} relatively; before, the whole mass was lost)
                assert abs(float(p[1:].sum()) - ties * want) <= 1e-5, (frac, ties, p.tolist(), want)
                assert bool((p[1:] == p[1]).all())
                assert abs(float(p.sum()) - 1) <= 1e-12


@pytest.mark.parametrize("shape", [(3, 0), (0, 0), (0,)])
def test_an_empty_axis_gets_a_value_error_naming_scores_and_dim(shape: tuple) -> None:
    for fn in (entmax, entmax_conjugate, entmax_jacobian):
        with pytest.raises(ValueError, match=r"scores.*dim=-1"):
            fn(torch.zeros(shape))
    # an empty batch with a non-empty axis is a valid (empty) input
    assert entmax(torch.zeros(0, 3)).shape == (0, 3)


def test_jvp_of_float16_probs_and_a_float64_vector_is_float64() -> None:
    p = torch.tensor([0.75, 0.25, 0.0], dtype=torch.float16)
    v = torch.tensor([1.0, 0.0, 5.0], dtype=torch.float64)
    out = entmax_jvp(p, v, alpha=2.0)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, torch.tensor([0.5, -0.5, 0.0], dtype=torch.float64))


def test_all_masked_row_in_fast_kernel_gives_zeros_not_nan() -> None:
    z = torch.tensor([[0.0, 1.0], [-math.inf, -math.inf]])
    for alpha in (1.5, 2.0, 1.3):
        p = _entmax_tensor(z, alpha)
        assert not bool(torch.isnan(p).any())
        assert torch.equal(p[1], torch.zeros(2))


# ------------------------------------------------------------------------- fast-kernel code paths


@pytest.fixture
def tensor_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run α = 1.5 and 2 on the tensor kernels of .blocked and .exact (the CUDA path), not the CPU
    native kernels that take them on CPU by default (tests/test_native.py)."""
    from hopfield_aa import _jit

    monkeypatch.setattr(_jit, "_enabled", False)


@pytest.fixture(params=["native", "tensor"])
def either_kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both CPU kernels of α = 1.5 and 2 in turn: the native one (default) and the tensor one."""
    from hopfield_aa import _jit

    monkeypatch.setattr(_jit, "_enabled", request.param == "native")
    return str(request.param)


@pytest.mark.parametrize("alpha", [1.5, 2.0, 1.3, 2.5])
def test_candidate_compaction_with_wide_and_masked_rows_matches_sort_and_bisection(
    alpha: float, either_kernel: str
) -> None:
    """Rows of 300 entries (compacted candidates): peaked rows, a few flat rows with every entry a
    candidate (the second, wider group) and an all −inf row, against the exact references."""
    gen = torch.Generator().manual_seed(3)
    z = 2 * torch.randn(96, 300, generator=gen, dtype=F64)
    z[5] = 0.0  # constant: all 300 entries in the support
    z[17] = 1e-3 * torch.randn(300, generator=gen, dtype=F64)  # nearly flat
    z[40, 7:] = -math.inf  # few finite entries
    z[41] = -math.inf  # all masked: zeros from the fast kernel
    p = _entmax_tensor(z, alpha)
    assert bool((p[41] == 0).all())
    live = torch.ones(96, dtype=torch.bool)
    live[41] = False
    if alpha == 1.5:
        ref = _entmax15_sort(z[live])
    elif alpha == 2.0:
        ref = _sparsemax_sort(z[live])
    else:
        ref = _entmax_bisect(z[live], alpha)
    torch.testing.assert_close(p[live], ref, atol=1e-12 if alpha in (1.5, 2.0) else 1e-9, rtol=0)


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_row_shrinking_support_passes_agree_with_sort_on_many_short_rows(
    alpha: float, either_kernel: str
) -> None:
    """Thousands of 77-entry rows (full-width path; the passes continue on the unsettled rows only)."""
    gen = torch.Generator().manual_seed(4)
    z = 2 * torch.randn(5000, 77, generator=gen, dtype=F64)
    z[::7] *= 10.0  # some very peaked rows settle at once, others need more passes
    ref = _entmax15_sort(z) if alpha == 1.5 else _sparsemax_sort(z)
    torch.testing.assert_close(_entmax_tensor(z, alpha), ref, atol=1e-12, rtol=0)
    # and the thresholds: p = [(α−1) z − τ]_+^{1/(α−1)} reproduces the output
    tau = entmax_threshold(z, alpha)
    rebuilt = ((alpha - 1) * z - tau).clamp(min=0) ** (1 / (alpha - 1))
    torch.testing.assert_close(rebuilt, ref, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------- compiled (fused) backend


def _adversarial_float32(n: int, seed: int) -> torch.Tensor:
    """float32 rows of ``n`` entries: random, ties at the maximum, constant, nearly flat, huge logits,
    masked entries, a single finite entry and an all −inf row (last)."""
    gen = torch.Generator().manual_seed(seed)
    z = 2 * torch.randn(600, n, generator=gen)
    z[0] = 0.0  # constant: every entry in the support
    z[1, : n // 2] = 3.0  # a tie of half the row at the maximum
    z[2, 1] = z[2, 0] = z[2].max() + 0.5  # two tied maxima
    z[3] = 1e-6 * torch.randn(n, generator=gen)  # nearly flat
    z[4:40] *= 1e4  # huge logits
    z[40:80, n // 3 :] = -math.inf  # masked tails
    z[80, 1:] = -math.inf  # one finite entry
    z[81] = torch.linspace(0.0, -3.0, n)  # a staircase: the support grows one entry at a time
    z[82:120] *= 0.01  # flat rows, large supports
    z[-1] = -math.inf  # all masked: zeros
    return z


def _sort_sized_rows(n: int) -> int:
    """Rows of ``n`` entries (at most 599) that, with one more, the sort kernels still take."""
    from hopfield_aa.normalizers import blocked

    rows = 599
    while not blocked._sort_is_faster((rows + 1) * n, n):
        rows -= 1
    return rows


def _exact_reference(z: torch.Tensor, alpha: float) -> torch.Tensor:
    """Sort-based (α = 1.5, 2) or 200-halving bisection (other α) in float64 on the live rows."""
    z64 = z.double()
    if alpha == 1.5:
        return _entmax15_sort(z64)
    if alpha == 2.0:
        return _sparsemax_sort(z64)
    return _entmax_bisect(z64, alpha)


@pytest.mark.parametrize("n", [2, 3, 12, 77, 300])
def test_small_tensors_take_the_sort_kernel_which_agrees_with_the_blocked_one_and_the_exact_reference(
    n: int, monkeypatch: pytest.MonkeyPatch, tensor_kernels: None
) -> None:
    """1.5-entmax of a small tensor (blocked._sort_is_faster) is computed by sorting, a fixed number of
    dispatches; on adversarial float32 rows (ties, masked tails, huge logits) it has the blocked
    kernel's support, and both are within 1e-6 of the float64 reference, thresholds included; a row of
    only −inf gets zeros and λ = −inf from it, as from the blocked kernel."""
    from hopfield_aa.normalizers import blocked

    z = _adversarial_float32(n, seed=21)
    z = torch.cat([z[: _sort_sized_rows(n)], z[-1:]])  # the last row: only -inf
    assert blocked._sort_is_faster(z.numel(), n)
    calls = []
    monkeypatch.setitem(blocked._SORT_ROWS_KERNELS, 1.5, lambda *a: calls.append(1) or exact_sort_rows(*a))
    live = z[torch.isfinite(z.amax(-1))]  # every row with a finite maximum: the sort kernel
    p_sort, lam_sort = blocked.forward(live, 1.5, -1)
    assert calls, "the sort kernel was not used on a small tensor"
    monkeypatch.setattr(blocked, "_SORT_MAX_ENTRIES", 0)
    p_blocked, lam_blocked = blocked.forward(live, 1.5, -1)
    reference = _exact_reference(live, 1.5).float()
    assert torch.equal(p_sort > 0, p_blocked > 0)
    torch.testing.assert_close(p_sort, reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(p_blocked, reference, atol=1e-6, rtol=0)
    finite = torch.isfinite(lam_blocked)
    torch.testing.assert_close(lam_sort[finite], lam_blocked[finite], atol=1e-5, rtol=1e-6)
    # a row of only -inf: zeros and λ = -inf from either kernel
    monkeypatch.setattr(blocked, "_SORT_MAX_ENTRIES", 1 << 15)
    calls.clear()
    p_all, lam_all = blocked.forward(z, 1.5, -1)
    assert calls and torch.equal(p_all[-1], torch.zeros(n)) and float(lam_all[-1]) == -math.inf
    assert torch.equal(p_all[:-1][torch.isfinite(z[:-1].amax(-1))], p_sort)


@pytest.mark.parametrize("alpha", [1.5, 2.0])
@pytest.mark.parametrize("n", [2, 3, 12, 77, 300])
def test_probabilities_alone_of_small_tensors_are_the_sort_kernel_p_exact_and_zero_on_masked_rows(
    n: int, alpha: float, monkeypatch: pytest.MonkeyPatch, tensor_kernels: None
) -> None:
    """entmax_tensor at α = 1.5 and 2 on a small tensor (the attention hot path) takes the
    probabilities-only sort kernel: bit for bit the p of the (p, λ) sort kernel, within 1e-6 of the
    float64 reference on adversarial rows (ties, masked tails, huge logits), 0 on −inf entries and on
    rows of only −inf, on any axis; the (p, λ) kernel's λ is the blocked kernel's; larger tensors keep
    the blocked kernel."""
    from hopfield_aa.normalizers import blocked, exact

    name = {1.5: "entmax15", 2.0: "sparsemax"}[alpha]
    probs_kernel, rows_kernel = getattr(exact, f"{name}_sort_probs"), getattr(exact, f"{name}_sort_rows")
    z = _adversarial_float32(n, seed=22)
    z = torch.cat([z[: _sort_sized_rows(n)], z[-1:]])  # the last row: only -inf
    calls = []
    monkeypatch.setitem(blocked._SORT_KERNELS, alpha, lambda *a: calls.append(1) or probs_kernel(*a))
    p = _entmax_tensor(z, alpha)
    assert calls, "the probabilities-only sort kernel was not used on a small tensor"
    p_rows, lam_rows = rows_kernel(z)
    assert torch.equal(p, p_rows)
    live = torch.isfinite(z.amax(-1))
    torch.testing.assert_close(p[live], _exact_reference(z[live], alpha).float(), atol=1e-6, rtol=0)
    assert torch.equal(p[~live], torch.zeros_like(p[~live])) and bool((p[torch.isinf(z)] == 0).all())
    assert torch.equal(_entmax_tensor(z.T.contiguous(), alpha, 0), p.T)
    _, lam_blocked = blocked._forward_blocks(z, alpha, blocked._BLOCK_ELEMENTS)
    assert torch.equal(torch.isfinite(lam_rows), live.unsqueeze(-1))
    torch.testing.assert_close(lam_rows[live], lam_blocked[live], atol=1e-5, rtol=1e-6)
    calls.clear()
    monkeypatch.setattr(blocked, "_SORT_MAX_ENTRIES", 0)
    torch.testing.assert_close(_entmax_tensor(z, alpha), p, atol=1e-6, rtol=0)
    assert not calls


@pytest.fixture
def fresh_compiled_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Isolate the backend switch and the compile-failure flag of one test; the compiled passes run on CPU
    too (by default the native kernel takes them there)."""
    monkeypatch.setattr(compiled_backend, "_backend", "eager")
    monkeypatch.setattr(compiled_backend, "_compile_failed", False)
    monkeypatch.setattr(compiled_backend, "_CPU_KERNEL", "inductor")


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_the_compiled_backend_runs_the_native_kernel_on_cpu_without_compiling(
    alpha: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CPU the compiled backend's α = 1.5 and 2 forward is the native kernel (faster there than the
    passes inductor compiles): nothing is compiled and the result is the eager one, bit for bit."""
    _assert_compiled_backend_compiles_nothing(alpha, 19, "torch.compile called on CPU", monkeypatch)


def _assert_compiled_backend_compiles_nothing(
    alpha: float, seed: int, why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the compiled backend selected, α-entmax of adversarial float32 rows of 77 neither takes the
    compiled passes nor calls torch.compile (which fails with ``why``), and equals the eager result bit
    for bit."""

    def no_compile(*args: object, **kwargs: object) -> object:
        raise AssertionError(why)

    monkeypatch.setattr(compiled_backend, "_compiled_kernels", {})
    monkeypatch.setattr(torch, "compile", no_compile)
    z = _adversarial_float32(77, seed=seed)
    eager = _entmax_tensor(z, alpha)
    with entmax_backend("compiled"):
        assert not compiled_backend.applies(z, alpha)
        assert torch.equal(_entmax_tensor(z, alpha), eager)


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_fused_kernels_run_without_the_compiler_give_the_eager_result_on_the_rows_they_settle(
    alpha: float,
) -> None:
    """The compiled backend compiles the eager solver's own support passes, a fixed number of them: the
    rows those passes settle carry the eager probabilities and threshold (checked here on the plain
    Python function, no compilation)."""
    z = _adversarial_float32(77, seed=16)[:-1].double()
    out = torch.empty_like(z)
    lam, settled = compiled_backend._fused_support(z, out, alpha == 1.5)
    assert int(settled.sum()) > z.shape[0] // 2
    p_eager, lam_eager = forward_eager(z, alpha, -1, eager=True)
    torch.testing.assert_close(out[settled], p_eager[settled], atol=1e-12, rtol=0)
    torch.testing.assert_close(lam[settled], lam_eager[settled], atol=1e-9, rtol=1e-12)


@pytest.mark.parametrize("alpha", [1.5, 2.0])
@pytest.mark.parametrize("passes", [1, 2, 3])
def test_fused_support_rows_settled_by_the_mass_certificate_are_within_its_tolerance_of_exact_entmax(
    alpha: float, passes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row the fused support passes call settled, by a reproduced support or by |Σp − 1| ≤ 8 eps, has
    p within 8 eps (float32: 9.5e-7) of the exact α-entmax: F(τ) = Σ[u − τ]_+^k is strictly decreasing
    where positive and each p_i moves by at most |F − 1| on the way to the root. Checked after 1 to 3
    passes, when many rows are settled by the certificate alone (plain functions, no compilation)."""
    monkeypatch.setattr(compiled_backend, "_FUSED_SUPPORT_PASSES", passes)
    z = _adversarial_float32(77, seed=21)[:-1]
    out = torch.empty_like(z)
    _, settled = compiled_backend._fused_support(z, out, alpha == 1.5)
    assert int(settled.sum()) > 0
    error = (out[settled].double() - _exact_reference(z[settled], alpha)).abs().max().item()
    assert error <= 8 * torch.finfo(torch.float32).eps


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_entmax_inside_a_compiled_graph_is_exact_and_sorts_only_when_a_row_is_not_certified(
    alpha: float, monkeypatch: pytest.MonkeyPatch, tensor_kernels: None
) -> None:
    """Under torch.compile, α = 1.5 and 2 run certified support passes with the sort kernel as a
    torch.cond branch: rows all certified give the exact entmax without running the branch (here the
    sort kernel is replaced by one returning garbage, and the output is still exact); an all −inf row
    is never certified, so that call takes the branch (the garbage shows)."""
    from hopfield_aa.normalizers import blocked

    torch._dynamo.reset()

    def garbage(rows: torch.Tensor, ranks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.full_like(rows, 7.0), torch.full_like(rows[..., :1], 7.0)

    monkeypatch.setitem(blocked._SORT_ROWS_KERNELS, alpha, garbage)
    kernel = torch.compile(lambda z: _entmax_tensor(z, alpha), dynamic=False)
    z = _adversarial_float32(77, seed=23)[120:-1]  # random rows: certified within the passes
    out = kernel(z)
    assert (out.double() - _exact_reference(z, alpha)).abs().max().item() <= 1e-6
    dead = z.clone()
    dead[0] = -math.inf
    assert bool((kernel(dead) == 7.0).all())  # the sort branch ran for the whole call
    torch._dynamo.reset()


@pytest.mark.slow
def test_guided_attention_compiles_with_automatic_dynamic_shapes_and_equals_eager(either_kernel: str) -> None:
    """torch.compile's automatic dynamic shapes (a second and third attention shape make the sizes
    symbolic, as in a UNet at several batch sizes) compile the in-graph entmax (the native kernel as a
    custom op on CPU; elsewhere the certified passes and their torch.cond sort branch), and every shape
    equals the eager guided attention to float32 rounding. (Inductor generates a
    torch.cond branch only when each size symbol is some operand's dimension: the branches take the
    scores' own shape, not the flattened rows.)"""
    from hopfield_aa.guidance.attention import _guided
    from hopfield_aa.guidance.rules import gag_rule

    torch._dynamo.reset()
    guided = torch.compile(_guided, dynamic=None)
    gen = torch.Generator().manual_seed(25)
    for batch, heads, queries, keys, dim in [(1, 4, 64, 16, 16), (1, 4, 16, 16, 32), (3, 4, 64, 16, 16)]:
        q = torch.randn(batch, heads, queries, dim, generator=gen)
        k, v = (torch.randn(batch, heads, keys, dim, generator=gen) for _ in range(2))
        args = (q, k, v, lambda r: gag_rule(r, 1.0), (1.0, 1.5), dim**-0.5, None)
        torch.testing.assert_close(guided(*args), _guided(*args), rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [1.5, 2.0])
@pytest.mark.parametrize("n", [77, 300])
def test_compiled_backend_agrees_with_eager_and_exact_references(
    alpha: float, n: int, fresh_compiled_state: None
) -> None:
    """Compiled forward = eager forward = sort/bisection reference within 1e-6 on adversarial rows."""
    z = _adversarial_float32(n, seed=11)
    eager = _entmax_tensor(z, alpha)
    with entmax_backend("compiled"), warnings.catch_warnings():
        # a silent fallback to eager would make this test vacuous
        warnings.filterwarnings("error", message="the compiled entmax backend")
        fused = _entmax_tensor(z, alpha)
        lam_fused = entmax_threshold(z[:-1], alpha)
    assert not compiled_backend._compile_failed
    assert bool((fused[-1] == 0).all())
    ref = _exact_reference(z[:-1], alpha)
    assert (fused[:-1].double() - ref).abs().max().item() <= 1e-6
    assert (fused - eager).abs().max().item() <= 1e-6
    assert bool(((fused[:-1] > 0) == (ref > 1e-6)).logical_or(ref.abs() <= 1e-6).all())  # same support
    torch.testing.assert_close(lam_fused, entmax_threshold(z[:-1], alpha), atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_compiled_backend_with_too_few_passes_repairs_unsettled_rows_exactly(
    alpha: float, fresh_compiled_state: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one fused pass most rows fail the exactness test; the eager repair keeps the output exact."""
    monkeypatch.setattr(compiled_backend, "_FUSED_SUPPORT_PASSES", 1)
    z = _adversarial_float32(77, seed=12)[:-1]
    with entmax_backend("compiled"):
        _, settled = compiled_backend._fused_kernel()(z, torch.empty_like(z), alpha == 1.5)
        fused = _entmax_tensor(z, alpha)
    assert int((~settled).sum()) > 100  # the repair path is really taken
    assert (fused.double() - _exact_reference(z, alpha)).abs().max().item() <= 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_compiled_backend_gradient_is_the_closed_form_jacobian_product(
    alpha: float, fresh_compiled_state: None
) -> None:
    """The backward of the compiled forward equals the eager backward (J v, J = diag(s) − s sᵀ/Σs)."""
    gen = torch.Generator().manual_seed(13)
    z = 2 * torch.randn(256, 77, generator=gen)
    v = torch.randn(256, 77, generator=gen)
    grads = []
    for backend in ("eager", "compiled"):
        x = z.clone().requires_grad_(True)
        with entmax_backend(backend):
            _entmax_tensor(x, alpha).backward(v)
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("alpha", [1.3, 1.75, 3.0])
def test_the_compiled_backend_leaves_other_alpha_to_the_eager_kernel(
    alpha: float, fresh_compiled_state: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compiled backend covers α = 1.5 and 2 only (compiled Newton passes were slower than the eager
    kernel): other α never reach the compiler and give the eager result bit for bit."""
    _assert_compiled_backend_compiles_nothing(
        alpha, 17, "compiled for an α the backend does not cover", monkeypatch
    )


def test_backend_switch_context_manager_restores_and_rejects_unknown_names(
    fresh_compiled_state: None,
) -> None:
    assert get_backend() == "eager"
    with entmax_backend("compiled"):
        assert get_backend() == "compiled"
        with entmax_backend("eager"):
            assert get_backend() == "eager"
        assert get_backend() == "compiled"
    assert get_backend() == "eager"
    with pytest.raises(ValueError, match="name"):
        set_backend("fused")
    with pytest.raises(ValueError, match="name"), entmax_backend("compiled"):
        set_backend("jit")
    assert get_backend() == "eager"


def test_backend_environment_variable_sets_the_initial_backend() -> None:
    code = "from hopfield_aa.normalizers import get_backend; print(get_backend())"
    for value, expected in (("compiled", "compiled"), ("eager", "eager"), ("bogus", "eager")):
        env = {**os.environ, "HOPFIELD_AA_ENTMAX_BACKEND": value}
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert done.stdout.strip() == expected
        assert ("not one of" in done.stderr) == (value == "bogus")


def test_compile_failure_warns_once_and_falls_back_to_the_eager_result(
    fresh_compiled_state: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def broken_compile(*args: object, **kwargs: object) -> object:
        calls.append(1)
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(compiled_backend, "_compiled_kernels", {})
    monkeypatch.setattr(torch, "compile", broken_compile)
    z = _adversarial_float32(77, seed=14)
    eager = _entmax_tensor(z, 1.5)
    with entmax_backend("compiled"):
        with pytest.warns(RuntimeWarning, match="compiled entmax backend is unavailable"):
            first = _entmax_tensor(z, 1.5)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="the compiled entmax backend")  # warned once only
            second = _entmax_tensor(z, 2.0)
    assert len(calls) == 1
    assert torch.equal(first, eager)
    assert torch.equal(second, _entmax_tensor(z, 2.0))


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_rows_failing_the_fused_exactness_test_are_solved_by_the_eager_kernel(
    alpha: float, fresh_compiled_state: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stand-in kernel that writes garbage and marks every third row unsettled: those rows get the
    eager result, the others keep the kernel's output (no compilation involved)."""

    def fake_kernel(
        rows: torch.Tensor, out: torch.Tensor, *extra: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out.fill_(-7.0)
        settled = torch.ones(rows.shape[0], dtype=torch.bool)
        settled[::3] = False
        return torch.full_like(rows[:, :1], 5.0), settled

    monkeypatch.setattr(compiled_backend, "_fused_kernel", lambda: fake_kernel)
    monkeypatch.setattr(compiled_backend, "_FUSED_BLOCK_ELEMENTS", 77 * 50)  # several blocks
    z = _adversarial_float32(77, seed=15)
    eager = _entmax_tensor(z, alpha)
    with entmax_backend("compiled"):
        mixed = _entmax_tensor(z, alpha)
    redo = torch.arange(z.shape[0]) % 50 % 3 == 0  # each block of 50 rows restarts the pattern
    # (the eager solve of those rows alone: for α = 1.5 that tensor is small enough for the sort kernel)
    assert torch.equal(mixed[redo], _entmax_tensor(z[redo], alpha))
    torch.testing.assert_close(mixed[redo], eager[redo], atol=1e-6, rtol=0)
    assert bool((mixed[~redo] == -7.0).all())
