"""Symbolic derivations (sympy) of the identities behind the theory (papers/theory.md §1–8 and §12), each
returning the simplified difference between what is derived and the formula under test, so a test can
assert it is zero.

Every derivation takes the formula it checks as a parameter (default: the formula the library computes).
Passing a wrong formula makes the residual non-zero, which is how the tests show the derivations are real.
The dimensions are small and fixed (d = 2 or 3, N = 2 or 3): the identities are algebraic, and an identity
in generic symbols for a small d holds coordinate-wise for every d.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import NamedTuple, Union

import sympy as sp

__all__ = [
    "DERIVATIONS",
    "Derivation",
    "aa1_extrapolation",
    "aa1_least_squares_gamma",
    "bounded_update",
    "conjugate_gradient_is_entmax",
    "decomposition_identities",
    "derive_all",
    "divergence_at_dense_fixed_point",
    "energy_descent_margin",
    "energy_gradient_softmax",
    "energy_gradient_sparsemax",
    "entmax_jacobian",
    "fixed_point_preservation",
    "retrieval_jacobian",
    "softmax_jacobian",
]

Residual = Union[sp.Expr, sp.MatrixBase]


@dataclass(frozen=True)
class Derivation:
    """The outcome of one symbolic derivation.

    Attributes
    ----------
    claim : str
        What was derived, in one line.
    residuals : dict of str to sympy expression or matrix
        For each step, the simplified difference between the derived quantity and the formula under
        test. The derivation holds when every residual is exactly zero.
    """

    claim: str
    residuals: Mapping[str, Residual]

    @property
    def holds(self) -> bool:
        """True when every residual simplifies to exactly zero."""
        return all(_is_zero(value) for value in self.residuals.values())

    def failing(self) -> list[str]:
        """Names of the steps whose residual is not zero."""
        return [name for name, value in self.residuals.items() if not _is_zero(value)]


# --------------------------------------------------------------------------------------------------
# helpers


def _is_zero(value: Residual) -> bool:
    if isinstance(value, sp.MatrixBase):
        return all(sp.sympify(entry) == 0 for entry in value)
    return sp.sympify(value) == 0


def _simplify(value: Residual) -> Residual:
    """Simplify an expression or each entry of a matrix; powers of positive symbols are combined first."""

    def one(expr: sp.Expr) -> sp.Expr:
        expr = sp.powdenest(sp.powsimp(sp.sympify(expr), force=True), force=True)
        rational = sp.cancel(sp.together(expr))  # decides identities between rational functions quickly
        if rational == 0 or rational.is_rational_function():
            return rational
        return sp.simplify(rational)

    if isinstance(value, sp.MatrixBase):
        return value.applyfunc(one)
    return one(value)


def _vector(name: str, dim: int, **assumptions: bool) -> sp.Matrix:
    return sp.Matrix(sp.symbols(f"{name}0:{dim}", **assumptions))


def _dot(a: sp.Matrix, b: sp.Matrix) -> sp.Expr:
    return (a.T * b)[0, 0]


def _sq(a: sp.Matrix) -> sp.Expr:
    return _dot(a, a)


def _rational(alpha: object) -> sp.Expr:
    """α as an exact sympy number (floats become rationals, so exponents stay exact)."""
    if isinstance(alpha, float):
        return sp.Rational(Fraction(alpha).limit_denominator(10_000))
    return sp.sympify(alpha)


def _negative_terms(expr: sp.Expr) -> sp.Expr:
    """The sum of the terms of a polynomial (in non-negative symbols) whose coefficient is negative.

    Zero means the polynomial is non-negative wherever its symbols are: a certificate of an inequality.
    """
    expr = sp.expand(expr)
    if expr == 0:
        return sp.Integer(0)
    poly = sp.Poly(expr, *sorted(expr.free_symbols, key=str))
    return sp.Add(
        *(
            coefficient * sp.Mul(*(g**e for g, e in zip(poly.gens, monomial, strict=True)))
            for monomial, coefficient in poly.terms()
            if coefficient < 0
        )
    )


def _projection(residual: sp.Matrix, reference: sp.Matrix) -> sp.Matrix:
    """r_∥ = ⟨r, u⟩/‖u‖² u (papers/theory.md §8): the library's :func:`hopfield_aa.geometry.decompose`."""
    return (_dot(residual, reference) / _sq(reference)) * reference


# --------------------------------------------------------------------------------------------------
# §4: extrapolation is a depth-1 Anderson step


