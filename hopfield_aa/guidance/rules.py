"""The guidance rules the attention processors apply, and the registry that names them.

A rule is a plain function of one attention call's retrievals (dense first) and a scale; a new rule is
one such function plus one :func:`register_rule` call, and every processor, the evaluation and the
benchmark pick it up by name.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from hopfield_aa import _jit
from hopfield_aa._arrays import check_alpha, check_scalar
from hopfield_aa.geometry import _extrapolate, _gag, _ladder_extrapolate

RuleFunction = Callable[..., torch.Tensor]
"""``function(retrievals, scale, **options) -> tensor``: ``retrievals[i]`` is the attention output
``entmax_{α_i}(β Q Kᵀ) V`` for the rule's α ladder (α_0 = 1, the dense softmax retrieval), each of
shape (..., d); the result has the same shape."""


@dataclass(frozen=True)
class Rule:
    """A registered guidance rule.

    Attributes
    ----------
    name : str
        The registry key (``enable_gag(pipe, rule=name)``).
    function : callable
        ``function(retrievals, scale, **options)``; its keyword-only parameters are the rule's options.
    alphas : tuple of float
        The default α ladder, dense first (``alphas[0] == 1``).
    scale : float
        The default guidance scale λ.
    rungs : int or None
        How many retrievals the rule takes (None: any number ≥ 2).
    check : callable or None
        ``check(options)`` raises ``ValueError`` on an invalid option value.
    options : dict
        The option names and their defaults, read from ``function``'s signature.
    """

    name: str
    function: RuleFunction
    alphas: tuple[float, ...]
    scale: float
    rungs: int | None = 2
    check: Callable[[Mapping[str, Any]], None] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def description(self) -> str:
        """The first line of the rule function's docstring."""
        return (inspect.getdoc(self.function) or self.name).splitlines()[0]


RULES: dict[str, Rule] = {}
"""The registry: rule name -> :class:`Rule`."""


def register_rule(
    name: str,
    function: RuleFunction,
    *,
    alphas: Sequence[float],
    scale: float,
    rungs: int | None = 2,
    check: Callable[[Mapping[str, Any]], None] | None = None,
    overwrite: bool = False,
) -> Rule:
    """Add a guidance rule to :data:`RULES` under ``name``.

    Parameters
    ----------
    name : str
        Registry key.
    function : callable
        ``function(retrievals, scale, *, option=default, ...) -> tensor``. Keyword-only parameters are the
        rule's options; every one needs a default.
    alphas : sequence of float
        Default α ladder, starting at 1 (the dense retrieval), strictly increasing.
    scale : float
        Default guidance scale λ.
    rungs : int or None, default 2
        Number of retrievals the rule takes; None for any number ≥ 2 (a ladder).
    check : callable, optional
        Validates option values, raising ``ValueError`` naming the option.
    overwrite : bool, default False
        Replace an existing rule of the same name instead of raising.

    Returns
    -------
    Rule

    Examples
    --------
    >>> import torch
    >>> def halfway(retrievals, scale):
    ...     "Midpoint of dense and sparse, then scaled extrapolation."
    ...     dense, sparse = retrievals
    ...     return dense + scale * 0.5 * (sparse - dense)
    >>> rule = register_rule("halfway", halfway, alphas=(1.0, 1.5), scale=2.0)
    >>> rule.options
    {}
    >>> _ = RULES.pop("halfway")
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty string, got {name!r}")
    if name in RULES and not overwrite:
        raise ValueError(f"a rule named {name!r} is already registered (pass overwrite=True to replace it)")
    if not callable(function):
        raise TypeError(f"function must be callable, got {type(function).__name__}")
    options: dict[str, Any] = {}
    for parameter in list(inspect.signature(function).parameters.values())[2:]:
        if (
            parameter.kind is not inspect.Parameter.KEYWORD_ONLY
            or parameter.default is inspect.Parameter.empty
        ):
            raise TypeError(
                f"rule {name!r}: after (retrievals, scale) every parameter must be keyword-only with a "
                f"default, got {parameter.name!r}"
            )
        options[parameter.name] = parameter.default
    ladder = check_ladder(alphas, rungs, name="alphas")
    rule = Rule(
        name=name,
        function=function,
        alphas=ladder,
        scale=check_scalar(scale, "scale"),
        rungs=rungs,
        check=check,
        options=options,
    )
    RULES[name] = rule
    return rule


def get_rule(name: str) -> Rule:
    """The registered rule ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return RULES[name]
    except (KeyError, TypeError):
        raise ValueError(f"rule must be one of {sorted(RULES)}, got {name!r}") from None


