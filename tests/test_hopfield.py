"""Property tests of THEORY.md §2: energy descent with the ½‖T(ξ) − ξ‖² margin, the energy gradient
ξ − T(ξ) (fixed points = stationary points), the Jacobian of T_α, Lipschitz bounds, attention as one
retrieval step, and iteration to a fixed point."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hopfield_aa import (
    AndersonConfig,
    attention,
    energy,
    entmax_jacobian,
    iterate,
    local_lipschitz,
    retrieval_jacobian,
    retrieve,
)
from hopfield_aa.hopfield import lipschitz_bound
from tests.strategies import alphas, betas, memory_and_state


def _energy_tolerance(memory: np.ndarray, state: np.ndarray, beta: float) -> float:
    # float64 rounding of E: the conjugate term is O(max|βXξ|/β) and ½‖ξ‖² is O(‖ξ‖²)
    magnitude = 1.0 + np.abs(memory).max() * (np.abs(state).sum() + np.abs(memory).sum()) + state @ state
    return 1e-10 * magnitude


@given(memory_and_state(), betas, alphas)
def test_energy_descent_with_half_squared_step_margin(case: tuple, beta: float, alpha: float) -> None:
    """Thm 3.1: E_α(T_α(ξ)) ≤ E_α(ξ) − ½‖T_α(ξ) − ξ‖² for every memory, state, β and α."""
    memory, state = case
    mapped = retrieve(state, memory, beta, alpha)
    step = mapped - state
    lhs = energy(mapped, memory, beta, alpha)
    rhs = energy(state, memory, beta, alpha) - 0.5 * step @ step
    assert lhs <= rhs + _energy_tolerance(memory, state, beta)


@given(memory_and_state(max_patterns=5, max_dim=4), st.floats(min_value=0.05, max_value=20.0), alphas)
def test_energy_gradient_is_state_minus_retrieval(case: tuple, beta: float, alpha: float) -> None:
    """∇E_α(ξ) = ξ − T_α(ξ): central finite differences of the energy against the map."""
    memory, state = case
    h = 1e-6
    grad = np.empty_like(state)
    for i in range(state.size):
        e = np.zeros_like(state)
        e[i] = h
        grad[i] = (energy(state + e, memory, beta, alpha) - energy(state - e, memory, beta, alpha)) / (2 * h)
    expected = state - retrieve(state, memory, beta, alpha)
    # entmax is only piecewise smooth (support changes), so finite differences carry O(h·β‖X‖²) error
    tol = 1e-5 * (1 + beta * (memory**2).sum())
    assert np.allclose(grad, expected, atol=tol)


@given(memory_and_state(max_patterns=6, max_dim=4), st.floats(min_value=0.05, max_value=10.0))
def test_fixed_points_of_the_map_are_stationary_points_of_the_energy(case: tuple, beta: float) -> None:
    memory, state = case
    result = iterate(state, memory, beta, 1.5, max_iter=3000)
    if not bool(result.converged):
        return
    xi = result.state
    h = 1e-6
    grad = np.array(
        [
            (energy(xi + h * e, memory, beta, 1.5) - energy(xi - h * e, memory, beta, 1.5)) / (2 * h)
            for e in np.eye(xi.size)
        ]
    )
    assert np.linalg.norm(grad) <= 1e-5 * (1 + beta * (memory**2).sum())


@given(memory_and_state(), betas, alphas)
def test_retrieval_lies_in_the_patterns_bounding_box(case: tuple, beta: float, alpha: float) -> None:
    """T_α(ξ) = Xᵀp with p in the simplex lies in the convex hull, hence in the patterns' bounding box."""
    memory, state = case
    out = retrieve(state, memory, beta, alpha)
    assert np.all(out >= memory.min(0) - 1e-12) and np.all(out <= memory.max(0) + 1e-12)


@given(memory_and_state(max_patterns=6, max_dim=4), st.floats(min_value=0.01, max_value=30.0), alphas)
def test_retrieval_jacobian_matches_autograd_and_is_symmetric_psd(
    case: tuple, beta: float, alpha: float
) -> None:
    memory, state = case
    x = torch.tensor(memory)
    xi = torch.tensor(state)
    jac = retrieval_jacobian(xi, x, beta, alpha)
    auto = torch.autograd.functional.jacobian(lambda s: retrieve(s, x, beta, alpha), xi)
    scale = 1e-8 * (1 + beta * float((x**2).sum()))
    assert torch.allclose(jac, auto, atol=scale)
    assert torch.allclose(jac, jac.T, atol=scale)
    assert float(torch.linalg.eigvalsh(jac).min()) >= -scale