def aa1_extrapolation(
    gamma_of_scale: Callable[[sp.Expr], sp.Expr] = lambda scale: 1 - scale, dim: int = 3
) -> Derivation:
    r"""Extrapolation is AA(1): the depth-1 step with :math:`\gamma = 1-\lambda` is :math:`P_\lambda`.

    The general AA(m) step :math:`x_{k+1} = (x_k - \Delta X\gamma) + b(f_k - \Delta F\gamma)` is written out
    for m = 1 and mixing b = 1 with the two latest iterates equal (both retrievals are taken at the same
    state, :math:`x_{k-1} = x_k = \xi`) and map values :math:`g_{k-1} = D`, :math:`g_k = S`. The residual is
    the step minus :math:`D + \lambda(S - D)`, with γ given by ``gamma_of_scale(λ)``.

    Parameters
    ----------
    gamma_of_scale : callable
        λ ↦ γ, the coefficient under test (default ``1 - λ``, :func:`hopfield_aa.geometry.aa1_gamma`).
    dim : int
        Dimension of the symbolic vectors.

    Examples
    --------
    >>> aa1_extrapolation().holds
    True
    >>> aa1_extrapolation(lambda scale: scale - 1).holds
    False
    """
    lam, b = sp.symbols("lambda b", real=True)
    xi, dense, sparse = (
        _vector("xi", dim, real=True),
        _vector("D", dim, real=True),
        _vector("S", dim, real=True),
    )
    gamma = gamma_of_scale(lam)
    x_prev, x_k, g_prev, g_k = xi, xi, dense, sparse
    f_prev, f_k = g_prev - x_prev, g_k - x_k
    delta_x, delta_f = x_k - x_prev, f_k - f_prev
    step = (x_k - delta_x * gamma) + b * (f_k - delta_f * gamma)
    step_b1 = step.subs(b, 1)
    return Derivation(
        claim="AA(1) with g_{k-1} = D, g_k = S at one state and gamma = 1 - lambda equals D + lambda (S - D)",
        residuals={
            "mixing b = 1 gives g_k - gamma (g_k - g_{k-1})": _simplify(
                step_b1 - (g_k - gamma * (g_k - g_prev))
            ),
            "AA(1) step equals extrapolation": _simplify(step_b1 - (dense + lam * (sparse - dense))),
        },
    )


def _default_gamma(f_k: sp.Matrix, f_prev: sp.Matrix) -> sp.Expr:
    delta = f_k - f_prev
    return _dot(f_k, delta) / _sq(delta)


def _default_optimal_scale(state: sp.Matrix, dense: sp.Matrix, sparse: sp.Matrix) -> sp.Expr:
    return 1 - _dot(sparse - state, sparse - dense) / _sq(sparse - dense)


def aa1_least_squares_gamma(
    gamma_closed_form: Callable[[sp.Matrix, sp.Matrix], sp.Expr] = _default_gamma,
    optimal_scale: Callable[[sp.Matrix, sp.Matrix, sp.Matrix], sp.Expr] = _default_optimal_scale,
    dim: int = 3,
) -> Derivation:
    r"""The least-squares depth-1 coefficient and the Anderson-optimal guidance scale.

    Minimising :math:`\varphi(\gamma) = \lVert f_k - \gamma (f_k - f_{k-1})\rVert^2` over γ: the stationary
    point of φ is solved for, compared with
    :math:`\gamma^* = \langle f_k, f_k - f_{k-1}\rangle / \lVert f_k - f_{k-1}\rVert^2`, and the second
    derivative :math:`2\lVert f_k - f_{k-1}\rVert^2 \ge 0` shows it is the minimum. With
    :math:`f_k = S - \xi`, :math:`f_{k-1} = D - \xi` the scale :math:`\lambda^* = 1 - \gamma^*` is compared
    with ``optimal_scale(ξ, D, S)`` (default: the formula of
    :func:`hopfield_aa.geometry.anderson_optimal_scale`).

    Examples
    --------
    >>> aa1_least_squares_gamma().holds
    True
    """
    gamma = sp.Symbol("gamma", real=True)
    f_k, f_prev = _vector("f", dim, real=True), _vector("h", dim, real=True)
    objective = _sq(f_k - gamma * (f_k - f_prev))
    (stationary,) = sp.solve(sp.diff(objective, gamma), gamma)
    xi, dense, sparse = (
        _vector("xi", dim, real=True),
        _vector("D", dim, real=True),
        _vector("S", dim, real=True),
    )
    derived_scale = 1 - stationary.subs(
        {**dict(zip(f_k, sparse - xi, strict=True)), **dict(zip(f_prev, dense - xi, strict=True))},
        simultaneous=True,
    )
    return Derivation(
        claim="argmin_gamma ||f_k - gamma (f_k - f_{k-1})||^2 = <f_k, f_k - f_{k-1}> / ||f_k - f_{k-1}||^2",
        residuals={
            "stationary point equals the closed form": _simplify(stationary - gamma_closed_form(f_k, f_prev)),
            "second derivative is 2 ||f_k - f_{k-1}||^2": _simplify(
                sp.diff(objective, gamma, 2) - 2 * _sq(f_k - f_prev)
            ),
            "lambda* = 1 - gamma* with f_k = S - xi, f_{k-1} = D - xi": _simplify(
                derived_scale - optimal_scale(xi, dense, sparse)
            ),
        },
    )


# --------------------------------------------------------------------------------------------------
# §3: the guidance rules at fixed points


