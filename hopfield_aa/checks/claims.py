"""One check per claim of papers/theory.md (and the deeper Anderson ladder), each returning a
:class:`~hopfield_aa.checks.results.CheckResult` with its verdict and saving its worst counter-examples.

Conventions shared by every check: margins are (allowed − observed), so a negative margin is a violation;
only states that meet the claim's premise are counted (the others are reported as such, never as
failures); the tolerance is a stated factor of the compute dtype's epsilon times a stated scale (usually
``M``, the largest pattern norm); the worst ``max_counterexamples`` violations are saved when
``counterexample_dir`` (a folder or a :class:`~hopfield_aa.checks.results.CounterexampleStore`) is given.
Each check accepts the mathematical object it tests as an argument (the step, rule, map, points or
targets), so the tests can hand it a case where the claim must fail.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from hopfield_aa.anderson import anderson, anderson_step
from hopfield_aa.checks.fixed_points import (
    FIXED_POINT_FACTOR,
    FixedPoints,
    distinct,
    find_fixed_points,
    in_dtype,
    lipschitz_bounds,
    local_lipschitz,
    solve_fixed_points,
    solver_dtype,
    spectral_radius_fd,
)
from hopfield_aa.checks.results import (
    KIND_CLAIM,
    KIND_IDENTITY,
    KIND_MEASURED,
    Case,
    CheckResult,
    CounterexampleStore,
    ReplayFn,
    save_counterexample,
    status_of,
    tolerance,
)
from hopfield_aa.geometry import (
    _decompose,
    _extrapolate,
    _gag,
    _guided_map,
    _ladder_extrapolate,
    _reference_direction,
    _reference_vector,
)
from hopfield_aa.hopfield import _energy, _retrieve

LADDER = "ladder AA (deeper)"

# Tolerance factors (times eps of the compute dtype); each check's docstring says what they multiply.
ENERGY_FACTOR = 64.0
LINEAR_FACTOR = 16.0
CONTRACTION_FACTOR = 16.0
ORTHOGONAL_FACTOR = 1024.0
# Slack on the orthogonal error's rate: its per-step factor may exceed ρ(DG(ξ*)) by this much (or by half
# the gap to 1 when that is smaller), for the nonlinearity over the few steps the rate is measured on.
RATE_SLACK = 0.05
# "Near ξ*" for the orthogonal-error rate: within this multiple of M (the theorem is asymptotic).
NEAR = 1e-2

ORTHOGONAL_PREMISE = "G's limit ξ∞ is an attracting fixed point of G and a fixed point of S, reached from ξ₀"

StepFn = Callable[[torch.Tensor, torch.Tensor, float, float], torch.Tensor]
RuleFn = Callable[..., torch.Tensor]
Sink = "str | Path | CounterexampleStore | None"


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
    directory: str | Path | CounterexampleStore | None,
    limit: int,
    tol: torch.Tensor | float,
    setting: str = "",
) -> list[str]:
    """Save the ``limit`` most negative margins (at most one per first index, i.e. per state).

    Margins of states outside the premise must be passed as NaN or +inf: they are never saved.
    """
    if directory is None or limit <= 0 or not bool((margins < 0).any()):
        return []
    store = directory if isinstance(directory, CounterexampleStore) else CounterexampleStore(directory, None)
    flat = margins.reshape(-1)
    tols = torch.as_tensor(tol, dtype=margins.dtype).expand_as(margins).reshape(-1)
    order = torch.argsort(torch.nan_to_num(flat, nan=math.inf))
    paths: list[str] = []
    seen: set[int] = set()
    rank = 0
    for idx in order.tolist():
        if not bool(flat[idx] < 0) or rank >= limit:
            break
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), margins.shape))
        if where[0] in seen:
            continue
        seen.add(where[0])

        def write(folder: Path, where: tuple[int, ...] = where, idx: int = idx, rank: int = rank) -> str:
            tensors, params = instance(where)
            return save_counterexample(
                folder,
                claim=claim,
                data=case.data,
                form=case.form,
                tensors=tensors,
                params=params,
                margin=float(flat[idx]),
                tolerance=float(tols[idx]),
                rank=rank,
                setting=setting,
            )

        path = store.offer(claim, float(flat[idx]), write)
        rank += 1
        if path is not None:
            paths.append(path)
    return paths


def _result(
    claim: str,
    case: Case,
    passed: torch.Tensor,
    margins: torch.Tensor,
    tol: torch.Tensor | float,
    factor: float,
    note: str,
    *,
    kind: str = KIND_CLAIM,
    premise: str = "",
    premise_met: torch.Tensor | None = None,
    premise_note: str = "",
    **fields: Any,
) -> CheckResult:
    """A result from per-unit ``passed`` flags and margins; ``premise_met`` (same shape) marks the units
    the verdict counts (default: all)."""
    met = (
        torch.ones_like(passed, dtype=torch.bool)
        if premise_met is None
        else premise_met.reshape(passed.shape)
    )
    n = int(passed.numel())
    n_premise = int(met.sum())
    n_pass = int((passed & met).sum())
    counted = margins.reshape(-1)[met.reshape(-1)] if margins.numel() == met.numel() else margins.reshape(-1)
    counted = counted[~torch.isnan(counted)] if counted.numel() else counted
    tol_t = torch.as_tensor(tol)
    tol_value = float(tol_t.max()) if tol_t.numel() else math.nan
    status = fields.pop("status", None) or status_of(n_premise, n_pass, kind)
    return CheckResult(
        claim=claim,
        data=dict(case.data),
        form=case.form,
        status=status,
        kind=kind,
        premise=premise,
        n_states=n,
        n_premise=n_premise,
        n_passed=n_pass,
        premise_note=premise_note,
        worst_margin=float(counted.min()) if counted.numel() else math.nan,
        tolerance=tol_value,
        tolerance_factor=factor,
        tolerance_note=note,
        **fields,
    )


def _identity_per_state(
    claim: str,
    case: Case,
    margins: torch.Tensor,
    tols: torch.Tensor,
    note: str,
    instance: Callable[[tuple[int, ...]], tuple[dict[str, torch.Tensor], dict[str, Any]]],
    sink: tuple[str | Path | CounterexampleStore | None, int],
    **fields: Any,
) -> CheckResult:
    """An identity of the library's rule tried at every (state, setting), margins (M, K) with tolerances
    ``16 · eps`` times a scale (``note``): a state passes when every setting does; the worst saved to
    ``sink`` (counter-example folder or store, how many)."""
    paths = _save_worst(claim, case, margins, instance, sink[0], sink[1], tols)
    return _result(
        claim,
        case,
        (margins >= 0).all(dim=-1),
        margins,
        tols,
        LINEAR_FACTOR,
        note,
        kind=KIND_IDENTITY,
        counterexamples=paths,
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


def _reasons(counts: Mapping[str, int]) -> str:
    """``"3 repelling (ρ ≥ 1); 2 no limit"``: why states did not meet the premise (zero counts left out)."""
    return "; ".join(f"{n} {why}" for why, n in counts.items() if n)


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
    counterexample_dir: str | Path | CounterexampleStore | None = None,
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
        xs = [case.states]
        for _ in range(steps):
            xs.append(fn(xs[-1], case.patterns, case.beta, alpha))
        path = torch.stack(xs, dim=1)  # (M, steps + 1, d)
        # the energies of the whole trajectory in one evaluation (each row is one state's energy)
        flat = path.reshape(-1, path.shape[-1])
        e = _energy(flat, case.patterns, case.beta, alpha).reshape(path.shape[:-1])  # (M, steps + 1)
        margin, tol, _ = _energy_margin(
            case.patterns, path[:, :-1], path[:, 1:], case.beta, alpha, (e[:, :-1], e[:, 1:])
        )
        margins.append(margin)  # (M, steps)
        tols.append(tol)
        trajectories.append(path[:, :-1])  # (M, steps, d)
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
        premise="T_α is the retrieval map of the energy's own patterns (every state)",
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
    counterexample_dir: str | Path | CounterexampleStore | None = None,
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
    wide = solver_dtype(xi.dtype)  # the least squares need float32 at least
    _, gamma = anderson_step(
        torch.stack([xi, xi]).to(wide), torch.stack([dense, sparse]).to(wide), return_gamma=True
    )
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

    return _identity_per_state(
        "extrapolation is AA(1)",
        case,
        margins,
        tols,
        "16·eps·(‖ξ‖+(1+|λ|+|1−λ|)M)",
        instance,
        (counterexample_dir, max_counterexamples),
        setting="λ∈{" + ",".join(f"{s:g}" for s in scales) + "}",
        settings={"scales": list(scales), "alpha_sparse": alpha_sparse, "rule": _name(rule)},
        measured={
            "lambda_star": _quantiles(lam_star),
            "lambda_star_undetermined": int((~nondegenerate).sum()),
        },
        series={"lambda_star": _sample(lam_star)},
    )


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
# the (λ, ζ, η, reference) grid of the rule identities (preservation, bounded update)


class _RuleInputs(NamedTuple):
    """What a guidance rule acts on: the memory, the vectors ξ (states or fixed points), D(ξ) and S(ξ)."""

    patterns: torch.Tensor
    vector: torch.Tensor
    dense: torch.Tensor
    sparse: torch.Tensor

    @classmethod
    def at(
        cls, patterns: torch.Tensor, vector: torch.Tensor, beta: float, alpha_sparse: float
    ) -> _RuleInputs:
        dense = _retrieve(vector, patterns, beta, 1.0)
        return cls(patterns, vector, dense, _retrieve(vector, patterns, beta, alpha_sparse))


@dataclass(frozen=True)
class _RuleGrid:
    """Every (λ, ζ, η, reference) a guidance rule is tried at, λ-major; η in units of M."""

    scales: Sequence[float]
    zetas: Sequence[float]
    etas: Sequence[float]
    references: Sequence[str]

    @property
    def points(self) -> list[tuple[float, float, float, str]]:
        return list(itertools.product(self.scales, self.zetas, self.etas, self.references))

    @property
    def label(self) -> str:
        return f"{len(self.points)} (λ,ζ,η,ref)"

    def setting(self, k: int, m: float) -> dict[str, Any]:
        """The k-th setting as the margins and the saved counter-examples take it (η in absolute units)."""
        scale, zeta, eta, reference = self.points[k]
        return {"scale": scale, "zeta": zeta, "eta": eta * m, "reference": reference}

    def settings(self, rule: RuleFn | None) -> dict[str, Any]:
        return {
            "scales": list(self.scales),
            "zetas": list(self.zetas),
            "etas_over_M": list(self.etas),
            "references": list(self.references),
            "rule": _name(rule),
        }

    def margins(
        self, margin: Callable[[dict[str, Any]], tuple[torch.Tensor, torch.Tensor]], m: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(margins, tolerances), one column per setting, from ``margin(setting)``."""
        pairs = [margin(self.setting(k, m)) for k in range(len(self.points))]
        return torch.stack([p[0] for p in pairs], dim=-1), torch.stack([p[1] for p in pairs], dim=-1)


