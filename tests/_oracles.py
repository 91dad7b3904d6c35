"""Reference implementations of the normalisers, used only to check the fast solvers: sparsemax by
sorting (Martins & Astudillo 2016), 1.5-entmax by sorting (Peters et al. 2019; the package keeps it
because a benchmark times it) and α-entmax by plain bisection."""

from __future__ import annotations

import torch

from hopfield_aa.normalizers import entmax15_sort
from hopfield_aa.normalizers.exact import sparsemax_threshold_sort

__all__ = ["entmax15_sort", "entmax_bisect", "sparsemax_sort"]


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
