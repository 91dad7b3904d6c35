"""Matplotlib figures of the verification report, drawn from the ``figures`` section of results.json so that
``hopfield-aa plot`` can re-draw them without re-running any check (Agg backend, PNG files).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from hopfield_aa._io import save_figure

_FLOOR = 1e-17  # values at or below 0 are drawn at this floor on log axes


def _positive(values: Sequence[float]) -> np.ndarray:
    arr = np.asarray([float(v) for v in values], dtype=float)
    return np.where(arr > _FLOOR, arr, _FLOOR)


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    save_figure(fig, path)
    return str(path)


def ratio_histogram(ax: Any, ratios: np.ndarray, **style: Any) -> None:
    """Histogram of contraction ratios ‖T(ξ) − ξ*‖ / ‖ξ − ξ*‖ in 40 bins from 0 to past 1 (the boundary)."""
    ax.hist(ratios, bins=np.linspace(0, max(1.05, float(ratios.max()) * 1.02), 41), alpha=0.55, **style)


def plot_energy(data: Mapping[str, Any], path: Path) -> str | None:
    r"""Energy gap ``E(ξ_t) − min_t E`` along plain iteration, dense (α = 1) and sparse (α > 1), log scale."""
    curves = data.get("curves") or {}
    if not curves:
        return None
    alphas = list(curves)
    fig, axes = plt.subplots(1, len(alphas), figsize=(3.6 * len(alphas), 3.4), sharey=True, squeeze=False)
    for ax, alpha in zip(axes[0], alphas, strict=False):
        for curve in curves[alpha]:
            ax.semilogy(range(len(curve)), _positive(curve), marker=".", lw=1)
        name = "dense (softmax)" if float(alpha) == 1.0 else f"{alpha}-entmax"
        ax.set_title(f"α = {alpha}: {name}", fontsize=10)
        ax.set_xlabel("iteration t")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("E(ξ_t) − min_t E(ξ_t)")
    fig.suptitle(f"Energy along plain iteration ({data.get('case', '')}); one line per start", fontsize=10)
    return _save(fig, path)


def plot_residuals(data: Mapping[str, Any], path: Path, title: str) -> str | None:
    r"""Median relative residual ``‖T(x_k) − x_k‖ / M`` vs iteration, plain iteration and AA(m), log scale."""
    curves = data.get("curves") or {}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for name, curve in curves.items():
        ax.semilogy(range(len(curve)), _positive(curve), label=name, lw=1.5)
    ax.set_xlabel("iteration k")
    ax.set_ylabel("median ‖T(x_k) − x_k‖ / M")
    ax.set_title(f"{title} ({data.get('case', '')})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9)
    return _save(fig, path)


def plot_orthogonal(data: Mapping[str, Any], path: Path) -> str | None:
    r"""Orthogonal and parallel parts of the error ``ξ_t − ξ*`` of iterated GAG, per ζ, log scale."""
    if not data:
        return None
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    case = ""
    for colour, (setting, series) in zip(colours, data.items(), strict=False):
        case = series.get("case", case)
        orth, par = series.get("orthogonal", []), series.get("parallel", [])
        ax.semilogy(range(len(orth)), _positive(orth), color=colour, lw=1.8, label=f"{setting}: ‖e⊥‖")
        ax.semilogy(range(len(par)), _positive(par), color=colour, lw=1.2, ls="--", label=f"{setting}: ‖e∥‖")
    ax.set_xlabel("GAG iteration t (λ = 1)")
    ax.set_ylabel("median error / M")
    ax.set_title(f"Error of iterated GAG vs the sparse fixed point ({case})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, path)


def plot_contraction(data: Mapping[str, Any], path: Path) -> str | None:
    r"""Histograms of contraction ratios ``‖T(ξ) − ξ*‖/‖ξ − ξ*‖`` near fixed points and of ``‖J_T(ξ)‖₂``."""
    if not data:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.5, 3.8))
    for setting, pool in data.items():
        ratios = np.asarray(pool.get("ratios", []), dtype=float)
        lips = np.asarray(pool.get("lipschitz", []), dtype=float)
        if ratios.size:
            ratio_histogram(ax1, ratios, label=setting)
        if lips.size:
            hi = max(1.05, float(np.quantile(lips, 0.99)) * 1.05)
            ax2.hist(np.clip(lips, 0, hi), bins=np.linspace(0, hi, 41), alpha=0.55, label=setting)
    for ax, xlabel in (
        (ax1, "‖T(ξ) − ξ*‖ / ‖ξ − ξ*‖ near fixed points"),
        (ax2, "‖J_T(ξ)‖₂ along trajectories"),
    ):
        ax.axvline(1.0, color="k", lw=1, ls=":")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("count (log)")
        ax.set_yscale("log")
        ax.legend(fontsize=9)
        ax.grid(True, alpha=0.3)
    ax1.set_title("Contraction ratios (1 = boundary)", fontsize=10)
    ax2.set_title("Local Lipschitz constants (clipped at p99)", fontsize=10)
    return _save(fig, path)


def plot_divergence(data: Mapping[str, Any], path: Path) -> str | None:
    r"""``‖P_λ(ξ*) − ξ*‖ / M`` vs λ at non-common dense fixed points; the law ``|λ| ‖r(ξ*)‖ / M`` dashed."""
    if not data or not data.get("moved"):
        return None
    scales = np.asarray(data["scales"], dtype=float)
    fig, ax = plt.subplots(figsize=(5.4, 3.9))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (moved, slope) in enumerate(zip(data["moved"], data["slope"], strict=False)):
        c = colours[i % len(colours)]
        ax.plot(scales, moved, color=c, lw=1.6, label="measured" if i == 0 else None)
        ax.plot(
            scales, np.abs(scales) * slope, color=c, lw=1, ls="--", label="|λ| ‖r(ξ*)‖" if i == 0 else None
        )
    ax.set_xlabel("guidance scale λ")
    ax.set_ylabel("‖P_λ(ξ*) − ξ*‖ / M")
    ax.set_title(
        f"Non-common dense fixed points ({data.get('case', '')})\n"
        "measured (solid) and the law (dashed) coincide",
        fontsize=9,
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9)
    return _save(fig, path)


def plot_lambda_star(data: Mapping[str, Sequence[float]], path: Path) -> str | None:
    r"""Distribution of the Anderson-optimal scale ``λ* = 1 − γ*`` per data group (clipped to [−4, 8])."""
    groups = {k: np.asarray(v, dtype=float) for k, v in data.items() if len(v)}
    if not groups:
        return None
    fig, ax = plt.subplots(figsize=(6.0, 3.9))
    bins = np.linspace(-4, 8, 49).tolist()
    for name, values in groups.items():
        outside = int(((values < -4) | (values > 8)).sum())
        label = f"{name} (n={values.size}" + (f", {outside} outside" if outside else "") + ")"
        ax.hist(np.clip(values, -4, 8), bins=bins, histtype="step", lw=1.6, label=label)
    ax.axvline(1.0, color="k", lw=1, ls=":")
    ax.set_xlabel("Anderson-optimal scale λ* = 1 − γ*")
    ax.set_ylabel("count (log)")
    ax.set_yscale("log")
    ax.set_title("λ* per state (dotted: λ = 1, the sparse retrieval)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_common_vs_beta(data: Sequence[Mapping[str, Any]], path: Path) -> str | None:
    r"""Share of fixed points common to the dense and sparse maps, and non-common dense fixed points, vs β."""
    if not data:
        return None
    beta = np.asarray([p["beta"] for p in data], dtype=float)
    share = np.asarray([p["common_share"] for p in data], dtype=float)
    non_common = np.asarray([p["dense_non_common"] for p in data], dtype=float)
    states = np.asarray([max(1, p["states"]) for p in data], dtype=float)
    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    ax.semilogx(
        beta, share, marker="o", label="limits that are fixed points of both maps (share of all limits)"
    )
    ax.semilogx(
        beta,
        non_common / states,
        marker="s",
        ls="--",
        label="states whose dense limit is not a sparse fixed point (share of states)",
    )
    ax.set_xlabel("inverse temperature β (log)")
    ax.set_ylabel("share")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Fixed points common to the dense (α=1) and sparse maps, by β", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    return _save(fig, path)


def plot_ladder(data: Mapping[str, Mapping[str, Any]], path: Path, limit: int = 6) -> str | None:
    r"""Median distance to the sparse fixed point vs λ: α-ladder ``L_λ`` and ``P_λ``, log scale."""
    # one case per data group (the label up to its first "-"), skipping cases where both rules sit on ξ*_S
    items, groups = [], set()
    for k, v in data.items():
        group = k.split("-")[0]
        if not v.get("ladder") or group in groups or max(v.get("plain", [0.0])) <= _FLOOR:
            continue
        groups.add(group)
        items.append((k, v))
    items = items[:limit]
    if not items:
        return None
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(8.6, 4.0))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    cases = []
    for colour, (label, series) in zip(colours, items, strict=False):
        scales = series["scales"]
        ax.semilogy(scales, _positive(series["ladder"]), color=colour, lw=1.8, marker="o")
        ax.semilogy(scales, _positive(series["plain"]), color=colour, lw=1.0, ls="--", marker="x")
        cases.append(Line2D([], [], color=colour, lw=3, label=label))
    ax.set_xlabel("guidance scale λ")
    ax.set_ylabel("median ‖output − ξ*_S‖ / M")
    ax.set_title("Distance to the sparse fixed point, by rule and case", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    # two legends beside the axes, never over the data: the line styles (rules), then the colours (cases)
    rules = [
        Line2D([], [], color="0.25", lw=1.8, marker="o", label="α-ladder AA  L_λ (solid)"),
        Line2D([], [], color="0.25", lw=1.0, ls="--", marker="x", label="plain extrapolation  P_λ (dashed)"),
    ]
    first = ax.legend(
        handles=rules,
        title="rule",
        fontsize=7,
        title_fontsize=8,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        borderaxespad=0.0,
    )
    ax.add_artist(first)
    ax.legend(
        handles=cases,
        title="case (colour)",
        fontsize=7,
        title_fontsize=8,
        loc="lower left",
        bbox_to_anchor=(1.02, 0.0),
        borderaxespad=0.0,
    )
    return _save(fig, path)


def draw_all(figures: Mapping[str, Any], out: str | os.PathLike[str]) -> list[str]:
    """Draw every figure whose data is present in ``figures`` (results.json's ``figures``) into ``out``.

    Returns
    -------
    list of the PNG paths written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[str, Callable[[], str | None]]] = [
        ("energy", lambda: plot_energy(figures.get("energy") or {}, out / "energy.png")),
        (
            "residuals",
            lambda: plot_residuals(
                figures.get("residuals") or {}, out / "residuals_dense.png", "Dense map: plain vs AA(m)"
            ),
        ),
        (
            "residuals_sparse",
            lambda: plot_residuals(
                figures.get("residuals_sparse") or {},
                out / "residuals_sparse.png",
                "1.5-entmax map: plain vs AA(m)",
            ),
        ),
        (
            "orthogonal",
            lambda: plot_orthogonal(figures.get("orthogonal") or {}, out / "orthogonal_error.png"),
        ),
        ("contraction", lambda: plot_contraction(figures.get("contraction") or {}, out / "contraction.png")),
        ("divergence", lambda: plot_divergence(figures.get("divergence") or {}, out / "divergence.png")),
        ("lambda_star", lambda: plot_lambda_star(figures.get("lambda_star") or {}, out / "lambda_star.png")),
        (
            "common_vs_beta",
            lambda: plot_common_vs_beta(figures.get("common_vs_beta") or [], out / "common_vs_beta.png"),
        ),
        ("ladder", lambda: plot_ladder(figures.get("ladder") or {}, out / "ladder.png")),
    ]
    paths = []
    for _, job in jobs:
        path = job()
        if path is not None:
            paths.append(path)
    return paths
