"""Modern Hopfield retrieval, dense and generalised sparse (papers/theory.md §2): energies, the retrieval
map T_α, attention as one hetero-associative retrieval step, iteration to a fixed point, Jacobians and
Lipschitz estimates.

Shapes: a state is ``(..., d)``; the memory holds patterns as rows, ``(N, d)`` shared by every state or
``(..., N, d)`` broadcasting against the state's leading axes. Results come back in the state's kind
(NumPy or torch) and in the dtype the state and the patterns promote to (``_arrays.result_kind``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Union

import torch

from hopfield_aa._arrays import (
    ArrayLike,
    Kind,
    as_tensor,
    check_alpha,
    check_scalar,
    promote,
    restore,
    result_kind,
    tolerance,
)
from hopfield_aa.anderson import AndersonConfig, FixedPointResult, anderson
from hopfield_aa.normalizers import _alpha_argument, _entmax_tensor, entmax_conjugate, jacobian_weights

# --------------------------------------------------------------------------------------------------
# kernels (validated tensors in, tensors out)


def _scores(state: torch.Tensor, patterns: torch.Tensor, beta: float) -> torch.Tensor:
    """β X ξ for states (..., d) and patterns (N, d) or (..., N, d): shape (..., N)."""
    return beta * (state.unsqueeze(-2) @ patterns.mT).squeeze(-2)


Alpha = Union[float, torch.Tensor]  # one α, or one per row of the scores (their shape with N of size 1)


def _retrieve(state: torch.Tensor, patterns: torch.Tensor, beta: float, alpha: Alpha) -> torch.Tensor:
    """T_α(ξ) = Xᵀ entmax_α(β X ξ)."""
    probs = _entmax_tensor(_scores(state, patterns, beta), alpha, -1)
    return (probs.unsqueeze(-2) @ patterns).squeeze(-2)


def _energy(state: torch.Tensor, patterns: torch.Tensor, beta: float, alpha: Alpha) -> torch.Tensor:
    """E_α(ξ) = −Ψ*_α(β X ξ)/β + ½‖ξ‖²."""
    conjugate = entmax_conjugate(_scores(state, patterns, beta), alpha=alpha, dim=-1)
    assert isinstance(conjugate, torch.Tensor)
    return -conjugate / beta + 0.5 * (state * state).sum(-1)


def _jacobian(state: torch.Tensor, patterns: torch.Tensor, beta: float, alpha: Alpha) -> torch.Tensor:
    """DT_α(ξ) = β Xᵀ J X, shape (..., d, d), symmetric positive semidefinite.

    With the entmax Jacobian J = diag(s) − s sᵀ/Σs this is β [(s ⊙ X)ᵀ X − (Xᵀs)(Xᵀs)ᵀ/Σs]: O(N d²) per
    state, without forming the N × N matrix J (attention-sized memories have N ≥ 1024).
    """
    probs = _entmax_tensor(_scores(state, patterns, beta), alpha, -1)
    s = jacobian_weights(probs, alpha.detach() if isinstance(alpha, torch.Tensor) else alpha)  # (..., N)
    weighted = (s.unsqueeze(-1) * patterns).mT @ patterns  # (..., d, d)
    weighted = 0.5 * (weighted + weighted.mT)  # symmetric exactly, not only up to the product's rounding
    mean = (s.unsqueeze(-2) @ patterns).squeeze(-2)  # (..., d) = Xᵀ s
    total = s.sum(-1).clamp(min=torch.finfo(s.dtype).tiny)
    return beta * (weighted - mean.unsqueeze(-1) * mean.unsqueeze(-2) / total[..., None, None])


def _spectral_norm_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Largest eigenvalue of symmetric PSD matrices (= spectral norm = spectral radius)."""
    sym = 0.5 * (matrix + matrix.mT)
    return torch.linalg.eigvalsh(sym)[..., -1].clamp(min=0.0)