RuleFn = Callable[..., sp.Matrix]


def _rule_extrapolation(
    dense: sp.Matrix, sparse: sp.Matrix, state: sp.Matrix, lam: sp.Expr, **_: object
) -> sp.Matrix:
    return dense + lam * (sparse - dense)


def _rule_gag(
    dense: sp.Matrix,
    sparse: sp.Matrix,
    state: sp.Matrix,
    lam: sp.Expr,
    *,
    zeta: sp.Expr,
    cap: sp.Expr,
    reference: sp.Matrix,
) -> sp.Matrix:
    residual = sparse - dense
    parallel = _projection(residual, reference)
    return sparse + lam * (cap * parallel + zeta * (residual - parallel))


def _rule_orthogonal_only(
    dense: sp.Matrix, sparse: sp.Matrix, state: sp.Matrix, lam: sp.Expr, *, reference: sp.Matrix, **_: object
) -> sp.Matrix:
    residual = sparse - dense
    return sparse + lam * (residual - _projection(residual, reference))


DEFAULT_RULES: dict[str, RuleFn] = {
    "extrapolation P_lambda": _rule_extrapolation,
    "GAG": _rule_gag,
    "orthogonal only": _rule_orthogonal_only,
}


def fixed_point_preservation(rules: Mapping[str, RuleFn] | None = None, dim: int = 2) -> Derivation:
    r"""Fixed-point preservation: at a common fixed point of D and S every guidance rule returns it.

    The retrievals are written as :math:`D(\xi) = \xi + a`, :math:`S(\xi) = \xi + b` with symbolic update
    vectors a, b; each rule is evaluated with symbolic λ, ζ, a generic reference direction u and a symbolic
    cap factor :math:`c = \min(1, \eta/\lVert r_\parallel\rVert) \in [0, 1]` (the cap only rescales, so
    every η is covered), then the common-fixed-point conditions a = b = 0 are substituted. The residual is
    ``rule − ξ``.

    Parameters
    ----------
    rules : mapping of name to callable, optional
        ``rule(dense, sparse, state, lam, *, zeta, cap, reference) -> vector``; default: extrapolation,
        GAG and orthogonal-only.

    Examples
    --------
    >>> fixed_point_preservation().holds
    True
    """
    lam, zeta = sp.symbols("lambda zeta", real=True)
    cap = sp.Symbol("c", nonnegative=True)
    xi, a, b = _vector("xi", dim, real=True), _vector("a", dim, real=True), _vector("b", dim, real=True)
    reference = _vector("u", dim, real=True)
    at_common_fixed_point = {**{ai: 0 for ai in a}, **{bi: 0 for bi in b}}
    residuals: dict[str, Residual] = {}
    for name, rule in (rules or DEFAULT_RULES).items():
        out = rule(xi + a, xi + b, xi, lam, zeta=zeta, cap=cap, reference=reference)
        residuals[f"{name} returns the fixed point"] = _simplify((out - xi).subs(at_common_fixed_point))
    return Derivation(
        claim="D(xi*) = S(xi*) = xi* implies rule(xi*) = xi* for all lambda, zeta, eta", residuals=residuals
    )


def divergence_at_dense_fixed_point(rule: RuleFn = _rule_extrapolation, dim: int = 3) -> Derivation:
    r"""Divergence at non-common fixed points: if :math:`D(\xi^*) = \xi^*` but :math:`S(\xi^*) = \xi^* + r`,
    then :math:`\lVert P_\lambda(\xi^*) - \xi^*\rVert^2 = \lambda^2 \lVert r\rVert^2`: the displacement grows
    linearly in λ. The residual is ``‖rule − ξ*‖² − λ²‖r‖²``.

    Examples
    --------
    >>> divergence_at_dense_fixed_point().holds
    True
    """
    lam = sp.Symbol("lambda", real=True)
    xi, r = _vector("xi", dim, real=True), _vector("r", dim, real=True)
    out = rule(xi, xi + r, xi, lam)
    return Derivation(
        claim="D(xi*) = xi*, S(xi*) = xi* + r implies ||P_lambda(xi*) - xi*|| = |lambda| ||r||",
        residuals={"squared displacement is lambda^2 ||r||^2": _simplify(_sq(out - xi) - lam**2 * _sq(r))},
    )


# --------------------------------------------------------------------------------------------------
# §3: the decomposition and the bounded update