def _replay_rule_setting(
    margin: Callable[[_RuleInputs, Mapping[str, Any], RuleFn], tuple[torch.Tensor, torch.Tensor]], vector: str
) -> ReplayFn:
    """The replay of a saved rule-grid counter-example: ``margin`` at its ``vector`` and setting."""

    def replay(
        tensors: Mapping[str, torch.Tensor], params: Mapping[str, Any]
    ) -> tuple[float, dict[str, Any]]:
        at = _RuleInputs.at(
            tensors["patterns"], tensors[vector][None], params["beta"], params["alpha_sparse"]
        )
        value, tol = margin(at, params, _resolve(params.get("rule"), _gag))
        return float(value[0]), {"tolerance_now": float(tol[0]), **params}

    return replay


# ==================================================================================================
# fixed-point preservation


def _preservation_margin(
    at: _RuleInputs, setting: Mapping[str, Any], rule: RuleFn
) -> tuple[torch.Tensor, torch.Tensor]:
    """(margin, tol) of P_λ(ξ*) = G(ξ*) = ξ* at ``setting`` (scale, zeta, eta, reference, threshold τ)."""
    patterns, point, dense, sparse = at
    scale, zeta, threshold = setting["scale"], setting["zeta"], setting["threshold"]
    guided = rule(dense, sparse, scale, zeta, setting["eta"], setting["reference"], point)
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
    counterexample_dir: str | Path | CounterexampleStore | None = None,
    max_counterexamples: int = 3,
) -> CheckResult:
    r"""Fixed-point preservation (Lemma 3.3), an identity: at ξ* fixed by D and S, ``P_λ(ξ*) = G(ξ*) = ξ*``.

    The unit is a *distinct* fixed point: the limits of the dense and sparse maps from every starting
    state (:func:`~hopfield_aa.checks.fixed_points.find_fixed_points`) merged when closer than √(τM). The
    premise is that the point is common to both maps (residuals ≤ τ = 256 · eps · M); every (λ, ζ, η,
    reference) of the grid is tried there (η in units of M) and a point passes when all do. ``points``
    replaces the fixed points found (each is then taken to meet the premise). Softmax weights every
    pattern, so at finite β a common fixed point exists only once the weights off one pattern fall below
    rounding: ``measured["premise_beta"]`` is the β from which some pattern is one
    (:func:`~hopfield_aa.checks.fixed_points.premise_beta`), beside the case's β.

    With the library's rule the statement holds by construction (r(ξ*) = 0 and every rule is linear in
    r): verdict ``identity``, a regression test of the rule, not evidence.

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
    m = case.pattern_scale
    n_distinct = 0
    beta_premise = math.nan
    if points is None:
        fp = fixed_points if fixed_points is not None else find_fixed_points(case, alpha_sparse=alpha_sparse)
        points = fp.common_points()
        n_distinct = int(fp.distinct_points().shape[0])
        threshold = fp.threshold
        beta_premise = fp.premise_beta
    else:
        threshold = tolerance(case.patterns.dtype, FIXED_POINT_FACTOR) * m
        n_distinct = int(points.shape[0])
    n_common = int(points.shape[0])
    grid = _RuleGrid(scales, zetas, etas, references)
    if n_common == 0:
        margins = torch.zeros(0, len(grid.points), dtype=case.patterns.dtype)
        tols = torch.zeros_like(margins)
    else:
        at = _RuleInputs.at(case.patterns, points, case.beta, alpha_sparse)
        margins, tols = grid.margins(
            lambda setting: _preservation_margin(at, {**setting, "threshold": threshold}, fn), m
        )

    def instance(where: tuple[int, ...]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        i, k = where
        return (
            {"patterns": case.patterns, "point": points[i]},
            {
                "beta": case.beta,
                "alpha_sparse": alpha_sparse,
                **grid.setting(k, m),
                "threshold": threshold,
                "rule": _name(rule),
            },
        )

    paths = _save_worst(
        "fixed-point preservation", case, margins, instance, counterexample_dir, max_counterexamples, tols
    )
    # units: the distinct fixed points; the non-common ones do not meet the premise
    passed = torch.zeros(max(n_distinct, n_common), dtype=torch.bool)
    met = torch.zeros_like(passed)
    met[:n_common] = True
    passed[:n_common] = (margins >= 0).all(dim=-1)
    unit_margins = torch.full((passed.numel(),), math.nan, dtype=case.patterns.dtype)
    unit_margins[:n_common] = margins.amin(dim=-1) if margins.numel() else unit_margins[:n_common]
    return _result(
        "fixed-point preservation",
        case,
        passed,
        unit_margins,
        tols if tols.numel() else torch.tensor([]),
        LINEAR_FACTOR,
        "τ(1+2|λ|(1+|ζ|))+16·eps·M(1+|λ|), τ=256·eps·M",
        kind=KIND_IDENTITY,
        premise="ξ* is a fixed point of both D and S (to τ)",
        premise_met=met,
        premise_note=f"{n_distinct - n_common} distinct fixed points not common"
        if n_distinct > n_common
        else "",
        unit="distinct fixed point",
        setting=grid.label,
        counterexamples=paths,
        settings=grid.settings(rule),
        measured={
            "distinct_fixed_points": n_distinct,
            "distinct_common": n_common,
            "common_share": n_common / n_distinct if n_distinct else math.nan,
            "premise_beta": beta_premise,
            "beta": case.beta,
        },
    )


_replay_preservation = _replay_rule_setting(_preservation_margin, "point")


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
    counterexample_dir: str | Path | CounterexampleStore | None = None,
    max_counterexamples: int = 3,
) -> CheckResult:
    r"""Divergence at non-common fixed points (Remark 3.4): ``‖P_λ(ξ*) − ξ*‖ = |λ| ‖r(ξ*)‖``, linear in λ.

    The unit is a distinct dense fixed point (limits from different states merged); the premise is that
    it is not common, ``S(ξ*) ≠ ξ*`` (residual ``‖r‖ > τ``). ``points`` replaces them (each then taken to
    meet the premise). A point passes when the law holds at every λ of the grid (λ = 0 included, which
    demands ``D(ξ*) = ξ*``: a point that is not a dense fixed point fails). ``rate`` is the median slope
    ``‖r(ξ*)‖ / M``: how fast extrapolation leaves the fixed point, per unit of λ. Given its premise the
    law holds by construction of P_λ: verdict ``identity``, a regression test, not evidence.

    Tolerance: ``τ + 16 · eps · M (1 + 2|λ|)``, τ = 256 · eps · M: ``P_λ(ξ*) − ξ* = (D(ξ*) − ξ*) + λ r``
    differs from ``λ r`` by the dense residual (≤ τ at a fixed point) plus rounding.
    """
    n_common = 0
    if points is None:
        fp = fixed_points if fixed_points is not None else find_fixed_points(case, alpha_sparse=alpha_sparse)
        dense = fp.dense[fp.dense_converged]
        dense = dense[distinct(dense, fp.merge_radius)]
        threshold = fp.threshold
        cross = _norm(_retrieve(dense, case.patterns, case.beta, alpha_sparse) - dense)
        points = dense[cross > threshold]
        n_common = int((cross <= threshold).sum())
    else:
        threshold = tolerance(case.patterns.dtype, FIXED_POINT_FACTOR) * case.pattern_scale
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
    k = int(points.shape[0])
    passed = torch.zeros(k + n_common, dtype=torch.bool)
    passed[:k] = (margins >= 0).all(dim=-1)
    met = torch.zeros_like(passed)
    met[:k] = True
    unit_margins = torch.full((k + n_common,), math.nan, dtype=case.patterns.dtype)
    if k:
        unit_margins[:k] = margins.amin(dim=-1)
    return _result(
        "divergence at non-common fixed points",
        case,
        passed,
        unit_margins,
        tols,
        LINEAR_FACTOR,
        "τ+16·eps·M(1+2|λ|), τ=256·eps·M",
        kind=KIND_IDENTITY,
        premise="ξ* is a dense fixed point with S(ξ*) ≠ ξ*",
        premise_met=met,
        premise_note=f"{n_common} distinct dense fixed points are common" if n_common else "",
        unit="distinct dense fixed point",
        setting="λ∈{" + ",".join(f"{s:g}" for s in scales) + "}",
        rate=float(slope.median()) if slope.numel() else None,
        rate_note="median ‖r(ξ*)‖/M: distance moved per unit λ",
        counterexamples=paths,
        settings={"scales": list(scales), "alpha_sparse": alpha_sparse},
        measured={"non_common_points": k, "slope_over_M": _quantiles(slope)},
        series=series,
    )


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
    patterns: torch.Tensor, point: torch.Tensor, state: torch.Tensor, mapped: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(margin, tol, ratio) of ‖T(ξ) − ξ*‖ ≤ ‖ξ − ξ*‖ per state, ``mapped`` = T(ξ)."""
    m = float(_norm(patterns).max())
    before = _norm(state - point)
    after = _norm(mapped - point)
    tol = tolerance(point.dtype, FIXED_POINT_FACTOR + CONTRACTION_FACTOR) * m
    return before + tol - after, torch.full_like(before, tol), after / before.clamp(min=1e-300)