def _local_lipschitz(state: torch.Tensor, patterns: torch.Tensor, beta: float, alpha: Alpha) -> torch.Tensor:
    """‖DT_α(ξ)‖₂ per state: the largest eigenvalue of the symmetric PSD Jacobian."""
    return _spectral_norm_psd(_jacobian(state, patterns, beta, alpha))


# --------------------------------------------------------------------------------------------------
# validation shared by the public functions


def _memory_inputs(
    state: object, patterns: object, beta: object, alpha: object
) -> tuple[torch.Tensor, torch.Tensor, float, Alpha, Kind]:
    xi, kind = as_tensor(state, "state", min_ndim=1)
    memory, memory_kind = as_tensor(patterns, "patterns", min_ndim=2)
    if xi.shape[-1] == 0:
        raise ValueError(
            f"state must have a non-empty last axis (dimension d >= 1), got shape {tuple(xi.shape)}"
        )
    if memory.shape[-2] == 0:
        raise ValueError("patterns must hold at least one pattern (got an empty memory, N = 0)")
    if memory.shape[-1] != xi.shape[-1]:
        raise ValueError(
            f"patterns must have the state's dimension d = {xi.shape[-1]} in its last axis, "
            f"got shape {tuple(memory.shape)}"
        )
    try:
        torch.broadcast_shapes(xi.shape[:-1], memory.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"patterns' leading shape {tuple(memory.shape[:-2])} does not broadcast against "
            f"state's leading shape {tuple(xi.shape[:-1])}"
        ) from None
    beta_value = check_scalar(beta, "beta", positive=True)
    if math.isinf(beta_value):
        raise ValueError("beta must be finite, got inf")
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        check_alpha(alpha)  # a plain α is named before the scores are formed (which may overflow)
    xi, memory = promote(xi, memory)
    scores = _check_finite_result(_scores(xi, memory, beta_value), "the scores beta * patterns @ state")
    # one α, or a tensor broadcastable to the state's leading shape (e.g. (H, 1) for states (B, H, L, d))
    alpha_value = _alpha_argument(alpha, scores, -1)
    return xi, memory, beta_value, alpha_value, result_kind(kind, memory_kind)


def _check_finite_result(value: torch.Tensor, what: str, names: str = "state and patterns") -> torch.Tensor:
    """``value`` itself, or a ValueError naming the inputs when finite inputs overflowed in computing it."""
    if value.numel() > 0 and not bool(torch.isfinite(value).all()):
        raise ValueError(
            f"{what} overflow {value.dtype}: {names} are too large for it (scale them down or use float64)"
        )
    return value


# --------------------------------------------------------------------------------------------------
# public API


def retrieve(state: ArrayLike, patterns: ArrayLike, beta: float, alpha: float | ArrayLike = 1.0) -> ArrayLike:
    r"""One retrieval step of the (generalised sparse) modern Hopfield network.

    .. math:: T_\alpha(\xi) = X^\top \operatorname{entmax}_\alpha(\beta X \xi)

    α = 1 is the dense (softmax) map ``D``, α > 1 a sparse map ``S`` (α = 1.5: entmax, α = 2: sparsemax).
    The result lies in the convex hull of the patterns.

    Parameters
    ----------
    state : tensor or array, shape (..., d)
        States ξ (any batch of them).
    patterns : tensor or array, shape (N, d) or (..., N, d)
        The memory ``X``; rows are stored patterns.
    beta : float
        Inverse temperature β > 0.
    alpha : float or tensor or array
        Entmax parameter α ≥ 1: one value, or one per state, broadcastable to the states' leading shape
        (e.g. ``(H, 1)``: one α per head for states ``(B, H, L, d)``); differentiable in a torch α.
        The same holds for every function here that takes ``alpha``.

    Returns
    -------
    Tensor or array of shape (..., d), the kind of ``state`` (NumPy or torch) in the dtype ``state`` and
    ``patterns`` promote to (torch's rule: a float16 state with float64 patterns gives float64).

    Examples
    --------
    >>> import torch
    >>> X = torch.eye(3, dtype=torch.float64)
    >>> retrieve(torch.tensor([1.0, 0.2, 0.0], dtype=torch.float64), X, beta=10.0, alpha=2.0).tolist()
    [1.0, 0.0, 0.0]
    """
    xi, memory, beta_value, alpha_value, kind = _memory_inputs(state, patterns, beta, alpha)
    return restore(_retrieve(xi, memory, beta_value, alpha_value), kind)