def decomposition_identities(
    parallel: Callable[[sp.Matrix, sp.Matrix], sp.Matrix] = _projection, dim: int = 3
) -> Derivation:
    r"""The decomposition identities of Def. 3.5 for generic r and u ≠ 0.

    With :math:`r_\perp = r - r_\parallel`: :math:`r_\parallel + r_\perp = r`,
    :math:`\langle r_\perp, u\rangle = 0`, :math:`r_\parallel \parallel u` (its wedge with u vanishes),
    Pythagoras :math:`\lVert r\rVert^2 = \lVert r_\parallel\rVert^2 + \lVert r_\perp\rVert^2`, and idempotence
    (decomposing :math:`r_\parallel` again leaves it unchanged).

    Parameters
    ----------
    parallel : callable
        ``(r, u) -> r_∥`` under test (default: the orthogonal projection of
        :func:`hopfield_aa.geometry.decompose`).

    Examples
    --------
    >>> decomposition_identities().holds
    True
    >>> decomposition_identities(lambda r, u: (r.T * u)[0, 0] * u).holds  # forgot the 1/||u||^2
    False
    """
    r, u = _vector("r", dim, real=True), _vector("u", dim, real=True)
    par = parallel(r, u)
    perp = r - par
    wedge = sp.Matrix([par[i] * u[j] - par[j] * u[i] for i in range(dim) for j in range(i + 1, dim)])
    return Derivation(
        claim="r_par + r_perp = r, <r_perp, u> = 0, r_par || u, Pythagoras, idempotence",
        residuals={
            "parts sum to r": _simplify(par + perp - r),
            "orthogonal part is orthogonal to u": _simplify(_dot(perp, u)),
            "parallel part lies along u": _simplify(wedge),
            "Pythagoras": _simplify(_sq(r) - _sq(par) - _sq(perp)),
            "idempotence": _simplify(parallel(par, u) - par),
        },
    )


def _default_bound(lam: sp.Expr, eta: sp.Expr, zeta: sp.Expr, orthogonal_norm: sp.Expr) -> sp.Expr:
    return sp.Abs(lam) * (eta + sp.Abs(zeta) * orthogonal_norm)


def bounded_update(
    bound: Callable[[sp.Expr, sp.Expr, sp.Expr, sp.Expr], sp.Expr] = _default_bound, dim: int = 3
) -> Derivation:
    r"""Bounded update: :math:`\lVert G - S\rVert \le |\lambda|(\eta + |\zeta|\lVert r_\perp\rVert)`.

    Step 1 (an identity, by orthogonality): with the cap
    :math:`\mathrm{clip}_\eta(r_\parallel) = c\,r_\parallel`,
    :math:`c = \min(1, \eta/\lVert r_\parallel\rVert)`,

    .. math:: \lVert G - S\rVert^2 = \lambda^2\lVert c\,r_\parallel + \zeta r_\perp\rVert^2
              = \lambda^2\bigl(c^2\lVert r_\parallel\rVert^2 + \zeta^2\lVert r_\perp\rVert^2\bigr).

    Step 2 (the inequality): write :math:`\eta = c\lVert r_\parallel\rVert + \delta` with δ ≥ 0 (the cap gives
    :math:`c\lVert r_\parallel\rVert = \min(\lVert r_\parallel\rVert, \eta) \le \eta`), and expand
    ``bound² − ‖G − S‖²`` as a polynomial in the non-negative quantities |λ|, c, ‖r_∥‖, ‖r_⊥‖, |ζ|, δ.
    Every coefficient non-negative certifies the bound; the residual of this step is the sum of the
    terms with a negative coefficient (zero for a valid bound).

    Parameters
    ----------
    bound : callable
        ``(λ, η, ζ, ‖r_⊥‖) -> bound`` under test; default ``|λ| (η + |ζ| ‖r_⊥‖)``.

    Examples
    --------
    >>> bounded_update().holds
    True
    >>> bounded_update(lambda lam, eta, zeta, perp: abs(lam) * eta).holds  # drops the orthogonal term
    False
    """
    lam, zeta = sp.symbols("lambda zeta", real=True)
    cap = sp.Symbol("c", nonnegative=True)
    r, u = _vector("r", dim, real=True), _vector("u", dim, real=True)
    par = _projection(r, u)
    perp = r - par
    update = lam * (cap * par + zeta * perp)  # G − S
    step1 = _simplify(_sq(update) - lam**2 * (cap**2 * _sq(par) + zeta**2 * _sq(perp)))

    # Step 2 on norms as non-negative symbols, for each sign of λ and ζ (the bound must hold for all four).
    abs_lam, abs_zeta, norm_par, norm_perp, delta = sp.symbols(
        "abs_lambda abs_zeta norm_par norm_perp delta", nonnegative=True
    )
    eta = cap * norm_par + delta  # η ≥ ‖clip_η(r_∥)‖ = c‖r_∥‖
    negative_part = sp.Integer(0)
    for sign_lam in (1, -1):
        for sign_zeta in (1, -1):
            lam_v, zeta_v = sign_lam * abs_lam, sign_zeta * abs_zeta
            value = sp.expand(bound(lam_v, eta, zeta_v, norm_perp))
            squared_update = lam_v**2 * (cap**2 * norm_par**2 + zeta_v**2 * norm_perp**2)
            slack = sp.expand(value**2 - squared_update)
            negative_part += _negative_terms(value) + _negative_terms(slack)
    return Derivation(
        claim=(
            "||G - S||^2 = lambda^2 (||clip r_par||^2 + zeta^2 ||r_perp||^2)"
            " <= lambda^2 (eta + |zeta| ||r_perp||)^2"
        ),
        residuals={
            "orthogonality: ||G - S||^2 splits into the two parts": step1,
            "bound and bound^2 - ||G - S||^2 have no negative coefficient": sp.expand(negative_part),
        },
    )