@given(memory_and_state(max_patterns=6, max_dim=4), st.floats(min_value=0.01, max_value=30.0), alphas)
def test_retrieval_jacobian_is_the_patterns_sandwich_of_the_entmax_jacobian(
    case: tuple, beta: float, alpha: float
) -> None:
    """The low-rank form used by the code equals DT_α(ξ) = β Xᵀ J_entmax(βXξ) X with the dense N × N J."""
    memory, state = case
    x, xi = torch.tensor(memory), torch.tensor(state)
    dense_form = beta * x.T @ entmax_jacobian(beta * x @ xi, alpha=alpha) @ x
    scale = 1e-10 * (1 + beta * float((x**2).sum()))
    assert torch.allclose(retrieval_jacobian(xi, x, beta, alpha), dense_form, atol=scale)


@given(memory_and_state(max_patterns=6, max_dim=4), st.floats(min_value=0.01, max_value=30.0), alphas)
def test_local_lipschitz_is_below_the_local_and_global_bounds(case: tuple, beta: float, alpha: float) -> None:
    memory, state = case
    lip = float(local_lipschitz(state, memory, beta, alpha))
    local = float(lipschitz_bound(memory, beta, alpha, state=state))
    global_ = float(lipschitz_bound(memory, beta, alpha))
    slack = 1e-9 * (1 + beta * (memory**2).sum())
    assert lip <= local + slack
    if alpha <= 2.0:
        assert lip <= global_ + slack


def test_single_pattern_support_gives_zero_jacobian() -> None:
    """Exact one-step retrieval: with one pattern in the support of a sparse map, DT_α(ξ) = 0."""
    memory = torch.eye(3, dtype=torch.float64)
    xi = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    for alpha in (1.5, 2.0, 1.3):
        assert torch.equal(
            retrieval_jacobian(xi, memory, 10.0, alpha), torch.zeros(3, 3, dtype=torch.float64)
        )
        assert torch.equal(retrieve(xi, memory, 10.0, alpha), xi)


def test_attention_with_alpha_one_is_scaled_dot_product_attention() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(attention(q, k, v), expected, atol=1e-6)


def test_attention_is_one_hetero_associative_retrieval_step() -> None:
    g = torch.Generator().manual_seed(1)
    q, k = (
        torch.randn(4, 6, generator=g, dtype=torch.float64),
        torch.randn(7, 6, generator=g, dtype=torch.float64),
    )
    out = attention(q, k, k, scale=0.7, alpha=1.5)
    assert torch.allclose(out, retrieve(q, k, 0.7, 1.5), atol=1e-12)


# --- iteration -----------------------------------------------------------------------------------


@given(memory_and_state(max_patterns=6, max_dim=4), st.floats(min_value=0.05, max_value=20.0), alphas)
def test_plain_iteration_decreases_energy_monotonically(case: tuple, beta: float, alpha: float) -> None:
    memory, state = case
    result = iterate(state, memory, beta, alpha, max_iter=200)
    energies = np.asarray(result.energy_history)
    tol = _energy_tolerance(memory, state, beta)
    assert np.all(np.diff(energies) <= tol)


def test_iterate_batched_states_converge_to_stable_fixed_points() -> None:
    g = torch.Generator().manual_seed(0)
    memory = torch.nn.functional.normalize(torch.randn(16, 8, generator=g, dtype=torch.float64), dim=-1)
    states = memory[:5] + 0.05 * torch.randn(5, 8, generator=g, dtype=torch.float64)
    result = iterate(states, memory, beta=8.0, alpha=1.0)
    assert result.converged.all() and result.stable.all()
    residual = torch.linalg.vector_norm(retrieve(result.state, memory, 8.0) - result.state, dim=-1)
    assert float(residual.max()) <= 100 * torch.finfo(torch.float64).eps * 10
    assert result.state.shape == states.shape and result.n_iter.shape == (5,)


