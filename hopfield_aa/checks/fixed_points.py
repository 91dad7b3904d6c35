"""Fixed points the claims need: iterate the dense and sparse retrieval maps (Anderson-accelerated, with a
stability test), classify each fixed point as common to both maps or not, and record convergence curves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hopfield_aa.anderson import anderson
from hopfield_aa.checks.results import Case, tolerance
from hopfield_aa.hopfield import _local_lipschitz, _retrieve

HALF = (torch.float16, torch.bfloat16)


def solver_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype solvers and eigenvalue routines run in: ``dtype`` itself, float32 for half types (which
    the Anderson solver and LAPACK do not take); the maps they iterate are still evaluated in ``dtype``."""
    return torch.float32 if dtype in HALF else dtype


def in_dtype(
    fn: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` evaluated in ``dtype`` on states of any dtype, returning the solver dtype."""
    if dtype not in HALF:
        return fn
    return lambda x: fn(x.to(dtype)).to(solver_dtype(dtype))


def local_lipschitz(state: torch.Tensor, patterns: torch.Tensor, beta: float, alpha: float) -> torch.Tensor:
    """‖DT_α(ξ)‖₂ per state (the Jacobian's largest eigenvalue; half types computed in float32)."""
    dtype = solver_dtype(state.dtype)
    return _local_lipschitz(state.to(dtype), patterns.to(dtype), beta, alpha).to(state.dtype)


def spectral_radius_fd(
    fn: Callable[[torch.Tensor], torch.Tensor], points: torch.Tensor, scale: float
) -> torch.Tensor:
    """ρ(Dfn(ξ*)) per row of ``points`` by central differences (step ``eps^{1/3} · scale``), for maps whose
    Jacobian has no closed form (G, custom maps); eigenvalues of the non-symmetric Jacobian."""
    k, d = points.shape
    if k == 0:
        return torch.zeros(0, dtype=points.dtype)
    h = torch.finfo(points.dtype).eps ** (1.0 / 3.0) * max(scale, 1e-300)
    basis = torch.eye(d, dtype=points.dtype) * h
    plus = fn((points[:, None, :] + basis).reshape(-1, d)).reshape(k, d, d)
    minus = fn((points[:, None, :] - basis).reshape(-1, d)).reshape(k, d, d)
    jac = ((plus - minus) / (2 * h)).mT  # (k, out, in)
    return torch.linalg.eigvals(jac).abs().amax(dim=-1).to(points.dtype)


def distinct(points: torch.Tensor, radius: float) -> torch.Tensor:
    """Indices of the first of each group of rows within ``radius`` of each other (greedy, in order): a row
    is kept when it is farther than ``radius`` from every row kept before it."""
    count = points.shape[0]
    if count == 0:
        return torch.zeros(0, dtype=torch.long)
    # the pairwise distances in blocks of rows (the same differences and norms as row by row), then the
    # greedy pass on booleans; a NaN distance is not "farther"
    block = max(1, (1 << 22) // max(1, count * points.shape[-1]))
    far = [
        row
        for start in range(0, count, block)
        for row in (
            torch.linalg.vector_norm(points[start : start + block, None, :] - points[None, :, :], dim=-1)
            > radius
        ).tolist()
    ]
    keep: list[int] = []
    for i in range(count):
        if all(far[k][i] for k in keep):
            keep.append(i)
    return torch.tensor(keep, dtype=torch.long)


def premise_beta(patterns: torch.Tensor, threshold: float, alpha_sparse: float = 1.5) -> float:
    r"""The smallest β at which some stored pattern x_i is a fixed point of both D and S (to τ).

    With gaps ``Δ_ij = ‖x_i‖² − ⟨x_i, x_j⟩`` and ``Δ_i = min_{j≠i} Δ_ij`` (x_i must be a vertex: Δ_i > 0),
    α-entmax weights x_i alone once ``(α − 1) β Δ_i ≥ 1``, and the softmax retrieval is within τ of x_i
    once ``(N − 1) D e^{−βΔ_i} ≤ τ`` (D the diameter of the patterns): ``β_i = max(1/((α−1)Δ_i),
    ln((N−1)D/τ)/Δ_i)``, and the premise of fixed-point preservation is attainable from ``min_i β_i``
    (a sufficient condition at the patterns; other common fixed points need symmetry). ``inf`` when no
    pattern is a vertex or N = 1 gives 0.
    """
    x = patterns.double()
    n = x.shape[0]
    if n == 1:
        return 0.0
    gram = x @ x.T
    gaps = gram.diagonal()[:, None] - gram
    gaps.fill_diagonal_(math.inf)
    delta = gaps.amin(dim=1)
    diameter = float(torch.cdist(x, x).max())
    if diameter <= 0:
        return 0.0
    dense = math.log(max((n - 1) * diameter / max(threshold, 1e-300), 1.0)) / delta
    sparse = 1.0 / ((alpha_sparse - 1.0) * delta) if alpha_sparse > 1 else torch.zeros_like(delta)
    beta = torch.where(delta > 0, torch.maximum(dense, sparse), torch.full_like(delta, math.inf))
    return float(beta.min())


def lipschitz_bounds(
    states: torch.Tensor, patterns: torch.Tensor, beta: float, alpha: float
) -> tuple[float, torch.Tensor]:
    r"""N-independent bounds on ‖DT_α‖: (global, local per state).

    ``DT = β σ Cov_q(X_S)`` (σ = 1 for softmax), and a variance along a unit direction is at most a quarter
    of the squared range (Popoviciu), so ``‖DT_α(ξ)‖ ≤ β σ(ξ) D_S(ξ)²/4`` with D_S the diameter of the
    patterns in the support of entmax_α(βXξ) and σ = Σ_S p_i^{2−α}. For softmax the support is every
    pattern and the bound ``β D²/4`` holds everywhere (the global value returned); for α > 1 σ ≤ |S|^{α−1}
    grows with the support, so only the local values are N-independent (the global value returned is
    ``inf``).
    """
    from hopfield_aa.normalizers import _entmax_tensor

    x = patterns.to(solver_dtype(patterns.dtype))
    xi = states.to(x.dtype)
    if alpha == 1.0:
        bound = beta * float(torch.cdist(x, x).max()) ** 2 / 4.0
        return bound, torch.full(xi.shape[:-1], bound, dtype=x.dtype)
    probs = _entmax_tensor(beta * xi @ x.T, alpha, -1)
    support = probs > 0
    sigma = torch.where(support, probs.clamp(min=torch.finfo(x.dtype).tiny) ** (2.0 - alpha), 0.0).sum(-1)
    # one diameter per distinct support (states on one trajectory share few)
    supports, which = torch.unique(support.reshape(-1, support.shape[-1]), dim=0, return_inverse=True)
    per_support = [float(torch.cdist(x[s], x[s]).max()) if int(s.sum()) > 1 else 0.0 for s in supports]
    diameters = torch.tensor(per_support, dtype=x.dtype)[which]
    return math.inf, beta * sigma * diameters.reshape(sigma.shape) ** 2 / 4.0


# Fixed points count as reached when ‖T(ξ*) − ξ*‖ ≤ FIXED_POINT_FACTOR · eps · M. The solver stops at
# its rounding floor 16 · eps · ‖T(ξ)‖ ≤ 16 · eps · M; 256 leaves room for the rounding of one more map
# evaluation (an inner product of length N and a sum of N patterns) without accepting a point that is
# visibly not fixed (a dense map at β ≈ 30 misses a pattern by about e^{-30} ≈ 1e-13 ≫ 256 eps ≈ 6e-14·M only
# when the gap is near 1, which is the point of the β sweep).
FIXED_POINT_FACTOR = 256.0


@dataclass(frozen=True)
class FixedPoints:
    """The fixed points reached from each starting state, for the dense and the sparse map.

    Attributes
    ----------
    alpha_dense, alpha_sparse : float
        α of the two maps (1 and 1.5 by default).
    dense, sparse : Tensor, shape (M, d)
        The limits of the two iterations from each starting state.
    dense_residual, sparse_residual : Tensor, shape (M,)
        ``‖D(ξ*_D) − ξ*_D‖`` and ``‖S(ξ*_S) − ξ*_S‖``.
    dense_cross, sparse_cross : Tensor, shape (M,)
        The other map's residual there: ``‖S(ξ*_D) − ξ*_D‖`` and ``‖D(ξ*_S) − ξ*_S‖`` (= ``‖r‖`` at a
        fixed point).
    dense_radius, sparse_radius : Tensor, shape (M,)
        Spectral radius of the map's Jacobian at its fixed point: < 1 attracting, ≥ 1 a saddle.
    threshold : float
        τ = :data:`FIXED_POINT_FACTOR` · eps · M: a residual ≤ τ counts as zero.
    n_iter_dense, n_iter_sparse : Tensor, shape (M,)
        Accepted Anderson steps.
    scale : float
        ``M``, the largest pattern norm.
    premise_beta : float
        The β from which some pattern is a common fixed point (:func:`premise_beta`).
    """

    alpha_dense: float
    alpha_sparse: float
    dense: torch.Tensor
    sparse: torch.Tensor
    dense_residual: torch.Tensor
    sparse_residual: torch.Tensor
    dense_cross: torch.Tensor
    sparse_cross: torch.Tensor
    dense_radius: torch.Tensor
    sparse_radius: torch.Tensor
    threshold: float
    n_iter_dense: torch.Tensor
    n_iter_sparse: torch.Tensor
    scale: float = 1.0
    premise_beta: float = math.nan

    @property
    def dense_converged(self) -> torch.Tensor:
        return self.dense_residual <= self.threshold

    @property
    def sparse_converged(self) -> torch.Tensor:
        return self.sparse_residual <= self.threshold

    @property
    def dense_common(self) -> torch.Tensor:
        """Dense fixed points that the sparse map also fixes (to τ)."""
        return self.dense_converged & (self.dense_cross <= self.threshold)

    @property
    def sparse_common(self) -> torch.Tensor:
        """Sparse fixed points that the dense map also fixes (to τ)."""
        return self.sparse_converged & (self.sparse_cross <= self.threshold)

    @property
    def dense_non_common(self) -> torch.Tensor:
        """Dense fixed points with ``S(ξ*) ≠ ξ*``: where extrapolation diverges (Remark 3.4)."""
        return self.dense_converged & (self.dense_cross > self.threshold)

    def common_points(self) -> torch.Tensor:
        """The distinct fixed points common to both maps (dense and sparse limits), shape (K, d)."""
        points = torch.cat([self.dense[self.dense_common], self.sparse[self.sparse_common]])
        return points[distinct(points, self.merge_radius)]

    def distinct_points(self) -> torch.Tensor:
        """The distinct fixed points of either map (dense and sparse limits), shape (K, d)."""
        points = torch.cat([self.dense[self.dense_converged], self.sparse[self.sparse_converged]])
        return points[distinct(points, self.merge_radius)]

    @property
    def merge_radius(self) -> float:
        """Two limits closer than ``√(τ M)`` are one fixed point (reached from different states)."""
        return math.sqrt(self.threshold * self.scale)

    def summary(self) -> dict[str, float | int]:
        """Counts and shares for the report (JSON-ready): per starting state, and of distinct fixed points."""
        m = int(self.dense.shape[0])
        n_distinct = int(self.distinct_points().shape[0])
        n_common = int(self.common_points().shape[0])
        return {
            "states": m,
            "distinct_fixed_points": n_distinct,
            "distinct_common": n_common,
            "distinct_common_share": n_common / n_distinct if n_distinct else math.nan,
            "premise_beta": self.premise_beta,
            "dense_converged": int(self.dense_converged.sum()),
            "sparse_converged": int(self.sparse_converged.sum()),
            "dense_common": int(self.dense_common.sum()),
            "sparse_common": int(self.sparse_common.sum()),
            "dense_non_common": int(self.dense_non_common.sum()),
            "dense_unstable": int((self.dense_converged & (self.dense_radius >= 1)).sum()),
            "sparse_unstable": int((self.sparse_converged & (self.sparse_radius >= 1)).sum()),
            "common_share": (int(self.dense_common.sum()) + int(self.sparse_common.sum()))
            / max(1, int(self.dense_converged.sum()) + int(self.sparse_converged.sum())),
            "threshold": self.threshold,
        }


def solve_fixed_points(
    patterns: torch.Tensor,
    states: torch.Tensor,
    beta: float,
    alpha: float,
    *,
    m: int = 5,
    max_iter: int = 300,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Limits of ``T_α`` from each state by AA(m) with a stability test: (points, residuals, n_iter).

    ``residuals`` are ``‖T_α(ξ*) − ξ*‖``; a row counts as a fixed point when it is at most τ.
    """

    def g(x: torch.Tensor) -> torch.Tensor:
        return _retrieve(x, patterns, beta, alpha)

    dtype = states.dtype
    # tol far below the rounding floor: rows stop at ‖f‖ ≤ 16 eps ‖g(x)‖ (see anderson's docstring); half
    # types: the map is evaluated in the half type, the solver's state is float32
    result = anderson(
        in_dtype(g, dtype),
        states.to(solver_dtype(dtype)),
        m=m,
        tol=1e-30,
        max_iter=max_iter,
        stability_check=True,
        row_subsets=True,  # the map is row-wise: only the rows still iterating are evaluated
    )
    x = torch.as_tensor(result.x).to(dtype)
    return x, torch.linalg.vector_norm(g(x) - x, dim=-1), torch.as_tensor(result.n_iter)


def find_fixed_points(
    case: Case,
    *,
    alpha_dense: float = 1.0,
    alpha_sparse: float = 1.5,
    m: int = 5,
    max_iter: int = 300,
) -> FixedPoints:
    r"""Iterate ``D = T_1`` and ``S = T_α`` from every starting state and classify the fixed points reached.

    Each map is iterated by AA(m) with a stability test (:func:`hopfield_aa.anderson.anderson` with
    ``stability_check=True``: a row that converges to a saddle, spectral radius ≥ 1, restarts from a
    perturbed point and finally falls back to plain iteration, which leaves repelling points). A limit is a
    fixed point when its residual is at most τ = 256 · eps · M; a dense fixed point is *common* when also
    ``‖S(ξ*) − ξ*‖ ≤ τ`` (then every guidance rule keeps it, Lemma 3.3), otherwise *non-common* (then
    extrapolation moves it by ``|λ| ‖r(ξ*)‖``, Remark 3.4). Softmax weights are never exactly sparse, so
    common fixed points exist only where the dense map's weights off one pattern fall below rounding
    (``β Δ ≳ 36`` in float64) or by symmetry: their share grows with β
    (see :func:`~hopfield_aa.checks.families.beta_sweep`).

    Parameters
    ----------
    case : Case
    alpha_dense, alpha_sparse : float
        α of the dense and sparse maps.
    m : int
        Anderson depth.
    max_iter : int
        Iteration limit per map.

    Returns
    -------
    FixedPoints
    """
    patterns, beta = case.patterns, case.beta
    threshold = tolerance(patterns.dtype, FIXED_POINT_FACTOR) * case.pattern_scale
    dense, dense_residual, it_d = solve_fixed_points(
        patterns, case.states, beta, alpha_dense, m=m, max_iter=max_iter
    )
    sparse, sparse_residual, it_s = solve_fixed_points(
        patterns, case.states, beta, alpha_sparse, m=m, max_iter=max_iter
    )

    def res(x: torch.Tensor, alpha: float) -> torch.Tensor:
        return torch.linalg.vector_norm(_retrieve(x, patterns, beta, alpha) - x, dim=-1)

    return FixedPoints(
        alpha_dense=alpha_dense,
        alpha_sparse=alpha_sparse,
        dense=dense,
        sparse=sparse,
        dense_residual=dense_residual,
        sparse_residual=sparse_residual,
        dense_cross=res(dense, alpha_sparse),
        sparse_cross=res(sparse, alpha_dense),
        dense_radius=local_lipschitz(dense, patterns, beta, alpha_dense),
        sparse_radius=local_lipschitz(sparse, patterns, beta, alpha_sparse),
        threshold=threshold,
        n_iter_dense=it_d,
        n_iter_sparse=it_s,
        scale=case.pattern_scale,
        premise_beta=premise_beta(patterns, threshold, alpha_sparse),
    )


def residual_curves(
    case: Case, alpha: float = 1.0, depths: Sequence[int] = (0, 1, 2, 5), max_iter: int = 100
) -> dict[str, list[float]]:
    r"""Median residual ``‖T_α(x_k) − x_k‖ / M`` over the starting states, per iteration, for plain
    iteration (depth 0) and AA(m).

    Returns
    -------
    dict mapping ``"plain"`` / ``"AA(m)"`` to the list of median relative residuals (iteration 0 first);
    a curve ends when every state has converged.
    """
    patterns, beta = case.patterns, case.beta
    scale = case.pattern_scale
    out: dict[str, list[float]] = {}
    for m in depths:
        result = anderson(
            in_dtype(lambda x: _retrieve(x, patterns, beta, alpha), patterns.dtype),
            case.states.to(solver_dtype(patterns.dtype)),
            m=m,
            tol=1e-30,
            max_iter=max_iter,
            row_subsets=True,
        )
        hist = torch.as_tensor(result.residual_norms) / scale
        out["plain" if m == 0 else f"AA({m})"] = hist.median(dim=-1).values.tolist()
    return out
