"""Report figures whose legends used to hide data or say too little: the legends sit beside or below the
axes (never over the data), name both line styles, and say in words what each curve counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import hopfield_aa.plotting as plotting


@pytest.fixture
def drawn(monkeypatch) -> list[Any]:
    figures: list[Any] = []

    def keep(fig: Any, path: Path) -> str:
        fig.tight_layout()
        fig.canvas.draw()
        figures.append(fig)
        return str(path)

    monkeypatch.setattr(plotting, "_save", keep)
    return figures


def _outside_axes(fig: Any) -> list[list[str]]:
    """The texts of every legend, checking that none overlaps its axes' data area."""
    renderer = fig.canvas.get_renderer()
    texts = []
    for ax in fig.axes:
        frame = ax.get_window_extent(renderer)
        for legend in [c for c in ax.get_children() if c.__class__.__name__ == "Legend"]:
            box = legend.get_window_extent(renderer)
            assert not box.overlaps(frame), [t.get_text() for t in legend.get_texts()]
            texts.append([t.get_text() for t in legend.get_texts()])
    return texts


def test_ladder_legend_names_both_rules_and_every_case_beside_the_axes(drawn, tmp_path: Path) -> None:
    series = {"scales": [1, 2, 3], "ladder": [1e-3, 1e-2, 1e-1], "plain": [1e-2, 1e-1, 1.0]}
    data = {"gaussian-N2-d2-b1": series, "clustered-N32-d16-b16": series}
    assert plotting.plot_ladder(data, tmp_path / "ladder.png")
    texts = _outside_axes(drawn[0])
    flat = [t for legend in texts for t in legend]
    assert any("(solid)" in t for t in flat) and any("(dashed)" in t for t in flat)
    assert set(data) <= set(flat)


def test_common_vs_beta_legend_says_what_each_curve_counts(drawn, tmp_path: Path) -> None:
    points = [
        {"beta": b, "common_share": c, "dense_non_common": n, "states": 8}
        for b, c, n in ((0.1, 0.0, 8), (100.0, 0.7, 3), (1000.0, 1.0, 0))
    ]
    assert plotting.plot_common_vs_beta(points, tmp_path / "common.png")
    flat = [t for legend in _outside_axes(drawn[0]) for t in legend]
    assert len(flat) == 2 and not any("non-common" in t for t in flat)
    assert any("share of states" in t for t in flat) and any("share of all limits" in t for t in flat)