def _map_radius(
    patterns: torch.Tensor, points: torch.Tensor, beta: float, alpha: float, retrieval: StepFn | None
) -> torch.Tensor:
    """ρ(DT(ξ*)): exact (symmetric PSD Jacobian) for the library's map, by differences for a custom one."""
    if retrieval is None:
        return local_lipschitz(points, patterns, beta, alpha)
    wide = solver_dtype(points.dtype)
    scale = float(_norm(patterns).max())
    return spectral_radius_fd(
        lambda x: retrieval(x.to(points.dtype), patterns, beta, alpha).to(wide), points.to(wide), scale
    ).to(points.dtype)


# the plain iteration that finds a trajectory's own limit: at most this many steps, and two limits closer
# than this share of the pattern scale are the same fixed point
_LIMIT_STEPS = 2000
_LIMIT_SEPARATION = 1e-6


def _plain_limit(
    fn: StepFn, start: torch.Tensor, patterns: torch.Tensor, beta: float, alpha: float, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain iteration ξ ← T(ξ) from ``start`` until every row moves by at most ``threshold`` (or
    ``_LIMIT_STEPS``); returns (ξ, ‖T(ξ) − ξ‖)."""
    x = start
    for _ in range(_LIMIT_STEPS):
        nxt = fn(x, patterns, beta, alpha)
        step = _norm(nxt - x)
        x = nxt
        if bool((step <= threshold).all()):
            break
    return x, _norm(fn(x, patterns, beta, alpha) - x)


def check_weak_contraction(
    case: Case,
    *,
    alpha: float = 1.0,
    fixed_points: FixedPoints | None = None,
    points: torch.Tensor | None = None,
    trajectory_steps: int = 8,
    retrieval: StepFn | None = None,
    counterexample_dir: str | Path | CounterexampleStore | None = None,
    max_counterexamples: int = 3,
) -> CheckResult:
    r"""Weak contraction along the trajectories: ``‖T(ξ_t) − ξ*‖ ≤ ‖ξ_t − ξ*‖`` with ``ξ_{t+1} = T(ξ_t)``.

    From each starting state ξ₀ (the actual queries, on traces) the map ``T = T_α`` is iterated
    ``trajectory_steps`` times; ξ* is the fixed point its trajectory converges to (the limit found from
    ξ₀ by :func:`~hopfield_aa.checks.fixed_points.find_fixed_points`, re-solved from the trajectory's end
    when the trajectory leaves it, and replaced by the limit of the plain iteration continued from the
    trajectory's end where that converges to another fixed point), or the row of ``points`` (one per
    state, or one for all). Premise:
    ξ* is an attracting fixed point, ``ρ(DT(ξ*)) < 1``; repelling fixed points (saddles) and states
    without a limit do not meet it and are counted apart. One tried "state" is one (start, step).
    ``rate`` is the median per-step ratio ``‖T(ξ_t) − ξ*‖ / ‖ξ_t − ξ*‖``.

    Measured beside it, along the same trajectories: the local Lipschitz constant ``‖DT(ξ_t)‖₂`` (exact,
    the Jacobian is symmetric PSD) and the N-independent bound ``β σ D_S²/4`` on the support
    (:func:`~hopfield_aa.checks.fixed_points.lipschitz_bounds`; for softmax the global ``β D²/4``).

    Tolerance: ``(256 + 16) · eps · M``: ξ* is fixed only to τ = 256 · eps · M, which shifts ``T(ξ) − ξ*``
    by at most τ, plus the rounding of one retrieval.

    Parameters
    ----------
    alpha : float
        The map: 1 for the dense map D, > 1 for a sparse map.
    retrieval : callable, optional
        ``retrieval(states, patterns, beta, alpha)``, default ``T_α``; its fixed point's spectral radius is
        then measured by differences.
    points : Tensor (M, d) or (1, d), optional
        The fixed point of each trajectory, instead of those found.
    """
    fn = _retrieval(retrieval)
    m = case.pattern_scale
    dtype = case.patterns.dtype
    threshold = tolerance(dtype, FIXED_POINT_FACTOR) * m
    # the trajectories from the starting states
    xs = [case.states]
    for _ in range(trajectory_steps):
        xs.append(fn(xs[-1], case.patterns, case.beta, alpha))
    traj = torch.stack(xs, dim=1)  # (M, T + 1, d)
    n_states, d = case.states.shape
    radius = torch.full((n_states,), math.nan, dtype=dtype)
    known = torch.zeros(n_states, dtype=torch.bool)  # rows whose ρ(DT(ξ*)) the fixed points carry
    if points is None:
        fp = (
            fixed_points
            if fixed_points is not None
            else find_fixed_points(case, alpha_sparse=max(alpha, 1.5))
        )
        if alpha == fp.alpha_dense:
            targets, residual, found = fp.dense.clone(), fp.dense_residual.clone(), fp.dense_radius
        elif alpha == fp.alpha_sparse:
            targets, residual, found = fp.sparse.clone(), fp.sparse_residual.clone(), fp.sparse_radius
        else:
            raise ValueError(f"alpha={alpha} is neither the dense nor the sparse map of fixed_points")
        # where the plain trajectory heads elsewhere than the accelerated solve went, re-solve from its end
        away = _norm(traj[:, -1] - targets) > 0.5 * _norm(traj[:, 0] - targets)
        if bool(away.any()):
            again, res_again, _ = solve_fixed_points(case.patterns, traj[away, -1], case.beta, alpha)
            targets[away], residual[away] = again, res_again
        # ξ* is the limit of the trajectory itself: where the plain iteration, continued from the
        # trajectory's end, converges to another fixed point than the solve found, that one is ξ*
        limit, limit_residual = _plain_limit(fn, traj[:, -1], case.patterns, case.beta, alpha, threshold)
        elsewhere = (limit_residual <= threshold) & (_norm(limit - targets) > _LIMIT_SEPARATION * m)
        if bool(elsewhere.any()):
            targets[elsewhere], residual[elsewhere] = limit[elsewhere], limit_residual[elsewhere]
            away = away | elsewhere
        if retrieval is None:  # the library's map: ρ(DT(ξ*)) is known where the solve was not redone
            known = ~away
            radius[known] = found[known]
    else:
        targets = points.expand(n_states, d) if points.shape[0] == 1 else points
        residual = _norm(fn(targets, case.patterns, case.beta, alpha) - targets)
    converged = residual <= threshold
    radius[~converged] = math.nan
    todo = converged & ~known
    if bool(todo.any()):
        radius[todo] = _map_radius(case.patterns, targets[todo], case.beta, alpha, retrieval)
    attracting = converged & (radius < 1)
    repelling = converged & (radius >= 1)
    before = traj[:, :-1]
    # the trajectory holds T(ξ_t) already: ξ_{t+1}
    margins, tols, ratios = _contraction_margin(case.patterns, targets[:, None, :], before, traj[:, 1:])
    shape = (n_states, trajectory_steps)
    # a step that starts on ξ* (to τ) has no direction: its ratio is not a contraction factor
    moving = _norm(before - targets[:, None, :]) > threshold
    met = attracting[:, None].expand(shape)
    counted = torch.where(met, margins, torch.full_like(margins, math.nan))

    # measured beside the claim: local Lipschitz constants and N-independent bounds along the trajectories
    lip = local_lipschitz(before.reshape(-1, d), case.patterns, case.beta, alpha)
    global_bound, local_bound = lipschitz_bounds(before.reshape(-1, d), case.patterns, case.beta, alpha)

    def instance(where: tuple[int, ...]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        i, t = where
        return (
            {"patterns": case.patterns, "point": targets[i], "state": before[i, t]},
            {"beta": case.beta, "alpha": alpha, "retrieval": _name(retrieval), "step": t},
        )

    paths = _save_worst(
        "weak contraction",
        case,
        counted,
        instance,
        counterexample_dir,
        max_counterexamples,
        tols,
        f"alpha={alpha:g}",
    )
    kept = met & moving
    return _result(
        "weak contraction",
        case,
        (margins >= 0).reshape(-1),
        counted,
        tols,
        FIXED_POINT_FACTOR + CONTRACTION_FACTOR,
        "(256+16)·eps·M",
        premise="ξ* (the trajectory's limit) is an attracting fixed point, ρ(DT(ξ*)) < 1",
        premise_met=met.reshape(-1),
        premise_note=_reasons(
            {
                "starts with a repelling limit (ρ ≥ 1)": int(repelling.sum()),
                "starts without a limit": int((~converged).sum()),
            }
        ),
        unit="start × step",
        setting=f"α={alpha:g}",
        rate=float(ratios[kept].median()) if bool(kept.any()) else None,
        rate_note="median ‖T(ξ_t)−ξ*‖/‖ξ_t−ξ*‖ along the trajectories",
        counterexamples=paths,
        settings={"alpha": alpha, "trajectory_steps": trajectory_steps, "retrieval": _name(retrieval)},
        measured={
            "attracting_starts": int(attracting.sum()),
            "repelling_starts": int(repelling.sum()),
            "no_limit_starts": int((~converged).sum()),
            "max_ratio": float(ratios[kept].max()) if bool(kept.any()) else math.nan,
            "radius_at_limit": _quantiles(radius[converged]),
            "lipschitz_trajectory": _quantiles(lip),
            "lipschitz_share_below_1": float((lip < 1).double().mean()),
            "bound_trajectory": _quantiles(local_bound),
            "bound_share_below_1": float((local_bound < 1).double().mean()),
            "global_bound": global_bound,
            "global_bound_below_1": global_bound < 1,
        },
        series={"ratios": _sample(ratios[kept]), "lipschitz": _sample(lip), "bound": _sample(local_bound)},
    )


def _replay_contraction(
    tensors: Mapping[str, torch.Tensor], params: Mapping[str, Any]
) -> tuple[float, dict[str, Any]]:
    patterns, point = tensors["patterns"], tensors["point"][None]
    retrieval = params.get("retrieval")
    fn = _resolve(retrieval, _retrieve)
    state = tensors["state"][None]
    margin, tol, ratio = _contraction_margin(
        patterns, point, state, fn(state, patterns, params["beta"], params["alpha"])
    )
    custom = None if retrieval in (None, "library") else fn
    radius = float(_map_radius(patterns, point, params["beta"], params["alpha"], custom)[0])
    residual = float(_norm(fn(point, patterns, params["beta"], params["alpha"]) - point)[0])
    threshold = tolerance(point.dtype, FIXED_POINT_FACTOR) * float(_norm(patterns).max())
    return float(margin[0]), {
        "ratio": float(ratio[0]),
        "radius": radius,
        "premise_met": residual <= threshold and radius < 1,
        "tolerance_now": float(tol[0]),
        **params,
    }


def check_guided_contraction(
    case: Case,
    *,
    scales: Sequence[float] = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0),
    zeta: float = 0.0,
    alpha_sparse: float = 1.5,
    steps: int = 16,
    window: int = 4,
    rule: RuleFn | None = None,
) -> CheckResult:
    r"""Where the guided iteration stops contracting: per head, the λ above which ξ ↦ G(ξ) does not contract.

    For each λ of ``scales`` the map ``G`` (GAG with ζ, reference S, no cap; or ``rule``) and, beside it,
    plain extrapolation ``P_λ`` are iterated ``steps`` times from the starting states. A trajectory
    contracts when its step lengths ``‖ξ_{t+1} − ξ_t‖`` shrink: the per-step factor over the last
    ``window`` steps is below 1 (or the steps are already at rounding). ``measured["lambda_c"]`` is the
    smallest λ of the grid at which some start's iteration of G does not contract (``inf``: contracts at
    every λ tried), ``measured["lambda_c_extrapolation"]`` the same for P_λ. A measurement (no verdict):
    the paper's claim that GAG stabilises the accelerated iteration is what
    ``lambda_c > lambda_c_extrapolation`` would show. One tried "state" is one (start, λ); it counts as
    passed when G contracts there.
    """
    dtype = case.patterns.dtype
    m = case.pattern_scale
    floor = tolerance(dtype, FIXED_POINT_FACTOR) * m

    # one batched iteration over the grid: rows λ-major, λ as a per-row tensor
    k, n_states = len(scales), case.states.shape[0]
    lam = torch.tensor(list(scales), dtype=dtype).repeat_interleave(n_states)[:, None]
    states = case.states.repeat(k, 1)

    def factors(g: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        xs = [states]
        for _ in range(steps):
            xs.append(g(xs[-1]))
        lengths = torch.stack([_norm(b - a) for a, b in itertools.pairwise(xs)])  # (steps, K·M)
        first, last = lengths[-window - 1], lengths[-1]
        factor = (last / first.clamp(min=1e-300)) ** (1.0 / window)
        return torch.where(last <= floor, torch.zeros_like(factor), factor).reshape(k, n_states).T  # (M, K)

    guided = factors(_guided_map(case.patterns, case.beta, alpha_sparse, lam, zeta, math.inf, "sparse", rule))

    def extrapolation(x: torch.Tensor) -> torch.Tensor:
        dense = _retrieve(x, case.patterns, case.beta, 1.0)
        return dense + lam * (_retrieve(x, case.patterns, case.beta, alpha_sparse) - dense)

    plain = factors(extrapolation)
    contracts = guided < 1
    contracts_plain = plain < 1

    def critical(ok: torch.Tensor) -> float:
        bad = (~ok).any(dim=0).nonzero().flatten()
        return float(scales[int(bad[0])]) if bad.numel() else math.inf

    lambda_c, lambda_c_plain = critical(contracts), critical(contracts_plain)
    return _result(
        "weak contraction",
        case,
        contracts.reshape(-1),
        (1.0 - guided).reshape(-1),
        0.0,
        0.0,
        "per-step factor of the step length < 1",
        kind=KIND_MEASURED,
        unit="start × λ",
        setting=f"G (ζ={zeta:g}) vs P_λ",
        rate=lambda_c,
        rate_note="λ_c: smallest λ tried at which G stops contracting from some start (inf: none)",
        settings={
            "scales": list(scales),
            "zeta": zeta,
            "steps": steps,
            "window": window,
            "rule": _name(rule),
        },
        measured={
            "lambda_c": lambda_c,
            "lambda_c_extrapolation": lambda_c_plain,
            **{
                f"share_contracting_at_{s:g}": float(contracts[:, k].double().mean())
                for k, s in enumerate(scales)
            },
            **{
                f"share_contracting_extrapolation_at_{s:g}": float(contracts_plain[:, k].double().mean())
                for k, s in enumerate(scales)
            },
        },
        series={
            "scales": list(scales),
            "guided": guided.median(dim=0).values.tolist(),
            "extrapolation": plain.median(dim=0).values.tolist(),
        },
    )


# ==================================================================================================
# orthogonal-error convergence


def _orthogonal_error(
    patterns: torch.Tensor,
    x: torch.Tensor,
    point: torch.Tensor,
    beta: float,
    alpha_sparse: float,
    reference: str,
) -> torch.Tensor:
    """‖P⊥_{u(ξ)}(ξ − ξ*)‖: the error's part orthogonal to the reference direction at ξ."""
    _, orthogonal = _decompose(x - point, _reference_direction(patterns, x, beta, alpha_sparse, reference))
    return _norm(orthogonal)


