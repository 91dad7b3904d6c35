"""Fixed points the claims need: iterate the dense and sparse retrieval maps (Anderson-accelerated, with a
stability test), classify each fixed point as common to both maps or not, and record convergence curves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hopfield_aa.anderson import anderson
from hopfield_aa.checks.results import Case, tolerance
from hopfield_aa.hopfield import _local_lipschitz as local_lipschitz
from hopfield_aa.hopfield import _retrieve

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
        """All fixed points common to both maps (dense and sparse limits), shape (K, d)."""
        return torch.cat([self.dense[self.dense_common], self.sparse[self.sparse_common]])

    def summary(self) -> dict[str, float | int]:
        """Counts and shares for the report (JSON-ready)."""
        m = int(self.dense.shape[0])
        return {
            "states": m,
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

    # tol far below the rounding floor: rows stop at ‖f‖ ≤ 16 eps ‖g(x)‖ (see anderson's docstring)
    result = anderson(g, states, m=m, tol=1e-30, max_iter=max_iter, stability_check=True)
    x = torch.as_tensor(result.x)
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
            lambda x: _retrieve(x, patterns, beta, alpha), case.states, m=m, tol=1e-30, max_iter=max_iter
        )
        hist = torch.as_tensor(result.residual_norms) / scale
        out["plain" if m == 0 else f"AA({m})"] = hist.median(dim=-1).values.tolist()
    return out
