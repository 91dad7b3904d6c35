"""Fit α per head of the reference model's cross-attention to a target, from the bundled traces.

The target: the sparse retrieval keeps a chosen share of the softmax mass, read smoothly as the overlap
``Σ_i min(p_i, q_i)`` of ``p = entmax_α(βQKᵀ)`` with ``q = softmax(βQKᵀ)`` (1 at α = 1, falling as α
grows), averaged over the queries of a head. α = 1 + softplus(θ) per (layer, head) is fitted by Adam on
``(overlap − target)²``, through the closed-form ∂p/∂α of ``hopfield_aa.entmax`` with a tensor α.
Then what GAG does with the fitted α against α = 1.5, on the same traces (value space, per head and
query): the residual ‖S V − D V‖ relative to ‖D V‖ and the GAG update ‖G − S‖ (λ = 1, ζ = 0).

Reads ``hopfield_aa/data/traces/cross`` (Q/K/V per head; the model itself is not sampled). Writes
``analysis/results/fit_alpha.{json,md}`` and ``analysis/figures/fit_alpha.png``.
Run: ``python analysis/fit_alpha.py [--target 0.8]``.
The fitted α of a layer is what ``enable_gag(pipe, alpha={layer: (α_h0, α_h1, ...)})`` takes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import cast

import torch

from hopfield_aa import gag
from hopfield_aa.hopfield import attention
from hopfield_aa.normalizers import entmax
from hopfield_aa.traces import TraceSet

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT / "hopfield_aa" / "data" / "traces" / "cross"
OUT = Path(__file__).resolve().parent / "results"
FIGURES = Path(__file__).resolve().parent / "figures"


def load(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]:
    """Per layer: Q (R, H, L_q, d), K (R, H, L_k, d), V (R, H, L_k, d_v) stacked over records, and β."""
    per_layer: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    scale: dict[str, float] = {}
    for record in TraceSet(path, kinds=["cross"]):
        per_layer.setdefault(record.layer, []).append((record.q.float(), record.k.float(), record.v.float()))
        scale[record.layer] = float(record.scale)
    out = {}
    for layer, items in per_layer.items():
        q, k, v = (torch.stack(t) for t in zip(*items, strict=True))
        out[layer] = (q, k, v, scale[layer])
    return out


def overlap(scores: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Mean over records and queries of Σ min(entmax_α, softmax), per head: shape (H,)."""
    # one α per head: (H, 1) against (R, H, L_q); a tensor in, a tensor out
    sparse = cast(torch.Tensor, entmax(scores, alpha.view(-1, 1)))
    dense = torch.softmax(scores, -1)
    return torch.minimum(sparse, dense).sum(-1).mean(dim=(0, 2))