def check_ladder(alphas: Sequence[float], rungs: int | None, *, name: str = "alphas") -> tuple[float, ...]:
    """Validate an α ladder: starts at 1, strictly increasing, each α ≥ 1 finite, ``rungs`` long if set."""
    if isinstance(alphas, (str, bytes)) or not isinstance(alphas, Sequence):
        raise TypeError(f"{name} must be a sequence of numbers, got {type(alphas).__name__}")
    ladder = tuple(check_alpha(a) for a in alphas)
    if len(ladder) < 2 or (rungs is not None and len(ladder) != rungs):
        expected = "at least 2" if rungs is None else str(rungs)
        raise ValueError(f"{name} must hold {expected} values, got {len(ladder)}")
    if ladder[0] != 1.0:
        raise ValueError(f"{name} must start at 1 (the dense retrieval), got {ladder[0]}")
    if any(b <= a for a, b in itertools.pairwise(ladder)):
        raise ValueError(f"{name} must be strictly increasing, got {ladder}")
    return ladder


# --------------------------------------------------------------------------------------------------
# the rules


def gag_rule(
    retrievals: Sequence[torch.Tensor],
    scale: float,
    *,
    zeta: float = 0.0,
    eta: float = math.inf,
    reference: str = "sparse",
) -> torch.Tensor:
    r"""GAG: :math:`G = S + \lambda(\mathrm{clip}_\eta(r_\parallel) + \zeta r_\perp)`, r = S - D.

    Geometry-Aware Attention Guidance, with ``r`` split relative to the reference ``u`` (the sparse
    retrieval ``S`` by default, or the dense one ``D``), per head and query token (papers/theory.md §8).
    ζ = 0, η = ∞ is the parallel-only rule; ζ = 1, η = ∞ the full residual (``= P_{λ+1}``); ζ = 1, η = 0
    keeps only the orthogonal part.
    """
    dense, sparse = retrievals
    if zeta == 0.0 and eta == math.inf and reference == "sparse":
        return gag_parallel(dense, sparse, scale)
    return _gag(dense, sparse, scale, zeta, eta, reference)


# A reference of norm at most this multiple of eps · |r|_∞ has no parallel part (geometry._ZERO_FACTOR).
_ZERO_FACTOR = 16.0


def gag_parallel(dense: torch.Tensor, sparse: torch.Tensor, scale: float) -> torch.Tensor:
    r"""GAG with its default options (ζ = 0, η = ∞, reference S) in a handful of dispatches.

    :math:`G = S + \lambda\, c\, S` with :math:`c = \langle r, S\rangle / \lVert S\rVert^2`, r = S - D:
    the parallel part of the residual along the sparse retrieval is a multiple of S itself, so the rule
    is one coefficient per head and query token. Equal to ``geometry.gag(dense, sparse, scale)`` up to
    float rounding, with its convention that a reference of negligible norm
    (``‖S‖ ≤ 16 eps max(|S|_∞, |r|_∞)``) has no parallel part; without ``geometry``'s rescaling by
    ``|S|_∞``, so for retrievals whose squared norm over- or underflows (``|S| ≳ 1e19`` in float32; never
    an attention output of a working model) it is not the same. On CPU (the native kernel) a 4-d result
    lies in memory as the stock attention's output does, so that merging its heads copies nothing
    (:func:`_gag_parallel_native`).
    """
    if dense.shape == sparse.shape and _jit.accepts(dense, sparse):
        return _gag_parallel_native(dense, sparse, scale)
    residual = sparse - dense
    along = torch.linalg.vecdot(residual, sparse).unsqueeze_(-1)
    norm_sq = torch.linalg.vecdot(sparse, sparse).unsqueeze_(-1)
    # ‖S‖ ≥ |S|_∞, so the |S|_∞ term of the convention only matters for S = 0, where ‖S‖² = 0 anyway
    # |r|_∞ by abs then amax: torch.linalg.vector_norm(ord=inf) avoids the |r| temporary but is 4-13×
    # slower on CPU (measured, one thread, at attention output shapes)
    floor = residual.abs().amax(-1, keepdim=True).mul_(_ZERO_FACTOR * torch.finfo(sparse.dtype).eps).square_()
    coefficient = along.div_(norm_sq).masked_fill_(norm_sq <= floor, 0.0)
    return torch.addcmul(sparse, coefficient, sparse, value=scale)