def _asymptotic_rate(errors: torch.Tensor, near: torch.Tensor, floor: float, window: int = 5) -> torch.Tensor:
    """Per-step factor of ``errors`` (T + 1, M) over its last ``window`` steps taken near ξ* while above
    ``floor``: ``(e_{b}/e_{a})^{1/(b−a)}``; 0 where the error is at the floor as soon as the state is near."""
    count = errors.shape[1]
    rates = torch.zeros(count, dtype=errors.dtype)
    for j in range(count):
        usable = (near[:-1, j] & (errors[:-1, j] > floor)).nonzero().flatten()
        if usable.numel() == 0:
            continue
        end = int(usable[-1]) + 1
        start = max(int(usable[0]), end - window)
        rates[j] = (errors[end, j].clamp(min=0.0) / errors[start, j]) ** (1.0 / (end - start))
    return rates


def check_orthogonal_error(
    case: Case,
    *,
    zeta: float = 0.0,
    scale: float = 1.0,
    eta: float = math.inf,
    reference: str = "sparse",
    alpha_sparse: float = 1.5,
    targets: torch.Tensor | None = None,
    trajectory_steps: int = 30,
    max_iter: int = 100,
    rule: RuleFn | None = None,
    counterexample_dir: str | Path | CounterexampleStore | None = None,
    max_counterexamples: int = 3,
) -> CheckResult:
    r"""Orthogonal-error convergence (Thm 3.7) at fixed points of G that meet its premise.

    ``G = S + λ(clip_η(r_∥) + ζ r_⊥)`` (or ``rule``) is solved from each starting state to its limit ξ∞ by
    AA(5), or ξ* is given per state by ``targets``. **Premise** (per state): ξ∞ is a
    fixed point of G (to τ_G = 256 · eps · M(1 + 2|λ|)) *and of S* (to τ), it is attracting,
    ``ρ(DG(ξ∞)) < 1`` (central differences), and the plain iteration of G from ξ₀ comes within
    ``10⁻² M`` of it in ``trajectory_steps`` steps. Then ξ* = ξ∞ = ξ*_S; for ζ ≠ 0 this forces ``r(ξ*) = 0``
    (a common fixed point, Lemma 3.3), for ζ = 0 only ``r_∥(ξ*) = 0``. **Statement**: along the plain
    iteration ``ξ_{t+1} = G(ξ_t)``, the orthogonal error ``e⊥_t = ‖P⊥_{u(ξ_t)}(ξ_t − ξ*)‖`` contracts per
    step at least at the linear rate, ``q ≤ ρ(DG(ξ*)) + min(0.05, (1 − ρ)/2)``, where q is its per-step
    factor over the last 5 steps taken near ξ* while above 10 · tol (0 when it is already there). The
    ζ-dependent bound ``λ|ζ| ‖r⊥(ξ*)‖ / (1 − ρ)`` on the limit of ``e⊥`` is reported beside it
    (``measured["zeta_bound_over_M"]``); at points meeting the premise it is 0.

    Where ξ∞ is not a fixed point of S the premise is not met: the limit keeps an orthogonal offset
    relative to the sparse fixed point ξ*_S reached from ξ∞, measured as ``‖P⊥(ξ∞ − ξ*_S)‖`` and given in
    closed form by ``P⊥ S(ξ∞) + λζ r⊥(ξ∞) − P⊥ ξ*_S`` (``P⊥ S(ξ∞) = 0`` for the reference S), because
    ``G(ξ∞) = ξ∞`` and ``clip_η(r_∥)`` is parallel to the reference (``measured["offset_over_M"]`` and
    ``measured["closed_form_error_over_M"]``, the largest gap between the two; library rule only).

    Tolerance: ``1024 · eps · M (1 + |λ|)`` (the floor of the orthogonal error): the limit is found to the
    solver's rounding floor, and the error of a fixed point is the residual divided by ``1 − ρ``.

    Parameters
    ----------
    zeta, scale, eta, reference : the GAG settings ζ, λ, η, and the reference direction.
    targets : Tensor (M, d) or (1, d), optional
        ξ* per state instead of the limit of G (the premise is checked at them).
    rule : callable, optional
        ``rule(dense, sparse, scale, zeta, eta, reference, state)``, default the GAG kernel.

    Notes
    -----
    :func:`check_orthogonal_errors` checks several ζ in one batched solve.
    """
    return check_orthogonal_errors(
        case,
        zetas=(zeta,),
        scale=scale,
        eta=eta,
        reference=reference,
        alpha_sparse=alpha_sparse,
        targets=targets,
        trajectory_steps=trajectory_steps,
        max_iter=max_iter,
        rule=rule,
        counterexample_dir=counterexample_dir,
        max_counterexamples=max_counterexamples,
    )[0]


