"""Exact thresholds of sparsemax (α = 2) and 1.5-entmax: support passes from the left end of the bracket,
and the sort algorithms they fall back on (papers/theory.md §1).

Thresholds are in ``u = (α−1) z`` units on rows shifted to ``max u = 0``: ``p = [u − τ]_+^{1/(α−1)}``.
On a candidate support S = {u > τ} the exact threshold is linear (α = 2) or the root of a quadratic
(α = 1.5). Starting from τ₀ = max u − 1 and re-solving on the support each new threshold induces reaches,
in a handful of passes, a threshold whose support reproduces itself: that fixed point is exact (checked
by counting the support; a row that does not settle is repaired by the sort algorithm).
"""

from __future__ import annotations

import math
from typing import Any

import torch

MAX_SUPPORT_ITER = 24
# passes run on every row before the first test of which rows have settled (most settle in 2–4)
FIXED_SUPPORT_PASSES = 3

# (count of the previous support, whether the previous pass solved a quadratic exactly)
SupportState = tuple[torch.Tensor, torch.Tensor]


def support_stats(u: torch.Tensor, tau: torch.Tensor, d: torch.Tensor, quadratic: bool) -> tuple[Any, ...]:
    """Σd, Σd² (if ``quadratic``) and |{d > 0}| of d = [u − τ]_+, with ``d`` a buffer of the shape of ``u``
    (overwritten).

    The one full-size intermediate lives in that preallocated buffer: fresh allocations of this size
    cost page faults that would dominate the solver's time, and a second buffer would be one more
    score-sized allocation per call. d is first summed and its norm taken (Σd² as a fused norm
    reduction: a dot product of d with itself would first write the full product), then turned into
    its signs in place and summed again (the support count).
    """
    torch.sub(u, tau, out=d).clamp_(min=0)
    s1 = d.sum(-1, keepdim=True)
    s2 = torch.linalg.vector_norm(d, 2, -1, keepdim=True).square_() if quadratic else None
    count = d.sign_().sum(-1, keepdim=True)
    return s1, s2, count


def support_sums(u: torch.Tensor, tau: torch.Tensor, quadratic: bool) -> tuple[Any, ...]:
    """Σd, Σd² (if ``quadratic``) and |{d > 0}| of d = [u − τ]_+, as fresh tensors: the form of
    :func:`support_stats` that ``torch.compile`` fuses into one loop over the entries per pass (no
    scratch buffers; the count is summed in the float dtype, which vectorises where an integer sum
    does not).
    """
    d = (u - tau).clamp(min=0)
    s1 = d.sum(-1, keepdim=True)
    s2 = (d * d).sum(-1, keepdim=True) if quadratic else None
    count = (d > 0).to(u.dtype).sum(-1, keepdim=True)
    return s1, s2, count


