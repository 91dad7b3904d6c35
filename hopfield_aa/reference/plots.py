"""Figures of the reference-model layer: training curves and sample grids (matplotlib; no computation)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _smooth(values: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    steps = np.arange(1, len(values) + 1)
    if len(values) < window:
        return steps, values
    return steps[window - 1 :], np.convolve(values, np.ones(window) / window, mode="valid")


def loss_figure(losses: Sequence[float], vae_losses: Sequence[float] = (), window: int = 50) -> Any:
    """Both training stages' losses, raw and as a moving average over ``window`` steps (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (name, np.asarray(v, dtype=float))
        for name, v in (
            ("autoencoder: L1 + L2 + w·KL", vae_losses),
            ("denoiser: min-SNR weighted ε-MSE", losses),
        )
        if len(v)
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.5), squeeze=False)
    for ax, (name, values) in zip(axes[0], panels, strict=True):
        ax.plot(np.arange(1, len(values) + 1), values, lw=0.5, alpha=0.35, label="per step")
        ax.plot(*_smooth(values, window), lw=1.5, label=f"mean of {window} steps")
        ax.set_yscale("log")
        ax.set_xlabel("optimiser step")
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def grid_figure(
    images: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], title: str = ""
) -> Any:
    """An image grid ``(rows, cols, H, W, 3)`` in [0, 1] with labelled rows and columns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = images.shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols + 2.8, 1.2 * rows + 0.6), squeeze=False)
    for i in range(rows):
        for j in range(cols):
            ax = axes[i, j]
            ax.imshow(np.clip(images[i, j], 0.0, 1.0), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(col_labels[j], fontsize=7)
            if j == 0:
                ax.set_ylabel(row_labels[i], fontsize=6, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


__all__ = ["grid_figure", "loss_figure"]
