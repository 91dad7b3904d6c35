"""One check per claim of THEORY.md §5 (and the deeper Anderson ladder of §4), each returning a
:class:`~hopfield_aa.checks.results.CheckResult` and saving its worst counter-examples for replay.

Conventions shared by every check: margins are (allowed − observed), so a negative margin is a violation;
the tolerance is a stated factor of the compute dtype's epsilon times a stated scale (usually ``M``, the
largest pattern norm); the worst ``max_counterexamples`` violations are saved when ``counterexample_dir``
is given. Each check accepts the mathematical object it tests as an argument (the step, rule, map, points
or targets), so the tests can hand it a case where the claim must fail.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from hopfield_aa.anderson import anderson, anderson_step
from hopfield_aa.checks.fixed_points import (
    FIXED_POINT_FACTOR,
    FixedPoints,
    find_fixed_points,
    local_lipschitz,
    solve_fixed_points,
)
from hopfield_aa.checks.results import (
    STATUS_MEASURED,
    Case,
    CheckResult,
    register_replayer,
    save_counterexample,
    status_of,
    tolerance,
)
from hopfield_aa.geometry import _decompose, _extrapolate, _gag, _ladder_extrapolate
from hopfield_aa.hopfield import _energy, _retrieve

CLAIMS = (
    "energy descent",
    "extrapolation is AA(1)",
    "fixed-point preservation",
    "divergence at non-common fixed points",
    "weak contraction",
    "orthogonal-error convergence",
    "bounded update",
    "directional consistency",
)
LADDER = "ladder AA (deeper)"

# Tolerance factors (times eps of the compute dtype); each check's docstring says what they multiply.
ENERGY_FACTOR = 64.0
LINEAR_FACTOR = 16.0
CONTRACTION_FACTOR = 16.0
ORTHOGONAL_FACTOR = 1024.0

StepFn = Callable[[torch.Tensor, torch.Tensor, float, float], torch.Tensor]
RuleFn = Callable[..., torch.Tensor]


def _norm(v: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(v, dim=-1)


def _name(fn: Callable[..., Any] | None) -> str:
    return "library" if fn is None else f"custom:{getattr(fn, '__qualname__', repr(fn))}"


def _retrieval(fn: StepFn | None) -> StepFn:
    return _retrieve if fn is None else fn


def _resolve(rule: Any, default: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Replay: the stored rule name, or a callable handed in as an override."""
    if callable(rule):
        return rule
    if rule in (None, "library"):
        return default
    raise ValueError(
        f"this counter-example was made with the rule {rule!r}; pass it as rule=<callable> to replay"
    )


def _save_worst(
    claim: str,
    case: Case,
    margins: torch.Tensor,
    instance: Callable[[tuple[int, ...]], tuple[dict[str, torch.Tensor], dict[str, Any]]],
    directory: str | Path | None,
    limit: int,
    tol: torch.Tensor | float,
    setting: str = "",
) -> list[str]:
    """Save the ``limit`` most negative margins (at most one per first index, i.e. per state)."""
    if directory is None or limit <= 0 or not bool((margins < 0).any()):
        return []
    flat = margins.reshape(-1)
    tols = torch.as_tensor(tol, dtype=margins.dtype).expand_as(margins).reshape(-1)
    order = torch.argsort(flat)
    paths: list[str] = []
    seen: set[int] = set()
    for idx in order.tolist():
        if flat[idx] >= 0 or len(paths) >= limit:
            break
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), margins.shape))
        if where[0] in seen:
            continue
        seen.add(where[0])
        tensors, params = instance(where)
        paths.append(
            save_counterexample(
                directory,
                claim=claim,
                data=case.data,
                form=case.form,
                tensors=tensors,
                params=params,
                margin=float(flat[idx]),
                tolerance=float(tols[idx]),
                rank=len(paths),
                setting=setting,
            )
        )
    return paths


def _result(
    claim: str,
    case: Case,
    passed: torch.Tensor,
    margins: torch.Tensor,
    tol: torch.Tensor | float,
    factor: float,
    note: str,
    **fields: Any,
) -> CheckResult:
    n = int(passed.numel())
    n_pass = int(passed.sum())
    tol_value = float(torch.as_tensor(tol).max()) if torch.as_tensor(tol).numel() else math.nan
    status = fields.pop("status", None) or status_of(n, n_pass)
    return CheckResult(
        claim=claim,
        data=dict(case.data),
        form=case.form,
        status=status,
        n_states=n,
        n_passed=n_pass,
        worst_margin=float(margins.min()) if margins.numel() else math.nan,
        tolerance=tol_value,
        tolerance_factor=factor,
        tolerance_note=note,
        **fields,
    )


def _quantiles(values: torch.Tensor) -> dict[str, float]:
    if values.numel() == 0:
        return {}
    v = values.double().reshape(-1)
    q = torch.quantile(v, torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=v.dtype))
    return dict(zip(("min", "p10", "median", "p90", "max"), q.tolist(), strict=False))


def _sample(values: torch.Tensor, limit: int = 2000) -> list[float]:
    v = values.reshape(-1)
    if v.numel() > limit:
        v = v[torch.linspace(0, v.numel() - 1, limit).long()]
    return v.tolist()


# ==================================================================================================
# energy descent