# --------------------------------------------------------------------------------------------------
# §2: energies, gradients, and the descent margin


def _softmax_retrieval(state: sp.Matrix, patterns: sp.Matrix, beta: sp.Expr) -> sp.Matrix:
    scores = beta * patterns * state
    weights = scores.applyfunc(sp.exp)
    return patterns.T * (weights / sum(weights))


def energy_gradient_softmax(
    retrieval: Callable[[sp.Matrix, sp.Matrix, sp.Expr], sp.Matrix] = _softmax_retrieval,
    n_patterns: int = 3,
    dim: int = 2,
) -> Derivation:
    r"""The dense energy's gradient: :math:`\nabla E_1(\xi) = \xi - X^\top\mathrm{softmax}(\beta X\xi)`.

    :math:`E_1(\xi) = -\tfrac1\beta\log\sum_i e^{\beta\langle x_i,\xi\rangle} + \tfrac12\lVert\xi\rVert^2` is
    differentiated symbolically for a generic memory X (``n_patterns × dim`` symbols) and β > 0. The
    residual is ``∇E − (ξ − retrieval(ξ, X, β))``, so fixed points of the retrieval are exactly the
    stationary points of the energy.

    Examples
    --------
    >>> energy_gradient_softmax().holds
    True
    """
    beta = sp.Symbol("beta", positive=True)
    patterns = sp.Matrix(n_patterns, dim, lambda i, j: sp.Symbol(f"x{i}{j}", real=True))
    xi = _vector("xi", dim, real=True)
    scores = beta * patterns * xi
    energy = -sp.log(sum(sp.exp(z) for z in scores)) / beta + _sq(xi) / 2
    gradient = sp.Matrix([sp.diff(energy, x) for x in xi])
    return Derivation(
        claim="grad(-lse(beta X xi)/beta + ||xi||^2/2) = xi - X^T softmax(beta X xi)",
        residuals={
            "gradient equals state minus retrieval": _simplify(
                gradient - (xi - retrieval(xi, patterns, beta))
            )
        },
    )


def _sparsemax_retrieval_on_support(
    state: sp.Matrix, patterns: sp.Matrix, beta: sp.Expr, support: int
) -> sp.Matrix:
    scores = beta * patterns * state
    tau = (sum(scores[:support]) - 1) / support
    probs = sp.Matrix([scores[i] - tau if i < support else 0 for i in range(patterns.rows)])
    return patterns.T * probs


def energy_gradient_sparsemax(
    retrieval: Callable[[sp.Matrix, sp.Matrix, sp.Expr, int], sp.Matrix] = _sparsemax_retrieval_on_support,
    n_patterns: int = 3,
    support: int = 2,
    dim: int = 2,
) -> Derivation:
    r"""The α = 2 (sparsemax) energy's gradient on a fixed support.

    On an open set where the support of :math:`p = \mathrm{sparsemax}(z)` is the first ``support`` patterns,
    :math:`\tau = (\sum_{i\in S} z_i - 1)/|S|`, :math:`p_i = z_i - \tau` on S and 0 off it, and the conjugate
    is :math:`\Psi^*_2(z) = \tfrac12\sum p_i^2 + \tau + \tfrac12` (papers/theory.md §1). The energy
    :math:`E_2(\xi) = -\Psi^*_2(\beta X\xi)/\beta + \tfrac12\lVert\xi\rVert^2` is differentiated
    symbolically; the residual is ``∇E − (ξ − retrieval(ξ, X, β, support))`` with the default retrieval
    :math:`X^\top p`.

    Examples
    --------
    >>> energy_gradient_sparsemax().holds
    True
    """
    beta = sp.Symbol("beta", positive=True)
    patterns = sp.Matrix(n_patterns, dim, lambda i, j: sp.Symbol(f"x{i}{j}", real=True))
    xi = _vector("xi", dim, real=True)
    scores = beta * patterns * xi
    tau = (sum(scores[:support]) - 1) / support
    conjugate = sum((scores[i] - tau) ** 2 for i in range(support)) / 2 + tau + sp.Rational(1, 2)
    energy = -conjugate / beta + _sq(xi) / 2
    gradient = sp.Matrix([sp.diff(energy, x) for x in xi])
    return Derivation(
        claim=(
            "on a fixed support, grad(-Psi*_2(beta X xi)/beta + ||xi||^2/2) = xi - X^T sparsemax(beta X xi)"
        ),
        residuals={
            "gradient equals state minus retrieval": _simplify(
                gradient - (xi - retrieval(xi, patterns, beta, support))
            )
        },
    )


