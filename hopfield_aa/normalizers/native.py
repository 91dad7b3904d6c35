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

Any other α (:func:`compacted_forward`): the candidates are gathered natively into groups of rows of
similar counts, solved by Newton's method (for α ≤ 2 with its per-row arithmetic native,
:func:`newton_compact`) and scattered back.

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
            # the row maximum as eight independent running maxima, so that the compares pipeline
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
            m = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
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


_KERNEL = _jit.Kernel(_rows, reassociate=True)


def _collect(z: Any, reach: float, top: Any, count: Any) -> None:  # pragma: no cover - numba
    """Row maxima into ``top`` and the number of candidates z_j − max > −``reach`` into ``count``; a row
    with a NaN or a +inf entry gets count −1 (its output is NaN: NaN in, NaN out)."""
    n = z.shape[1]
    for r in range(z.shape[0]):
        # the row maximum as four independent running maxima (the compares pipeline), and any NaN
        m0 = m1 = m2 = m3 = z[r, 0]
        nan = False
        j = 0
        while j + 4 <= n:
            m0 = z[r, j] if z[r, j] > m0 else m0
            m1 = z[r, j + 1] if z[r, j + 1] > m1 else m1
            m2 = z[r, j + 2] if z[r, j + 2] > m2 else m2
            m3 = z[r, j + 3] if z[r, j + 3] > m3 else m3
            j += 4
        for i in range(j, n):
            m0 = z[r, i] if z[r, i] > m0 else m0
        for i in range(n):
            nan = nan or z[r, i] != z[r, i]
        m = max(max(m0, m1), max(m2, m3))
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


def _newton_shift(u: Any, lam: Any, am1: float, done: Any, x: Any) -> None:  # pragma: no cover - numba
    """x = max(u − (α−1) λ, −1) on the rows not done (u = (α−1)(z − max z)): the argument of log1p in
    :func:`.newton._mass`."""
    for r in range(u.shape[0]):
        if done[r]:
            continue
        shift = lam[r] * am1
        for i in range(u.shape[1]):
            v = u[r, i] - shift
            x[r, i] = v if v > -1.0 else -1.0


def _newton_step(
    p: Any,
    x: Any,
    am1: float,
    offset: float,
    tol: float,
    width_tol: Any,
    final: bool,
    lam: Any,
    lo: Any,
    hi: Any,
    polished: Any,
    done: Any,
) -> int:  # pragma: no cover - numba
    """The rest of one Newton iteration of :func:`.newton.newton_threshold`, row by row, on the rows not
    done: p ← max(p − offset, 0) (``p`` holds exp of the clamped exponent), F = Σ p, G = Σ p/(1 + x) over
    the support, the tests and the safeguarded step (none after the ``final`` evaluation); returns how
    many rows are not done. Rows already done only have their p cleaned (their x is unchanged)."""
    left = 0
    for r in range(p.shape[0]):
        f_sum = 0.0
        g_sum = 0.0
        for i in range(p.shape[1]):
            v = p[r, i] - offset
            v = v if v > 0.0 else 0.0
            p[r, i] = v
            f_sum += v
            y = 1.0 + x[r, i]
            g_sum += v / y if y > 0.0 else 0.0
        if done[r]:
            continue
        converged = abs(f_sum - 1.0) <= tol
        if (converged and polished[r]) or hi[r] - lo[r] <= width_tol[r]:
            done[r] = True
            continue
        left += 1
        if final:
            continue
        polished[r] = converged
        log_f = math.log(f_sum)
        step = math.expm1(am1 * log_f) / am1 * math.exp((1.0 - am1) * log_f) / g_sum
        if f_sum >= 1.0:
            lo[r] = max(lo[r], lam[r])
        else:
            hi[r] = min(hi[r], lam[r])
        new = lam[r] + step
        bad = new < lo[r] or new > hi[r] or not math.isfinite(new)
        lam[r] = 0.5 * (lo[r] + hi[r]) if bad else new
    return left


_NEWTON_SHIFT = _jit.Kernel(_newton_shift, reassociate=True)
_NEWTON_STEP = _jit.Kernel(_newton_step, reassociate=True)


