"""The public normalisers of papers/theory.md §1 (softmax, sparsemax, 1.5-entmax, α-entmax for any α ≥ 1),
their thresholds, Jacobians, Jacobian-vector products and conjugates, with the autograd functions
whose backward is the closed-form Jacobian product; and the unvalidated tensor kernels other layers call.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from hopfield_aa._arrays import ArrayLike, as_tensor, check_alpha, check_dim, restore, result_kind
from hopfield_aa.normalizers import blocked, native
from hopfield_aa.normalizers.blocked import HALF

# Below this |α − 1| the α-derivative uses its limit at α = 1 (the closed form cancels two
# O(1/(α−1)²) terms; in float64 both errors are about this size at the switch).
_ALPHA_GRAD_LIMIT = 5e-6


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


def _weight_shares(
    probs: torch.Tensor, alpha: float | torch.Tensor, dim: int, s: torch.Tensor | None = None
) -> torch.Tensor:
    """s̃ = s/Σs of the Jacobian weights, finite where s overflows.

    For α ≤ 2 every weight is at most 1 and s/Σs is used (``s`` if given). For α > 2, s = p^{2−α}
    spans many decades (p = 0.03, α = 10: s = 1e12) and overflows float32 for p < 2e-5, so s̃ is the
    softmax of log s = (2−α) log p over the support.
    """
    if not _large_alpha(alpha):
        if s is None:
            s = jacobian_weights(probs, alpha)
        return s / s.sum(dim, keepdim=True)
    a = alpha.to(probs.dtype) if isinstance(alpha, torch.Tensor) else alpha
    support = probs > 0
    log_s = torch.where(support, torch.where(support, probs, 1.0).log() * (2.0 - a), -math.inf)
    return torch.softmax(log_s, dim)


def _large_alpha(alpha: float | torch.Tensor) -> bool:
    """Whether some α > 2, where the Jacobian weights p^{2−α} exceed 1 and can overflow."""
    return bool((alpha > 2.0).any()) if isinstance(alpha, torch.Tensor) else alpha > 2.0


def _jvp_tensor(
    probs: torch.Tensor,
    vector: torch.Tensor,
    alpha: float | torch.Tensor,
    dim: int,
    s: torch.Tensor | None = None,
) -> torch.Tensor:
    """J v with J = diag(s) − s sᵀ/Σs, s = p^{2−α} on the support (s = p for softmax; ``s`` if given).

    It is computed as ``s ⊙ (v − ⟨s̃, v⟩)`` with the shares s̃ = s/Σs (for α > 2 the overflow-free ones,
    :func:`_weight_shares`), and for α > 2 the entry of a dominant weight (s̃ > 1/2), whose own formula
    multiplies a huge s by a difference that cancels: there it is minus the sum of the other entries,
    since the columns of J sum to 0 (J maps onto the tangent space of the simplex).
    """
    if s is None:
        s = jacobian_weights(probs, alpha)
    if not _large_alpha(alpha):
        # s ⊙ (v − ⟨s/Σs, v⟩): no product s_i v_i that could overflow where s and v are both large
        shares = s / s.sum(dim, keepdim=True)
        return s * (vector - (shares * vector).sum(dim, keepdim=True))
    shares = _weight_shares(probs, alpha, dim)
    jv = torch.where(probs > 0, s * (vector - (shares * vector).sum(dim, keepdim=True)), 0.0)
    dominant = shares > 0.5
    return torch.where(dominant, 0.0 - torch.where(dominant, 0.0, jv).sum(dim, keepdim=True), jv)


def _dense_jacobian(probs: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """J = diag(s) − s sᵀ/Σs of rows ``probs`` (normalised axis last), shape (..., N, N).

    The off-diagonal entries are −s_j s_k/Σs (for α > 2 formed as −min(s_j, s_k)·max(s̃_j, s̃_k), each
    factor finite where one weight overflows) and the diagonal is minus the sum of its row's
    off-diagonal entries, so rows of J sum to 0 to the rounding of that sum: the direct diagonal
    s_j − s_j²/Σs cancels when s_j dominates Σs (for softmax in float32, p_j = 0.99 leaves an error of
    about ε relative to entries of size 0.01).
    """
    s = jacobian_weights(probs, alpha)
    # 0 − x rather than −x: entries off the support are +0, as in the direct formula
    if not _large_alpha(alpha):
        off = 0.0 - s.unsqueeze(-1) * s.unsqueeze(-2) / s.sum(-1, keepdim=True).unsqueeze(-1)  # symmetric
    else:
        shares = _weight_shares(probs, alpha, -1)
        off = 0.0 - torch.minimum(s.unsqueeze(-1), s.unsqueeze(-2)) * torch.maximum(
            shares.unsqueeze(-1), shares.unsqueeze(-2)
        )
    off.diagonal(dim1=-2, dim2=-1).zero_()
    return off - torch.diag_embed(off.sum(-1))


class _EntmaxFunction(torch.autograd.Function):
    """α-entmax whose backward is the closed-form Jacobian product (no differentiation of the solver)."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, alpha: float, dim: int) -> torch.Tensor:
        probs = blocked.forward(scores, alpha, dim)[0]
        ctx.alpha = alpha
        ctx.dim = dim
        ctx.save_for_backward(probs)
        return probs

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        (probs,) = ctx.saved_tensors
        p = probs.float() if probs.dtype in HALF else probs
        g = grad_output.to(p.dtype)
        grad = _jvp_tensor(p, g, ctx.alpha, ctx.dim).to(grad_output.dtype)
        return grad, None, None


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
    s_tilde = _weight_shares(p, a, dim, s)
    near = eps < _ALPHA_GRAD_LIMIT
    e = torch.where(near, 1.0, eps)
    general = (p - s_tilde) / (e * e) - (plogp - s_tilde * ent) / e
    limit = p * ((plogp * logp).sum(dim, keepdim=True) - logp * logp) / 2
    return torch.where(near, limit, general)