def _default_conjugate(probs: list[sp.Expr], tau: sp.Expr, alpha: sp.Expr) -> sp.Expr:
    return sum(p**alpha for p in probs) / alpha + tau / (alpha - 1) + 1 / (alpha * (alpha - 1))


class _ImplicitEntmax(NamedTuple):
    scores: list[sp.Symbol]
    tau: sp.Expr
    probs: list[sp.Expr]
    dtau: list[sp.Expr]
    positive: dict[sp.Basic, sp.Expr]
    normalised: dict[sp.Basic, sp.Expr]


def _implicit_entmax(support: int, alpha: sp.Expr) -> _ImplicitEntmax:
    """α-entmax on a fixed support with the threshold τ(z) an implicit function of the scores.

    Gives the scores z, the function τ(z), the probabilities p_i = ((α−1) z_i − τ)^{1/(α−1)}, the
    derivatives dτ/dz_j obtained by implicit differentiation of Σ p_i = 1, the substitution that replaces
    τ(z) by a symbol t and z_i by (p_i^{α−1} + t)/(α−1) with positive symbols p_i (the probabilities: the
    scores are in the support), and the substitution for the last p_i that makes Σ p_i = 1 hold.
    """
    z = list(sp.symbols(f"z0:{support}", real=True))
    tau = sp.Function("tau")(*z)
    probs = [((alpha - 1) * zi - tau) ** (1 / (alpha - 1)) for zi in z]
    constraint = sum(probs) - 1
    unknown = sp.Symbol("dtau")
    dtau = []
    for zj in z:
        equation = sp.diff(constraint, zj).subs(sp.Derivative(tau, zj), unknown)
        (solution,) = sp.solve(equation, unknown)
        dtau.append(solution)
    t = sp.Symbol("t", real=True)
    p = sp.symbols(f"p0:{support}", positive=True)
    positive: dict[sp.Basic, sp.Expr] = {tau: t}
    positive.update({zi: (pi ** (alpha - 1) + t) / (alpha - 1) for zi, pi in zip(z, p, strict=True)})
    normalised: dict[sp.Basic, sp.Expr] = {p[-1]: 1 - sum(p[:-1])}
    return _ImplicitEntmax(z, tau, probs, dtau, positive, normalised)


def conjugate_gradient_is_entmax(
    conjugate: Callable[[list[sp.Expr], sp.Expr, sp.Expr], sp.Expr] = _default_conjugate,
    alpha: object = sp.Rational(3, 2),
    support: int = 3,
) -> Derivation:
    r"""The conjugate's gradient is α-entmax: :math:`\nabla\Psi^*_\alpha(z) = \mathrm{entmax}_\alpha(z)`.

    On a fixed support, with :math:`p_i = ((\alpha-1)z_i - \tau)^{1/(\alpha-1)}` and τ(z) defined
    implicitly by :math:`\sum p_i = 1`, the closed form
    :math:`\Psi^*_\alpha(z) = \sum p_i^\alpha/\alpha + \tau/(\alpha-1) + 1/(\alpha(\alpha-1))`
    (papers/theory.md §1) is differentiated, dτ/dz coming from implicit differentiation. The residual is
    ``∇Ψ* − p``. By the chain rule this gives
    :math:`\nabla E_\alpha(\xi) = \xi - X^\top\mathrm{entmax}_\alpha(\beta X\xi)` for every α.

    Parameters
    ----------
    conjugate : callable
        ``(p, τ, α) -> Ψ*`` under test.
    alpha : number or sympy expression
        α > 1 (a sympy symbol works too, e.g. ``1 + 1/q`` with q > 0).
    support : int
        Size of the support.

    Examples
    --------
    >>> conjugate_gradient_is_entmax().holds
    True
    """
    alpha_value = _rational(alpha)
    z, tau, probs, dtau, positive, normalised = _implicit_entmax(support, alpha_value)
    psi = conjugate(probs, tau, alpha_value)
    gradient = [sp.diff(psi, zj).subs(sp.Derivative(tau, zj), dtau[j]) for j, zj in enumerate(z)]
    residual = sp.Matrix([g - p for g, p in zip(gradient, probs, strict=True)])
    # the value of Ψ* is only meaningful on the constraint Σ p = 1 (τ is the normalising threshold)
    residual = _simplify(residual.subs(tau, positive[tau]).subs(positive)).subs(normalised)
    return Derivation(
        claim=f"grad Psi*_alpha(z) = entmax_alpha(z) on a support of size {support}, alpha = {alpha_value}",
        residuals={"gradient of the conjugate equals entmax": _simplify(residual)},
    )


def _default_margin(state: sp.Matrix, mapped: sp.Matrix) -> sp.Expr:
    return _sq(mapped - state) / 2


