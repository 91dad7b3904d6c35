"""α-entmax for any α > 1: Newton's method on the threshold λ in score units, safeguarded by bisection,
and the repair of entries at the edge of the support for α > 2 (papers/theory.md §1).

``p_i = [1 + (α−1)(z_i − λ)]_+^{1/(α−1)}`` with Σ p = 1, i.e. τ = (α−1) λ − 1; λ tends to logsumexp as
α → 1, which keeps every α ≥ 1 accurate in one formula. Rows are shifted to max z = 0, so λ starts at
the left end of its bracket [0, (1 − N^{1−α})/(α−1)].
"""

from __future__ import annotations

import math

import torch

MAX_NEWTON_ITER = 60

Alpha = float | torch.Tensor  # one α > 1, or one per row: shape (rows, 1)


def _mass(
    u: torch.Tensor, lam: torch.Tensor, am1: Alpha, p: torch.Tensor, x: torch.Tensor, q: torch.Tensor
) -> torch.Tensor:
    """Σp with p = exp(log1p(x)/(α−1)) written into ``p`` and x = max((α−1)(z − λ), −1) into ``x``.

    The CPU's exp takes a slow path on −inf and on arguments whose result is subnormal (measured, float32,
    one thread: 3× and up to 30× the time of finite arguments), and every entry off the support has
    log1p(−1) = −inf. So the exponent is clamped at ``e = log(tiny) + 1/2`` and twice exp(e) subtracted
    after, clamping at 0: entries off the support (and those whose p is below 2 exp(e), under the
    smallest normal number anyway) are exact zeros; the others move by 2 exp(e) ≈ 1e-38 (float32).
    """
    floor = math.log(torch.finfo(u.dtype).tiny) + 0.5
    torch.sub(u, lam * am1, out=x).clamp_(min=-1.0)
    torch.mul(torch.log1p(x, out=q), 1.0 / am1, out=p).clamp_(min=floor).exp_()
    p.sub_(2.0 * math.exp(floor)).clamp_(min=0.0)
    return p.sum(-1, keepdim=True)