class _EntmaxAlphaFunction(torch.autograd.Function):
    """α-entmax with α per row; the backward returns ∂/∂z (Jacobian product) and ∂/∂α (closed form)."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, alpha: torch.Tensor, dim: int) -> torch.Tensor:
        probs = blocked.forward_alpha(scores, alpha, dim)[0]
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
            grad_z = _jvp_tensor(p, g, a_w, dim, s).to(grad_output.dtype)
        if ctx.needs_input_grad[1]:
            dp = _entmax_alpha_derivative(p, a_w, dim, s)
            grad_a = (g * dp).sum(dim, keepdim=True).to(alpha.dtype)
        return grad_z, grad_a, None


def alpha_argument(alpha: object, scores: torch.Tensor, dim: int) -> float | torch.Tensor:
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
    if native.softmax_applies(scores, dim):  # short rows on CPU: torch's softmax is slow there
        return native.softmax(scores, dim)
    if scores.dtype in HALF:
        return torch.softmax(scores.float(), dim).to(scores.dtype)
    return torch.softmax(scores, dim)


def entmax_tensor(scores: torch.Tensor, alpha: float | torch.Tensor, dim: int = -1) -> torch.Tensor:
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
        return blocked.forward_alpha(scores, alpha, dim)[0].to(scores.dtype)
    if alpha == 1.0:
        return _softmax_tensor(scores, dim)
    if scores.requires_grad and torch.is_grad_enabled():
        out: torch.Tensor = _EntmaxFunction.apply(scores, alpha, dim)
        return out
    return blocked.probs(scores, alpha, dim)


def lambda_tensor(
    scores: torch.Tensor, alpha: float | torch.Tensor, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, λ) in the compute dtype, λ in score units: logsumexp for α = 1 (rows)."""
    z = scores.float() if scores.dtype in HALF else scores
    if isinstance(alpha, torch.Tensor):
        with torch.no_grad():
            return blocked.forward_alpha(z, alpha, dim)
    if alpha == 1.0:
        return blocked.softmax_rows(z, dim)
    with torch.no_grad():
        return blocked.forward(z, alpha, dim)


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------


def _validated(scores: object, alpha: object, dim: object) -> tuple[torch.Tensor, Any, Any, int]:
    z, kind = as_tensor(scores, "scores", allow_neg_inf=True, min_ndim=1)
    d = check_dim(z, dim, "scores")
    a = alpha_argument(alpha, z, d)
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
    return restore(entmax_tensor(z, a, d), kind)


