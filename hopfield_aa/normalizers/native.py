"""CPU kernels of α-entmax compiled by numba: one call per tensor where the blocked kernel of
:mod:`.blocked` dispatches tens of tensor ops per block of rows (papers/theory.md §1).

α = 1.5 and 2 (:func:`forward`, :func:`probs`): each row is solved while it sits in the cache, in three
steps, with up to ``_GROUP`` rows stepped in turn so that their support passes overlap:

1. the maximum m (eight running maxima), then the candidates z_j − m > −1/(α−1), collected
   branch-free, as u = (α−1)(z − m) in float64 (the threshold never drops below the left end of its
   bracket, so no other entry can be in the support, :func:`.blocked._candidate_reach`); rows of at
   most ``_SHORT_ROW`` entries keep every entry (those at or below −1 never count);
2. the support passes of :mod:`.exact` (α = 1.5: the smaller root of the quadratic on the current
   support; α = 2: the Michelot step) on them, from τ₀ = −1 until the support reproduces itself; every
   iterate stays ≥ −1, so the entries left out never count. A row that has not settled after
   ``MAX_SUPPORT_ITER`` passes is solved by sorting its candidates;
3. one pass writes p = [(z − m)/2 − τ]_+² (α = 1.5) or [z − m − τ]_+ (α = 2) in the input dtype, the
   same rounding as the tensor kernels.

Any other α ≤ 2 (:func:`newton_forward`): the same first step (the candidates kept as z − m in the input
dtype, with their columns), then Newton's method on the threshold from the left end of its bracket
(Halley's where α ≤ 1.5), every evaluation of p = (1 + (α−1)(z − m − λ))^{1/(α−1)} over the candidates
vectorised (its log and exp as polynomials, or squarings for a whole 1/(α−1)), then zeros and p at the
candidates' columns: one call per tensor. α > 2 (:func:`compacted_forward`): the candidates are gathered
natively into groups of rows of similar counts, solved by the tensor Newton kernel (its bisection steps
and support-edge repair) and scattered back.

A row of only −inf gets p = 0 and λ = −inf; a row with a NaN or +inf score (outside the contract of
:func:`.api.entmax_tensor`) has NaN in its output. The kernels compile on their first call per dtype
(:mod:`hopfield_aa._jit`); where numba cannot be imported or native kernels are switched off,
:func:`applies` is False and the tensor kernels run instead. Inside a ``torch.compile``'d graph the
α = 1.5 and 2 kernel is the custom op ``hopfield_aa::entmax_rows`` (:func:`in_graph`).
"""

from __future__ import annotations

import itertools
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from hopfield_aa import _jit
from hopfield_aa.normalizers.exact import MAX_SUPPORT_ITER
from hopfield_aa.normalizers.newton import MAX_NEWTON_ITER

ALPHAS = (1.5, 2.0)
# rows per thread below which a call runs on one thread (measured: splitting smaller inputs costs more
# in hand-offs than it saves)
_MIN_ROWS_PER_THREAD = 2048
_SHORT_ROW = 32  # rows of at most this many entries are solved whole, without collecting candidates
_GROUP = 8  # rows whose support passes are interleaved (:func:`_rows`), fewer for long rows: a group's
_GROUP_ENTRIES = 2048  # entries stay in the cache until its output is written (measured)
_pool: ThreadPoolExecutor | None = None


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
    u = np.empty((_GROUP, n), np.float64)  # the collected entries of each row, (z − max)·scale
    size = np.empty(_GROUP, np.int64)
    top = np.empty(_GROUP, z.dtype)
    tau = np.empty(_GROUP, np.float64)
    count_prev = np.empty(_GROUP, np.float64)
    exact_prev = np.empty(_GROUP, np.bool_)
    active = np.empty(_GROUP, np.bool_)
    taus = np.empty(n, np.float64)
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
                for j in range(n):  # branch-free: always store, advance past the entries kept
                    d = z[r, j] - m
                    u[g, k] = np.float64(d) * scale
                    k += d > -reach
            size[g] = k
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
                for i in range(size[g]):  # branch-free, and vectorised (the sums may be reordered)
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
            if active[g]:  # not settled: the sort algorithm on the candidates (u > −1)
                row_u = u[g, : size[g]]
                srt = np.sort(row_u[row_u > -1.0])[::-1]
                k = srt.shape[0]
                total = 0.0
                total_sq = 0.0
                support = 0
                for i in range(k):
                    total += srt[i]
                    kk = i + 1.0
                    if quadratic:  # τ_i = mean − √((1 − Σu² + Σu · mean)/i) over the i largest
                        total_sq += srt[i] * srt[i]
                        mean = total / kk
                        taus[i] = mean - math.sqrt(max((1.0 - total_sq + total * mean) / kk, 0.0))
                        support += taus[i] <= srt[i]
                    else:
                        taus[i] = (total - 1.0) / kk
                        support += taus[i] < srt[i]
                tau[g] = taus[max(support, 1) - 1]
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


