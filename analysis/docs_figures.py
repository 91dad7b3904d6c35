"""Figures of the documentation's concept pages, made with the library: energy along Hopfield iteration,
plain iteration against Anderson acceleration, and the geometry of the GAG update.

Usage: python analysis/docs_figures.py [--quick] [--out docs/figures]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import hopfield_aa as ha
from hopfield_aa._io import save_figure
from hopfield_aa.anderson import anderson  # the function (the package attribute can be the submodule)

ROOT = Path(__file__).resolve().parents[1]


def _save(fig: plt.Figure, path: Path) -> None:
    save_figure(fig, path, dpi=130, bbox_inches="tight")


def _memory(seed: int, n: int = 64, d: int = 16, states: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.randn(n, d, generator=gen, dtype=torch.float64)
    start = patterns[:states] + 0.6 * torch.randn(states, d, generator=gen, dtype=torch.float64)
    return patterns, start


def energy_figure(out: Path, steps: int) -> None:
    patterns, xi0 = _memory(0)
    beta = 0.5
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for alpha, color in ((1.0, "tab:blue"), (1.5, "tab:orange"), (2.0, "tab:green")):
        xi: Any = xi0.clone()
        energies = [ha.energy(xi, patterns, beta, alpha=alpha)]
        for _ in range(steps):
            xi = ha.retrieve(xi, patterns, beta, alpha=alpha)
            energies.append(ha.energy(xi, patterns, beta, alpha=alpha))
        curve = torch.stack([torch.as_tensor(e) for e in energies])  # (steps + 1, states)
        limit = ha.iterate(xi0, patterns, beta, alpha=alpha, max_iter=20000).state
        gap = (curve - torch.as_tensor(ha.energy(limit, patterns, beta, alpha=alpha))).clamp(min=1e-15)
        for i in range(gap.shape[1]):
            ax.semilogy(
                range(steps + 1),
                gap[:, i],
                color=color,
                alpha=0.35,
                lw=0.8,
                label=f"α = {alpha:g}" if i == 0 else None,
            )
    ax.set_xlabel("iteration t")
    ax.set_ylabel(r"$E_\alpha(\xi_t) - E_\alpha(\xi^*)$ (floor $10^{-15}$)")
    ax.set_title("Plain Hopfield iteration decreases the energy (N=64, d=16, β=0.5)")
    ax.legend()
    _save(fig, out / "hopfield_energy.png")


def anderson_figure(out: Path, max_iter: int) -> None:
    patterns, xi0 = _memory(1)
    beta = 0.3

    def dense_map(x: Any) -> Any:
        return ha.retrieve(x, patterns, beta)

    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for m, color in ((0, "black"), (1, "tab:blue"), (3, "tab:orange"), (5, "tab:green")):
        result = anderson(dense_map, xi0, m=m, tol=1e-13, max_iter=max_iter, safeguard=False)
        residuals = torch.as_tensor(result.residual_norms)
        median = residuals.median(dim=-1).values if residuals.ndim > 1 else residuals
        label = "plain iteration" if m == 0 else f"AA({m})"
        ax.semilogy(range(len(median)), median.clamp(min=1e-16), color=color, label=label)
    ax.set_xlabel("iteration k")
    ax.set_ylabel(r"median $\Vert T(\xi_k) - \xi_k\Vert$")
    ax.set_title("Dense retrieval map (N=64, d=16, β=0.3), 16 states")
    ax.legend()
    _save(fig, out / "anderson_convergence.png")


def geometry_figure(out: Path, samples: int) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.0, 4.2))
    dense = torch.tensor([0.4, 1.0], dtype=torch.float64)
    sparse = torch.tensor([1.5, 1.3], dtype=torch.float64)
    parallel, orthogonal = ha.decompose(sparse - dense, sparse)
    scale = 1.0

    def arrow(start: Any, vec: Any, color: str, label: str) -> None:
        left.annotate(
            "",
            xy=(start + vec).tolist(),
            xytext=start.tolist(),
            arrowprops={"arrowstyle": "->", "color": color, "lw": 2},
        )
        left.plot([], [], color=color, lw=2, label=label)

    arrow(torch.zeros(2, dtype=torch.float64), sparse, "0.6", "u = S (retrieval direction)")
    arrow(dense, sparse - dense, "tab:red", "r = S − D")
    arrow(sparse, scale * parallel, "tab:blue", "λ r∥ (GAG, ζ = 0)")
    arrow(sparse, scale * orthogonal, "tab:purple", "λ r⊥ (orthogonal only)")
    arrow(sparse, scale * (sparse - dense), "tab:orange", "λ r (extrapolation, P at λ+1)")
    for point, name in ((dense, "D"), (sparse, "S")):
        left.plot(*point.tolist(), "ko")
        left.annotate(name, point.tolist(), textcoords="offset points", xytext=(6, -12))
    left.set_aspect("equal")
    left.set_xlim(-0.2, 3.0)
    left.set_ylim(-0.2, 2.4)
    left.set_xlabel("coordinate 1")
    left.set_ylabel("coordinate 2")
    left.set_title("Decomposition of the residual (λ = 1)")
    left.legend(fontsize=8, loc="upper left")

    gen = torch.Generator().manual_seed(2)
    d_all = torch.randn(samples, 16, generator=gen, dtype=torch.float64)
    s_all = d_all + torch.randn(samples, 16, generator=gen, dtype=torch.float64)
    for (lam, zeta, eta), marker in zip(
        ((2.0, 0.0, 0.5), (4.0, 0.5, 0.2), (-3.0, 1.0, 1.0), (8.0, 0.0, 0.05)), "osd^", strict=True
    ):
        guided = ha.gag(d_all, s_all, lam, zeta=zeta, eta=eta)
        _, orth = ha.decompose(s_all - d_all, s_all)
        bound = abs(lam) * (eta + abs(zeta) * torch.linalg.vector_norm(orth, dim=-1))
        right.loglog(
            bound,
            torch.linalg.vector_norm(guided - s_all, dim=-1),
            marker,
            ms=3,
            alpha=0.6,
            label=f"λ={lam:g}, ζ={zeta:g}, η={eta:g}",
        )
    lims = [1e-2, 1e2]
    right.plot(lims, lims, "k--", lw=1, label="bound = update")
    right.set_xlabel(r"bound $|\lambda|(\eta + |\zeta|\,\Vert r_\perp\Vert)$")
    right.set_ylabel(r"$\Vert G - S\Vert$")
    right.set_title("Bounded update: every point below the diagonal")
    right.legend(fontsize=8)
    _save(fig, out / "gag_geometry.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations and samples")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures", help="output folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    energy_figure(args.out, steps=15 if args.quick else 30)
    anderson_figure(args.out, max_iter=60 if args.quick else 150)
    geometry_figure(args.out, samples=100 if args.quick else 400)
    for name in ("hopfield_energy.png", "anderson_convergence.png", "gag_geometry.png"):
        print(args.out / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