def energy_descent_margin(
    margin: Callable[[sp.Matrix, sp.Matrix], sp.Expr] = _default_margin, dim: int = 3
) -> Derivation:
    r"""Energy descent (Thm 3.1): the concave–convex step's margin is exactly a Bregman divergence.

    Write :math:`E(\xi) = -g(\xi) + \tfrac12\lVert\xi\rVert^2` with g convex
    (:math:`g = \Psi^*_\alpha(\beta X\cdot)/\beta`) and :math:`T(\xi) = \nabla g(\xi)`. With symbolic
    values :math:`g(\xi), g(T)` and vectors ξ, T, the Bregman gap
    :math:`B = g(T) - g(\xi) - \langle\nabla g(\xi), T - \xi\rangle \ge 0` (convexity) satisfies

    .. math:: E(\xi) - E(T) - \tfrac12\lVert T - \xi\rVert^2 = B,

    hence :math:`E(T(\xi)) \le E(\xi) - \tfrac12\lVert T(\xi) - \xi\rVert^2`. The residual is
    ``E(ξ) − E(T) − margin(ξ, T) − B``.

    Examples
    --------
    >>> energy_descent_margin().holds
    True
    >>> energy_descent_margin(lambda xi, t: ((t - xi).T * (t - xi))[0, 0]).holds  # margin too large
    False
    """
    xi, mapped = _vector("xi", dim, real=True), _vector("T", dim, real=True)
    g_xi, g_t = sp.symbols("g_xi g_T", real=True)
    energy_xi = -g_xi + _sq(xi) / 2
    energy_t = -g_t + _sq(mapped) / 2
    bregman = g_t - g_xi - _dot(mapped, mapped - xi)  # ∇g(ξ) = T(ξ)
    return Derivation(
        claim="E(xi) - E(T xi) - ||T xi - xi||^2 / 2 = Bregman_g(T xi, xi) >= 0",
        residuals={
            "descent margin equals the Bregman gap": _simplify(
                energy_xi - energy_t - margin(xi, mapped) - bregman
            )
        },
    )


# --------------------------------------------------------------------------------------------------
# §1–2: Jacobians


def _softmax_jacobian_formula(probs: sp.Matrix) -> sp.Matrix:
    return sp.diag(*probs) - probs * probs.T


def softmax_jacobian(
    jacobian: Callable[[sp.Matrix], sp.Matrix] = _softmax_jacobian_formula, size: int = 3
) -> Derivation:
    r"""The softmax Jacobian :math:`\partial p/\partial z = \mathrm{diag}(p) - pp^\top`, derived symbolically.

    Examples
    --------
    >>> softmax_jacobian().holds
    True
    >>> softmax_jacobian(lambda p: sp.diag(*p)).holds
    False
    """
    z = _vector("z", size, real=True)
    weights = z.applyfunc(sp.exp)
    probs = weights / sum(weights)
    derived = probs.jacobian(z)
    return Derivation(
        claim="d softmax(z)/dz = diag(p) - p p^T",
        residuals={"Jacobian equals diag(p) - p p^T": _simplify(derived - jacobian(probs))},
    )


def _entmax_jacobian_formula(probs: list[sp.Expr], alpha: sp.Expr) -> sp.Matrix:
    s = [p ** (2 - alpha) if p != 0 else sp.Integer(0) for p in probs]
    total = sum(s)
    return sp.diag(*s) - sp.Matrix(s) * sp.Matrix(s).T / total


def entmax_jacobian(
    jacobian: Callable[[list[sp.Expr], sp.Expr], sp.Matrix] = _entmax_jacobian_formula,
    alpha: object = sp.Rational(3, 2),
    support: int = 2,
    inactive: int = 1,
) -> Derivation:
    r"""The α-entmax Jacobian :math:`\mathrm{diag}(s) - ss^\top/\sum s` with :math:`s_i = p_i^{2-\alpha}` on
    the support.

    On an open set where the first ``support`` scores are in the support and ``inactive`` more are
    strictly below the threshold, :math:`p_i = ((\alpha-1)z_i - \tau)^{1/(\alpha-1)}` on the support and
    :math:`p_i = 0` off it. The threshold τ(z) is differentiated implicitly from :math:`\sum p_i = 1`:
    :math:`d\tau/dz_j = (\alpha - 1)\,s_j/\sum s`, and :math:`\partial p_i/\partial z_j` follows by the chain
    rule. The residual is the derived Jacobian minus ``jacobian(p, α)`` (p with exact zeros off the support).

    Parameters
    ----------
    jacobian : callable
        ``(p, α) -> matrix`` under test (default: the formula of
        :func:`hopfield_aa.normalizers.entmax_jacobian`).
    alpha : number or sympy expression
        α > 1; e.g. 3/2, 2 (sparsemax), or ``1 + 1/q`` with a positive symbol q.
    support, inactive : int
        Sizes of the support and of the inactive set.

    Examples
    --------
    >>> entmax_jacobian().holds
    True
    """
    alpha_value = _rational(alpha)
    z, tau, probs, dtau, positive, _ = _implicit_entmax(support, alpha_value)
    inactive_scores = list(sp.symbols(f"y0:{inactive}", real=True))
    all_scores = z + inactive_scores
    all_probs = probs + [sp.Integer(0)] * inactive  # locally constant zero below the threshold
    size = support + inactive
    derived = sp.zeros(size, size)
    for j, zj in enumerate(all_scores):
        for i in range(size):
            value = sp.diff(all_probs[i], zj)
            if j < support:
                value = value.subs(sp.Derivative(tau, zj), dtau[j])
            derived[i, j] = value
    residual = derived - jacobian(all_probs, alpha_value)
    residual = residual.subs(tau, positive[tau]).subs(positive)
    return Derivation(
        claim=(
            "d entmax_alpha(z)/dz = diag(s) - s s^T / sum(s), s = p^(2 - alpha) on the support, "
            f"alpha = {alpha_value}"
        ),
        residuals={"implicit-differentiation Jacobian equals the formula": _simplify(residual)},
    )