_KERNEL = _jit.Kernel(_rows, helpers=(_row_max,), reassociate=True)


def _collect(z: Any, reach: float, top: Any, count: Any) -> None:  # pragma: no cover - numba
    """Row maxima into ``top`` and the number of candidates z_j − max > −``reach`` into ``count``; a row
    with a NaN or a +inf entry gets count −1 (its output is NaN: NaN in, NaN out)."""
    n = z.shape[1]
    for r in range(z.shape[0]):
        m = _row_max(z, r)  # and any NaN
        nan = False
        for i in range(n):
            nan = nan or z[r, i] != z[r, i]
        top[r] = m
        if nan or m == np.inf:
            count[r] = -1
            continue
        k = 0
        for j in range(z.shape[1]):
            k += z[r, j] - m > -reach
        count[r] = k


def _gather(
    z: Any, top: Any, reach: float, group: Any, slot: Any, offset: Any, width: Any, u: Any, cols: Any
) -> None:  # pragma: no cover - numba
    """One pass over the rows in order: the candidates of row r, shifted by its maximum, into row
    ``slot[r]`` of its group ``group[r]`` (a (rows, width[g]) matrix at ``offset[g]`` in the flat ``u``,
    padded with −inf), their column indices into ``cols`` (padded with 0); rows with group −1 are skipped.
    """
    n = z.shape[1]
    values = np.empty(n, z.dtype)  # one row's candidates, stored branch-free
    columns = np.empty(n, np.int64)
    for r in range(z.shape[0]):
        g = group[r]
        if g < 0:
            continue
        m = top[r]
        k = 0
        for j in range(n):  # always store, advance past the candidates (no mispredicted branch)
            d = z[r, j] - m
            values[k] = d
            columns[k] = j
            k += d > -reach
        start = offset[g] + slot[r] * width[g]
        for i in range(k):
            u[start + i] = values[i]
            cols[start + i] = columns[i]
        for i in range(k, width[g]):
            u[start + i] = -np.inf
            cols[start + i] = 0


def _scatter(
    p_compact: Any, cols: Any, group: Any, slot: Any, offset: Any, width: Any, count: Any, p: Any
) -> None:  # pragma: no cover - numba
    """One pass over the rows in order: row r of ``p`` is zeros and the first ``count[r]`` entries of its
    row of the flat ``p_compact`` (laid out as in :func:`_gather`) at their columns; rows with group −1
    are left as they are."""
    for r in range(p.shape[0]):
        g = group[r]
        if g < 0:
            continue
        p[r, :] = 0.0
        start = offset[g] + slot[r] * width[g]
        for i in range(count[r]):
            p[r, cols[start + i]] = p_compact[start + i]


# ln 2 in two parts (fdlibm's split: k·_LN2_HI is exact for the |k| < 2^11 of a float64 exponent)
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.4426950408889634
_SQRT2 = 1.4142135623730951
_TINY = 2.2250738585072014e-308  # the smallest normal float64


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
    return (q * scale if positive & normal else 0.0), (w * below if positive else 0.0)


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