def fit(scores: torch.Tensor, target: float, steps: int, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """α per head with mean overlap = target; returns (α, the overlap reached)."""
    theta = torch.zeros(scores.shape[1], dtype=scores.dtype, requires_grad=True)  # α = 1 + softplus(0) ≈ 1.69
    opt = torch.optim.Adam([theta], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        alpha = 1.0 + torch.nn.functional.softplus(theta)
        loss = ((overlap(scores, alpha) - target) ** 2).sum()
        loss.backward()
        opt.step()
    alpha = (1.0 + torch.nn.functional.softplus(theta)).detach()
    with torch.no_grad():
        return alpha, overlap(scores, alpha)


def gag_effect(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: float, alpha: torch.Tensor
) -> tuple[float, float]:
    """Mean ‖S − D‖/‖D‖ and mean ‖G − S‖ (λ = 1, ζ = 0) over heads and queries, α per head."""
    dense = attention(q, k, v, scale=beta, alpha=1.0)
    sparse = attention(q, k, v, scale=beta, alpha=alpha.view(-1, 1))
    guided = gag(dense, sparse, 1.0)
    rel = (torch.linalg.vector_norm(sparse - dense, dim=-1) / torch.linalg.vector_norm(dense, dim=-1)).mean()
    update = torch.linalg.vector_norm(guided - sparse, dim=-1).mean()
    return float(rel), float(update)


def figure(layers: list[str], fitted: dict[str, list[float]], path: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for i, layer in enumerate(layers):
        values = fitted[layer]
        ax.scatter([i] * len(values), values, s=24, color="tab:blue", zorder=3)
    ax.axhline(1.5, color="tab:gray", ls="--", lw=1, label="α = 1.5 (GAG default)")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([name.split(".transformer_blocks")[0] for name in layers], rotation=30, ha="right")
    ax.set_ylabel("fitted α (one point per head)")
    ax.set_title(f"α per head for a {target:.0%} softmax overlap (cross-attention)")
    low = min(min(v) for v in fitted.values())
    ax.set_ylim(min(1.0, low - 0.05), max(1.65, max(max(v) for v in fitted.values()) + 0.05))
    ax.legend(loc="upper center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.8, help="mean overlap with softmax to reach")
    parser.add_argument("--steps", type=int, default=150, help="Adam steps per layer")
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args()
    if not 0.0 < args.target < 1.0:
        parser.error(f"--target must lie in (0, 1), got {args.target}")
    torch.set_num_threads(1)
    data = load(TRACES)
    layers = sorted(data)
    rows, fitted, table = [], {}, []
    for layer in layers:
        q, k, v, beta = data[layer]
        scores = beta * q @ k.mT
        alpha, reached = fit(scores, args.target, args.steps, args.lr)
        fitted[layer] = [round(float(a), 4) for a in alpha]
        rel_fit, upd_fit = gag_effect(q, k, v, beta, alpha)
        rel_15, upd_15 = gag_effect(q, k, v, beta, torch.full_like(alpha, 1.5))
        over_15 = overlap(scores, torch.full_like(alpha, 1.5))
        rows.append(
            {
                "layer": layer,
                "alpha": fitted[layer],
                "overlap_fitted": [round(float(x), 4) for x in reached],
                "overlap_alpha_1.5": [round(float(x), 4) for x in over_15],
                "residual_rel_fitted": rel_fit,
                "residual_rel_alpha_1.5": rel_15,
                "gag_update_fitted": upd_fit,
                "gag_update_alpha_1.5": upd_15,
            }
        )
        table.append(
            f"| {layer} | {', '.join(f'{a:.2f}' for a in fitted[layer])} "
            f"| {float(reached.mean()):.3f} | {float(over_15.mean()):.3f} "
            f"| {rel_fit:.3f} | {rel_15:.3f} | {upd_fit:.3f} | {upd_15:.3f} |"
        )
        print(table[-1], flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "fit_alpha.json").write_text(json.dumps({"target": args.target, "layers": rows}, indent=1) + "\n")
    FIGURES.mkdir(parents=True, exist_ok=True)
    figure(layers, fitted, FIGURES / "fit_alpha.png", args.target)
    md = [
        f"# α per head fitted to a {args.target:.0%} softmax overlap (bundled cross-attention traces)",
        "",
        f"Written by `analysis/fit_alpha.py` ({args.steps} Adam steps, lr {args.lr}); traces: "
        "`hopfield_aa/data/traces/cross` (every cross-attention layer, 10 steps, 10 prompts, 64 queries). "
        "Overlap: mean Σ min(entmax_α, softmax). Residual: mean ‖SV − DV‖/‖DV‖; GAG update: mean ‖G − S‖ "
        "at λ = 1, ζ = 0 (the part of the residual along S).",
        "",
        "| layer | fitted α per head | overlap (fitted) | overlap (α = 1.5) | residual (fitted) "
        "| residual (1.5) | GAG update (fitted) | GAG update (1.5) |",
        "|---|---|---|---|---|---|---|---|",
        *table,
        "",
        "![fitted α](../figures/fit_alpha.png)",
    ]
    (OUT / "fit_alpha.md").write_text("\n".join(md) + "\n")
    print(f"wrote {OUT / 'fit_alpha.md'}")


if __name__ == "__main__":
    main()
