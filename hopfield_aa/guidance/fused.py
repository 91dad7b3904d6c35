r"""Both retrievals of guided attention in one native call: the dense (softmax) and the sparse (α = 1.5 or
2 entmax) retrieval from one score matrix that is never stored.

For each (batch, head) the kernel :func:`_fused_rows` holds :math:`\beta K^\top` and ``V`` padded to
whole vectors of 16 entries, then takes the queries four at a time: their scores
:math:`z = \beta K q` (one vector multiply-add per head dimension and 16 keys), the softmax numerators
:math:`e^{z - m}` and :math:`u = (\alpha - 1)(z - m)`, the entmax threshold by the support passes of
:mod:`hopfield_aa.normalizers.native` (α = 1.5: the smaller root of the quadratic on the current support;
α = 2: the Michelot step; a row not settled after ``MAX_SUPPORT_ITER`` passes is solved by sorting), and
both retrievals :math:`D = \mathrm{softmax}(z) V`, :math:`S = \mathrm{entmax}_\alpha(z) V`, written to two
output-sized tensors. Scores, probabilities and thresholds live in buffers of a few rows, so a call
allocates no score-sized buffer and dispatches one kernel where the tensor path runs about eight ops
(measured in ``analysis/bench_guidance_overhead.py``). Vector arithmetic is stated through
:mod:`hopfield_aa._simd`.

The numbers are the tensor path's up to float32 rounding: the scores are summed in another order, the
exponential is a polynomial (relative error about 1e-7), and the support passes sum in float32 (their
thresholds in float64); ``tests/test_fused.py`` bounds the difference against float64.

:func:`retrievals` returns None where the kernel does not apply (see :func:`applies`); a call whose scores
hold a NaN or an infinity is handed back to the tensor path as well, which has their semantics.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from hopfield_aa import _jit
from hopfield_aa._simd import vcount, vexp, vfma, vload, vmax, vmul, vpos, vsplat, vstore, vsub, vsum, vtop
from hopfield_aa.normalizers import MAX_SUPPORT_ITER

ALPHAS = (1.5, 2.0)
"""The sparse rungs the kernel solves: ``alphas`` must be ``(1.0, a)`` with ``a`` one of these."""
_GROUP = 4  # queries whose scores and retrievals are computed together (four independent vector chains)
_MIN_ROWS_PER_THREAD = 2048  # as the entmax kernels (normalizers.native)


def _fused_rows(
    q: Any,
    k: Any,
    v: Any,
    dense: Any,
    sparse: Any,
    scale: float,
    quadratic: bool,
    max_passes: int,
    first: int,
    last: int,
) -> int:  # pragma: no cover - compiled by numba
    """Dense and sparse retrievals of the (batch, head) blocks ``first`` to ``last`` (flat index
    ``b · heads + h``) of ``q`` (B, H, L, d), ``k`` and ``v`` (B, H, n, d) (any strides) into the
    C-contiguous ``dense`` and ``sparse`` (B, H, L, d). Returns how many query rows had a score that is
    NaN or infinite (their outputs are then unspecified: the caller recomputes the call)."""
    heads, queries, dim = q.shape[1], q.shape[2], q.shape[3]
    n = k.shape[2]
    n_pad = (n + 15) // 16 * 16
    d_pad = (dim + 15) // 16 * 16
    keys = np.zeros(dim * n_pad, np.float32)  # β Kᵀ, column j = key j, padded with zero keys
    values = np.zeros(n_pad * d_pad, np.float32)  # V, rows padded to whole vectors
    z = np.empty(_GROUP * n_pad, np.float32)  # a group's scores, then their softmax numerators
    u = np.empty(_GROUP * n_pad, np.float32)  # (α − 1)(z − m), then the entmax probabilities
    out = np.empty(2 * _GROUP * d_pad, np.float32)  # a group's retrievals, dense then sparse
    total = np.empty(_GROUP, np.float32)
    tau = np.empty(_GROUP, np.float64)
    count_prev = np.empty(_GROUP, np.int64)
    exact_prev = np.empty(_GROUP, np.bool_)
    active = np.empty(_GROUP, np.bool_)
    zero = vsplat(0.0)
    step = vsplat(0.5 if quadratic else 1.0)
    bad = 0
    for block in range(first, last):
        b, h = divmod(block, heads)
        for j in range(n):
            for c in range(dim):
                keys[c * n_pad + j] = k[b, h, j, c] * scale
                values[j * d_pad + c] = v[b, h, j, c]
        for l0 in range(0, queries, _GROUP):
            rows = min(_GROUP, queries - l0)
            # the last group repeats its last query in the lanes past ``rows`` (computed, not written)
            l1, l2, l3 = min(l0 + 1, queries - 1), min(l0 + 2, queries - 1), min(l0 + 3, queries - 1)
            for c in range(0, n_pad, 16):
                a0 = a1 = a2 = a3 = zero
                for e in range(dim):
                    key = vload(keys, e * n_pad + c)
                    a0 = vfma(vsplat(q[b, h, l0, e]), key, a0)
                    a1 = vfma(vsplat(q[b, h, l1, e]), key, a1)
                    a2 = vfma(vsplat(q[b, h, l2, e]), key, a2)
                    a3 = vfma(vsplat(q[b, h, l3, e]), key, a3)
                vstore(z, c, a0)
                vstore(z, n_pad + c, a1)
                vstore(z, 2 * n_pad + c, a2)
                vstore(z, 3 * n_pad + c, a3)
            for g in range(_GROUP):
                base = g * n_pad
                check = vmul(vload(z, base), zero)  # 0, or NaN where a score is NaN or infinite
                for c in range(16, n_pad, 16):
                    check = vmax(vmul(vload(z, base + c), zero), check)
                if g < rows and vsum(check) != 0.0:
                    bad += 1
                for j in range(n, n_pad):
                    z[base + j] = -np.inf
                top = vload(z, base)
                for c in range(16, n_pad, 16):
                    top = vmax(vload(z, base + c), top)
                m = vsplat(vtop(top))
                s = np.float32(0.0)
                for c in range(0, n_pad, 16):
                    shifted = vsub(vload(z, base + c), m)
                    vstore(u, base + c, vmul(shifted, step))
                    numerator = vexp(shifted)
                    vstore(z, base + c, numerator)
                    s += vsum(numerator)
                total[g] = s
                tau[g] = -1.0
                count_prev[g] = -1
                exact_prev[g] = False
                active[g] = g < rows
            for _ in range(max_passes):  # the support passes, the group's rows in turn
                left = 0
                for g in range(rows):
                    if not active[g]:
                        continue
                    t = tau[g]
                    threshold = vsplat(t)
                    s1 = np.float32(0.0)
                    s2 = np.float32(0.0)
                    count = 0
                    for c in range(0, n_pad, 16):
                        d = vpos(vsub(vload(u, g * n_pad + c), threshold))
                        s1 += vsum(d)
                        s2 += vsum(vmul(d, d))
                        count += vcount(d)
                    if count == count_prev[g] and (exact_prev[g] or not quadratic):
                        active[g] = False
                        continue
                    left += 1
                    f1 = np.float64(s1)
                    f2 = np.float64(s2)
                    if quadratic:
                        excess = f2 - 1.0
                        disc = f1 * f1 - count * excess
                        exact_prev[g] = disc >= 0.0
                        if disc >= 0.0:
                            tau[g] = t + excess / (f1 + math.sqrt(disc))
                        else:
                            norm = math.sqrt(f2)
                            tau[g] = t + norm * (norm - 1.0) / f1
                    else:
                        tau[g] = t + (f1 - 1.0) / count
                    count_prev[g] = count
                if left == 0:
                    break
            for g in range(rows):
                if active[g]:  # not settled: the sort algorithm on the entries above −1
                    tau[g] = _sorted_threshold(u[g * n_pad : g * n_pad + n], quadratic)
                threshold = vsplat(tau[g])
                for c in range(0, n_pad, 16):
                    d = vpos(vsub(vload(u, g * n_pad + c), threshold))
                    vstore(u, g * n_pad + c, vmul(d, d) if quadratic else d)
            for c in range(0, d_pad, 16):
                d0 = d1 = d2 = d3 = s0 = s1v = s2v = s3 = zero
                for j in range(n):
                    value = vload(values, j * d_pad + c)
                    d0 = vfma(vsplat(z[j]), value, d0)
                    d1 = vfma(vsplat(z[n_pad + j]), value, d1)
                    d2 = vfma(vsplat(z[2 * n_pad + j]), value, d2)
                    d3 = vfma(vsplat(z[3 * n_pad + j]), value, d3)
                    s0 = vfma(vsplat(u[j]), value, s0)
                    s1v = vfma(vsplat(u[n_pad + j]), value, s1v)
                    s2v = vfma(vsplat(u[2 * n_pad + j]), value, s2v)
                    s3 = vfma(vsplat(u[3 * n_pad + j]), value, s3)
                vstore(out, c, vmul(d0, vsplat(np.float32(1.0) / total[0])))
                vstore(out, d_pad + c, vmul(d1, vsplat(np.float32(1.0) / total[1])))
                vstore(out, 2 * d_pad + c, vmul(d2, vsplat(np.float32(1.0) / total[2])))
                vstore(out, 3 * d_pad + c, vmul(d3, vsplat(np.float32(1.0) / total[3])))
                vstore(out, 4 * d_pad + c, s0)
                vstore(out, 5 * d_pad + c, s1v)
                vstore(out, 6 * d_pad + c, s2v)
                vstore(out, 7 * d_pad + c, s3)
            for g in range(rows):
                for c in range(dim):
                    dense[b, h, l0 + g, c] = out[g * d_pad + c]
                    sparse[b, h, l0 + g, c] = out[(_GROUP + g) * d_pad + c]
    return bad


def _sorted_threshold(u: Any, quadratic: bool) -> float:  # pragma: no cover - compiled by numba
    """The threshold τ of one row's ``u`` = (α − 1)(z − max z) by sorting (as ``normalizers.native``'s
    fallback): over the i largest entries, α = 1.5: τ_i = mean − √((1 − Σu² + Σu · mean)/i); α = 2:
    τ_i = (Σu − 1)/i; the support is the count of i with τ_i below the i-th entry."""
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


_KERNEL = _jit.Kernel(
    _fused_rows,
    helpers=(_sorted_threshold,),
    reassociate=True,
    intrinsics=(vload, vstore, vsplat, vsub, vmul, vfma, vpos, vmax, vsum, vtop, vcount, vexp),
)


def applies(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    alphas: Sequence[float | torch.Tensor],
    mask: torch.Tensor | None,
) -> bool:
    """Whether :func:`retrievals` takes the call: float32 CPU tensors of one (batch, heads) without a
    gradient to record, the ladder ``(1, a)`` with ``a`` in :data:`ALPHAS` (a float, not a per-head
    tensor), no mask, at least one key, and native kernels on (not under ``torch.compile``)."""
    sparse_alpha = alphas[1] if len(alphas) == 2 else None
    return (
        mask is None
        and isinstance(sparse_alpha, float)
        and sparse_alpha in ALPHAS
        and not isinstance(alphas[0], torch.Tensor)
        and alphas[0] == 1.0
        and query.dtype == torch.float32
        and query.ndim == key.ndim == value.ndim == 4
        and key.shape[2] > 0
        and _jit.accepts(query, key, value)
    )


def retrievals(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    alphas: Sequence[float | torch.Tensor],
    scale: float,
    mask: torch.Tensor | None = None,
) -> list[torch.Tensor] | None:
    r"""``[softmax(Z) V, entmax_α(Z) V]`` with :math:`Z = \beta Q K^\top`, from one native call, or None
    where the kernel does not apply (:func:`applies`) or a score is NaN or infinite (the caller's tensor
    path then computes the call, with its semantics for them).

    Parameters
    ----------
    query : tensor, shape (batch, heads, queries, d)
    key, value : tensors, shape (batch, heads, keys, d)
        Any strides (a processor's views of its projections are read in place).
    alphas : sequence
        ``(1.0, α)``, α = 1.5 or 2.
    scale : float
        β.
    mask : None
        A mask sends the call to the tensor path.

    Returns
    -------
    two tensors of shape (batch, heads, queries, d), C-contiguous, or None.
    """
    if not applies(query, key, value, alphas, mask):
        return None
    kernel = _KERNEL.get()
    assert kernel is not None
    batch, heads, queries, _ = query.shape
    dense = query.new_empty((batch, heads, queries, value.shape[-1]))
    sparse = torch.empty_like(dense)
    quadratic = bool(alphas[1] == 1.5)
    arrays = (query.numpy(), key.numpy(), value.numpy(), dense.numpy(), sparse.numpy())
    args: tuple[Any, ...] = (*arrays, float(scale), quadratic, MAX_SUPPORT_ITER)
    blocks = batch * heads
    threads = min(torch.get_num_threads(), blocks, blocks * queries // _MIN_ROWS_PER_THREAD)
    if threads <= 1:
        bad = kernel(*args, 0, blocks)
    else:
        bounds = np.linspace(0, blocks, threads + 1).astype(int)
        parts = [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]
        bad = sum(_jit.thread_pool().map(lambda part: kernel(*args, *part), parts))
    return None if bad else [dense, sparse]
