"""Properties of Anderson acceleration (THEORY.md §4): GMRES equivalence, AA(1) = extrapolation,
plain iteration at m = 0, batch independence, the safeguard, stability, input checks, the solver as a
state with init/step/terminate, and the result and tolerance it shares with iterate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hopfield_aa.anderson import AndersonConfig, anderson, anderson_step, spectral_radius

F64 = torch.float64


def _affine(seed: int, n: int, rho: float, normal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A random A with spectral radius ``rho`` (symmetric or not) and a random b."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=gen, dtype=F64)
    if normal:
        a = a + a.T
    a = a * (rho / torch.linalg.eigvals(a).abs().max())
    return a, torch.randn(n, generator=gen, dtype=F64)


def _gmres_iterates(
    m_mat: torch.Tensor, rhs: torch.Tensor, x0: torch.Tensor, k_max: int
) -> list[torch.Tensor]:
    """x_k = argmin ‖rhs − M x‖ over x ∈ x0 + span{r0, M r0, …, M^{k−1} r0} (k = 0..k_max)."""
    r0 = rhs - m_mat @ x0
    out, basis = [x0], []
    v = r0
    for _ in range(k_max):
        basis.append(v)
        q, _ = torch.linalg.qr(torch.stack(basis, dim=1))
        y = torch.linalg.lstsq(m_mat @ q, r0[:, None]).solution[:, 0]
        out.append(x0 + q @ y)
        v = m_mat @ v
    return out


def _hopfield(beta: float, n_patterns: int = 64, dim: int = 32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.randn(n_patterns, dim, generator=gen, dtype=F64)
    patterns = patterns / patterns.norm(dim=1, keepdim=True)

    def retrieve(xi: torch.Tensor) -> torch.Tensor:
        return torch.softmax(beta * xi @ patterns.T, dim=-1) @ patterns

    def top_eigenvalue(xi: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(beta * xi @ patterns.T, dim=-1)
        jac = beta * patterns.T @ (torch.diag_embed(p) - p[..., :, None] * p[..., None, :]) @ patterns
        return torch.linalg.eigvalsh(jac)[..., -1]

    return patterns, retrieve, top_eigenvalue


# ---------------------------------------------------------------------------------------------------
# Walker & Ni: untruncated AA on an affine map is GMRES on (I − A) x = b


@settings(max_examples=15)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(3, 9),
    rho=st.floats(0.1, 0.95),
    normal=st.booleans(),
)
@example(seed=0, n=9, rho=0.95, normal=False)
def test_untruncated_aa_on_affine_map_equals_gmres(seed: int, n: int, rho: float, normal: bool) -> None:
    """x^AA_{k+1} = g(x^GMRES_k) for untruncated AA(∞), b = 1, started at the same x0."""
    a, c = _affine(seed, n, rho, normal)
    x0 = torch.zeros(1, n, dtype=F64)
    k_max = n - 1
    seen: list[torch.Tensor] = []
    anderson(
        lambda x: x @ a.T + c,
        x0,
        m=n + 2,
        safeguard=False,
        tol=0.0,
        max_iter=k_max,
        restart_cond=1e30,
        callback=lambda k, x, r: seen.append(x[0].clone()),
    )
    gmres = _gmres_iterates(torch.eye(n, dtype=F64) - a, c, x0[0], k_max - 1)
    scale = 1.0 + float(torch.linalg.solve(torch.eye(n, dtype=F64) - a, c).norm())
    for k, x_gm in enumerate(gmres):
        if k + 1 > len(seen):
            break  # converged to the rounding floor before the last step
        assert torch.allclose(seen[k], a @ x_gm + c, atol=1e-7 * scale, rtol=0), k


@given(seed=st.integers(0, 10_000), n=st.integers(2, 40), rho=st.floats(0.0, 0.95), m=st.integers(0, 6))
def test_aa_on_affine_contraction_converges_to_the_linear_solution(
    seed: int, n: int, rho: float, m: int
) -> None:
    """Every depth finds x* = (I − A)⁻¹ b of an affine contraction, and stops at ‖f‖ ≤ tol ‖f_0‖."""
    a, c = (t.numpy() for t in _affine(seed, n, rho, normal=True))
    res = anderson(lambda x: x @ a.T + c, np.zeros((2, n)), m=m, tol=1e-10, max_iter=2000)
    x_star = np.linalg.solve(np.eye(n) - a, c)
    assert isinstance(res.x, np.ndarray) and res.x.shape == (2, n)
    assert bool(res.converged.all())
    assert np.allclose(res.x, x_star[None], atol=1e-8 * (1 + np.linalg.norm(x_star)) / max(1e-3, 1 - rho))
    final = res.residual_norms[-1]
    assert bool((final <= 1e-10 * res.residual_norms[0] + 16 * 2.3e-16 * np.linalg.norm(x_star) * 2).all())


# ---------------------------------------------------------------------------------------------------
# The single step: extrapolation is AA(1), least-squares γ in closed form


@given(
    seed=st.integers(0, 10_000),
    lam=st.floats(-5.0, 5.0),
    shape=st.sampled_from([(3,), (2, 5), (2, 3, 7)]),
    mixing=st.sampled_from([1.0]),
)
@example(seed=0, lam=1.0, shape=(3,), mixing=1.0)
def test_aa1_with_gamma_one_minus_lambda_is_extrapolation(
    seed: int, lam: float, shape: tuple, mixing: float
) -> None:
    """AA₁(xs=[ξ, ξ], gs=[D, S]; γ = 1 − λ) = D + λ (S − D) on every head/token (Prop 3.2)."""
    gen = torch.Generator().manual_seed(seed)
    xi, dense, sparse = (torch.randn(shape, generator=gen, dtype=F64) for _ in range(3))
    step = anderson_step([xi, xi], [dense, sparse], gamma=1.0 - lam, mixing=mixing)
    assert torch.allclose(step, dense + lam * (sparse - dense), atol=1e-12, rtol=1e-12)
    per_head = anderson_step(
        torch.stack([xi, xi]), torch.stack([dense, sparse]), gamma=torch.full((*shape[:-1], 1), 1.0 - lam)
    )
    assert torch.allclose(per_head, step, atol=1e-12)


@given(
    seed=st.integers(0, 10_000), shape=st.sampled_from([(4,), (3, 6), (2, 2, 5)]), mixing=st.floats(0.1, 1.5)
)
def test_depth_one_least_squares_gamma_has_the_closed_form(seed: int, shape: tuple, mixing: float) -> None:
    """γ* = ⟨f_1, f_1 − f_0⟩ / ‖f_1 − f_0‖² and x₊ = x_1 − γ Δx + b (f_1 − γ Δf)."""
    gen = torch.Generator().manual_seed(seed)
    x0, x1, g0, g1 = (torch.randn(shape, generator=gen, dtype=F64) for _ in range(4))
    step, gamma = anderson_step([x0, x1], [g0, g1], mixing=mixing, return_gamma=True)
    f0, f1 = g0 - x0, g1 - x1
    closed = ((f1 * (f1 - f0)).sum(-1) / ((f1 - f0) ** 2).sum(-1))[..., None]
    assert torch.allclose(gamma, closed, rtol=1e-9, atol=1e-12)
    expected = x1 - closed * (x1 - x0) + mixing * (f1 - closed * (f1 - f0))
    assert torch.allclose(step, expected, rtol=1e-9, atol=1e-12)


def test_equal_dense_and_sparse_give_gamma_zero_and_a_finite_step() -> None:
    """S = D: the difference column is zero, so γ = 0 by convention and the step is S itself."""
    xi = torch.randn(2, 3, 8, dtype=F64)
    same = torch.randn(2, 3, 8, dtype=F64)
    step, gamma = anderson_step([xi, xi], [same, same.clone()], return_gamma=True)
    assert torch.equal(gamma, torch.zeros(2, 3, 1, dtype=F64))
    assert torch.allclose(step, same, atol=0)


def test_anderson_step_keeps_numpy_and_float32() -> None:
    xs = np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float32)
    gs = np.random.default_rng(1).standard_normal((3, 4, 5)).astype(np.float32)
    out = anderson_step(xs, gs)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (4, 5)
    assert np.isfinite(out).all()


def test_dependent_columns_are_dropped_not_propagated_as_nan() -> None:
    """Two equal difference columns (a singular Gram matrix) still give a finite least-squares step."""
    x = torch.randn(3, 6, dtype=F64, generator=torch.Generator().manual_seed(0))
    xs = [x[0], x[1], x[1] + (x[1] - x[0])]
    gs = [2 * v for v in xs]
    out, gamma = anderson_step(xs, gs, return_gamma=True)
    assert torch.isfinite(out).all() and torch.isfinite(gamma).all()
    # both columns span the same line, so the step is the depth-1 step on that line
    assert torch.allclose(out, anderson_step(xs[1:], gs[1:]), atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# m = 0 is plain (damped) iteration, bit for bit


@pytest.mark.parametrize("mixing", [1.0, 0.5])
def test_depth_zero_is_plain_damped_iteration_bit_for_bit(mixing: float) -> None:
    """m = 0: x_{k+1} = x_k + b (g(x_k) − x_k), and exactly g(x_k) for b = 1."""
    _, retrieve, _ = _hopfield(beta=4.0)
    x0 = torch.randn(16, 32, generator=torch.Generator().manual_seed(1), dtype=F64) / 6
    seen: list[torch.Tensor] = []
    res = anderson(
        retrieve,
        x0,
        m=0,
        mixing=mixing,
        tol=0.0,
        max_iter=25,
        callback=lambda k, x, r: seen.append(x.clone()),
    )
    x = x0.clone()
    for k, got in enumerate(seen):
        x = retrieve(x) if mixing == 1.0 else x + mixing * (retrieve(x) - x)
        assert torch.equal(got, x), k
    assert len(seen) == 25 and int(res.n_evals.max()) == 26


# ---------------------------------------------------------------------------------------------------
# Rows are independent problems


def test_batch_solution_equals_each_row_solved_alone() -> None:
    _, retrieve, _ = _hopfield(beta=7.5)
    x0 = torch.randn(12, 32, generator=torch.Generator().manual_seed(3), dtype=F64) / 6
    batch = anderson(retrieve, x0, m=5)
    for i in range(12):
        alone = anderson(retrieve, x0[i : i + 1], m=5)
        assert torch.allclose(batch.x[i], alone.x[0], atol=1e-12), i
        assert int(batch.n_evals[i]) == int(alone.n_evals[0])
        assert int(batch.n_iter[i]) == int(alone.n_iter[0])


def test_nan_row_and_singular_row_do_not_affect_the_others() -> None:
    """Row 0: g returns NaN there; row 1: g(x) = x + 1 has no fixed point (ΔF = 0, singular)."""
    a, c = _affine(5, 6, 0.8, normal=True)

    def g(x: torch.Tensor) -> torch.Tensor:
        out = x @ a.T + c
        out = torch.where(x[:, :1] < -50, torch.full_like(out, float("nan")), out)
        return torch.where(x[:, 1:2] > 50, x + 1.0, out)

    x0 = torch.zeros(5, 6, dtype=F64)
    x0[0, 0], x0[1, 1] = -100.0, 100.0
    res = anderson(g, x0, m=3, max_iter=60)
    clean = anderson(g, x0[2:], m=3, max_iter=60)
    assert bool(res.failed[0]) and not bool(res.converged[0])
    assert torch.isfinite(res.x).all()  # the failed row keeps its last finite iterate
    assert not bool(res.converged[1]) and not bool(res.failed[1])
    assert bool(res.converged[2:].all())
    assert torch.allclose(res.x[2:], clean.x, atol=1e-13)
    assert "failed" in res.message


@pytest.mark.parametrize("row_subsets", [False, True])
def test_converged_rows_stop_changing_and_are_frozen_by_masking_or_skipped(row_subsets: bool) -> None:
    """By default g always receives x0's shape and a converged row is passed at its final value (its new
    value discarded); with row_subsets=True only the active rows are passed. Same iterates either way."""
    a, c = _affine(7, 10, 0.9, normal=False)
    x_star = torch.linalg.solve(torch.eye(10, dtype=F64) - a, c)
    sizes: list[int] = []

    def g(x: torch.Tensor) -> torch.Tensor:
        sizes.append(x.shape[0])
        return x @ a.T + c

    x0 = torch.randn(4, 10, generator=torch.Generator().manual_seed(1), dtype=F64)
    x0[0] = x_star  # converged before the first step
    x0[1] = x_star + 1e-3 * torch.randn(10, generator=torch.Generator().manual_seed(2), dtype=F64)
    seen: list[torch.Tensor] = []
    res = anderson(g, x0, m=2, row_subsets=row_subsets, callback=lambda k, x, r: seen.append(x.clone()))
    assert int(res.n_iter[0]) == 0 and int(res.n_evals[0]) == 1
    for i in range(4):
        k_i = int(res.n_iter[i])
        for later in seen[k_i:]:
            assert torch.equal(later[i], seen[-1][i])
    assert sizes[0] == 4 and len(sizes) == res.n_calls
    if row_subsets:
        assert min(sizes) < 4  # only active rows are passed to g
        assert int(res.n_evals.sum()) == sum(sizes)
    else:
        assert set(sizes) == {4}  # x0's shape every time
        assert int(res.n_evals.sum()) < sum(sizes)  # the frozen rows' values are not used
        other = anderson(g, x0, m=2, row_subsets=True)
        # (not bit for bit: a matrix product over fewer rows may round differently)
        torch.testing.assert_close(res.x, other.x, atol=1e-12, rtol=0)
        assert torch.equal(res.n_iter, other.n_iter)


def test_scipy_style_map_of_one_vector_solves_the_affine_problem() -> None:
    """Issue 12 (contract of issue 11): g receives arrays of x0's shape, as in scipy, so a map written
    for one vector works with a 1-D x0; before, g got (1, n) and `A @ x` failed inside the lambda."""
    gen = np.random.default_rng(0)
    n = 6
    a = gen.standard_normal((n, n))
    a *= 0.9 / np.abs(np.linalg.eigvals(a)).max()
    b = gen.standard_normal(n)
    shapes: list[tuple[int, ...]] = []

    def g(x: np.ndarray) -> np.ndarray:
        shapes.append(x.shape)
        return a @ x + b

    res = anderson(g, np.zeros(n), tol=1e-12)
    assert set(shapes) == {(n,)}
    assert res.success and isinstance(res.x, np.ndarray) and res.x.shape == (n,)
    assert isinstance(res.converged, np.ndarray) and res.converged.shape == () and res.nit == res.n_iter
    np.testing.assert_allclose(res.x, np.linalg.solve(np.eye(n) - a, b), atol=1e-10)
    # the same with torch, and with the stability test (which also calls g on one vector)
    at, bt = torch.from_numpy(a), torch.from_numpy(b)
    res_t = anderson(lambda x: at @ x + bt, torch.zeros(n, dtype=F64), stability_check=True)
    assert res_t.success and bool(res_t.stable) and float(res_t.spectral_radius) < 1
    torch.testing.assert_close(res_t.x, torch.from_numpy(np.linalg.solve(np.eye(n) - a, b)))
    # a map that holds per-row data: rows of x0 are matched with rows of the map's own arrays
    offsets = torch.arange(3, dtype=F64)[:, None]
    per_row = anderson(lambda x: 0.5 * x + offsets, torch.zeros(3, 2, dtype=F64), tol=1e-12)
    torch.testing.assert_close(per_row.x, (2 * offsets).expand(3, 2))


def test_empty_batch_returns_without_calling_g() -> None:
    def g(x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("g must not be called on an empty batch")

    res = anderson(g, torch.zeros(0, 3), stability_check=True)
    assert res.x.shape == (0, 3) and res.converged.shape == (0,) and res.n_calls == 0 and res.success


def test_leading_shape_is_restored_and_numpy_map_receives_numpy() -> None:
    a, c = _affine(9, 5, 0.7, normal=True)
    an, cn = a.numpy(), c.numpy()
    x0 = np.zeros((2, 3, 5))
    res = anderson(lambda x: x @ an.T + cn, x0, m=3)
    assert (
        res.x.shape == (2, 3, 5) and res.converged.shape == (2, 3) and res.residual_norms.shape[1:] == (2, 3)
    )
    assert np.allclose(res.x, np.linalg.solve(np.eye(5) - an, cn), atol=1e-8)
    single = anderson(lambda x: x @ an.T + cn, np.zeros(5), m=3)
    assert single.x.shape == (5,) and single.converged.shape == ()


def test_float32_converges_at_its_rounding_floor() -> None:
    _, retrieve64, _ = _hopfield(beta=4.0)
    patterns = _hopfield(beta=4.0)[0].float()
    x0 = torch.randn(32, 32, generator=torch.Generator().manual_seed(4)) / 6
    res = anderson(lambda x: torch.softmax(4.0 * x @ patterns.T, -1) @ patterns, x0, m=5)
    assert res.x.dtype == torch.float32 and bool(res.converged.all())
    ref = anderson(retrieve64, x0.double(), m=5)
    assert torch.allclose(res.x.double(), ref.x, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Safeguard and stability


@pytest.mark.parametrize("m", [1, 5])
def test_safeguard_never_accepts_a_step_worse_than_both_the_current_and_the_plain_residual(m: int) -> None:
    """With the safeguard, every accepted iterate has ‖f_{k+1}‖ ≤ max(‖f_k‖, ‖f(x_k + b f_k)‖)."""
    _, retrieve, _ = _hopfield(beta=7.5)
    patterns = _hopfield(beta=7.5)[0]
    gen = torch.Generator().manual_seed(5)
    x0 = (
        patterns[torch.randint(0, 64, (32,), generator=gen)]
        + 0.5 * torch.randn(32, 32, generator=gen, dtype=F64) / 32**0.5
    )
    xs: list[torch.Tensor] = [x0.clone()]
    norms: list[torch.Tensor] = [(retrieve(x0) - x0).norm(dim=1)]
    res = anderson(
        retrieve, x0, m=m, callback=lambda k, x, r: (xs.append(x.clone()), norms.append(r.clone()))
    )
    assert int(res.n_rejected.sum()) > 0  # the safeguard is exercised on this data
    for k in range(1, len(xs)):
        plain = xs[k - 1] + (retrieve(xs[k - 1]) - xs[k - 1])
        bound = torch.maximum(norms[k - 1], (retrieve(plain) - plain).norm(dim=1))
        assert bool((norms[k] <= bound * (1 + 1e-12)).all()), k


def test_past_the_retrieval_threshold_every_row_reaches_the_stable_fixed_point_of_plain_iteration() -> None:
    """β = 7.5, N = 64 patterns in d = 32: AA ends where plain iteration ends, at ρ(J) < 1."""
    patterns, retrieve, top = _hopfield(beta=7.5)
    gen = torch.Generator().manual_seed(0)
    x0 = (
        patterns[torch.randint(0, 64, (64,), generator=gen)]
        + 0.5 * torch.randn(64, 32, generator=gen, dtype=F64) / 32**0.5
    )
    plain = x0.clone()
    for _ in range(800):
        plain = retrieve(plain)
    for stability_check in (False, True):
        res = anderson(retrieve, x0, m=5, stability_check=stability_check, max_iter=1000)
        assert bool(res.converged.all()), res.message
        assert bool((top(res.x) < 1).all())
        assert torch.allclose(res.x, plain, atol=1e-6)
        if stability_check:
            assert res.stable is not None and bool(res.stable.all())


def test_stability_check_leaves_a_saddle_that_plain_aa_converges_to() -> None:
    """Started at an unstable fixed point, the check perturbs along the unstable direction."""
    # g(x) = x + 0.5 x (1 − x²) per coordinate: fixed points 0 (unstable, g' = 1.5) and ±1 (stable)
    g = lambda x: x + 0.5 * x * (1 - x**2)  # noqa: E731
    x0 = torch.zeros(3, 2, dtype=F64)
    x0[:, 1] = 1.0
    plain_aa = anderson(g, x0, m=3)
    assert bool(plain_aa.converged.all()) and float(plain_aa.x[:, 0].abs().max()) == 0.0
    checked = anderson(g, x0, m=3, stability_check=True)
    assert checked.stable is not None and bool(checked.stable.all())
    assert torch.allclose(checked.x.abs(), torch.ones_like(checked.x), atol=1e-7)
    assert bool((checked.n_restarts >= 1).all())


@settings(max_examples=4)
@given(seed=st.integers(0, 1000), beta=st.sampled_from([2.0, 4.0, 7.5, 20.0]))
def test_spectral_radius_of_the_hopfield_jacobian_matches_its_top_eigenvalue(seed: int, beta: float) -> None:
    """J = β Xᵀ (diag p − p pᵀ) X is symmetric PSD: power iteration finds its largest eigenvalue."""
    _, retrieve, top = _hopfield(beta=beta)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(seed), dtype=F64) / 4
    exact = top(x)
    for method in ("jvp", "fd"):
        est = spectral_radius(retrieve, x, method=method, n_iter=300, rtol=1e-8)
        assert torch.allclose(est, exact, rtol=2e-3, atol=1e-6), method


# ---------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"m": -1}, ValueError, "m"),
        ({"m": 1.5}, TypeError, "m"),
        ({"mixing": 0.0}, ValueError, "mixing"),
        ({"mixing": -1.0}, ValueError, "mixing"),
        ({"regularization": -1e-3}, ValueError, "regularization"),
        ({"max_iter": 0}, ValueError, "max_iter"),
    ],
)
def test_bad_parameters_raise_naming_the_argument(kwargs: dict, error: type, name: str) -> None:
    with pytest.raises(error, match=name):
        anderson(lambda x: 0.5 * x, torch.ones(2, 3), **kwargs)


def test_bad_x0_and_bad_maps_raise_naming_the_argument() -> None:
    with pytest.raises(ValueError, match="x0"):
        anderson(lambda x: 0.5 * x, torch.tensor([1.0, float("nan")]))
    with pytest.raises(TypeError, match="x0"):
        anderson(lambda x: 0.5 * x, [1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="g"):
        anderson(lambda x: x[:, :2], torch.ones(2, 3))
    with pytest.raises(TypeError, match="g"):
        anderson(lambda x: x.tolist(), torch.ones(2, 3))
    with pytest.raises(TypeError, match="g"):
        anderson("not callable", torch.ones(2, 3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="xs"):
        anderson_step([torch.ones(3)], [torch.ones(3)])
    with pytest.raises(ValueError, match="gamma"):
        anderson_step([torch.ones(3)] * 3, [torch.ones(3)] * 3, gamma=torch.ones(3))


def test_config_fields_are_the_solver_keywords() -> None:
    import dataclasses

    config = AndersonConfig(m=3, stability_check=True)
    res = anderson(lambda x: 0.5 * x + 1.0, torch.zeros(2, 4, dtype=F64), **dataclasses.asdict(config))
    assert bool(res.converged.all()) and res.stable is not None and bool(res.stable.all())


def test_solver_with_a_maintained_gram_matrix_equals_the_recomputed_one() -> None:
    """_solve_gamma with ΔFᵀΔF passed in (the solver keeps it column by column) gives the same γ."""
    from hopfield_aa.anderson import _solve_gamma

    gen = torch.Generator().manual_seed(5)
    d_f = torch.randn(16, 4, 9, generator=gen, dtype=F64)
    d_f[3, 2] = d_f[3, 1]  # a dependent column: the retry path
    f = torch.randn(16, 9, generator=gen, dtype=F64)
    valid = torch.rand(16, 4, generator=gen) < 0.8
    valid[3] = True
    raw = d_f @ d_f.transpose(-1, -2)
    for lam in (0.0, 1e-3):
        got = _solve_gamma(d_f, f, valid, lam, 1e12, raw=raw)
        want = _solve_gamma(d_f, f, valid, lam, 1e12)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
        if lam == 0.0:
            assert not bool(got[1][3]), "the dependent column must be reported as ill-conditioned"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_least_squares_equals_the_tensor_one_on_hard_rows(dtype: torch.dtype, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """_solve_gamma's native form (CPU, row by row in float64) gives the γ, conditioning and finiteness of
    its tensor form (the one other devices run): random rows, a dependent column, a zero column, unused
    columns, a NaN right-hand side, huge and tiny scales, with and without regularisation."""
    from hopfield_aa import _jit
    from hopfield_aa.anderson import _solve_gamma

    gen = torch.Generator().manual_seed(6)
    d_f = torch.randn(64, 5, 12, generator=gen, dtype=F64)
    d_f[1, 3] = d_f[1, 0]  # dependent: the second solve
    d_f[2, 1] = 0.0  # zero column
    d_f[3, 2] = d_f[3, 1] + 1e-9 * d_f[3, 4]  # nearly dependent
    d_f[4:8] *= 1e6
    d_f[8:12] *= 1e-6
    f = torch.randn(64, 12, generator=gen, dtype=F64)
    f[5, 0] = math.nan
    valid = torch.rand(64, 5, generator=gen) < 0.85
    valid[:4] = True
    d_f, f = d_f.to(dtype), f.to(dtype)
    for lam in (0.0, 1e-4):
        for cond in (1e12 if dtype == F64 else 1e6, 1e4):
            native = _solve_gamma(d_f, f, valid, lam, cond)
            with _jit.disabled():
                tensor = _solve_gamma(d_f, f, valid, lam, cond)
                exact = _solve_gamma(d_f.double(), f.double(), valid, lam, cond)[0]
            assert torch.equal(native[1], tensor[1]) and torch.equal(native[2], tensor[2])
            assert bool((native[0][~valid] == 0).all()) and bool((native[0][5] == 0).all())
            # per row, relative to its largest |γ|: within 1e-7 of the tensor form in float64; in float32
            # at least as close to the float64 γ as the tensor form is (both are limited by conditioning)
            size = exact.abs().amax(-1) + 1e-30
            err_native = (native[0].double() - exact).abs().amax(-1) / size
            err_tensor = (tensor[0].double() - exact).abs().amax(-1) / size
            bound = 1e-7 if dtype == F64 else 1e-6
            assert bool((err_native <= torch.maximum(err_tensor, torch.full_like(err_tensor, bound))).all())
            if lam == 0.0:
                assert not bool(native[1][1]), "the dependent column must be reported as ill-conditioned"


@pytest.mark.parametrize("problem", ["hopfield beta=4", "hopfield beta=7.5", "affine mixing 0.5"])
def test_native_and_tensor_solvers_reach_the_same_fixed_points(problem: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The solver's native kernels (least squares, norms, mixed step, Gram column, acceptance test) and
    their tensor forms compute the same iteration up to rounding: the same rows converge to the same
    fixed points, in about as many steps, with the same stability verdicts."""
    from hopfield_aa import _jit

    gen = torch.Generator().manual_seed(13)
    kwargs: dict = {"m": 5, "tol": 1e-10, "max_iter": 300}
    if problem.startswith("hopfield"):
        _, g, _ = _hopfield(beta=7.5 if "7.5" in problem else 4.0)
        x0 = torch.randn(64, 32, generator=gen, dtype=F64) / 4
        kwargs["stability_check"] = True
    else:
        a, b = _affine(3, 40, 0.95, normal=False)

        def g(x: torch.Tensor) -> torch.Tensor:
            return x @ a.T + b

        x0 = torch.randn(32, 40, generator=gen, dtype=F64)
        kwargs["mixing"] = 0.5
    native = anderson(g, x0.clone(), **kwargs)
    with _jit.disabled():
        tensor = anderson(g, x0.clone(), **kwargs)
    assert torch.equal(native.converged, tensor.converged) and torch.equal(native.failed, tensor.failed)
    torch.testing.assert_close(native.x, tensor.x, atol=1e-8, rtol=0)
    assert bool(((native.nit - tensor.nit).abs() <= 3).all())
    if native.stable is not None:
        assert torch.equal(native.stable, tensor.stable)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("native", [True, False])
