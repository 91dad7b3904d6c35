"""The verify report's figures that belong to the checks' own measurements (orthogonal error, contraction of
D, S and G, value space), drawn from results.json's ``figures``; the others come from
:func:`hopfield_aa.plotting.draw_all`.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from hopfield_aa._io import save_figure
from hopfield_aa.plotting import ratio_histogram

OWN = ("orthogonal", "contraction", "guided_contraction", "value_space")


def _finite(values: Sequence[Any]) -> np.ndarray:
    arr = np.asarray([float(v) for v in values], dtype=float)
    return arr[np.isfinite(arr)]


def plot_orthogonal(data: Mapping[str, Any], path: Path) -> str | None:
    """Left: the orthogonal error along the iteration of G where the premise holds (median per case);
    right: the orthogonal offset of G's limit where it does not (limit not fixed by S), per ζ."""
    if not data:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.9))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = False
    for colour, (setting, pool) in zip(colours, data.items(), strict=False):
        for i, curve in enumerate(pool.get("premise_met", [])[:12]):
            y = np.asarray(curve, dtype=float)
            ax1.semilogy(
                np.arange(len(y)),
                np.where(y > 1e-17, y, 1e-17),
                color=colour,
                lw=1,
                alpha=0.6,
                label=setting if i == 0 else None,
            )
            drawn = True
        offsets = _finite(pool.get("offset", []))
        offsets = offsets[offsets > 0]
        if offsets.size:
            ax2.hist(np.log10(offsets), bins=30, alpha=0.55, color=colour, label=setting)
    ax1.set_xlabel("iteration t of G (λ = 1)")
    ax1.set_ylabel("median ‖e⊥_t‖ / M (premise met)")
    ax1.set_title("Orthogonal error at fixed points of G and S" + ("" if drawn else " (none)"), fontsize=9)
    ax1.grid(True, which="both", alpha=0.3)
    ax2.set_xlabel("log10 ‖P⊥(ξ∞ − ξ*_S)‖ / M")
    ax2.set_ylabel("starts")
    ax2.set_title("Premise not met: offset of G's limit (closed form λζr⊥ − P⊥ξ*_S)", fontsize=9)
    ax2.grid(True, alpha=0.3)
    for ax in (ax1, ax2):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return str(save_figure(fig, path))


