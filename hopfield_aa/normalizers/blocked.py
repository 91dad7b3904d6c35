"""The forward of α-entmax on blocks of rows: candidate compaction, the dispatch to the exact (α = 1.5, 2),
Newton and compiled kernels, and α per row (papers/theory.md §1).

The threshold never drops below the left end of its bracket, so only the candidates
z_i > max z − 1/(α−1) can be in the support; they are compacted into a (rows, K) matrix (K = the largest
candidate count, a second group for rare wide rows) and the solvers run on it (general α always;
α = 1.5 and 2 for rows of ≥ ``_COMPACT_MIN_N`` entries, where it pays off).
"""

from __future__ import annotations

import math

import torch

from hopfield_aa.normalizers import compiled, exact, native
from hopfield_aa.normalizers.newton import Alpha, newton_entmax

HALF = (torch.float16, torch.bfloat16)
# Rows are processed in blocks of about this many entries (α = 1.5 and 2; general α: the smaller
# size, whose Newton passes run until the slowest row of the block has converged). Measured.
_BLOCK_ELEMENTS = 1 << 20
_BLOCK_ELEMENTS_GENERAL = 1 << 19
_SPLIT = 4  # a second, wider candidate group when some row has 4× the typical count
_COMPACT_MIN_N = 512  # α = 1.5 and 2 compact rows of at least this length (general α: always)
# 1.5-entmax and sparsemax by sorting cost a fixed ~15-22 dispatches where the support passes of the
# blocked kernel cost hundreds, but more arithmetic per entry: the sort kernels are the faster ones on
# tensors of up to about this many entries when rows are at most 16 long, and on proportionally fewer
# (∝ 1/√n) for longer rows n (measured, one CPU thread: equal times at 32k entries for n = 16 and at
# about 16k for n = 77; the blocked kernel 3.7× and 8× faster at 262k entries)
_SORT_MAX_ENTRIES = 1 << 15


def _sort_is_faster(numel: int, n: int) -> bool:
    """Whether the sort kernels beat the blocked one on ``numel`` entries in rows of ``n``."""
    return 0 < numel <= _SORT_MAX_ENTRIES * min(1.0, (16 / max(n, 1)) ** 0.5)


# Rows sharing one of at most this many distinct α values are solved by the float-α kernels (exact
# 1.5 and 2, compaction); more distinct values go to the batched Newton kernel with α per row.
_MAX_ALPHA_GROUPS = 16


def _candidate_reach(alpha: Alpha) -> Alpha:
    """How far below the row maximum a score can lie and still be in the support.

    The threshold never drops below the left end of its bracket, τ ≥ (α−1) max z − 1 (λ ≥ max z in
    score units), so p_i > 0 needs z_i > max z − 1/(α−1) (1 for sparsemax, 2 for 1.5-entmax).
    """
    return 1.0 / (alpha - 1.0)