def newton_compact(u: torch.Tensor, alpha: float, max_iter: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """α-entmax (1 < α ≤ 2) of compacted candidate rows ``u`` (score units, max 0, padding −inf): the
    iteration of :func:`.newton.newton_threshold` with its per-row arithmetic in two native kernels and
    only the transcendental functions as tensor ops (log1p and exp, vectorised); (p normalised, λ relative
    to the row maximum). None where the kernels are off."""
    shift_kernel, step_kernel = _NEWTON_SHIFT.get(), _NEWTON_STEP.get()
    if shift_kernel is None or step_kernel is None or not 1.0 < alpha <= 2.0:
        return None
    dtype = u.dtype
    am1 = alpha - 1.0
    rows, width = u.shape
    un = (u * am1).numpy()
    lam = np.zeros(rows)
    lo = np.zeros(rows)
    hi = np.full(rows, -math.expm1(-am1 * math.log(width)) / am1)
    width_tol = 4 * float(torch.finfo(dtype).eps) * hi
    polished = np.zeros(rows, np.bool_)
    done = np.zeros(rows, np.bool_)
    x = torch.empty_like(u)
    q = torch.empty_like(u)
    p = torch.empty_like(u)
    xn, pn = x.numpy(), p.numpy()
    floor = math.log(torch.finfo(dtype).tiny) + 0.5
    offset = 2.0 * math.exp(floor)
    tol = 32 * float(torch.finfo(dtype).eps)
    for it in range(max_iter):
        shift_kernel(un, lam, am1, done, xn)
        torch.mul(torch.log1p(x, out=q), 1.0 / am1, out=p).clamp_(min=floor).exp_()
        final = it == max_iter - 1
        if step_kernel(pn, xn, am1, offset, tol, width_tol, final, lam, lo, hi, polished, done) == 0:
            break
    p.div_(p.sum(-1, keepdim=True))
    return p, torch.from_numpy(lam).to(dtype).unsqueeze(-1)


_COLLECT = _jit.Kernel(_collect)
_GATHER = _jit.Kernel(_gather)
_SCATTER = _jit.Kernel(_scatter)
# rows of similar candidate counts are solved together, in groups split at these quantiles of the counts
# (each group is padded to its widest row; a group costs a fixed number of tensor ops per Newton step)
_GROUP_QUANTILES = (0.6, 0.95)
_GROUPED_MIN_ROWS = 8192  # fewer rows: one group (the fixed cost of a group outweighs its padding)


def compacted_forward(rows: torch.Tensor, alpha: float, solve: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, λ) of α-entmax on the rows (R, n) of a CPU float32/float64 tensor, λ in score units (R, 1), by
    ``solve`` (the compacted-row solver of :mod:`.blocked`: ``solve(u, alpha) -> (p, λ − max)``) on the
    candidates z_j > max z − 1/(α−1) of each row only.

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
        p_c, lam_c = newton_compact(u_g, alpha, MAX_NEWTON_ITER) or solve(u_g, alpha)
        p_flat[part] = p_c.numpy().reshape(-1)
        ln[rows_g] = lam_c.numpy()[:, 0] + top[rows_g]
    scatter(p_flat, cols, group, slot, offset, width, count, pn)
    return probs, lam


def applies(rows: torch.Tensor, alpha: object, any_alpha: bool = False) -> bool:
    """Whether the native kernels solve ``rows``: CPU float32/float64, α = 1.5 or 2 (any float α > 1 with
    ``any_alpha``: :func:`compacted_forward`), not being traced, numba importable and native kernels not
    switched off (:func:`.._jit.disabled`)."""
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
    """The kernel on the rows of ``z`` (R, n) into ``p`` and ``lam`` (R,); large inputs split across
    ``torch.get_num_threads()`` threads (the kernel releases the GIL)."""
    kernel = _KERNEL.get()
    assert kernel is not None, "native kernels called where native.applies is False"
    threads = min(torch.get_num_threads(), z.shape[0] // _MIN_ROWS_PER_THREAD)
    if threads <= 1:
        kernel(z, p, lam, quadratic, max_passes)
        return
    bounds = np.linspace(0, z.shape[0], threads + 1).astype(int)

    def run(part: tuple[int, int]) -> None:
        a, b = part
        kernel(z[a:b], p[a:b], lam[a:b], quadratic, max_passes)

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