def _newton_rows(
    z: Any, p: Any, lam: Any, alpha: float, tol: float, fine: float, width_eps: float, max_iter: int
) -> None:  # pragma: no cover - numba
    """α-entmax (1 < α ≤ 2) of the rows of ``z`` (R, n) into ``p``, λ into ``lam`` (R,): the iteration of
    :func:`.newton.newton_threshold` on each row's candidates, in float64, while the row is in the cache.

    Each row: its maximum; its candidates z_j − max > −1/(α−1) collected branch-free (z − max in the
    input dtype) with their columns; from the left end of the bracket [0, (1 − k^{1−α})/(α−1)] of λ (k
    candidates), evaluations of F = Σ p, p = (1 + (α−1)(z − max − λ))_+^β, β = 1/(α−1), and of −F′ and
    F″/(2 − α) (Σ p^{2−α}, Σ p^{3−2α}), vectorised over the candidates (:func:`_power`, or
    :func:`_whole_power` for a whole β), each followed by the step of :func:`.newton.newton_threshold`
    (Newton's on F^{α−1} − 1), made Halley's where β ≥ 2 (cubic convergence: about one evaluation in four
    fewer; for β < 2, F″ is unbounded at the support's edge), in the same bisection safeguard; then zeros
    and the normalised p at the candidates' columns.

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
    precise = z.itemsize == 8  # float64 scores: float64 accuracy; float32: the faster polynomials
    whole = beta == math.floor(beta) and 2.0 <= beta < 34.0
    n2 = int(beta) - 2 if whole else 0
    width = (n + 7) // 8 * 8  # candidates padded with −inf (p = 0) to whole vectors
    u = np.empty((_GROUP, width), z.dtype)  # z − max of the candidates
    q = np.empty((_GROUP, width), np.float64)  # p at the last evaluation
    cols = np.empty((_GROUP, n), np.int32)
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
    for r0 in range(0, n_rows, _GROUP):
        rows = min(_GROUP, n_rows - r0)
        for g in range(rows):
            r = r0 + g
            m = _row_max(z, r)
            nan = False
            for j in range(n):  # vectorised
                nan = nan | (z[r, j] != z[r, j])
            top[g] = m
            size[g] = 0
            if nan or m == np.inf:
                state[g] = -2
                continue
            if m == -np.inf:
                state[g] = -1
                continue
            k = 0
            for j in range(n):  # always store, advance past the candidates (no mispredicted branch)
                d = z[r, j] - m
                u[g, k] = d
                cols[g, k] = j
                k += d > -reach
            for i in range(k, (k + 7) // 8 * 8):
                u[g, i] = -np.inf
            size[g] = k
            state[g] = 1
            lam_g[g] = 0.0
            lo[g] = 0.0
            hi[g] = right[k]
            polished[g] = False
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
                grown = math.expm1(am1 * math.log(f_sum))  # F^{α−1} − 1
                step = grown / am1 * (f_sum / (1.0 + grown)) / g_sum
                if halley:
                    c = 0.5 * step * (1.0 - am1) * (bend[g] * f_sum - g_sum * g_sum) / (f_sum * g_sum)
                    step = step / (1.0 - c) if c <= 0.5 else step
                if f_sum >= 1.0:
                    lo[g] = max(lo[g], lam_g[g])
                else:
                    hi[g] = min(hi[g], lam_g[g])
                new = lam_g[g] + step
                bad = new < lo[g] or new > hi[g] or not math.isfinite(new)
                lam_g[g] = 0.5 * (lo[g] + hi[g]) if bad else new
            if left == 0:
                break
        for g in range(rows):
            r = r0 + g
            for j in range(n):
                p[r, j] = 0.0
            if state[g] == -2:
                for j in range(n):
                    p[r, j] = np.nan
                lam[r] = np.nan
                continue
            if state[g] == -1:
                lam[r] = -np.inf
                continue
            scale = 1.0 / mass[g]
            for i in range(size[g]):
                p[r, cols[g, i]] = q[g, i] * scale
            lam[r] = lam_g[g] + top[g]


_NEWTON_ROWS = _jit.Kernel(_newton_rows, helpers=(_power, _whole_power, _row_max), reassociate=True)
# |Σp − 1| within this many eps of the dtype: solved without the polishing step (measured at α = 1.3 on
# float32 32768×77: 3.0 evaluations per row instead of 3.9, max error vs float64 3.5e-8 instead of 3.2e-8;
# 4 eps: 2.95 and 6.0e-8)
_FINE_EPS = 1


_COLLECT = _jit.Kernel(_collect, helpers=(_row_max,))
_GATHER = _jit.Kernel(_gather)
_SCATTER = _jit.Kernel(_scatter)
# rows of similar candidate counts are solved together, in groups split at these quantiles of the counts
# (each group is padded to its widest row; a group costs a fixed number of tensor ops per Newton step)
_GROUP_QUANTILES = (0.6, 0.95)
_GROUPED_MIN_ROWS = 8192  # fewer rows: one group (the fixed cost of a group outweighs its padding)


def compacted_forward(rows: torch.Tensor, alpha: float, solve: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, λ) of α-entmax on the rows (R, n) of a CPU float32/float64 tensor, λ in score units (R, 1), by
    ``solve`` (the compacted-row solver of :mod:`.blocked`: ``solve(u, alpha) -> (p, λ − max)``) on the
    candidates z_j > max z − 1/(α−1) of each row only: the path of α > 2 (:func:`newton_forward` solves
    α ≤ 2 in one kernel).

    The candidates are gathered and scattered back by native kernels (one pass over the scores each),
    in a few groups of rows of similar candidate counts, so that padding every row to the widest one
    does not multiply the solver's work.
    """
    collect, gather, scatter = _COLLECT.get(), _GATHER.get(), _SCATTER.get()
    assert collect is not None and gather is not None and scatter is not None
    z = rows.detach().contiguous()
    zn = z.numpy()
    n_rows = zn.shape[0]
    reach = 1.0 / (alpha - 1.0)
    top = np.empty(n_rows, zn.dtype)
    count = np.empty(n_rows, np.int64)
    collect(zn, reach, top, count)
    probs = torch.empty_like(z)
    lam = torch.empty((n_rows, 1), dtype=z.dtype)
    pn, ln = probs.numpy(), lam.numpy()[:, 0]
    live = count > 0  # a row of only −inf has no candidate: p = 0, λ = −inf
    if not live.all():
        pn[~live] = 0.0
        ln[~live] = -math.inf
        pn[count < 0] = math.nan  # a NaN or +inf score: NaN out
        ln[count < 0] = math.nan
        if not live.any():
            return probs, lam
    quantiles = _GROUP_QUANTILES if n_rows >= _GROUPED_MIN_ROWS else ()
    bounds = np.array(sorted({int(np.quantile(count[live], q)) for q in quantiles} | {int(count.max())}))
    group = np.where(live, np.searchsorted(bounds, count), -1)  # the narrowest group that holds the row
    slot = np.zeros(n_rows, np.int64)  # the row's index within its group
    members = [np.flatnonzero(group == g) for g in range(bounds.size)]
    sizes = np.array([m.size for m in members], np.int64)
    for rows_g in members:
        slot[rows_g] = np.arange(rows_g.size)
    width = bounds.astype(np.int64)
    offset = np.concatenate([[0], np.cumsum(sizes * width)[:-1]]).astype(np.int64)
    u = np.empty(int((sizes * width).sum()), zn.dtype)
    cols = np.empty(u.size, np.int64)
    gather(zn, top, reach, group, slot, offset, width, u, cols)
    p_flat = np.empty_like(u)
    for g, rows_g in enumerate(members):
        if rows_g.size == 0:
            continue
        part = slice(int(offset[g]), int(offset[g] + sizes[g] * width[g]))
        u_g = torch.from_numpy(u[part].reshape(rows_g.size, int(width[g])))
        p_c, lam_c = solve(u_g, alpha)
        p_flat[part] = p_c.numpy().reshape(-1)
        ln[rows_g] = lam_c.numpy()[:, 0] + top[rows_g]
    scatter(p_flat, cols, group, slot, offset, width, count, pn)
    return probs, lam