def energy(state: ArrayLike, patterns: ArrayLike, beta: float, alpha: float | ArrayLike = 1.0) -> ArrayLike:
    r"""The Hopfield energy whose concave–convex procedure step is :func:`retrieve`.

    .. math:: E_\alpha(\xi) = -\tfrac{1}{\beta}\,\Psi^*_\alpha(\beta X\xi) + \tfrac12\lVert\xi\rVert^2

    (constants dropped). Its gradient is ``ξ − T_α(ξ)``, so fixed points of ``T_α`` are its stationary
    points, and ``E_α(T_α(ξ)) ≤ E_α(ξ) − ½‖T_α(ξ) − ξ‖²`` (energy descent, papers/theory.md §3).

    Returns
    -------
    Tensor or array of shape (...): one energy per state.

    Examples
    --------
    >>> import torch
    >>> X = torch.eye(2, dtype=torch.float64)
    >>> xi = torch.tensor([0.9, 0.1], dtype=torch.float64)
    >>> bool(energy(retrieve(xi, X, 2.0), X, 2.0) <= energy(xi, X, 2.0))
    True
    """
    xi, memory, beta_value, alpha_value, kind = _memory_inputs(state, patterns, beta, alpha)
    return restore(_check_finite_result(_energy(xi, memory, beta_value, alpha_value), "the energies"), kind)


def attention(
    queries: ArrayLike,
    keys: ArrayLike,
    values: ArrayLike,
    *,
    scale: float | None = None,
    alpha: float | ArrayLike = 1.0,
) -> ArrayLike:
    r"""Attention as one hetero-associative retrieval step, :math:`\mathrm{entmax}_\alpha(\beta QK^\top)V`.

    ``scale`` is β, by default ``1/√d_head``. With ``alpha = 1`` this is standard scaled dot-product
    attention; the keys play the memory and each query row a state.

    Parameters
    ----------
    queries : (..., L_q, d); keys : (..., L_k, d); values : (..., L_k, d_v)

    Returns
    -------
    (..., L_q, d_v), the kind of ``queries`` in the dtype the three inputs promote to.
    """
    q, kind = as_tensor(queries, "queries", min_ndim=2)
    k, k_kind = as_tensor(keys, "keys", min_ndim=2)
    v, v_kind = as_tensor(values, "values", min_ndim=2)
    kind = result_kind(kind, k_kind, v_kind)
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"keys must have the queries' head dimension {q.shape[-1]}, got {tuple(k.shape)}")
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"values must have as many rows as keys ({k.shape[-2]}), got {tuple(v.shape)}")
    if k.shape[-2] == 0:
        raise ValueError("keys must hold at least one key (got L_k = 0)")
    if q.shape[-1] == 0:
        raise ValueError(f"queries must have a non-empty head dimension, got shape {tuple(q.shape)}")
    try:
        torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"the leading (batch, head) shapes of queries {tuple(q.shape[:-2])}, keys {tuple(k.shape[:-2])} "
            f"and values {tuple(v.shape[:-2])} do not broadcast"
        ) from None
    beta = 1.0 / math.sqrt(q.shape[-1]) if scale is None else check_scalar(scale, "scale", positive=True)
    if math.isinf(beta):
        raise ValueError("scale must be finite, got inf")
    q, k, v = promote(q, k, v)
    scores = _check_finite_result(beta * (q @ k.mT), "the scores scale * queries @ keys", "queries and keys")
    # one α, or a tensor broadcastable to (..., L_q): (H, 1) is one α per head
    probs = _entmax_tensor(scores, _alpha_argument(alpha, scores, -1), -1)
    return restore(_check_finite_result(probs @ v, "the outputs", "values"), kind)