def softmax(scores: ArrayLike, dim: int = -1) -> ArrayLike:
    r"""Softmax ``p_i = exp(z_i) / Σ_j exp(z_j)``: :func:`entmax` at α = 1.

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
    >>> import numpy as np
    >>> softmax(np.zeros(2))
    array([0.5, 0.5])
    """
    return entmax(scores, 1.0, dim)


def sparsemax(scores: ArrayLike, dim: int = -1) -> ArrayLike:
    r"""Sparsemax, the Euclidean projection ``argmin_{p∈Δ} ‖p − z‖² = [z − τ]_+`` onto the simplex:
    :func:`entmax` at α = 2, with the arguments and result of :func:`softmax`.

    Scores more than 1 below the row maximum get probability exactly 0.

    >>> import torch
    >>> sparsemax(torch.tensor([0.5, 0.0, -2.0]))
    tensor([0.7500, 0.2500, 0.0000])
    """
    return entmax(scores, 2.0, dim)


def entmax15(scores: ArrayLike, dim: int = -1) -> ArrayLike:
    r"""1.5-entmax ``p_i = [z_i/2 − τ]_+²`` with Σ p = 1 and τ exact: :func:`entmax` at α = 1.5, with the
    arguments and result of :func:`softmax`.

    Scores more than 2 below the row maximum get probability exactly 0; one row per line here:

    >>> import numpy as np
    >>> entmax15(np.array([[3.0, 0.0], [0.0, 0.0]]))
    array([[1. , 0. ],
           [0.5, 0.5]])
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
    _, lam = lambda_tensor(z, a, d)
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
        p = entmax_tensor(z, a, d) if z.dtype not in HALF else entmax_tensor(z.float(), a, d)
    jac = _dense_jacobian(p.movedim(d, -1), a.detach().movedim(d, -1) if isinstance(a, torch.Tensor) else a)
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
    a = alpha_argument(alpha, p, d)
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
    scores: torch.Tensor, probs: torch.Tensor, lam: torch.Tensor, alpha: float | torch.Tensor, dim: int
) -> torch.Tensor:
    """Ψ*_α (keepdim) from p = entmax_α(z) and λ, for one α or one α per row (a tensor α).

    α = 1: λ = logsumexp(z). 1 < α ≤ 2: Σ p^α/α + τ/(α−1) + 1/(α(α−1)) with τ = (α−1)λ − 1, rearranged to
    avoid the cancellation of two O(1/(α−1)) terms: λ + (Σ p^α − 1)/α. α > 2: ⟨p, z⟩ − Ω_α(p) directly,
    since the threshold form needs p_i = y_i^{1/(α−1)} for every i, which entries at the edge of the
    support do not resolve (:func:`.newton.fill_support_edge`).
    """
    if isinstance(alpha, torch.Tensor):
        a = alpha.detach().to(probs.dtype)
    else:
        a = torch.tensor(alpha, dtype=probs.dtype, device=probs.device)
    z = scores.float() if scores.dtype in HALF else scores
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


class _ConjugateFunction(torch.autograd.Function):
    """Ψ*_α: gradient entmax_α(z) in z (Danskin: the saved probabilities) and, for a tensor α,
    −∂Ω_α(p)/∂α in α."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, alpha: float | torch.Tensor, dim: int) -> torch.Tensor:
        probs, lam = lambda_tensor(scores, alpha, dim)
        ctx.dim = dim
        ctx.save_for_backward(probs, *([alpha] if isinstance(alpha, torch.Tensor) else []))
        return _conjugate_value(scores, probs, lam, alpha, dim).squeeze(dim).to(scores.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        probs, *alpha = ctx.saved_tensors
        g = grad_output.unsqueeze(ctx.dim)
        grad_a = None
        if ctx.needs_input_grad[1]:
            (a,) = alpha
            grad_a = (g.double() * _conjugate_alpha_derivative(probs, a.detach(), ctx.dim)).to(a.dtype)
        return (g * probs).to(grad_output.dtype), grad_a, None


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
    value: torch.Tensor = _ConjugateFunction.apply(z, a, d)
    return restore(value, kind)
