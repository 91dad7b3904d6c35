"""CPU row kernels of 1.5-entmax and sparsemax compiled by numba: one call per tensor where the blocked
kernel of :mod:`.blocked` dispatches tens of tensor ops per block of rows (papers/theory.md §1).

Each row is solved while it sits in the cache, in three steps:

1. one pass finds the maximum m and collects every entry z_j with z_j > m_j − 1/(α−1), m_j the running
   maximum: a superset of the candidates (the threshold never drops below the left end of its
   bracket, so no other entry can be in the support, :func:`.blocked._candidate_reach`);
2. the support passes of :mod:`.exact` (α = 1.5: the smaller root of the quadratic on the current
   support; α = 2: the Michelot step) run on the collected entries only, in float64, from τ₀ = −1 until
   the support reproduces itself; every iterate stays ≥ −1, so the entries left out never count. A row
   that has not settled after ``MAX_SUPPORT_ITER`` passes is solved by sorting its collected entries;
3. one pass writes p = [(z − m)/2 − τ]_+² (α = 1.5) or [z − m − τ]_+ (α = 2) in the input dtype, the
   same rounding as the tensor kernels.

A row of only −inf gets p = 0 and λ = −inf. The inputs must be free of NaN and +inf (the contract of
:func:`.api.entmax_tensor`). numba is imported on first use, and the kernels compile on their first
call per dtype (about a second, cached on disk by numba across processes); where numba cannot be
imported, :func:`applies` is False and the tensor kernels run instead.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from hopfield_aa.normalizers.exact import MAX_SUPPORT_ITER

ALPHAS = (1.5, 2.0)
DTYPES = (torch.float32, torch.float64)
# rows per thread below which a call runs on one thread (measured: splitting smaller inputs costs more
# in hand-offs than it saves)
_MIN_ROWS_PER_THREAD = 2048
_ENV_DISABLE = "HOPFIELD_AA_NATIVE"  # "0" turns the kernels off (the tensor kernels run everywhere)

_kernel: Callable[..., None] | None = None
_import_failed = False
_enabled = os.environ.get(_ENV_DISABLE, "1").strip() != "0"
_pool: ThreadPoolExecutor | None = None


def _rows(z: Any, p: Any, lam: Any, quadratic: bool, max_passes: int) -> None:  # pragma: no cover - numba
    """1.5-entmax (``quadratic``) or sparsemax of the rows of ``z`` (R, n) into ``p``, λ into ``lam`` (R,);
    rows not settled after ``max_passes`` support passes are solved by sorting."""
    n_rows, n = z.shape
    reach = 2.0 if quadratic else 1.0
    scale = 0.5 if quadratic else 1.0
    typed = np.empty(2, z.dtype)  # constants in the input dtype (a float literal is float64)
    typed[0] = scale
    typed[1] = 0.0
    zero = typed[1]
    collected = np.empty(n, z.dtype)
    u = np.empty(n, np.float64)
    for r in range(n_rows):
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
        k = 0
        for j in range(n):  # branch-free: always store, advance past the entries kept
            v = z[r, j]
            collected[k] = v
            k += v - m > -reach
        if m == -np.inf:
            for j in range(n):
                p[r, j] = zero
            lam[r] = -np.inf
            continue
        for i in range(k):
            u[i] = np.float64(collected[i] - m) * scale
        tau = -1.0
        count_prev = -1.0
        exact_prev = False
        settled = False
        for _ in range(max_passes):
            s1 = 0.0
            s2 = 0.0
            count = 0.0
            for i in range(k):  # branch-free: the support is not predictable entry by entry
                d = max(u[i] - tau, 0.0)
                s1 += d
                s2 += d * d
                count += d > 0.0
            if count == count_prev and (exact_prev or not quadratic):
                settled = True
                break
            if quadratic:
                excess = s2 - 1.0
                disc = s1 * s1 - count * excess
                if disc >= 0.0:
                    tau = tau + excess / (s1 + math.sqrt(disc))
                    exact_prev = True
                else:
                    norm = math.sqrt(s2)
                    tau = tau + norm * (norm - 1.0) / s1
                    exact_prev = False
            else:
                tau = tau + (s1 - 1.0) / count
            count_prev = count
        if not settled:
            srt = np.sort(u[:k])[::-1]
            total = 0.0
            total_sq = 0.0
            for i in range(k):
                total += srt[i]
                total_sq += srt[i] * srt[i]
                kk = i + 1.0
                if quadratic:
                    mean = total / kk
                    delta = (1.0 - kk * (total_sq / kk - mean * mean)) / kk
                    cand = mean - math.sqrt(max(delta, 0.0))
                else:
                    cand = (total - 1.0) / kk
                if i == 0 or cand < srt[i] or (quadratic and cand == srt[i]):
                    tau = cand
        typed[1] = tau
        t = typed[1]
        typed[1] = 0.0
        half = typed[0]
        if quadratic:
            for j in range(n):
                d = (z[r, j] - m) * half - t
                d = max(d, zero)
                p[r, j] = d * d
            lam[r] = 2.0 * (tau + 1.0) + m
        else:
            for j in range(n):
                p[r, j] = max(z[r, j] - m - t, zero)
            lam[r] = tau + 1.0 + m


def _compiled() -> Callable[..., None] | None:
    """The numba-compiled :func:`_rows` (compiled lazily per dtype), or None where numba is missing."""
    global _kernel, _import_failed
    if _kernel is None and not _import_failed:
        try:
            import numba
        except ImportError:
            _import_failed = True
            return None
        # no fast-math: −inf entries must keep their IEEE meaning
        _kernel = numba.njit(cache=True, nogil=True, error_model="numpy")(_rows)
    return _kernel


def applies(rows: torch.Tensor, alpha: object) -> bool:
    """Whether the native kernels solve ``rows``: CPU float32/float64, α = 1.5 or 2, not being traced,
    numba importable and the kernels not turned off (:func:`disabled`, ``HOPFIELD_AA_NATIVE=0``)."""
    return (
        _enabled
        and not isinstance(alpha, torch.Tensor)
        and alpha in ALPHAS
        and rows.device.type == "cpu"
        and rows.dtype in DTYPES
        and rows.numel() > 0
        and not torch.compiler.is_compiling()
        and _compiled() is not None
    )


def forward(
    rows: torch.Tensor, alpha: float, max_passes: int = MAX_SUPPORT_ITER
) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, λ) of α = 1.5 or 2 on the rows (R, n) of a CPU float32/float64 tensor, λ in score units (R, 1).

    Call only where :func:`applies`. Rows not settled after ``max_passes`` support passes are solved by
    sorting (0: every row). Large inputs are split across ``torch.get_num_threads()`` threads (the
    kernel releases the GIL).
    """
    kernel = _compiled()
    assert kernel is not None, "native.forward called where native.applies is False"
    z = rows.detach().contiguous()
    probs = torch.empty_like(z)
    lam = z.new_empty(z.shape[0])
    quadratic = alpha == 1.5
    zn, pn, ln = z.numpy(), probs.numpy(), lam.numpy()
    threads = min(torch.get_num_threads(), z.shape[0] // _MIN_ROWS_PER_THREAD)
    if threads <= 1:
        kernel(zn, pn, ln, quadratic, max_passes)
    else:
        bounds = np.linspace(0, z.shape[0], threads + 1).astype(int)
        parts = [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]

        def run(part: tuple[int, int]) -> None:
            a, b = part
            kernel(zn[a:b], pn[a:b], ln[a:b], quadratic, max_passes)

        list(_thread_pool().map(run, parts))
    return probs, lam.unsqueeze(-1)


def _thread_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(thread_name_prefix="hopfield_aa-entmax")
    return _pool


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Turn the native kernels off inside the block (the tensor kernels then run on CPU too): for
    comparisons and tests of the tensor kernels."""
    global _enabled
    previous = _enabled
    _enabled = False
    try:
        yield
    finally:
        _enabled = previous