def retrieval_jacobian(
    state: ArrayLike, patterns: ArrayLike, beta: float, alpha: float | ArrayLike = 1.0
) -> ArrayLike:
    r"""The Jacobian of the retrieval map, :math:`DT_\alpha(\xi) = \beta X^\top J(\beta X\xi) X`.

    ``J`` is the Jacobian of entmax at the scores (:func:`hopfield_aa.normalizers.entmax_jacobian`).

    Symmetric positive semidefinite (``T_α`` is the gradient of the convex ``Ψ*_α(βXξ)/β``); zero when a
    single pattern carries the whole support (exact one-step retrieval).

    Returns
    -------
    Tensor or array of shape (..., d, d).
    """
    xi, memory, beta_value, alpha_value, kind = _memory_inputs(state, patterns, beta, alpha)
    return restore(
        _check_finite_result(_jacobian(xi, memory, beta_value, alpha_value), "the Jacobians"), kind
    )


def local_lipschitz(
    state: ArrayLike, patterns: ArrayLike, beta: float, alpha: float | ArrayLike = 1.0
) -> ArrayLike:
    r"""Local Lipschitz constant of ``T_α`` at ξ: the spectral norm ``‖DT_α(ξ)‖₂``.

    As ``DT_α`` is symmetric PSD this is its largest eigenvalue, which is also its spectral radius: a fixed
    point with a value below 1 is stable (attracting) under plain iteration. The weak-contraction checks
    evaluate it along trajectories.

    Returns
    -------
    Tensor or array of shape (...).
    """
    xi, memory, beta_value, alpha_value, kind = _memory_inputs(state, patterns, beta, alpha)
    jacobian = _check_finite_result(_jacobian(xi, memory, beta_value, alpha_value), "the Jacobians")
    return restore(_spectral_norm_psd(jacobian), kind)


def lipschitz_bound(
    patterns: ArrayLike, beta: float, alpha: float | ArrayLike = 1.0, *, state: ArrayLike | None = None
) -> ArrayLike:
    r"""Certified upper bounds on the Lipschitz constant of ``T_α`` (papers/theory.md §4).

    Without ``state``: the global bound ``β L_α ‖X‖₂²`` with the proven ``L_α`` (½ for softmax, 1 for
    α ∈ (1, 2]); for α > 2 no finite global bound is proven and ``inf`` is returned. With ``state``: the
    local bound at ξ, ``β σ min(M², D_S²/2)``, where ``σ = Σ_{support} p_i^{2−α}``, ``M`` is the largest
    pattern norm and ``D_S`` the diameter of the patterns in the support of ``p = entmax_α(βXξ)``.

    Returns
    -------
    Tensor or array: shape (...) of the memory's batch (global) or of the state's batch (local).
    """
    memory, kind = as_tensor(patterns, "patterns", min_ndim=2)
    if memory.shape[-2] == 0:
        raise ValueError("patterns must hold at least one pattern (got an empty memory, N = 0)")
    beta_value = check_scalar(beta, "beta", positive=True)
    if math.isinf(beta_value):
        raise ValueError("beta must be finite, got inf")
    if state is None:
        norm_sq = torch.linalg.matrix_norm(memory, ord=2) ** 2
        # a tensor α broadcasts against the memory's batch shape
        a = _alpha_argument(alpha, norm_sq.unsqueeze(-1), -1)
        if isinstance(a, torch.Tensor):
            a = a.detach().squeeze(-1).to(norm_sq.dtype)
            l_alpha = torch.where(a == 1.0, 0.5, 1.0)
            bound = torch.where(a > 2.0, math.inf, beta_value * l_alpha * norm_sq)
        elif a > 2.0:
            bound = torch.full(memory.shape[:-2], math.inf, dtype=memory.dtype)
        else:
            l_alpha_value = 0.5 if a == 1.0 else 1.0
            bound = beta_value * l_alpha_value * norm_sq
        return restore(bound, kind)
    xi, memory, beta_value, alpha_value, kind = _memory_inputs(state, patterns, beta, alpha)
    probs = _entmax_tensor(_scores(xi, memory, beta_value), alpha_value, -1)
    support = probs > 0
    exponent = 2.0 - (alpha_value.detach() if isinstance(alpha_value, torch.Tensor) else alpha_value)
    sigma = torch.where(support, probs.clamp(min=torch.finfo(probs.dtype).tiny) ** exponent, 0.0).sum(-1)
    norms = torch.linalg.vector_norm(memory, dim=-1)  # (..., N)
    m_sq = (norms**2).amax(-1)
    distances = torch.cdist(memory, memory)  # (..., N, N)
    pair_in_support = support.unsqueeze(-1) & support.unsqueeze(-2)
    diameter = torch.where(pair_in_support, distances, torch.zeros_like(distances)).amax(dim=(-2, -1))
    bound = beta_value * sigma * torch.minimum(m_sq.expand_as(sigma), 0.5 * diameter**2)
    return restore(bound, kind)


