"""Separation maps of papers/theory.md §1: softmax, sparsemax, 1.5-entmax and α-entmax for any α ≥ 1
(sort-free exact solvers, sort-based references), their Jacobians, Jacobian-vector products, thresholds
and conjugates.
"""

# Conventions. For α > 1, p_i = [(α−1) z_i − τ]_+^{1/(α−1)} with Σ p = 1. Internally the threshold is
# also written in score units λ, (α−1) z_i − τ = 1 + (α−1)(z_i − λ), i.e. τ = (α−1) λ − 1; λ tends to
# logsumexp as α → 1, which keeps every α ≥ 1 accurate in one formula.
#
# Solvers (sort-free, vectorised over rows, on cache-sized row blocks):
# - α = 2 and α = 1.5: the exact threshold of a candidate support S = {u > τ} (u = (α−1) z) is linear
#   (α = 2) or the root of a quadratic (α = 1.5). Starting from the left end of the bracket
#   τ₀ = max u − 1 and re-solving on the support each new threshold induces reaches, in a handful of
#   passes, a threshold whose support reproduces itself: that fixed point is exact (checked by counting
#   the support; any row that does not settle is repaired by the sort algorithm).
# - other α: Newton's method on the convex decreasing g(λ) = ‖[1 + (α−1)(z − λ)]_+‖_{1/(α−1)} − 1 from
#   the left end of the bracket (monotone for α ≤ 2; safeguarded by bisection for α > 2), one more
#   Newton step once |Σp − 1| is at rounding level (the polish on the found support), then normalisation.
# Work layout: the threshold never drops below the left end of its bracket, so only the candidates
# z_i > max z − 1/(α−1) can be in the support; they are compacted into a (rows, K) matrix (K = the
# largest candidate count, a second group for rare wide rows) and the solvers run on it (general α
# always; α = 1.5 and 2 for rows of ≥ _COMPACT_MIN_N entries, where it pays off). Support passes
# continue on the unsettled rows only once half of the rows have settled.
# Opt-in backend (set_backend("compiled"), entmax_backend(...), HOPFIELD_AA_ENTMAX_BACKEND=compiled): the
# same updates on the full rows, a fixed number of passes fused by torch.compile, then the same exactness
# test; rows that fail it (and all −inf rows) are solved again by the eager kernel.
# The sort-based algorithms (Martins & Astudillo 2016; Peters et al. 2019) and a plain bisection are kept
# (_sparsemax_sort, _entmax15_sort, _entmax_bisect) to cross-check the fast solvers.

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from hopfield_aa._arrays import ArrayLike, as_tensor, check_alpha, check_dim, restore, result_kind

__all__ = [
    "entmax",
    "entmax15",
    "entmax_backend",
    "entmax_conjugate",
    "entmax_jacobian",
    "entmax_jvp",
    "entmax_threshold",
    "get_backend",
    "set_backend",
    "softmax",
    "sparsemax",
]

_HALF = (torch.float16, torch.bfloat16)
# Rows are processed in blocks of about this many entries (α = 1.5 and 2; general α: the smaller
# size, whose Newton passes run until the slowest row of the block has converged). Measured.
_BLOCK_ELEMENTS = 1 << 20
_BLOCK_ELEMENTS_GENERAL = 1 << 17
_MAX_SUPPORT_ITER = 24
_MAX_NEWTON_ITER = 60
_SPLIT = 4  # a second, wider candidate group when some row has 4× the typical count
_COMPACT_MIN_N = 128  # α = 1.5 and 2 compact rows of at least this length (general α: always)


# --------------------------------------------------------------------------------------------------
# exact solvers for α = 2 and α = 1.5 (threshold τ in u = (α−1) z units, rows shifted to max u = 0)
# --------------------------------------------------------------------------------------------------


def _support_stats(u: torch.Tensor, tau: torch.Tensor, d: torch.Tensor, squares: bool) -> tuple[Any, ...]:
    """[u − τ]_+ (in place in ``d[0]``; ``d[1]`` is scratch); returns Σd, Σd² (if ``squares``), |{d > 0}|.

    Every full-size intermediate lives in the two preallocated buffers: fresh allocations of this
    size cost page faults that would dominate the solver's time.
    """
    d, e = d[0], d[1]
    torch.sub(u, tau, out=d)
    d.clamp_(min=0)
    s1 = d.sum(-1, keepdim=True)
    count = torch.sign(d, out=e).sum(-1, keepdim=True)
    s2 = torch.linalg.vecdot(d, d).unsqueeze(-1) if squares else None
    return s1, s2, count


_State = tuple[torch.Tensor, torch.Tensor]