def test_common_case_step_computes_the_general_step_bit_for_bit_with_either_least_squares(
    native: bool, dtype: torch.dtype, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """The bit-for-bit agreement of the common and general steps holds with the native kernels (least
    squares, norms, mixed step, Gram column, acceptance test) and with their tensor forms (what other
    devices run)."""
    import sys

    from hopfield_aa import _jit

    aa = sys.modules["hopfield_aa.anderson"]
    monkeypatch.setattr(_jit, "_enabled", native)
    _, g, _ = _hopfield(beta=7.5)
    x0 = torch.randn(64, 32, generator=torch.Generator().manual_seed(12), dtype=F64) / 4
    kwargs: dict = {"m": 5, "tol": 1e-10 if dtype == F64 else 1e-5, "max_iter": 300, "stability_check": True}
    if dtype != F64:
        g64 = g

        def g(x: torch.Tensor) -> torch.Tensor:
            return g64(x.double()).to(dtype)

        x0 = x0.to(dtype)
        kwargs["mixing"] = 0.5
    fast = anderson(g, x0.clone(), **kwargs)
    monkeypatch.setattr(aa, "_COMMON_PATH", False)
    general = anderson(g, x0.clone(), **kwargs)
    for name, value in _result_fields(general).items():
        got = _result_fields(fast)[name]
        assert torch.equal(got.nan_to_num(7.0), value.nan_to_num(7.0)), f"field {name} differs"


def test_solver_state_init_step_terminate_drives_to_the_same_result_as_anderson() -> None:
    """The public loop is init, then step until terminate: driving it by hand gives anderson's iterates."""
    from hopfield_aa._arrays import as_tensor
    from hopfield_aa.anderson import AndersonSolver, _default_restart_cond, _Map

    _, retrieve, _ = _hopfield(beta=7.5)
    x0 = torch.randn(8, 32, generator=torch.Generator().manual_seed(6), dtype=F64) / 6
    want = anderson(retrieve, x0, m=3, tol=1e-10)
    kind = as_tensor(x0, "x0")[1]
    fmap = _Map(retrieve, kind, tuple(x0.shape), x0.device)
    solver = AndersonSolver(
        fmap,
        m=3,
        mixing=1.0,
        regularization=0.0,
        tol=1e-10,
        safeguard=True,
        restart_cond=_default_restart_cond(F64),
        stability_check=False,
        max_stability_restarts=2,
        stability_iters=30,
    )
    state = solver.init(x0)
    while not solver.terminate(state):
        state = solver.step(state)
    got = solver.result(state, x0.shape, kind, max_iter=500)
    assert torch.equal(got.x, want.x) and torch.equal(got.nit, want.nit) and got.success
    assert state.k == int(want.nit.max()) and bool(state.converged.all())


def test_anderson_and_iterate_share_one_result_type_with_scipy_field_names() -> None:
    """x, success, nit, message as in scipy's OptimizeResult; the earlier names are aliases."""
    from hopfield_aa import IterateResult, iterate
    from hopfield_aa.anderson import AndersonResult, FixedPointResult

    assert AndersonResult is FixedPointResult and IterateResult is FixedPointResult
    memory = np.eye(3)
    for out in (
        anderson(lambda x: 0.5 * x + 1.0, np.zeros((2, 3))),
        iterate(np.array([0.9, 0.2, 0.1]), memory, 5.0),
        iterate(np.array([0.9, 0.2, 0.1]), memory, 5.0, accelerate=2),
    ):
        assert isinstance(out, FixedPointResult) and out.success is True and isinstance(out.message, str)
        assert isinstance(out.x, np.ndarray) and isinstance(out.nit, np.ndarray)
        assert out.state is out.x and out.n_iter is out.nit and out.history is out.residual_norms
        assert out.residual_norms.shape[0] == int(out.nit.max()) + 1


@pytest.mark.parametrize("accelerate", [None, 3])
def test_tol_means_one_thing_in_anderson_and_in_plain_and_accelerated_iterate(accelerate) -> None:  # type: ignore[no-untyped-def]
    """Every solver stops a row at ‖g(x) − x‖ ≤ tol ‖g(x0) − x0‖ (or the rounding floor), no earlier."""
    from hopfield_aa import iterate, retrieve

    gen = torch.Generator().manual_seed(4)
    memory = torch.nn.functional.normalize(torch.randn(16, 8, generator=gen, dtype=F64), dim=-1)
    states = 0.3 * torch.randn(6, 8, generator=gen, dtype=F64)
    tol = 1e-6
    out = iterate(states, memory, 1.0, tol=tol, accelerate=accelerate, max_iter=5000)
    same = anderson(lambda x: retrieve(x, memory, 1.0), states, m=accelerate or 0, tol=tol, max_iter=5000)
    assert torch.equal(out.x, same.x) and torch.equal(out.nit, same.nit) and out.success
    hist = out.residual_norms
    for i in range(6):
        k = int(out.nit[i])
        assert hist[k, i] <= tol * hist[0, i]  # stopped once below tol relative to the first residual
        assert bool((hist[:k, i] > tol * hist[0, i]).all())  # and not before


def _result_fields(res) -> dict:  # type: ignore[no-untyped-def]
    names = ("x", "g_x", "nit", "converged", "residual_norms", "n_evals", "n_rejected", "n_restarts")
    names += ("failed",)
    fields = {name: getattr(res, name) for name in names}
    if res.spectral_radius is not None:
        fields["spectral_radius"] = res.spectral_radius
    return fields


_STEP_PROBLEMS = [
    "hopfield beta=4",
    "hopfield beta=7.5 stability",
    "affine rho=0.95",
    "nan rows",
    "mixing 0.5",
]


def _step_problem(problem: str, m: int):  # type: ignore[no-untyped-def]
    """A map, start and solver arguments on which rows converge at different times, get rejected by the
    safeguard, restart, fail and re-enter the common case."""
    gen = torch.Generator().manual_seed(11)
    kwargs: dict = {"m": m, "tol": 1e-10, "max_iter": 300}
    if problem.startswith("hopfield"):
        beta = 7.5 if "7.5" in problem else 4.0
        _, g, _ = _hopfield(beta=beta)
        x0 = torch.randn(64, 32, generator=gen, dtype=F64) / 4
        kwargs["stability_check"] = "stability" in problem
    elif problem == "nan rows":
        _, retrieve, _ = _hopfield(beta=4.0)

        def g(x: torch.Tensor) -> torch.Tensor:  # rows 0-3 become non-finite once they move far from x0
            out = retrieve(x)
            out[:4] = torch.where(x[:4].norm(dim=-1, keepdim=True) > 0.5, torch.nan, out[:4])
            return out

        x0 = torch.randn(16, 32, generator=gen, dtype=F64) / 8
    else:
        a, b = _affine(3, 40, 0.95, normal=False)

        def g(x: torch.Tensor) -> torch.Tensor:
            return x @ a.T + b

        x0 = torch.randn(32, 40, generator=gen, dtype=F64)
        kwargs["mixing"] = 0.5 if problem == "mixing 0.5" else 1.0
    return g, x0, kwargs


def _assert_same_fields(got_result, want_result, label: str) -> None:  # type: ignore[no-untyped-def]
    for name, value in _result_fields(want_result).items():
        got = _result_fields(got_result)[name]
        assert torch.equal(got, value) or (
            got.is_floating_point() and torch.equal(got.nan_to_num(7.0), value.nan_to_num(7.0))
        ), f"{label}: field {name} differs"


@pytest.mark.parametrize("m", [0, 1, 3, 5])
@pytest.mark.parametrize("problem", _STEP_PROBLEMS)
def test_common_case_step_computes_the_general_step_bit_for_bit(monkeypatch, problem: str, m: int) -> None:  # type: ignore[no-untyped-def]
    """The whole-batch step taken while every row is in the common case is a faster route to the same
    numbers: with it turned off, every field of the result is identical, bit for bit (problems chosen so
    that rows converge at different times, get rejected by the safeguard, restart, fail and re-enter)."""
    import sys

    aa = sys.modules["hopfield_aa.anderson"]  # the module (the package exports the function by this name)
    g, x0, kwargs = _step_problem(problem, m)
    fast = anderson(g, x0.clone(), **kwargs)
    monkeypatch.setattr(aa, "_COMMON_PATH", False)
    general = anderson(g, x0.clone(), **kwargs)
    assert fast.message == general.message and fast.n_calls <= general.n_calls + 1
    _assert_same_fields(fast, general, f"{problem}, m={m}")


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("m", [0, 1, 5])
@pytest.mark.parametrize("problem", _STEP_PROBLEMS)
def test_native_general_step_computes_the_tensor_general_step_bit_for_bit(
    monkeypatch, problem: str, m: int, dtype: torch.dtype
) -> None:  # type: ignore[no-untyped-def]
    """The general step's native form (three kernel calls on the whole-batch state) computes the numbers of
    its tensor form (gathers, masks and scatters) bit for bit: safeguard rejections, restarts, escape
    phases, failed rows, convergence and the stability test, in float64 and float32."""
    import sys

    aa = sys.modules["hopfield_aa.anderson"]
    g, x0, kwargs = _step_problem(problem, m)
    if dtype != F64:
        g64 = g

        def g(x: torch.Tensor) -> torch.Tensor:
            return g64(x.double()).to(dtype)

        x0, kwargs["tol"] = x0.to(dtype), 1e-5
    monkeypatch.setattr(aa, "_COMMON_PATH", False)  # every step general
    calls = []
    native_step = aa.AndersonSolver._step_native

    def counted(self, state):  # type: ignore[no-untyped-def]
        calls.append(1)
        return native_step(self, state)

    monkeypatch.setattr(aa.AndersonSolver, "_step_native", counted)
    native = anderson(g, x0.clone(), **kwargs)
    assert calls, "the native general step did not run"
    monkeypatch.setattr(aa.AndersonSolver, "_step_native", lambda self, state: False)
    tensor = anderson(g, x0.clone(), **kwargs)
    assert native.message == tensor.message
    _assert_same_fields(native, tensor, f"{problem}, m={m}, {dtype}")


@pytest.mark.parametrize("native", [True, False])
def test_a_map_that_returns_one_buffer_it_overwrites_gives_the_same_result(native: bool, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """g may return memory it keeps and overwrites on its next call (a preallocated output buffer): the
    solver copies what it keeps, so the result is that of a map returning fresh tensors, bit for bit."""
    from hopfield_aa import _jit

    monkeypatch.setattr(_jit, "_enabled", native)
    _, retrieve, _ = _hopfield(beta=7.5)
    buffer = torch.empty(64, 32, dtype=F64)

    def in_buffer(x: torch.Tensor) -> torch.Tensor:
        buffer.copy_(retrieve(x))
        return buffer

    x0 = torch.randn(64, 32, generator=torch.Generator().manual_seed(5), dtype=F64) / 4
    fresh = anderson(retrieve, x0.clone(), m=5, tol=1e-10, max_iter=300)
    reused = anderson(in_buffer, x0.clone(), m=5, tol=1e-10, max_iter=300)
    assert bool(fresh.converged.all())
    _assert_same_fields(reused, fresh, "one output buffer")


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("regularization", [0.0, 1e-2])
def test_native_anderson_step_equals_its_tensor_form(
    dtype: torch.dtype, m: int, regularization: float
) -> None:
    """The single step's native kernel (residuals, differences, least squares and both mixed steps per
    row, no history tensor materialised) gives the tensor form's x_next and γ to rounding in float64; in
    float32 (its ΔFᵀΔF is summed in float64, the tensor form's matrix product in float32) each row's
    x_next is within 2e-5 of the float64 step, or closer to it than the tensor form's, on batched
    histories with a nearly dependent column."""
    import sys

    from hopfield_aa import _jit

    aa = sys.modules["hopfield_aa.anderson"]
    gen = torch.Generator().manual_seed(m)
    xs = torch.randn(m + 1, 3, 5, 24, generator=gen, dtype=dtype)
    gs = xs + 0.1 * torch.randn(m + 1, 3, 5, 24, generator=gen, dtype=dtype)
    if m > 1:  # row 0's last two residual differences nearly parallel: the retry path
        gs[-1, 0, 0] = xs[-1, 0, 0] + 2 * (gs[-2, 0, 0] - xs[-2, 0, 0]) - (gs[-3, 0, 0] - xs[-3, 0, 0])
    for mixing in (1.0, 0.5):
        native = aa._anderson_step(xs, gs, mixing, regularization)
        with _jit.disabled():
            tensor = aa._anderson_step(xs, gs, mixing, regularization)
        assert native[0].dtype == dtype and native[1].shape == (3, 5, m)
        if dtype == F64:
            torch.testing.assert_close(native[0], tensor[0], atol=1e-12, rtol=0)
            torch.testing.assert_close(native[1], tensor[1], atol=1e-10, rtol=1e-10)
            continue
        with _jit.disabled():
            exact = aa._anderson_step(xs.double(), gs.double(), mixing, regularization)[0]
        err_native = (native[0].double() - exact).abs().amax(-1)
        err_tensor = (tensor[0].double() - exact).abs().amax(-1)
        assert bool((err_native <= torch.clamp(err_tensor, min=2e-5)).all())