@dataclass(frozen=True)
class _GuidedStack:
    """The guided maps G of one case at several ζ, their states stacked ζ-major: row ``k·M + i`` is start i
    at ζ_k (M starting states), so that one batched iteration covers every ζ."""

    case: Case
    zetas: tuple[float, ...]
    scale: float
    eta: float
    reference: str
    alpha_sparse: float
    rule: RuleFn | None

    @property
    def n_states(self) -> int:
        return int(self.case.states.shape[0])

    @property
    def size(self) -> int:
        return len(self.zetas) * self.n_states

    @property
    def zeta_column(self) -> torch.Tensor:
        """ζ of each stacked row, shape (Z·M, 1)."""
        zetas = torch.tensor(self.zetas, dtype=self.case.patterns.dtype)
        return zetas.repeat_interleave(self.n_states)[:, None]

    def rows(self, rows: torch.Tensor, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
        """G on the stacked rows ``rows`` (each at its ζ), patterns in ``dtype``."""
        patterns = self.case.patterns.to(dtype)
        if self.rule is None:
            zeta = self.zeta_column[rows].to(dtype)
            return _guided_map(
                patterns, self.case.beta, self.alpha_sparse, self.scale, zeta, self.eta, self.reference
            )
        maps = [
            _guided_map(
                patterns,
                self.case.beta,
                self.alpha_sparse,
                self.scale,
                zeta,
                self.eta,
                self.reference,
                self.rule,
            )
            for zeta in self.zetas
        ]
        owner = rows // self.n_states

        def each(x: torch.Tensor) -> torch.Tensor:
            out = torch.empty_like(x)
            for k, fn in enumerate(maps):
                sel = owner == k
                if bool(sel.any()):
                    out[sel] = fn(x[sel])
            return out

        return each


@dataclass(frozen=True)
class _GuidedLimits:
    """Where G's iterations end, per stacked row, and which of those limits meet the premise."""

    points: torch.Tensor  # (Z·M, d): ξ∞, G's limit (or the given targets)
    fixed_g: torch.Tensor  # G(ξ∞) = ξ∞ to τ_G
    fixed_s: torch.Tensor  # ... and S(ξ∞) = ξ∞ to τ
    radius: torch.Tensor  # ρ(DG(ξ∞)) where fixed_s, NaN elsewhere

    @property
    def attracting(self) -> torch.Tensor:
        return self.fixed_s & (self.radius < 1)


def _guided_limits(stack: _GuidedStack, targets: torch.Tensor | None, max_iter: int) -> _GuidedLimits:
    """Solve G from every start to its limit by AA(5) (or take ``targets``) and classify the limits."""
    case = stack.case
    m, dtype = case.pattern_scale, case.patterns.dtype
    n_states, d = case.states.shape
    if targets is None:
        # AA(5) without the stability test (3× faster here): whether a limit attracts is ρ(DG) below
        solved = anderson(
            in_dtype(stack.rows(torch.arange(stack.size), dtype), dtype),
            case.states.repeat(len(stack.zetas), 1).to(solver_dtype(dtype)),
            m=5,
            tol=1e-30,
            max_iter=max_iter,
        )
        points = torch.as_tensor(solved.x).to(dtype)
    else:
        points = (targets.expand(n_states, d) if targets.shape[0] == 1 else targets).repeat(
            len(stack.zetas), 1
        )
    tau = tolerance(dtype, FIXED_POINT_FACTOR) * m
    g_residual = _norm(stack.rows(torch.arange(stack.size), dtype)(points) - points)
    s_residual = _norm(_retrieve(points, case.patterns, case.beta, stack.alpha_sparse) - points)
    fixed_g = g_residual <= tau * (1 + 2 * abs(stack.scale))
    fixed_s = fixed_g & (s_residual <= tau)
    radius = torch.full((stack.size,), math.nan, dtype=dtype)
    candidates = fixed_s.nonzero().flatten()
    if candidates.numel():
        # ρ(DG) by central differences, in float64 whatever the compute dtype (a diagnostic of the map)
        rows = candidates.repeat_interleave(d)
        radius[candidates] = spectral_radius_fd(
            stack.rows(rows, torch.float64), points[candidates].double(), m
        ).to(dtype)
    return _GuidedLimits(points, fixed_g, fixed_s, radius)


def _orthogonal_rates(
    stack: _GuidedStack, limits: _GuidedLimits, trajectory_steps: int, floor: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Iterate G plainly from the starts whose limit is attracting: (rates, reached, errors, rows).

    ``errors`` (T + 1, R) is the orthogonal error ‖P⊥_{u(ξ_t)}(ξ_t − ξ*)‖ of the R iterated ``rows``;
    ``reached`` marks the rows that came within ``NEAR · M`` of ξ*, ``rates`` their per-step factor."""
    case = stack.case
    dtype = case.patterns.dtype
    rates = torch.zeros(stack.size, dtype=dtype)
    reached = torch.zeros(stack.size, dtype=torch.bool)
    run = limits.attracting.nonzero().flatten()
    if not run.numel():
        return rates, reached, torch.zeros(trajectory_steps + 1, 0, dtype=dtype), run
    g_run = stack.rows(run, dtype)
    x, target = case.states.repeat(len(stack.zetas), 1)[run], limits.points[run]
    orth, dist = [], []
    for _ in range(trajectory_steps + 1):
        orth.append(
            _orthogonal_error(case.patterns, x, target, case.beta, stack.alpha_sparse, stack.reference)
        )
        dist.append(_norm(x - target))
        x = g_run(x)
    errors, near = torch.stack(orth), torch.stack(dist) <= NEAR * case.pattern_scale  # (T + 1, R)
    reached[run] = near.any(dim=0)
    rates[run] = _asymptotic_rate(errors, near, floor)
    return rates, reached, errors, run


def _orthogonal_offsets(stack: _GuidedStack, limits: _GuidedLimits) -> tuple[torch.Tensor, torch.Tensor]:
    """Where G's limit ξ∞ is not a fixed point of S: ``‖P⊥(ξ∞ − ξ*_S)‖ / M`` (ξ*_S the sparse fixed point
    reached from ξ∞) and, for the library's rule, its gap to the closed form ``P⊥ S(ξ∞) + λζ r⊥(ξ∞) −
    P⊥ ξ*_S``; NaN on the other rows."""
    case = stack.case
    m, dtype = case.pattern_scale, case.patterns.dtype
    offset = torch.full((stack.size,), math.nan, dtype=dtype)
    closed_gap = torch.full((stack.size,), math.nan, dtype=dtype)
    rows = limits.fixed_g & ~limits.fixed_s
    if not bool(rows.any()):
        return offset, closed_gap
    limit = limits.points[rows]
    sparse_fp, _, _ = solve_fixed_points(case.patterns, limit, case.beta, stack.alpha_sparse)
    u = _reference_direction(case.patterns, limit, case.beta, stack.alpha_sparse, stack.reference)
    _, measured = _decompose(limit - sparse_fp, u)
    offset[rows] = _norm(measured) / m
    if stack.rule is None:
        dense = _retrieve(limit, case.patterns, case.beta, 1.0)
        sparse = _retrieve(limit, case.patterns, case.beta, stack.alpha_sparse)
        _, r_orth = _decompose(sparse - dense, u)
        _, s_orth = _decompose(sparse, u)
        _, target_orth = _decompose(sparse_fp, u)
        closed = s_orth + stack.scale * stack.zeta_column[rows] * r_orth - target_orth
        closed_gap[rows] = _norm(measured - closed) / m
    return offset, closed_gap


def _zeta_bounds(
    stack: _GuidedStack, points: torch.Tensor, met: torch.Tensor, rho: torch.Tensor
) -> torch.Tensor:
    """``λ|ζ| ‖r⊥(ξ*)‖ / ((1 − ρ) M)``, the bound on the limit of e⊥, at the rows that meet the premise."""
    case = stack.case
    bounds = torch.full((stack.size,), math.nan, dtype=case.patterns.dtype)
    if bool(met.any()):
        dense = _retrieve(points[met], case.patterns, case.beta, 1.0)
        sparse = _retrieve(points[met], case.patterns, case.beta, stack.alpha_sparse)
        u = _reference_direction(case.patterns, points[met], case.beta, stack.alpha_sparse, stack.reference)
        _, r_orth = _decompose(sparse - dense, u)
        scaled = (stack.scale * stack.zeta_column[met, 0]).abs()
        bounds[met] = scaled * _norm(r_orth) / (1.0 - rho[met]) / case.pattern_scale
    return bounds


def _finite_quantiles(values: torch.Tensor) -> dict[str, float]:
    return _quantiles(values[~torch.isnan(values)])


def check_orthogonal_errors(
    case: Case,
    *,
    zetas: Sequence[float] = (0.0, 0.5, 1.0),
    scale: float = 1.0,
    eta: float = math.inf,
    reference: str = "sparse",
    alpha_sparse: float = 1.5,
    rule: RuleFn | None = None,
    targets: torch.Tensor | None = None,
    trajectory_steps: int = 30,
    max_iter: int = 100,
    counterexample_dir: str | Path | CounterexampleStore | None = None,
    max_counterexamples: int = 3,
) -> list[CheckResult]:
    """:func:`check_orthogonal_error` for each ζ of ``zetas``, the guided maps of every ζ stacked in one
    batch (rows ζ-major): limits of G, premise, plain iteration and offsets, then one result per ζ."""
    stack = _GuidedStack(case, tuple(zetas), scale, eta, reference, alpha_sparse, rule)
    m, dtype = case.pattern_scale, case.patterns.dtype
    limits = _guided_limits(stack, targets, max_iter)
    tol = tolerance(dtype, ORTHOGONAL_FACTOR) * m * (1.0 + abs(scale))
    rates, reached, errors, run = _orthogonal_rates(stack, limits, trajectory_steps, 10 * tol)
    met = limits.attracting & reached
    rho = torch.nan_to_num(limits.radius, nan=math.inf)
    allowed = rho + torch.clamp((1.0 - rho) / 2, max=RATE_SLACK)
    margins = torch.where(met, allowed - rates, torch.full_like(rates, math.nan))
    if targets is None:
        offset, closed_gap = _orthogonal_offsets(stack, limits)
    else:
        offset = closed_gap = torch.full((stack.size,), math.nan, dtype=dtype)
    zeta_bound = _zeta_bounds(stack, limits.points, met, rho)
    settings = {
        "scale": scale,
        "eta": eta,
        "reference": reference,
        "rule": _name(rule),
        "trajectory_steps": trajectory_steps,
    }
    results = []
    for k, zeta in enumerate(stack.zetas):
        rows = slice(k * stack.n_states, (k + 1) * stack.n_states)
        met_k = met[rows]

        def instance(
            where: tuple[int, ...], base: int = k * stack.n_states, zeta: float = zeta
        ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
            (i,) = where
            return (
                {"patterns": case.patterns, "state": case.states[i], "point": limits.points[base + i]},
                {
                    "beta": case.beta,
                    "alpha_sparse": alpha_sparse,
                    "scale": scale,
                    "zeta": zeta,
                    "eta": eta,
                    "reference": reference,
                    "rule": _name(rule),
                    "trajectory_steps": trajectory_steps,
                },
            )

        paths = _save_worst(
            "orthogonal-error convergence",
            case,
            margins[rows],
            instance,
            counterexample_dir,
            max_counterexamples,
            tol,
            f"zeta={zeta:g}",
        )
        counted = torch.arange(stack.size)[rows][met_k]
        in_run = torch.isin(run, counted) if run.numel() else torch.zeros(0, dtype=torch.bool)
        curves = errors[:, in_run] / max(m, 1e-300) if in_run.numel() else errors
        gaps = closed_gap[rows][~torch.isnan(closed_gap[rows])]
        results.append(
            _result(
                "orthogonal-error convergence",
                case,
                margins[rows] >= 0,
                margins[rows],
                tol,
                ORTHOGONAL_FACTOR,
                "1024·eps·M(1+|λ|)",
                premise=ORTHOGONAL_PREMISE,
                premise_met=met_k,
                premise_note=_reasons(
                    {
                        "limits not fixed by S (orthogonal offset, closed form)": int(
                            (limits.fixed_g[rows] & ~limits.fixed_s[rows]).sum()
                        ),
                        "without a limit": int((~limits.fixed_g[rows]).sum()),
                        "repelling (ρ(DG) ≥ 1)": int((limits.fixed_s[rows] & ~limits.attracting[rows]).sum()),
                        "not reached by the plain iteration": int(
                            (limits.attracting[rows] & ~reached[rows]).sum()
                        ),
                    }
                ),
                unit="start",
                setting=f"ζ={zeta:g}",
                rate=float(rates[rows][met_k].median()) if bool(met_k.any()) else None,
                rate_note="median per-step factor of ‖e⊥‖ near ξ* (compare ρ(DG(ξ*)))",
                counterexamples=paths,
                settings={"zeta": zeta, **settings},
                measured={
                    "radius": _quantiles(limits.radius[rows][met_k]),
                    "rate": _quantiles(rates[rows][met_k]),
                    "zeta_bound_over_M": _finite_quantiles(zeta_bound[rows]),
                    "limit_fixed_by_G_share": float(limits.fixed_g[rows].double().mean()),
                    "limit_fixed_by_S_share": float(limits.fixed_s[rows].double().mean()),
                    "offset_over_M": _finite_quantiles(offset[rows]),
                    "closed_form_error_over_M": float(gaps.max()) if gaps.numel() else math.nan,
                },
                series={
                    "premise_met": curves.median(dim=-1).values.tolist() if curves.shape[1] else [],
                    "offset": _sample(offset[rows][~torch.isnan(offset[rows])], 400),
                },
            )
        )
    return results


def _replay_orthogonal(
    tensors: Mapping[str, torch.Tensor], params: Mapping[str, Any]
) -> tuple[float, dict[str, Any]]:
    """Re-run the check on the one saved start; counter-examples saved before the premise was checked
    stored the sparse fixed point as ``target`` and G's limit as ``limit``: ξ* is then the limit."""
    patterns = tensors["patterns"]
    point = tensors["point"] if "point" in tensors else tensors["limit"]
    case = Case(patterns, tensors["state"][None], float(params["beta"]), {"family": "replay"})
    rule = _resolve(params.get("rule"), _gag)
    result = check_orthogonal_error(
        case,
        zeta=float(params["zeta"]),
        scale=float(params["scale"]),
        eta=float(params["eta"]),
        reference=str(params["reference"]),
        alpha_sparse=float(params["alpha_sparse"]),
        targets=point[None],
        trajectory_steps=int(params.get("trajectory_steps", 30)),
        rule=None if rule is _gag else rule,
    )
    premise_met = result.n_premise > 0
    margin = result.worst_margin if premise_met else 0.0
    sparse = _retrieve(point[None], patterns, float(params["beta"]), float(params["alpha_sparse"]))
    return float(margin), {
        "premise_met": premise_met,
        "premise_note": result.premise_note,
        "sparse_residual": float(_norm(sparse - point[None])[0]),
        "rate": result.rate,
        **params,
    }


# ==================================================================================================
# bounded update


def _bounded_margin(
    at: _RuleInputs, setting: Mapping[str, Any], rule: RuleFn
) -> tuple[torch.Tensor, torch.Tensor]:
    """(margin, tol) of ‖G(ξ) − S(ξ)‖ ≤ |λ| (η + |ζ| ‖r⊥‖) at ``setting`` (scale, zeta, eta, reference)."""
    _, xi, dense, sparse = at
    scale, zeta, eta, reference = setting["scale"], setting["zeta"], setting["eta"], setting["reference"]
    guided = rule(dense, sparse, scale, zeta, eta, reference, xi)
    _, orthogonal = _decompose(sparse - dense, _reference_vector(reference, dense, sparse, xi))
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
    counterexample_dir: str | Path | CounterexampleStore | None = None,
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
    grid = _RuleGrid(scales, zetas, etas, references)
    at = _RuleInputs.at(case.patterns, case.states, case.beta, alpha_sparse)
    margins, tols = grid.margins(lambda setting: _bounded_margin(at, setting, fn), m)

    def instance(where: tuple[int, ...]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        i, k = where
        return (
            {"patterns": case.patterns, "state": case.states[i]},
            {"beta": case.beta, "alpha_sparse": alpha_sparse, **grid.setting(k, m), "rule": _name(rule)},
        )

    return _identity_per_state(
        "bounded update",
        case,
        margins,
        tols,
        "16·eps·(‖S‖+|λ|(η+(1+|ζ|)‖r‖))",
        instance,
        (counterexample_dir, max_counterexamples),
        setting=grid.label,
        settings=grid.settings(rule),
    )


_replay_bounded = _replay_rule_setting(_bounded_margin, "state")


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
) -> CheckResult:
    r"""Directional consistency, measured (no verdict): does ``r = S(ξ) − D(ξ)`` point toward the sparse
    fixed point, ``⟨r, ξ*_S − D(ξ)⟩ > 0``, and along the retrieval direction, ``⟨r, S(ξ)⟩ > 0``?

    For each starting state ξ whose sparse iteration converged, ξ*_S is its sparse fixed point (or
    ``targets``). ``n_passed`` counts the states with ``⟨r, ξ*_S − D(ξ)⟩ > 0``; the share with
    ``⟨r, S(ξ)⟩ > 0`` is measured beside it. States where ``‖r‖`` or ``‖ξ*_S − D(ξ)‖`` is at most
    τ = 256 · eps · M have no direction and are not counted (``measured["degenerate"]``). Margins are
    cosines. The theory does not claim either share: they are the condition under which extrapolation
    along r helps, reported as measured.

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
    return _result(
        "directional consistency",
        case,
        margins >= 0,
        margins,
        tols[use] if bool(use.any()) else torch.tensor([]),
        LINEAR_FACTOR,
        "cosine > 16·eps·d",
        kind=KIND_MEASURED,
        unit="start (cosine)",
        setting=f"α={alpha_sparse:g}",
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
        "verdict": "measured",
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
    r"""The Anderson-mixed α-ladder (papers/theory.md §12): is ``L_λ`` closer to ξ*_S than ``P_λ``?

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
    wide = solver_dtype(states.dtype)  # the Anderson step's least squares need float32 at least
    rungs = [_retrieve(states, case.patterns, case.beta, a).to(wide) for a in ladder]
    dense, sparse = rungs[0], _retrieve(states, case.patterns, case.beta, alpha_sparse).to(wide)
    targets = targets.to(wide)
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
        kind=KIND_MEASURED,
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