def _retrieval_jacobian_formula(patterns: sp.Matrix, probs: sp.Matrix, beta: sp.Expr) -> sp.Matrix:
    return beta * patterns.T * (sp.diag(*probs) - probs * probs.T) * patterns


def retrieval_jacobian(
    jacobian: Callable[[sp.Matrix, sp.Matrix, sp.Expr], sp.Matrix] = _retrieval_jacobian_formula,
    n_patterns: int = 3,
    dim: int = 2,
) -> Derivation:
    r"""The dense retrieval map's Jacobian, :math:`DT_1(\xi) = \beta X^\top(\mathrm{diag}(p) - pp^\top)X`.

    Also derives the covariance form behind the local Lipschitz bound:
    :math:`DT_1(\xi) = \beta\sum_i p_i (x_i - \bar x)(x_i - \bar x)^\top` with :math:`\bar x = X^\top p`, a
    weighted covariance of the patterns, hence symmetric positive semidefinite and bounded by β times the
    spread of the patterns that carry weight.

    Examples
    --------
    >>> retrieval_jacobian().holds
    True
    """
    beta = sp.Symbol("beta", positive=True)
    patterns = sp.Matrix(n_patterns, dim, lambda i, j: sp.Symbol(f"x{i}{j}", real=True))
    xi = _vector("xi", dim, real=True)
    scores = beta * patterns * xi
    # w_i(ξ) = exp(z_i(ξ)) as functions, differentiated with exp' = exp: dw_i/dξ_k = w_i ∂z_i/∂ξ_k. Naming
    # the exponentials keeps every expression rational (sympy would merge exp(z) exp(z) into exp(2z)).
    weight_fns = [sp.Function(f"w{i}")(*xi) for i in range(n_patterns)]
    weights = [sp.Symbol(f"e{i}", positive=True) for i in range(n_patterns)]
    mapped = patterns.T * (sp.Matrix(weight_fns) / sum(weight_fns))
    chain_rule = {
        sp.Derivative(fn, x): fn * sp.diff(score, x)
        for fn, score in zip(weight_fns, scores, strict=True)
        for x in xi
    }
    derived = mapped.jacobian(xi).subs(chain_rule).subs(dict(zip(weight_fns, weights, strict=True)))
    probs = sp.Matrix(weights) / sum(weights)
    mean = patterns.T * probs
    covariance = sp.zeros(dim, dim)
    for i in range(n_patterns):
        centred = patterns.row(i).T - mean
        covariance += probs[i] * centred * centred.T
    formula = jacobian(patterns, probs, beta)
    return Derivation(
        claim="D T_1(xi) = beta X^T (diag p - p p^T) X = beta Cov_p(patterns)",
        residuals={
            "Jacobian equals beta X^T J_softmax X": _simplify(derived - formula),
            "formula equals beta times the weighted covariance": _simplify(formula - beta * covariance),
        },
    )


# --------------------------------------------------------------------------------------------------
# registry

DERIVATIONS: dict[str, Callable[[], Derivation]] = {
    "extrapolation is AA(1)": aa1_extrapolation,
    "least-squares gamma and optimal scale": aa1_least_squares_gamma,
    "fixed-point preservation": fixed_point_preservation,
    "divergence at non-common fixed points": divergence_at_dense_fixed_point,
    "decomposition identities": decomposition_identities,
    "bounded update": bounded_update,
    "energy gradient (softmax)": energy_gradient_softmax,
    "energy gradient (sparsemax, fixed support)": energy_gradient_sparsemax,
    "conjugate gradient is entmax": conjugate_gradient_is_entmax,
    "energy descent margin": energy_descent_margin,
    "softmax Jacobian": softmax_jacobian,
    "entmax Jacobian": entmax_jacobian,
    "retrieval Jacobian": retrieval_jacobian,
}


def derive_all() -> dict[str, Derivation]:
    """Run every derivation in :data:`DERIVATIONS` with the library's formulas.

    Examples
    --------
    >>> all(d.holds for d in derive_all().values())  # doctest: +SKIP
    True
    """
    return {name: derive() for name, derive in DERIVATIONS.items()}