# --------------------------------------------------------------------------------------------------
# iteration to a fixed point


IterateResult = FixedPointResult  # iterate and anderson return one result type


def iterate(
    state: ArrayLike,
    patterns: ArrayLike,
    beta: float,
    alpha: float | ArrayLike = 1.0,
    *,
    tol: float | None = None,
    max_iter: int = 1000,
    accelerate: Union[int, AndersonConfig, None] = None,
) -> FixedPointResult:
    r"""Iterate the retrieval map ``ξ_{t+1} = T_α(ξ_t)`` to a fixed point, plainly or with Anderson.

    Plain iteration is the concave–convex procedure for ``E_α`` and so decreases the energy monotonically
    (recorded in ``energy_history``); every state that converges ends at a stationary point of ``E_α``.
    ``accelerate`` (an ``m`` or an :class:`~hopfield_aa.anderson.AndersonConfig`) runs AA(m) on the same map
    instead. Both run :func:`~hopfield_aa.anderson.anderson` (plain iteration is its depth 0, bit for bit),
    so they share its result type and its convergence criterion: a state has converged once

    .. math:: \lVert T(\xi_t) - \xi_t\rVert \le \mathrm{tol}\cdot\lVert T(\xi_0) - \xi_0\rVert
              \quad\text{or}\quad \lVert T(\xi_t) - \xi_t\rVert \le 16\,\varepsilon\,\lVert T(\xi_t)\rVert

    (relative to its own initial residual, or at the rounding floor of the dtype), and then stops changing.
    Either way the result reports, per state, the spectral radius of ``DT_α`` at the end, so a fixed point
    that acceleration reached but plain iteration cannot (a saddle: radius ≥ 1) is flagged.

    Parameters
    ----------
    state : (..., d)   starting states ξ₀.
    patterns : (N, d) or (..., N, d)   the memory.
    beta, alpha : inverse temperature β > 0 and entmax α ≥ 1.
    tol : relative tolerance > 0 of the criterion above. Default: ``100 ε`` of the dtype for plain iteration,
        the config's ``tol`` with ``accelerate``.
    max_iter : maximum iterations.
    accelerate : None, an int m ≥ 0, or an AndersonConfig.

    Returns
    -------
    FixedPointResult
        ``x`` (alias ``state``), ``success``, ``nit`` (alias ``n_iter``), ``converged``, ``residual_norms``
        (alias ``history``), ``energy_history`` (plain iteration; None when accelerated: Anderson iterates
        are not energy-monotone), ``spectral_radius`` = ``‖DT_α‖₂`` and ``stable``, in the state's kind.

    Examples
    --------
    >>> import torch
    >>> X = torch.eye(3, dtype=torch.float64)
    >>> out = iterate(torch.tensor([0.8, 0.3, 0.1], dtype=torch.float64), X, beta=8.0)
    >>> bool(out.converged), int(out.x.argmax()), bool(out.stable)
    (True, 0, True)
    """
    xi, memory, beta_value, alpha_value, kind = _memory_inputs(state, patterns, beta, alpha)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    if accelerate is None:
        config = AndersonConfig(m=0, tol=tolerance(xi.dtype, 100.0))
    elif isinstance(accelerate, int):
        config = AndersonConfig(m=accelerate)
    elif isinstance(accelerate, AndersonConfig):
        config = accelerate
    else:
        raise TypeError(
            f"accelerate must be None, an int or an AndersonConfig, got {type(accelerate).__name__}"
        )
    if accelerate is not None and memory.ndim > 2:
        raise ValueError(
            "accelerate= needs one memory (N, d) shared by all states; batch memories separately"
        )
    settings = {**dataclasses.asdict(config), "max_iter": max_iter}
    if tol is not None:
        settings["tol"] = check_scalar(tol, "tol", positive=True)
    scale = torch.linalg.vector_norm(memory, dim=-1).amax(-1)
    # iterates reach the patterns' hull, where scores are up to β M² and residuals up to ‖ξ₀‖ + M
    _check_finite_result(beta_value * scale * scale, "beta * (largest pattern norm)^2", "patterns")
    _check_finite_result(torch.linalg.vector_norm(xi, dim=-1) + scale, "the norms of the states")
    xi = torch.broadcast_to(xi, torch.broadcast_shapes(xi.shape, memory.shape[:-2] + xi.shape[-1:]))

    def retrieval(x: torch.Tensor) -> torch.Tensor:
        return _retrieve(x, memory, beta_value, alpha_value)

    energies: list[torch.Tensor] = []
    if accelerate is None:  # record E_α(ξ_t) along the way (its descent is a claim of papers/theory.md §3)
        energies.append(_energy(xi, memory, beta_value, alpha_value))
        settings["callback"] = lambda k, x, r: energies.append(_energy(x, memory, beta_value, alpha_value))
    # the map acts on each state alone, so converged states need not be evaluated again; unless each state
    # carries its own memory or α, which the map needs the whole batch to line up
    row_subsets = memory.ndim == 2 and not isinstance(alpha_value, torch.Tensor)
    result = anderson(retrieval, xi, **settings, row_subsets=row_subsets)
    final = torch.as_tensor(result.x)
    _check_finite_result(torch.as_tensor(result.residual_norms), "the residual norms")
    energy_history = _check_finite_result(torch.stack(energies), "the energies") if energies else None
    radius = _local_lipschitz(final, memory, beta_value, alpha_value)
    stable = radius < 1.0
    converged = torch.as_tensor(result.converged)
    message = (
        f"{int(converged.sum())}/{converged.numel()} states converged; "
        f"{int((converged & ~stable).sum())} of them at unstable fixed points (spectral radius >= 1)"
    )
    arrays = {
        field.name: _as_kind(value, kind)
        for field in dataclasses.fields(result)
        if isinstance(value := getattr(result, field.name), torch.Tensor)
    }
    return dataclasses.replace(
        result,
        **arrays,
        spectral_radius=_as_kind(radius, kind),
        stable=_as_kind(stable, kind),
        energy_history=None if energy_history is None else _as_kind(energy_history, kind),
        message=message,
    )


def _as_kind(tensor: torch.Tensor, kind: Kind) -> Any:
    """A result array in the caller's kind: NumPy for NumPy callers, floats in the result dtype."""
    if tensor.is_floating_point():
        return restore(tensor, kind)
    return tensor.detach().cpu().numpy() if kind.numpy else tensor