def newton_forward(rows: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, λ) of α-entmax, 1 < α ≤ 2, on the rows (R, n) of a CPU float32/float64 tensor, λ in score
    units (R, 1): :func:`_newton_rows` with the tolerances of :func:`.newton.newton_threshold` in the
    tensor's dtype. Call only where :func:`applies` with ``any_alpha``."""
    z = rows.detach().contiguous()
    probs = torch.empty_like(z)
    lam = z.new_empty((z.shape[0], 1))
    eps = float(torch.finfo(z.dtype).eps)
    args = (alpha, 32 * eps, _FINE_EPS * eps, 4 * eps, MAX_NEWTON_ITER)
    _split(_NEWTON_ROWS.get(), z.numpy(), probs.numpy(), lam.numpy()[:, 0], *args)
    return probs, lam


def applies(rows: torch.Tensor, alpha: object, any_alpha: bool = False) -> bool:
    """Whether the native kernels solve ``rows``: CPU float32/float64, α = 1.5 or 2 (any float α > 1 with
    ``any_alpha``: :func:`newton_forward` up to 2, :func:`compacted_forward` above), not being traced, numba
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
    last = dim in (-1, scores.ndim - 1)
    z = (scores if last else scores.movedim(dim, -1)).contiguous()
    if z.requires_grad:
        z = z.detach()
    out = torch.empty_like(z)
    n = z.shape[-1]
    zn, pn = z.numpy().reshape(-1, n), out.numpy().reshape(-1, n)
    _solve(zn, pn, np.empty(zn.shape[0], zn.dtype), alpha == 1.5, MAX_SUPPORT_ITER)
    return out if last else out.movedim(-1, dim)


def _solve(z: np.ndarray, p: np.ndarray, lam: np.ndarray, quadratic: bool, max_passes: int) -> None:
    """The kernel of α = 1.5 and 2 (:func:`_rows`) on the rows of ``z`` (R, n) into ``p`` and ``lam`` (R,)."""
    _split(_KERNEL.get(), z, p, lam, quadratic, max_passes)


def _split(kernel: Any, z: np.ndarray, p: np.ndarray, lam: np.ndarray, *args: Any) -> None:
    """``kernel(z, p, lam, *args)`` on the rows of ``z`` (R, n) into ``p`` and ``lam`` (R,); large inputs
    split across ``torch.get_num_threads()`` threads (the kernels release the GIL)."""
    assert kernel is not None, "native kernels called where native.applies is False"
    threads = min(torch.get_num_threads(), z.shape[0] // _MIN_ROWS_PER_THREAD)
    if threads <= 1:
        kernel(z, p, lam, *args)
        return
    bounds = np.linspace(0, z.shape[0], threads + 1).astype(int)

    def run(part: tuple[int, int]) -> None:
        a, b = part
        kernel(z[a:b], p[a:b], lam[a:b], *args)

    list(_thread_pool().map(run, [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]))


def _thread_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(thread_name_prefix="hopfield_aa-entmax")
    return _pool


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
