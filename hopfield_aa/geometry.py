"""The geometry of attention-space guidance: the residual's decomposition, the norm cap, GAG, extrapolation,
and the correspondence between extrapolation and a depth-1 Anderson step (papers/theory.md §5 and §8).

Every rule acts on the last axis (one vector per attention head and query token) and broadcasts over
the leading ones. Results have the first argument's kind (NumPy or torch) and the dtype all array
arguments promote to. The public functions validate their inputs; the ``_``-prefixed kernels below them do
the same mathematics without validation (no host synchronisation) and are what the diffusers processors
call in the sampling loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Union, cast

import torch

from hopfield_aa._arrays import (
    ArrayLike,
    as_tensor,
    check_dim,
    check_scalar,
    promote,
    restore,
    result_kind,
)
from hopfield_aa.anderson import _anderson_step, anderson_step
from hopfield_aa.hopfield import _retrieve

Reference = Union[str, torch.Tensor]
REFERENCES = ("sparse", "dense", "update")

# A reference direction whose norm is below this multiple of the dtype's epsilon (relative to the scale of
# the residual and the reference) is treated as zero, and the parallel part is then zero by convention.
_ZERO_FACTOR = 16.0


# --------------------------------------------------------------------------------------------------
# kernels (tensors in, tensors out, no validation)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=-1, keepdim=True)


def _decompose(residual: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    reference = reference.expand_as(residual) if reference.shape != residual.shape else reference
    if residual.shape[-1] == 0:  # vectors of length 0: both parts empty
        return torch.zeros_like(residual), residual.clone()
    eps = torch.finfo(residual.dtype).eps
    ref_max = reference.abs().amax(dim=-1, keepdim=True)
    # r_∥ does not depend on the scale of u: with u / |u|_∞ no square over- or underflows (|u| = 1e30
    # in float32 would)
    unit = reference / torch.where(ref_max > 0, ref_max, torch.ones_like(ref_max))
    unit_sq = _dot(unit, unit)
    scale = torch.maximum(ref_max, residual.abs().amax(dim=-1, keepdim=True))
    is_zero = (ref_max == 0) | (ref_max * unit_sq.sqrt() <= _ZERO_FACTOR * eps * scale)
    coefficient = _dot(residual, unit) / torch.where(is_zero, torch.ones_like(unit_sq), unit_sq)
    parallel = torch.where(is_zero, torch.zeros_like(residual), coefficient * unit)
    return parallel, residual - parallel


def _norm_cap(vector: torch.Tensor, eta: float) -> torch.Tensor:
    if math.isinf(eta):
        return vector
    # ‖v‖ as |v|_∞ ‖v / |v|_∞‖, which neither over- nor underflows
    top = (
        vector.abs().amax(dim=-1, keepdim=True)
        if vector.shape[-1]
        else vector.new_zeros((*vector.shape[:-1], 1))
    )
    unit_norm = torch.linalg.vector_norm(
        vector / torch.where(top > 0, top, torch.ones_like(top)), dim=-1, keepdim=True
    )
    # v unchanged when ||v|| <= eta; otherwise the unit direction (v / |v|_inf) / ||v / |v|_inf|| times
    # eta, so that neither eta / ||v|| (which underflows for eta = 1e-35, ||v|| = 1e30) nor 0/0 is formed
    within = top * unit_norm <= eta
    direction = vector / torch.where(top > 0, top, torch.ones_like(top))
    return torch.where(within, vector, direction * (eta / unit_norm.clamp(min=1.0)))


def _reference_vector(
    reference: Reference, dense: torch.Tensor, sparse: torch.Tensor, state: torch.Tensor | None
) -> torch.Tensor:
    if isinstance(reference, torch.Tensor):
        return reference
    if reference == "sparse":
        return sparse
    if reference == "dense":
        return dense
    if reference == "update":
        if state is None:
            raise ValueError('reference="update" needs the state (the update direction is S(ξ) - ξ)')
        return sparse - state
    raise ValueError(f"reference must be one of {REFERENCES} or a tensor, got {reference!r}")


def _gag(
    dense: torch.Tensor,
    sparse: torch.Tensor,
    scale: float,
    zeta: float = 0.0,
    eta: float = math.inf,
    reference: Reference = "sparse",
    state: torch.Tensor | None = None,
) -> torch.Tensor:
    residual = sparse - dense
    parallel, orthogonal = _decompose(residual, _reference_vector(reference, dense, sparse, state))
    update = _norm_cap(parallel, eta)
    if zeta != 0.0:
        update = update + zeta * orthogonal
    return sparse + scale * update


def _reference_direction(
    patterns: torch.Tensor, state: torch.Tensor, beta: float, alpha_sparse: float, reference: Reference
) -> torch.Tensor:
    """The reference direction u at ξ of the retrieval maps on ``patterns``: S(ξ), D(ξ) or S(ξ) − ξ."""
    if isinstance(reference, torch.Tensor):
        return reference
    dense = _retrieve(state, patterns, beta, 1.0) if reference == "dense" else state
    return _reference_vector(reference, dense, _retrieve(state, patterns, beta, alpha_sparse), state)


def _guided_map(
    patterns: torch.Tensor,
    beta: float,
    alpha_sparse: float = 1.5,
    scale: float | torch.Tensor = 1.0,
    zeta: float | torch.Tensor = 0.0,
    eta: float = math.inf,
    reference: Reference = "sparse",
    rule: Callable[..., torch.Tensor] | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """G(ξ) = rule(D(ξ), S(ξ), λ, ζ, η, reference, ξ) on the memory ``patterns`` (default rule: GAG).

    The map whose fixed points, contraction and orthogonal error the checks study: D and S are the dense
    and α-entmax retrievals of the same patterns, so ξ ↦ G(ξ) is an auto-associative guided iteration.
    ``scale`` and ``zeta`` may be tensors of shape (..., 1), one value per state, so that one batched
    iteration covers a grid of settings.
    """
    fn = _gag if rule is None else rule

    def guided(state: torch.Tensor) -> torch.Tensor:
        dense = _retrieve(state, patterns, beta, 1.0)
        sparse = _retrieve(state, patterns, beta, alpha_sparse)
        if rule is None and isinstance(zeta, torch.Tensor):
            ref = _reference_vector(reference, dense, sparse, state)
            _, orthogonal = _decompose(sparse - dense, ref)
            parallel_only = _gag(dense, sparse, scale, 0.0, eta, reference, state)  # type: ignore[arg-type]
            return parallel_only + scale * zeta * orthogonal
        return fn(dense, sparse, scale, zeta, eta, reference, state)  # type: ignore[arg-type]

    return guided


def _extrapolate(dense: torch.Tensor, sparse: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    if isinstance(scale, float | int) and dense.shape == sparse.shape and dense.dtype == sparse.dtype:
        return torch.lerp(dense, sparse, float(scale))  # D + λ(S − D) in one op (the attention hot path)
    return dense + scale * (sparse - dense)


def _ladder_extrapolate(
    retrievals: Sequence[torch.Tensor], scale: float, regularization: float = 0.0
) -> torch.Tensor:
    dense = retrievals[0]
    if len(retrievals) == 2:
        target = retrievals[1]
    else:
        rungs = torch.stack(list(retrievals))  # the iterates are rungs 0..m, their map values 1..m+1
        target, _ = _anderson_step(rungs[:-1], rungs[1:], regularization=regularization)
    return dense + scale * (target - dense)


# --------------------------------------------------------------------------------------------------
# public API


def decompose(residual: ArrayLike, reference: ArrayLike, dim: int = -1) -> tuple[ArrayLike, ArrayLike]:
    r"""Split a residual into its parts parallel and orthogonal to a reference direction.

    .. math::
        r_\parallel = \frac{\langle r, u\rangle}{\lVert u\rVert^2}\,u, \qquad r_\perp = r - r_\parallel

    (papers/theory.md §8, Def 3.5). When ``‖u‖`` is below ``16 · eps · max(|u|_∞, |r|_∞)`` the reference is
    treated as zero and ``r_∥ = 0`` by convention, so the result is always finite.

    Parameters
    ----------
    residual : tensor or array, shape (..., d)
        The residual ``r``, e.g. ``S(ξ) - D(ξ)``.
    reference : tensor or array, shape broadcastable to ``residual``
        The direction ``u``.
    dim : int
        The axis holding the vectors (default: last).

    Returns
    -------
    (parallel, orthogonal) : pair of the same kind and shape as ``residual``
        ``parallel + orthogonal == residual`` and ``⟨orthogonal, u⟩ = 0`` up to rounding.

    Examples
    --------
    >>> import torch
    >>> par, orth = decompose(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0]))
    >>> par.tolist(), orth.tolist()
    ([1.0, 0.0], [0.0, 2.0])
    """
    r, kind = as_tensor(residual, "residual", min_ndim=1)
    u, u_kind = as_tensor(reference, "reference", min_ndim=1)
    kind = result_kind(kind, u_kind)
    _check_broadcast(r, u, "reference", "residual")
    axis = check_dim(r, dim, "residual")
    r, u = promote(r, u)
    u = u.expand_as(r)
    r, u = r.movedim(axis, -1), u.movedim(axis, -1)
    parallel, orthogonal = _decompose(r, u)
    return restore(parallel.movedim(-1, axis), kind), restore(orthogonal.movedim(-1, axis), kind)


def norm_cap(vector: ArrayLike, eta: float, dim: int = -1) -> ArrayLike:
    r"""The norm cap :math:`\mathrm{clip}_\eta(v) = v \cdot \min(1, \eta / \lVert v\rVert)`.

    ``eta = math.inf`` returns ``vector`` unchanged; ``eta = 0`` returns zeros. A zero vector stays zero.

    Examples
    --------
    >>> import torch
    >>> norm_cap(torch.tensor([3.0, 4.0]), 1.0).tolist()
    [0.6000000238418579, 0.800000011920929]
    """
    v, kind = as_tensor(vector, "vector", min_ndim=1)
    eta_value = check_scalar(eta, "eta", minimum=0.0)
    axis = check_dim(v, dim, "vector")
    return restore(_norm_cap(v.movedim(axis, -1), eta_value).movedim(-1, axis), kind)


def extrapolate(dense: ArrayLike, sparse: ArrayLike, scale: float) -> ArrayLike:
    r"""Sparse-vs-dense extrapolation (PLADIS-style guidance): :math:`P_\lambda = D + \lambda (S - D)`.

    ``scale = 0`` returns ``dense``, ``scale = 1`` returns ``sparse``; ``scale > 1`` extrapolates past the
    sparse retrieval. By :func:`aa1_gamma` this is a depth-1 Anderson step with ``γ = 1 - λ``
    (papers/theory.md §5, "extrapolation is AA(1)").

    Examples
    --------
    >>> import torch
    >>> extrapolate(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]), 2.0).tolist()
    [2.0, 1.0]
    """
    d, kind = as_tensor(dense, "dense", min_ndim=1)
    s, s_kind = as_tensor(sparse, "sparse", min_ndim=1)
    _check_same_shape(s, d, "sparse", "dense")
    d, s = promote(d, s)
    kind = result_kind(kind, s_kind)
    return restore(
        _finite(_extrapolate(d, s, check_scalar(scale, "scale")), "dense, sparse and scale are"), kind
    )


def gag(
    dense: ArrayLike,
    sparse: ArrayLike,
    scale: float,
    *,
    zeta: float = 0.0,
    eta: float = math.inf,
    reference: Reference | ArrayLike = "sparse",
    state: ArrayLike | None = None,
) -> ArrayLike:
    r"""Geometry-Aware Attention Guidance (papers/theory.md §8).

    .. math::
        G = S + \lambda\,\bigl(\mathrm{clip}_\eta(r_\parallel) + \zeta\, r_\perp\bigr), \qquad r = S - D,

    with ``r`` split relative to the reference direction ``u`` (:func:`decompose`).

    Parameters
    ----------
    dense, sparse : tensor or array, shape (..., d)
        The dense (softmax) and sparse (α-entmax) retrievals ``D(ξ)`` and ``S(ξ)``.
    scale : float
        The guidance scale λ. ``scale = 0`` returns ``sparse`` exactly.
    zeta : float
        Weight of the orthogonal part (0: parallel only, the paper's recommended rule; 1 with
        ``eta = inf``: plain extrapolation ``P_{λ+1}``).
    eta : float
        Cap on the norm of the parallel part (``inf``: no cap).
    reference : {"sparse", "dense", "update"} or tensor or array
        The direction ``u``: the sparse retrieval ``S`` (default, the "retrieval direction"), the dense
        retrieval ``D``, the update direction ``S - ξ`` (needs ``state``), or a given vector broadcastable
        to ``dense``.
    state : tensor or array, optional
        The state ξ, needed only for ``reference="update"``.

    Returns
    -------
    The guided output, same kind and shape as ``dense``. It satisfies the bounded-update inequality
    ``‖G - S‖ ≤ |λ| (η + |ζ| ‖r_⊥‖)``.

    Examples
    --------
    >>> import torch
    >>> d, s = torch.tensor([1.0, 0.0]), torch.tensor([2.0, 1.0])
    >>> gag(d, s, 1.0, reference=torch.tensor([1.0, 0.0])).tolist()  # keeps only r_∥ = (1, 0)
    [3.0, 1.0]
    """
    d, kind = as_tensor(dense, "dense", min_ndim=1)
    s, s_kind = as_tensor(sparse, "sparse", min_ndim=1)
    _check_same_shape(s, d, "sparse", "dense")
    d, s = promote(d, s)
    kind = result_kind(kind, s_kind)
    scale_value = check_scalar(scale, "scale")
    zeta_value = check_scalar(zeta, "zeta")
    eta_value = check_scalar(eta, "eta", minimum=0.0)
    xi = None
    if state is not None:
        xi, xi_kind = as_tensor(state, "state", min_ndim=1)
        _check_same_shape(xi, d, "state", "dense")
        kind = result_kind(kind, xi_kind)
        xi = xi.to(d.dtype)
    ref: Reference
    if isinstance(reference, str):
        if reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES} or a tensor/array, got {reference!r}")
        if reference == "update" and xi is None:
            raise ValueError('reference="update" needs state= (the update direction is S(ξ) - ξ)')
        ref = reference
    else:
        ref, ref_kind = as_tensor(reference, "reference", min_ndim=1)
        _check_broadcast(d, ref, "reference", "dense")
        kind = result_kind(kind, ref_kind)
        ref = ref.to(d.dtype)
    guided = _gag(d, s, scale_value, zeta_value, eta_value, ref, xi)
    return restore(_finite(guided, "dense, sparse, scale and zeta are"), kind)


def aa1_gamma(scale: float) -> float:
    r"""The depth-1 Anderson coefficient that makes an AA(1) step an extrapolation: ``γ = 1 - λ``.

    With map values ``g_{k-1} = D(ξ)``, ``g_k = S(ξ)`` at a common iterate ξ, the AA(1) step
    ``g_k - γ (g_k - g_{k-1})`` equals :func:`extrapolate` ``(D, S, λ)`` exactly when ``γ = 1 - λ``
    (papers/theory.md §5). Extrapolation past the sparse retrieval (λ > 1) is a negative γ.

    >>> aa1_gamma(2.5)
    -1.5
    """
    return 1.0 - check_scalar(scale, "scale")


def anderson_optimal_scale(state: ArrayLike, dense: ArrayLike, sparse: ArrayLike) -> ArrayLike:
    r"""The Anderson-optimal guidance scale :math:`\lambda^* = 1 - \gamma^*`, per vector.

    ``γ*`` is the least-squares coefficient of the depth-1 Anderson step with iterates ``x = ξ`` and map
    values ``D(ξ), S(ξ)``: with residuals ``f_{k-1} = D - ξ``, ``f_k = S - ξ``,

    .. math:: \gamma^* = \frac{\langle f_k, f_k - f_{k-1}\rangle}{\lVert f_k - f_{k-1}\rVert^2}
              = \frac{\langle S - \xi, S - D\rangle}{\lVert S - D\rVert^2}.

    Where ``S = D`` the step is undetermined and :func:`hopfield_aa.anderson.anderson_step`'s convention
    (γ = 0, hence λ* = 1) applies.

    Returns
    -------
    Tensor or array of shape (...): one λ* per vector (last axis reduced).

    Examples
    --------
    >>> import torch
    >>> xi, d, s = torch.zeros(2), torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0])
    >>> float(anderson_optimal_scale(xi, d, s))  # γ* = <(2,0),(1,0)>/1 = 2
    -1.0
    """
    xi, kind = as_tensor(state, "state", min_ndim=1)
    d, d_kind = as_tensor(dense, "dense", min_ndim=1)
    s, s_kind = as_tensor(sparse, "sparse", min_ndim=1)
    kind = result_kind(kind, d_kind, s_kind)
    _check_same_shape(d, xi, "dense", "state")
    _check_same_shape(s, xi, "sparse", "state")
    xi, d, s = promote(xi, d, s)
    _, gamma = anderson_step(torch.stack([xi, xi]), torch.stack([d, s]), return_gamma=True)
    return restore(1.0 - cast(torch.Tensor, gamma)[..., 0], kind)


def ladder_extrapolate(
    retrievals: Sequence[ArrayLike], scale: float, *, regularization: float = 0.0
) -> ArrayLike:
    r"""Anderson-mixed α-ladder guidance: the deeper AA(m) rule of papers/theory.md §12.

    ``retrievals`` are the outputs ``y_0 = D, y_1, …, y_m`` of one retrieval at increasing α (e.g.
    α = 1, 1.25, 1.5, 2). They are read as successive iterates of a sparsifying map, ``y_{i+1} = F(y_i)``:
    the Anderson step with iterates ``x_i = y_i`` and values ``g_i = y_{i+1}`` (depth ``m - 1``,
    least-squares coefficients per vector) estimates the ladder's limit ``A``, and the rule guides toward it:

    .. math:: L_\lambda = D + \lambda\,(A - D).

    With two rungs ``[D, S]`` there are no difference columns, ``A = S`` and ``L_λ = P_λ``: the rule
    generalises :func:`extrapolate`.

    Parameters
    ----------
    retrievals : sequence of m + 1 ≥ 2 tensors or arrays of equal shape (..., d)
        Ordered from dense (α = 1) to the sparsest rung.
    scale : float
        λ.
    regularization : float
        Tikhonov weight of the least-squares problem, relative to the data (see :func:`anderson_step`).
    """
    if isinstance(retrievals, (torch.Tensor,)) or len(retrievals) < 2:
        raise ValueError("retrievals must be a sequence of at least two tensors (dense first)")
    first, kind = as_tensor(retrievals[0], "retrievals[0]", min_ndim=1)
    rungs = [first]
    for i, value in enumerate(retrievals[1:], start=1):
        rung, rung_kind = as_tensor(value, f"retrievals[{i}]", min_ndim=1)
        kind = result_kind(kind, rung_kind)
        _check_same_shape(rung, first, f"retrievals[{i}]", "retrievals[0]")
        rungs.append(rung)
    rungs = list(promote(*rungs))
    reg = check_scalar(regularization, "regularization", minimum=0.0)
    guided = _ladder_extrapolate(rungs, check_scalar(scale, "scale"), reg)
    return restore(_finite(guided, "retrievals and scale are"), kind)


def guided_map(
    patterns: ArrayLike,
    beta: float,
    scale: float,
    *,
    alpha_sparse: float = 1.5,
    zeta: float = 0.0,
    eta: float = math.inf,
    reference: str = "sparse",
) -> Callable[[ArrayLike], ArrayLike]:
    r"""The GAG map of a memory as a fixed-point map (papers/theory.md §8, §10):
    :math:`G(\xi) = S(\xi) + \lambda(\mathrm{clip}_\eta(r_\parallel) + \zeta r_\perp)` with
    :math:`D = T_1`, :math:`S = T_\alpha` on ``patterns``.

    Returns a function of states (..., d), tensors or arrays, returning the kind it is given.

    Examples
    --------
    >>> import torch
    >>> g = guided_map(torch.eye(2, dtype=torch.float64), beta=50.0, scale=1.0)
    >>> xi = torch.tensor([1.0, 0.0], dtype=torch.float64)  # a fixed point of both D and S
    >>> [round(v, 6) for v in g(xi).tolist()]
    [1.0, 0.0]
    """
    memory, _ = as_tensor(patterns, "patterns", min_ndim=2)
    beta_value = check_scalar(beta, "beta", positive=True)
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    kernel = _guided_map(
        memory,
        beta_value,
        check_scalar(alpha_sparse, "alpha_sparse", minimum=1.0),
        check_scalar(scale, "scale"),
        check_scalar(zeta, "zeta"),
        check_scalar(eta, "eta", minimum=0.0),
        reference,
    )

    def guided(state: ArrayLike) -> ArrayLike:
        xi, kind = as_tensor(state, "state", min_ndim=1)
        return restore(kernel(xi.to(memory.dtype)), kind)

    return guided


# --------------------------------------------------------------------------------------------------
# helpers


def _finite(value: torch.Tensor, names: str) -> torch.Tensor:
    """``value``, or a ValueError naming the inputs when finite inputs overflowed the compute dtype."""
    if value.numel() > 0 and not bool(torch.isfinite(value).all()):
        raise ValueError(
            f"the result overflows {value.dtype}: {names} too large for it (scale down or use float64)"
        )
    return value


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} must have the shape of {name_b} {tuple(b.shape)}, got {tuple(a.shape)}")


def _check_broadcast(target: torch.Tensor, other: torch.Tensor, name: str, target_name: str) -> None:
    try:
        shape = torch.broadcast_shapes(target.shape, other.shape)
    except RuntimeError:
        shape = None
    if shape != target.shape:
        raise ValueError(
            f"{name} must broadcast to the shape of {target_name} {tuple(target.shape)}, "
            f"got {tuple(other.shape)}"
        )