def test_iterate_with_anderson_matches_plain_iteration_on_a_contraction() -> None:
    """Below the global certificate β L_α ‖X‖₂² < 1 the fixed point is unique: both solvers must find it."""
    g = torch.Generator().manual_seed(2)
    memory = torch.nn.functional.normalize(torch.randn(32, 16, generator=g, dtype=torch.float64), dim=-1)
    beta = 0.9 / float(lipschitz_bound(memory, 1.0, 1.5))
    states = torch.randn(8, 16, generator=g, dtype=torch.float64)
    plain = iterate(states, memory, beta=beta, alpha=1.5, max_iter=5000)
    fast = iterate(states, memory, beta=beta, alpha=1.5, accelerate=AndersonConfig(m=3, tol=1e-12))
    assert plain.converged.all() and fast.converged.all()
    assert torch.allclose(plain.state, fast.state, atol=1e-9)
    assert int(fast.n_iter.max()) < int(plain.n_iter.max())
    assert fast.energy_history is None


def test_iterate_with_anderson_ends_at_fixed_points_past_the_threshold() -> None:
    g = torch.Generator().manual_seed(3)
    memory = torch.nn.functional.normalize(torch.randn(32, 16, generator=g, dtype=torch.float64), dim=-1)
    states = torch.randn(8, 16, generator=g, dtype=torch.float64) * 0.3
    fast = iterate(states, memory, beta=3.0, alpha=1.5, accelerate=AndersonConfig(m=3, tol=1e-12))
    residual = torch.linalg.vector_norm(retrieve(fast.state, memory, 3.0, 1.5) - fast.state, dim=-1)
    assert torch.all(residual[fast.converged] <= 1e-10)


def test_iterate_accepts_numpy_and_returns_numpy() -> None:
    memory = np.eye(3)
    result = iterate(np.array([0.9, 0.2, 0.1]), memory, 5.0)
    assert isinstance(result.state, np.ndarray) and isinstance(result.converged, np.ndarray)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: retrieve(torch.ones(3), torch.ones(4, 3), 0.0), "beta"),
        (lambda: retrieve(torch.ones(3), torch.ones(4, 3), -1.0), "beta"),
        (lambda: retrieve(torch.ones(3), torch.ones(4, 3), math.inf), "beta"),
        (lambda: retrieve(torch.ones(3), torch.ones(4, 3), 1.0, alpha=0.5), "alpha"),
        (lambda: retrieve(torch.ones(3), torch.ones(4, 2), 1.0), "patterns"),
        (lambda: retrieve(torch.ones(3), torch.ones(0, 3), 1.0), "patterns"),
        (lambda: retrieve(torch.tensor([1.0, float("nan"), 0.0]), torch.ones(4, 3), 1.0), "state"),
        (lambda: energy(torch.ones(3), torch.ones(4, 3, dtype=torch.int64), 1.0), "patterns"),
        (lambda: iterate(torch.ones(3), torch.ones(4, 3), 1.0, max_iter=0), "max_iter"),
        (lambda: attention(torch.ones(2, 3), torch.ones(4, 2), torch.ones(4, 5)), "keys"),
    ],
)
def test_bad_input_names_the_argument(call, name: str) -> None:
    with pytest.raises((ValueError, TypeError), match=name):
        call()


def test_float16_state_with_float64_patterns_gives_float64() -> None:
    """Issue 12: the result's dtype is the promotion of the state's and the patterns' (torch's rule),
    computed at that precision; before, a float16 state silently gave float16."""
    gen = torch.Generator().manual_seed(0)
    memory = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    state = torch.randn(4, generator=gen).half()
    want = retrieve(state.double(), memory, 2.0, 1.5)
    got = retrieve(state, memory, 2.0, 1.5)
    assert got.dtype == torch.float64 and torch.equal(got, want)
    assert energy(state, memory, 2.0).dtype == torch.float64
    assert iterate(state, memory, 2.0).state.dtype == torch.float64
    assert retrieve(state, memory.float(), 2.0).dtype == torch.float32
    assert retrieve(state, memory.bfloat16(), 2.0).dtype == torch.float32
    assert retrieve(state, memory.half(), 2.0).dtype == torch.float16
    out = attention(state[None].numpy(), memory, memory.float())
    assert isinstance(out, np.ndarray) and out.dtype == np.float64


