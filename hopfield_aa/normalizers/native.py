"""CPU kernels of α-entmax compiled by numba: one call per tensor where the blocked kernel of
:mod:`.blocked` dispatches tens of tensor ops per block of rows (papers/theory.md §1).

α = 1.5 and 2 (:func:`forward`, :func:`probs`): each row is solved while it sits in the cache, in three
steps, with up to ``_GROUP`` rows stepped in turn so that their support passes overlap:

1. the maximum m (eight running maxima), then the candidates z_j − m > −1/(α−1), collected by vector
   compresses (:func:`.._jit.compress_above`), as u = (α−1)(z − m) in float64 (the threshold never drops
   below the left end of its bracket, so no other entry can be in the support,
   :func:`.blocked._candidate_reach`); rows of at most ``_SHORT_ROW`` entries keep every entry (those
   at or below −1 never count);
2. the support passes of :mod:`.exact` (α = 1.5: the smaller root of the quadratic on the current
   support; α = 2: the Michelot step) on them, from τ₀ = −1 until the support reproduces itself; every
   iterate stays ≥ −1, so the entries left out never count. A row that has not settled after
   ``MAX_SUPPORT_ITER`` passes is solved by sorting its candidates;
3. one pass writes p = [(z − m)/2 − τ]_+² (α = 1.5) or [z − m − τ]_+ (α = 2) in the input dtype, the
   same rounding as the tensor kernels.

Any other α (:func:`newton_forward`): the same first step (the candidates kept as z − m in the input
dtype, with their columns), then Newton's method on the threshold from the left end of its bracket
(Halley's where α ≤ 1.5; for α > 2 a bisection every other step until the bracket holds no point where
an entry enters the support, then the repair of entries at the edge of the support, as in
:mod:`.newton`), every evaluation of p = (1 + (α−1)(z − m − λ))^{1/(α−1)} over the candidates vectorised
(its log and exp as polynomials, or squarings for a whole 1/(α−1)), then zeros and p at the candidates'
columns: one call per tensor.

A row of only −inf gets p = 0 and λ = −inf; a row with a NaN or +inf score (outside the contract of
:func:`.api.entmax_tensor`) has NaN in its output. The kernels compile on their first call per dtype
(:mod:`hopfield_aa._jit`); where numba cannot be imported or native kernels are switched off,
:func:`applies` is False and the tensor kernels run instead. Inside a ``torch.compile``'d graph the
α = 1.5 and 2 kernel is the custom op ``hopfield_aa::entmax_rows`` (:func:`in_graph`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from hopfield_aa import _jit
from hopfield_aa._jit import compress_above, compress_above_at
from hopfield_aa.normalizers.exact import MAX_SUPPORT_ITER
from hopfield_aa.normalizers.newton import MAX_NEWTON_ITER

ALPHAS = (1.5, 2.0)
_SHORT_ROW = 32  # rows of at most this many entries are solved whole, without collecting candidates
_GROUP = 8  # rows whose support passes are interleaved (:func:`_rows`), fewer for long rows: a group's
_GROUP_ENTRIES = 2048  # entries stay in the cache until its output is written (measured)


def _row_max(z: Any, r: int) -> Any:  # pragma: no cover - numba
    """The maximum of row ``r`` of ``z`` (NaN entries never taken, unless the first), as eight independent
    running maxima so that the compares pipeline; inlined into the kernels that call it."""
    n = z.shape[1]
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = z[r, 0]
    j = 0
    while j + 8 <= n:
        m0 = z[r, j] if z[r, j] > m0 else m0
        m1 = z[r, j + 1] if z[r, j + 1] > m1 else m1
        m2 = z[r, j + 2] if z[r, j + 2] > m2 else m2
        m3 = z[r, j + 3] if z[r, j + 3] > m3 else m3
        m4 = z[r, j + 4] if z[r, j + 4] > m4 else m4
        m5 = z[r, j + 5] if z[r, j + 5] > m5 else m5
        m6 = z[r, j + 6] if z[r, j + 6] > m6 else m6
        m7 = z[r, j + 7] if z[r, j + 7] > m7 else m7
        j += 8
    for i in range(j, n):
        m0 = z[r, i] if z[r, i] > m0 else m0
    return max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))


def sorted_threshold(u: Any, quadratic: bool) -> float:  # pragma: no cover - numba
    """The threshold τ of one row's ``u`` = (α − 1)(z − max z) by sorting (the fallback of the support
    passes, here and in :mod:`hopfield_aa.guidance.fused`): over the i largest entries above −1, in
    float64, α = 1.5: τ_i = mean − √((1 − Σu² + Σu · mean)/i); α = 2: τ_i = (Σu − 1)/i; the support is
    the count of i with τ_i below the i-th entry (at or below, α = 1.5)."""
    srt = np.sort(u[u > -1.0].astype(np.float64))[::-1]
    taus = np.empty(srt.shape[0], np.float64)
    total = 0.0
    total_sq = 0.0
    support = 0
    for i in range(srt.shape[0]):
        total += srt[i]
        size = i + 1.0
        if quadratic:
            total_sq += srt[i] * srt[i]
            mean = total / size
            taus[i] = mean - math.sqrt(max((1.0 - total_sq + total * mean) / size, 0.0))
            support += taus[i] <= srt[i]
        else:
            taus[i] = (total - 1.0) / size
            support += taus[i] < srt[i]
    return float(taus[max(support, 1) - 1])


def _rows(z: Any, p: Any, lam: Any, quadratic: bool, max_passes: int) -> None:  # pragma: no cover - numba
    """1.5-entmax (``quadratic``) or sparsemax of the rows of ``z`` (R, n) into ``p``, λ into ``lam`` (R,);
    rows not settled after ``max_passes`` support passes are solved by sorting.

    Rows go in groups of up to ``_GROUP``: the support passes of one row form a chain (each waits on the last
    one's square root and division), and stepping the rows of a group in turn lets the chains overlap.
    """
    n_rows, n = z.shape
    reach = 2.0 if quadratic else 1.0
    scale = 0.5 if quadratic else 1.0
    typed = np.empty(2, z.dtype)  # constants in the input dtype (a float literal is float64)
    typed[0] = scale
    typed[1] = 0.0
    zero = typed[1]
    half = typed[0]
    # the collected entries of each row, (z − max)·scale, padded with −inf (never in the support) to whole
    # vectors of 8, so that the support passes have no scalar remainder (measured: float32 32768×77, about
    # 6 candidates a row: 4.3 → 3.9 ms for the whole call)
    u = np.empty((_GROUP, (n + 7) // 8 * 8), np.float64)
    lanes = 64 // z.itemsize  # entries per compress (:func:`.._jit.compress_above`)
    room = n + lanes
    kept = np.empty((_GROUP, room), z.dtype)  # their z − max, in the input dtype
    typed[0] = -reach
    limit = typed[0]  # −1 or −2: exact in either dtype
    size = np.empty(_GROUP, np.int64)
    padded = np.empty(_GROUP, np.int64)  # the passes' trip count: candidates padded to whole vectors
    top = np.empty(_GROUP, z.dtype)
    tau = np.empty(_GROUP, np.float64)
    count_prev = np.empty(_GROUP, np.float64)
    exact_prev = np.empty(_GROUP, np.bool_)
    active = np.empty(_GROUP, np.bool_)
    group = min(_GROUP, max(1, _GROUP_ENTRIES // n))
    for r0 in range(0, n_rows, group):
        rows = min(group, n_rows - r0)
        for g in range(rows):
            r = r0 + g
            m = _row_max(z, r)
            top[g] = m
            k = 0
            if n <= _SHORT_ROW:  # every entry (vectorised): those at or below −1 never count
                for j in range(n):
                    u[g, j] = np.float64(z[r, j] - m) * scale
                k = n
            else:
                j = 0
                while j + lanes <= n:  # a vector compress per ``lanes`` entries
                    k += compress_above(z, r * n + j, 0, m, limit, kept, g * room + k)
                    j += lanes
                if j < n:  # the last window ends at the row's end; its lanes before j were seen
                    k += compress_above(z, r * n + n - lanes, lanes - n + j, m, limit, kept, g * room + k)
                for i in range(k):
                    u[g, i] = np.float64(kept[g, i]) * scale
            size[g] = k
            padded[g] = (k + 7) // 8 * 8
            for i in range(k, padded[g]):
                u[g, i] = -np.inf
            tau[g] = -1.0
            count_prev[g] = -1.0
            exact_prev[g] = False
            active[g] = m != -np.inf
        for _ in range(max_passes):
            left = 0
            for g in range(rows):
                if not active[g]:
                    continue
                t = tau[g]
                s1 = 0.0
                s2 = 0.0
                count = 0.0
                for i in range(padded[g]):  # branch-free, vectorised (sums may be reordered)
                    d = u[g, i] - t
                    d = d if d > 0.0 else 0.0
                    s1 += d
                    s2 += d * d
                    count += 1.0 if d > 0.0 else 0.0
                if count == count_prev[g] and (exact_prev[g] or not quadratic):
                    active[g] = False
                    continue
                left += 1
                if quadratic:
                    excess = s2 - 1.0
                    disc = s1 * s1 - count * excess
                    exact_prev[g] = disc >= 0.0
                    if disc >= 0.0:
                        tau[g] = t + excess / (s1 + math.sqrt(disc))
                    else:
                        norm = math.sqrt(s2)
                        tau[g] = t + norm * (norm - 1.0) / s1
                else:
                    tau[g] = t + (s1 - 1.0) / count
                count_prev[g] = count
            if left == 0:
                break
        for g in range(rows):
            r = r0 + g
            m = top[g]
            if m == -np.inf:
                for j in range(n):
                    p[r, j] = zero
                lam[r] = -np.inf
                continue
            if active[g]:  # not settled: the sort algorithm on the candidates
                tau[g] = sorted_threshold(u[g, : size[g]], quadratic)
            typed[1] = tau[g]
            t_typed = typed[1]
            if quadratic:
                for j in range(n):
                    d = max((z[r, j] - m) * half - t_typed, zero)
                    p[r, j] = d * d
                lam[r] = 2.0 * (tau[g] + 1.0) + m
            else:
                for j in range(n):
                    p[r, j] = max(z[r, j] - m - t_typed, zero)
                lam[r] = tau[g] + 1.0 + m


_KERNEL = _jit.Kernel(
    _rows, helpers=(_row_max, sorted_threshold), reassociate=True, intrinsics=(compress_above,)
)


# ln 2 in two parts (fdlibm's split: k·_LN2_HI is exact for the |k| < 2^11 of a float64 exponent)
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.4426950408889634
_SQRT2 = 1.4142135623730951
_TINY = 2.2250738585072014e-308  # the smallest normal float64
_F64_EPS = 2.220446049250313e-16


def _exp(v: float, precise: bool) -> float:  # pragma: no cover - numba
    """e^v for v ≤ 0 (0 below the normal range and for NaN: callers test NaN themselves) as arithmetic the
    compiler vectorises: v = k ln 2 + r, |r| ≤ ln 2 / 2, e^r by a polynomial in r (12 terms where
    ``precise``, else 8; accuracy as measured in :func:`_power`), 2^k from its bits."""
    k = math.floor(v * _INV_LN2 + 0.5)
    r = (v - k * _LN2_HI) - k * _LN2_LO
    if precise:
        q = 2.5114870219497476e-08
        q = q * r + 2.7632640675430235e-07
        q = q * r + 2.755722495611072e-06
        q = q * r + 2.480148547921643e-05
        q = q * r + 0.00019841269909219843
        q = q * r + 0.0013888888952318045
        q = q * r + 0.008333333333309526
        q = q * r + 0.04166666666648808
        q = q * r + 0.16666666666666702
        q = q * r + 0.5000000000000019
        q = q * r + 1.0
        q = q * r + 1.0
    else:
        q = 0.00019915869191389535
        q = q * r + 0.0013948580818093912
        q = q * r + 0.008333266093189582
        q = q * r + 0.04166621827440191
        q = q * r + 0.16666666891074364
        q = q * r + 0.5000000107749384
        q = q * r + 0.9999999999797808
        q = q * r + 0.9999999999595482
    normal = k > -1022.0
    scale = np.int64((np.int64(k if normal else 0.0) + 1023) << 52).view(np.float64)
    return q * scale if normal else 0.0


def _power(x: float, beta: float, precise: bool) -> tuple[float, float]:  # pragma: no cover - numba
    """((1 + x)^β, 1/(1 + x)) for −1 < x ≤ 0 and (0, 0) for x ≤ −1, as arithmetic that the compiler
    vectorises (libm's log and exp are called one entry at a time: 4× the time). Relative errors below
    3e-16·(1 + |w|), w = β ln(1 + x), where ``precise`` (float64 scores), else below 5e-11·(1 + |w|)
    (float32 scores, which round at 6e-8: polynomials of 4 and 8 terms instead of 7 and 12); measured
    against 40-digit arithmetic for β from 1.01 to 1e6.

    ln y, y = 1 + x: y = m·2^e with m in [√½, √2), ln m = 2 atanh(t), t = (m − 1)/(m + 1), |t| ≤ 0.172,
    by a polynomial in t² (near-minimax: least squares at Chebyshev nodes); where e = 0, t = x/(2 + x)
    from x itself (log1p's accuracy: 1 + x would round x off, which β ≫ 1 magnifies). e^w: w = k ln 2 + r,
    |r| ≤ ln 2 / 2, e^r by a polynomial in r (fitted alike), 2^k from its bits (0 below the normal range).
    One division serves t and 1/y."""
    y = 1.0 + x
    positive = y > 0.0
    yc = y if y > _TINY else _TINY
    bits = np.float64(yc).view(np.int64)
    e = np.float64((bits >> 52) - 1023)
    m = np.int64((bits & 0x000FFFFFFFFFFFFF) | 0x3FF0000000000000).view(np.float64)
    high = m > _SQRT2
    m = 0.5 * m if high else m
    e = e + 1.0 if high else e
    near = e == 0.0
    above = x if near else m - 1.0
    below = 2.0 + x if near else m + 1.0
    w = 1.0 / (below * yc)
    t = above * (w * yc)
    z = t * t
    if precise:  # atanh(t)/t = 1 + z·P(z)
        s = 0.07308546618779102
        s = s * z + 0.07665832399653132
        s = s * z + 0.09091445502524885
        s = s * z + 0.11111105553063545
        s = s * z + 0.14285714313086528
        s = s * z + 0.19999999999949503
        s = s * z + 0.3333333333333335
    else:
        s = 0.11665683741883284
        s = s * z + 0.14275390553368322
        s = s * z + 0.20000061138684136
        s = s * z + 0.3333333327689203
    v = beta * (e * _LN2_HI + (e * _LN2_LO + 2.0 * t * (1.0 + z * s)))
    power = _exp(v, precise)
    return (power if positive else 0.0), (w * below if positive else 0.0)


def _whole_power(x: float, n: int) -> tuple[float, float, float]:  # pragma: no cover - numba
    """(y^{n+2}, y^{n+1}, y^n) with y = max(1 + x, 0), the last 0 at y = 0, for a whole 0 ≤ n < 32:
    :func:`_power`'s p, p/y and p/y² for a whole β = n + 2 (α = 1.25: β = 4) by squarings, without a
    division and in about a fifth of its arithmetic."""
    y = 1.0 + x
    y = y if y > 0.0 else 0.0
    r = 1.0
    square = y
    for bit in range(5):  # unrolled by the compiler: the bits of n are the same for every entry
        r = r * square if (n >> bit) & 1 else r
        square = square * square
    r = r if y > 0.0 else 0.0
    return r * y * y, r * y, r


def _at_edge(v: float, shift: float, eps: float) -> bool:  # pragma: no cover - numba
    """Whether y = 1 + v − shift (v = (α−1) u, shift = (α−1) λ) is at rounding level: the entry sits at the
    edge of the support (:func:`.newton.fill_support_edge`'s test)."""
    return abs(1.0 + v - shift) <= 8.0 * eps * (1.0 + abs(v) + abs(shift))


def _edge_repair(
    u: Any, q: Any, k: int, am1: float, beta: float, lam: Any, g: int, eps: float, precise: bool
) -> bool:  # pragma: no cover - numba
    """α > 2 (:func:`.newton.fill_support_edge` for one row): where some of the row's ``k`` candidates
    ``u`` (z − max) sit at the edge of the support, y = 1 + (α−1)(u − λ) at rounding level, λ (``lam[g]``)
    becomes the point where the largest of them vanishes, the other entries' p (``q``) follow from it and
    the edge entries (those found at the solved λ) share what mass is left. Returns whether the row was
    repaired."""
    solved = lam[g] * am1
    top = -np.inf
    count = 0
    for i in range(k):
        v = am1 * u[i]
        if _at_edge(v, solved, eps):
            count += 1
            top = v if v > top else top
    if count == 0:
        return False
    lam[g] = (1.0 + top) / am1
    shift = lam[g] * am1
    total = 0.0
    for i in range(k):
        v = am1 * u[i]
        if _at_edge(v, solved, eps):
            q[i] = -1.0  # an edge entry, filled below
        else:
            q[i] = _power(max(1.0 + v - shift, 0.0) - 1.0, beta, precise)[0]
            total += q[i]
    share = max(1.0 - total, 0.0) / count
    for i in range(k):
        q[i] = share if q[i] == -1.0 else q[i]
    return True


def _collect_candidates(
    z: Any, r: int, u: Any, cols: Any, limit: Any
) -> tuple[float, int, int]:  # pragma: no cover - numba
    """Row ``r``'s maximum m, its candidates z_j − m > ``limit`` in ``u`` (input dtype, padded with −inf to
    whole vectors; room for 16 more entries) and their columns in ``cols`` (as much room), collected by
    vector compresses (:func:`.._jit.compress_above_at`), the rest branch-free; returns (m, their number,
    state: 1 to solve, −1 for a row of only −inf, −2 for a row with a NaN or +inf score)."""
    n = z.shape[1]
    m = _row_max(z, r)
    nan = False
    for j in range(n):  # vectorised
        nan = nan | (z[r, j] != z[r, j])
    if nan or m == np.inf:
        return m, 0, -2
    if m == -np.inf:
        return m, 0, -1
    k = 0
    lanes = 64 // z.itemsize
    j = 0
    while j + lanes <= n:
        k += compress_above_at(z, r * n + j, 0, m, limit, u, k, cols, j)
        j += lanes
    if 0 < j < n:  # the last window ends at the row's end; its lanes before j were seen
        k += compress_above_at(z, r * n + n - lanes, lanes - n + j, m, limit, u, k, cols, n - lanes)
        j = n
    for i in range(j, n):  # rows shorter than a vector: always store, advance past the candidates
        d = z[r, i] - m
        u[k] = d
        cols[k] = i
        k += d > limit
    for i in range(k, (k + 7) // 8 * 8):
        u[i] = -np.inf
    return m, k, 1


def _threshold_step(f_sum: float, g_sum: float, am1: float) -> float:  # pragma: no cover - numba
    """Newton's step on F^{α−1} − 1 from a point where F = ``f_sum`` and −F′ = ``g_sum``
    (:func:`.newton._newton_step`)."""
    grown = math.expm1(am1 * math.log(f_sum))  # F^{α−1} − 1
    return grown / am1 * (f_sum / (1.0 + grown)) / g_sum


def _write_row(
    p: Any, r: int, state: int, q: Any, cols: Any, k: int, scale: float
) -> None:  # pragma: no cover - numba
    """Row ``r`` of ``p``: zeros and ``scale`` · ``q`` at the ``k`` candidates' columns ``cols``; NaN for a
    row of state −2 (a NaN or +inf score), zeros for one of state −1 (only −inf)."""
    fill = np.nan if state == -2 else 0.0
    for j in range(p.shape[1]):
        p[r, j] = fill
    if state >= 0:
        for i in range(k):
            p[r, cols[i]] = q[i] * scale


def _newton_rows(
    z: Any,
    p: Any,
    lam: Any,
    alpha: float,
    tol: float,
    fine: float,
    width_eps: float,
    edge_eps: float,
    max_iter: int,
) -> None:  # pragma: no cover - numba
    """α-entmax (any α > 1) of the rows of ``z`` (R, n) into ``p``, λ into ``lam`` (R,): the iteration of
    :func:`.newton.newton_threshold` on each row's candidates, in float64, while the row is in the cache.

    Each row: its maximum; its candidates z_j − max > −1/(α−1) collected by vector compresses (z − max in the
    input dtype) with their columns; from the left end of the bracket [0, (1 − k^{1−α})/(α−1)] of λ (k
    candidates), evaluations of F = Σ p, p = (1 + (α−1)(z − max − λ))_+^β, β = 1/(α−1), and of −F′ and
    F″/(2 − α) (Σ p^{2−α}, Σ p^{3−2α}), vectorised over the candidates (:func:`_power`, or
    :func:`_whole_power` for a whole β), each followed by the step of :func:`.newton.newton_threshold`
    (Newton's on F^{α−1} − 1), made Halley's where β ≥ 2 (cubic convergence: about one evaluation in four
    fewer; for β < 2, F″ is unbounded at the support's edge), in the same bisection safeguard; for α > 2
    the rules of :func:`.newton.newton_threshold` (every other step bisects while the support counts at
    the bracket's ends differ, F′ being unbounded where an entry enters the support; then Newton's steps
    approach the root from the right: measured at α = 3 on 2·N(0, 1) rows of 77, 3.4× faster than
    bisecting every other step to the end, and closer to a 60-digit solve) and, once solved, a row with
    entries at the edge of the support is repaired (:func:`_edge_repair`); then zeros and the normalised p
    at the candidates' columns (a repaired row's p as repaired). ``edge_eps`` is the rounding of that edge
    test. For large α the edge entries' p is set by rounding (α = 10: y = 1e-16 is p = 0.017): this kernel
    computes y in float64 for every dtype, the tensor kernel in the scores' dtype, and the two may differ
    there (measured on rows of 77: within 1e-6 up to α = 6, 7e-5 at α = 8).

    A row is solved when |F − 1| ≤ ``tol`` after a step from a point where it already was (the polish of
    :func:`.newton.newton_threshold`), or at once when |F − 1| ≤ ``fine`` (normalising then moves each p
    by at most about |F − 1| from its value at the root, to first order), or when its bracket is narrower
    than ``width_eps`` times its initial width. Rows go in groups of ``_GROUP``: the evaluations of the
    group, then its steps (each a chain of a log, an expm1 and divisions), so that the chains overlap. A
    row of only −inf gets p = 0 and λ = −inf, a row with a NaN or +inf score NaN.
    """
    n_rows, n = z.shape
    am1 = alpha - 1.0
    beta = 1.0 / am1
    reach = beta
    halley = beta >= 2.0
    big = alpha > 2.0  # F′ is unbounded where an entry enters the support: bisect, repair the edge
    # float64 scores, or α > 2 (see newton_forward): float64 accuracy; else the faster polynomials
    precise = z.itemsize == 8 or big
    whole = beta == math.floor(beta) and 2.0 <= beta < 34.0
    n2 = int(beta) - 2 if whole else 0
    width = (n + 7) // 8 * 8  # candidates padded with −inf (p = 0) to whole vectors
    u = np.empty((_GROUP, width + 16), z.dtype)  # z − max of the candidates (room for a compress)
    q = np.empty((_GROUP, width), np.float64)  # p at the last evaluation
    cols = np.empty((_GROUP, n + 16), np.int32)
    bound = np.empty(1, z.dtype)  # −reach rounded down to the input dtype: d > bound iff d > −reach
    bound[0] = -reach
    if np.float64(bound[0]) > -reach:
        bound[0] = np.nextafter(bound[0], -np.inf)
    limit = bound[0]
    right = np.empty(n + 1, np.float64)  # the right end of the bracket for k candidates
    for k in range(1, n + 1):
        right[k] = -math.expm1(-am1 * math.log(k)) / am1
    size = np.empty(_GROUP, np.int64)
    top = np.empty(_GROUP, np.float64)
    state = np.empty(_GROUP, np.int64)  # 1: solving, 0: solved, −1: only −inf, −2: NaN or +inf
    lam_g = np.empty(_GROUP, np.float64)
    lo = np.empty(_GROUP, np.float64)
    hi = np.empty(_GROUP, np.float64)
    mass = np.empty(_GROUP, np.float64)  # F = Σ p, and −F′ and F″/(2 − α) (Σ p^{2−α}, Σ p^{3−2α})
    slope = np.empty(_GROUP, np.float64)
    bend = np.empty(_GROUP, np.float64)
    polished = np.empty(_GROUP, np.bool_)
    live = np.empty(_GROUP, np.int64)  # candidates in the support at the last evaluation
    live_lo = np.empty(_GROUP, np.int64)  # ... at the ends of the bracket (−1: not evaluated)
    live_hi = np.empty(_GROUP, np.int64)
    mass_hi = np.empty(_GROUP, np.float64)  # F and −F′ at the right end
    slope_hi = np.empty(_GROUP, np.float64)
    for r0 in range(0, n_rows, _GROUP):
        rows = min(_GROUP, n_rows - r0)
        for g in range(rows):
            top[g], size[g], state[g] = _collect_candidates(z, r0 + g, u[g], cols[g], limit)
            k = size[g]
            lam_g[g] = 0.0
            lo[g] = 0.0
            hi[g] = right[k]
            polished[g] = False
            live_lo[g] = k
            live_hi[g] = -1
        for it in range(max_iter):
            for g in range(rows):
                if state[g] != 1:
                    continue
                shift = lam_g[g] * am1
                f_sum = 0.0
                g_sum = 0.0
                h_sum = 0.0
                if whole:
                    for i in range((size[g] + 7) // 8 * 8):  # vectorised (the sums may be reordered)
                        v, v1, v2 = _whole_power(am1 * u[g, i] - shift, n2)
                        q[g, i] = v
                        f_sum += v
                        g_sum += v1  # Σ p^{2−α} = −F′
                        h_sum += v2  # Σ p^{3−2α}, F″ = (2 − α) Σ p^{3−2α}
                else:
                    for i in range((size[g] + 7) // 8 * 8):
                        v, inv = _power(am1 * u[g, i] - shift, beta, precise)
                        q[g, i] = v
                        f_sum += v
                        g_sum += v * inv
                        h_sum += v * inv * inv
                if big:  # the support's size (p may underflow to 0 inside it)
                    c = 0
                    for i in range(size[g]):
                        c += am1 * u[g, i] - shift > -1.0
                    live[g] = c
                mass[g] = f_sum
                slope[g] = g_sum
                bend[g] = h_sum
            left = 0
            for g in range(rows):  # the steps of the group: independent chains, overlapped
                if state[g] != 1:
                    continue
                f_sum = mass[g]
                g_sum = slope[g]
                error = abs(f_sum - 1.0)
                collapsed = hi[g] - lo[g] <= width_eps * right[size[g]]
                if (error <= tol and (polished[g] or error <= fine)) or collapsed:
                    state[g] = 0
                    continue
                left += 1
                if it == max_iter - 1:
                    continue
                polished[g] = error <= tol
                step = _threshold_step(f_sum, g_sum, am1)
                if halley:
                    c = 0.5 * step * (1.0 - am1) * (bend[g] * f_sum - g_sum * g_sum) / (f_sum * g_sum)
                    step = step / (1.0 - c) if c <= 0.5 else step
                if f_sum >= 1.0:
                    lo[g] = lam_g[g]
                else:
                    hi[g] = lam_g[g]
                new = lam_g[g] + step
                forced = False
                if big:  # the support counts at the bracket's ends, F and −F′ at its right end
                    if f_sum >= 1.0:
                        live_lo[g] = live[g]
                    else:
                        live_hi[g] = live[g]
                        mass_hi[g] = f_sum
                        slope_hi[g] = g_sum
                    if live_lo[g] == live_hi[g]:
                        # no entry enters the support in [lo, hi): F^{α−1} is concave there, and Newton's
                        # steps from the right end approach the root from the right
                        if f_sum >= 1.0:
                            back = hi[g] + _threshold_step(mass_hi[g], slope_hi[g], am1)
                            new = back if not (new < back) or new <= lo[g] else new
                    else:
                        forced = it % 2 == 1
                bad = new < lo[g] or new > hi[g] or not math.isfinite(new) or forced
                lam_g[g] = 0.5 * (lo[g] + hi[g]) if bad else new
            if left == 0:
                break
        for g in range(rows):
            r = r0 + g
            repaired = state[g] >= 0 and big
            repaired = repaired and _edge_repair(u[g], q[g], size[g], am1, beta, lam_g, g, edge_eps, precise)
            # the edge entries of a repaired row carry the rest of the mass: not normalised
            _write_row(p, r, state[g], q[g], cols[g], size[g], 1.0 if repaired else 1.0 / mass[g])
            lam[r] = lam_g[g] + top[g] if state[g] >= 0 else (np.nan if state[g] == -2 else -np.inf)


_NEWTON_ROWS = _jit.Kernel(
    _newton_rows,
    helpers=(
        _exp,
        _power,
        _whole_power,
        _row_max,
        _at_edge,
        _edge_repair,
        _collect_candidates,
        _threshold_step,
        _write_row,
    ),
    reassociate=True,
    intrinsics=(compress_above_at,),
)


def _softmax_rows(z: Any, p: Any, lam: Any, precise: bool) -> None:  # pragma: no cover - numba
    """Softmax of the rows of ``z`` (R, n) into ``p`` and their log-sum-exp into ``lam`` (R,): the maximum
    m, e^{z − m} (z − m in the input dtype, as torch computes it; :func:`_exp`) summed in float64, then
    e^{z − m}/Σ in the input dtype. A row with a NaN gets NaN, as does a row of only −inf (0/0, as
    ``torch.softmax``) and one with +inf."""
    n_rows, n = z.shape
    row = np.empty(n, np.float64)
    for r in range(n_rows):
        m = _row_max(z, r)
        nan = False
        total = 0.0
        for j in range(n):  # vectorised
            v = z[r, j]
            nan = nan | (v != v)
            e = _exp(np.float64(v - m), precise)
            row[j] = e
            total += e
        scale = np.nan if nan else 1.0 / total
        for j in range(n):
            p[r, j] = row[j] * scale
        lam[r] = np.nan if nan else m + math.log(total)


_SOFTMAX_ROWS = _jit.Kernel(_softmax_rows, helpers=(_row_max, _exp), reassociate=True)
# rows shorter than this take the native softmax: torch 2.13's CPU softmax takes a scalar path below 16
# entries (measured, float32, one thread, (16, 4, 64, n): 839 µs at n = 12, 84 µs at n = 16;
# analysis/results/bench_entmax.md, "softmax on short rows")
SHORT_SOFTMAX = 16


def softmax_applies(scores: torch.Tensor, dim: int) -> bool:
    """Whether :func:`softmax` takes ``scores``: rows along ``dim`` shorter than :data:`SHORT_SOFTMAX`, a
    CPU float32/float64 tensor without a gradient to record, native kernels on."""
    return scores.ndim > 0 and scores.shape[dim] < SHORT_SOFTMAX and _jit.accepts(scores)


def softmax(scores: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax of ``scores`` along ``dim`` by :func:`_softmax_rows`, one call. Call only where
    :func:`softmax_applies`."""
    return _along(scores, dim, _softmax_solve, scores.dtype == torch.float64)


def _softmax_solve(z: np.ndarray, p: np.ndarray, lam: np.ndarray, precise: bool) -> None:
    """The softmax kernel (:func:`_softmax_rows`) on the rows of ``z`` (R, n) into ``p`` and ``lam`` (R,)."""
    _split(_SOFTMAX_ROWS.get(), z, p, lam, precise)


# |Σp − 1| within this many eps of the dtype: solved without the polishing step (measured at α = 1.3 on
# float32 32768×77: 3.0 evaluations per row instead of 3.9, max error vs float64 3.5e-8 instead of 3.2e-8;
# 4 eps: 2.95 and 6.0e-8)
_FINE_EPS = 1


def newton_forward(rows: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, λ) of α-entmax, any α > 1, on the rows (R, n) of a CPU float32/float64 tensor, λ in score
    units (R, 1): :func:`_newton_rows` with the tolerances of :func:`.newton.newton_threshold` in the
    tensor's dtype (α ≤ 2) or in float64 (α > 2). Call only where :func:`applies` with ``any_alpha``."""
    z = rows.detach().contiguous()
    probs = torch.empty_like(z)
    lam = z.new_empty((z.shape[0], 1))
    # α > 2: p = y^{1/(α−1)} is steep in λ where y is small (α = 10: y = 1e-7 is p = 0.17), so λ is solved
    # to float64 rounding whatever the dtype (the kernel computes in float64), as is the edge test
    eps = _F64_EPS if alpha > 2.0 else float(torch.finfo(z.dtype).eps)
    args = (alpha, 32 * eps, _FINE_EPS * eps, 4 * eps, _F64_EPS, MAX_NEWTON_ITER)
    _split(_NEWTON_ROWS.get(), z.numpy(), probs.numpy(), lam.numpy()[:, 0], *args)
    return probs, lam


def applies(rows: torch.Tensor, alpha: object, any_alpha: bool = False) -> bool:
    """Whether the native kernels solve ``rows``: CPU float32/float64, α = 1.5 or 2 (any float α > 1 with
    ``any_alpha``: :func:`newton_forward`), not being traced, numba
    importable and native kernels not switched off (:func:`.._jit.disabled`)."""
    return (
        not isinstance(alpha, torch.Tensor)
        and (alpha in ALPHAS or (any_alpha and isinstance(alpha, float) and alpha > 1.0))
        and _jit.accepts(rows, recording=True)
    )


def forward(
    rows: torch.Tensor, alpha: float, max_passes: int = MAX_SUPPORT_ITER
) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, λ) of α = 1.5 or 2 on the rows (R, n) of a CPU float32/float64 tensor, λ in score units (R, 1).

    Call only where :func:`applies`. Rows not settled after ``max_passes`` support passes are solved by
    sorting (0: every row).
    """
    z = rows.detach().contiguous()
    probs = torch.empty_like(z)
    lam = z.new_empty((z.shape[0], 1))
    _solve(z.numpy(), probs.numpy(), lam.numpy()[:, 0], alpha == 1.5, max_passes)
    return probs, lam


def probs(scores: torch.Tensor, alpha: float, dim: int) -> torch.Tensor:
    """α = 1.5 or 2 of ``scores`` along ``dim``, the probabilities alone, in about two tensor ops (the
    attention hot path, where each op's fixed cost adds up). Call only where :func:`applies`."""
    return _along(scores, dim, _solve, alpha == 1.5, MAX_SUPPORT_ITER)


def _along(scores: torch.Tensor, dim: int, solve: Any, *args: Any) -> torch.Tensor:
    """The output of a row solver (``solve(z, p, lam, *args)`` on rows (R, n): :func:`_solve`,
    :func:`_softmax_solve`) on ``scores`` along ``dim``, λ discarded: the rows made the last axis and
    contiguous (no copy where they already are), the output put back."""
    last = dim in (-1, scores.ndim - 1)
    z = (scores if last else scores.movedim(dim, -1)).contiguous()
    if z.requires_grad:
        z = z.detach()
    out = torch.empty_like(z)
    n = z.shape[-1]
    zn, pn = z.numpy().reshape(-1, n), out.numpy().reshape(-1, n)
    solve(zn, pn, np.empty(zn.shape[0], zn.dtype), *args)
    return out if last else out.movedim(-1, dim)


def _solve(z: np.ndarray, p: np.ndarray, lam: np.ndarray, quadratic: bool, max_passes: int) -> None:
    """The kernel of α = 1.5 and 2 (:func:`_rows`) on the rows of ``z`` (R, n) into ``p`` and ``lam`` (R,)."""
    _split(_KERNEL.get(), z, p, lam, quadratic, max_passes)


def _split(kernel: Any, z: np.ndarray, p: np.ndarray, lam: np.ndarray, *args: Any) -> None:
    """``kernel(z, p, lam, *args)`` on the rows of ``z`` (R, n) into ``p`` and ``lam`` (R,); large inputs
    split across threads (:func:`.._jit.in_parts`)."""
    assert kernel is not None, "native kernels called where native.applies is False"
    rows = z.shape[0]
    _jit.in_parts(rows, rows, lambda a, b: kernel(z[a:b], p[a:b], lam[a:b], *args))


@torch.library.custom_op("hopfield_aa::entmax_rows", mutates_args=())
def _entmax_rows_op(rows: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`forward` as one opaque op of a ``torch.compile``'d graph (no graph break, no tracing into
    numba)."""
    return forward(rows, alpha)


@_entmax_rows_op.register_fake
def _(rows: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(rows), rows.new_empty((rows.shape[0], 1))


def in_graph(rows: torch.Tensor, alpha: object) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(p, λ) of the rows (R, n) by the native kernel as a custom op, inside a ``torch.compile``'d graph,
    where it applies (CPU float32/float64, α = 1.5 or 2, native kernels on); None elsewhere."""
    if isinstance(alpha, float) and alpha in ALPHAS and _jit.accepts(rows, recording=True, in_graph=True):
        p, lam = torch.ops.hopfield_aa.entmax_rows(rows, alpha)
        return p, lam
    return None