def newton_threshold(
    z: torch.Tensor,
    alpha: Alpha,
    p: torch.Tensor,
    *,
    max_iter: int = MAX_NEWTON_ITER,
    stop_early: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """λ of α-entmax for rows ``z`` (max 0); writes the unnormalised p into ``p``; returns (λ, done).

    With F(λ) = Σ p_i and G(λ) = Σ p_i^{2−α} = −F'(λ), Newton on g = F^{α−1} − 1 (a p-norm of
    non-negative convex functions, hence convex for α ≤ 2) gives the step
    Δλ = expm1((α−1) log F)/(α−1) · F^{2−α}/G, monotone from the left end λ₀ = 0 for α ≤ 2, and one
    more step once |F − 1| is at rounding level (the polish on the found support). For α > 2, g is
    concave only between the points where an entry enters the support (there F′ is unbounded): while
    such a point lies in the bracket, every other step bisects; once the support counts at the two
    ends agree, none does, and a step from the left end is replaced by the step from the right end
    where that one is nearer (both land at or right of the root, which the steps from the right then
    approach monotonically: quadratic convergence instead of the bisection's halving). ``done`` marks
    the rows whose polished F is within 32 eps of 1 or whose bracket has collapsed. ``stop_early`` ends
    the passes once every row is done (the compiled backend runs exactly ``max_iter`` evaluations
    instead).
    """
    am1 = alpha - 1.0
    big = alpha > 2.0  # a bool, or a mask of the rows
    u = z * am1
    x = torch.empty_like(z)
    q = torch.empty_like(z)
    lam = torch.zeros_like(z[:, :1])
    lo = lam
    hi = -torch.expm1(-am1 * torch.full_like(lam, z.shape[-1]).log()) / am1
    eps = torch.finfo(z.dtype).eps
    tol = 32 * eps
    width_tol = 4 * eps * hi
    polished = torch.zeros_like(lam, dtype=torch.bool)
    done = polished
    concave = big if isinstance(big, bool) else bool(big.any())  # some row takes the α > 2 rules
    live_lo = live_hi = torch.full_like(lam, -1, dtype=torch.long)  # support counts at the bracket's ends
    f_hi = g_hi = torch.ones_like(lam)  # F and −F′ at the right end
    for it in range(max_iter):
        f_sum = _mass(u, lam, am1, p, x, q)
        converged = (f_sum - 1).abs() <= tol
        done = (converged & polished) | (hi - lo <= width_tol)
        if it == max_iter - 1 or (stop_early and bool(done.all())):
            break
        polished = converged
        left = f_sum >= 1
        if concave:
            live = (x > -1.0).sum(-1, keepdim=True)
            live_lo = torch.where(left, live, live_lo)
            live_hi = torch.where(left, live_hi, live)
        # Σ p^{2−α}, with p^{2−α} = p/(1 + x) on the support (0/0 off it)
        g_sum = torch.div(p, x.add_(1.0), out=q).nan_to_num_(nan=0.0).sum(-1, keepdim=True)
        lo = torch.where(left, torch.maximum(lo, lam), lo)
        hi = torch.where(left, hi, torch.minimum(hi, lam))
        new = lam + _newton_step(f_sum, g_sum, am1)
        forced = big if it % 2 == 1 else False
        if concave:
            f_hi = torch.where(left, f_hi, f_sum)
            g_hi = torch.where(left, g_hi, g_sum)
            smooth = big & (live_lo == live_hi)
            back = hi + _newton_step(f_hi, g_hi, am1)
            new = torch.where(smooth & left & ~(new < back), back, new)
            forced = forced & ~smooth
        bad = (new < lo) | (new > hi) | ~torch.isfinite(new) | forced
        lam = torch.where(done, lam, torch.where(bad, 0.5 * (lo + hi), new))
    return lam, done


def _newton_step(f_sum: torch.Tensor, g_sum: torch.Tensor, am1: Alpha) -> torch.Tensor:
    """Newton's step on g = F^{α−1} − 1 from a point where F = ``f_sum`` and −F′ = ``g_sum``."""
    log_f = f_sum.log()
    return torch.expm1(am1 * log_f) / am1 * torch.exp((1.0 - am1) * log_f) / g_sum


def newton_entmax(z: torch.Tensor, alpha: Alpha, out: torch.Tensor) -> torch.Tensor:
    """α-entmax of rows ``z`` (max 0) into ``out``; returns λ (relative to the row maximum, keepdim).

    :func:`newton_threshold`, then the support edge of the rows with α > 2 (:func:`fill_support_edge`),
    then normalisation.
    """
    lam, _ = newton_threshold(z, alpha, out)
    if isinstance(alpha, torch.Tensor):
        rows = (alpha > 2.0).squeeze(-1).nonzero().squeeze(-1)
        if rows.numel() > 0:
            am1 = alpha[rows] - 1.0
            p_big = out[rows]
            lam[rows] = fill_support_edge(p_big, z[rows] * am1, lam[rows], am1)
            out[rows] = p_big
    elif alpha > 2.0:
        lam = fill_support_edge(out, z * (alpha - 1.0), lam, alpha - 1.0)
    out.div_(out.sum(-1, keepdim=True))
    return lam


def fill_support_edge(out: torch.Tensor, u: torch.Tensor, lam: torch.Tensor, am1: Alpha) -> torch.Tensor:
    """For α > 2, solve again the rows with entries at the edge of the support (in place); returns λ.

    p_i = y_i^{1/(α−1)} with y_i = 1 + (α−1)(z_i − λ): an entry with y_i at rounding level can still
    carry visible mass (α = 10: y = 1e-17 is p = 0.013), which y_i, computed with an absolute error of
    a few eps, cannot resolve; F(λ) = Σ p jumps over 1 where such an entry enters the support, and
    Newton's λ absorbs the error. At the root y_edge is 0 to rounding level, so λ is where it vanishes,
    the other entries follow from it accurately and the edge entries carry 1 − Σ_{others} p (tied to
    rounding level, they share it equally). Normalising instead would put that mass on the others.
    """
    eps = torch.finfo(u.dtype).eps
    y = 1.0 + u - lam * am1
    edge = (y.abs() <= 8 * eps * (1.0 + u.abs() + (lam * am1).abs())) & (u > -math.inf)
    rows = edge.any(-1, keepdim=True)
    if not bool(rows.any()):
        return lam
    lam_edge = (1.0 + torch.where(edge, u, -math.inf).amax(-1, keepdim=True)) / am1
    lam = torch.where(rows, lam_edge, lam)
    y = (1.0 + u - lam * am1).clamp(min=0.0)
    p = torch.where(edge, 0.0, torch.exp(torch.log(y) / am1))
    share = (1.0 - p.sum(-1, keepdim=True)).clamp(min=0.0) / edge.sum(-1, keepdim=True).clamp(min=1)
    out.copy_(torch.where(rows, torch.where(edge, share, p), out))
    return lam