def plot_contraction(data: Mapping[str, Any], path: Path) -> str | None:
    """Ratios ‖T(ξ_t) − ξ*‖/‖ξ_t − ξ*‖ along the trajectories, and local ‖DT‖₂ beside the N-independent
    bound β σ D_S²/4, per map."""
    if not data:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.9))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for colour, (setting, pool) in zip(colours, data.items(), strict=False):
        ratios = _finite(pool.get("ratios", []))
        if ratios.size:
            ratio_histogram(ax1, ratios, color=colour, label=setting)
        lips, bound = _finite(pool.get("lipschitz", [])), _finite(pool.get("bound", []))
        if lips.size:
            ax2.hist(
                np.log10(np.clip(lips, 1e-6, None)),
                bins=40,
                alpha=0.55,
                color=colour,
                label=f"{setting}: ‖DT(ξ_t)‖₂",
            )
        if bound.size:
            ax2.hist(
                np.log10(np.clip(bound, 1e-6, None)),
                bins=40,
                histtype="step",
                lw=1.5,
                color=colour,
                label=f"{setting}: βσD_S²/4",
            )
    ax1.axvline(1.0, color="k", lw=1, ls=":")
    ax2.axvline(0.0, color="k", lw=1, ls=":")
    ax1.set_xlabel("‖T(ξ_t) − ξ*‖ / ‖ξ_t − ξ*‖ along trajectories (attracting ξ*)")
    ax2.set_xlabel("log10 of the local Lipschitz constant and of its bound")
    for ax in (ax1, ax2):
        ax.set_ylabel("count (log)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    ax1.set_title("Weak contraction of D and S (1 = boundary)", fontsize=9)
    ax2.set_title("Local ‖DT‖₂ vs the N-independent bound", fontsize=9)
    fig.tight_layout()
    return str(save_figure(fig, path))


def plot_guided_contraction(data: Mapping[str, Any], path: Path) -> str | None:
    """Per data group, the λ above which the iteration of G (ζ = 0) and of P_λ stops contracting."""
    if not data:
        return None
    groups = sorted(data)
    fig, ax = plt.subplots(figsize=(6.4, 3.9))
    top = 1.0
    for i, group in enumerate(groups):
        pool = data[group]
        scales = [float(s) for s in pool.get("scales", [])]
        cap = 2 * max(scales) if scales else 32.0
        top = max(top, cap)
        for offset, key, marker, label in (
            (-0.12, "lambda_c", "o", "G (ζ = 0)"),
            (0.12, "lambda_c_p", "x", "P_λ"),
        ):
            values = [cap if not math.isfinite(float(v)) else float(v) for v in pool.get(key, [])]
            ax.scatter(
                np.full(len(values), i + offset),
                values,
                marker=marker,
                s=18,
                alpha=0.7,
                color="C0" if key == "lambda_c" else "C3",
                label=label if i == 0 else None,
            )
    ax.set_yscale("log", base=2)
    ax.axhline(top, color="k", lw=0.8, ls=":")
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("λ_c (top line: contracts at every λ tried)")
    ax.set_title("Where the guided iteration stops contracting, per case", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return str(save_figure(fig, path))


def plot_value_space(rows: Sequence[Mapping[str, Any]], path: Path) -> str | None:
    """Value space over the denoising trajectory: ‖r⊥‖/‖r‖, the discarded share and cos(r∥, Δ output),
    per attention kind (median over layers, bold) and per layer (thin)."""
    if not rows:
        return None
    keys = (
        ("orthogonal_ratio_median", "median ‖r⊥‖/‖r‖"),
        ("discarded_share", "share of ‖λr‖² GAG discards"),
        ("cos_parallel_change_median", "median cos(r∥, Δ D·V to next step)"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    by_kind: dict[str, dict[str, list[Mapping[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        by_kind[str(row["kind"])][str(row["layer"])].append(row)
    for colour, (kind, layers) in zip(("C0", "C1", "C2", "C3"), sorted(by_kind.items()), strict=False):
        for ax, (key, label) in zip(axes, keys, strict=False):
            per_step: dict[int, list[float]] = defaultdict(list)
            for layer_rows in layers.values():
                steps = [int(r["step"]) for r in layer_rows]
                values = [float(r[key]) for r in layer_rows]
                ax.plot(steps, values, color=colour, lw=0.6, alpha=0.35)
                for st, v in zip(steps, values, strict=False):
                    if math.isfinite(v):
                        per_step[st].append(v)
            xs = sorted(per_step)
            ax.plot(
                xs,
                [float(np.median(per_step[x])) for x in xs],
                color=colour,
                lw=2.2,
                marker="o",
                ms=3,
                label=kind,
            )
            ax.set_title(label, fontsize=9)
            ax.set_xlabel("denoising step")
            ax.grid(True, alpha=0.3)
    axes[2].axhline(0.0, color="k", lw=0.8, ls=":")
    axes[0].legend(fontsize=8)
    fig.suptitle(
        "What GAG acts on: the attention output S·V vs D·V (thin: layers, bold: median)", fontsize=10
    )
    fig.tight_layout()
    return str(save_figure(fig, path))


def draw_report_figures(figures: Mapping[str, Any], out: str | os.PathLike[str]) -> list[str]:
    """Draw every figure whose data is present (the others through :func:`hopfield_aa.plotting.draw_all`)."""
    from hopfield_aa.plotting import draw_all

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = draw_all({k: v for k, v in figures.items() if k not in OWN}, out)
    jobs = (
        plot_orthogonal(figures.get("orthogonal") or {}, out / "orthogonal_error.png"),
        plot_contraction(figures.get("contraction") or {}, out / "contraction.png"),
        plot_guided_contraction(figures.get("guided_contraction") or {}, out / "guided_contraction.png"),
        plot_value_space(figures.get("value_space") or [], out / "value_space.png"),
    )
    return paths + [p for p in jobs if p is not None]
