"""Reference implementations of the normalisers, used only to check the fast solvers: sparsemax by
sorting (Martins & Astudillo 2016), 1.5-entmax by sorting (Peters et al. 2019; the package keeps it
because a benchmark times it), α-entmax by plain bisection, and α-entmax of one row in 40-digit
arithmetic (mpmath, which sympy brings)."""

from __future__ import annotations

import mpmath
import numpy as np
import torch

from hopfield_aa.normalizers import entmax15_sort
from hopfield_aa.normalizers.exact import sparsemax_threshold_sort

__all__ = ["entmax15_sort", "entmax_bisect", "entmax_digits", "sparsemax_sort"]


def sparsemax_sort(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sparsemax by sorting."""
    z = scores.movedim(dim, -1)
    u = z - z.amax(-1, keepdim=True)
    return (u - sparsemax_threshold_sort(u)).clamp(min=0).movedim(-1, dim)


def entmax_bisect(scores: torch.Tensor, alpha: float, dim: int = -1, n_iter: int = 200) -> torch.Tensor:
    """α-entmax by plain bisection of τ on [max u − 1, max u − N^{1−α}] (u = (α−1) z)."""
    z = scores.movedim(dim, -1)
    u = (z - z.amax(-1, keepdim=True)) * (alpha - 1)
    n = z.shape[-1]
    lo = torch.full_like(u[..., :1], -1.0)
    hi = torch.full_like(u[..., :1], -(n ** (1 - alpha)))
    for _ in range(n_iter):
        mid = (lo + hi) / 2
        mass = (u - mid).clamp(min=0).pow(1 / (alpha - 1)).sum(-1, keepdim=True)
        lo = torch.where(mass >= 1, mid, lo)
        hi = torch.where(mass >= 1, hi, mid)
    p = (u - (lo + hi) / 2).clamp(min=0).pow(1 / (alpha - 1))
    return (p / p.sum(-1, keepdim=True)).movedim(-1, dim)


def entmax_digits(row: np.ndarray, alpha: float, digits: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """(p, |dp/dλ|) of α-entmax of one float64 row (finite max), in ``digits``-digit arithmetic: the
    scores taken exactly, λ by 140 halvings of its bracket [0, 1/(α−1)] (λ in score units, max z = 0),
    each rounded to float64 at the end. |dp_i/dλ| = p_i/y_i, y_i = 1 + (α−1)(z_i − λ): what an error of
    λ (a solver's rounding) does to p_i, so a test can allow for the conditioning of each row."""
    with mpmath.workdps(digits):
        am1 = mpmath.mpf(alpha) - 1
        top = max(mpmath.mpf(float(v)) for v in row if v > -np.inf)
        u = [mpmath.mpf(float(v)) - top if v > -np.inf else None for v in row]

        def ys(lam: mpmath.mpf) -> list[mpmath.mpf]:
            return [
                1 + am1 * (v - lam) if v is not None and 1 + am1 * (v - lam) > 0 else mpmath.mpf(0) for v in u
            ]

        lo, hi = mpmath.mpf(0), 1 / am1
        for _ in range(140):
            mid = (lo + hi) / 2
            if sum(y ** (1 / am1) for y in ys(mid)) >= 1:
                lo = mid
            else:
                hi = mid
        y = ys(lo)
        p = [v ** (1 / am1) for v in y]
        total = sum(p)
        return (
            np.array([float(v / total) for v in p]),
            np.array([float(pv / total / v) if v > 0 else 0.0 for pv, v in zip(p, y, strict=True)]),
        )