def _gag_parallel_rows(
    dense: Any, sparse: Any, out: Any, scale: float, zero_factor: float, heads: int, queries: int
) -> None:  # pragma: no cover - compiled by numba
    """:func:`gag_parallel` on rows (R, d): one pass for ⟨r, S⟩, ‖S‖² and |r|_∞ in the input dtype (as
    the tensor form sums them; reordered, so vectorised), one for the output. The rows of ``dense`` and
    ``sparse`` are (batch, heads, queries) in that order; ``out``'s are (batch, queries, heads) (``heads``
    = 1: the same order).

    |r|_∞ is the integer maximum of the bits of |r| as float64 (ordered as the values are, for values
    ≥ 0), which vectorises where a floating-point maximum does not (measured, 4096 rows of 16: 48 → 16
    µs); a NaN in r gives a NaN bound and, through ⟨r, S⟩, a NaN row, as before."""
    typed = np.empty(4, sparse.dtype)  # constants in the input dtype (a float literal is float64)
    typed[0] = 0.0
    typed[1] = scale
    typed[2] = zero_factor
    zero, lam, factor = typed[0], typed[1], typed[2]
    for block in range(dense.shape[0] // queries):  # a (batch, head): where its rows go in ``out``
        batch, head = divmod(block, heads)
        target = batch * queries * heads + head
        for row in range(block * queries, (block + 1) * queries):
            along = zero
            norm_sq = zero
            top = np.int64(0)
            for j in range(dense.shape[1]):
                s = sparse[row, j]
                r = s - dense[row, j]
                along += r * s
                norm_sq += s * s
                top = max(top, np.float64(abs(r)).view(np.int64))
            typed[3] = np.int64(top).view(np.float64)  # exact in the input dtype: it is one of the |r|
            floor = typed[3] * factor
            c = lam * (along / norm_sq) if not norm_sq <= floor * floor else zero
            for j in range(dense.shape[1]):
                out[target, j] = sparse[row, j] + c * sparse[row, j]
            target += heads


_GAG_PARALLEL = _jit.Kernel(_gag_parallel_rows, reassociate=True)


def _gag_parallel_native(dense: torch.Tensor, sparse: torch.Tensor, scale: float) -> torch.Tensor:
    """The kernel on rows; a 4-d (batch, heads, queries, d) result is laid out in memory as
    (batch, queries, heads, d), as ``F.scaled_dot_product_attention``'s output on CPU, so that the
    processor's merge of the heads is a view rather than a copy (measured, (16, 4, 64, 16) float32: the
    copy is 26 µs, against 38 µs for the rule)."""
    kernel = _GAG_PARALLEL.get()
    assert kernel is not None
    d, s = dense.detach().contiguous(), sparse.detach().contiguous()
    n = s.shape[-1]
    if s.ndim == 4:
        batch, heads, queries, _ = s.shape
        out = s.new_empty((batch, queries, heads, n))
    else:
        heads, queries = 1, max(1, s.numel() // n)
        out = torch.empty_like(s)
    kernel(
        d.numpy().reshape(-1, n),
        s.numpy().reshape(-1, n),
        out.numpy().reshape(-1, n),
        float(scale),
        _ZERO_FACTOR * torch.finfo(s.dtype).eps,
        heads,
        queries,
    )
    return out.transpose(1, 2) if s.ndim == 4 else out


def _check_gag(options: Mapping[str, Any]) -> None:
    zeta = check_scalar(options["zeta"], "zeta", minimum=0.0)
    if zeta > 1.0:
        raise ValueError(f"zeta must lie in [0, 1] (it damps the orthogonal part of r), got {zeta}")
    check_scalar(options["eta"], "eta", minimum=0.0)
    if options["reference"] not in ("sparse", "dense"):
        # "update" (S(ξ) - ξ) needs the state in the value space, which cross-attention does not have.
        raise ValueError(
            f"reference must be 'sparse' or 'dense' in attention layers, got {options['reference']!r}"
        )


def extrapolate_rule(retrievals: Sequence[torch.Tensor], scale: float) -> torch.Tensor:
    r"""Sparse-vs-dense extrapolation (PLADIS-style): :math:`P_\lambda = D + \lambda (S - D)`.

    λ = 0 is the stock dense attention, λ = 1 the sparse one; λ > 1 extrapolates (a depth-1 Anderson
    step with γ = 1 - λ, papers/theory.md §5).
    """
    dense, sparse = retrievals
    return _extrapolate(dense, sparse, scale)


def ladder_rule(
    retrievals: Sequence[torch.Tensor], scale: float, *, regularization: float = 0.0
) -> torch.Tensor:
    r"""Anderson-mixed α-ladder: :math:`L_\lambda = D + \lambda (A - D)`, A the AA step over the rungs.

    The retrievals at α_0 = 1 < α_1 < … < α_m are read as successive iterates of a sparsifying map; the
    least-squares Anderson step over them (depth m - 1, per head and query token) estimates the ladder's
    limit ``A`` (papers/theory.md §12). Two rungs reduce to :func:`extrapolate_rule`.

    Conditioning: when the rungs are nearly collinear the least-squares coefficients are large (γ ≈ 10 is
    common on short text rows) and the rule amplifies rounding in its inputs. Masking text tokens instead of
    deleting them moves the dense retrieval by one float32 ulp, and the unregularised rule turns that into a
    change of 0.3 % of the guidance effect on a tiny UNet (with the native CPU kernels, whose least squares
    run in float64; 4 % with the float32 tensor forms)
    (``tests/test_guidance_robust.py``); ``regularization=1e-2`` (Tikhonov, relative to the column norms, as
    in regularised nonlinear acceleration) brings it below 10⁻⁴ of the effect, at the price of a
    shorter extrapolation. The default stays 0, the unregularised AA(m) of the theory.
    """
    return _ladder_extrapolate(retrievals, scale, regularization)


def _check_ladder(options: Mapping[str, Any]) -> None:
    check_scalar(options["regularization"], "regularization", minimum=0.0)


class RowRule(NamedTuple):
    """A configured rule as the fused kernel computes it (:func:`.fused.guided`): ``name`` "gag" or
    "extrapolate", its scale λ, and GAG's options (ζ, η, and whether the reference is D)."""

    name: str
    scale: float
    zeta: float = 0.0
    eta: float = math.inf
    dense_reference: bool = False


def row_rule(
    function: Callable[..., torch.Tensor], scale: float, options: Mapping[str, Any]
) -> RowRule | None:
    """The row form of a configured rule, which the fused kernel computes itself: GAG with any options
    (reference S or D) and extrapolation; None for any other rule (it is then called on the
    retrievals)."""
    if function is gag_rule:
        reference = options.get("reference", "sparse")
        return RowRule(
            "gag",
            float(scale),
            float(options.get("zeta", 0.0)),
            float(options.get("eta", math.inf)),
            reference == "dense",
        )
    if function is extrapolate_rule and not options:
        return RowRule("extrapolate", float(scale))
    return None


register_rule("gag", gag_rule, alphas=(1.0, 1.5), scale=1.0, check=_check_gag)
register_rule("extrapolate", extrapolate_rule, alphas=(1.0, 1.5), scale=2.0)
register_rule("ladder", ladder_rule, alphas=(1.0, 1.25, 1.5, 2.0), scale=2.0, rungs=None, check=_check_ladder)
