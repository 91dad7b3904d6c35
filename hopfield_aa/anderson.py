"""Anderson acceleration AA(m) of fixed-point maps (papers/theory.md §5, §12): the batched, safeguarded solver
:func:`anderson` (a loop over :class:`AndersonSolver`'s init/step/terminate), the result type it shares
with :func:`hopfield_aa.hopfield.iterate`, the single mixing step :func:`anderson_step`, and
:func:`spectral_radius`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypedDict, Union, overload

import numpy as np
import torch
from tqdm.auto import tqdm

from hopfield_aa import _jit
from hopfield_aa._arrays import ArrayLike, Kind, as_tensor, check_scalar, restore, result_kind

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "AndersonConfig",
    "AndersonResult",
    "AndersonSolver",
    "AndersonState",
    "FixedPointResult",
    "anderson",
    "anderson_step",
    "spectral_radius",
]

MapFn = Callable[[Any], Any]
_Iterates = Union[Sequence[ArrayLike], ArrayLike]  # m + 1 states: a sequence, or stacked on dim 0


@dataclass(frozen=True)
class AndersonConfig:
    """Settings of :func:`anderson`, for code that passes a solver configuration around.

    The field names are the keyword arguments of :func:`anderson`, so
    ``anderson(g, x0, **dataclasses.asdict(config))`` runs the solver with them.

    Attributes
    ----------
    m : int
        Number of difference columns (depth); 0 is plain (damped) iteration. Default 5.
    mixing : float
        Mixing (damping) parameter b > 0. Default 1.0.
    regularization : float
        Tikhonov weight λ ≥ 0, relative to the data (see :func:`anderson`). Default 0.0.
    safeguard : bool
        Reject mixed steps that increase the residual. Default True.
    restart_cond : float or None
        Condition-number bound of the column-scaled Gram matrix beyond which a row's history is
        cleared; None means ``0.01 / eps`` of the dtype.
    tol : float
        Relative residual tolerance. Default 1e-8.
    max_iter : int
        Iteration limit. Default 500.
    stability_check : bool
        Test each converged row for stability and restart from a perturbed point where unstable.
    max_stability_restarts : int
        Perturbed restarts per row before the row falls back to plain iteration. Default 2.
    stability_iters : int
        Power-iteration steps of the stability test. Default 30.
    """

    m: int = 5
    mixing: float = 1.0
    regularization: float = 0.0
    safeguard: bool = True
    restart_cond: float | None = None
    tol: float = 1e-8
    max_iter: int = 500
    stability_check: bool = False
    max_stability_restarts: int = 2
    stability_iters: int = 30


@dataclass(frozen=True)
class FixedPointResult:
    """What :func:`anderson` and :func:`hopfield_aa.hopfield.iterate` return, shaped like scipy's
    ``OptimizeResult``. Every per-row field has the leading shape of ``x0`` (one entry per problem) and
    every array field is in the caller's kind: NumPy arrays for a NumPy ``x0``, tensors for a tensor.

    Convergence means one thing for both solvers: row b has converged once
    ``‖g(x_k) − x_k‖ ≤ tol · ‖g(x_0) − x_0‖`` (relative to its own initial residual), or once
    ``‖g(x_k) − x_k‖ ≤ 16 ε ‖g(x_k)‖`` (ε the dtype's machine epsilon: the rounding floor).

    Attributes
    ----------
    x : tensor or ndarray, shape (..., n)
        The last accepted iterate x_k (not g(x_k)), in the kind and dtype of ``x0``.
    success : bool
        Whether every row converged.
    nit : int array, shape (...)
        Accepted steps taken by each row.
    message : str
        A one-line summary.
    converged : bool array, shape (...)
        The convergence criterion above holds at ``x``.
    g_x : tensor or ndarray, shape (..., n)
        g(x_k) at the returned iterate (already computed, so free).
    residual_norms : array, shape (nit.max() + 1, ...)
        ``‖g(x_k) − x_k‖`` after k iterations; a row that has stopped repeats its last value.
    n_evals : int array, shape (...)
        Evaluations of g whose value at this row the solver used (including g(x_0), safeguard fallbacks
        and stability tests; the frozen rows that a call also passes are not counted).
    n_calls : int
        Calls of g.
    n_rejected : int array, shape (...)
        Mixed steps replaced by the plain step by the safeguard.
    n_restarts : int array, shape (...)
        History restarts (ill-conditioning, safeguard rejections, stability restarts).
    failed : bool array, shape (...)
        g returned non-finite values on the plain step of this row; ``x`` is its last finite iterate.
    spectral_radius : array, shape (...), or None
        Spectral radius of the Jacobian of g at ``x``: estimated by :func:`anderson` with
        ``stability_check``, exact (``‖DT_α‖₂``) from :func:`~hopfield_aa.hopfield.iterate`; else None.
    stable : bool array, shape (...), or None
        ``spectral_radius < 1`` (:func:`anderson`: and converged).
    energy_history : array, shape (nit.max() + 1, ...), or None
        ``E_α(x_k)`` along plain :func:`~hopfield_aa.hopfield.iterate` (energy descent); None otherwise.

    ``n_iter``, ``state`` and ``history`` are the names :func:`iterate` used before: aliases of ``nit``,
    ``x`` and ``residual_norms``.
    """

    x: ArrayLike
    success: bool
    nit: ArrayLike
    message: str
    converged: ArrayLike
    g_x: ArrayLike
    residual_norms: ArrayLike
    n_evals: ArrayLike
    n_calls: int
    n_rejected: ArrayLike
    n_restarts: ArrayLike
    failed: ArrayLike
    spectral_radius: ArrayLike | None = None
    stable: ArrayLike | None = None
    energy_history: ArrayLike | None = None

    @property
    def n_iter(self) -> ArrayLike:
        """``nit`` under its earlier name."""
        return self.nit

    @property
    def state(self) -> ArrayLike:
        """``x`` under the name :func:`~hopfield_aa.hopfield.iterate` used."""
        return self.x

    @property
    def history(self) -> ArrayLike:
        """``residual_norms`` under the name :func:`~hopfield_aa.hopfield.iterate` used."""
        return self.residual_norms


AndersonResult = FixedPointResult  # the name the solver's result had first


# --------------------------------------------------------------------------------------------------
# The least-squares problem shared by the solver and the single step


def _solve_gamma(
    d_f: torch.Tensor,
    f: torch.Tensor,
    valid: torch.Tensor,
    regularization: float,
    restart_cond: float,
    raw: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """γ = argmin ‖f − ΔF γ‖² + λ Σ_j ‖ΔF_j‖² γ_j², batched.

    ``d_f`` holds the difference columns as rows, shape (..., k, n); ``f`` (..., n); ``valid``
    (..., k) marks the columns in use. Columns are scaled to unit norm, so the Gram matrix
    C = Uᵀ U (+ λ I) has unit diagonal and its Cholesky factor is the R of a QR of U: R_jj is the
    sine of the angle between column j and the span of the columns before it. Zero or invalid
    columns get γ_j = 0. Where the Cholesky factorisation fails, γ is non-finite, or some
    R_jj² < 1 / restart_cond, the problem is ill-conditioned: those columns are dropped and the
    problem solved again. ``raw``, if given, is the Gram matrix ΔFᵀΔF (..., k, k) kept up to date by
    the caller (one new column per step instead of k). Returns γ (..., k), ``well_conditioned`` (...)
    and ``finite`` (...).
    """
    native = _solve_gamma_native(d_f, f, valid, regularization, restart_cond, raw)
    if native is not None:
        return native
    # the scaled Gram matrix and right-hand side from ΔFᵀΔF and ΔFᵀf (no scaled copy of ΔF)
    if raw is None:
        raw = d_f @ d_f.transpose(-1, -2)
    norms = raw.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    use = valid & (norms > 0) & torch.isfinite(norms)
    scale = torch.where(use, norms, torch.ones_like(norms))
    rhs = torch.where(use, (d_f @ f[..., None])[..., 0] / scale, torch.zeros_like(scale))
    keep_pair = use[..., :, None] & use[..., None, :]
    gram = torch.where(keep_pair, raw / (scale[..., :, None] * scale[..., None, :]), torch.zeros_like(raw))
    threshold = 1.0 / restart_cond
    index = torch.arange(1, gram.shape[-1] + 1, device=gram.device)

    def solve(columns: torch.Tensor, first: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # unused columns become identity rows/columns with zero right-hand side: γ_j = 0 exactly
        # (on the first solve `gram` and `rhs` are already zero outside `columns`)
        c = gram if first else torch.where(columns[..., :, None] & columns[..., None, :], gram, 0.0)
        c = c + torch.diag_embed(regularization + (~columns).to(gram.dtype))
        chol, info = torch.linalg.cholesky_ex(c)
        b = rhs if first else torch.where(columns, rhs, 0.0)
        coef = torch.cholesky_solve(b[..., None], chol)[..., 0]
        # a weak pivot (also NaN), or a failed factorisation, which stops at pivot `info` (1-based):
        # that column and the later ones are weak
        weak = columns & ~(chol.diagonal(dim1=-2, dim2=-1).square() >= threshold)
        weak |= columns & (info[..., None] > 0) & (index >= info[..., None])
        # non-finite γ with no weak pivot to blame (e.g. NaN in f): every column is suspect
        nonfinite = ~torch.isfinite(coef).all(-1, keepdim=True) & ~weak.any(-1, keepdim=True)
        return coef, weak | (nonfinite & columns)

    coef, weak = solve(use, True)
    well = ~weak.any(-1)
    if not bool(well.all()):
        # drop the dependent columns and solve once more; anything still singular gets γ = 0
        coef2, weak2 = solve(use & ~weak, False)
        coef = torch.where(well[..., None], coef, coef2)
        failed2 = weak2.any(-1) & ~well
        coef = torch.where(failed2[..., None], torch.zeros_like(coef), coef)
    gamma = torch.where(use, coef / scale, torch.zeros_like(coef))
    finite = torch.isfinite(gamma).all(-1)
    gamma = torch.where(finite[..., None], gamma, torch.zeros_like(gamma))
    return gamma, well, finite


def _cholesky_solve_row(
    raw: Any, scale: Any, rhs: Any, columns: Any, lam: float, threshold: float, c: Any, coef: Any, weak: Any
) -> None:  # pragma: no cover - compiled by numba
    """One solve of :func:`_solve_gamma` for one row: the scaled Gram matrix ``raw`` (k, k) restricted to
    ``columns``, unit diagonal (+ λ) elsewhere, factored by Cholesky into ``c`` and solved for ``coef``;
    ``weak`` marks the used columns with a pivot² below ``threshold`` (or NaN), those from a failed pivot
    on, and every used column when ``coef`` is not finite with no weak pivot to blame."""
    k = raw.shape[0]
    for i in range(k):
        for j in range(k):
            if columns[i] and columns[j]:
                c[i, j] = raw[i, j] / (scale[i] * scale[j])
            else:
                c[i, j] = 0.0
        c[i, i] += lam + (0.0 if columns[i] else 1.0)
    failed_at = k
    for j in range(k):
        s = c[j, j]
        for q in range(j):
            s -= c[j, q] * c[j, q]
        if not s > 0.0:
            failed_at = j
            break
        c[j, j] = math.sqrt(s)
        for i in range(j + 1, k):
            t = c[i, j]
            for q in range(j):
                t -= c[i, q] * c[j, q]
            c[i, j] = t / c[j, j]
    any_weak = False
    for j in range(k):
        weak[j] = columns[j] and (j >= failed_at or not c[j, j] * c[j, j] >= threshold)
        any_weak = any_weak or weak[j]
    if failed_at < k:
        for j in range(k):
            coef[j] = math.nan
        return
    for i in range(k):  # L y = b, then Lᵀ x = y
        t = rhs[i] if columns[i] else 0.0
        for q in range(i):
            t -= c[i, q] * coef[q]
        coef[i] = t / c[i, i]
    for i in range(k - 1, -1, -1):
        t = coef[i]
        for q in range(i + 1, k):
            t -= c[q, i] * coef[q]
        coef[i] = t / c[i, i]
    finite = True
    for j in range(k):
        finite = finite and math.isfinite(coef[j])
    if not finite and not any_weak:
        for j in range(k):
            weak[j] = columns[j]


def _gamma_row(
    r: int,
    q: int,
    raw: Any,
    d_f: Any,
    f: Any,
    valid: Any,
    lam: float,
    threshold: float,
    gamma: Any,
    well: Any,
    finite: Any,
    scratch: Any,
    flags: Any,
) -> None:  # pragma: no cover - compiled by numba
    """:func:`_solve_gamma` for row ``r`` of ``raw``, ``d_f`` and ``f`` in float64, with its retry: γ into
    ``gamma[q]``, the row's ``well`` conditioning and ``finite`` γ at ``q``, its columns ``valid[q]``.
    ``d_f`` and ``f`` are flat (row-major (R, k, n) and (R, n)); ``scratch`` (k + 4, k) and ``flags``
    (4, k) are work space."""
    k = raw.shape[1]
    n = f.shape[0] // raw.shape[0]
    c, scale, rhs, coef, coef2 = scratch[:k], scratch[k], scratch[k + 1], scratch[k + 2], scratch[k + 3]
    use, columns, weak, weak2 = flags[0], flags[1], flags[2], flags[3]
    for j in range(k):
        norm = math.sqrt(max(np.float64(raw[r, j, j]), 0.0))
        use[j] = valid[q, j] and norm > 0.0 and math.isfinite(norm)
        scale[j] = norm if use[j] else 1.0
        rhs[j] = _dot(d_f, (r * k + j) * n, f, r * n, n) / scale[j] if use[j] else 0.0
    _cholesky_solve_row(raw[r], scale, rhs, use, lam, threshold, c, coef, weak)
    any_weak = False
    for j in range(k):
        any_weak = any_weak or weak[j]
    if any_weak:  # drop the dependent columns and solve once more; still singular: γ = 0
        for j in range(k):
            columns[j] = use[j] and not weak[j]
        _cholesky_solve_row(raw[r], scale, rhs, columns, lam, threshold, c, coef2, weak2)
        failed2 = False
        for j in range(k):
            failed2 = failed2 or weak2[j]
        for j in range(k):
            coef[j] = 0.0 if failed2 else coef2[j]
    ok = True
    for j in range(k):
        gamma[q, j] = coef[j] / scale[j] if use[j] else 0.0
        ok = ok and math.isfinite(gamma[q, j])
    if not ok:
        for j in range(k):
            gamma[q, j] = 0.0
    well[q] = not any_weak
    finite[q] = ok


_LANES = 8  # rows solved side by side by _gamma_rows


def _gamma_rows(
    raw: Any, d_f: Any, f: Any, valid: Any, lam: float, threshold: float, gamma: Any, well: Any, finite: Any
) -> None:  # pragma: no cover - compiled by numba
    """:func:`_solve_gamma` row by row in float64 (its native form): γ into ``gamma`` (R, k), and the
    rows' ``well`` conditioning and ``finite`` γ.

    Rows are taken ``_LANES`` at a time, every operation of :func:`_gamma_row`'s first solve done for all
    of them side by side (the loops over rows are innermost, so the chains of divisions and square roots
    of different rows overlap; the compiler keeps them scalar: measured 83 → 51 µs for 256 rows of 5
    columns; each row's operations are those of the row solve, in its order, so its bits are too). A
    row whose first solve is not clean (a pivot that is not positive or is weak, a non-finite
    coefficient) is solved again alone by :func:`_gamma_row`, which retries it; so are the last
    R mod ``_LANES`` rows."""
    n_rows, k, n = d_f.shape[0], d_f.shape[1], d_f.shape[2]
    dff = d_f.reshape(-1)
    ff = f.reshape(-1)
    L = _LANES
    c = np.empty((k, k, L))
    scale = np.empty((k, L))
    rhs = np.empty((k, L))
    coef = np.empty((k, L))
    use = np.empty((k, L), np.bool_)
    clean = np.empty(L, np.bool_)
    s = np.empty(L)
    scratch = np.empty((k + 4, k))
    flags = np.empty((4, k), np.bool_)
    blocked = n_rows - n_rows % L
    for r0 in range(0, blocked, L):
        for j in range(k):
            for lane in range(L):
                scale[j, lane] = np.float64(raw[r0 + lane, j, j])
            for lane in range(L):
                scale[j, lane] = math.sqrt(max(scale[j, lane], 0.0))
            for lane in range(L):
                u = valid[r0 + lane, j] and scale[j, lane] > 0.0 and math.isfinite(scale[j, lane])
                use[j, lane] = u
                scale[j, lane] = scale[j, lane] if u else 1.0
            for lane in range(L):
                r = r0 + lane
                rhs[j, lane] = _dot(dff, (r * k + j) * n, ff, r * n, n) if use[j, lane] else 0.0
            for lane in range(L):
                rhs[j, lane] = rhs[j, lane] / scale[j, lane] if use[j, lane] else 0.0
        for i in range(k):  # the scaled Gram matrix, unit diagonal (+ λ) for unused columns
            for j in range(k):
                for lane in range(L):
                    c[i, j, lane] = np.float64(raw[r0 + lane, i, j])
                for lane in range(L):
                    both = use[i, lane] and use[j, lane]
                    c[i, j, lane] = c[i, j, lane] / (scale[i, lane] * scale[j, lane]) if both else 0.0
            for lane in range(L):
                c[i, i, lane] += lam + (0.0 if use[i, lane] else 1.0)
        clean[:] = True
        for j in range(k):  # Cholesky, lower triangle in place
            for lane in range(L):
                s[lane] = c[j, j, lane]
            for q in range(j):
                for lane in range(L):
                    s[lane] -= c[j, q, lane] * c[j, q, lane]
            for lane in range(L):
                clean[lane] = clean[lane] and s[lane] > 0.0
                c[j, j, lane] = math.sqrt(max(s[lane], 0.0))
            for i in range(j + 1, k):
                for lane in range(L):
                    s[lane] = c[i, j, lane]
                for q in range(j):
                    for lane in range(L):
                        s[lane] -= c[i, q, lane] * c[j, q, lane]
                for lane in range(L):
                    c[i, j, lane] = s[lane] / c[j, j, lane]
            for lane in range(L):
                weak = use[j, lane] and not c[j, j, lane] * c[j, j, lane] >= threshold
                clean[lane] = clean[lane] and not weak
        for i in range(k):  # L y = b, then Lᵀ x = y
            for lane in range(L):
                s[lane] = rhs[i, lane]
            for q in range(i):
                for lane in range(L):
                    s[lane] -= c[i, q, lane] * coef[q, lane]
            for lane in range(L):
                coef[i, lane] = s[lane] / c[i, i, lane]
        for i in range(k - 1, -1, -1):
            for lane in range(L):
                s[lane] = coef[i, lane]
            for q in range(i + 1, k):
                for lane in range(L):
                    s[lane] -= c[q, i, lane] * coef[q, lane]
            for lane in range(L):
                coef[i, lane] = s[lane] / c[i, i, lane]
        for lane in range(L):
            r = r0 + lane
            for j in range(k):
                clean[lane] = clean[lane] and math.isfinite(coef[j, lane])
            if not clean[lane]:
                _gamma_row(r, r, raw, dff, ff, valid, lam, threshold, gamma, well, finite, scratch, flags)
                continue
            ok = True
            for j in range(k):
                gamma[r, j] = coef[j, lane] / scale[j, lane] if use[j, lane] else 0.0
                ok = ok and math.isfinite(gamma[r, j])
            if not ok:
                for j in range(k):
                    gamma[r, j] = 0.0
            well[r] = True
            finite[r] = ok
    for r in range(blocked, n_rows):
        _gamma_row(r, r, raw, dff, ff, valid, lam, threshold, gamma, well, finite, scratch, flags)


def _solve_gamma_native(
    d_f: torch.Tensor,
    f: torch.Tensor,
    valid: torch.Tensor,
    regularization: float,
    restart_cond: float,
    raw: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """:func:`_solve_gamma` as one native call on CPU float32/float64 (None where that does not apply):
    the same γ, conditioning and finiteness, computed row by row in float64."""
    kernel = _GAMMA_ROWS.get()
    if kernel is None or not _jit.accepts(d_f, f, *([] if raw is None else [raw])):
        return None
    batch, (k, n) = d_f.shape[:-2], d_f.shape[-2:]
    rows = math.prod(batch)
    d_f3 = d_f.detach().reshape(rows, k, n).contiguous()
    gram = (d_f3 @ d_f3.transpose(-1, -2)) if raw is None else raw.detach().reshape(rows, k, k).contiguous()
    f2 = f.detach().expand(*batch, n).reshape(rows, n).contiguous()
    # a mask shared by every row is broadcast without a copy (stride 0)
    shared = valid.ndim == 1 or all(size == 1 for size in valid.shape[:-1])
    valid2 = (
        np.broadcast_to(valid.reshape(k).numpy(), (rows, k))
        if shared
        else valid.expand(*batch, k).reshape(rows, k).contiguous().numpy()
    )
    gamma = np.empty((rows, k), dtype=d_f3.numpy().dtype)
    well = np.empty(rows, dtype=np.bool_)
    finite = np.empty(rows, dtype=np.bool_)
    kernel(
        gram.numpy(),
        d_f3.numpy(),
        f2.numpy(),
        valid2,
        float(regularization),
        1.0 / restart_cond,
        gamma,
        well,
        finite,
    )
    return (
        torch.from_numpy(gamma).reshape(*batch, k),
        torch.from_numpy(well).reshape(batch),
        torch.from_numpy(finite).reshape(batch),
    )


def _stack_history(values: object, name: str) -> tuple[torch.Tensor, Kind]:
    if isinstance(values, (list, tuple)):
        if len(values) == 0:
            raise ValueError(f"{name} must hold at least one state, got an empty sequence")
        items = [as_tensor(v, f"{name}[{i}]", min_ndim=1) for i, v in enumerate(values)]
        shapes = {tuple(t.shape) for t, _ in items}
        if len(shapes) != 1:
            raise ValueError(f"{name} entries must all have the same shape, got {sorted(shapes)}")
        dtype = items[0][0].dtype
        for t, _ in items[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        return torch.stack([t.to(dtype) for t, _ in items]), result_kind(*(k for _, k in items))
    tensor, kind = as_tensor(values, name, min_ndim=2)
    return tensor, kind


class _StepOptions(TypedDict, total=False):
    """The keywords of :func:`anderson_step` besides ``return_gamma`` (for its typed overloads)."""

    mixing: float
    regularization: float
    gamma: float | ArrayLike | None


@overload
def anderson_step(
    xs: _Iterates, gs: _Iterates, *, return_gamma: Literal[False] = ..., **options: Unpack[_StepOptions]
) -> ArrayLike: ...
@overload
def anderson_step(
    xs: _Iterates, gs: _Iterates, *, return_gamma: Literal[True], **options: Unpack[_StepOptions]
) -> tuple[ArrayLike, ArrayLike]: ...


def anderson_step(
    xs: Sequence[ArrayLike] | ArrayLike,
    gs: Sequence[ArrayLike] | ArrayLike,
    *,
    mixing: float = 1.0,
    regularization: float = 0.0,
    gamma: float | ArrayLike | None = None,
    return_gamma: bool = False,
) -> ArrayLike | tuple[ArrayLike, ArrayLike]:
    r"""One Anderson (type-II) mixing step from the last m + 1 iterates and map values.

    With residuals f_i = g_i − x_i (oldest first, i = 0..m) and the difference columns
    ΔF = [f_1 − f_0, …, f_m − f_{m−1}], ΔX and ΔG likewise, the step is (papers/theory.md §5)

    .. math::

        \gamma = \arg\min_\gamma \|f_m - \Delta F \gamma\|_2^2
                 + \lambda \sum_j \|\Delta F_j\|^2 \gamma_j^2, \qquad
        x_{+} = (x_m - \Delta X \gamma) + b\,(f_m - \Delta F \gamma),

    so with b = 1 it is x₊ = g_m − ΔG γ. Depth 1 has the closed form
    γ = ⟨f_1, f_1 − f_0⟩ / ‖f_1 − f_0‖². The least-squares problem is solved as in :func:`anderson`
    (normal equations of the column-normalised ΔF, Cholesky); a column with zero norm gets γ_j = 0
    (so S = D gives the plain step, finite), and a column that is numerically dependent on the ones
    before it is dropped.

    Extrapolation is AA(1) (papers/theory.md §5): with ``xs = [ξ, ξ]``, ``gs = [D(ξ), S(ξ)]`` and
    ``gamma = 1 − λ`` the step is exactly P_λ(ξ) = D + λ (S − D); the least-squares γ* gives the
    Anderson-optimal scale λ* = 1 − γ*.

    Parameters
    ----------
    xs, gs : sequence of m + 1 arrays of shape (..., n), or arrays of shape (m + 1, ..., n)
        Iterates and their map values, oldest first (history on dim 0). The step acts on the last
        axis and is batched over all middle axes (e.g. heads, query tokens). m ≥ 1.
    mixing : float, default 1.0
        b > 0.
    regularization : float, default 0.0
        λ ≥ 0, relative to the column norms (scale-invariant).
    gamma : float or array of shape (..., m), optional
        Fixed coefficients instead of the least-squares ones (a float is broadcast).
    return_gamma : bool, default False
        Also return γ, shape (..., m).

    Returns
    -------
    x_next : array of shape (..., n), the kind of ``xs``; and γ if ``return_gamma``.

    Examples
    --------
    >>> import torch
    >>> xi, dense, sparse = torch.zeros(3), torch.tensor([1.0, 0, 0]), torch.tensor([0.0, 1, 0])
    >>> anderson_step([xi, xi], [dense, sparse], gamma=1 - 2.0)  # D + 2 (S - D)
    tensor([-1.,  2.,  0.])
    """
    x_hist, kind = _stack_history(xs, "xs")
    g_hist, g_kind = _stack_history(gs, "gs")
    kind = result_kind(kind, g_kind)
    if x_hist.shape != g_hist.shape:
        raise ValueError(
            f"xs and gs must have the same shape, got {tuple(x_hist.shape)} and {tuple(g_hist.shape)}"
        )
    if x_hist.shape[0] < 2:
        raise ValueError(f"xs must hold at least 2 states (m + 1 with m >= 1), got {x_hist.shape[0]}")
    b = check_scalar(mixing, "mixing", positive=True)
    lam = check_scalar(regularization, "regularization", minimum=0.0)
    dtype = torch.promote_types(x_hist.dtype, g_hist.dtype)
    x_hist, g_hist = x_hist.to(dtype), g_hist.to(dtype)
    m = x_hist.shape[0] - 1
    batch = x_hist.shape[1:-1]
    coef: torch.Tensor | None
    if gamma is None:
        coef = None
    elif isinstance(gamma, (int, float, np.floating, np.integer)) and not isinstance(gamma, bool):
        value = check_scalar(gamma, "gamma")
        if math.isinf(value):
            raise ValueError("gamma must be finite, got inf")
        coef = torch.full((*batch, m), value, dtype=dtype, device=x_hist.device)
    else:
        coef_t, _ = as_tensor(gamma, "gamma", min_ndim=1)
        if coef_t.shape[-1] != m:
            raise ValueError(f"gamma must have last dimension m = {m}, got shape {tuple(coef_t.shape)}")
        coef = torch.broadcast_to(coef_t.to(dtype=dtype, device=x_hist.device), (*batch, m))
    x_next, coef = _anderson_step(x_hist, g_hist, b, lam, coef)
    if return_gamma:
        return restore(x_next, kind), restore(coef, kind)
    return restore(x_next, kind)


def _anderson_step(
    x_hist: torch.Tensor,
    g_hist: torch.Tensor,
    mixing: float = 1.0,
    regularization: float = 0.0,
    gamma: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel of :func:`anderson_step`: histories (m + 1, ..., n) of one dtype, no validation and no
    host synchronisation (for the attention processors' sampling loop). Returns (x_next, γ)."""
    m = x_hist.shape[0] - 1
    kernel = _STEP.get() if gamma is None and m > 0 and _jit.accepts(x_hist, g_hist) else None
    if kernel is not None:  # one native call, no history tensor materialised
        n = x_hist.shape[-1]
        xs = x_hist.detach().reshape(m + 1, -1, n).contiguous()
        gs = g_hist.detach().reshape(m + 1, -1, n).contiguous()
        out = torch.empty(xs.shape[1:], dtype=xs.dtype)
        coef = torch.empty(xs.shape[1], m, dtype=xs.dtype)
        threshold = 1.0 / _default_restart_cond(xs.dtype)
        lam = float(regularization)
        kernel(xs.numpy(), gs.numpy(), float(mixing), lam, threshold, out.numpy(), coef.numpy())
        return out.reshape(x_hist.shape[1:]), coef.reshape(*x_hist.shape[1:-1], m)
    f_hist = g_hist - x_hist
    d_f = (f_hist[1:] - f_hist[:-1]).movedim(0, -2)  # (..., m, n)
    d_x = (x_hist[1:] - x_hist[:-1]).movedim(0, -2)
    if gamma is None:
        valid = torch.ones((*d_f.shape[:-2], m), dtype=torch.bool, device=d_f.device)
        gamma, _, _ = _solve_gamma(d_f, f_hist[-1], valid, regularization, _default_restart_cond(d_f.dtype))
    if _jit.accepts(d_x):  # the batch flattened to rows: one native call per mixed history
        n = d_x.shape[-1]
        rows = (-1, m, n)
        g2 = gamma.reshape(-1, m)
        mixed_x = _mixed(x_hist[-1].reshape(-1, n), g2, d_x.reshape(rows)).reshape(x_hist.shape[1:])
        mixed_f = _mixed(f_hist[-1].reshape(-1, n), g2, d_f.reshape(rows)).reshape(x_hist.shape[1:])
    else:
        mixed_x = x_hist[-1] - (gamma[..., None, :] @ d_x)[..., 0, :]
        mixed_f = f_hist[-1] - (gamma[..., None, :] @ d_f)[..., 0, :]
    return mixed_x + mixing * mixed_f, gamma


_COMMON_PATH = True  # take the whole-batch step while every row is in the common case (tests turn it off)
_STALL_LIMIT = 3  # safeguard rejections without halving the residual before an escape phase
_ESCAPE_MIN_STEPS = 5  # plain steps an escape phase takes at least


def _default_restart_cond(dtype: torch.dtype) -> float:
    return 0.01 / torch.finfo(dtype).eps


# --------------------------------------------------------------------------------------------------
# Calling the user's map


class _Map:
    """Calls g in the form the caller uses, checks the output and counts evaluations.

    The solver works on rows (B, n). By default g receives arrays of the caller's shape (that of
    ``x0``, as in scipy): to evaluate a subset of rows, the other rows are filled from ``base`` (their
    current iterates, frozen) and their values discarded. With ``row_subsets`` g receives only the
    rows asked for, stacked as (b, n).
    """

    def __init__(
        self, g: MapFn, kind: Kind, shape: tuple[int, ...], device: torch.device, row_subsets: bool = False
    ) -> None:
        if not callable(g):
            raise TypeError(f"g must be callable, got {type(g).__name__}")
        self.g, self.kind, self.shape, self.row_subsets = g, kind, shape, row_subsets
        self.n = shape[-1]
        self.batch = math.prod(shape[:-1])
        self._subset_evals = torch.zeros(self.batch, dtype=torch.long, device=device)
        self._whole_calls = 0  # calls on every row, counted here rather than added to every row's count
        self.n_calls = 0

    @property
    def n_evals(self) -> torch.Tensor:
        """Evaluations of each row."""
        return self._subset_evals + self._whole_calls

    def __call__(
        self, x: torch.Tensor, rows: torch.Tensor | None = None, base: torch.Tensor | None = None
    ) -> torch.Tensor:
        """g at the rows ``x`` (b, n): all rows when ``rows`` is None, else the rows ``rows`` of the batch
        (``base`` (B, n) holds the current iterates of all rows, used to fill the others)."""
        if rows is not None and rows.numel() == self.batch and not self.row_subsets:
            rows = None  # every row (in order: the solver's active rows are sorted)
        if rows is None:
            out = self._call(x.reshape(self.shape)).reshape(x.shape)
        elif self.row_subsets:
            out = self._call(x)
        else:
            assert base is not None
            full = base.clone()
            full[rows] = x
            out = self._call(full.reshape(self.shape)).reshape(full.shape)[rows]
        if rows is None:
            self._whole_calls += 1
        else:
            self._subset_evals.index_add_(0, rows, torch.ones_like(rows))
        return out

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        out = self.g(restore(x, self.kind) if self.kind.numpy else x)
        if isinstance(out, np.ndarray):
            out_t = torch.from_numpy(np.asarray(out)).to(device=x.device)
        elif isinstance(out, torch.Tensor):
            out_t = out
        else:
            raise TypeError(f"g must return a torch.Tensor or numpy.ndarray, got {type(out).__name__}")
        if tuple(out_t.shape) != tuple(x.shape):
            raise ValueError(
                f"g must map states of shape {tuple(x.shape)} to the same shape, got {tuple(out_t.shape)}"
            )
        if not out_t.is_floating_point():
            raise TypeError(f"g must return floating-point values, got dtype {out_t.dtype}")
        self.n_calls += 1
        return out_t.to(dtype=x.dtype, device=x.device)


def _combine(gamma: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Σ_j γ_j d_j for γ (b, k) and columns d (b, k, n), one multiply-add per column: no (b, k, n)
    temporary (a broadcast product and sum allocates one) and no per-row loop (a batched matrix product
    of (1 × k)(k × n) blocks runs one)."""
    out = gamma[:, :1] * d[:, 0]
    for j in range(1, d.shape[1]):
        out.addcmul_(gamma[:, j : j + 1], d[:, j])
    return out


def _norm(v: torch.Tensor) -> torch.Tensor:
    """‖v‖ along the last axis, accumulated in float64 for narrower dtypes: a float32 residual of 3e-30
    per entry squares to 1e-59, below float32's range, and its norm would be 0 (a false convergence).
    On CPU one native call (:func:`_norms_rows`), which every step of the solver shares."""
    if _jit.accepts(v):
        out = torch.empty(v.shape[:-1], dtype=v.dtype)
        kernel = _NORMS.get()
        assert kernel is not None
        kernel(v.detach().reshape(-1, v.shape[-1]).contiguous().numpy(), out.numpy().reshape(-1))
        return out
    if v.dtype == torch.float64:
        return torch.linalg.vector_norm(v, dim=-1)
    return torch.linalg.vector_norm(v, dim=-1, dtype=torch.float64).to(v.dtype)


def _mixed(plain: torch.Tensor, gamma: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The mixed step ``plain − Σ_j γ_j d_j`` (γ (b, k), columns d (b, k, n)); on CPU one native call."""
    if _jit.accepts(plain, gamma, d):
        out = torch.empty_like(plain)
        kernel = _MIXED.get()
        assert kernel is not None
        kernel(plain.contiguous().numpy(), gamma.contiguous().numpy(), d.contiguous().numpy(), out.numpy())
        return out
    return plain - _combine(gamma, d)


# Native forms of the solver's per-row arithmetic (CPU float32/float64): the common step's fused
# acceptance test computes the same quantities with the same helpers, so both steps agree bit for bit.


def _dot(a: Any, i: int, b: Any, j: int, n: int) -> float:  # pragma: no cover - compiled by numba
    """Σ_t a[i + t] b[j + t] over t < n, for flat arrays, in float64: four partial sums (t mod 4) added in
    a fixed order, so that the additions pipeline and every kernel that calls this gets the same bits.
    Rows are addressed by offset rather than sliced out: a slice is an array view, whose reference
    counting costs more than a short row's arithmetic."""
    s0 = s1 = s2 = s3 = 0.0
    t = 0
    while t + 4 <= n:
        s0 += np.float64(a[i + t]) * np.float64(b[j + t])
        s1 += np.float64(a[i + t + 1]) * np.float64(b[j + t + 1])
        s2 += np.float64(a[i + t + 2]) * np.float64(b[j + t + 2])
        s3 += np.float64(a[i + t + 3]) * np.float64(b[j + t + 3])
        t += 4
    while t < n:
        s0 += np.float64(a[i + t]) * np.float64(b[j + t])
        t += 1
    return (s0 + s1) + (s2 + s3)


def _sum_squares(v: Any, i: int, n: int) -> float:  # pragma: no cover - compiled by numba
    """Σ_t v[i + t]² over t < n (flat ``v``), as :func:`_dot` computes it."""
    return _dot(v, i, v, i, n)


def _norms_rows(v: Any, out: Any) -> None:  # pragma: no cover - compiled by numba
    n = v.shape[1]
    flat = v.reshape(-1)
    for r in range(v.shape[0]):
        out[r] = math.sqrt(_sum_squares(flat, r * n, n))


def _mixed_row(
    plain: Any, gamma: Any, d: Any, out: Any, q: int, r: int, total: Any
) -> None:  # pragma: no cover - compiled by numba
    """out[q] = plain[q] − Σ_j γ[q, j] d[r, j], the sum over j in order for each entry (entries in
    parallel, in the float64 work row ``total``)."""
    n = plain.shape[1]
    total[:] = 0.0
    for j in range(d.shape[1]):
        g = np.float64(gamma[q, j])
        for i in range(n):
            total[i] += g * np.float64(d[r, j, i])
    for i in range(n):
        out[q, i] = plain[q, i] - total[i]


def _mixed_rows(plain: Any, gamma: Any, d: Any, out: Any) -> None:  # pragma: no cover - compiled by numba
    """plain − Σ_j γ_j d_j per row (:func:`_mixed_row`)."""
    total = np.empty(plain.shape[1])
    for r in range(plain.shape[0]):
        _mixed_row(plain, gamma, d, out, r, r, total)


def _propose_rows(
    raw: Any,
    d_f: Any,
    f: Any,
    valid: Any,
    lam: float,
    threshold: float,
    plain: Any,
    d_step: Any,
    x_new: Any,
    gamma: Any,
    well: Any,
    finite: Any,
) -> None:  # pragma: no cover - compiled by numba
    """The common step's proposal in one call: γ of every row (:func:`_gamma_rows`), zero where the row is
    not well conditioned, and the mixed step x_new = plain − Σ_j γ_j ΔStep_j (:func:`_mixed_rows`): the
    numbers the general step gets from those two kernels."""
    _gamma_rows(raw, d_f, f, valid, lam, threshold, gamma, well, finite)
    for r in range(gamma.shape[0]):
        if not well[r]:
            gamma[r, :] = 0.0
    _mixed_rows(plain, gamma, d_step, x_new)


def _gram_column_rows(d_f: Any, slot: int, out: Any) -> None:  # pragma: no cover - compiled by numba
    """out[r, j] = ⟨ΔF_j, ΔF_slot⟩ of each row (the new row and column of ΔFᵀΔF)."""
    k, n = d_f.shape[1], d_f.shape[2]
    flat = d_f.reshape(-1)
    for r in range(d_f.shape[0]):
        for j in range(k):
            out[r, j] = _dot(flat, (r * k + j) * n, flat, (r * k + slot) * n, n)


def _push_row(
    r: int,
    q: int,
    ok: bool,
    slot: int,
    b: float,
    b_typed: Any,
    x: Any,
    f: Any,
    g_x: Any,
    x_new: Any,
    f_new: Any,
    g_new: Any,
    d_x: Any,
    d_f: Any,
    d_step: Any,
    gram: Any,
) -> None:  # pragma: no cover - compiled by numba
    """The history columns of state row ``r`` at ``slot`` from its step to row ``q`` of x_new, f_new and
    g_new (zero where not ``ok``: a non-finite residual): ΔX, ΔF, the step direction (ΔG for b = 1, else
    ΔX + b ΔF, ``b_typed`` being b in the input dtype) and the new row and column of ΔFᵀΔF."""
    n, m = x.shape[1], d_f.shape[1]
    for i in range(n):
        d_x[r, slot, i] = x_new[q, i] - x[r, i] if ok else 0.0
        d_f[r, slot, i] = f_new[q, i] - f[r, i] if ok else 0.0
        if b == 1.0:
            d_step[r, slot, i] = g_new[q, i] - g_x[r, i] if ok else 0.0
        else:
            d_step[r, slot, i] = d_x[r, slot, i] + b_typed * d_f[r, slot, i]
    flat_d_f = d_f.reshape(-1)
    for j in range(m):
        gram[r, slot, j] = _dot(flat_d_f, (r * m + j) * n, flat_d_f, (r * m + slot) * n, n)
        gram[r, j, slot] = gram[r, slot, j]


def _accept_rows(
    x: Any,
    x_new: Any,
    f: Any,
    g_x: Any,
    g_new: Any,
    f_norm: Any,
    target: Any,
    d_x: Any,
    d_f: Any,
    d_step: Any,
    gram: Any,
    slot: int,
    b: float,
    safeguard: bool,
    floor: float,
    well: Any,
    f_new: Any,
    fn_new: Any,
    good: Any,
    n_iter: Any,
    reference: Any,
    stall: Any,
) -> bool:  # pragma: no cover - compiled by numba
    """The common step after g(x_new), per row, as the general step computes it: f_new, ‖f_new‖, the
    tests (not converged, finite, accepted by the safeguard) and, with a history (m > 0), its columns at
    ``slot`` and the new row and column of ``gram``; ``good`` is False where a test fails or the new
    column is unusable (‖ΔF‖² zero or not finite) or the row's least squares was not ``well``
    conditioned. Products and norms are rounded to the input dtype where the tensor form rounds them.

    Returns whether every row is good; then the step is taken here too, in place: ``g_x`` becomes g_new,
    ``n_iter`` counts the step, and a row whose residual halved since ``reference`` records it there and
    resets its ``stall`` count (the escape bookkeeping of a step with no rejection)."""
    n = x.shape[1]
    m = d_f.shape[1]
    typed = np.empty(2, f_norm.dtype)
    typed[1] = b
    b_typed = typed[1]
    flat_f_new = f_new.reshape(-1)
    flat_g_new = g_new.reshape(-1)
    every = True
    for r in range(x.shape[0]):
        for i in range(n):
            f_new[r, i] = g_new[r, i] - x_new[r, i]
        typed[0] = math.sqrt(_sum_squares(flat_f_new, r * n, n))
        fn = typed[0]
        fn_new[r] = fn
        typed[0] = math.sqrt(_sum_squares(flat_g_new, r * n, n))
        typed[0] = floor * typed[0]
        ok = not (fn <= target[r] or fn <= typed[0])
        ok = ok and (fn <= f_norm[r] if safeguard else fn < math.inf)
        if m > 0:
            _push_row(r, r, True, slot, b, b_typed, x, f, g_x, x_new, f_new, g_new, d_x, d_f, d_step, gram)
            square = gram[r, slot, slot]
            ok = ok and square > 0.0 and square < math.inf
        ok = ok and well[r]
        good[r] = ok
        every = every and ok
    if every:
        for r in range(x.shape[0]):
            for i in range(n):
                g_x[r, i] = g_new[r, i]
            n_iter[r] += 1
            typed[0] = 0.5 * reference[r]  # rounded to the dtype, as the tensor form rounds it
            if fn_new[r] <= typed[0]:
                reference[r] = fn_new[r]
                stall[r] = 0
    return every


def _step_rows(
    x_hist: Any, g_hist: Any, mixing: float, lam: float, threshold: float, out: Any, gamma: Any
) -> None:  # pragma: no cover - compiled by numba
    """:func:`_anderson_step` row by row: for histories (m + 1, R, n) of iterates and map values, the
    residuals f_j = g_j − x_j, their differences, ΔFᵀΔF and ΔFᵀf in float64, γ (:func:`_gamma_row`, into
    ``gamma`` (R, m)) and x_next = (x_m − ΔX γ) + b (f_m − ΔF γ) into ``out`` (R, n), each difference
    and the mixed steps rounded to the input dtype as the tensor form rounds them; no history tensor is
    materialised."""
    m1, n_rows, n = x_hist.shape
    m = m1 - 1
    dtype = x_hist.dtype
    typed = np.empty(1, dtype)
    typed[0] = mixing
    b = typed[0]
    f = np.empty((m1, n), dtype)
    d_f = np.empty((1, m, n), dtype)
    d_x = np.empty((1, m, n), dtype)
    raw = np.empty((1, m, m))
    x_m = np.empty((1, n), dtype)
    f_m = np.empty((1, n), dtype)
    mixed_x = np.empty((1, n), dtype)
    mixed_f = np.empty((1, n), dtype)
    valid = np.ones((1, m), np.bool_)
    coef = np.empty((1, m), gamma.dtype)
    well = np.empty(1, np.bool_)
    finite = np.empty(1, np.bool_)
    scratch = np.empty((m + 4, m))
    flags = np.empty((4, m), np.bool_)
    total = np.empty(n)
    flat_d_f = d_f.reshape(-1)
    flat_f_m = f_m.reshape(-1)
    for r in range(n_rows):
        for j in range(m1):
            for i in range(n):
                f[j, i] = g_hist[j, r, i] - x_hist[j, r, i]
        for j in range(m):
            for i in range(n):
                d_f[0, j, i] = f[j + 1, i] - f[j, i]
                d_x[0, j, i] = x_hist[j + 1, r, i] - x_hist[j, r, i]
        for j in range(m):
            for q in range(j + 1):
                raw[0, j, q] = _dot(flat_d_f, j * n, flat_d_f, q * n, n)
                raw[0, q, j] = raw[0, j, q]
        for i in range(n):
            x_m[0, i] = x_hist[m, r, i]
            f_m[0, i] = f[m, i]
        _gamma_row(0, 0, raw, flat_d_f, flat_f_m, valid, lam, threshold, coef, well, finite, scratch, flags)
        for j in range(m):
            gamma[r, j] = coef[0, j]
        _mixed_row(x_m, coef, d_x, mixed_x, 0, 0, total)
        _mixed_row(f_m, coef, d_f, mixed_f, 0, 0, total)
        for i in range(n):
            out[r, i] = mixed_x[0, i] + b * mixed_f[0, i]


# The general step's native form: the rules of AndersonSolver._propose and ._finish, row by row, on the
# rows ``rows`` of the whole-batch state (no gathers or scatters). Its arithmetic is the common step's,
# helper for helper, so that the two steps agree bit for bit here as their tensor forms do.


def _general_propose_rows(
    rows: Any,
    x: Any,
    f: Any,
    g_x: Any,
    plain_only: Any,
    escaping: Any,
    filled: Any,
    d_f: Any,
    d_step: Any,
    raw: Any,
    slot: int,
    b: float,
    lam: float,
    threshold: float,
    plain: Any,
    x_new: Any,
    restart: Any,
    used: Any,
) -> None:  # pragma: no cover - compiled by numba
    """:meth:`AndersonSolver._propose` for the rows ``rows``: their plain step x + b f into ``plain``, the
    mixed step into ``x_new``, which rows restart their history (ill-conditioned) and how many columns each
    step ``used`` (output row q is state row rows[q])."""
    n_sel, n = rows.shape[0], x.shape[1]
    m = d_f.shape[1]
    typed = np.empty(1, x.dtype)
    typed[0] = b
    b_typed = typed[0]
    dff = d_f.reshape(-1)
    ff = f.reshape(-1)
    valid = np.empty((n_sel, max(m, 1)), np.bool_)
    gamma = np.zeros((n_sel, max(m, 1)), x.dtype)  # in the input dtype, as the tensor form keeps it
    well = np.empty(n_sel, np.bool_)
    finite = np.empty(n_sel, np.bool_)
    scratch = np.empty((m + 4, max(m, 1)))
    flags = np.empty((4, max(m, 1)), np.bool_)
    total = np.empty(n)
    for q in range(n_sel):
        r = rows[q]
        for i in range(n):
            plain[q, i] = g_x[r, i] if b == 1.0 else x[r, i] + b_typed * f[r, i]
        restart[q] = False
        if m == 0:
            used[q] = 0
            for i in range(n):
                x_new[q, i] = plain[q, i]
            continue
        usable = 0 if plain_only[r] or escaping[r] else filled[r]
        for j in range(m):
            valid[q, j] = (slot - 1 - j) % m < usable  # the column's age: 0 for the newest
        _gamma_row(r, q, raw, dff, ff, valid, lam, threshold, gamma, well, finite, scratch, flags)
        restart[q] = not well[q] and usable > 0
        if restart[q]:
            gamma[q, :] = 0.0
        used[q] = 0 if restart[q] else usable
        _mixed_row(plain, gamma, d_step, x_new, q, r, total)


def _residual_rows(
    x_new: Any, g_new: Any, f_new: Any, fn_new: Any, lo: int, hi: int
) -> None:  # pragma: no cover - compiled by numba
    """f_new = g_new − x_new and its norm (inf where not finite) for the rows lo..hi−1."""
    n = x_new.shape[1]
    flat = f_new.reshape(-1)
    typed = np.empty(1, fn_new.dtype)
    for q in range(lo, hi):
        for i in range(n):
            f_new[q, i] = g_new[q, i] - x_new[q, i]
        typed[0] = math.sqrt(_sum_squares(flat, q * n, n))
        fn_new[q] = typed[0] if math.isfinite(typed[0]) else math.inf


def _general_check_rows(
    rows: Any,
    x_new: Any,
    g_new: Any,
    f_norm: Any,
    used: Any,
    safeguard: bool,
    f_new: Any,
    fn_new: Any,
    reject: Any,
) -> int:  # pragma: no cover - compiled by numba
    """After g(x_new): f_new, ‖f_new‖ (inf where not finite) and the mixed steps the safeguard rejects
    (not below the last residual; without the safeguard, not finite). Returns how many."""
    _residual_rows(x_new, g_new, f_new, fn_new, 0, x_new.shape[0])
    count = 0
    for q in range(rows.shape[0]):
        fn = fn_new[q]
        bad = not fn <= f_norm[rows[q]] if safeguard else not math.isfinite(fn)
        reject[q] = used[q] > 0 and bad
        count += reject[q]
    return count


def _general_finish_rows(
    rows: Any,
    x: Any,
    f: Any,
    g_x: Any,
    f_norm: Any,
    target: Any,
    x_new: Any,
    g_new: Any,
    f_new: Any,
    fn_new: Any,
    reject: Any,
    restart: Any,
    used: Any,
    plain: Any,
    g_plain: Any,
    rejected: Any,
    d_x: Any,
    d_f: Any,
    d_step: Any,
    gram: Any,
    filled: Any,
    slot: int,
    b: float,
    floor: float,
    n_iter: Any,
    n_rejected: Any,
    n_restarts: Any,
    failed: Any,
    escaping: Any,
    escape_steps: Any,
    entry: Any,
    stall: Any,
    reference: Any,
    converged: Any,
    active: Any,
    done: Any,
    ok_rows: Any,
    stall_limit: int,
    escape_min_steps: int,
) -> None:  # pragma: no cover - compiled by numba
    """:meth:`AndersonSolver._finish` for the rows ``rows``, in place on the whole-batch state: the rejected
    rows (``rejected``, their plain-step values ``g_plain``) take the plain step; then, per row, the history
    columns at ``slot`` (zero where the new residual is not finite), the iterate, the counts, the escape
    bookkeeping, the history length, and ``done`` (converged at a finite residual) with ``converged`` and
    ``active`` set from it."""
    n = x.shape[1]
    m = d_f.shape[1]
    typed = np.empty(2, x.dtype)
    typed[1] = b
    b_typed = typed[1]
    flat_g_x = g_x.reshape(-1)
    for t in range(rejected.shape[0]):  # the rejected rows take the plain step instead
        q = rejected[t]
        for i in range(n):
            x_new[q, i] = plain[q, i]
            g_new[q, i] = g_plain[t, i]
        used[q] = 0
        restart[q] = True
    for t in range(rejected.shape[0]):
        q = rejected[t]
        _residual_rows(x_new, g_new, f_new, fn_new, q, q + 1)
    for q in range(rows.shape[0]):
        r = rows[q]
        ok = math.isfinite(fn_new[q])
        if m > 0:
            _push_row(r, q, ok, slot, b, b_typed, x, f, g_x, x_new, f_new, g_new, d_x, d_f, d_step, gram)
        if ok:
            for i in range(n):
                x[r, i] = x_new[q, i]
                g_x[r, i] = g_new[q, i]
                f[r, i] = f_new[q, i]
            f_norm[r] = fn_new[q]
        fn = f_norm[r]
        n_iter[r] += ok
        n_rejected[r] += reject[q]
        failed[r] = not ok
        # the escape phases (_Escapes.update)
        was_escaping = escaping[r]
        steps = escape_steps[r] + was_escaping
        typed[0] = 0.5 * entry[r]
        leave = was_escaping and steps >= escape_min_steps and fn <= typed[0]
        typed[0] = 0.5 * reference[r]
        progressed = fn <= typed[0] or leave
        if progressed:
            reference[r] = fn
        count = 0 if progressed else stall[r] + reject[q]
        enter = not was_escaping and count >= stall_limit
        escaping[r] = (was_escaping and not leave) or enter
        escape_steps[r] = 0 if enter or leave else steps
        if enter:
            entry[r] = fn
        stall[r] = 0 if enter else count
        n_restarts[r] += restart[q] or enter or leave
        if m > 0:
            filled[r] = 0 if enter or leave else min(used[q] + 1, m)
        typed[0] = math.sqrt(_sum_squares(flat_g_x, r * n, n))
        typed[0] = floor * typed[0]
        finished = (fn <= target[r] or fn <= typed[0]) and ok
        done[q] = finished
        ok_rows[q] = ok
        converged[r] = finished
        active[r] = not finished and ok


def _all_common(
    active: Any, escaping: Any, plain_only: Any, converged: Any, filled: Any, gram: Any
) -> bool:  # pragma: no cover - compiled by numba
    """Whether every row is back in the common case: active, not escaping, converged or plain only, its
    history full (with m > 0) and every column usable (‖ΔF_j‖² positive and finite)."""
    m = gram.shape[1]
    for r in range(active.shape[0]):
        if not active[r] or escaping[r] or plain_only[r] or converged[r]:
            return False
        if m > 0:
            if filled[r] != m:
                return False
            for j in range(m):
                square = gram[r, j, j]
                if not (square > 0.0 and square < math.inf):
                    return False
    return True


_GAMMA_ROWS = _jit.Kernel(_gamma_rows, helpers=(_cholesky_solve_row, _dot, _gamma_row))
_PROPOSE = _jit.Kernel(
    _propose_rows, helpers=(_cholesky_solve_row, _dot, _gamma_row, _gamma_rows, _mixed_row, _mixed_rows)
)
_NORMS = _jit.Kernel(_norms_rows, helpers=(_dot, _sum_squares))
_MIXED = _jit.Kernel(_mixed_rows, helpers=(_mixed_row,))
_GRAM_COLUMN = _jit.Kernel(_gram_column_rows, helpers=(_dot,))
_ACCEPT = _jit.Kernel(_accept_rows, helpers=(_dot, _sum_squares, _push_row))
_GENERAL_PROPOSE = _jit.Kernel(
    _general_propose_rows, helpers=(_cholesky_solve_row, _dot, _gamma_row, _mixed_row)
)
_GENERAL_CHECK = _jit.Kernel(_general_check_rows, helpers=(_dot, _sum_squares, _residual_rows))
_GENERAL_FINISH = _jit.Kernel(_general_finish_rows, helpers=(_dot, _sum_squares, _residual_rows, _push_row))
_ALL_COMMON = _jit.Kernel(_all_common)
_STEP = _jit.Kernel(_step_rows, helpers=(_cholesky_solve_row, _dot, _gamma_row, _mixed_row))


# --------------------------------------------------------------------------------------------------
# Stability of a fixed point


def _power_iteration(
    jvp: Callable[[torch.Tensor], torch.Tensor],
    v0: torch.Tensor,
    n_iter: int,
    rtol: float,
    decide_at: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ρ ≈ ‖J v_k‖ by power iteration. Stops when every row's estimate changes by at most
    ``rtol`` relatively or, with ``decide_at``, by at most a fifth of its distance to ``decide_at``
    (enough to tell on which side of it ρ lies)."""
    v = v0 / _norm(v0).clamp_min(torch.finfo(v0.dtype).tiny)[..., None]
    rho = torch.zeros(v0.shape[:-1], dtype=v0.dtype, device=v0.device)
    for _ in range(n_iter):
        w = jvp(v)
        new = _norm(w)
        v = torch.where(new[..., None] > 0, w / new.clamp_min(torch.finfo(w.dtype).tiny)[..., None], v)
        change = (new - rho).abs()
        settled = change <= rtol * new
        if decide_at is not None:
            settled |= change <= 0.2 * (new - decide_at).abs()
        done = bool(settled.all())
        rho = new
        if done:
            break
    return rho, v


def _jvp_operator(
    call: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, g_x: torch.Tensor, method: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    if method == "jvp":
        return lambda v: torch.func.jvp(call, (x,), (v,))[1]
    # forward differences with a step at the square root of the rounding level of x (‖x‖ bounded by
    # √n |x|_∞ where its squares overflow)
    size = _norm(x)
    size = torch.where(torch.isfinite(size), size, x.abs().amax(-1) * math.sqrt(x.shape[-1]))
    h = math.sqrt(torch.finfo(x.dtype).eps) * size.clamp_min(1.0)[..., None]
    return lambda v: (call(x + h * v) - g_x) / h


def spectral_radius(
    g: MapFn,
    x: ArrayLike,
    *,
    n_iter: int = 50,
    method: str = "fd",
    v0: ArrayLike | None = None,
    rtol: float = 1e-4,
    return_vector: bool = False,
) -> ArrayLike | tuple[ArrayLike, ArrayLike]:
    r"""Estimate the spectral radius ρ(J_g(x)) of the Jacobian of g at each row, by power iteration.

    v_{k+1} = J v_k / ‖J v_k‖ and ρ ≈ ‖J v_k‖ (‖v_k‖ = 1), batched over rows; J v is a forward
    difference (g(x + h v) − g(x)) / h with h = √ε · max(1, ‖x‖) (``method="fd"``, one map
    evaluation each) or an exact Jacobian–vector product by ``torch.func.jvp`` (``method="jvp"``,
    g must be a torch function). A fixed point x* of g is linearly stable (attracting for plain
    iteration) when ρ(J_g(x*)) < 1. For a symmetric J (the Hopfield map:
    J = β Xᵀ (diag p − p pᵀ) X, papers/theory.md §4) each ‖J v_k‖ is a lower bound on ρ; for a non-normal J
    it converges to ρ only as k grows, and a complex dominant pair makes it oscillate.

    Parameters
    ----------
    g : callable
        Maps arrays of the shape of ``x`` to the same shape (NumPy for NumPy ``x``), rows independent.
    x : array of shape (..., n)
    n_iter : int, default 50
        Maximum power-iteration steps (stops early when every row changes by less than ``rtol``).
    method : {"fd", "jvp"}
    v0 : array of shape (..., n), optional
        Start vectors (default: a fixed pseudo-random vector per row).
    rtol : float, default 1e-4
    return_vector : bool
        Also return the last (unit) power-iteration vector, an estimate of the dominant eigenvector.

    Returns
    -------
    rho : array of shape (...), and the vectors (..., n) if ``return_vector``.

    Examples
    --------
    >>> import torch
    >>> A = torch.diag(torch.tensor([0.5, -2.0, 1.0], dtype=torch.float64))
    >>> rho = spectral_radius(lambda x: x @ A.T, torch.ones(1, 3, dtype=torch.float64), method="jvp")
    >>> round(float(rho[0]), 3)
    2.0
    """
    x_t, kind = as_tensor(x, "x", min_ndim=1)
    if method not in ("fd", "jvp"):
        raise ValueError(f"method must be 'fd' or 'jvp', got {method!r}")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"n_iter must be a positive integer, got {n_iter!r}")
    if x_t.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x_t.shape)}")
    rows = x_t.reshape(-1, x_t.shape[-1])
    fmap = _Map(g, kind, tuple(x_t.shape), rows.device)
    if method == "jvp" and kind.numpy:
        raise ValueError("method='jvp' needs a torch map and torch input x; use method='fd' for NumPy")
    if v0 is None:
        start = _default_start(rows)
    else:
        v0_t, _ = as_tensor(v0, "v0", min_ndim=1)
        if v0_t.shape != x_t.shape:
            raise ValueError(f"v0 must have the shape of x {tuple(x_t.shape)}, got {tuple(v0_t.shape)}")
        start = v0_t.reshape(rows.shape).to(rows.dtype)
    if rows.shape[0] == 0:  # no vectors: nothing to estimate, g is not called
        empty = restore(rows.new_zeros(x_t.shape[:-1]), kind)
        return (empty, restore(rows.reshape(x_t.shape), kind)) if return_vector else empty
    shape = tuple(x_t.shape)
    call = fmap if method == "fd" else (lambda z: g(z.reshape(shape)).reshape(z.shape))
    g_x = fmap(rows) if method == "fd" else rows
    rho, vec = _power_iteration(_jvp_operator(call, rows, g_x, method), start, n_iter, rtol)
    rho_out = restore(rho.reshape(x_t.shape[:-1]), kind)
    if return_vector:
        return rho_out, restore(vec.reshape(x_t.shape), kind)
    return rho_out


def _default_start(rows: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(0)
    return torch.randn(rows.shape, generator=gen, dtype=rows.dtype).to(rows.device)


# --------------------------------------------------------------------------------------------------
# The solver: a state, and init / step / terminate on it


@dataclass
class _Differences:
    """The last m differences of every row, as ring buffers that all rows write at the shared position
    k mod m: ΔX, ΔF, the step directions ΔX + b ΔF (ΔG for b = 1) and ΔFᵀΔF, kept one column per step.
    Row b's valid columns are its ``filled[b]`` newest ones."""

    d_x: torch.Tensor  # (B, m, n)
    d_f: torch.Tensor  # (B, m, n)
    d_step: torch.Tensor  # (B, m, n)
    gram: torch.Tensor  # (B, m, m)
    filled: torch.Tensor  # (B,)

    @classmethod
    def empty(cls, x: torch.Tensor, m: int) -> _Differences:
        batch, n = x.shape
        zeros = x.new_zeros(batch, m, n)
        filled = torch.zeros(batch, dtype=torch.long, device=x.device)
        return cls(zeros, zeros.clone(), zeros.clone(), x.new_zeros(batch, m, m), filled)

    # For the native kernels (CPU only): the buffers are written in place and never replaced, so their
    # NumPy views, and the masks of the common step, are made once.

    @functools.cached_property
    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """NumPy views of ΔX, ΔF, the step directions and ΔFᵀΔF."""
        return tuple(t.detach().numpy() for t in (self.d_x, self.d_f, self.d_step, self.gram))  # type: ignore[return-value]

    @functools.cached_property
    def all_rows(self) -> torch.Tensor:
        """Every row: the common step's well-conditioned rows before it has a history."""
        return torch.ones(self.d_f.shape[0], dtype=torch.bool)

    def valid_columns(self, k: int) -> np.ndarray:
        """The common step's column mask for history length k (the slots 0..k−1), every row the same:
        one row broadcast to (B, m), without a copy (made once per k)."""
        if k not in self._masks:
            batch, m = self.d_f.shape[:2]
            self._masks[k] = np.broadcast_to(np.arange(m) < k, (batch, m))
        return self._masks[k]

    @functools.cached_property
    def _masks(self) -> dict[int, np.ndarray]:
        return {}

    def coefficients(
        self,
        sel: slice | torch.Tensor,
        f: torch.Tensor,
        usable: torch.Tensor,
        slot: int,
        lam: float,
        cond: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """γ of the rows ``sel`` from their ``usable`` newest columns, and which rows must restart (an
        ill-conditioned problem: γ = 0 there, the plain step)."""
        m = self.d_f.shape[1]
        age = (slot - 1 - torch.arange(m, device=f.device)) % m  # 0 for the newest column
        gamma, well, _ = _solve_gamma(self.d_f[sel], f, age < usable[:, None], lam, cond, raw=self.gram[sel])
        restart = ~well & (usable > 0)
        return torch.where(restart[:, None], torch.zeros_like(gamma), gamma), restart

    def push(
        self, sel: slice | torch.Tensor, slot: int, d_x: torch.Tensor, d_f: torch.Tensor, d_step: torch.Tensor
    ) -> None:
        self.d_x[sel, slot] = d_x
        self.d_step[sel, slot] = d_step
        self.push_f(sel, slot, d_f)

    def push_f(self, sel: slice | torch.Tensor, slot: int, d_f: torch.Tensor) -> torch.Tensor:
        """Write the ΔF column ``d_f`` of the rows ``sel`` at ``slot`` and its row and column of ΔFᵀΔF,
        which it returns (its entry ``slot`` is ‖d_f‖²). On CPU natively, as :func:`_push_row` computes
        it: the common step, leaving the common case, finishes by the general rules on the native state."""
        self.d_f[sel, slot] = d_f
        kernel = _GRAM_COLUMN.get() if _jit.accepts(d_f) else None
        if kernel is not None:
            rows = self.d_f[sel].contiguous()
            new_col = torch.empty(rows.shape[:2], dtype=rows.dtype)
            kernel(rows.numpy(), slot, new_col.numpy())
        else:
            new_col = (self.d_f[sel] @ d_f[:, :, None])[:, :, 0]
        self.gram[sel, slot, :] = new_col
        self.gram[sel, :, slot] = new_col
        return new_col


@dataclass
class _Escapes:
    """Per-row bookkeeping of escape phases: after ``_STALL_LIMIT`` safeguard rejections without the
    residual halving, a row takes plain steps (at least ``_ESCAPE_MIN_STEPS``) until its residual is half
    what it was on entry."""

    active: torch.Tensor  # (B,) bool: in an escape phase
    steps: torch.Tensor  # plain steps taken in the current phase
    entry: torch.Tensor  # ‖f‖ on entering it
    stall: torch.Tensor  # rejections since the residual last halved
    reference: torch.Tensor  # ‖f‖ when it last halved

    @classmethod
    def start(cls, f_norm: torch.Tensor) -> _Escapes:
        counts = torch.zeros(f_norm.shape, dtype=torch.long, device=f_norm.device)
        flags = torch.zeros(f_norm.shape, dtype=torch.bool, device=f_norm.device)
        return cls(flags, counts, torch.zeros_like(f_norm), counts.clone(), f_norm.clone())

    def update(
        self, sel: slice | torch.Tensor, f_norm: torch.Tensor, reject: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Count the step just taken by rows ``sel``; returns the rows that enter and leave a phase."""
        escaping = self.active[sel]
        steps = self.steps[sel] + escaping.long()
        leave = escaping & (steps >= _ESCAPE_MIN_STEPS) & (f_norm <= 0.5 * self.entry[sel])
        progressed = (f_norm <= 0.5 * self.reference[sel]) | leave
        self.reference[sel] = torch.where(progressed, f_norm, self.reference[sel])
        stall = torch.where(progressed, torch.zeros_like(steps), self.stall[sel] + reject.long())
        enter = ~escaping & (stall >= _STALL_LIMIT)
        self.active[sel] = (escaping & ~leave) | enter
        self.steps[sel] = torch.where(enter | leave, torch.zeros_like(steps), steps)
        self.entry[sel] = torch.where(enter, f_norm, self.entry[sel])
        self.stall[sel] = torch.where(enter, torch.zeros_like(stall), stall)
        return enter, leave

    def force(self, rows: torch.Tensor, f_norm: torch.Tensor) -> None:
        """Start an escape phase at ``rows`` now (a perturbed restart away from an unstable point)."""
        self.active[rows] = True
        self.steps[rows] = 0
        self.entry[rows] = f_norm


@dataclass
class AndersonState:
    """What :class:`AndersonSolver` carries from one iteration to the next. Rows are the flattened
    leading axes of ``x0``, shape (B, n); per-row fields have shape (B,)."""

    k: int  # iterations taken (by any row)
    x: torch.Tensor  # current iterates
    g_x: torch.Tensor  # g(x)
    f: torch.Tensor  # g(x) − x
    f_norm: torch.Tensor  # ‖f‖, inf where g(x) is not finite
    target: torch.Tensor  # tol ‖f_0‖
    active: torch.Tensor  # still iterating
    converged: torch.Tensor
    failed: torch.Tensor  # g was not finite at the plain step: frozen at the last finite iterate
    n_iter: torch.Tensor
    n_rejected: torch.Tensor
    n_restarts: torch.Tensor
    differences: _Differences
    escapes: _Escapes
    stability_restarts: torch.Tensor  # perturbed restarts from unstable fixed points
    plain_only: torch.Tensor  # too many of those: plain iteration from now on
    rho: torch.Tensor | None  # estimated spectral radius at a converged row (stability_check)
    residual_norms: list[torch.Tensor]  # ‖f‖ of every row after each iteration
    common: bool = False  # every row active, none escaping or restarting, one shared history length
    native: bool = False  # the state is one the native kernels take (decided once, at init)


class AndersonSolver:
    r"""AA(m) as a solver object in the shape of optimistix's: :meth:`init` builds an
    :class:`AndersonState` from the starting rows, :meth:`step` takes one iteration on every row still
    active, :meth:`terminate` says whether any is left, and :meth:`result` packs the state into a
    :class:`FixedPointResult`. :func:`anderson` validates its arguments and drives this loop; the
    mathematics (least squares, safeguard, escape phases, stability test) is described there.

    Per row, the criterion is ``‖f_k‖ ≤ tol · ‖f_0‖`` or ``‖f_k‖ ≤ 16 ε ‖g(x_k)‖`` (:meth:`converged`).
    """

    def __init__(
        self,
        fmap: _Map,
        *,
        m: int,
        mixing: float,
        regularization: float,
        tol: float,
        safeguard: bool,
        restart_cond: float,
        stability_check: bool,
        max_stability_restarts: int,
        stability_iters: int,
    ) -> None:
        self.fmap, self.m, self.b, self.lam, self.tol = fmap, m, mixing, regularization, tol
        self.safeguard, self.cond = safeguard, restart_cond
        self.stability_check = stability_check
        self.max_stability_restarts, self.stability_iters = max_stability_restarts, stability_iters
        self._pads: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}  # the common padding, by k

    def converged(self, f_norm: torch.Tensor, g_x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The convergence criterion, per row: ‖f‖ ≤ tol ‖f_0‖ (``target``) or at the rounding floor."""
        return (f_norm <= target) | (f_norm <= 16 * torch.finfo(g_x.dtype).eps * _norm(g_x))

    def init(self, x0: torch.Tensor) -> AndersonState:
        """The state at the starting rows x0 (B, n): g(x0) evaluated once (not at all for B = 0)."""
        x = x0.clone(memory_format=torch.contiguous_format)  # the native kernels write the state in place
        # a copy: g may return memory it keeps and overwrites on its next call, and g(x) is updated in place
        g_x = self.fmap(x, torch.arange(x.shape[0], device=x.device), base=x) if x.shape[0] else x
        g_x = g_x.clone(memory_format=torch.contiguous_format)
        f = g_x - x
        f_norm = _norm(f)
        failed = ~torch.isfinite(g_x).all(-1)
        if bool((~failed & ~(torch.isfinite(f_norm) & torch.isfinite(_norm(g_x)))).any()):
            raise ValueError(
                f"x0 is too large for {x.dtype}: the norms of g(x0) - x0 overflow it "
                "(scale the problem or use float64)"
            )
        f_norm = torch.where(failed, torch.full_like(f_norm, math.inf), f_norm)
        target = self.tol * f_norm
        converged = self.converged(f_norm, g_x, target) & ~failed
        counts = torch.zeros(f_norm.shape, dtype=torch.long, device=x.device)
        return AndersonState(
            k=0,
            x=x,
            g_x=g_x,
            f=f,
            f_norm=f_norm,
            target=target,
            # with the stability check, rows converged at x0 take one (null) step so that they are tested
            active=~failed if self.stability_check else ~converged & ~failed,
            converged=converged,
            failed=failed,
            n_iter=counts,
            n_rejected=counts.clone(),
            n_restarts=counts.clone(),
            differences=_Differences.empty(x, self.m),
            escapes=_Escapes.start(f_norm),
            stability_restarts=counts.clone(),
            plain_only=torch.zeros_like(failed),
            rho=torch.full_like(f_norm, math.nan) if self.stability_check else None,
            residual_norms=[f_norm.clone()],
            common=_COMMON_PATH and x.shape[0] > 0 and not bool((converged | failed).any()),
            native=_jit.accepts(x, g_x),
        )

    def terminate(self, state: AndersonState) -> bool:
        """Whether every row has stopped (converged or failed)."""
        return not bool(state.active.any())

    def step(self, state: AndersonState) -> AndersonState:
        """One iteration on every active row (converged rows are frozen); updates ``state`` in place."""
        if state.common:
            self._step_common(state)
            return state
        if self._step_native(state):
            return state
        rows = state.active.nonzero().squeeze(-1)
        # with every row active, slices give views instead of gathered copies
        sel = slice(None) if rows.numel() == state.x.shape[0] else rows
        current = state.x[sel], state.f[sel], state.g_x[sel], state.f_norm[sel]
        plain, x_new, restart, filled = self._propose(state, sel, current)
        g_new = self.fmap(x_new, rows, base=state.x)
        self._finish(state, rows, sel, current, plain, x_new, g_new, restart, filled)
        return state

    def _step_native(self, state: AndersonState) -> bool:
        """The general step (:meth:`_propose`, g, :meth:`_finish`) in three native calls on the whole-batch
        state, where the native kernels apply (else False: nothing done). The same numbers as the tensor
        form; only the stability test of rows that have just converged runs as tensor code."""
        propose = _GENERAL_PROPOSE.get() if state.native else None
        if propose is None:
            return False
        diffs, escapes = state.differences, state.escapes
        fields = (state.x, state.f, state.g_x, state.f_norm)  # the solver's own: contiguous, no gradient
        m, batch = self.m, state.x.shape[0]
        rows = state.active.nonzero().squeeze(-1)
        n_sel = rows.numel()
        slot = state.k % m if m > 0 else 0
        plain = torch.empty(n_sel, state.x.shape[1], dtype=state.x.dtype)
        x_new = torch.empty_like(plain)
        restart = torch.empty(n_sel, dtype=torch.bool)
        used = torch.empty(n_sel, dtype=torch.long)
        d_x, d_f, d_step, gram = diffs.arrays
        x, f, g_x, f_norm = (t.numpy() for t in fields[:4])
        propose(
            rows.numpy(),
            x,
            f,
            g_x,
            state.plain_only.numpy(),
            escapes.active.numpy(),
            diffs.filled.numpy(),
            d_f,
            d_step,
            gram,
            slot,
            float(self.b),
            float(self.lam),
            1.0 / self.cond,
            plain.numpy(),
            x_new.numpy(),
            restart.numpy(),
            used.numpy(),
        )
        g_new = self.fmap(x_new, rows, base=state.x).contiguous()
        f_new = torch.empty_like(plain)
        fn_new = torch.empty(n_sel, dtype=plain.dtype)
        reject = torch.empty(n_sel, dtype=torch.bool)
        check = _GENERAL_CHECK.get()
        assert check is not None
        n_rejected = check(
            rows.numpy(),
            x_new.numpy(),
            g_new.numpy(),
            f_norm,
            used.numpy(),
            bool(self.safeguard),
            f_new.numpy(),
            fn_new.numpy(),
            reject.numpy(),
        )
        rejected = reject.nonzero().squeeze(-1)
        if n_rejected:  # those rows take the plain step instead (one more evaluation)
            g_new = g_new.clone()  # g may return memory it keeps: its next call would overwrite g_new
            g_plain = self.fmap(plain[rejected], rows[rejected], base=state.x).contiguous()
        else:
            g_plain = plain[:0]
        if state.f_norm is state.residual_norms[-1]:  # the common step's norms are in the history
            state.f_norm = state.f_norm.clone()
            f_norm = state.f_norm.numpy()
        done = torch.empty(n_sel, dtype=torch.bool)
        ok = torch.empty(n_sel, dtype=torch.bool)
        finish = _GENERAL_FINISH.get()
        assert finish is not None
        finish(
            rows.numpy(),
            x,
            f,
            g_x,
            f_norm,
            state.target.numpy(),
            x_new.numpy(),
            g_new.numpy(),
            f_new.numpy(),
            fn_new.numpy(),
            reject.numpy(),
            restart.numpy(),
            used.numpy(),
            plain.numpy(),
            g_plain.detach().numpy(),
            rejected.numpy(),
            d_x,
            d_f,
            d_step,
            gram,
            diffs.filled.numpy(),
            slot,
            float(self.b),
            16 * torch.finfo(state.x.dtype).eps,
            state.n_iter.numpy(),
            state.n_rejected.numpy(),
            state.n_restarts.numpy(),
            state.failed.numpy(),
            escapes.active.numpy(),
            escapes.steps.numpy(),
            escapes.entry.numpy(),
            escapes.stall.numpy(),
            escapes.reference.numpy(),
            state.converged.numpy(),
            state.active.numpy(),
            done.numpy(),
            ok.numpy(),
            _STALL_LIMIT,
            _ESCAPE_MIN_STEPS,
        )
        if self.stability_check and bool(done.any()):
            checked = self._leave_unstable(state, rows, done)
            state.converged[rows] = checked
            state.active[rows] = ~checked & ok
        state.residual_norms.append(state.f_norm.clone())
        state.k += 1
        if _COMMON_PATH and n_sel == batch:
            common = _ALL_COMMON.get()
            assert common is not None
            state.common = common(
                state.active.numpy(),
                escapes.active.numpy(),
                state.plain_only.numpy(),
                state.converged.numpy(),
                diffs.filled.numpy(),
                gram,
            )
        return True

    def _propose(
        self,
        state: AndersonState,
        sel: slice | torch.Tensor,
        current: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The plain step, the mixed step x_new, the rows whose history restarts (ill-conditioned) and the
        history length each row's step used, for the rows ``sel``."""
        x, f, g_x, f_norm = current
        m, b, diffs = self.m, self.b, state.differences
        # the plain step x + b f; with b = 1 it is g(x) itself, bit for bit
        plain = x_new = g_x.clone() if b == 1.0 else x + b * f
        restart = torch.zeros_like(f_norm, dtype=torch.bool)
        filled = diffs.filled[sel]
        if m > 0:
            usable = torch.where(state.plain_only[sel] | state.escapes.active[sel], 0, filled)
            gamma, restart = diffs.coefficients(sel, f, usable, state.k % m, self.lam, self.cond)
            filled = torch.where(restart, 0, usable)
            x_new = _mixed(plain, gamma, diffs.d_step[sel])
        return plain, x_new, restart, filled

    def _step_common(self, state: AndersonState) -> None:
        """The iteration while every row is in the common case (all active, one shared history length k,
        no escape, restart or failure): whole buffers instead of gathers, masks and scatters, and one host
        synchronisation. It computes the numbers of the general step, op for op (the tests check it bit
        for bit); when some row leaves the common case, this iteration is finished by the general rules
        and the general step runs until every row is back in it."""
        m, b, diffs = self.m, self.b, state.differences
        k = min(state.k, m)  # every row's history length (the common case restarts only with k = m)
        x, f, g_x, f_norm = state.x, state.f, state.g_x, state.f_norm
        # the plain step; a copy where it becomes the new iterate (x must not share g_x's memory)
        plain = x_new = (g_x if k > 0 else g_x.clone()) if b == 1.0 else x + b * f
        use_row = None
        if k > 0:
            proposed = self._propose_native(diffs, f, plain, k, state.native)
            if proposed is not None:
                x_new, use_row = proposed
            else:
                gamma, use_row = self._common_gamma(diffs, f, k)
                x_new = _mixed(plain, gamma, diffs.d_step)
        g_new = self.fmap(x_new)
        accepted = self._accept_native(state, x_new, g_new, k, use_row)
        if accepted is not None:  # on every row good, the kernel has taken the step's bookkeeping too
            f_new, fn_new, good, every = accepted
        else:
            f_new, fn_new, good = self._accept(state, x_new, g_new, k, use_row)
            every = bool(good.all())
            if every:
                state.g_x.copy_(g_new)  # g may return memory it keeps (or x_new itself)
                state.n_iter += 1
                escapes = state.escapes  # no rejection here: a stall count can only reset
                progressed = fn_new <= 0.5 * escapes.reference
                escapes.reference = torch.where(progressed, fn_new, escapes.reference)
                escapes.stall.masked_fill_(progressed, 0)
        if every:
            state.x, state.f, state.f_norm = x_new, f_new, fn_new
            if m > k:
                diffs.filled.fill_(k + 1)
            state.residual_norms.append(fn_new)
            state.k += 1
            return
        # some row leaves the common case: finish this iteration by the general rules
        state.common = False
        rows = torch.arange(state.x.shape[0], device=x.device)
        if use_row is None:
            restart, filled = torch.zeros_like(good), torch.zeros_like(diffs.filled)
        else:
            restart = ~use_row
            filled = torch.where(restart, 0, torch.full_like(diffs.filled, k))
        current = x, f, g_x, f_norm
        self._finish(
            state,
            rows,
            slice(None),
            current,
            plain,
            x_new,
            g_new,
            restart,
            filled,
            f_new,
            _finite_or_inf(fn_new),
        )

    def _accept(
        self,
        state: AndersonState,
        x_new: torch.Tensor,
        g_new: torch.Tensor,
        k: int,
        use_row: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """After g(x_new) in the common step: f_new, ‖f_new‖, the history columns written at this step's
        slot, and which rows stay in the common case (not converged, finite, accepted by the safeguard,
        well conditioned, a usable new column). :meth:`_accept_native` is its one-call form on CPU."""
        m, b, diffs = self.m, self.b, state.differences
        x, f, g_x, f_norm = state.x, state.f, state.g_x, state.f_norm
        f_new = g_new - x_new
        fn_new = _norm(f_new)
        # the common case: not converged, finite (a norm below inf; a NaN norm fails either test),
        # accepted by the safeguard, well conditioned
        good = ~self.converged(fn_new, g_new, state.target)
        good &= (fn_new <= f_norm) if self.safeguard and k > 0 else (fn_new < math.inf)
        if use_row is not None:
            good &= use_row
        if m > 0:
            slot = state.k % m
            d_f = f_new - f
            # ΔX and the step directions go straight into their ring buffers (ΔF is also needed whole)
            d_x = torch.sub(x_new, x, out=diffs.d_x[:, slot])
            if b == 1.0:
                torch.sub(g_new, g_x, out=diffs.d_step[:, slot])
            else:
                diffs.d_step[:, slot] = d_x + b * d_f
            square = diffs.push_f(slice(None), slot, d_f)[:, slot]
            # the new column must be usable by the next solve: positive, finite norm
            good &= square > 0
            good &= square < math.inf
        return f_new, fn_new, good

    def _accept_native(
        self,
        state: AndersonState,
        x_new: torch.Tensor,
        g_new: torch.Tensor,
        k: int,
        use_row: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool] | None:
        """:meth:`_accept` as one native call (:func:`_accept_rows`), where the native kernels apply; None
        elsewhere. Returns f_new, ‖f_new‖, the rows that stay in the common case and whether all do (the
        kernel has then also updated g(x), the iteration counts and the escape bookkeeping in place)."""
        kernel = _ACCEPT.get() if state.native else None
        if kernel is None:
            return None
        diffs, x, escapes = state.differences, state.x, state.escapes
        # the state's tensors are the solver's own (contiguous, CPU, one dtype, no gradient); g's value is
        # the caller's
        parts = (x, x_new, state.f, state.g_x, g_new.detach().contiguous(), state.f_norm, state.target)
        f_new = torch.empty_like(x_new)
        fn_new = torch.empty_like(state.f_norm)
        good = torch.empty(x.shape[0], dtype=torch.bool)
        well = diffs.all_rows if use_row is None else use_row
        every = kernel(
            *(t.numpy() for t in parts),
            *diffs.arrays,
            state.k % self.m if self.m > 0 else 0,
            float(self.b),
            bool(self.safeguard and k > 0),
            16 * torch.finfo(x.dtype).eps,
            well.numpy(),
            f_new.numpy(),
            fn_new.numpy(),
            good.numpy(),
            state.n_iter.numpy(),
            escapes.reference.numpy(),
            escapes.stall.numpy(),
        )
        return f_new, fn_new, good, every

    def _propose_native(
        self, diffs: _Differences, f: torch.Tensor, plain: torch.Tensor, k: int, state_native: bool
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The common step's x_new and well-conditioned rows as one native call (:func:`_propose_rows`),
        the numbers :meth:`_common_gamma` and :func:`_mixed` give; None where the kernels do not apply."""
        kernel = _PROPOSE.get() if state_native else None
        if kernel is None:
            return None
        batch = f.shape[0]
        x_new = torch.empty_like(plain)
        well = torch.empty(batch, dtype=torch.bool)
        _, d_f, d_step, gram = diffs.arrays
        kernel(
            gram,
            d_f,
            f.numpy(),
            diffs.valid_columns(k),
            float(self.lam),
            1.0 / self.cond,
            plain.numpy(),
            d_step,
            x_new.numpy(),
            np.empty((batch, self.m), dtype=d_f.dtype),
            well.numpy(),
            np.empty(batch, dtype=np.bool_),
        )
        return x_new, well

    def _common_gamma(
        self, diffs: _Differences, f: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """γ of every row from its k newest columns (slots 0..k−1 while k < m) as :func:`_solve_gamma`
        computes it for well-conditioned rows, without its masks; and which rows are well conditioned.
        The tensor form: where the native kernels take the state, :meth:`_propose_native` runs instead."""
        if k not in self._pads:
            # what _solve_gamma adds for k valid columns: unit scale and a unit diagonal (+ λ) for the
            # unused ones, λ on the used ones (nothing once every column is used and λ = 0)
            unused = (torch.arange(self.m, device=f.device) >= k).to(f.dtype)
            pad = torch.diag_embed(self.lam + unused) if k < self.m or self.lam != 0 else None
            self._pads[k] = (unused, pad)
        unused, pad = self._pads[k]
        # the diagonal is a sum of squares (never negative: no clamp needed), positive in the common case
        norms = diffs.gram.diagonal(dim1=-2, dim2=-1).sqrt()
        scale = norms + unused if k < self.m else norms
        rhs = (diffs.d_f @ f[..., None])[..., 0] / scale
        gram = diffs.gram / (scale[..., :, None] * scale[..., None, :])
        chol, info = torch.linalg.cholesky_ex(gram if pad is None else gram + pad)
        gamma = torch.cholesky_solve(rhs[..., None], chol)[..., 0] / scale
        # unused columns have pivot √(1 + λ) ≥ 1: every pivot can be tested; x − x = 0 tests finiteness
        well = chol.diagonal(dim1=-2, dim2=-1).square().amin(-1) >= 1.0 / self.cond
        well &= info == 0
        well &= ((gamma - gamma) == 0).all(-1)
        return torch.where(well[:, None], gamma, 0.0), well

    def _finish(
        self,
        state: AndersonState,
        rows: torch.Tensor,
        sel: slice | torch.Tensor,
        current: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        plain: torch.Tensor,
        x_new: torch.Tensor,
        g_new: torch.Tensor,
        restart: torch.Tensor,
        filled: torch.Tensor,
        f_new: torch.Tensor | None = None,
        fn_new: torch.Tensor | None = None,
    ) -> None:
        """The general rules after g(x_new): the safeguard (plain step where the mixed one is rejected),
        the history, escape phases, convergence and the stability test, for the rows ``sel``."""
        m, b, diffs = self.m, self.b, state.differences
        x, f, g_x, f_norm = current
        if state.f_norm is state.residual_norms[-1]:  # the common step's norms are in the history
            state.f_norm = state.f_norm.clone()
        slot = state.k % m if m > 0 else 0
        if f_new is None or fn_new is None:
            f_new = g_new - x_new
            fn_new = _finite_or_inf(_norm(f_new))
        mixed = filled > 0
        reject = mixed & ~(fn_new <= f_norm) if self.safeguard else mixed & ~torch.isfinite(fn_new)
        if bool(reject.any()):  # those rows take the plain step instead (one more evaluation)
            sub = reject.nonzero().squeeze(-1)
            g_new = g_new.clone()  # g may return memory it keeps: its next call would overwrite g_new
            g_plain = self.fmap(plain[sub], rows[sub], base=state.x)
            x_new[sub], g_new[sub], f_new[sub] = plain[sub], g_plain, g_plain - plain[sub]
            fn_new[sub] = _finite_or_inf(_norm(f_new[sub]))
            filled = torch.where(reject, 0, filled)
            restart = restart | reject
        ok = torch.isfinite(fn_new)
        if m > 0:
            d_x = torch.where(ok[:, None], x_new - x, 0.0)
            d_f = torch.where(ok[:, None], f_new - f, 0.0)
            d_step = torch.where(ok[:, None], g_new - g_x, 0.0) if b == 1.0 else d_x + b * d_f
            diffs.push(sel, slot, d_x, d_f, d_step)
        state.x[sel] = torch.where(ok[:, None], x_new, x)
        state.g_x[sel] = torch.where(ok[:, None], g_new, g_x)
        state.f[sel] = torch.where(ok[:, None], f_new, f)
        f_norm = torch.where(ok, fn_new, f_norm)
        state.f_norm[sel] = f_norm
        state.n_iter[sel] += ok.long()
        state.n_rejected[sel] += reject.long()
        state.failed[sel] = ~ok
        enter, leave = state.escapes.update(sel, f_norm, reject)
        state.n_restarts[sel] += (restart | enter | leave).long()
        if m > 0:
            diffs.filled[sel] = torch.where(enter | leave, 0, torch.clamp(filled + 1, max=m))
        done = self.converged(f_norm, state.g_x[sel], state.target[sel]) & ok
        if self.stability_check and bool(done.any()):
            done = self._leave_unstable(state, rows, done)
        state.converged[sel] = done
        state.active[sel] = ~done & ok
        state.residual_norms.append(state.f_norm.clone())
        state.k += 1
        if _COMMON_PATH and rows.numel() == state.x.shape[0]:
            # back in the common case (e.g. m steps after a rejection: every history full again, every
            # column usable)? Then the common step takes over again.
            common = state.active.all() & ~(state.escapes.active | state.plain_only | state.converged).any()
            if m > 0:
                square = diffs.gram.diagonal(dim1=-2, dim2=-1)
                common &= (diffs.filled == m).all() & ((square > 0) & (square < math.inf)).all()
            state.common = bool(common)

    def _leave_unstable(self, state: AndersonState, rows: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        """Test the rows that have just converged for stability; restart the unstable ones from x* + δ v
        in an escape phase (plain iteration moves away from x*). Returns ``done`` without them."""
        assert state.rho is not None
        drows = rows[done]
        # the last AA differences span the slowest directions: a good start for power iteration
        start = state.differences.d_x[drows].sum(1) if self.m > 0 else state.f[drows]
        noise = _default_start(start)
        start = start / _norm(start).clamp_min(torch.finfo(start.dtype).tiny)[:, None]
        start = start + 1e-3 * noise / _norm(noise)[:, None]
        x_d = state.x[drows]
        jvp = _jvp_operator(
            functools.partial(self.fmap, rows=drows, base=state.x), x_d, state.g_x[drows], "fd"
        )
        rho, v = _power_iteration(jvp, start, self.stability_iters, rtol=1e-3, decide_at=1.0)
        state.rho[drows] = rho
        unstable = rho > 1.0
        if not bool(unstable.any()):
            return done
        urows = drows[unstable]
        state.stability_restarts[urows] += 1
        state.n_restarts[urows] += 1
        state.plain_only[urows] |= state.stability_restarts[urows] > self.max_stability_restarts
        x_u = x_d[unstable]
        x_p = x_u + 1e-2 * _norm(x_u).clamp_min(1.0)[:, None] * v[unstable]
        g_p = self.fmap(x_p, urows, base=state.x)
        state.x[urows], state.g_x[urows], state.f[urows] = x_p, g_p, g_p - x_p
        state.f_norm[urows] = _norm(g_p - x_p)
        state.differences.filled[urows] = 0
        state.escapes.force(urows, state.f_norm[urows])
        done = done.clone()
        done[done.nonzero().squeeze(-1)[unstable]] = False
        return done

    def result(self, state: AndersonState, shape: torch.Size, kind: Kind, max_iter: int) -> FixedPointResult:
        """The state as a :class:`FixedPointResult` for an ``x0`` of ``shape``, in the caller's ``kind``."""
        lead = tuple(shape[:-1])
        batch = state.x.shape[0]
        stable = None if state.rho is None else (state.rho < 1.0) & state.converged
        n_conv, n_fail = int(state.converged.sum()), int(state.failed.sum())
        message = f"{n_conv}/{batch} rows converged"
        if n_fail:
            message += f", {n_fail} failed (non-finite map values)"
        if n_conv + n_fail < batch:
            message += f", {batch - n_conv - n_fail} reached max_iter={max_iter}"
        if stable is not None:
            message += f", {int(stable.sum())} at stable fixed points"

        def rows(t: torch.Tensor) -> ArrayLike:
            return _in_kind(t.reshape(lead), kind)

        history = torch.stack(state.residual_norms)
        return FixedPointResult(
            x=restore(state.x.reshape(shape), kind),
            success=n_conv == batch,
            nit=rows(state.n_iter),
            message=message,
            converged=rows(state.converged),
            g_x=restore(state.g_x.reshape(shape), kind),
            residual_norms=_in_kind(history.reshape(len(history), *lead), kind),
            n_evals=rows(self.fmap.n_evals),
            n_calls=self.fmap.n_calls,
            n_rejected=rows(state.n_rejected),
            n_restarts=rows(state.n_restarts),
            failed=rows(state.failed),
            spectral_radius=None if state.rho is None else rows(state.rho),
            stable=None if stable is None else rows(stable),
        )


def _finite_or_inf(norms: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(norms), norms, torch.full_like(norms, math.inf))


def _in_kind(tensor: torch.Tensor, kind: Kind) -> ArrayLike:
    """A per-row field of a result (bool, int, or float in the compute dtype): NumPy for NumPy callers."""
    return tensor.detach().cpu().numpy() if kind.numpy else tensor


def anderson(
    g: MapFn,
    x0: ArrayLike,
    m: int = 5,
    *,
    mixing: float = 1.0,
    regularization: float = 0.0,
    tol: float = 1e-8,
    max_iter: int = 500,
    safeguard: bool = True,
    restart_cond: float | None = None,
    stability_check: bool = False,
    max_stability_restarts: int = 2,
    stability_iters: int = 30,
    row_subsets: bool = False,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    progress: bool = False,
) -> AndersonResult:
    r"""Find fixed points x = g(x) of a batch of independent problems by Anderson acceleration AA(m).

    Type-II Anderson acceleration (Walker & Ni 2011; papers/theory.md §5). With f_k = g(x_k) − x_k and the
    last m differences ΔF = [f_{k−m+1} − f_{k−m}, …, f_k − f_{k−1}] (ΔX likewise), each row solves

    .. math::

        \gamma_k = \arg\min_\gamma \|f_k - \Delta F \gamma\|_2^2
                   + \lambda \sum_j \|\Delta F_j\|_2^2 \gamma_j^2, \qquad
        x_{k+1} = (x_k - \Delta X \gamma_k) + b\,(f_k - \Delta F \gamma_k).

    **How the least-squares problem is solved.** The columns of ΔF are scaled to unit norm
    (U = ΔF D⁻¹), the m × m normal equations (UᵀU + λ I) c = Uᵀ f_k are solved by a batched
    Cholesky factorisation (``torch.linalg.cholesky_ex``, one per row, no host synchronisation), and
    γ = D⁻¹ c. The Tikhonov term is therefore relative to the data, λ ‖ΔF_j‖² per column, never an
    absolute constant; λ = 0 (the default) is plain AA. Since UᵀU has unit diagonal, its Cholesky
    factor is the R of a QR of U, and R_jj is the sine of the angle between column j and the earlier
    columns. A row whose factorisation fails, whose γ is not finite, or with some R_jj² below
    1 / ``restart_cond`` is ill-conditioned: its history is cleared (restart) and it takes the plain
    step, instead of raising.

    **Cost per iteration.** ΔFᵀΔF is kept up to date one column per step, and the step is taken as
    x_{k+1} = (x_k + b f_k) − (ΔX + b ΔF) γ with the step directions ΔX + b ΔF (ΔG for b = 1) kept
    in their own ring buffer. While every row is in the common case (active, one shared history length,
    no rejection, restart, escape or failure) an iteration works on whole buffers with one host
    synchronisation; from the first iteration where a row departs from it, the general per-row step
    (gathers, masks, scatters) runs until every row is back. Both compute the same numbers, bit for bit.
    The loop is :class:`AndersonSolver`: ``init`` at x0, ``step`` until ``terminate``, then ``result``.

    **Depth convention.** ``m`` counts difference columns, so AA(m) mixes m + 1 iterates and m = 0 is
    plain damped iteration x_{k+1} = x_k + b f_k (Walker & Ni's depth m). Some peers count stored
    iterates instead: torchdeq's ``anderson_solver(m=M)`` mixes M iterates, i.e. ``m = M − 1`` here.
    scipy's ``optimize.anderson(M=M)`` keeps M difference pairs, i.e. ``m = M`` here, although its
    docstring says "previous vectors".

    **Convergence.** Row b has converged once ‖f_k‖ ≤ tol · ‖f_0‖ (relative to its initial
    residual), or ‖f_k‖ ≤ 16 ε ‖g(x_k)‖ (ε the dtype's machine epsilon: the rounding floor, where
    float32 stops). :func:`hopfield_aa.hopfield.iterate`, plain or accelerated, uses the same
    criterion (it runs this solver). A converged row stops: its iterate never changes (it is frozen by
    masking: g still receives it, at its final value, and its new value is discarded; with
    ``row_subsets=True`` g is only evaluated on the rows still active).

    **Safeguard** (``safeguard=True``). A mixed step that uses history is kept only if
    ‖f(x_{k+1})‖ ≤ ‖f(x_k)‖ and g(x_{k+1}) is finite; otherwise that row takes the plain step
    x_{k+1} = x_k + b f_k instead (one more evaluation, counted in ``n_evals`` and ``n_rejected``)
    and its history restarts. Guarantee: every accepted iterate has
    ‖f_{k+1}‖ ≤ max(‖f_k‖, ‖f(x_k + b f_k)‖): never worse than the current residual, unless the
    plain step itself is. If the plain step gives non-finite values, the row is marked ``failed``
    and frozen at its last finite iterate; the other rows are unaffected.

    **Escape phases.** Near a repelling fixed point (a saddle of the Hopfield energy) AA's secant steps
    head towards it and lower the residual, so the safeguard accepts them, while plain steps push away:
    the row stalls. After 3 safeguard rejections without the residual halving, the row enters an escape
    phase of plain steps (at least 5, until its residual is half of what it was on entry), then AA
    resumes with an empty history. Escape steps are plain steps, so the guarantee above still holds.

    **Stability** (``stability_check=True``). AA is a secant root-finder for g(x) − x, so it also
    converges to unstable fixed points (e.g. saddles of the Hopfield energy) that plain iteration
    never reaches. With the check, each row that converges gets a power-iteration estimate of
    ρ(J_g(x*)) (:func:`spectral_radius`, forward differences, ``stability_iters`` steps started from
    the row's last AA differences, each a map evaluation; a row converged at x0 takes one step first
    so that it is tested too). If ρ > 1, the row restarts from
    x* + δ v (v the dominant direction, δ = 10⁻² max(1, ‖x*‖)) in an escape phase; after
    ``max_stability_restarts`` such restarts it continues by plain iteration, which moves away from
    repelling fixed points. (The perturbed restart is the one step exempt from the safeguard
    guarantee.) ``spectral_radius``/``stable`` report the estimate at the final x.

    Parameters
    ----------
    g : callable
        Maps an array of the shape of ``x0`` to an array of the same shape, as in scipy: with a 1-D
        ``x0``, ``lambda x: A @ x + b`` works. Each vector along the last axis is one independent
        problem (row). g receives torch tensors, or NumPy arrays when ``x0`` is a NumPy array.
    x0 : array of shape (n,) or (..., n)
        Starting states; leading dimensions are independent problems.
    m : int, default 5
        Depth (number of difference columns), m ≥ 0.
    mixing : float, default 1.0
        b > 0; b = 1 gives x_{k+1} = g(x_k) − ΔG γ.
    regularization : float, default 0.0
        λ ≥ 0, relative to the data as above.
    tol : float, default 1e-8
        Relative residual tolerance, as defined above.
    max_iter : int, default 500
        Maximum number of iterations (accepted steps) per row.
    safeguard : bool, default True
    restart_cond : float, optional
        Bound on the conditioning of the column-scaled Gram matrix; default 0.01 / ε.
    stability_check : bool, default False
    max_stability_restarts : int, default 2
    stability_iters : int, default 30
    row_subsets : bool, default False
        Opt-in: g receives only the rows still being iterated, as a (b, n) array (b varies), so
        converged rows cost nothing. g must then act on each row alone and accept any number of rows.
    callback : callable, optional
        ``callback(k, x, residual_norms)`` after iteration k with the iterates x (torch, the shape of
        ``x0``) and ‖f‖ (the leading shape of ``x0``).
    progress : bool, default False
        Show a tqdm progress bar.

    Returns
    -------
    FixedPointResult
        ``x``, ``success``, ``nit``, ``message`` as in scipy's ``OptimizeResult``, and per-row fields;
        every array field in the caller's kind: NumPy arrays for a NumPy ``x0``.

    References
    ----------
    H. F. Walker and P. Ni, "Anderson acceleration for fixed-point iterations", SIAM J. Numer. Anal.
    49(4), 2011.

    Examples
    --------
    >>> import torch
    >>> A = torch.tensor([[0.5, 0.2], [0.1, 0.3]], dtype=torch.float64)
    >>> res = anderson(lambda x: x @ A.T + 1.0, torch.zeros(4, 2, dtype=torch.float64), m=2)
    >>> bool(res.converged.all()), int(res.n_iter.max()) <= 4
    (True, True)
    >>> x_star = torch.linalg.solve(torch.eye(2, dtype=torch.float64) - A, torch.ones(2, dtype=torch.float64))
    >>> torch.allclose(res.x[0], x_star)
    True

    As in scipy, a map of one vector just works:

    >>> import numpy as np
    >>> A, b = np.array([[0.5, 0.2], [0.1, 0.3]]), np.ones(2)
    >>> res = anderson(lambda x: A @ x + b, np.zeros(2))
    >>> res.success, np.allclose(res.x, np.linalg.solve(np.eye(2) - A, b))
    (True, True)
    """
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)):
        raise TypeError(f"m must be an integer, got {type(m).__name__}")
    if m < 0:
        raise ValueError(f"m must be >= 0, got {m}")
    m = int(m)
    b = check_scalar(mixing, "mixing", positive=True)
    if math.isinf(b):
        raise ValueError("mixing must be finite, got inf")
    lam = check_scalar(regularization, "regularization", minimum=0.0)
    rtol = check_scalar(tol, "tol", minimum=0.0)
    for name, value in (("max_iter", max_iter), ("stability_iters", stability_iters)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(max_stability_restarts, bool) or not isinstance(max_stability_restarts, int):
        raise TypeError("max_stability_restarts must be an integer")
    if max_stability_restarts < 0:
        raise ValueError(f"max_stability_restarts must be >= 0, got {max_stability_restarts}")
    x0_t, kind = as_tensor(x0, "x0", min_ndim=1)
    if x0_t.shape[-1] == 0:
        raise ValueError(f"x0 must have a non-empty last dimension, got shape {tuple(x0_t.shape)}")
    if not isinstance(row_subsets, bool):
        raise TypeError(f"row_subsets must be a bool, got {type(row_subsets).__name__}")
    cond = (
        _default_restart_cond(x0_t.dtype)
        if restart_cond is None
        else check_scalar(restart_cond, "restart_cond", positive=True)
    )
    fmap = _Map(g, kind, tuple(x0_t.shape), x0_t.device, row_subsets)
    solver = AndersonSolver(
        fmap,
        m=m,
        mixing=b,
        regularization=lam,
        tol=rtol,
        safeguard=safeguard,
        restart_cond=cond,
        stability_check=stability_check,
        max_stability_restarts=max_stability_restarts,
        stability_iters=stability_iters,
    )
    state = solver.init(x0_t.reshape(-1, x0_t.shape[-1]))
    bar = tqdm(total=max_iter, desc="anderson", leave=False) if progress else None
    for k in range(max_iter):
        if solver.terminate(state):
            break
        solver.step(state)
        if callback is not None:
            callback(k, state.x.reshape(x0_t.shape), state.f_norm.reshape(x0_t.shape[:-1]))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(active=int(state.active.sum()))
    if bar is not None:
        bar.close()
    return solver.result(state, x0_t.shape, kind, max_iter)