def _energy_margin(
    patterns: torch.Tensor,
    x: torch.Tensor,
    tx: torch.Tensor,
    beta: float,
    alpha: float,
    energies: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(margin, tol, violation) of E(Tξ) ≤ E(ξ) − ½‖Tξ − ξ‖² per state; ``energies``: E(ξ), E(Tξ) if known."""
    if energies is None:
        energies = (_energy(x, patterns, beta, alpha), _energy(tx, patterns, beta, alpha))
    e_before, e_after = energies
    violation = e_after - e_before + 0.5 * _norm(tx - x) ** 2
    m = float(_norm(patterns).max())
    scale = torch.maximum(torch.maximum(_norm(x), _norm(tx)), torch.tensor(m, dtype=x.dtype)) ** 2
    # the energies themselves carry Ψ*/β ≈ log N / β, which dominates at small β
    scale = torch.maximum(scale, torch.maximum(e_before.abs(), e_after.abs()))
    tol = tolerance(x.dtype, ENERGY_FACTOR) * scale
    return tol - violation, tol, violation


def check_energy_descent(
    case: Case,
    *,
    alphas: Sequence[float] = (1.0, 1.25, 1.5, 2.0),
    steps: int = 12,
    step: StepFn | None = None,
    counterexample_dir: str | Path | None = None,
    max_counterexamples: int = 3,
) -> CheckResult:
    r"""Energy descent (Thm 3.1): ``E_α(T_α ξ) ≤ E_α(ξ) − ½‖T_α ξ − ξ‖²`` at every state tried.

    .. math:: E_\alpha(T_\alpha\xi) \le E_\alpha(\xi) - \tfrac12\lVert T_\alpha\xi - \xi\rVert^2

    Checked at every point of the trajectories ``ξ_{t+1} = T_α(ξ_t)`` from each starting state, for ``steps``
    steps and every α in ``alphas`` (α = 1.25 exercises the iterative entmax solver, whose accuracy the
    descent needs). One tried "state" is one (start, α, t).

    Tolerance: ``64 · eps · max(M², ‖ξ‖², ‖Tξ‖², |E(ξ)|, |E(Tξ)|)``. The energy terms are of size
    ``M‖ξ‖`` (the conjugate: a log-sum-exp or entmax sum over N terms), ``‖ξ‖²`` and ``Ψ*/β ≈ log N / β``
    (large at small β); each is computed to a few eps relative, and their difference cannot be more exact
    than that; 64 covers the sums over N ≤ 1024 terms (their error grows like log N in pairwise
    summation) while staying 10⁵ times below a visible violation of the ½‖Tξ − ξ‖² margin.

    Parameters
    ----------
    case : Case
    alphas : sequence of float
        α values (α = 1 dense, α > 1 sparse).
    steps : int
        Trajectory length.
    step : callable, optional
        ``step(states, patterns, beta, alpha) -> next states``; default the retrieval map ``T_α``. A different
        step (e.g. an over-relaxed one) makes the claim fail.
    counterexample_dir : path, optional
        Where the worst violations are saved.
    max_counterexamples : int

    Returns
    -------
    CheckResult with ``rate = None`` and series ``energy`` (energy gaps per iteration, per α).

    Examples
    --------
    >>> from hopfield_aa.checks.families import make_family
    >>> check_energy_descent(make_family("gaussian", quick=True)[0], steps=3).status
    'pass'
    """
    fn = _retrieval(step)
    margins, tols, curves = [], [], {}
    trajectories = []
    for alpha in alphas:
        x = case.states
        per_t, tol_t, energies = [], [], [_energy(x, case.patterns, case.beta, alpha)]
        xs = []
        for _ in range(steps):
            tx = fn(x, case.patterns, case.beta, alpha)
            energies.append(_energy(tx, case.patterns, case.beta, alpha))
            margin, tol, _ = _energy_margin(
                case.patterns, x, tx, case.beta, alpha, (energies[-2], energies[-1])
            )
            per_t.append(margin)
            tol_t.append(tol)
            xs.append(x)
            x = tx
        margins.append(torch.stack(per_t, dim=-1))  # (M, steps)
        tols.append(torch.stack(tol_t, dim=-1))
        trajectories.append(torch.stack(xs, dim=1))  # (M, steps, d)
        e = torch.stack(energies, dim=-1)  # (M, steps + 1)
        curves[f"{alpha:g}"] = (e - e.min(dim=-1, keepdim=True).values)[:8].tolist()
    margin_all = torch.stack(margins, dim=1)  # (M, A, steps)
    tol_all = torch.stack(tols, dim=1)
    traj = torch.stack(trajectories, dim=1)  # (M, A, steps, d)

    def instance(where: tuple[int, ...]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        i, a, t = where
        return (
            {"patterns": case.patterns, "state": traj[i, a, t]},
            {"beta": case.beta, "alpha": float(alphas[a]), "step": _name(step), "iteration": t},
        )

    paths = _save_worst(
        "energy descent", case, margin_all, instance, counterexample_dir, max_counterexamples, tol_all
    )
    return _result(
        "energy descent",
        case,
        (margin_all >= 0).reshape(-1),
        margin_all,
        tol_all,
        ENERGY_FACTOR,
        "64·eps·max(M²,‖ξ‖²,‖Tξ‖²,|E|)",
        unit="start × α × iteration",
        setting="α∈{" + ",".join(f"{a:g}" for a in alphas) + "}",
        counterexamples=paths,
        settings={"alphas": list(alphas), "steps": steps, "step": _name(step)},
        measured={
            f"pass_rate_alpha_{a:g}": float((margin_all[:, k] >= 0).double().mean())
            for k, a in enumerate(alphas)
        },
        series={"energy": curves},
    )


@register_replayer("energy descent")
def _replay_energy(
    tensors: Mapping[str, torch.Tensor], params: Mapping[str, Any]
) -> tuple[float, dict[str, Any]]:
    x, patterns = tensors["state"][None], tensors["patterns"]
    fn = _resolve(params.get("step"), _retrieve)
    tx = fn(x, patterns, params["beta"], params["alpha"])
    margin, tol, violation = _energy_margin(patterns, x, tx, params["beta"], params["alpha"])
    return float(margin[0]), {"violation": float(violation[0]), "tolerance_now": float(tol[0]), **params}


# ==================================================================================================
# extrapolation is AA(1)


def _aa1_margin(
    xi: torch.Tensor, dense: torch.Tensor, sparse: torch.Tensor, scale: float, rule: RuleFn, m: float
) -> tuple[torch.Tensor, torch.Tensor]:
    guided = rule(dense, sparse, scale)
    step = anderson_step(torch.stack([xi, xi]), torch.stack([dense, sparse]), gamma=1.0 - scale)
    assert isinstance(step, torch.Tensor)
    deviation = _norm(guided - step)
    tol = tolerance(xi.dtype, LINEAR_FACTOR) * (_norm(xi) + (1.0 + abs(scale) + abs(1.0 - scale)) * m)
    return tol - deviation, tol


def check_extrapolation_aa1(
    case: Case,
    *,
    scales: Sequence[float] = (-1.0, 0.5, 1.0, 2.0, 4.0, 8.0),
    alpha_sparse: float = 1.5,
    rule: RuleFn | None = None,
    counterexample_dir: str | Path | None = None,
    max_counterexamples: int = 3,
) -> CheckResult:
    r"""Extrapolation is AA(1) (Prop 3.2): ``‖P_λ(ξ) − AA₁(D, S; γ = 1 − λ)‖ ≤ tol``.

    .. math:: \lVert P_\lambda(\xi) - \mathrm{AA}_1(D, S;\ \gamma = 1-\lambda)\rVert \le \mathrm{tol}

    ``P_λ = D + λ (S − D)`` (or ``rule(D, S, λ)``) is compared with the depth-1 Anderson step of
    :func:`~hopfield_aa.anderson.anderson_step` with iterates ``[ξ, ξ]``, map values ``[D(ξ), S(ξ)]`` and
    the fixed coefficient ``γ = 1 − λ``. The Anderson-optimal scale ``λ* = 1 − γ*`` (least-squares γ) is
    recorded per state (``measured["lambda_star"]``, series ``lambda_star``).

    Tolerance: ``16 · eps · (‖ξ‖ + (1 + |λ| + |1 − λ|) M)``: the two expressions are the same affine
    combination evaluated in a different order (the Anderson step forms ``(S − ξ) + ξ``), so they differ
    by a few roundings of vectors of those norms.

    Parameters
    ----------
    rule : callable, optional
        ``rule(dense, sparse, scale)``, default :func:`~hopfield_aa.geometry.extrapolate`'s kernel. A rule
        that is not an AA(1) step (e.g. GAG with ζ = 0) makes the claim fail.
    """
    fn = _extrapolate if rule is None else rule
    xi = case.states
    dense = _retrieve(xi, case.patterns, case.beta, 1.0)
    sparse = _retrieve(xi, case.patterns, case.beta, alpha_sparse)
    m = case.pattern_scale
    pairs = [_aa1_margin(xi, dense, sparse, s, fn, m) for s in scales]
    margins = torch.stack([p[0] for p in pairs], dim=-1)  # (M, K)
    tols = torch.stack([p[1] for p in pairs], dim=-1)
    _, gamma = anderson_step(torch.stack([xi, xi]), torch.stack([dense, sparse]), return_gamma=True)
    assert isinstance(gamma, torch.Tensor)
    lam_star = 1.0 - gamma[..., 0]
    nondegenerate = _norm(sparse - dense) > tolerance(xi.dtype, LINEAR_FACTOR) * m
    lam_star = lam_star[nondegenerate]

    def instance(where: tuple[int, ...]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        i, k = where
        return (
            {"patterns": case.patterns, "state": xi[i]},
            {"beta": case.beta, "alpha_sparse": alpha_sparse, "scale": float(scales[k]), "rule": _name(rule)},
        )

    paths = _save_worst(
        "extrapolation is AA(1)", case, margins, instance, counterexample_dir, max_counterexamples, tols
    )
    return _result(
        "extrapolation is AA(1)",
        case,
        (margins >= 0).all(dim=-1),
        margins,
        tols,
        LINEAR_FACTOR,
        "16·eps·(‖ξ‖+(1+|λ|+|1−λ|)M)",
        setting="λ∈{" + ",".join(f"{s:g}" for s in scales) + "}",
        counterexamples=paths,
        settings={"scales": list(scales), "alpha_sparse": alpha_sparse, "rule": _name(rule)},
        measured={
            "lambda_star": _quantiles(lam_star),
            "lambda_star_undetermined": int((~nondegenerate).sum()),
        },
        series={"lambda_star": _sample(lam_star)},
    )


@register_replayer("extrapolation is AA(1)")
def _replay_aa1(
    tensors: Mapping[str, torch.Tensor], params: Mapping[str, Any]
) -> tuple[float, dict[str, Any]]:
    xi, patterns = tensors["state"][None], tensors["patterns"]
    dense = _retrieve(xi, patterns, params["beta"], 1.0)
    sparse = _retrieve(xi, patterns, params["beta"], params["alpha_sparse"])
    m = float(_norm(patterns).max())
    margin, tol = _aa1_margin(
        xi, dense, sparse, params["scale"], _resolve(params.get("rule"), _extrapolate), m
    )
    return float(margin[0]), {"tolerance_now": float(tol[0]), **params}


# ==================================================================================================
# fixed-point preservation


def _preservation_margin(
    patterns: torch.Tensor,
    point: torch.Tensor,
    beta: float,
    alpha_sparse: float,
    scale: float,
    zeta: float,
    eta: float,
    reference: str,
    threshold: float,
    rule: RuleFn,
    retrievals: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    dense = _retrieve(point, patterns, beta, 1.0) if retrievals is None else retrievals[0]
    sparse = _retrieve(point, patterns, beta, alpha_sparse) if retrievals is None else retrievals[1]
    guided = rule(dense, sparse, scale, zeta, eta, reference, point)
    extrapolated = _extrapolate(dense, sparse, scale)
    deviation = torch.maximum(_norm(guided - point), _norm(extrapolated - point))
    m = float(_norm(patterns).max())
    tol = threshold * (1.0 + 2.0 * abs(scale) * (1.0 + abs(zeta))) + tolerance(
        point.dtype, LINEAR_FACTOR
    ) * m * (1.0 + abs(scale))
    return torch.as_tensor(tol, dtype=point.dtype) - deviation, torch.full_like(deviation, tol)


def check_fixed_point_preservation(
    case: Case,
    *,
    fixed_points: FixedPoints | None = None,
    points: torch.Tensor | None = None,
    scales: Sequence[float] = (-1.0, 0.5, 2.0, 5.0),
    zetas: Sequence[float] = (0.0, 0.5, 1.0),
    etas: Sequence[float] = (0.1, math.inf),
    references: Sequence[str] = ("sparse", "dense", "update"),
    alpha_sparse: float = 1.5,
    rule: RuleFn | None = None,
    counterexample_dir: str | Path | None = None,
    max_counterexamples: int = 3,
) -> CheckResult:
    r"""Fixed-point preservation (Lemma 3.3): at ξ* fixed by both D and S, ``P_λ(ξ*) = G(ξ*) = ξ*``.

    The points are the common fixed points of :func:`~hopfield_aa.checks.fixed_points.find_fixed_points`
    (dense or sparse limits whose residual under both maps is at most τ = 256 · eps · M), or ``points``.
    Every (λ, ζ, η, reference) of the grid is tried (η in units of M); a point passes when all do.
    ``n/a`` when the data has no common fixed point (typical at moderate β: softmax weights are never
    exactly sparse).

    Tolerance: ``τ (1 + 2|λ|(1 + |ζ|)) + 16 · eps · M (1 + |λ|)``: at a point whose residuals are ≤ τ,
    ``‖r‖ ≤ 2τ``, and a rule that is linear in the residual (as extrapolation and GAG are) moves the point
    by at most ``τ + |λ|(1 + |ζ|)‖r‖``, plus rounding. A rule that does not vanish with the residual (e.g.
    one that normalises it) fails.

    Parameters
    ----------
    rule : callable, optional
        ``rule(dense, sparse, scale, zeta, eta, reference, state)``, default the GAG kernel.
    """
    fn = _gag if rule is None else rule
    if points is None:
        fp = fixed_points if fixed_points is not None else find_fixed_points(case, alpha_sparse=alpha_sparse)
        points = fp.common_points()
        threshold = fp.threshold
    else:
        threshold = tolerance(case.patterns.dtype, 256.0) * case.pattern_scale
    m = case.pattern_scale
    grid = [(s, z, e, r) for s in scales for z in zetas for e in etas for r in references]
    if points.shape[0] == 0:
        margins = torch.zeros(0, len(grid), dtype=case.patterns.dtype)
        tols = torch.zeros_like(margins)
    else:
        both = (
            _retrieve(points, case.patterns, case.beta, 1.0),
            _retrieve(points, case.patterns, case.beta, alpha_sparse),
        )
        pairs = [
            _preservation_margin(
                case.patterns, points, case.beta, alpha_sparse, s, z, e * m, r, threshold, fn, both
            )
            for s, z, e, r in grid
        ]
        margins = torch.stack([p[0] for p in pairs], dim=-1)
        tols = torch.stack([p[1] for p in pairs], dim=-1)

    def instance(where: tuple[int, ...]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        i, k = where
        s, z, e, r = grid[k]
        return (
            {"patterns": case.patterns, "point": points[i]},
            {
                "beta": case.beta,
                "alpha_sparse": alpha_sparse,
                "scale": s,
                "zeta": z,
                "eta": e * m,
                "reference": r,
                "threshold": threshold,
                "rule": _name(rule),
            },
        )

    paths = _save_worst(
        "fixed-point preservation", case, margins, instance, counterexample_dir, max_counterexamples, tols
    )
    return _result(
        "fixed-point preservation",
        case,
        (margins >= 0).all(dim=-1),
        margins,
        tols,
        LINEAR_FACTOR,
        "τ(1+2|λ|(1+|ζ|))+16·eps·M(1+|λ|), τ=256·eps·M",
        unit="common fixed point",
        setting=f"{len(grid)} (λ,ζ,η,ref)",
        counterexamples=paths,
        settings={
            "scales": list(scales),
            "zetas": list(zetas),
            "etas_over_M": list(etas),
            "references": list(references),
            "rule": _name(rule),
        },
        measured={"common_points": int(points.shape[0])},
    )


@register_replayer("fixed-point preservation")
def _replay_preservation(
    tensors: Mapping[str, torch.Tensor], params: Mapping[str, Any]
) -> tuple[float, dict[str, Any]]:
    margin, tol = _preservation_margin(
        tensors["patterns"],
        tensors["point"][None],
        params["beta"],
        params["alpha_sparse"],
        params["scale"],
        params["zeta"],
        params["eta"],
        params["reference"],
        params["threshold"],
        _resolve(params.get("rule"), _gag),
    )
    return float(margin[0]), {"tolerance_now": float(tol[0]), **params}


# ==================================================================================================
# divergence at non-common fixed points


def _divergence_margin(
    patterns: torch.Tensor,
    point: torch.Tensor,
    beta: float,
    alpha_sparse: float,
    scale: float,
    threshold: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dense = _retrieve(point, patterns, beta, 1.0)
    sparse = _retrieve(point, patterns, beta, alpha_sparse)
    moved = _norm(_extrapolate(dense, sparse, scale) - point)
    law = abs(scale) * _norm(sparse - dense)
    m = float(_norm(patterns).max())
    tol = threshold + tolerance(point.dtype, LINEAR_FACTOR) * m * (1.0 + 2.0 * abs(scale))
    return tol - (moved - law).abs(), torch.full_like(moved, tol), moved, law


def check_divergence(
    case: Case,
    *,
    fixed_points: FixedPoints | None = None,
    points: torch.Tensor | None = None,
    scales: Sequence[float] = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0),
    alpha_sparse: float = 1.5,
    counterexample_dir: str | Path | None = None,
    max_counterexamples: int = 3,
) -> CheckResult:
    r"""Divergence at non-common fixed points (Remark 3.4): ``‖P_λ(ξ*) − ξ*‖ = |λ| ‖r(ξ*)‖``, linear in λ.

    The points are the dense fixed points with ``S(ξ*) ≠ ξ*`` (non-common, residual ``‖r‖ > τ``), or
    ``points``. A point passes when the law holds at every λ of the grid (λ = 0 included, which demands
    ``D(ξ*) = ξ*``: a point that is not a dense fixed point fails). ``rate`` is the median slope
    ``‖r(ξ*)‖ / M``: how fast extrapolation leaves the fixed point, per unit of λ.

    Tolerance: ``τ + 16 · eps · M (1 + 2|λ|)``, τ = 256 · eps · M: ``P_λ(ξ*) − ξ* = (D(ξ*) − ξ*) + λ r``
    differs from ``λ r`` by the dense residual (≤ τ at a fixed point) plus rounding.
    """
    if points is None:
        fp = fixed_points if fixed_points is not None else find_fixed_points(case, alpha_sparse=alpha_sparse)
        points = fp.dense[fp.dense_non_common]
        threshold = fp.threshold
    else:
        threshold = tolerance(case.patterns.dtype, 256.0) * case.pattern_scale
    m = case.pattern_scale
    if points.shape[0]:
        out = [
            _divergence_margin(case.patterns, points, case.beta, alpha_sparse, s, threshold) for s in scales
        ]
        margins = torch.stack([o[0] for o in out], dim=-1)
        tols = torch.stack([o[1] for o in out], dim=-1)
        sparse = _retrieve(points, case.patterns, case.beta, alpha_sparse)
        dense = _retrieve(points, case.patterns, case.beta, 1.0)
        slope = _norm(sparse - dense) / m
        fine = torch.linspace(-2.0, 8.0, 41, dtype=points.dtype)
        curves = [
            _norm(_extrapolate(dense[:8], sparse[:8], float(s)) - points[:8]).div(m).tolist() for s in fine
        ]
        series = {
            "scales": fine.tolist(),
            "moved": [list(c) for c in zip(*curves, strict=False)],
            "slope": slope[:8].tolist(),
        }
    else:
        margins = tols = torch.zeros(0, len(scales), dtype=case.patterns.dtype)
        slope = torch.zeros(0, dtype=case.patterns.dtype)
        series = {}

    def instance(where: tuple[int, ...]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        i, k = where
        return (
            {"patterns": case.patterns, "point": points[i]},
            {
                "beta": case.beta,
                "alpha_sparse": alpha_sparse,
                "scale": float(scales[k]),
                "threshold": threshold,
            },
        )

    paths = _save_worst(
        "divergence at non-common fixed points",
        case,
        margins,
        instance,
        counterexample_dir,
        max_counterexamples,
        tols,
    )
    return _result(
        "divergence at non-common fixed points",
        case,
        (margins >= 0).all(dim=-1),
        margins,
        tols,
        LINEAR_FACTOR,
        "τ+16·eps·M(1+2|λ|), τ=256·eps·M",
        unit="non-common dense fixed point",
        setting="λ∈{" + ",".join(f"{s:g}" for s in scales) + "}",
        rate=float(slope.median()) if slope.numel() else None,
        rate_note="median ‖r(ξ*)‖/M: distance moved per unit λ",
        counterexamples=paths,
        settings={"scales": list(scales), "alpha_sparse": alpha_sparse},
        measured={"non_common_points": int(points.shape[0]), "slope_over_M": _quantiles(slope)},
        series=series,
    )


@register_replayer("divergence at non-common fixed points")
def _replay_divergence(
    tensors: Mapping[str, torch.Tensor], params: Mapping[str, Any]
) -> tuple[float, dict[str, Any]]:
    margin, tol, moved, law = _divergence_margin(
        tensors["patterns"],
        tensors["point"][None],
        params["beta"],
        params["alpha_sparse"],
        params["scale"],
        params["threshold"],
    )
    return float(margin[0]), {
        "moved": float(moved[0]),
        "law": float(law[0]),
        "tolerance_now": float(tol[0]),
        **params,
    }


# ==================================================================================================
# weak contraction


def _contraction_margin(
    patterns: torch.Tensor, point: torch.Tensor, state: torch.Tensor, beta: float, alpha: float, fn: StepFn
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m = float(_norm(patterns).max())
    before = _norm(state - point)
    after = _norm(fn(state, patterns, beta, alpha) - point)
    tol = tolerance(point.dtype, 256.0) * m + tolerance(point.dtype, CONTRACTION_FACTOR) * m
    return before + tol - after, torch.full_like(before, tol), after / before.clamp(min=1e-300)


def check_weak_contraction(
    case: Case,
    *,
    alpha: float = 1.0,
    fixed_points: FixedPoints | None = None,
    points: torch.Tensor | None = None,
    radii: Sequence[float] = (1e-3, 1e-2),
    directions: int = 4,
    trajectory_steps: int = 8,
    retrieval: StepFn | None = None,
    seed: int = 0,
    counterexample_dir: str | Path | None = None,
    max_counterexamples: int = 3,
) -> CheckResult:
    r"""Weak contraction near fixed points: ``‖T(ξ) − ξ*‖ ≤ ‖ξ − ξ*‖`` for ξ near ξ*; ``‖J_T(ξ)‖₂`` measured.

    Around every fixed point ξ* of ``T = T_α`` reached from the starting states (or each of ``points``),
    ``directions`` random unit directions u at each radius ``ρ M`` give ``ξ = ξ* + ρ M u``; one tried
    "state" is one such ξ. ``rate`` is the median contraction ratio ``‖T(ξ) − ξ*‖ / ‖ξ − ξ*‖`` (below 1:
    contraction). Also measured: the local Lipschitz constant ``‖DT_α(ξ)‖₂`` (exact: the Jacobian is
    symmetric PSD) along the trajectories of T from the starting states and at the fixed points, and the
    share of those below 1, next to the global certificate ``β L_α ‖X‖₂²``.

    Tolerance: ``(256 + 16) · eps · M``: ξ* is fixed only to τ = 256 · eps · M, which shifts ``T(ξ) − ξ*``
    by at most τ, plus the rounding of one retrieval.

    Parameters
    ----------
    alpha : float
        The map: 1 for the dense map D, > 1 for a sparse map.
    retrieval : callable, optional
        ``retrieval(states, patterns, beta, alpha)``, default ``T_α``; an expanding map fails.
    points : Tensor (K, d), optional
        Fixed points to test instead of those found (a saddle, e.g. 0 between patterns ±e at β > 1, fails).
    """
    fn = _retrieval(retrieval)
    m = case.pattern_scale
    if points is None:
        fp = (
            fixed_points
            if fixed_points is not None
            else find_fixed_points(case, alpha_sparse=max(alpha, 1.5))
        )
        if alpha == fp.alpha_dense:
            points = fp.dense[fp.dense_converged]
        elif alpha == fp.alpha_sparse:
            points = fp.sparse[fp.sparse_converged]
        else:
            raise ValueError(f"alpha={alpha} is neither the dense nor the sparse map of fixed_points")
    gen = torch.Generator().manual_seed(seed)
    k, d = points.shape
    u = torch.randn(k, len(radii), directions, d, generator=gen, dtype=points.dtype)
    u = u / _norm(u)[..., None]
    rad = torch.tensor(radii, dtype=points.dtype)[None, :, None, None] * m
    centre = points[:, None, None, :].expand_as(u)
    perturbed = centre + rad * u
    margins, tols, ratios = _contraction_margin(
        case.patterns, centre.reshape(-1, d), perturbed.reshape(-1, d), case.beta, alpha, fn
    )
    shape = (k, len(radii) * directions)
    margins, tols, ratios = margins.reshape(shape), tols.reshape(shape), ratios.reshape(shape)

    # local Lipschitz constants along trajectories of T from the starting states, and at the fixed points
    x, lips = case.states, []
    for _ in range(trajectory_steps):
        lips.append(local_lipschitz(x, case.patterns, case.beta, alpha))
        x = _retrieve(x, case.patterns, case.beta, alpha)
    lip = torch.stack(lips)
    lip_fp = local_lipschitz(points, case.patterns, case.beta, alpha) if k else torch.zeros(0)
    l_alpha = 0.5 if alpha == 1.0 else 1.0
    certificate = case.beta * l_alpha * float(torch.linalg.matrix_norm(case.patterns, ord=2)) ** 2

    def instance(where: tuple[int, ...]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        i, j = where
        return (
            {"patterns": case.patterns, "point": points[i], "state": perturbed.reshape(k, -1, d)[i, j]},
            {"beta": case.beta, "alpha": alpha, "retrieval": _name(retrieval)},
        )

    paths = _save_worst(
        "weak contraction",
        case,
        margins,
        instance,
        counterexample_dir,
        max_counterexamples,
        tols,
        f"alpha={alpha:g}",
    )
    return _result(
        "weak contraction",
        case,
        (margins >= 0).reshape(-1),
        margins,
        tols,
        256.0 + CONTRACTION_FACTOR,
        "(256+16)·eps·M",
        unit="perturbed fixed point",
        setting=f"α={alpha:g}",
        rate=float(ratios.median()) if ratios.numel() else None,
        rate_note="median ‖T(ξ)−ξ*‖/‖ξ−ξ*‖ at radii " + ",".join(f"{r:g}" for r in radii) + " ·M",
        counterexamples=paths,
        settings={
            "alpha": alpha,
            "radii_over_M": list(radii),
            "directions": directions,
            "retrieval": _name(retrieval),
        },
        measured={
            "fixed_points": k,
            "max_ratio": float(ratios.max()) if ratios.numel() else math.nan,
            "lipschitz_trajectory": _quantiles(lip),
            "lipschitz_share_below_1": float((lip < 1).double().mean()),
            "lipschitz_fixed_points_share_below_1": float((lip_fp < 1).double().mean()) if k else math.nan,
            "global_certificate": certificate,
            "global_certificate_below_1": certificate < 1,
        },
        series={"ratios": _sample(ratios), "lipschitz": _sample(lip)},
    )


@register_replayer("weak contraction")
def _replay_contraction(
    tensors: Mapping[str, torch.Tensor], params: Mapping[str, Any]
) -> tuple[float, dict[str, Any]]:
    margin, tol, ratio = _contraction_margin(
        tensors["patterns"],
        tensors["point"][None],
        tensors["state"][None],
        params["beta"],
        params["alpha"],
        _resolve(params.get("retrieval"), _retrieve),
    )
    return float(margin[0]), {"ratio": float(ratio[0]), "tolerance_now": float(tol[0]), **params}


# ==================================================================================================
# orthogonal-error convergence


def _guided_map(
    patterns: torch.Tensor,
    beta: float,
    alpha_sparse: float,
    scale: float,
    zeta: float,
    eta: float,
    reference: str,
    rule: RuleFn,
) -> Callable[[torch.Tensor], torch.Tensor]:
    def g(x: torch.Tensor) -> torch.Tensor:
        dense = _retrieve(x, patterns, beta, 1.0)
        sparse = _retrieve(x, patterns, beta, alpha_sparse)
        return rule(dense, sparse, scale, zeta, eta, reference, x)

    return g


def _reference_at(
    patterns: torch.Tensor, x: torch.Tensor, beta: float, alpha_sparse: float, reference: str
) -> torch.Tensor:
    sparse = _retrieve(x, patterns, beta, alpha_sparse)
    if reference == "sparse":
        return sparse
    if reference == "dense":
        return _retrieve(x, patterns, beta, 1.0)
    if reference == "update":
        return sparse - x
    raise ValueError(f"reference must be 'sparse', 'dense' or 'update', got {reference!r}")


def _orthogonal_margin(
    patterns: torch.Tensor,
    limit: torch.Tensor,
    target: torch.Tensor,
    beta: float,
    alpha_sparse: float,
    reference: str,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u = _reference_at(patterns, limit, beta, alpha_sparse, reference)
    _, orthogonal = _decompose(limit - target, u)
    m = float(_norm(patterns).max())
    tol = tolerance(limit.dtype, ORTHOGONAL_FACTOR) * m * (1.0 + abs(scale))
    err = _norm(orthogonal)
    return tol - err, torch.full_like(err, tol), err


def check_orthogonal_error(
    case: Case,
    *,
    zeta: float = 0.0,
    scale: float = 1.0,
    eta: float = math.inf,
    reference: str = "sparse",
    alpha_sparse: float = 1.5,
    fixed_points: FixedPoints | None = None,
    targets: torch.Tensor | None = None,
    trajectory_steps: int = 20,
    max_iter: int = 300,
    rule: RuleFn | None = None,
    counterexample_dir: str | Path | None = None,
    max_counterexamples: int = 3,
) -> CheckResult:
    r"""Orthogonal-error convergence (Thm 3.7): iterating G, the error orthogonal to the reference → 0.

    The guided iteration ``ξ_{t+1} = G(ξ_t)``, ``G = S + λ(clip_η(r_∥) + ζ r_⊥)``, is solved from each
    starting state to its limit ξ_∞ by AA(5) with a stability test (a limit that plain iteration of G
    would leave is restarted from). The target ξ* is the sparse fixed point in whose basin ξ_∞ lies
    (S iterated from ξ_∞; ``measured["basin_changes"]`` counts states where this differs from the sparse
    fixed point reached from ξ₀), or ``targets``. The claim holds for a state when the limit's error
    ``ξ_∞ − ξ*`` has an orthogonal part (relative to the reference direction at ξ_∞, e.g. ``S(ξ_∞)``) of
    norm ≤ tol: whatever G adds along the reference, no orthogonal error remains. A state whose guided
    iteration has no limit fails. With ζ = 0 the added update is parallel to the reference; with ζ > 0 it
    keeps ``ζ λ r_⊥``, and the error settles where ``ζ λ r_⊥`` balances the sparse map's contraction.
    The plain iteration of G is also run ``trajectory_steps`` steps for the rate and the figure.

    ``rate``: the median over states of the per-step factor ``(‖e⊥_t‖ / ‖e⊥_0‖)^{1/t}`` over the steps
    before ``‖e⊥‖`` reaches 10 × tol (the asymptotic linear rate; 0 when the first step lands on it).

    Tolerance: ``1024 · eps · M (1 + |λ|)``: the limit is found to the solver's rounding floor,
    16 · eps · ‖G(ξ)‖ ≤ 16 · eps · M(1 + 2|λ|), and the error of a fixed point is the residual divided by
    ``1 − ρ`` (ρ < 1 the contraction factor at the limit); 1024 allows ρ up to ≈ 0.97.

    Parameters
    ----------
    zeta, scale, eta, reference : the GAG settings ζ, λ, η, and the reference direction.
    rule : callable, optional
        ``rule(dense, sparse, scale, zeta, eta, reference, state)``, default the GAG kernel.
    """
    fn = _gag if rule is None else rule
    m = case.pattern_scale
    dtype = case.patterns.dtype
    starts = case.states
    g = _guided_map(case.patterns, case.beta, alpha_sparse, scale, zeta, eta, reference, fn)
    # the limit of G, by AA(5) with a stability test
    solved = anderson(g, starts, m=5, tol=1e-30, max_iter=max_iter, stability_check=True)
    limit = torch.as_tensor(solved.x)
    limit_residual = _norm(g(limit) - limit)
    limit_converged = limit_residual <= tolerance(dtype, 256.0) * m * (1 + 2 * abs(scale))
    basin_changes = 0
    if targets is None:
        # ξ*: the sparse fixed point in whose basin the guided iteration ends
        targets, target_residual, _ = solve_fixed_points(case.patterns, limit, case.beta, alpha_sparse)
        limit_converged = limit_converged & (target_residual <= tolerance(dtype, FIXED_POINT_FACTOR) * m)
        if fixed_points is not None:
            moved = _norm(fixed_points.sparse - targets) > fixed_points.threshold
            basin_changes = int((moved & fixed_points.sparse_converged).sum())
    # plain trajectory: orthogonal and parallel error per step
    x, orth, par = starts, [], []
    for _ in range(trajectory_steps + 1):
        u = _reference_at(case.patterns, x, case.beta, alpha_sparse, reference)
        p, o = _decompose(x - targets, u)
        orth.append(_norm(o))
        par.append(_norm(p))
        x = g(x)
    orth_t, par_t = torch.stack(orth), torch.stack(par)  # (T + 1, M)
    margins, tols, err = _orthogonal_margin(
        case.patterns, limit, targets, case.beta, alpha_sparse, reference, scale
    )
    # a limit that was not reached cannot show the claim: it fails, by at least its residual
    margins = torch.where(limit_converged, margins, torch.minimum(margins, -limit_residual.clamp(min=1e-300)))
    # rate from the trajectory
    floor = 10 * float(tols[0])
    rates = []
    for j in range(orth_t.shape[1]):
        e = orth_t[:, j]
        if float(e[0]) <= floor:
            continue
        above = (e > floor).nonzero().flatten()
        last = int(above.max())  # last step still above the floor
        t = max(last, 1)
        rates.append((max(float(e[t]), 0.0) / float(e[0])) ** (1.0 / t))
    rate_t = torch.tensor(rates, dtype=torch.float64)

    def instance(where: tuple[int, ...]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        (i,) = where
        return (
            {"patterns": case.patterns, "state": starts[i], "target": targets[i], "limit": limit[i]},
            {
                "beta": case.beta,
                "alpha_sparse": alpha_sparse,
                "scale": scale,
                "zeta": zeta,
                "eta": eta,
                "reference": reference,
                "rule": _name(rule),
            },
        )

    paths = _save_worst(
        "orthogonal-error convergence",
        case,
        margins,
        instance,
        counterexample_dir,
        max_counterexamples,
        tols,
        f"zeta={zeta:g}",
    )
    rel = max(m, 1e-300)
    return _result(
        "orthogonal-error convergence",
        case,
        (margins >= 0) & limit_converged,
        margins,
        tols,
        ORTHOGONAL_FACTOR,
        "1024·eps·M(1+|λ|)",
        unit="start",
        setting=f"ζ={zeta:g}",
        rate=float(rate_t.median()) if rate_t.numel() else None,
        rate_note="median per-step factor of ‖e⊥‖ before it reaches 10·tol",
        counterexamples=paths,
        settings={"zeta": zeta, "scale": scale, "eta": eta, "reference": reference, "rule": _name(rule)},
        measured={
            "limit_orthogonal_error_over_M": _quantiles(err / rel),
            "limit_converged_share": float(limit_converged.double().mean()),
            "basin_changes": basin_changes,
            "limit_parallel_error_over_M": _quantiles(_norm(limit - targets) / rel),
        },
        series={
            "orthogonal": (orth_t / rel).median(dim=-1).values.tolist(),
            "parallel": (par_t / rel).median(dim=-1).values.tolist(),
        },
    )


@register_replayer("orthogonal-error convergence")
def _replay_orthogonal(
    tensors: Mapping[str, torch.Tensor], params: Mapping[str, Any]
) -> tuple[float, dict[str, Any]]:
    patterns = tensors["patterns"]
    rule = _resolve(params.get("rule"), _gag)
    g = _guided_map(
        patterns,
        params["beta"],
        params["alpha_sparse"],
        params["scale"],
        params["zeta"],
        params["eta"],
        params["reference"],
        rule,
    )
    solved = anderson(g, tensors["state"][None], m=5, tol=1e-30, max_iter=300, stability_check=True)
    limit = torch.as_tensor(solved.x)
    margin, tol, err = _orthogonal_margin(
        patterns,
        limit,
        tensors["target"][None],
        params["beta"],
        params["alpha_sparse"],
        params["reference"],
        params["scale"],
    )
    return float(margin[0]), {"orthogonal_error": float(err[0]), "tolerance_now": float(tol[0]), **params}


# ==================================================================================================
# bounded update


def _bounded_margin(
    patterns: torch.Tensor,
    xi: torch.Tensor,
    beta: float,
    alpha_sparse: float,
    scale: float,
    zeta: float,
    eta: float,
    reference: str,
    rule: RuleFn,
    retrievals: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    dense = _retrieve(xi, patterns, beta, 1.0) if retrievals is None else retrievals[0]
    sparse = _retrieve(xi, patterns, beta, alpha_sparse) if retrievals is None else retrievals[1]
    guided = rule(dense, sparse, scale, zeta, eta, reference, xi)
    u = {"sparse": sparse, "dense": dense, "update": sparse - xi}.get(reference)
    if u is None:
        raise ValueError(f"reference must be 'sparse', 'dense' or 'update', got {reference!r}")
    _, orthogonal = _decompose(sparse - dense, u)
    bound = abs(scale) * (eta + abs(zeta) * _norm(orthogonal))
    observed = _norm(guided - sparse)
    tol = tolerance(xi.dtype, LINEAR_FACTOR) * (
        _norm(sparse) + abs(scale) * (eta + (1.0 + abs(zeta)) * _norm(sparse - dense))
    )
    return bound + tol - observed, tol


def check_bounded_update(
    case: Case,
    *,
    scales: Sequence[float] = (-2.0, 0.5, 1.0, 3.0, 8.0),
    zetas: Sequence[float] = (0.0, 0.5, 1.0),
    etas: Sequence[float] = (0.01, 0.1, 1.0),
    references: Sequence[str] = ("sparse", "dense", "update"),
    alpha_sparse: float = 1.5,
    rule: RuleFn | None = None,
    counterexample_dir: str | Path | None = None,
    max_counterexamples: int = 3,
) -> CheckResult:
    r"""Bounded update (Remark 3.8): ``‖G(ξ) − S(ξ)‖ ≤ |λ| (η + |ζ| ‖r_⊥‖)``.

    .. math:: \lVert G(\xi) - S(\xi)\rVert \le |\lambda| (\eta + |\zeta| \lVert r_\perp\rVert)

    Every (λ, ζ, η, reference) of the grid at every starting state; η in units of M (η = ∞ makes the bound
    vacuous and is not tried). A state passes when every setting does.

    Tolerance: ``16 · eps · (‖S‖ + |λ| (η + (1 + |ζ|) ‖r‖))``: G − S is a sum of the capped parallel part
    and ζ r_⊥, each rounded to a few eps of its norm.

    Parameters
    ----------
    rule : callable, optional
        ``rule(dense, sparse, scale, zeta, eta, reference, state)``, default the GAG kernel; a rule that
        ignores the cap fails.
    """
    fn = _gag if rule is None else rule
    m = case.pattern_scale
    grid = [(s, z, e, r) for s in scales for z in zetas for e in etas for r in references]
    both = (
        _retrieve(case.states, case.patterns, case.beta, 1.0),
        _retrieve(case.states, case.patterns, case.beta, alpha_sparse),
    )
    pairs = [
        _bounded_margin(case.patterns, case.states, case.beta, alpha_sparse, s, z, e * m, r, fn, both)
        for s, z, e, r in grid
    ]
    margins = torch.stack([p[0] for p in pairs], dim=-1)
    tols = torch.stack([p[1] for p in pairs], dim=-1)

    def instance(where: tuple[int, ...]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        i, k = where
        s, z, e, r = grid[k]
        return (
            {"patterns": case.patterns, "state": case.states[i]},
            {
                "beta": case.beta,
                "alpha_sparse": alpha_sparse,
                "scale": s,
                "zeta": z,
                "eta": e * m,
                "reference": r,
                "rule": _name(rule),
            },
        )

    paths = _save_worst(
        "bounded update", case, margins, instance, counterexample_dir, max_counterexamples, tols
    )
    return _result(
        "bounded update",
        case,
        (margins >= 0).all(dim=-1),
        margins,
        tols,
        LINEAR_FACTOR,
        "16·eps·(‖S‖+|λ|(η+(1+|ζ|)‖r‖))",
        setting=f"{len(grid)} (λ,ζ,η,ref)",
        counterexamples=paths,
        settings={
            "scales": list(scales),
            "zetas": list(zetas),
            "etas_over_M": list(etas),
            "references": list(references),
            "rule": _name(rule),
        },
    )


@register_replayer("bounded update")
def _replay_bounded(
    tensors: Mapping[str, torch.Tensor], params: Mapping[str, Any]
) -> tuple[float, dict[str, Any]]:
    margin, tol = _bounded_margin(
        tensors["patterns"],
        tensors["state"][None],
        params["beta"],
        params["alpha_sparse"],
        params["scale"],
        params["zeta"],
        params["eta"],
        params["reference"],
        _resolve(params.get("rule"), _gag),
    )
    return float(margin[0]), {"tolerance_now": float(tol[0]), **params}


# ==================================================================================================
# directional consistency


def _directional(
    patterns: torch.Tensor, xi: torch.Tensor, target: torch.Tensor, beta: float, alpha_sparse: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cos toward the target, cos with the retrieval direction, tol, degenerate)."""
    dense = _retrieve(xi, patterns, beta, 1.0)
    sparse = _retrieve(xi, patterns, beta, alpha_sparse)
    r = sparse - dense
    toward = target - dense
    tiny = 1e-300
    cos_target = (r * toward).sum(-1) / (_norm(r) * _norm(toward)).clamp(min=tiny)
    cos_retrieval = (r * sparse).sum(-1) / (_norm(r) * _norm(sparse)).clamp(min=tiny)
    m = float(_norm(patterns).max())
    threshold = tolerance(xi.dtype, 256.0) * m
    degenerate = (_norm(r) <= threshold) | (_norm(toward) <= threshold)
    tol = tolerance(xi.dtype, LINEAR_FACTOR) * xi.shape[-1]
    return cos_target, cos_retrieval, torch.full_like(cos_target, tol), degenerate


def check_directional_consistency(
    case: Case,
    *,
    alpha_sparse: float = 1.5,
    fixed_points: FixedPoints | None = None,
    targets: torch.Tensor | None = None,
    counterexample_dir: str | Path | None = None,
    max_counterexamples: int = 3,
) -> CheckResult:
    r"""Directional consistency: ``r = S(ξ) − D(ξ)`` points toward the sparse fixed point.

    The claim checked is ``⟨r, ξ*_S − D(ξ)⟩ > 0``.

    For each starting state ξ whose sparse iteration converged, ξ*_S is its sparse fixed point (or
    ``targets``). The share of states with ``⟨r, ξ*_S − D(ξ)⟩ > 0`` is the pass rate; the share with
    ``⟨r, S(ξ)⟩ > 0`` (alignment with the retrieval direction) is measured beside it. States where
    ``‖r‖`` or ``‖ξ*_S − D(ξ)‖`` is at most τ = 256 · eps · M have no direction and are not counted
    (``measured["degenerate"]``). Margins are cosines.

    Tolerance: a cosine must exceed ``16 · eps · d`` to count as positive (the rounding of a length-d
    inner product relative to the product of the norms).
    """
    if targets is None:
        fp = fixed_points if fixed_points is not None else find_fixed_points(case, alpha_sparse=alpha_sparse)
        keep = fp.sparse_converged
        states, targets = case.states[keep], fp.sparse[keep]
    else:
        states = case.states
    cos_t, cos_r, tols, degenerate = _directional(case.patterns, states, targets, case.beta, alpha_sparse)
    use = ~degenerate
    margins = (cos_t - tols)[use]
    idx = use.nonzero().flatten()

    def instance(where: tuple[int, ...]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        i = int(idx[where[0]])
        return (
            {"patterns": case.patterns, "state": states[i], "target": targets[i]},
            {"beta": case.beta, "alpha_sparse": alpha_sparse},
        )

    paths = _save_worst(
        "directional consistency", case, margins, instance, counterexample_dir, max_counterexamples, tols[use]
    )
    return _result(
        "directional consistency",
        case,
        margins >= 0,
        margins,
        tols[use] if bool(use.any()) else torch.tensor([]),
        LINEAR_FACTOR,
        "cosine > 16·eps·d",
        unit="start (cosine)",
        setting=f"α={alpha_sparse:g}",
        counterexamples=paths,
        settings={"alpha_sparse": alpha_sparse},
        measured={
            "share_toward_sparse_fixed_point": float((cos_t[use] > tols[use]).double().mean())
            if bool(use.any())
            else math.nan,
            "share_aligned_with_retrieval": float((cos_r[use] > tols[use]).double().mean())
            if bool(use.any())
            else math.nan,
            "degenerate": int(degenerate.sum()),
            "cos_toward_target": _quantiles(cos_t[use]),
        },
    )


@register_replayer("directional consistency")
def _replay_directional(
    tensors: Mapping[str, torch.Tensor], params: Mapping[str, Any]
) -> tuple[float, dict[str, Any]]:
    cos_t, cos_r, tol, degenerate = _directional(
        tensors["patterns"],
        tensors["state"][None],
        tensors["target"][None],
        params["beta"],
        params["alpha_sparse"],
    )
    return float(cos_t[0] - tol[0]), {
        "cos_toward_target": float(cos_t[0]),
        "cos_with_retrieval": float(cos_r[0]),
        "degenerate": bool(degenerate[0]),
        **params,
    }


# ==================================================================================================
# deeper AA: the α-ladder


def check_ladder(
    case: Case,
    *,
    ladder: Sequence[float] = (1.0, 1.25, 1.5, 2.0),
    scales: Sequence[float] = (1.0, 1.5, 2.0, 3.0, 5.0),
    alpha_sparse: float = 1.5,
    fixed_points: FixedPoints | None = None,
    targets: torch.Tensor | None = None,
) -> CheckResult:
    r"""The Anderson-mixed α-ladder (THEORY.md §4): is ``L_λ`` closer to the sparse fixed point than ``P_λ``?

    For each starting state with a converged sparse fixed point ξ*_S, the retrievals at the α of
    ``ladder`` are mixed by :func:`~hopfield_aa.geometry.ladder_extrapolate` (``L_λ = D + λ(A − D)``,
    ``A`` the Anderson estimate of the ladder's limit) and compared with plain extrapolation
    ``P_λ = D + λ(S − D)`` at the same λ: one tried "state" is one (start, λ), and it counts as passed when
    ``‖L_λ − ξ*_S‖ < ‖P_λ − ξ*_S‖``. A measurement, not a claim of the theory (status ``measured``);
    margins are ``(‖P_λ − ξ*_S‖ − ‖L_λ − ξ*_S‖) / M``.
    """
    if targets is None:
        fp = fixed_points if fixed_points is not None else find_fixed_points(case, alpha_sparse=alpha_sparse)
        keep = fp.sparse_converged
        states, targets = case.states[keep], fp.sparse[keep]
    else:
        states = case.states
    m = case.pattern_scale
    rungs = [_retrieve(states, case.patterns, case.beta, a) for a in ladder]
    dense, sparse = rungs[0], _retrieve(states, case.patterns, case.beta, alpha_sparse)
    d_ladder = torch.stack([_norm(_ladder_extrapolate(rungs, s) - targets) for s in scales], dim=-1) / m
    d_plain = torch.stack([_norm(_extrapolate(dense, sparse, s) - targets) for s in scales], dim=-1) / m
    margins = d_plain - d_ladder
    return _result(
        LADDER,
        case,
        (margins > 0).reshape(-1),
        margins,
        0.0,
        0.0,
        "strict comparison",
        status=STATUS_MEASURED,
        unit="start × λ",
        setting="α∈{" + ",".join(f"{a:g}" for a in ladder) + "}",
        rate=float((d_ladder / d_plain.clamp(min=1e-300)).median()) if d_plain.numel() else None,
        rate_note="median ‖L_λ−ξ*_S‖/‖P_λ−ξ*_S‖",
        settings={"ladder": list(ladder), "scales": list(scales), "alpha_sparse": alpha_sparse},
        measured={
            f"share_closer_at_{s:g}": float((margins[:, k] > 0).double().mean())
            if margins.numel()
            else math.nan
            for k, s in enumerate(scales)
        },
        series={
            "scales": list(scales),
            "ladder": d_ladder.median(dim=0).values.tolist() if d_ladder.numel() else [],
            "plain": d_plain.median(dim=0).values.tolist() if d_plain.numel() else [],
        },
    )
