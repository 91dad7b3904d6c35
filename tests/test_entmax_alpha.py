"""α as a tensor (one α per row, head or layer) in hopfield_aa.normalizers: each row equals the float-α
result for its own α, on both solvers (few distinct values: the float-α kernels per group; many: the
batched Newton kernel); ∂p/∂α and ∂Ψ*/∂α against finite differences and gradcheck; α → 1 continuity;
the named errors."""

# mypy: disable-error-code="union-attr,arg-type,operator,index"
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hopfield_aa.normalizers import (
    entmax,
    entmax_conjugate,
    entmax_jacobian,
    entmax_jvp,
    entmax_threshold,
)
from hopfield_aa.normalizers.blocked import _MAX_ALPHA_GROUPS

_f64 = torch.float64
_scores = hnp.arrays(
    np.float64,
    st.tuples(st.integers(1, 24), st.integers(1, 9)),
    elements=st.floats(-4, 4, allow_nan=False, allow_infinity=False),
)
_alpha_value = st.one_of(
    st.sampled_from([1.0, 1.25, 1.5, 2.0, 3.0]), st.floats(1.0, 4.0, allow_nan=False, allow_infinity=False)
)


def _per_row(z: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return torch.stack([entmax(z[i], float(alpha[i])) for i in range(z.shape[0])])


@settings(max_examples=60, deadline=None)
@given(_scores, st.data())
def test_each_row_equals_the_float_alpha_result_for_its_own_alpha(
    scores: np.ndarray, data: st.DataObject
) -> None:
    z = torch.from_numpy(scores)
    values = data.draw(st.lists(_alpha_value, min_size=z.shape[0], max_size=z.shape[0]))
    alpha = torch.tensor(values, dtype=_f64)
    p = entmax(z, alpha)
    assert torch.allclose(p, _per_row(z, alpha), rtol=0, atol=1e-12)
    assert torch.allclose(p.sum(-1), torch.ones(z.shape[0], dtype=_f64), atol=1e-12)


@pytest.mark.parametrize("n_distinct", [3, 4 * _MAX_ALPHA_GROUPS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_both_solvers_match_the_float_path(n_distinct: int, dtype: torch.dtype) -> None:
    """Grouped (few α values, exact 1.5 and 2 included) and batched Newton (many values) paths."""
    gen = torch.Generator().manual_seed(n_distinct)
    z = 3 * torch.randn(200, 33, generator=gen, dtype=dtype)
    z[::7, 20:] = -math.inf  # masked entries
    extra = 1 + 3 * torch.rand(n_distinct, generator=gen)
    pool = torch.cat([torch.tensor([1.0, 1.5, 2.0]), extra])[:n_distinct]
    alpha = pool[torch.randint(0, n_distinct, (200,), generator=gen)].to(dtype)
    assert len(torch.unique(alpha)) > _MAX_ALPHA_GROUPS or n_distinct <= _MAX_ALPHA_GROUPS
    p = entmax(z, alpha)
    ref = _per_row(z, alpha)
    # α > 2: both solvers end on a bracket around a root where Σp jumps (the support edge), ~1e-10
    tol = torch.where(alpha > 2, 1e-9, 1e-12) if dtype == _f64 else torch.full_like(alpha, 2e-6)
    assert bool(((p - ref).abs().amax(-1) <= tol).all())
    assert bool((p[::7, 20:] == 0).all())
    sparse = alpha > 1
    assert bool((p[sparse] == 0).any())  # exact zeros survive on the sparse rows


def test_per_head_alpha_broadcasts_and_keepdim_form() -> None:
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 5, 7, generator=gen, dtype=_f64)  # (B, H, L, N)
    alpha = torch.tensor([1.0, 1.5, 2.7], dtype=_f64)
    p = entmax(z, alpha.view(3, 1))  # one α per head
    for h in range(3):
        assert torch.allclose(p[:, h], entmax(z[:, h], float(alpha[h])), rtol=0, atol=1e-13)
    # the entmax package's convention: the scores' shape with dim of size 1
    assert torch.equal(entmax(z, alpha.view(1, 3, 1, 1).expand(2, 3, 5, 1)), p)
    # another dim: α for the normalised axis 2 has the batch shape (2, 3, 7)
    p2 = entmax(z, alpha.view(3, 1), dim=2)
    for h in range(3):
        assert torch.allclose(p2[:, h], entmax(z[:, h], float(alpha[h]), dim=1), rtol=0, atol=1e-13)
    # NumPy α with NumPy scores: NumPy out
    out = entmax(z.numpy(), alpha.view(3, 1).numpy())
    assert isinstance(out, np.ndarray) and np.allclose(out, p.numpy())


@pytest.mark.parametrize("solver", ["grouped", "newton"])
@pytest.mark.parametrize("dim", [0, 1, 2])
def test_gradcheck_scores_and_alpha(solver: str, dim: int) -> None:
    gen = torch.Generator().manual_seed(dim)
    shape = [6, 5, 4]
    z = torch.randn(*shape, generator=gen, dtype=_f64, requires_grad=True)
    batch = shape[:dim] + shape[dim + 1 :]
    if solver == "grouped":  # three values: the float-α kernels (exact 1.5) per group
        alpha = torch.tensor([1.1, 1.5, 2.3], dtype=_f64)[torch.randint(0, 3, batch, generator=gen)]
    else:  # 20-30 distinct values: the batched Newton kernel
        alpha = 1.05 + 1.6 * torch.rand(*batch, generator=gen, dtype=_f64)
        assert alpha.numel() > _MAX_ALPHA_GROUPS
    alpha.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, a: entmax(x, a, dim), (z, alpha), eps=1e-6, atol=1e-6, fast_mode=True
    )


def test_gradcheck_per_head_alpha_reduces_over_broadcast_axes() -> None:
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(2, 3, 4, 6, generator=gen, dtype=_f64, requires_grad=True)
    alpha = torch.tensor([[1.2], [1.5], [2.0]], dtype=_f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a: entmax(x, a), (z, alpha), eps=1e-6, atol=1e-6)
    (grad,) = torch.autograd.grad(entmax(z, alpha)[..., 0].sum(), alpha)
    assert grad.shape == alpha.shape


@settings(max_examples=40, deadline=None)
@given(_scores, st.data())
def test_alpha_gradient_matches_finite_differences(scores: np.ndarray, data: st.DataObject) -> None:
    z = torch.from_numpy(scores)
    rows = z.shape[0]
    values = data.draw(st.lists(st.floats(1.01, 3.5), min_size=rows, max_size=rows))
    alpha = torch.tensor(values, dtype=_f64, requires_grad=True)
    weights = torch.from_numpy(data.draw(hnp.arrays(np.float64, tuple(z.shape), elements=st.floats(-1, 1))))
    (grad,) = torch.autograd.grad((entmax(z, alpha) * weights).sum(), alpha)
    # central differences: truncation O(h²); a step much below 1e-4 measures the forward solve's own error
    # instead (α = 3, a max and six ties: h = 1e-6 gave −0.2872, h = 1e-4 and 1e-5 −0.29001, the closed form)
    h = 1e-4
    with torch.no_grad():
        plus = (entmax(z, alpha + h) * weights).sum(-1)
        minus = (entmax(z, alpha - h) * weights).sum(-1)
    fd = (plus - minus) / (2 * h)
    # a support change inside [α − h, α + h] is a kink: only rows with the same support on both sides
    same = ((entmax(z, alpha.detach() + h) > 0) == (entmax(z, alpha.detach() - h) > 0)).all(-1)
    assert torch.allclose(grad[same], fd[same], rtol=1e-4, atol=1e-6)


def test_alpha_derivative_sums_to_zero_and_vanishes_on_ties() -> None:
    """Σ_i ∂p_i/∂α = 0; all-equal scores keep p uniform for every α, so ∂p/∂α = 0 there."""
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(6, 8, generator=gen, dtype=_f64)
    z[0] = 0.3
    alpha = torch.tensor([1.7, 1.0, 1.3, 2.0, 2.5, 1.5], dtype=_f64, requires_grad=True)
    jac = torch.autograd.functional.jacobian(lambda a: entmax(z, a), alpha)  # (6, 8, 6)
    per_row = torch.stack([jac[i, :, i] for i in range(6)])
    assert torch.allclose(per_row.sum(-1), torch.zeros(6, dtype=_f64), atol=1e-12)
    assert torch.allclose(per_row[0], torch.zeros(8, dtype=_f64), atol=1e-12)


def test_alpha_to_one_recovers_softmax_continuously() -> None:
    gen = torch.Generator().manual_seed(7)
    z = 2 * torch.randn(4, 10, generator=gen, dtype=_f64)
    soft = torch.softmax(z, -1)
    gaps = []
    for k in range(1, 9):
        alpha = torch.full((4,), 1 + 10.0**-k, dtype=_f64)
        gaps.append(float((entmax(z, alpha) - soft).abs().max()))
    assert all(g2 < g1 for g1, g2 in itertools.pairwise(gaps))
    assert gaps[-1] < 1e-7
    # at α = 1 exactly (in a tensor): softmax itself
    assert torch.allclose(entmax(z, torch.ones(4, dtype=_f64)), soft, rtol=0, atol=1e-15)


def test_alpha_gradient_is_continuous_at_one() -> None:
    """∂p/∂α near α = 1 approaches its limit p (Σ p log²p − log²p)/2, the α = 1 value."""
    gen = torch.Generator().manual_seed(8)
    z = torch.randn(3, 7, generator=gen, dtype=_f64)
    p = torch.softmax(z, -1)
    logp = p.log()
    limit = p * ((p * logp * logp).sum(-1, keepdim=True) - logp * logp) / 2
    prev = math.inf
    for eps in [0.0, 1e-7, 1e-6, 4e-6, 6e-6, 1e-5, 1e-4, 1e-3]:
        rows = []
        for i in range(7):
            alpha = torch.full((3,), 1 + eps, dtype=_f64, requires_grad=True)
            (g,) = torch.autograd.grad(entmax(z, alpha)[:, i].sum(), alpha)
            rows.append(g)
        jac = torch.stack(rows, -1)
        err = float((jac - limit).abs().max())
        assert err <= 5 * max(eps, 1e-6), (eps, err)
        prev = min(prev, err)


def test_threshold_jacobian_jvp_conjugate_per_row() -> None:
    gen = torch.Generator().manual_seed(9)
    z = torch.randn(5, 6, generator=gen, dtype=_f64)
    alpha = torch.tensor([1.0, 1.3, 1.5, 2.0, 2.6], dtype=_f64)
    v = torch.randn(5, 6, generator=gen, dtype=_f64)
    p = entmax(z, alpha)
    for i in range(5):
        a = float(alpha[i])
        assert torch.allclose(entmax_threshold(z, alpha.view(5, 1))[i], entmax_threshold(z[i], a), atol=1e-12)
        assert torch.allclose(entmax_jacobian(z, alpha)[i], entmax_jacobian(z[i], a), atol=1e-12)
        assert torch.allclose(entmax_jvp(p, v, alpha)[i], entmax_jvp(p[i], v[i], a), atol=1e-12)
        assert torch.allclose(entmax_conjugate(z, alpha)[i], entmax_conjugate(z[i], a), atol=1e-12)


def test_conjugate_gradcheck_in_scores_and_alpha() -> None:
    gen = torch.Generator().manual_seed(10)
    z = torch.randn(5, 6, generator=gen, dtype=_f64, requires_grad=True)
    alpha = torch.tensor([1.05, 1.3, 1.5, 2.0, 2.6], dtype=_f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a: entmax_conjugate(x, a), (z, alpha), eps=1e-6, atol=1e-6)


def test_shared_tensor_alpha_takes_the_float_path() -> None:
    z = torch.randn(4, 9, dtype=_f64)
    assert torch.equal(entmax(z, torch.tensor(1.5, dtype=_f64)), entmax(z, 1.5))
    assert torch.equal(entmax(z, torch.full((4,), 2.0, dtype=_f64)), entmax(z, 2.0))


@pytest.mark.parametrize(
    ("alpha", "error", "match"),
    [
        (torch.tensor([1.5, 0.9]), ValueError, "alpha must be >= 1"),
        (torch.tensor([1.5, float("nan")]), ValueError, "alpha must be finite"),
        (torch.tensor([1.5, float("inf")]), ValueError, "alpha must be finite"),
        (torch.tensor([1.5, 1.2, 1.1]), ValueError, "alpha of shape"),
        (torch.tensor([True, False]), TypeError, "alpha must be a real tensor"),
        (np.array([1.5, 0.5]), ValueError, "alpha must be >= 1"),
    ],
)
def test_bad_tensor_alpha_is_a_named_error(alpha: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        entmax(torch.zeros(2, 4), alpha)


def test_half_precision_with_tensor_alpha() -> None:
    z = torch.randn(6, 10)
    alpha = torch.tensor([1.0, 1.2, 1.5, 2.0, 2.5, 3.0])
    p = entmax(z.half(), alpha)
    assert p.dtype == torch.float16
    assert torch.allclose(p.float(), entmax(z.half().float(), alpha), atol=1e-3)


@settings(max_examples=40, deadline=None)
@given(_scores, st.floats(1e-9, 1e-2))
def test_alpha_near_one_is_softmax_to_first_order(scores: np.ndarray, eps: float) -> None:
    """|entmax_{1+ε}(z) − softmax(z)| ≤ C ε per entry, and ∂p/∂α at 1 + ε is within C ε of its α = 1
    limit p (Σ p log²p − log²p)/2 (scores in [−4, 4], at most 9 entries: C = 10 is generous)."""
    z = torch.from_numpy(scores)
    soft = torch.softmax(z, -1)
    alpha = torch.full((z.shape[0],), 1 + eps, dtype=_f64, requires_grad=True)
    p = entmax(z, alpha)
    assert float((p.detach() - soft).abs().max()) <= 10 * eps + 1e-12
    logp = soft.log()
    limit = soft * ((soft * logp * logp).sum(-1, keepdim=True) - logp * logp) / 2
    weights = torch.linspace(-1, 1, z.shape[1], dtype=_f64)
    (grad,) = torch.autograd.grad((p * weights).sum(), alpha)
    assert torch.allclose(grad, (limit * weights).sum(-1), rtol=0, atol=10 * eps + 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("alpha", [1.1, 1.3, 1.75])
def test_newton_mass_is_exactly_zero_off_the_support_and_the_plain_formula_within_two_tiny_on_it(
    dtype: torch.dtype, alpha: float
) -> None:
    """``newton._mass`` clamps its exponent at log(tiny) + 1/2 (exp's slow path is never taken): entries
    with x = −1 (off the support) are exact zeros, and every entry differs from the plain
    exp(log1p(x)/(α−1)) by at most 2 exp(log(tiny) + 1/2), far below one ulp of any normal p."""
    from hopfield_aa.normalizers import newton

    gen = torch.Generator().manual_seed(3)
    z = (4 * torch.randn(64, 77, generator=gen, dtype=dtype)).sub_(4.0)
    z[:, -3:] = -math.inf
    z = z - z.amax(-1, keepdim=True)
    am1 = alpha - 1.0
    lam = torch.full_like(z[:, :1], 0.5)
    p, x, q = torch.empty_like(z), torch.empty_like(z), torch.empty_like(z)
    mass = newton._mass(z * am1, lam, am1, p, x, q)
    plain = torch.exp(torch.log1p(x) * (1.0 / am1))  # the same x = max((α−1)(z − λ), −1)
    off = x == -1.0
    assert bool(off.any()) and bool((~off).any())
    assert bool((p[off] == 0).all())
    floor = math.log(torch.finfo(dtype).tiny) + 0.5
    assert (p - plain).abs().max().item() <= 2 * math.exp(floor)
    torch.testing.assert_close(mass, plain.sum(-1, keepdim=True), rtol=4 * torch.finfo(dtype).eps, atol=0)