@given(memory_and_state(), betas, alphas)
def test_finite_input_never_gives_nan(case: tuple, beta: float, alpha: float) -> None:
    memory, state = case
    assert np.isfinite(retrieve(state, memory, beta, alpha)).all()
    assert np.isfinite(energy(state, memory, beta, alpha))


# --------------------------------------------------------------------------------------------------
# one α per head (a tensor broadcastable to the states' leading shape)

_HEAD_ALPHAS = (1.0, 1.5, 2.0, 2.6)


def _per_head_case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    states = torch.randn(2, 4, 3, 5, generator=gen, dtype=torch.float64)  # (B, H, L, d)
    patterns = torch.randn(4, 1, 7, 5, generator=gen, dtype=torch.float64)  # (H, 1, N, d): per head
    alpha = torch.tensor(_HEAD_ALPHAS, dtype=torch.float64).view(4, 1)  # one α per head
    return states, patterns, alpha


@pytest.mark.parametrize("fn", [retrieve, energy, retrieval_jacobian, local_lipschitz])
def test_per_head_alpha_equals_each_heads_float_alpha(fn) -> None:
    states, patterns, alpha = _per_head_case()
    out = fn(states, patterns, 0.8, alpha)
    for h, a in enumerate(_HEAD_ALPHAS):
        ref = fn(states[:, h], patterns[h], 0.8, a)
        assert torch.allclose(out[:, h], ref, rtol=1e-12, atol=1e-12)


def test_per_head_alpha_in_lipschitz_bounds_and_attention() -> None:
    states, patterns, alpha = _per_head_case(1)
    local = lipschitz_bound(patterns, 0.8, alpha, state=states)
    glob = lipschitz_bound(patterns, 0.8, alpha)  # memory batch (H, 1): one α per memory
    keys, values = patterns.squeeze(1), torch.randn(4, 7, 2, dtype=torch.float64)
    att = attention(states, keys, values, alpha=alpha)
    for h, a in enumerate(_HEAD_ALPHAS):
        assert torch.allclose(local[:, h], lipschitz_bound(patterns[h], 0.8, a, state=states[:, h]))
        assert torch.allclose(glob[h], lipschitz_bound(patterns[h], 0.8, a))
        assert torch.allclose(att[:, h], attention(states[:, h], keys[h], values[h], alpha=a), atol=1e-12)
    assert math.isinf(float(glob[3, 0]))  # α > 2: no finite global bound


@pytest.mark.parametrize("accelerate", [None, 3])
def test_iterate_with_per_head_alpha_reaches_each_heads_fixed_points(accelerate) -> None:
    gen = torch.Generator().manual_seed(2)
    patterns = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    states = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64)  # (H, L, d), one memory
    alpha = torch.tensor(_HEAD_ALPHAS, dtype=torch.float64).view(4, 1)
    out = iterate(states, patterns, 2.0, alpha, accelerate=accelerate, max_iter=500)
    assert bool(out.converged.all())
    fixed = retrieve(out.state, patterns, 2.0, alpha)
    assert torch.allclose(fixed, out.state, atol=1e-8)
    if accelerate is None:
        for h, a in enumerate(_HEAD_ALPHAS):
            ref = iterate(states[h], patterns, 2.0, a, max_iter=500)
            assert torch.allclose(out.state[h], ref.state, atol=1e-10)
        assert bool((out.energy_history.diff(dim=0) <= 1e-10).all())  # descent for every head's α


def test_energy_and_retrieval_are_differentiable_in_a_per_head_alpha() -> None:
    states, patterns, alpha = _per_head_case(3)
    alpha = (alpha + 0.05).requires_grad_()  # away from α = 1 for the finite differences

    def total(a: torch.Tensor) -> torch.Tensor:
        return energy(states, patterns, 0.8, a).sum() + retrieve(states, patterns, 0.8, a).square().sum()

    assert torch.autograd.gradcheck(total, (alpha,), eps=1e-6, atol=1e-6)


def test_per_head_alpha_errors_name_alpha() -> None:
    states, patterns, _ = _per_head_case()
    with pytest.raises(ValueError, match="alpha must be >= 1"):
        retrieve(states, patterns, 0.8, torch.tensor([[1.5], [0.5], [1.5], [1.5]]))
    with pytest.raises(ValueError, match="alpha of shape"):
        energy(states, patterns, 0.8, torch.ones(5, 1) * 1.5)