def certified_passes(
    z: torch.Tensor, quadratic: bool, passes: int, tol_eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``passes`` support passes of α = 1.5 (``quadratic``) or α = 2 on rows ``z`` (scores, last axis)
    from τ₀ = −1, without reading anything back to the host: (p, λ in score units, certified).

    A row is certified when its support reproduced itself (τ exact) or when the mass of p from the last
    threshold is 1 to within ``tol_eps`` eps: F(τ) = Σ[u − τ]_+^k is strictly decreasing where positive
    and every p_i moves by at most |F − 1| on the way to the root (Δp_i = ΔF·d_i/Σd for α = 1.5, ΔF/|S|
    for α = 2), so the test bounds the error of p by the tolerance, one pass sooner. A row of only −inf
    is never certified (shifted by its maximum it is NaN, which can pass the support test at α = 2).
    The fused kernels (the compiled backend, α-entmax under ``torch.compile``) run this.
    """
    top = z.amax(-1, keepdim=True)
    u = z - top
    if quadratic:
        u = u * 0.5
    tau = torch.full_like(top, -1.0)
    state = initial_state(tau)
    settled = state[1]
    update = entmax15_update if quadratic else sparsemax_update
    for _ in range(passes):
        s1, s2, count = support_sums(u, tau, quadratic)
        settled, tau, state = update(tau, s1, s2, count, state)
    p, lam = probs_from_threshold(u, tau, quadratic)
    mass = p.sum(-1, keepdim=True)
    certified = settled | ((mass - 1).abs() <= tol_eps * torch.finfo(z.dtype).eps)
    return p, lam + top, certified & (top > -math.inf)


def sparsemax_update(
    tau: torch.Tensor, s1: torch.Tensor, s2: Any, count: torch.Tensor, state: SupportState
) -> tuple[torch.Tensor, torch.Tensor, SupportState]:
    """One Newton (Michelot) step τ ← τ + (Σd − 1)/|S|, the exact threshold of the current support.

    It is a lower bound of τ*, so τ increases monotonically; exact as soon as the support count repeats.
    Returns (settled, τ_new, state).
    """
    count_prev = state[0]
    settled = count == count_prev
    return settled, torch.where(settled, tau, tau + (s1 - 1) / count), (count, state[1])


def entmax15_update(
    tau: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, count: torch.Tensor, state: SupportState
) -> tuple[torch.Tensor, torch.Tensor, SupportState]:
    """One pass for p = [u − τ]_+² (u = z/2): the smaller root of Σ_S (u_i − τ)² = 1 on the current support.

    With d = u − τ_k this is τ = τ_k + (Σd² − 1)/(Σd + √((Σd)² − |S|(Σd² − 1))). Solving on S(τ_k) lands
    above τ* when S(τ_k) ⊋ S* and below when S(τ_k) ⊊ S*, so the iterates bracket τ* from both sides
    with shrinking gaps and stop as soon as a support reproduces itself (then τ = τ* exactly). When
    the quadratic has no real root (a far too large support) a Newton step on ‖[u − τ]_+‖₂ − 1, a
    convex decreasing function, is taken instead; it stays a lower bound. Returns (settled, τ_new, state).
    """
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


def initial_state(tau: torch.Tensor) -> SupportState:
    """The state before the first pass: no previous support, no exact solve."""
    return torch.full_like(tau, -1.0), torch.zeros_like(tau, dtype=torch.bool)


def support_pass(
    u: torch.Tensor, tau: torch.Tensor, state: SupportState, d: torch.Tensor, quadratic: bool
) -> tuple[torch.Tensor, torch.Tensor, SupportState]:
    """One support pass of α = 1.5 (``quadratic``) or α = 2 on rows ``u``: (settled, τ_new, state).

    The eager solver (:func:`threshold`) and the compiled backend both iterate this function.
    """
    s1, s2, count = support_stats(u, tau, d, quadratic)
    update = entmax15_update if quadratic else sparsemax_update
    return update(tau, s1, s2, count, state)


def _iterate_support(u: torch.Tensor, d: torch.Tensor, quadratic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Support passes from τ₀ = −1 until every row settles; returns (τ, settled mask) for all rows.

    The first ``FIXED_SUPPORT_PASSES`` passes run on every row without reading anything back to the
    host (a settled row keeps its threshold, so further passes leave it unchanged); most rows have
    settled by then. One test follows, and the few rows left go on alone (:func:`_iterate_rows`).
    (Handing those rows to the sort algorithm instead, once few, was measured slower: sorting a thousand
    rows of 16 costs more than the two or three passes they still need.)
    """
    tau = torch.full_like(u[:, :1], -1.0)
    state = initial_state(tau)
    settled = state[1]
    for _ in range(FIXED_SUPPORT_PASSES):
        settled, tau, state = support_pass(u, tau, state, d, quadratic)
    if bool(settled.all()):
        return tau, settled
    keep = (~settled).squeeze(-1).nonzero().squeeze(-1)
    rest = (state[0].index_select(0, keep), state[1].index_select(0, keep))
    u_rest, tau_rest = u.index_select(0, keep), tau.index_select(0, keep)
    tau_rest, done_rest = _iterate_rows(u_rest, tau_rest, rest, d, quadratic)
    tau[keep] = tau_rest
    settled[keep] = done_rest
    return tau, settled


def _iterate_rows(
    u: torch.Tensor, tau: torch.Tensor, state: SupportState, d: torch.Tensor, quadratic: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Support passes on rows ``u`` from thresholds ``tau`` (with their ``state``) until every row
    settles or ``MAX_SUPPORT_ITER`` passes have run; returns (τ, settled mask).

    Rows settle at different passes, so once at least half of the rows still iterated have settled,
    their thresholds are stored and the passes go on with the others only.
    """
    result = tau.clone()
    done = torch.zeros_like(tau, dtype=torch.bool)
    idx: torch.Tensor | None = None  # rows of u still iterated (None: all)
    cur = u
    for _ in range(MAX_SUPPORT_ITER - FIXED_SUPPORT_PASSES):
        settled, new_tau, state = support_pass(cur, tau, state, d[: cur.shape[0]], quadratic)
        n_settled = int(settled.sum())
        if 2 * n_settled >= cur.shape[0]:
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


def threshold(u: torch.Tensor, quadratic: bool, scratch: torch.Tensor) -> torch.Tensor:
    """Exact threshold τ of rows ``u`` (max 0) for α = 1.5 (``quadratic``) or α = 2 (keepdim).

    Support passes (:func:`support_pass`); a row that does not settle within ``MAX_SUPPORT_ITER``
    passes is solved by the sort algorithm. ``scratch`` is float scratch of the shape of ``u``.
    """
    tau, settled = _iterate_support(u, scratch, quadratic)
    if not bool(settled.all()):
        rows = (~settled).squeeze(-1).nonzero().squeeze(-1)
        sort_fn = entmax15_threshold_sort if quadratic else sparsemax_threshold_sort
        tau[rows] = sort_fn(u[rows])
    return tau


def probs_from_threshold(
    u: torch.Tensor, tau: torch.Tensor, quadratic: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, λ − max z) from rows ``u`` (max 0, overwritten by p) and τ: p = [u − τ]_+ (squared for α = 1.5).

    λ is the threshold in score units, ``τ = (α−1) λ − 1`` (the convention of :mod:`.newton`).
    """
    p = u.sub_(tau).clamp_(min=0)
    if quadratic:
        return p.mul_(p), 2.0 * (tau + 1.0)
    return p, tau + 1.0


# ------------------------------------------------------------------------------------------------------
# sort algorithms: the fallback of rows that do not settle, and the baseline of the benchmarks
# ------------------------------------------------------------------------------------------------------


def sparsemax_threshold_sort(u: torch.Tensor) -> torch.Tensor:
    """Sparsemax threshold of rows ``u`` by sorting: τ = (Σ_{j≤k} u_(j) − 1)/k for the largest k with
    1 + k u_(k) > Σ_{j≤k} u_(j) (Martins & Astudillo 2016)."""
    srt, _ = torch.sort(u, dim=-1, descending=True)
    cum = srt.cumsum(-1) - 1
    k = torch.arange(1, u.shape[-1] + 1, dtype=u.dtype, device=u.device)
    support = (k * srt > cum).sum(-1, keepdim=True).clamp_(min=1)  # a row with a NaN: NaN, not an error
    return cum.gather(-1, support - 1) / support.to(u.dtype)


def entmax15_threshold_sort(u: torch.Tensor) -> torch.Tensor:
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
    # at least 1 (a row of only -inf has none: its τ is then finite junk, and p = [-inf - τ]_+ = 0)
    support = (tau <= srt).sum(-1, keepdim=True).clamp_(min=1)
    return tau.gather(-1, support - 1)


_RANKS: dict[tuple[int, torch.dtype, torch.device, bool], torch.Tensor] = {}


def _ranks(n: int, dtype: torch.dtype, device: torch.device, inverse: bool = False) -> torch.Tensor:
    """k (or 1/k) for k = 1..n, cached per length, dtype and device: one tensor fewer to build per call."""
    key = (n, dtype, device, inverse)
    ranks = _RANKS.get(key)
    if ranks is None:
        ranks = torch.arange(1, n + 1, dtype=dtype, device=device)
        if inverse:
            ranks = ranks.reciprocal_()
        if len(_RANKS) < 64:
            _RANKS[key] = ranks
    return ranks


def _entmax15_sort_parts(
    z: torch.Tensor, inv_k: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p, τ, top) of 1.5-entmax of the rows of ``z`` (last axis) by sorting: top = max z / 2 (the
    lowest finite value for a row of only −inf) and τ the threshold of u = z/2 − top.

    The threshold is :func:`entmax15_threshold_sort`'s (the support is the number of ranks k with
    τ_k ≤ u_(k)), computed on sorted rows whose −inf entries are clamped to the dtype's lowest finite
    value: their τ_k is NaN or above u_(k), so they never count, and a row of only −inf gets a finite
    threshold. p is then taken from the unclamped, shifted scores, so −inf entries (and rows of only −inf)
    get p = 0. ``z`` must be free of NaN and +inf. ``inv_k``: 1/k for k = 1..n (:func:`_ranks`) when the
    caller has it (inside ``torch.cond`` the cache may not be written).
    """
    half = z.mul(0.5)
    srt = torch.sort(half, dim=-1, descending=True)[0].clamp_(min=torch.finfo(z.dtype).min)
    top = srt[..., :1]
    shifted = srt - top  # not in place: ``top`` is a view of ``srt``
    if inv_k is None:
        inv_k = _ranks(z.shape[-1], z.dtype, z.device, inverse=True)
    mean = shifted.cumsum(-1).mul_(inv_k)
    # τ_k = mean_k − √(1/k − (mean of squares_k − mean_k²))
    delta = torch.addcmul(inv_k, mean, mean).sub_(shifted.square().cumsum(-1).mul_(inv_k))
    tau = mean.sub_(delta.clamp_(min=0).sqrt_())
    # at least 1: a row with a NaN has none, and then gets NaN rather than an index error
    support = (tau <= shifted).sum(-1, keepdim=True).clamp_(min=1)
    tau = tau.gather(-1, support.sub_(1))
    # p from the shifted scores (a threshold in unshifted units would round away at |z| ≳ 1e8)
    return half.sub_(top).sub_(tau).clamp_(min=0).square_(), tau, top


def entmax15_sort_probs(z: torch.Tensor) -> torch.Tensor:
    """1.5-entmax probabilities of the rows of ``z`` (last axis) by sorting, in about 22 dispatches and
    no host synchronisation: the kernel of small score tensors in the attention hot path
    (:func:`.blocked.probs`). −inf entries get p = 0, and so does a row of only −inf; ``z`` must be free
    of NaN and +inf."""
    return _entmax15_sort_parts(z)[0]


def entmax15_sort_rows(
    z: torch.Tensor, ranks: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, λ) of 1.5-entmax of rows ``z`` (n, k) by sorting, λ in score units: the same kernel as
    :func:`entmax15_sort_probs` (no host synchronisation), for :func:`.blocked.forward` on small tensors
    and under compilation. A row of only −inf gets p = 0 and λ = −inf, as from the blocked kernel.
    ``ranks``: :func:`_ranks` ``(n, inverse=True)``, if the caller has it."""
    p, tau, top = _entmax15_sort_parts(z, ranks)
    # p_i = [u_i − τ]_+² with u = z/2 − top and λ = 2(τ + 1) + max z (the convention of .newton)
    lam = torch.where(top > torch.finfo(z.dtype).min, (tau + top + 1.0).mul_(2.0), -math.inf)
    return p, lam


def _sparsemax_sort_parts(
    z: torch.Tensor, ranks: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p, τ, top) of sparsemax of the rows of ``z`` (last axis) by sorting: top = max z (the lowest
    finite value for a row of only −inf) and τ the threshold of u = z − top, p = [u − τ]_+.

    The threshold is :func:`sparsemax_threshold_sort`'s, on sorted rows whose −inf entries are clamped to
    the lowest finite value (k u_(k) then overflows to −inf or stays below the partial sum, so they never
    count); p comes from the unclamped, shifted scores: 0 on −inf entries and on rows of only −inf.
    """
    srt = torch.sort(z, dim=-1, descending=True)[0].clamp_(min=torch.finfo(z.dtype).min)
    top = srt[..., :1]
    shifted = srt - top  # not in place: ``top`` is a view of ``srt``
    cum = shifted.cumsum(-1).sub_(1)
    if ranks is None:
        ranks = _ranks(z.shape[-1], z.dtype, z.device)
    support = (ranks.mul(shifted) > cum).sum(-1, keepdim=True).clamp_(min=1)  # a NaN row: NaN, as above
    tau = cum.gather(-1, support.sub(1)).div_(support)
    return (z - top).sub_(tau).clamp_(min=0), tau, top


def sparsemax_sort_probs(z: torch.Tensor) -> torch.Tensor:
    """Sparsemax probabilities of the rows of ``z`` (last axis) by sorting, in about 14 dispatches and no
    host synchronisation (:func:`.blocked.probs` on small tensors). −inf entries get p = 0, and so does a
    row of only −inf; ``z`` must be free of NaN and +inf."""
    return _sparsemax_sort_parts(z)[0]


def sparsemax_sort_rows(
    z: torch.Tensor, ranks: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, λ) of sparsemax of rows ``z`` by sorting, λ = τ + 1 + max z in score units (the convention of
    :mod:`.newton`); a row of only −inf gets p = 0 and λ = −inf, as from the blocked kernel. ``ranks``:
    :func:`_ranks` ``(n)``, if the caller has it."""
    p, tau, top = _sparsemax_sort_parts(z, ranks)
    return p, torch.where(top > torch.finfo(z.dtype).min, (tau + top).add_(1.0), -math.inf)


def entmax15_sort(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """1.5-entmax of whole rows by sorting (the sort-based baseline that analysis/ times; tests use it
    as an exact reference)."""
    z = scores.movedim(dim, -1)
    u = (z - z.amax(-1, keepdim=True)) / 2
    return (u - entmax15_threshold_sort(u)).clamp(min=0).square().movedim(-1, dim)
