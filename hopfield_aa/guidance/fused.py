r"""Guided attention in one native call: the dense (softmax) and the sparse (α = 1.5 or 2 entmax)
retrieval from one score matrix that is never stored, and the rule of them.

For each (batch, head) the kernel :func:`_fused_rows` holds :math:`\beta K^\top` and ``V`` padded to
whole vectors of 16 entries, then takes the queries four at a time: their scores
:math:`z = \beta K q` (one vector multiply-add per head dimension and 16 keys), the softmax numerators
:math:`e^{z - m}` and :math:`u = (\alpha - 1)(z - m)`, the entmax threshold by the support passes of
:mod:`hopfield_aa.normalizers.native` (α = 1.5: the smaller root of the quadratic on the current support;
α = 2: the Michelot step; a row not settled after ``MAX_SUPPORT_ITER`` passes is solved by sorting), and
both retrievals :math:`D = \mathrm{softmax}(z) V`, :math:`S = \mathrm{entmax}_\alpha(z) V`. Then either
both are written to two output-sized tensors (:func:`retrievals`), or the kernel applies the rule, GAG
(any ζ, η and reference) or extrapolation, and writes its output in the stock attention's memory layout
(:func:`guided`). Scores, probabilities and thresholds live in buffers of a few rows, so a call
allocates no score-sized buffer and dispatches one kernel where the tensor path runs about eight ops
(measured in ``analysis/bench_guidance_overhead.py``). Vector arithmetic is stated through
:mod:`hopfield_aa._simd`.

The numbers are the tensor path's up to float32 rounding: the scores are summed in another order, the
exponential is a polynomial (relative error about 1e-7), and the support passes sum in float32 (their
thresholds in float64); ``tests/test_fused.py`` bounds the difference against float64 and against the
rules' tensor forms.

Both return None where the kernel does not apply (see :func:`applies`); a call whose scores hold a NaN or
an infinity is handed back to the tensor path as well, which has their semantics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from hopfield_aa import _jit
from hopfield_aa._simd import (
    vadd,
    vcount,
    vexp,
    vfma,
    vload,
    vmax,
    vmul,
    vpos,
    vsplat,
    vstore,
    vsub,
    vsum,
    vtop,
)
from hopfield_aa.guidance.rules import _ZERO_FACTOR, RowRule
from hopfield_aa.normalizers import MAX_SUPPORT_ITER, sorted_threshold

ALPHAS = (1.5, 2.0)
"""The sparse rungs the kernel solves: ``alphas`` must be ``(1.0, a)`` with ``a`` one of these."""
_GROUP = 4  # queries whose scores and retrievals are computed together (four independent vector chains)


def _fused_rows(
    q: Any,
    k: Any,
    v: Any,
    dense: Any,
    sparse: Any,
    result: Any,
    scale: float,
    quadratic: bool,
    max_passes: int,
    rule: int,
    lam: float,
    zeta: float,
    eta: float,
    dense_reference: bool,
    zero_factor: float,
    first: int,
    last: int,
) -> int:  # pragma: no cover - compiled by numba
    """Dense and sparse retrievals of the (batch, head) blocks ``first`` to ``last`` (flat index
    ``b · heads + h``) of ``q`` (B, H, L, d), ``k`` and ``v`` (B, H, n, d) (any strides): into the
    C-contiguous ``dense`` and ``sparse`` (B, H, L, d) where ``rule`` is 0, else the rule of them
    (:data:`ROW_RULES`; :func:`_rule_group`) into the C-contiguous ``result`` (B, L, H, d), the stock
    attention's layout. Returns how many query rows had a score that is NaN or infinite (their outputs
    are then unspecified: the caller recomputes the call)."""
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
                for c in range(16, n_pad, 16):  # summed: a NaN carries on (a maximum would drop it)
                    check = vadd(vmul(vload(z, base + c), zero), check)
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
            for g in range(rows):
                tau[g] = -1.0
                count_prev[g] = -1
                exact_prev[g] = False
                active[g] = True
            for _ in range(max_passes):  # the support passes, the group's rows in turn
                left = 0
                for g in range(rows):
                    if not active[g]:
                        continue
                    t = tau[g]
                    threshold = vsplat(t)
                    f1 = np.float32(0.0)
                    f2 = np.float32(0.0)
                    count = 0
                    for c in range(0, n_pad, 16):
                        d = vpos(vsub(vload(u, g * n_pad + c), threshold))
                        f1 += vsum(d)
                        f2 += vsum(vmul(d, d))
                        count += vcount(d)
                    if count == count_prev[g] and (exact_prev[g] or not quadratic):
                        active[g] = False
                        continue
                    left += 1
                    tau[g], exact_prev[g] = _threshold_step(
                        t, np.float64(f1), np.float64(f2), count, quadratic
                    )
                    count_prev[g] = count
                if left == 0:
                    break
            for g in range(rows):
                if active[g]:  # not settled: the sort algorithm on the entries above −1
                    tau[g] = sorted_threshold(u[g * n_pad : g * n_pad + n], quadratic)
                threshold = vsplat(tau[g])
                for c in range(0, n_pad, 16):
                    d = vpos(vsub(vload(u, g * n_pad + c), threshold))
                    vstore(u, g * n_pad + c, vmul(d, d) if quadratic else d)
            for c in range(0, d_pad, 16):
                d0 = d1 = d2 = d3 = s0 = s1 = s2 = s3 = zero
                for j in range(n):
                    value = vload(values, j * d_pad + c)
                    d0 = vfma(vsplat(z[j]), value, d0)
                    d1 = vfma(vsplat(z[n_pad + j]), value, d1)
                    d2 = vfma(vsplat(z[2 * n_pad + j]), value, d2)
                    d3 = vfma(vsplat(z[3 * n_pad + j]), value, d3)
                    s0 = vfma(vsplat(u[j]), value, s0)
                    s1 = vfma(vsplat(u[n_pad + j]), value, s1)
                    s2 = vfma(vsplat(u[2 * n_pad + j]), value, s2)
                    s3 = vfma(vsplat(u[3 * n_pad + j]), value, s3)
                vstore(out, c, vmul(d0, vsplat(np.float32(1.0) / total[0])))
                vstore(out, d_pad + c, vmul(d1, vsplat(np.float32(1.0) / total[1])))
                vstore(out, 2 * d_pad + c, vmul(d2, vsplat(np.float32(1.0) / total[2])))
                vstore(out, 3 * d_pad + c, vmul(d3, vsplat(np.float32(1.0) / total[3])))
                vstore(out, 4 * d_pad + c, s0)
                vstore(out, 5 * d_pad + c, s1)
                vstore(out, 6 * d_pad + c, s2)
                vstore(out, 7 * d_pad + c, s3)
            if rule == 0:
                for g in range(rows):
                    for c in range(dim):
                        dense[b, h, l0 + g, c] = out[g * d_pad + c]
                        sparse[b, h, l0 + g, c] = out[(_GROUP + g) * d_pad + c]
            else:
                _rule_group(out, rows, d_pad, rule, lam, zeta, eta, dense_reference, zero_factor)
                for g in range(rows):
                    for c in range(dim):
                        result[b, l0 + g, h, c] = out[g * d_pad + c]
    return bad


def _threshold_step(
    t: float, s1: float, s2: float, count: int, quadratic: bool
) -> tuple[float, bool]:  # pragma: no cover - compiled by numba
    """One support pass's new threshold from τ = ``t`` and the sums over the support of d = u − τ > 0
    (Σd = ``s1``, Σd² = ``s2``, ``count`` entries), and whether it is the exact root on that support:
    α = 1.5, the smaller root of the quadratic (where its discriminant is ≥ 0, else a Newton step on
    ‖d‖ = 1); α = 2, the Michelot step."""
    if not quadratic:
        return t + (s1 - 1.0) / count, False
    excess = s2 - 1.0
    disc = s1 * s1 - count * excess
    if disc >= 0.0:
        return t + excess / (s1 + math.sqrt(disc)), True
    norm = math.sqrt(s2)
    return t + norm * (norm - 1.0) / s1, False


def _rule_group(
    out: Any,
    rows: int,
    d_pad: int,
    rule: int,
    lam: float,
    zeta: float,
    eta: float,
    dense_reference: bool,
    zero_factor: float,
) -> None:  # pragma: no cover - compiled by numba
    """The rule of a group's retrievals in ``out`` (dense rows, then sparse rows, each ``d_pad`` long with
    zeros past d), written over the dense rows.

    GAG (``rule`` 1, :func:`.rules.gag_rule`): with r = S − D and the reference u = S (D where
    ``dense_reference``), r∥ = c u, c = ⟨r, u⟩/‖u‖² (0 where ‖u‖ ≤ zero_factor · |r|_∞), capped to norm
    η, and G = S + λ (cap_η(r∥) + ζ (r − r∥)) = S + λζ r + λ(c' − ζc) u, c' the capped coefficient.
    Extrapolation (``rule`` 2): P = D + λ (S − D)."""
    zero = vsplat(0.0)
    for g in range(rows):
        at = g * d_pad
        other = (_GROUP + g) * d_pad
        if rule == 1:
            ref_at = at if dense_reference else other
            along = np.float32(0.0)
            norm_sq = np.float32(0.0)
            top = zero
            for c in range(0, d_pad, 16):
                r = vsub(vload(out, other + c), vload(out, at + c))
                u = vload(out, ref_at + c)
                along += vsum(vmul(r, u))
                norm_sq += vsum(vmul(u, u))
                top = vmax(vmax(r, vsub(zero, r)), top)
            floor = vtop(top) * zero_factor
            coefficient = along / norm_sq if not norm_sq <= floor * floor else 0.0
            capped = coefficient
            length = abs(coefficient) * math.sqrt(norm_sq)
            if length > eta:
                capped = coefficient * (eta / length)
            step = vsplat(lam * zeta)
            along_u = vsplat(lam * (capped - zeta * coefficient))
            for c in range(0, d_pad, 16):
                s = vload(out, other + c)
                u = vload(out, ref_at + c)
                vstore(out, at + c, vfma(along_u, u, vfma(step, vsub(s, vload(out, at + c)), s)))
        else:
            for c in range(0, d_pad, 16):
                d = vload(out, at + c)
                vstore(out, at + c, vfma(vsplat(lam), vsub(vload(out, other + c), d), d))
    return None


_KERNEL = _jit.Kernel(
    _fused_rows,
    helpers=(sorted_threshold, _threshold_step, _rule_group),
    reassociate=True,
    intrinsics=(vload, vstore, vsplat, vadd, vsub, vmul, vfma, vpos, vmax, vsum, vtop, vcount, vexp),
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
    both = query.new_empty((2, *query.shape[:3], value.shape[-1]))
    outputs = both.numpy()
    if _run(query, key, value, alphas, scale, outputs[0], outputs[1], _NO_OUTPUT, *_NO_RULE):
        return None
    return [both[0], both[1]]


def guided(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    alphas: Sequence[float | torch.Tensor],
    scale: float,
    mask: torch.Tensor | None,
    rule: RowRule,
) -> torch.Tensor | None:
    """The rule ``rule`` (:class:`.rules.RowRule`: GAG with any ζ, η and reference S or D, or
    extrapolation) of the two retrievals, computed in the same native call as they are (no retrieval is
    stored), or None as for :func:`retrievals`.

    Returns
    -------
    tensor of shape (batch, heads, queries, d), laid out in memory as (batch, queries, heads, d), as
    ``F.scaled_dot_product_attention``'s output on CPU (the processor's merge of the heads is a view).
    """
    if not applies(query, key, value, alphas, mask):
        return None
    batch, heads, queries, _ = query.shape
    result = query.new_empty((batch, queries, heads, value.shape[-1]))
    outputs = (_NO_OUTPUT, _NO_OUTPUT, result.numpy())
    parameters = (ROW_RULES[rule.name], rule.scale, rule.zeta, rule.eta, rule.dense_reference, _ZERO)
    if _run(query, key, value, alphas, scale, *outputs, *parameters):
        return None
    return result.transpose(1, 2)


ROW_RULES = {"gag": 1, "extrapolate": 2}
"""The rules :func:`guided` computes inside the kernel (:func:`_rule_group`): GAG with any options
(:func:`.rules.gag_rule`) and PLADIS-style extrapolation (:func:`.rules.extrapolate_rule`)."""
_ZERO = _ZERO_FACTOR * float(torch.finfo(torch.float32).eps)  # a reference this small has no parallel part
_NO_OUTPUT = np.empty((0, 0, 0, 0), np.float32)  # the outputs a call does not write
_NO_RULE = (0, 0.0, 0.0, math.inf, False, 0.0)  # the kernel's rule arguments where it writes the retrievals


def _run(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    alphas: Sequence[float | torch.Tensor],
    scale: float,
    dense: np.ndarray,
    sparse: np.ndarray,
    result: np.ndarray,
    *rule: Any,
) -> int:
    """:func:`_fused_rows` on the call, its (batch, head) blocks split across threads
    (:func:`.._jit.in_parts`, counting query rows); returns its count of rows with a non-finite score."""
    kernel = _KERNEL.get()
    assert kernel is not None
    arrays = (query.numpy(), key.numpy(), value.numpy(), dense, sparse, result)
    quadratic = bool(alphas[1] == 1.5)
    args = (*arrays, float(scale), quadratic, MAX_SUPPORT_ITER, *rule)
    blocks = query.shape[0] * query.shape[1]
    return sum(_jit.in_parts(blocks, blocks * query.shape[2], lambda a, b: int(kernel(*args, a, b))))