def _iterate_support(
    u: torch.Tensor, d: torch.Tensor, squares: bool, update: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run support passes ``update(τ, Σd, Σd², |S|, state) -> (settled, τ_new, state)`` from τ₀ = −1.

    Most rows settle in two or three passes while a few need more, so once at least half of the rows
    still iterated have settled, their thresholds are stored and the passes go on with the others
    only. Returns (τ, settled mask) for all rows.
    """
    tau = torch.full_like(u[:, :1], -1.0)
    state: _State = (torch.full_like(tau, -1.0), torch.zeros_like(tau, dtype=torch.bool))
    result = tau.clone()
    done = torch.zeros_like(tau, dtype=torch.bool)
    idx: torch.Tensor | None = None  # rows of u still iterated (None: all)
    cur = u
    for _ in range(_MAX_SUPPORT_ITER):
        s1, s2, count = _support_stats(cur, tau, d[:, : cur.shape[0]], squares)
        settled, new_tau, state = update(tau, s1, s2, count, state)
        n_settled = int(settled.sum())
        if n_settled == cur.shape[0] or 2 * n_settled >= cur.shape[0]:
            rows_s = settled.squeeze(-1)
            if idx is None:
                result, done = tau.clone(), settled.clone()
            else:
                result[idx[rows_s]] = tau[rows_s]
                done[idx[rows_s]] = True
            if n_settled == cur.shape[0]:
                return result, done
            keep = (~rows_s).nonzero().squeeze(-1)
            cur = cur.index_select(0, keep)
            tau = new_tau.index_select(0, keep)
            state = (state[0].index_select(0, keep), state[1].index_select(0, keep))
            idx = keep if idx is None else idx[keep]
        else:
            tau = new_tau
    if idx is None:
        return tau, torch.zeros_like(done)
    result[idx] = tau
    return result, done


def _sparsemax_update(
    tau: torch.Tensor, s1: torch.Tensor, s2: Any, count: torch.Tensor, state: _State
) -> tuple[torch.Tensor, torch.Tensor, _State]:
    # Σ_S (u_i − τ_new) = 1 with d = u − τ: τ_new = τ + (Σd − 1)/|S|
    count_prev = state[0]
    settled = count == count_prev
    return settled, torch.where(settled, tau, tau + (s1 - 1) / count), (count, state[1])


def _threshold_sparsemax(u: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Threshold of sparsemax for rows ``u`` (max 0): Newton (Michelot) steps τ ← (Σ_{u>τ} u − 1)/|S|.

    Each step is the exact threshold of the current support and a lower bound of τ*, so τ increases
    monotonically; it is exact as soon as the support count repeats. Returns (τ, settled mask).
    """
    return _iterate_support(u, d, False, _sparsemax_update)


def _entmax15_update(
    tau: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, count: torch.Tensor, state: _State
) -> tuple[torch.Tensor, torch.Tensor, _State]:
    count_prev, exact_prev = state
    settled = exact_prev & (count == count_prev)
    excess = s2 - 1
    disc = s1 * s1 - count * excess
    exact = disc >= 0
    quadratic = tau + excess / (s1 + disc.clamp(min=0).sqrt())
    norm = s2.sqrt()
    newton = tau + norm * (norm - 1) / s1
    new_tau = torch.where(settled, tau, torch.where(exact, quadratic, newton))
    return settled, new_tau, (count, exact | settled)


def _threshold_entmax15(u: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Threshold of 1.5-entmax for rows ``u = z/2`` (max 0), p = [u − τ]_+².

    On a support S the threshold solves Σ_S (u_i − τ)² = 1, the smaller root of a quadratic; with
    d = u − τ_k this is τ = τ_k + (Σd² − 1)/(Σd + √((Σd)² − |S|(Σd² − 1))). Solving on S(τ_k) lands
    above τ* when S(τ_k) ⊋ S* and below when S(τ_k) ⊊ S*, so the iterates bracket τ* from both sides
    with shrinking gaps and stop as soon as a support reproduces itself (then τ = τ* exactly). When
    the quadratic has no real root (a far too large support) a Newton step on ‖[u − τ]_+‖₂ − 1, a
    convex decreasing function, is taken instead; it stays a lower bound.
    """
    return _iterate_support(u, d, True, _entmax15_update)


def _exact_threshold_rows(u: torch.Tensor, alpha: float, solver: Any, scratch: torch.Tensor) -> torch.Tensor:
    """Run ``solver`` on rows ``u`` and repair any row that did not settle with the sort algorithm."""
    tau, settled = solver(u, scratch)
    if not bool(settled.all()):
        rows = (~settled).squeeze(-1).nonzero().squeeze(-1)
        sort_fn = _sparsemax_threshold_sort if alpha == 2.0 else _entmax15_threshold_sort
        tau[rows] = sort_fn(u[rows])
    return tau


# --------------------------------------------------------------------------------------------------
# general α: Newton on λ (score units), rows shifted to max z = 0
# --------------------------------------------------------------------------------------------------


def _entmax_general_block(z: torch.Tensor, alpha: float, out: torch.Tensor) -> torch.Tensor:
    """α-entmax of rows ``z`` (max 0) into ``out``; returns λ with p_i = [1 + (α−1)(z_i − λ)]_+^{1/(α−1)}.

    With F(λ) = Σ p_i and G(λ) = Σ p_i^{2−α} = −F'(λ), Newton on g = F^{α−1} − 1 (a p-norm of
    non-negative convex functions, hence convex for α ≤ 2) gives the step
    Δλ = expm1((α−1) log F)/(α−1) · F^{2−α}/G, monotone from the left end λ₀ = 0 for α ≤ 2.
    For α > 2 every other step bisects the bracket [0, (1 − N^{1−α})/(α−1)].
    """
    am1 = alpha - 1.0
    expo = 1.0 / am1
    n = z.shape[-1]
    u = z * am1
    x = torch.empty_like(z)
    q = torch.empty_like(z)
    lam = torch.zeros_like(z[:, :1])
    lo = lam.clone()
    hi = torch.full_like(lam, -math.expm1(-am1 * math.log(n)) / am1 if n > 1 else 0.0)
    # for α > 2, F jumps where an entry enters the support (x^{1/(α−1)} near x = 0), so the loop
    # usually ends by collapsing the bracket rather than by |F − 1| ≤ tol
    tol = 32 * torch.finfo(z.dtype).eps
    width_tol = 4 * torch.finfo(z.dtype).eps * float(hi[0, 0]) if hi.numel() else 0.0
    polished = torch.zeros_like(lam, dtype=torch.bool)
    for it in range(_MAX_NEWTON_ITER):
        # x = (α−1)(z − λ), clamped at −1 (outside the support); p = exp(log1p(x)/(α−1))
        torch.sub(u, lam * am1, out=x)
        x.clamp_(min=-1.0)
        torch.log1p(x, out=q)
        torch.mul(q, expo, out=out)
        out.exp_()
        f_sum = out.sum(-1, keepdim=True)
        converged = (f_sum - 1).abs() <= tol
        done = (converged & polished) | (hi - lo <= width_tol)
        if bool(done.all()) or it == _MAX_NEWTON_ITER - 1:
            break
        polished = converged
        # p^{2−α} = p / (1 + x) on the support
        q.mul_(expo - 1.0).exp_()
        if alpha > 2:
            q.masked_fill_(x <= -1.0, 0.0)
        g_sum = q.sum(-1, keepdim=True)
        log_f = f_sum.log()
        step = torch.expm1(am1 * log_f) / am1 * torch.exp((1.0 - am1) * log_f) / g_sum
        lo = torch.where(f_sum >= 1, torch.maximum(lo, lam), lo)
        hi = torch.where(f_sum < 1, torch.minimum(hi, lam), hi)
        new = lam + step
        bad = (new < lo) | (new > hi) | ~torch.isfinite(new)
        if alpha > 2 and it % 2 == 1:
            bad = torch.ones_like(bad)
        new = torch.where(bad, 0.5 * (lo + hi), new)
        lam = torch.where(done, lam, new)
    if alpha > 2:
        lam = _fill_support_edge(out, u, lam, am1)
    out.div_(out.sum(-1, keepdim=True))
    return lam


def _fill_support_edge(
    out: torch.Tensor, u: torch.Tensor, lam: torch.Tensor, am1: float | torch.Tensor
) -> torch.Tensor:
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


# --------------------------------------------------------------------------------------------------
# the blocked forward kernel
# --------------------------------------------------------------------------------------------------


def _candidate_reach(alpha: Any) -> Any:
    """How far below the row maximum a score can lie and still be in the support.

    The threshold never drops below the left end of its bracket, τ ≥ (α−1) max z − 1 (λ ≥ max z in
    score units), so p_i > 0 needs z_i > max z − 1/(α−1) (1 for sparsemax, 2 for 1.5-entmax).
    """
    return 1.0 / (alpha - 1.0)


def _solve_compact(u: torch.Tensor, alpha: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """α-entmax of the compacted candidate rows ``u`` (shifted scores, max 0, padding −inf).

    Returns (p of the same shape, λ relative to the row maximum). A tensor ``alpha`` (rows, 1) is one
    α > 1 per row (the batched Newton kernel; float64 for α > 2 as below).
    """
    if isinstance(alpha, torch.Tensor):
        if u.dtype != torch.float64 and bool((alpha > 2.0).any()):
            p64, lam64 = _entmax_rows_alpha(u.double(), alpha.double())
            return p64.to(u.dtype), lam64.to(u.dtype)
        return _entmax_rows_alpha(u, alpha)
    if alpha == 2.0 or alpha == 1.5:
        # u = (α−1)(z − max z), then p = [u − τ]_+^{1/(α−1)}
        if alpha == 1.5:
            u = u.mul_(0.5)
        scratch = u.new_empty((2, *u.shape))
        solver = _threshold_entmax15 if alpha == 1.5 else _threshold_sparsemax
        tau = _exact_threshold_rows(u, alpha, solver, scratch)
        p = u.sub_(tau).clamp_(min=0)
        if alpha == 1.5:
            return p.mul_(p), 2.0 * (tau + 1.0)
        return p, tau + 1.0
    if alpha < 2.0:
        p = torch.empty_like(u)
        return p, _entmax_general_block(u, alpha, p)
    # for α > 2 the map p = [·]_+^{1/(α−1)} amplifies the rounding of entries near the threshold (a
    # root of F that float32 cannot resolve), so it is computed in float64
    u64 = u.double()
    p64 = torch.empty_like(u64)
    lam64 = _entmax_general_block(u64, alpha, p64)
    return p64.to(u.dtype), lam64.to(u.dtype)


def _forward_block(
    zb: torch.Tensor, alpha: float | torch.Tensor, pb: torch.Tensor, buf: torch.Tensor
) -> torch.Tensor:
    """α-entmax of the contiguous rows ``zb`` into ``pb`` (zero-filled); returns λ (score units, keepdim).

    Only the candidates z_i > max z − 1/(α−1) can be in the support (:func:`_candidate_reach`); in
    attention rows they are a small share of the entries, so the threshold solvers run on a compacted
    (rows, K) matrix of the candidates (padded with −inf) instead of the full rows, and the result is
    scattered back. Rows with many more candidates than typical form a second, wider group so that a
    few flat rows do not widen the whole block. ``buf`` is float scratch of the shape of ``zb``.
    """
    n_rows, n = zb.shape
    top = zb.amax(-1, keepdim=True)
    dead = top == -math.inf
    any_dead = bool(dead.any())
    if any_dead:
        top = top.masked_fill(dead, 0.0)
    if n < _COMPACT_MIN_N and not isinstance(alpha, torch.Tensor) and alpha in (1.5, 2.0):
        # short rows: the compaction costs more than it saves (measured), solve on the full rows
        u = torch.sub(zb, top, out=pb)
        p, lam = _solve_compact(u, alpha)
        if any_dead:
            p.masked_fill_(dead, 0.0)
            return (lam + top).masked_fill(dead, -math.inf)
        return lam + top
    # candidate indicator as 0/1 floats (cheaper to produce and count than a bool mask), tested on the
    # shifted scores: at |z| ≥ 1e8 (float32) `top − reach` rounds to `top` and would drop the maximum
    cand = torch.sub(zb, top, out=buf).gt_(-_candidate_reach(alpha))
    if any_dead:
        cand[dead.squeeze(-1), 0] = 1.0  # one dummy candidate per all −inf row, masked at the end
    count = cand.sum(-1).long()
    flat = cand.view(-1).bool().nonzero().squeeze(-1)  # row-major: each row's candidates in order
    vals = zb.reshape(-1).index_select(0, flat)
    row = flat // n
    start = count.cumsum(0) - count
    slot = torch.arange(flat.numel(), device=zb.device) - start[row]
    dead_entry = None
    if any_dead:
        dead_entry = dead.squeeze(-1)[row]
        vals = vals.masked_fill(dead_entry, 0.0)  # the dummy becomes a lone maximum: p = 1, λ = 0
    k_max = int(count.max())
    k_typ = max(16, 2 * math.ceil(flat.numel() / max(n_rows, 1)))
    lam_b = torch.empty_like(top)
    p_vals = torch.empty_like(vals)
    if k_max <= _SPLIT * k_typ:
        groups: list[tuple[torch.Tensor | None, int]] = [(None, k_max)]
    else:
        wide = count > k_typ
        groups = [(~wide, k_typ), (wide, k_max)]
    for group, k in groups:
        if group is None:
            v, t, pos, g_rows = vals, top, row * k + slot, n_rows
            entries = None
        else:
            entries = group[row]
            local = group.long().cumsum(0) - 1  # row index within the group
            v, t = vals[entries], top[group]
            pos = local[row[entries]] * k + slot[entries]
            g_rows = t.shape[0]
        u = torch.full((g_rows * k,), -math.inf, dtype=zb.dtype, device=zb.device)
        u.index_copy_(0, pos, v)
        u = u.view(g_rows, k).sub_(t)
        a_g = alpha[group] if isinstance(alpha, torch.Tensor) and group is not None else alpha
        p, lam = _solve_compact(u, a_g)
        p_g = p.reshape(-1).index_select(0, pos)
        if group is None:
            p_vals, lam_b = p_g, lam + t
        else:
            p_vals[entries] = p_g
            lam_b[group] = lam + t
    if dead_entry is not None:
        p_vals = p_vals.masked_fill(dead_entry, 0.0)
        lam_b = lam_b.masked_fill(dead, -math.inf)
    pb.view(-1).index_copy_(0, flat, p_vals)
    return lam_b


# --------------------------------------------------------------------------------------------------
# opt-in fused backend: a fixed number of passes in one torch.compile'd function, then an exactness
# check; rows the fixed passes did not settle are solved again by the eager kernel above
# --------------------------------------------------------------------------------------------------

_BACKENDS = ("eager", "compiled")
_ENV_BACKEND = "HOPFIELD_AA_ENTMAX_BACKEND"
_backend = os.environ.get(_ENV_BACKEND, "eager").strip().lower() or "eager"
if _backend not in _BACKENDS:
    warnings.warn(
        f"{_ENV_BACKEND}={_backend!r} is not one of {_BACKENDS}; using 'eager'", RuntimeWarning, stacklevel=1
    )
    _backend = "eager"
_compiled_kernels: dict[str, Any] = {}
_compile_failed = False
_FUSED_SUPPORT_PASSES = 6  # α = 1.5 and 2: support passes inside the compiled function
_FUSED_NEWTON_PASSES = 6  # other α in (1, 2): Newton passes inside the compiled function
_FUSED_BLOCK_ELEMENTS = 1 << 18  # rows per compiled call: about this many entries (measured)


def set_backend(name: str) -> None:
    """Select the forward kernel of α-entmax: ``"eager"`` (default) or ``"compiled"``.

    ``"compiled"`` runs the forward of α = 1.5, α = 2 and 1 < α < 2 on float32 (and half precision,
    computed in float32) through one ``torch.compile``'d function per family: a fixed number of exact
    support passes (α = 1.5, 2) or Newton steps on the threshold (other α), then the exactness test of
    the eager solver; rows that fail it are solved again by the eager kernel, so the result is exact
    either way. The first call compiles (tens of seconds); if compilation fails a warning is issued
    once and the eager kernel is used. The backward is the closed-form Jacobian product in both cases.
    The environment variable ``HOPFIELD_AA_ENTMAX_BACKEND`` sets the initial value.

    Parameters
    ----------
    name : {"eager", "compiled"}
        The backend.

    Examples
    --------
    >>> set_backend("eager")
    >>> get_backend()
    'eager'
    """
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"name must be one of {_BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    """The current α-entmax forward backend, ``"eager"`` or ``"compiled"`` (see :func:`set_backend`).

    Returns
    -------
    str
        The backend name.

    Examples
    --------
    >>> get_backend() in ("eager", "compiled")
    True
    """
    return _backend


@contextlib.contextmanager
def entmax_backend(name: str) -> Iterator[None]:
    """Context manager that selects the α-entmax backend (:func:`set_backend`) and restores the previous one.

    Parameters
    ----------
    name : {"eager", "compiled"}
        The backend inside the block.

    Examples
    --------
    >>> import torch
    >>> with entmax_backend("eager"):
    ...     p = entmax(torch.tensor([1.0, 0.0, -1.0]), alpha=2.0)
    >>> p
    tensor([1., 0., 0.])
    """
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _fused_support(z: torch.Tensor, out: torch.Tensor, half: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed support passes of α = 2 (``half`` False) or α = 1.5 (True) on rows ``z`` (compiled).

    The same updates as :func:`_sparsemax_update` / :func:`_entmax15_update` from τ₀ = max u − 1,
    ``_FUSED_SUPPORT_PASSES`` times; writes p into ``out`` and returns (λ in score units, settled)
    where settled marks the rows whose support reproduced itself (their τ is exact).
    """
    top = z.amax(-1, keepdim=True)
    u = z - top
    if half:
        u = u * 0.5
    tau = torch.full_like(top, -1.0)
    count_prev = torch.full_like(top, -1.0)
    exact_prev = torch.zeros_like(top, dtype=torch.bool)
    settled = torch.zeros_like(top, dtype=torch.bool)
    for _ in range(_FUSED_SUPPORT_PASSES):
        d = (u - tau).clamp(min=0)
        s1 = d.sum(-1, keepdim=True)
        count = (d > 0).to(d.dtype).sum(-1, keepdim=True)
        if half:
            s2 = (d * d).sum(-1, keepdim=True)
            settled = exact_prev & (count == count_prev)
            excess = s2 - 1
            disc = s1 * s1 - count * excess
            exact = disc >= 0
            quadratic = tau + excess / (s1 + disc.clamp(min=0).sqrt())
            norm = s2.sqrt()
            newton = tau + norm * (norm - 1) / s1
            tau = torch.where(settled, tau, torch.where(exact, quadratic, newton))
            exact_prev = exact | settled
        else:
            settled = count == count_prev
            tau = torch.where(settled, tau, tau + (s1 - 1) / count)
        count_prev = count
    p = (u - tau).clamp(min=0)
    settled = settled & (top > -math.inf)  # all −inf rows (NaN here) are left to the eager kernel
    if half:
        out.copy_(p * p)
        return 2.0 * (tau + 1.0) + top, settled.squeeze(-1)
    out.copy_(p)
    return tau + 1.0 + top, settled.squeeze(-1)


def _fused_general(
    z: torch.Tensor, out: torch.Tensor, alpha: torch.Tensor, log_n: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed Newton steps on λ for 1 < α < 2 on rows ``z`` (compiled; ``alpha``, ``log_n`` 0-d tensors).

    The steps of :func:`_entmax_general_block` from λ₀ = max z, ``_FUSED_NEWTON_PASSES`` times;
    writes p (normalised) into ``out`` and returns (λ, settled) where settled marks the rows with
    |Σp − 1| ≤ 32 eps after the polishing step (the eager stopping test).
    """
    top = z.amax(-1, keepdim=True)
    am1 = alpha - 1.0
    expo = 1.0 / am1
    u = (z - top) * am1
    tol = 32 * torch.finfo(z.dtype).eps
    lam = torch.zeros_like(top)
    lo = lam
    hi = torch.zeros_like(top) - torch.expm1(-am1 * log_n) / am1
    polished = torch.zeros_like(top, dtype=torch.bool)
    done = polished
    p = z
    f_sum = top
    for it in range(_FUSED_NEWTON_PASSES + 1):
        x = (u - lam * am1).clamp(min=-1.0)
        q = torch.log1p(x)
        p = torch.exp(q * expo)
        f_sum = p.sum(-1, keepdim=True)
        converged = (f_sum - 1).abs() <= tol
        done = converged & polished
        if it == _FUSED_NEWTON_PASSES:
            break
        polished = converged
        # p^{2−α} = p / (1 + x) on the support (one division instead of a second exponential)
        g_sum = torch.where(x > -1.0, p / (1.0 + x), 0.0).sum(-1, keepdim=True)
        log_f = f_sum.log()
        step = torch.expm1(am1 * log_f) / am1 * torch.exp((1.0 - am1) * log_f) / g_sum
        lo = torch.where(f_sum >= 1, torch.maximum(lo, lam), lo)
        hi = torch.where(f_sum < 1, torch.minimum(hi, lam), hi)
        new = lam + step
        bad = (new < lo) | (new > hi) | ~torch.isfinite(new)
        new = torch.where(bad, 0.5 * (lo + hi), new)
        lam = torch.where(done, lam, new)
    out.copy_(p / f_sum)
    done = done & (top > -math.inf)  # all −inf rows (NaN here) are left to the eager kernel
    return lam + top, done.squeeze(-1)


def _fused_kernel(kind: str) -> Any:
    """The compiled function of ``kind`` ("support" or "general"), compiled once (dynamic shapes)."""
    if kind not in _compiled_kernels:
        fn = _fused_support if kind == "support" else _fused_general
        _compiled_kernels[kind] = torch.compile(fn, dynamic=True)
    return _compiled_kernels[kind]


def _compiled_applies(rows: torch.Tensor, alpha: float) -> bool:
    return (
        _backend == "compiled"
        and not _compile_failed
        and rows.dtype == torch.float32
        and rows.numel() > 0
        and 1.0 < alpha <= 2.0
    )


def _forward_compiled(rows: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """α-entmax of the contiguous float32 rows (R, N) by the compiled kernel; None if it is unavailable.

    Rows with an all −inf or not settled result are solved again by the eager blocked kernel.
    """
    global _compile_failed
    n_rows, n = rows.shape
    extra: tuple[Any, ...]
    try:
        if alpha in (1.5, 2.0):
            kernel, extra = _fused_kernel("support"), (alpha == 1.5,)
        else:
            kernel = _fused_kernel("general")
            extra = (torch.tensor(alpha, dtype=rows.dtype), torch.tensor(math.log(n), dtype=rows.dtype))
        probs = torch.empty_like(rows)
        block = max(1, _FUSED_BLOCK_ELEMENTS // n)
        parts = [kernel(rows[s : s + block], probs[s : s + block], *extra) for s in range(0, n_rows, block)]
    except Exception as exc:  # any compiler failure falls back to the eager kernel
        _compile_failed = True
        warnings.warn(
            f"the compiled entmax backend is unavailable ({type(exc).__name__}: {str(exc)[:200]}); "
            "using the eager kernel",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    if len(parts) == 1:
        lam, settled = parts[0]
    else:
        lam, settled = (torch.cat(t) for t in zip(*parts, strict=True))
    redo = (~settled).nonzero().squeeze(-1)
    if redo.numel() > 0:
        p_e, lam_e = _forward(rows.index_select(0, redo), alpha, -1, eager=True)
        probs[redo] = p_e
        lam[redo] = lam_e
    return probs, lam


def _forward(
    scores: torch.Tensor, alpha: float, dim: int, eager: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """α-entmax of ``scores`` along ``dim`` (α > 1) and its threshold λ in score units (keepdim).

    ``p_i = [1 + (α−1)(z_i − λ)]_+^{1/(α−1)}``. Rows of all −inf give p = 0 and λ = −inf.
    Half precision is computed in float32; the result has the dtype of ``scores``. The compiled
    backend (:func:`set_backend`) is used where it applies unless ``eager``.
    """
    in_dtype = scores.dtype
    z = scores.float() if in_dtype in _HALF else scores
    z = z.movedim(dim, -1)
    shape = z.shape
    n = shape[-1]
    rows = z.reshape(-1, n).contiguous()
    n_rows = rows.shape[0]
    fused = None if eager or not _compiled_applies(rows, alpha) else _forward_compiled(rows, alpha)
    if fused is not None:
        probs, lam = fused
    else:
        probs = torch.zeros_like(rows)
        lam = torch.empty_like(rows[:, :1])
    if fused is None and rows.numel() > 0:
        size = _BLOCK_ELEMENTS if alpha in (1.5, 2.0) else _BLOCK_ELEMENTS_GENERAL
        block = max(1, size // max(n, 1))
        buf = torch.empty_like(rows[:block])
        for start in range(0, n_rows, block):
            stop = min(start + block, n_rows)
            lam[start:stop] = _forward_block(rows[start:stop], alpha, probs[start:stop], buf[: stop - start])
    probs = probs.reshape(shape).movedim(-1, dim)
    lam = lam.reshape((*shape[:-1], 1)).movedim(-1, dim)
    if in_dtype in _HALF:
        probs = probs.to(in_dtype)
    return probs, lam


def jacobian_weights(probs: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """The weights ``s`` of the entmax Jacobian ``J = diag(s) − s sᵀ/Σs`` (papers/theory.md §1).

    ``s = p`` for softmax (α = 1) and ``s_i = p_i^{2−α}`` on the support, 0 off it, for α > 1
    (sparsemax: the support indicator; α = 1.5: ``√p``). Tensor in, tensor out, no validation.
    ``alpha`` may be a tensor broadcastable to ``probs`` (one α per row, the normalised axis of size 1).
    """
    if isinstance(alpha, torch.Tensor):
        support = probs > 0
        return torch.where(support, probs, 1.0).pow(2.0 - alpha.to(probs.dtype)) * support
    if alpha == 1.0:
        return probs
    if alpha == 2.0:
        return (probs > 0).to(probs.dtype)
    if alpha == 1.5:
        return probs.sqrt()
    return torch.where(probs > 0, probs, 1.0).pow(2.0 - alpha) * (probs > 0)


def _jvp_tensor(
    probs: torch.Tensor, vector: torch.Tensor, alpha: float | torch.Tensor, dim: int
) -> torch.Tensor:
    """J v with J = diag(s) − s sᵀ/Σs, s = p^{2−α} on the support (s = p for softmax)."""
    s = jacobian_weights(probs, alpha)
    sv = s * vector
    return sv - s * (sv.sum(dim, keepdim=True) / s.sum(dim, keepdim=True))


class _EntmaxFunction(torch.autograd.Function):
    """α-entmax whose backward is the closed-form Jacobian product (no differentiation of the solver)."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, alpha: float, dim: int) -> torch.Tensor:
        probs = _forward(scores, alpha, dim)[0]
        ctx.alpha = alpha
        ctx.dim = dim
        ctx.save_for_backward(probs)
        return probs

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        (probs,) = ctx.saved_tensors
        p = probs.float() if probs.dtype in _HALF else probs
        g = grad_output.to(p.dtype)
        grad = _jvp_tensor(p, g, ctx.alpha, ctx.dim).to(grad_output.dtype)
        return grad, None, None



# --------------------------------------------------------------------------------------------------
# α as a tensor: one α per row (per head, per layer), with the closed-form ∂p/∂α
# --------------------------------------------------------------------------------------------------

# Rows sharing one of at most this many distinct α values are solved by the float-α kernels (exact
# 1.5 and 2, compaction); more distinct values go to the batched Newton kernel with α per row.
_MAX_ALPHA_GROUPS = 16
# Below this |α − 1| the α-derivative uses its limit at α = 1 (the closed form cancels two
# O(1/(α−1)²) terms; in float64 both errors are about this size at the switch).
_ALPHA_GRAD_LIMIT = 5e-6


def _entmax_rows_alpha(z: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """α-entmax of rows ``z`` (R, N) with one α > 1 per row (``alpha`` (R, 1)); returns (p, λ).

    The Newton iteration of :func:`_entmax_general_block` on λ with the per-row α broadcast, on the
    full rows: rows with α > 2 alternate with bisection and have their support edge repaired.
    """
    top = z.amax(-1, keepdim=True)
    dead = top == -math.inf
    top = top.masked_fill(dead, 0.0)
    am1 = alpha - 1.0
    expo = 1.0 / am1
    n = z.shape[-1]
    u = (z - top) * am1
    big = alpha > 2.0
    any_big = bool(big.any())
    lam = torch.zeros_like(top)
    lo = lam.clone()
    hi = -torch.expm1(-am1 * math.log(n)) / am1 if n > 1 else torch.zeros_like(top)
    eps = torch.finfo(z.dtype).eps
    tol = 32 * eps
    width_tol = 4 * eps * hi
    polished = torch.zeros_like(top, dtype=torch.bool)
    p = torch.empty_like(z)
    x = torch.empty_like(z)
    q = torch.empty_like(z)
    for it in range(_MAX_NEWTON_ITER):
        torch.sub(u, lam * am1, out=x).clamp_(min=-1.0)
        torch.mul(torch.log1p(x, out=q), expo, out=p).exp_()
        f_sum = p.sum(-1, keepdim=True)
        converged = (f_sum - 1).abs() <= tol
        done = (converged & polished) | (hi - lo <= width_tol) | dead
        if bool(done.all()) or it == _MAX_NEWTON_ITER - 1:
            break
        polished = converged
        # Σ p^{2−α}, with p^{2−α} = p/(1 + x) on the support
        g_sum = torch.div(p, x.add_(1.0), out=q).nan_to_num_(nan=0.0).sum(-1, keepdim=True)
        log_f = f_sum.log()
        step = torch.expm1(am1 * log_f) / am1 * torch.exp((1.0 - am1) * log_f) / g_sum
        lo = torch.where(f_sum >= 1, torch.maximum(lo, lam), lo)
        hi = torch.where(f_sum < 1, torch.minimum(hi, lam), hi)
        new = lam + step
        bad = (new < lo) | (new > hi) | ~torch.isfinite(new)
        if any_big and it % 2 == 1:
            bad = bad | big
        lam = torch.where(done, lam, torch.where(bad, 0.5 * (lo + hi), new))
    if any_big:
        rows = big.squeeze(-1).nonzero().squeeze(-1)
        p_big = p[rows]
        lam[rows] = _fill_support_edge(p_big, u[rows], lam[rows], am1[rows])
        p[rows] = p_big
    p = p / p.sum(-1, keepdim=True)
    return p.masked_fill(dead, 0.0), (lam + top).masked_fill(dead, -math.inf)


def _forward_alpha(scores: torch.Tensor, alpha: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, λ) of α-entmax with α per row: ``alpha`` has the shape of ``scores`` with ``dim`` of size 1.

    Computed in the compute dtype (float32 for half precision; returned so). λ is in score units
    (logsumexp for rows with α = 1). Few distinct α values: each group of rows by the float-α
    kernel (exact 1.5 and 2); many: the batched Newton kernel with α per row.
    """
    z = scores.float() if scores.dtype in _HALF else scores
    z = z.movedim(dim, -1)
    shape = z.shape
    n = shape[-1]
    rows = z.reshape(-1, n)
    a_rows = alpha.detach().to(z.dtype).movedim(dim, -1).expand((*shape[:-1], 1)).reshape(-1, 1)
    probs = torch.empty_like(rows)
    lam = torch.empty_like(rows[:, :1])
    values = torch.unique(a_rows)
    if values.numel() <= _MAX_ALPHA_GROUPS:
        for value in values.tolist():
            sel = (a_rows == value).squeeze(-1).nonzero().squeeze(-1)
            sub = rows.index_select(0, sel)
            if value == 1.0:
                lse = torch.logsumexp(sub, -1, keepdim=True)
                probs[sel], lam[sel] = torch.exp(sub - lse), lse
            else:
                probs[sel], lam[sel] = _forward(sub, value, -1)
    else:
        soft = (a_rows == 1.0).squeeze(-1)
        if bool(soft.any()):
            lse = torch.logsumexp(rows[soft], -1, keepdim=True)
            probs[soft], lam[soft] = torch.exp(rows[soft] - lse), lse
        rest = (~soft).nonzero().squeeze(-1)
        if rest.numel() > 0:
            # the blocked, compacting kernel of the float-α path with one α per row
            if rest.numel() == rows.shape[0]:
                sub, a_sub = rows.contiguous(), a_rows
            else:
                sub, a_sub = rows.index_select(0, rest), a_rows.index_select(0, rest)
            p_sub = torch.zeros_like(sub)
            lam_sub = torch.empty_like(sub[:, :1])
            block = max(1, _BLOCK_ELEMENTS_GENERAL // max(n, 1))
            buf = torch.empty_like(sub[:block])
            for start in range(0, sub.shape[0], block):
                stop = min(start + block, sub.shape[0])
                lam_sub[start:stop] = _forward_block(
                    sub[start:stop], a_sub[start:stop], p_sub[start:stop], buf[: stop - start]
                )
            probs[rest], lam[rest] = p_sub, lam_sub
    probs = probs.reshape(shape).movedim(-1, dim)
    lam = lam.reshape((*shape[:-1], 1)).movedim(-1, dim)
    return probs, lam


def _alpha_grad_dtype(probs: torch.Tensor, alpha: torch.Tensor) -> torch.dtype:
    """Where ∂p/∂α is computed: float64, or float32 when every α − 1 ≥ 0.1 (the closed form's
    cancellation then costs at most eps/(α−1)² ≈ 1e-5 relative)."""
    if probs.dtype == torch.float64 or float((alpha.detach() - 1.0).min()) < 0.1:
        return torch.float64
    return probs.dtype


def _entmax_alpha_derivative(
    probs: torch.Tensor, alpha: torch.Tensor, dim: int, s: torch.Tensor | None = None
) -> torch.Tensor:
    """∂p/∂α of α-entmax in closed form (Correia et al. 2019, appendix), in the dtype of ``probs``.

    With ε = α − 1, s_i = p_i^{2−α} on the support (``s`` if given), s̃ = s/Σs and H = Σ p log p:
    ``∂p/∂α = (p − s̃)/ε² − (p log p − s̃ H)/ε``; at α → 1 its limit ``p (Σ p log²p − log²p)/2``.
    Each row of the result sums to 0. Call it in float64 where α is near 1 (:func:`_alpha_grad_dtype`).
    """
    p = probs
    a = alpha.to(p.dtype)
    eps = a - 1.0
    support = p > 0
    logp = torch.where(support, p, 1.0).log() * support
    plogp = p * logp
    ent = plogp.sum(dim, keepdim=True)
    if s is None:
        s = jacobian_weights(p, a)
    s_tilde = s / s.sum(dim, keepdim=True)
    near = eps < _ALPHA_GRAD_LIMIT
    e = torch.where(near, 1.0, eps)
    general = (p - s_tilde) / (e * e) - (plogp - s_tilde * ent) / e
    limit = p * ((plogp * logp).sum(dim, keepdim=True) - logp * logp) / 2
    return torch.where(near, limit, general)


class _EntmaxAlphaFunction(torch.autograd.Function):
    """α-entmax with α per row; the backward returns ∂/∂z (Jacobian product) and ∂/∂α (closed form)."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, alpha: torch.Tensor, dim: int) -> torch.Tensor:
        probs = _forward_alpha(scores, alpha, dim)[0]
        ctx.dim = dim
        ctx.save_for_backward(probs, alpha)
        return probs.to(scores.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        probs, alpha = ctx.saved_tensors
        a = alpha.detach()
        dim = ctx.dim
        work = _alpha_grad_dtype(probs, a) if ctx.needs_input_grad[1] else probs.dtype
        p, g, a_w = probs.to(work), grad_output.to(work), a.to(work)
        s = jacobian_weights(p, a_w)  # shared by both gradients
        grad_z = grad_a = None
        if ctx.needs_input_grad[0]:
            sg = s * g
            grad_z = (sg - s * (sg.sum(dim, keepdim=True) / s.sum(dim, keepdim=True))).to(grad_output.dtype)
        if ctx.needs_input_grad[1]:
            dp = _entmax_alpha_derivative(p, a_w, dim, s)
            grad_a = (g * dp).sum(dim, keepdim=True).to(alpha.dtype)
        return grad_z, grad_a, None


def _alpha_argument(alpha: object, scores: torch.Tensor, dim: int) -> float | torch.Tensor:
    """Validate α: a float, or a tensor/array broadcastable to the scores without ``dim``.

    Also accepted: the shape of the scores with ``dim`` of size 1 (the entmax package's convention).
    Returns a float, or the tensor α broadcast to the scores' shape with ``dim`` of size 1 (a view that
    keeps its autograd history). A tensor α that does not require grad and is the same everywhere is
    returned as a float (the float-α kernels).
    """
    if isinstance(alpha, np.ndarray) and alpha.ndim > 0:
        alpha = torch.from_numpy(np.ascontiguousarray(alpha))
    if not isinstance(alpha, torch.Tensor) or (alpha.numel() == 1 and not alpha.requires_grad):
        return check_alpha(alpha)
    if alpha.dtype == torch.bool or alpha.is_complex():
        raise TypeError(f"alpha must be a real tensor, got dtype {alpha.dtype}")
    if not alpha.is_floating_point():
        alpha = alpha.to(torch.get_default_dtype())
    values = alpha.detach()
    if values.numel() > 0:
        if bool(torch.isnan(values).any()) or bool(torch.isinf(values).any()):
            raise ValueError("alpha must be finite (no NaN or inf entries)")
        low = float(values.min())
        if low < 1.0:
            raise ValueError(
                f"alpha must be >= 1.0 everywhere (the documented domain), got a minimum of {low}"
            )
    d = dim % scores.ndim
    batch = (*scores.shape[:d], *scores.shape[d + 1 :])
    a = alpha
    if alpha.ndim == scores.ndim and alpha.shape[d] == 1:
        a = alpha.squeeze(d)
    try:
        a = a.to(scores.device).expand(batch)
    except RuntimeError:
        raise ValueError(
            f"alpha of shape {tuple(alpha.shape)} does not broadcast to the scores of shape "
            f"{tuple(scores.shape)} without dim={dim} (shape {batch}), nor has their shape with dim of size 1"
        ) from None
    if not alpha.requires_grad and values.numel() > 0 and float(values.max()) == low:
        return low
    return a.unsqueeze(d)


def _softmax_tensor(scores: torch.Tensor, dim: int) -> torch.Tensor:
    if scores.dtype in _HALF:
        return torch.softmax(scores.float(), dim).to(scores.dtype)
    return torch.softmax(scores, dim)


def _entmax_tensor(scores: torch.Tensor, alpha: float | torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Fast α-entmax on a tensor, without validation (the attention hot path).

    ``alpha`` must be a float ≥ 1 (or a tensor of α ≥ 1 broadcastable to ``scores`` with ``dim`` of
    size 1: one α per row) and ``scores`` free of NaN and +inf (−inf entries get p = 0).
    Differentiable: the backward is the closed-form Jacobian product, and for a tensor α also the
    closed-form ∂p/∂α. Rows of all −inf give zeros for α > 1 (and NaN for α = 1, as ``torch.softmax``);
    the public :func:`entmax` rejects them.
    """
    if isinstance(alpha, torch.Tensor):
        if (scores.requires_grad or alpha.requires_grad) and torch.is_grad_enabled():
            out_a: torch.Tensor = _EntmaxAlphaFunction.apply(scores, alpha, dim)
            return out_a
        return _forward_alpha(scores, alpha, dim)[0].to(scores.dtype)
    if alpha == 1.0:
        return _softmax_tensor(scores, dim)
    if scores.requires_grad and torch.is_grad_enabled():
        out: torch.Tensor = _EntmaxFunction.apply(scores, alpha, dim)
        return out
    return _forward(scores, alpha, dim)[0]


def _lambda_tensor(
    scores: torch.Tensor, alpha: float | torch.Tensor, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, λ) in the compute dtype, λ in score units: logsumexp for α = 1 (rows)."""
    z = scores.float() if scores.dtype in _HALF else scores
    if isinstance(alpha, torch.Tensor):
        with torch.no_grad():
            return _forward_alpha(z, alpha, dim)
    if alpha == 1.0:
        lse = torch.logsumexp(z, dim, keepdim=True)
        return torch.exp(z - lse), lse
    with torch.no_grad():
        probs, lam = _forward(z, alpha, dim)
    return probs, lam


# --------------------------------------------------------------------------------------------------
# sort-based references (cross-checks and the fallback of the exact solvers)
# --------------------------------------------------------------------------------------------------


def _sparsemax_threshold_sort(u: torch.Tensor) -> torch.Tensor:
    """Sparsemax threshold of rows ``u`` by sorting: τ = (Σ_{j≤k} u_(j) − 1)/k for the largest k with
    1 + k u_(k) > Σ_{j≤k} u_(j) (Martins & Astudillo 2016)."""
    srt, _ = torch.sort(u, dim=-1, descending=True)
    cum = srt.cumsum(-1) - 1
    k = torch.arange(1, u.shape[-1] + 1, dtype=u.dtype, device=u.device)
    support = (k * srt > cum).sum(-1, keepdim=True)
    return cum.gather(-1, support - 1) / support.to(u.dtype)


def _entmax15_threshold_sort(u: torch.Tensor) -> torch.Tensor:
    """1.5-entmax threshold of rows ``u = z/2`` by sorting (Peters et al. 2019, Algorithm 2):
    for each k, τ_k = mean_k − √(1/k − (mean of squares_k − mean_k²)); the support size is the
    largest k with τ_k ≤ u_(k)."""
    srt, _ = torch.sort(u, dim=-1, descending=True)
    k = torch.arange(1, u.shape[-1] + 1, dtype=u.dtype, device=u.device)
    finite = torch.where(torch.isfinite(srt), srt, 0.0)
    mean = finite.cumsum(-1) / k
    mean_sq = (finite * finite).cumsum(-1) / k
    delta = (1 - k * (mean_sq - mean * mean)) / k
    tau = mean - delta.clamp(min=0).sqrt()
    support = (tau <= srt).sum(-1, keepdim=True)
    return tau.gather(-1, support - 1)


def _sparsemax_sort(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sparsemax by sorting (reference implementation)."""
    z = scores.movedim(dim, -1)
    u = z - z.amax(-1, keepdim=True)
    return (u - _sparsemax_threshold_sort(u)).clamp(min=0).movedim(-1, dim)


def _entmax15_sort(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """1.5-entmax by sorting (reference implementation)."""
    z = scores.movedim(dim, -1)
    u = (z - z.amax(-1, keepdim=True)) / 2
    return (u - _entmax15_threshold_sort(u)).clamp(min=0).square().movedim(-1, dim)


def _entmax_bisect(scores: torch.Tensor, alpha: float, dim: int = -1, n_iter: int = 200) -> torch.Tensor:
    """α-entmax by plain bisection of τ on [max u − 1, max u − N^{1−α}] (reference implementation)."""
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


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------


def _validated(scores: object, alpha: object, dim: object) -> tuple[torch.Tensor, Any, Any, int]:
    z, kind = as_tensor(scores, "scores", allow_neg_inf=True, min_ndim=1)
    d = check_dim(z, dim, "scores")
    a = _alpha_argument(alpha, z, d)
    if z.shape[d] == 0:
        raise ValueError(
            f"scores must have at least one entry along dim={dim}, got shape {tuple(z.shape)} "
            "(entmax of an empty axis is undefined)"
        )
    if z.numel() > 0 and bool((z.amax(d) == -math.inf).any()):
        raise ValueError("scores has a row (along dim) whose entries are all -inf; entmax is undefined there")
    return z, kind, a, d


def entmax(scores: ArrayLike, alpha: float | ArrayLike = 1.5, dim: int = -1) -> ArrayLike:
    r"""α-entmax: the maximiser over the simplex of ⟨p, z⟩ − Ω_α(p) (papers/theory.md §1).

    ``p_i = [(α−1) z_i − τ]_+^{1/(α−1)}`` with τ such that Σ p = 1 (α > 1); softmax at α = 1,
    sparsemax (Euclidean projection onto the simplex) at α = 2, exact 1.5-entmax at α = 1.5, and
    Newton root-finding on the threshold with an exact polish on the found support otherwise.

    Parameters
    ----------
    scores : torch.Tensor or numpy.ndarray, shape (..., N, ...)
        Scores z; ``-inf`` entries (masked) get probability exactly 0. At least one finite entry per
        row; NaN and +inf are rejected.
    alpha : float or torch.Tensor or numpy.ndarray, default 1.5
        α ≥ 1: one value, or one per row: a tensor broadcastable to the shape of ``scores`` without
        ``dim`` (e.g. ``(H, 1)`` for scores ``(B, H, L, N)``: one α per head), or of the shape of
        ``scores`` with ``dim`` of size 1 (the ``entmax`` package's convention). α < 1 raises
        ``ValueError``. Rows sharing one of a few α values use that value's kernel (exact at 1.5 and
        2); many distinct values are solved together by Newton's method on the threshold.
    dim : int, default -1
        Axis along which to normalise.

    Returns
    -------
    torch.Tensor or numpy.ndarray
        Probabilities, same shape, kind and dtype as ``scores`` (half precision computed in float32).
        Differentiable for torch inputs: the backward is the closed-form Jacobian of
        :func:`entmax_jacobian`, and for a tensor ``alpha`` that requires grad also ∂p/∂α in closed
        form (Correia et al. 2019): with ``s_i = p_i^{2−α}`` on the support, ``s̃ = s/Σs``,
        ``H = Σ p log p``: ``∂p/∂α = (p − s̃)/(α−1)² − (p log p − s̃ H)/(α−1)``, and its limit
        ``p (Σ p log²p − log²p)/2`` at α = 1.

    Examples
    --------
    >>> import torch
    >>> entmax(torch.tensor([1.0, 0.0, -1.0]), alpha=2.0)
    tensor([1., 0., 0.])
    >>> entmax(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), alpha=torch.tensor([1.0, 2.0]))
    tensor([[0.7311, 0.2689],
            [1.0000, 0.0000]])
    """
    z, kind, a, d = _validated(scores, alpha, dim)
    return restore(_entmax_tensor(z, a, d), kind)


def softmax(scores: ArrayLike, dim: int = -1) -> ArrayLike:
    r"""Softmax ``p_i = exp(z_i) / Σ_j exp(z_j)`` (α-entmax at α = 1).

    Parameters
    ----------
    scores : torch.Tensor or numpy.ndarray
        Scores; ``-inf`` entries get probability 0.
    dim : int, default -1
        Axis to normalise.

    Returns
    -------
    torch.Tensor or numpy.ndarray
        Probabilities of the kind and dtype of ``scores``.

    Examples
    --------
    >>> import torch
    >>> softmax(torch.zeros(2))
    tensor([0.5000, 0.5000])
    """
    return entmax(scores, 1.0, dim)


def sparsemax(scores: ArrayLike, dim: int = -1) -> ArrayLike:
    r"""Sparsemax ``p = argmin_{p∈Δ} ‖p − z‖²`` = ``[z − τ]_+`` (α-entmax at α = 2).

    Parameters
    ----------
    scores : torch.Tensor or numpy.ndarray
        Scores; ``-inf`` entries get probability 0.
    dim : int, default -1
        Axis to normalise.

    Returns
    -------
    torch.Tensor or numpy.ndarray
        Probabilities of the kind and dtype of ``scores``.

    Examples
    --------
    >>> import torch
    >>> sparsemax(torch.tensor([0.5, 0.0]))
    tensor([0.7500, 0.2500])
    """
    return entmax(scores, 2.0, dim)


def entmax15(scores: ArrayLike, dim: int = -1) -> ArrayLike:
    r"""1.5-entmax ``p_i = [z_i/2 − τ]_+²`` with Σ p = 1 (exact threshold).

    Parameters
    ----------
    scores : torch.Tensor or numpy.ndarray
        Scores; ``-inf`` entries get probability 0.
    dim : int, default -1
        Axis to normalise.

    Returns
    -------
    torch.Tensor or numpy.ndarray
        Probabilities of the kind and dtype of ``scores``.

    Examples
    --------
    >>> import torch
    >>> entmax15(torch.tensor([3.0, 0.0]))
    tensor([1., 0.])
    """
    return entmax(scores, 1.5, dim)


def entmax_threshold(scores: ArrayLike, alpha: float | ArrayLike, dim: int = -1) -> ArrayLike:
    r"""The threshold τ of α-entmax: ``p_i = [(α−1) z_i − τ]_+^{1/(α−1)}``, Σ p = 1 (keepdim).

    For α = 1 the u-convention degenerates (τ → −1); the softmax normaliser ``logsumexp(z)`` is returned.

    Parameters
    ----------
    scores : torch.Tensor or numpy.ndarray, shape (..., N, ...)
        Scores (``-inf`` allowed, not a whole row).
    alpha : float or tensor
        α ≥ 1. One α per row as in :func:`entmax`.
    dim : int, default -1
        Axis to normalise.

    Returns
    -------
    torch.Tensor or numpy.ndarray
        τ with ``dim`` kept as size 1.

    Examples
    --------
    >>> import torch
    >>> entmax_threshold(torch.tensor([1.0, 0.0]), alpha=2.0)
    tensor([0.])
    """
    z, kind, a, d = _validated(scores, alpha, dim)
    _, lam = _lambda_tensor(z, a, d)
    if isinstance(a, torch.Tensor):
        a_c = a.detach().to(lam.dtype)
        tau = torch.where(a_c == 1.0, lam, (a_c - 1.0) * lam - 1.0)
    else:
        tau = lam if a == 1.0 else (a - 1.0) * lam - 1.0
    return restore(tau, kind)


def entmax_jacobian(scores: ArrayLike, alpha: float | ArrayLike = 1.5, dim: int = -1) -> ArrayLike:
    r"""Dense Jacobian ∂entmax_α(z)/∂z, shape (..., N, N) (batch axes first, ``dim`` moved last).

    Softmax: ``diag(p) − p pᵀ``; α > 1: ``diag(s) − s sᵀ / Σ s`` with ``s_i = p_i^{2−α}`` on the
    support and 0 off it. Symmetric positive semidefinite with rank |support| − 1; it is the Hessian
    of :func:`entmax_conjugate`.

    Parameters
    ----------
    scores : torch.Tensor or numpy.ndarray, shape (..., N, ...)
        Scores.
    alpha : float or tensor, default 1.5
        α ≥ 1. One α per row as in :func:`entmax`.
    dim : int, default -1
        Axis of the normalisation; the two Jacobian axes are appended last.

    Returns
    -------
    torch.Tensor or numpy.ndarray
        Jacobian matrices of shape ``batch + (N, N)``.

    Examples
    --------
    >>> import torch
    >>> entmax_jacobian(torch.tensor([0.5, 0.0]), alpha=2.0)
    tensor([[ 0.5000, -0.5000],
            [-0.5000,  0.5000]])
    """
    z, kind, a, d = _validated(scores, alpha, dim)
    with torch.no_grad():
        p = _entmax_tensor(z, a, d) if z.dtype not in _HALF else _entmax_tensor(z.float(), a, d)
    s = jacobian_weights(p.movedim(d, -1), a.detach().movedim(d, -1) if isinstance(a, torch.Tensor) else a)
    jac = torch.diag_embed(s) - s.unsqueeze(-1) * s.unsqueeze(-2) / s.sum(-1, keepdim=True).unsqueeze(-1)
    return restore(jac, kind)


def entmax_jvp(
    probs: ArrayLike, vector: ArrayLike, alpha: float | ArrayLike = 1.5, dim: int = -1
) -> ArrayLike:
    r"""Jacobian-vector product ``J v`` of α-entmax from its output ``p`` alone.

    ``J v = s ⊙ v − s ⟨s, v⟩ / Σ s`` with ``s = p`` for α = 1 and ``s_i = p_i^{2−α}`` on the support
    otherwise. J is symmetric, so this is also the vector-Jacobian product (the backward pass).

    Parameters
    ----------
    probs : torch.Tensor or numpy.ndarray, shape (..., N, ...)
        α-entmax output p.
    vector : torch.Tensor or numpy.ndarray, same shape as ``probs``
        The vector v.
    alpha : float or tensor, default 1.5
        α ≥ 1. One α per row as in :func:`entmax`.
    dim : int, default -1
        Axis of the normalisation.

    Returns
    -------
    torch.Tensor or numpy.ndarray
        J v, shape and kind of ``probs``.

    Examples
    --------
    >>> import torch
    >>> entmax_jvp(torch.tensor([0.75, 0.25, 0.0]), torch.tensor([1.0, 0.0, 5.0]), alpha=2.0)
    tensor([ 0.5000, -0.5000,  0.0000])
    """
    p, kind = as_tensor(probs, "probs")
    v, v_kind = as_tensor(vector, "vector")
    kind = result_kind(kind, v_kind)
    d = check_dim(p, dim, "probs")
    a = _alpha_argument(alpha, p, d)
    if isinstance(a, torch.Tensor):
        a = a.detach()
    if p.shape != v.shape:
        raise ValueError(f"vector must have the shape of probs {tuple(p.shape)}, got {tuple(v.shape)}")
    if bool((p < 0).any()):
        raise ValueError("probs must be non-negative (an entmax output)")
    if p.numel() > 0 and bool((p.amax(d) <= 0).any()):
        raise ValueError("probs has a row (along dim) without a positive entry; an entmax output sums to 1")
    dtype = torch.promote_types(p.dtype, v.dtype)
    return restore(_jvp_tensor(p.to(dtype), v.to(dtype), a, d), kind)


def _conjugate_value(
    scores: torch.Tensor, probs: torch.Tensor, lam: torch.Tensor, alpha: torch.Tensor, dim: int
) -> torch.Tensor:
    """Ψ*_α row by row for a tensor α (shape of ``probs`` with ``dim`` of size 1), keepdim."""
    a = alpha.detach().to(probs.dtype)
    z = scores.float() if scores.dtype in _HALF else scores
    safe = torch.where(a == 1.0, 2.0, a)
    pa = probs.pow(safe).sum(dim, keepdim=True)
    inner = torch.where(probs > 0, probs * z, 0.0).sum(dim, keepdim=True)
    direct = inner + (1.0 - pa) / (safe * (safe - 1.0))
    value = torch.where(a > 2.0, direct, lam + (pa - 1.0) / safe)
    return torch.where(a == 1.0, lam, value)


def _conjugate_alpha_derivative(probs: torch.Tensor, alpha: torch.Tensor, dim: int) -> torch.Tensor:
    """∂Ψ*_α(z)/∂α = −∂Ω_α(p)/∂α at p = entmax_α(z) (Danskin), keepdim, in float64.

    ``∂Ω_α/∂α = Σ p^α log p/(α(α−1)) − (Σ p^α − 1)(2α − 1)/(α(α−1))²``, with the limit
    ``Σ p log²p / 2 − Σ p log p`` at α → 1.
    """
    p = probs.double()
    a = alpha.double()
    support = p > 0
    logp = torch.where(support, p, 1.0).log() * support
    near = a - 1.0 < _ALPHA_GRAD_LIMIT
    a_s = torch.where(near, 2.0, a)
    c = a_s * (a_s - 1.0)
    pa = torch.where(support, p, 0.0).pow(a_s)
    excess = pa.sum(dim, keepdim=True) - 1.0
    general = (pa * logp).sum(dim, keepdim=True) / c - excess * (2 * a_s - 1) / (c * c)
    limit = (p * logp * logp).sum(dim, keepdim=True) / 2 - (p * logp).sum(dim, keepdim=True)
    return -torch.where(near, limit, general)


class _ConjugateAlphaFunction(torch.autograd.Function):
    """Ψ*_α with α per row: gradient entmax_α(z) in z and −∂Ω_α(p)/∂α in α."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, alpha: torch.Tensor, dim: int) -> torch.Tensor:
        probs, lam = _lambda_tensor(scores, alpha, dim)
        value = _conjugate_value(scores, probs, lam, alpha, dim)
        ctx.dim = dim
        ctx.save_for_backward(probs, alpha)
        return value.squeeze(dim).to(scores.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        probs, alpha = ctx.saved_tensors
        g = grad_output.unsqueeze(ctx.dim)
        grad_a = None
        if ctx.needs_input_grad[1]:
            d_alpha = _conjugate_alpha_derivative(probs, alpha.detach(), ctx.dim)
            grad_a = (g.double() * d_alpha).to(alpha.dtype)
        return (g * probs).to(grad_output.dtype), grad_a, None


class _ConjugateFunction(torch.autograd.Function):
    """Ψ*_α with gradient entmax_α (Danskin): the backward multiplies the saved probabilities."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, alpha: float, dim: int) -> torch.Tensor:
        probs, lam = _lambda_tensor(scores, alpha, dim)
        if alpha == 1.0:
            value = lam
        elif alpha > 2.0:
            # ⟨p, z⟩ − Ω_α(p) directly: the threshold form below needs p_i = y_i^{1/(α−1)} for every i,
            # which entries at the edge of the support do not resolve for α > 2 (_fill_support_edge)
            z = scores.float() if scores.dtype in _HALF else scores
            inner = torch.where(probs > 0, probs * z, 0.0).sum(dim, keepdim=True)
            value = inner + (1.0 - probs.pow(alpha).sum(dim, keepdim=True)) / (alpha * (alpha - 1.0))
        else:
            # Σ p^α/α + τ/(α−1) + 1/(α(α−1)) with τ = (α−1)λ − 1, rearranged to avoid the
            # cancellation of two O(1/(α−1)) terms: λ + (Σ p^α − 1)/α
            value = lam + (probs.pow(alpha).sum(dim, keepdim=True) - 1.0) / alpha
        ctx.dim = dim
        ctx.save_for_backward(probs)
        return value.squeeze(dim).to(scores.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        (probs,) = ctx.saved_tensors
        return (grad_output.unsqueeze(ctx.dim) * probs).to(grad_output.dtype), None, None


def entmax_conjugate(scores: ArrayLike, alpha: float | ArrayLike = 1.5, dim: int = -1) -> ArrayLike:
    r"""Convex conjugate ``Ψ*_α(z) = max_{p∈Δ} ⟨p, z⟩ − Ω_α(p)`` (the dim is reduced).

    α = 1: ``logsumexp(z)``; α > 1, with p = entmax_α(z) and its threshold τ:
    ``Ψ*_α(z) = Σ p_i^α / α + τ/(α−1) + 1/(α(α−1))`` (computed as ``λ + (Σ p^α − 1)/α`` with
    ``τ = (α−1)λ − 1``, which is stable as α → 1). Its gradient is entmax_α(z) (torch inputs are
    differentiable) and its Hessian :func:`entmax_jacobian`.

    Parameters
    ----------
    scores : torch.Tensor or numpy.ndarray, shape (..., N, ...)
        Scores z.
    alpha : float or tensor, default 1.5
        α ≥ 1. One α per row as in :func:`entmax`. A tensor α that requires grad gets ∂Ψ*/∂α = −∂Ω_α(p)/∂α.
    dim : int, default -1
        Axis reduced.

    Returns
    -------
    torch.Tensor or numpy.ndarray
        Ψ*_α(z), ``scores`` with ``dim`` removed.

    Examples
    --------
    >>> import torch
    >>> entmax_conjugate(torch.tensor([0.0, 0.0]), alpha=1.0)
    tensor(0.6931)
    """
    z, kind, a, d = _validated(scores, alpha, dim)
    if isinstance(a, torch.Tensor):
        value: torch.Tensor = _ConjugateAlphaFunction.apply(z, a, d)
    else:
        value = _ConjugateFunction.apply(z, a, d)
    return restore(value, kind)