def _solve_compact(
    u: torch.Tensor, alpha: Alpha, scratch: torch.Tensor | None = None, scaled: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """α-entmax of the compacted candidate rows ``u`` (shifted scores, max 0, padding −inf).

    Returns (p of the same shape, λ relative to the row maximum). A tensor ``alpha`` (rows, 1) is one
    α > 1 per row (the Newton kernel). ``scratch`` is flat float scratch of at least the size of ``u``
    (α = 1.5 and 2; allocated if None); ``scaled``: ``u`` is already (α−1)(z − max z).
    """
    if not isinstance(alpha, torch.Tensor) and alpha in (1.5, 2.0):
        # u = (α−1)(z − max z), then p = [u − τ]_+^{1/(α−1)}
        quadratic = alpha == 1.5
        if quadratic and not scaled:
            u = u.mul_(0.5)
        if scratch is None or scratch.numel() < u.numel():
            scratch = u.new_empty(u.numel())
        view = scratch[: u.numel()].view(u.shape)
        tau = exact.threshold(u, quadratic, view)
        return exact.probs_from_threshold(u, tau, quadratic)
    big = bool((alpha > 2.0).any()) if isinstance(alpha, torch.Tensor) else alpha > 2.0
    if big and u.dtype != torch.float64:
        # for α > 2 the map p = [·]_+^{1/(α−1)} amplifies the rounding of entries near the threshold (a
        # root of F that float32 cannot resolve), so it is computed in float64
        a64 = alpha.double() if isinstance(alpha, torch.Tensor) else alpha
        p64, lam64 = _solve_compact(u.double(), a64)
        return p64.to(u.dtype), lam64.to(u.dtype)
    p = torch.empty_like(u)
    return p, newton_entmax(u, alpha, p)


def _forward_block(
    zb: torch.Tensor, alpha: Alpha, pb: torch.Tensor, buf: torch.Tensor, scratch: torch.Tensor
) -> torch.Tensor:
    """α-entmax of the contiguous rows ``zb`` into ``pb``; returns λ (score units, keepdim).

    Only the candidates z_i > max z − 1/(α−1) can be in the support (:func:`_candidate_reach`); in
    attention rows they are a small share of the entries, so the threshold solvers run on a compacted
    (rows, K) matrix of the candidates (padded with −inf) instead of the full rows, and the result is
    scattered back. Rows with many more candidates than typical form a second, wider group so that a
    few flat rows do not widen the whole block. ``pb`` must be zero-filled, except for short rows
    (fewer than ``_COMPACT_MIN_N`` entries) at α = 1.5 and 2, which are solved in place in it. ``buf``
    is float scratch of the shape of ``zb``, ``scratch`` flat float scratch of its size (the
    exact solvers' buffers).
    """
    n_rows, n = zb.shape
    top = zb.amax(-1, keepdim=True)
    dead = top == -math.inf
    any_dead = bool(dead.any())
    if any_dead:
        top = top.masked_fill(dead, 0.0)
    if n < _COMPACT_MIN_N and not isinstance(alpha, torch.Tensor) and alpha in (1.5, 2.0):
        # short rows: the compaction costs more than it saves (measured), solve on the full rows;
        # u = (α−1)(z − max z) in one pass (α − 1 = 1/2 scales exactly, so this is (z − max z)/2)
        if alpha == 1.5:
            u = torch.add(top.mul(-0.5), zb, alpha=0.5, out=pb)
        else:
            u = torch.sub(zb, top, out=pb)
        p, lam = _solve_compact(u, alpha, scratch, scaled=True)
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
        p, lam = _solve_compact(u, a_g, scratch)
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


def _forward_blocks(rows: torch.Tensor, alpha: Alpha, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, λ) of the contiguous rows (R, N) by :func:`_forward_block` on blocks of about ``size`` entries.

    A tensor ``alpha`` is one α per row, shape (R, 1).
    """
    n_rows, n = rows.shape
    exact_alpha = not isinstance(alpha, torch.Tensor) and alpha in (1.5, 2.0)
    # short rows at α = 1.5 and 2 are solved in place in their block of ``probs`` (every entry written);
    # the compacted path scatters the support into zeros
    probs = torch.empty_like(rows) if exact_alpha and n < _COMPACT_MIN_N else torch.zeros_like(rows)
    lam = torch.empty_like(rows[:, :1])
    block = max(1, size // max(n, 1))
    block = min(block, n_rows)
    # the candidate buffer serves the compacted path only (short rows at α = 1.5 and 2 solve in place)
    compact = not exact_alpha or n >= _COMPACT_MIN_N
    buf = torch.empty_like(rows[:block]) if compact else rows.new_empty((0, n))
    scratch = rows.new_empty(block * n if exact_alpha else 0)
    for start in range(0, n_rows, block):
        stop = min(start + block, n_rows)
        a = alpha[start:stop] if isinstance(alpha, torch.Tensor) else alpha
        lam[start:stop] = _forward_block(rows[start:stop], a, probs[start:stop], buf[: stop - start], scratch)
    return probs, lam


def forward(
    scores: torch.Tensor, alpha: float, dim: int, eager: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """α-entmax of ``scores`` along ``dim`` (α > 1) and its threshold λ in score units (keepdim).

    ``p_i = [1 + (α−1)(z_i − λ)]_+^{1/(α−1)}``. Rows of all −inf give p = 0 and λ = −inf.
    Half precision is computed in float32; the result has the dtype of ``scores``. The compiled
    backend (:func:`.compiled.set_backend`) is used where it applies unless ``eager``; the rows it
    leaves unsettled are solved here by the eager kernel.
    """
    in_dtype = scores.dtype
    z = scores.float() if in_dtype in HALF else scores
    z = z.movedim(dim, -1)
    shape = z.shape
    n = shape[-1]
    rows = z.reshape(-1, n).contiguous()
    fused = None if eager or not compiled.applies(rows, alpha) else compiled.forward(rows, alpha)
    if fused is None and native.applies(rows, alpha):
        probs, lam = native.forward(rows, alpha)
    elif fused is not None:
        probs, lam, settled = fused
        redo = (~settled).nonzero().squeeze(-1)
        if redo.numel() > 0:
            probs[redo], lam[redo] = forward(rows.index_select(0, redo), alpha, -1, eager=True)
    elif rows.numel() > 0:
        small = _forward_small(rows, alpha, shape)
        if small is not None:
            probs, lam = small
        elif native.applies(rows, alpha, any_alpha=True):
            probs, lam = native.newton_forward(rows, alpha)
        else:
            size = _BLOCK_ELEMENTS if alpha in (1.5, 2.0) else _BLOCK_ELEMENTS_GENERAL
            probs, lam = _forward_blocks(rows, alpha, size)
    else:
        probs, lam = torch.zeros_like(rows), torch.empty_like(rows[:, :1])
    probs = probs.reshape(shape).movedim(-1, dim)
    lam = lam.reshape((*shape[:-1], 1)).movedim(-1, dim)
    if in_dtype in HALF:
        probs = probs.to(in_dtype)
    return probs, lam


def probs(scores: torch.Tensor, alpha: float, dim: int) -> torch.Tensor:
    """α-entmax of ``scores`` along ``dim`` (α > 1), the probabilities alone: :func:`forward`'s, except
    that small float32/float64 tensors at α = 1.5 and 2 (:func:`_sort_is_faster`, eager, no compiled
    backend selected) take the probabilities-only sort kernels
    (:func:`.exact.entmax15_sort_probs`, :func:`.exact.sparsemax_sort_probs`), which skip λ and the row
    reshapes (about 22 and 14 dispatches instead of about 50 and 100: at attention's short text rows
    the dispatches, not the arithmetic, set the time)."""
    if native.applies(scores, alpha) and not compiled.applies(scores, alpha):
        return native.probs(scores, alpha, dim)  # also the compiled backend's kernel on CPU
    if (
        alpha in _SORT_KERNELS
        and scores.dtype in (torch.float32, torch.float64)
        and _sort_is_faster(scores.numel(), scores.shape[dim])
        and compiled.get_backend() != "compiled"
        and not torch.compiler.is_compiling()
    ):
        kernel = _SORT_KERNELS[alpha]
        if dim in (-1, scores.ndim - 1):
            return kernel(scores)
        return kernel(scores.movedim(dim, -1)).movedim(-1, dim)
    return forward(scores, alpha, dim)[0]


_SORT_KERNELS = {1.5: exact.entmax15_sort_probs, 2.0: exact.sparsemax_sort_probs}


def _forward_small(
    rows: torch.Tensor, alpha: float, shape: torch.Size | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(p, λ) by the sort kernel where it is the faster one (α = 1.5 and 2, :func:`_sort_is_faster`), or
    under ``torch.compile`` by the native kernel as a custom op on CPU (:func:`.native.in_graph`) and by
    :func:`_in_graph` elsewhere (α = 1.5 and 2, any size; ``shape``: the rows' shape before flattening,
    (…, n)); None elsewhere."""
    kernel = _SORT_ROWS_KERNELS.get(alpha)
    if kernel is None:
        return None
    if torch.compiler.is_compiling():
        native_rows = native.in_graph(rows, alpha)
        if native_rows is not None:
            return native_rows
        return _in_graph(rows, alpha, rows.shape if shape is None else shape)
    if _sort_is_faster(rows.numel(), rows.shape[-1]):
        return kernel(rows)
    return None


# Support passes α-entmax runs inside a compiled graph before its certificate (measured on attention
# scores: with 5, the sort fallback of the whole call is rare; each pass costs one read of the scores)
_GRAPH_SUPPORT_PASSES = 5


def _in_graph(rows: torch.Tensor, alpha: float, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, λ) of α = 1.5 or 2 of rows (R, n) inside a ``torch.compile``'d graph, with no graph break: a
    fixed number of certified support passes (:func:`.exact.certified_passes`, fused by the compiler into
    a few loops), and, only when some row is not certified (an all −inf row, or one whose support needs
    more passes), the sort kernel on every row instead (``torch.cond``: the branch not taken is not run).
    Exact to the certificate's tolerance (8 eps) either way.

    The branches take their operands in the scores' own shape ``shape`` (…, n), not flattened: with
    symbolic sizes, inductor (torch 2.13) generates a branch only when each size symbol is the size of
    some operand dimension (R = 4·s0·s1 alone leaves s0 and s1 unbound).
    """
    quadratic = alpha == 1.5
    p, lam, certified = exact.certified_passes(rows, quadratic, _GRAPH_SUPPORT_PASSES, compiled.MASS_TOL_EPS)
    ranks = exact._ranks(rows.shape[-1], rows.dtype, rows.device, inverse=quadratic)
    sort_rows = _SORT_ROWS_KERNELS[alpha]
    Pair = tuple[torch.Tensor, torch.Tensor]

    def passes(z: torch.Tensor, p: torch.Tensor, lam: torch.Tensor, ranks: torch.Tensor) -> Pair:
        return p.clone(), lam.clone()

    def by_sorting(z: torch.Tensor, p: torch.Tensor, lam: torch.Tensor, ranks: torch.Tensor) -> Pair:
        return sort_rows(z, ranks)

    lam_shape = (*shape[:-1], 1)
    operands = (rows.view(shape), p.view(shape), lam.view(lam_shape), ranks)
    p_out, lam_out = torch.cond(certified.all(), passes, by_sorting, operands)
    return p_out.reshape(rows.shape), lam_out.reshape(-1, 1)


_SORT_ROWS_KERNELS = {1.5: exact.entmax15_sort_rows, 2.0: exact.sparsemax_sort_rows}


def softmax_rows(z: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax, logsumexp) of ``z`` along ``dim``: α-entmax at α = 1 and its λ (keepdim)."""
    lse = torch.logsumexp(z, dim, keepdim=True)
    return torch.exp(z - lse), lse


def forward_alpha(scores: torch.Tensor, alpha: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, λ) of α-entmax with α per row: ``alpha`` has the shape of ``scores`` with ``dim`` of size 1.

    Computed in the compute dtype (float32 for half precision; returned so). λ is in score units
    (logsumexp for rows with α = 1). Few distinct α values: each group of rows by the float-α
    kernel (exact 1.5 and 2); many: the blocked kernel with α per row (Newton).
    """
    z = scores.float() if scores.dtype in HALF else scores
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
            p_sel, lam_sel = softmax_rows(sub) if value == 1.0 else forward(sub, value, -1)
            probs.index_copy_(0, sel, p_sel)  # index_copy_: a row scatter far cheaper than index_put_
            lam.index_copy_(0, sel, lam_sel)
    else:
        soft = (a_rows == 1.0).squeeze(-1)
        if bool(soft.any()):
            probs[soft], lam[soft] = softmax_rows(rows[soft])
        rest = (~soft).nonzero().squeeze(-1)
        if rest.numel() == rows.shape[0]:
            # no softmax row: the blocked kernel's result is the whole result (a scatter into a fresh
            # tensor would cost as much as a Newton pass)
            probs, lam = _forward_blocks(rows.contiguous(), a_rows.contiguous(), _BLOCK_ELEMENTS_GENERAL)
        elif rest.numel() > 0:
            sub, a_sub = rows.index_select(0, rest), a_rows.index_select(0, rest)
            p_rest, lam_rest = _forward_blocks(sub, a_sub, _BLOCK_ELEMENTS_GENERAL)
            probs.index_copy_(0, rest, p_rest)
            lam.index_copy_(0, rest, lam_rest)
    probs = probs.reshape(shape).movedim(-1, dim)
    lam = lam.reshape((*shape[:-1], 1)).movedim(-1, dim)
    return probs, lam
